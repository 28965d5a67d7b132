"""The held-out edit benchmark: run an editor over a dataset and score it per category and overall.

`evaluate(edit_fn, dataset)` takes any `edit_fn(samples) -> (B, T, C, H, W)`: a trained policy
(`checkpoint_editor`), or a trivial one in tests ("return the target" must score perfect fidelity and
preservation). With ground truth (synthetic data) it reports oracle metrics:

- fidelity: PSNR / SSIM of the edit against the target inside the edit mask;
- preservation: PSNR / SSIM of the edit against the source outside the mask (n/a for global edits);
- temporal: 1 - mean |frame-to-frame change of the edit - that of the target| (1: moves like the target);
- smoothness: 1 - mean |frame-to-frame change| of the edit alone (needs no ground truth);

plus the mean of any rewards given (judges included). Rows without a target get only smoothness and
rewards; rows without a mask are scored on the whole frame for fidelity. On images (one-frame videos) the temporal
columns do not apply: n/a in the tables, left out of every mean.

Beside the editor stand two yardsticks (`yardsticks`), scored the same way on the same samples: `copy` returns the
source (an editor that does nothing) and `ceiling` the target through the policy's autoencoder (the best a latent
editor can reproduce); `gap_closed_*` is the share of the copy-to-ceiling gap that the editor closes.
"""

from __future__ import annotations

import itertools

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from editrl import metrics
from editrl.base import DataError
from editrl.data.base import EditDataset
from editrl.policy import Reconstructs
from editrl.types import EditSample

EditFn = Callable[[list[EditSample]], Tensor]

ORACLE_COLUMNS = ("fidelity_psnr", "fidelity_ssim", "preservation_psnr", "preservation_ssim", "temporal", "smoothness")
CATEGORY_ORDER = ("add", "remove", "replace", "recolor", "background", "style", "reference_add", "reference_swap", "hybrid")
OVERALL = "overall"
UNCATEGORISED = "uncategorised"
YARDSTICKS = ("copy", "ceiling")  # the source returned unedited; the target through the policy's autoencoder
GAP_COLUMNS = ("fidelity_psnr", "fidelity_ssim")  # where copying fails the edit and the ceiling bounds the editor
EVAL_FILES = ("results.md", "results.csv", "samples.csv", "grid.png")  # what `evaluate` writes to its out_dir


@dataclass
class EvalReport:
    """Per-sample scores, and the per-category table made from them."""

    rows: list[dict[str, Any]]  # id, category, then one value per column (NaN: not applicable)
    columns: list[str]
    yardsticks: dict[str, EvalReport] = field(default_factory=dict)  # `copy`, `ceiling` (absent: no autoencoder)
    picks: list[tuple[EditSample, Tensor]] = field(default_factory=list)  # a few samples per category and their edits

    @property
    def yardstick_columns(self) -> list[str]:
        if not self.yardsticks:
            return []
        return [f"{y}_{c}" for y in YARDSTICKS for c in ORACLE_COLUMNS] + [f"gap_closed_{c}" for c in GAP_COLUMNS]

    def table(self) -> list[dict[str, Any]]:
        """One row per category (benchmark order), then `overall`: n and the mean of each column over
        the samples where it applies (`n/a` stays NaN), then the yardsticks' means and the gap closed."""
        cats = sorted({r["category"] for r in self.rows}, key=_category_key)
        groups = [(c, [r for r in self.rows if r["category"] == c]) for c in cats] + [(OVERALL, self.rows)]
        out = []
        for name, rows in groups:
            entry: dict[str, Any] = {"category": name, "n": len(rows)}
            for col in self.columns:
                values = [r[col] for r in rows if not math.isnan(r[col])]
                entry[col] = sum(values) / len(values) if values else math.nan
            out.append(entry)
        marks = {y: {e["category"]: e for e in report.table()} for y, report in self.yardsticks.items()}
        for entry in out if self.yardsticks else []:
            for y in YARDSTICKS:
                entry |= {f"{y}_{c}": marks.get(y, {}).get(entry["category"], {}).get(c, math.nan) for c in ORACLE_COLUMNS}
            for c in GAP_COLUMNS:
                entry[f"gap_closed_{c}"] = gap_closed(entry[c], entry[f"copy_{c}"], entry[f"ceiling_{c}"])
        return out

    def overall(self) -> dict[str, Any]:
        return self.table()[-1]

    def to_markdown(self) -> str:
        """The table; with yardsticks, a second one: each gap metric beside copy, ceiling and the gap closed."""
        table = self.table()
        names = [f"**{e['category']}**" if e["category"] == OVERALL else e["category"] for e in table]
        md = markdown_table(["category", "n", *self.columns],
                            [[name, str(e["n"]), *(_fmt(c, e[c]) for c in self.columns)] for name, e in zip(names, table)])
        if not self.yardsticks:
            return md
        groups = [(c, f"copy_{c}", f"ceiling_{c}", f"gap_closed_{c}") for c in GAP_COLUMNS]
        return md + (
            "\nYardsticks: copy = the source returned unedited, ceiling = the target through the policy's autoencoder "
            "(n/a: it has none), gap closed = (editor - copy) / (ceiling - copy).\n\n"
        ) + markdown_table(
            ["category", "n", *(h for c in GAP_COLUMNS for h in (c, "copy", "ceiling", "gap closed"))],
            [[name, str(e["n"]), *(_fmt(k, e[k]) for g in groups for k in g)] for name, e in zip(names, table)],
        )

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """results.md (the table), results.csv (the table) and samples.csv (every sample)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {key: out / name for key, name in zip(("markdown", "table", "samples"), EVAL_FILES)}
        paths["markdown"].write_text(self.to_markdown())
        write_csv(paths["table"], ["category", "n", *self.columns, *self.yardstick_columns], self.table())
        write_csv(paths["samples"], ["id", "category", *self.columns], self.rows)
        return paths


def _category_key(cat: str) -> tuple[int, str]:
    return (CATEGORY_ORDER.index(cat), cat) if cat in CATEGORY_ORDER else (len(CATEGORY_ORDER), cat)


def gap_closed(editor: float, copy: float, ceiling: float) -> float:
    """Percent of the way from copying the source (0) to the ceiling (100); NaN where the ceiling does not beat copying."""
    if not ceiling > copy:  # also NaN: no ceiling
        return math.nan
    return 100 * (editor - copy) / (ceiling - copy)


def _fmt(column: str, value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if column.startswith("gap_closed"):
        return f"{value:.0f}%"
    return f"{value:.2f}" if column.endswith("psnr") else f"{value:.4f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows]) + "\n"


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


def oracle_scores(edited: Tensor, samples: list[EditSample]) -> dict[str, Tensor]:
    """The oracle columns for a batch of same-shaped samples, (B,) each, NaN where a row has no target.

    Computed on `edited`'s device; the samples' ground truth is moved there."""
    b, device = len(samples), edited.device
    nan = torch.full((b,), math.nan, device=device)
    out = {col: nan.clone() for col in ORACLE_COLUMNS}
    out["smoothness"] = metrics.temporal_consistency(edited)
    have = [i for i, s in enumerate(samples) if s.target is not None]
    if not have:
        return out
    idx = torch.tensor(have, device=device)
    sub = edited[idx]
    source = torch.stack([samples[i].source for i in have]).to(device)  # type: ignore[misc]
    target = torch.stack([samples[i].target for i in have]).to(device)  # type: ignore[misc]
    full = torch.ones(sub.shape[1], 1, *sub.shape[3:], dtype=torch.bool)
    mask = torch.stack([samples[i].mask if samples[i].mask is not None else full for i in have]).to(device)  # type: ignore[misc]
    fid = metrics.fidelity(sub, target, mask, metrics=("psnr", "ssim"))
    pres = metrics.preservation(sub, source, mask, metrics=("psnr", "ssim"))
    for name, values in (
        ("fidelity_psnr", fid["psnr"]),
        ("fidelity_ssim", fid["ssim"]),
        ("preservation_psnr", pres["psnr"]),
        ("preservation_ssim", pres["ssim"]),
        ("temporal", metrics.temporal_consistency(sub, reference=target)),
    ):
        out[name][idx] = values.to(out[name].dtype)
    return out


def reward_scores(rewards: Any, edited: Tensor, samples: list[EditSample]) -> dict[str, Tensor]:
    """Each reward's scores (B,), NaN where the reward gave no valid score."""
    from editrl.reward import ALL_NEEDS, reward_batch

    outs = rewards.score(reward_batch(samples, edited, getattr(rewards, "needs", ALL_NEEDS)))
    return {name: torch.where(o.valid, o.scores, torch.full_like(o.scores, math.nan)) for name, o in outs.items()}


def batches(dataset: EditDataset, indices: list[int], batch_size: int) -> Iterator[list[EditSample]]:
    """Consecutive samples of one source shape, at most `batch_size` at a time (a policy batch needs one shape).
    Samples without a source (prompts for a text-to-video policy) batch together."""

    def shape(s: EditSample) -> tuple[int, ...] | None:
        return None if s.source is None else tuple(s.source.shape)

    batch: list[EditSample] = []
    for i in indices:
        sample = dataset[i]
        if batch and (len(batch) == batch_size or shape(sample) != shape(batch[0])):
            yield batch
            batch = []
        batch.append(sample)
    if batch:
        yield batch


def evaluate(
    edit_fn: EditFn,
    dataset: EditDataset,
    rewards: Any = None,
    batch_size: int = 4,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    grid_per_category: int = 2,
    grid_frames: int = 3,
    progress: bool = True,
    yardsticks: dict[str, EvalReport] | None = None,
) -> EvalReport:
    """Edit every sample (the first `limit`), score it, and write the tables and a frame grid to `out_dir`.

    `rewards` is a `RewardSet` (or anything with `score(RewardBatch) -> {name: RewardOutput}`); `yardsticks` are
    the reports of `yardsticks()` on the same samples, shown beside the editor's.
    """
    from rich.progress import Progress

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    indices = list(range(len(dataset) if limit is None else min(limit, len(dataset))))
    reward_names = [f"reward_{n}" for n in getattr(rewards, "names", [])]
    columns = [*ORACLE_COLUMNS, *reward_names]
    rows: list[dict[str, Any]] = []
    shown: dict[str, list[tuple[EditSample, Tensor]]] = {}
    with Progress(disable=not progress, transient=True) as bar, torch.no_grad():
        task = bar.add_task("evaluating", total=len(indices))
        for batch in batches(dataset, indices, batch_size):
            edited = edit_fn(batch).detach().float()  # scored where the editor made it (the policy's device)
            expected = (len(batch), *batch[0].source.shape) if batch[0].source is not None else tuple(edited.shape)
            if tuple(edited.shape) != expected:
                raise DataError(
                    f"the editor returned {tuple(edited.shape)} for {len(batch)} samples of {tuple(expected[1:])} "
                    f"(first: {batch[0].id!r}); benchmark data must have the geometry the policy produces"
                )
            scores = oracle_scores(edited, batch)
            if rewards is not None:
                scores |= {f"reward_{k}": v for k, v in reward_scores(rewards, edited, batch).items()}
            values = torch.stack([scores[c].to(edited.device, torch.float32) for c in columns], 1).tolist()  # one read
            for i, s in enumerate(batch):
                cat = s.category or UNCATEGORISED
                rows.append({"id": s.id, "category": cat, **dict(zip(columns, values[i]))})
                if len(shown.setdefault(cat, [])) < grid_per_category:
                    shown[cat].append((s, edited[i].clone()))  # to the host after the loop, not inside it
            bar.advance(task, len(batch))
    picks = [(s, e.cpu()) for cat in sorted(shown, key=_category_key) for s, e in shown[cat]]
    report = EvalReport(rows, columns, yardsticks or {}, picks)
    if out_dir is not None:
        report.write(out_dir)
        if picks:
            save_grid(Path(out_dir) / EVAL_FILES[3], [(s, [e]) for s, e in picks], grid_frames)
    return report


def yardsticks(dataset: EditDataset, policy: Any = None, batch_size: int = 4, limit: int | None = None,
               progress: bool = True, device: str | torch.device | None = None) -> dict[str, EvalReport]:
    """`copy` (the sources as the edits) and, for a policy that `Reconstructs`, `ceiling` (the targets through its
    autoencoder), scored on the policy's device (else `device`) like an editor. They never change while a policy
    trains: score them once per evaluation set. Empty for data without sources and targets."""
    first = dataset[0] if len(dataset) else None
    if first is None or first.source is None or first.target is None:
        return {}
    device = getattr(policy, "device", device or "cpu")

    def copy(samples: list[EditSample]) -> Tensor:
        return torch.stack([s.source for s in samples]).to(device)  # type: ignore[misc]

    fns: dict[str, EditFn] = {"copy": copy}
    if isinstance(policy, Reconstructs):
        fns["ceiling"] = lambda samples: policy.reconstruct(
            torch.stack([s.source if s.target is None else s.target for s in samples])  # type: ignore[misc]
        )
    return {name: evaluate(fn, dataset, batch_size=batch_size, limit=limit, grid_per_category=0, progress=progress)
            for name, fn in fns.items()}


def save_grid(path: str | Path, picks: list[tuple[EditSample, list[Tensor]]], frames: int = 3,
              labels: Sequence[str] = ("edited",)) -> Path:
    """A PNG with one row per sample: source | its edits (titled `labels`) | target, each `frames` evenly spaced
    frames (one: the middle frame), and the reference image after them when any sample has one.

    Small videos are enlarged (nearest neighbour) so that a 32x32 benchmark is still readable.
    """
    from PIL import Image, ImageDraw

    from editrl.data.video import to_uint8

    first = picks[0][0].source
    assert first is not None
    t, _, h, w = first.shape
    scale = max(1, 96 // max(h, w))
    fh, fw = h * scale, w * scale
    label_h, gap = 14, 6
    k = min(frames, t)
    chosen = [(t - 1) // 2] if k == 1 else sorted({round(i * (t - 1) / (k - 1)) for i in range(k)})
    panel_w = len(chosen) * fw
    titles = ["source", *labels, "target"]
    n_video = len(titles)
    if any(s.reference is not None for s, _ in picks):
        titles.append("reference")
    width = n_video * (panel_w + gap) - gap + (gap + fw if len(titles) > n_video else 0)
    canvas = Image.new("RGB", (width, label_h + len(picks) * (label_h + fh)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(titles):
        draw.text((j * (panel_w + gap) + 2, 1), title, fill=(0, 0, 0))

    def paste(image: Tensor, x: int, y: int) -> None:
        if image.shape[-2:] == (h, w):
            canvas.paste(Image.fromarray(to_uint8(image[None])[0]).resize((fw, fh), Image.NEAREST), (x, y))

    for row, (sample, edits) in enumerate(picks):
        y = label_h + row * (label_h + fh)
        draw.text((2, y + 1), f"{sample.category or UNCATEGORISED} | {sample.id} | {sample.instruction}"[:160], fill=(0, 0, 0))
        for j, video in enumerate((sample.source, *edits, sample.target)):
            for n, f in enumerate(chosen):
                if video is not None and f < video.shape[0]:
                    paste(video[f], j * (panel_w + gap) + n * fw, y + label_h)
        if sample.reference is not None:
            paste(sample.reference, n_video * (panel_w + gap), y + label_h)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def ode_editor(policy: Any, steps: int, shift: float, seed: int, batch_size: int) -> EditFn:
    """Deterministic (ODE) edits, batch k drawing its noise from seed + k * batch_size (its first sample's index): the
    same edits wherever the benchmark runs at the same batch size, in training's held-out evaluations or `editrl eval`."""
    from editrl.rollout import edit_videos

    seeds = itertools.count(seed, batch_size)

    def edit_fn(samples: list[EditSample]) -> Tensor:
        return edit_videos(policy, samples, steps, shift, next(seeds)).float()

    return edit_fn


def checkpoint_editor(checkpoint: str | Path, steps: int | None = None, seed: int | None = None, device: str = "cpu",
                      batch_size: int | None = None) -> tuple[EditFn, Any, Any, int]:
    """An edit function backed by a trained checkpoint (GRPO or SFT), its recipe, its policy and the batch size it
    runs at. Seed and batch size default to the run's (`run.seed`, the micro-batch): the edits its training evaluated."""
    from editrl.checkpoint import load_checkpoint
    from editrl.config import derive_layout

    policy, recipe = load_checkpoint(checkpoint, device)
    batch = batch_size or derive_layout(recipe).micro_batch_size
    s = recipe.sampling
    edit_fn = ode_editor(policy, steps or s.eval_steps or s.steps, s.shift, recipe.run.seed if seed is None else seed, batch)
    return edit_fn, recipe, policy, batch


def recipe_rewards(recipe: Any) -> Any:
    """The recipe's rewards as a RewardSet, or None when it has none (e.g. an SFT recipe)."""
    from editrl.reward import RewardSet, build_reward

    terms = getattr(getattr(recipe, "rewards", None), "terms", None)
    if not terms:
        return None
    return RewardSet([(t.key, t.weight, build_reward(t.name, recipe.plugin_options(f"rewards.terms.{i}", t.options)))
                      for i, t in enumerate(terms)], recipe.rewards.timeout_s)
