"""Data that flows between the engine, policies and rewards.

Conventions used everywhere:
- videos are float tensors in [0, 1], shaped (T, C, H, W) per sample and (B, T, C, H, W) batched;
- images are (C, H, W) in [0, 1];
- edit masks are (T, 1, H, W) bool, True where the instruction allows change.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class EditSample:
    """One editing request, optionally with its ground truth (synthetic data has it, user data may not)."""

    id: str
    instruction: str
    source: Tensor | None = None
    reference: Tensor | None = None
    target: Tensor | None = None
    mask: Tensor | None = None
    category: str | None = None
    edited: Tensor | None = None  # an existing edit to score (`editrl judge`), not a training target
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Condition:
    """Everything a policy computed once per request (VLM tokens, VAE latents, ...).

    The engine never looks inside: it only repeats a request's condition for its group and slices
    micro-batches, so every tensor value must have the batch on dim 0. Non-tensor values are kept as is.
    """

    data: dict[str, Any]
    batch_size: int

    def _map(self, fn, batch_size: int) -> Condition:
        out = {k: fn(v) if isinstance(v, Tensor) else v for k, v in self.data.items()}
        return Condition(out, batch_size)

    def repeat_interleave(self, n: int) -> Condition:
        """Each request's condition repeated for the n members of its group (no re-encoding)."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0), self.batch_size * n)

    def index(self, idx: Tensor | slice | list[int]) -> Condition:
        if isinstance(idx, slice):
            n = len(range(*idx.indices(self.batch_size)))
        else:
            idx = torch.as_tensor(idx, dtype=torch.long)
            n = int(idx.numel())
        return self._map(lambda t: t[idx], n)

    @staticmethod
    def cat(conds: list[Condition]) -> Condition:
        keys = conds[0].data.keys()
        data = {
            k: torch.cat([c.data[k] for c in conds]) if isinstance(conds[0].data[k], Tensor) else conds[0].data[k]
            for k in keys
        }
        return Condition(data, sum(c.batch_size for c in conds))

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


@dataclass
class Trajectory:
    """What a rollout keeps for training: only the steps that will be trained are stored.

    `latents[:, k]` is the input x at `sigmas[k]` of trained step `steps[k]`, `next_latents[:, k]` the
    sample drawn from it, `log_probs[:, k]` its log-probability under the rollout policy.
    """

    steps: list[int]
    sigmas: Tensor  # (S,) sigma of each stored step
    sigmas_next: Tensor  # (S,)
    latents: Tensor  # (B, S, ...)
    next_latents: Tensor  # (B, S, ...)
    log_probs: Tensor  # (B, S)
    final: Tensor  # (B, ...) x at sigma = 0
    # (B, S, ...) what an objective needs besides: the rollout's step means (GRPO-Guard), NFT's noised x0 and old velocity
    extras: dict[str, Tensor] = field(default_factory=dict)

    def index(self, idx: Tensor) -> Trajectory:
        return replace(
            self,
            latents=self.latents[idx],
            next_latents=self.next_latents[idx],
            log_probs=self.log_probs[idx],
            final=self.final[idx],
            extras={k: v[idx] for k, v in self.extras.items()},
        )

    @staticmethod
    def cat(trajs: list[Trajectory]) -> Trajectory:
        first = trajs[0]
        return replace(
            first,
            latents=torch.cat([t.latents for t in trajs]),
            next_latents=torch.cat([t.next_latents for t in trajs]),
            log_probs=torch.cat([t.log_probs for t in trajs]),
            final=torch.cat([t.final for t in trajs]),
            extras={k: torch.cat([t.extras[k] for t in trajs]) for k in first.extras},
        )


@dataclass
class RewardBatch:
    """What a reward sees. Fields a reward did not declare in `needs` may be None.

    `edited`, `sources` and `targets` are (B, T, C, H, W); `references` and `masks` are per-sample lists
    because not every request has one.
    """

    instructions: list[str]
    edited: Tensor | None = None
    sources: Tensor | None = None
    targets: Tensor | None = None
    references: list[Tensor | None] | None = None
    masks: list[Tensor | None] | None = None
    categories: list[str | None] | None = None
    ids: list[str] | None = None

    def __len__(self) -> int:
        return len(self.instructions)


@dataclass
class RewardOutput:
    """Scores for a batch. `valid=False` marks a score that must be excluded (never read as 0)."""

    scores: Tensor  # (B,) float32
    valid: Tensor  # (B,) bool
    extras: dict[str, list[Any]] = field(default_factory=dict)

    @staticmethod
    def from_list(values: list[float | None], extras: dict[str, list[Any]] | None = None) -> RewardOutput:
        """trl's convention: None (or NaN) means 'no score for this sample'."""
        valid = torch.tensor([v is not None and v == v for v in values], dtype=torch.bool)
        scores = torch.tensor([float(v) if ok else 0.0 for v, ok in zip(values, valid.tolist())], dtype=torch.float32)
        return RewardOutput(scores, valid, extras or {})

    def __post_init__(self) -> None:
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32).flatten()
        self.valid = torch.as_tensor(self.valid, dtype=torch.bool).flatten() & torch.isfinite(self.scores)
        if self.scores.shape != self.valid.shape:
            raise ValueError(f"scores {tuple(self.scores.shape)} and valid {tuple(self.valid.shape)} differ in shape")
