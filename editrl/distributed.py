"""The only module that talks to torch.distributed / DeepSpeed.

The trainer sees a `Backend`: it owns the optimiser (so ZeRO can shard it), runs backward and the update,
and reduces tensors across ranks. `LocalBackend` is the single-process case.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from editrl.config import OptimConfig


def warmup_lambda(warmup_steps: int) -> Any:
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class LocalBackend:
    """One process: torch AdamW, gradient clipping, identity collectives."""

    rank = 0
    world_size = 1

    def __init__(self, optim: OptimConfig) -> None:
        self.cfg = optim
        self.params: list[nn.Parameter] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, policy: Any) -> None:
        self.params = list(policy.trainable_parameters())
        if not self.params:
            raise ValueError("the policy has no trainable parameters (set optim.lora, or train the policy's own modules)")
        c = self.cfg
        self.optimizer = torch.optim.AdamW(self.params, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_lambda(c.warmup_steps))

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, update, zero the gradients; returns the pre-clip gradient norm."""
        assert self.optimizer is not None
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def schedule_step(self) -> None:
        assert self.scheduler is not None
        self.scheduler.step()

    @property
    def lr(self) -> float:
        assert self.optimizer is not None
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        assert self.optimizer is not None and self.scheduler is not None
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.optimizer is not None and self.scheduler is not None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def all_gather(self, t: Tensor) -> Tensor:
        """Concatenate `t` (same shape on every rank) along dim 0 in rank order."""
        return t

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def barrier(self) -> None:
        pass

    @contextlib.contextmanager
    def gathered(self, policy: Any) -> Iterator[None]:
        """Inside: the trainable weights are whole on every rank (needed to save under ZeRO-3)."""
        yield


def make_backend(recipe: Any) -> LocalBackend:
    if recipe.distributed.backend == "none":
        return LocalBackend(recipe.optim)
    raise NotImplementedError("distributed.backend=deepspeed is not available yet")
