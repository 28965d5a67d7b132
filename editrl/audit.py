"""`editrl judge --audit DATA --recipe R`: before any RL, does each reward term order edits the right way?

On a split with ground truth every sample is scored as several candidate edits: its target, and foils that a good
reward must rank below it: the source returned unedited, a wrong edit (another sample's target), the edit half done
(the mean of source and target), and the target blurred, noisy or frozen on its first frame. Each reward term of the
recipe (judges included) and the oracle score every candidate. Per category the audit reports how often each term
prefers the target over each foil (ties count half, so 0.5 is chance) and the mean over samples of the Spearman
correlation between the term and the oracle across one sample's candidates: GRPO reads only the order of a group's
rewards for one request, so that order is the one that matters. The oracle is the mean of the benchmark's
ground-truth columns in [0, 1] (fidelity and preservation SSIM, motion agreement: `editrl.evaluate.oracle_scores`);
its own row shows which foils the data really degrade (a frozen static clip ties with its target).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from editrl.base import DataError
from editrl.data.base import EditDataset
from editrl.evaluate import EvalReport, batches, markdown_table, reward_scores, write_csv, oracle_scores
from editrl.types import EditSample

FOILS = ("source", "wrong_edit", "half_edit", "blurred", "noisy", "frozen")
ORACLE = "oracle"
ORACLE_PARTS = ("fidelity_ssim", "preservation_ssim", "temporal")
COLUMNS = [*(f"vs_{f}" for f in FOILS), "spearman"]
AUDIT_FILES = ("audit.md", "audit.csv", "audit_samples.csv", "audit.png")  # what write_audit writes


def ranks(x: Tensor) -> Tensor:
    """Ranks 1..n (float64); tied values share the mean of their ranks."""
    _, inverse, counts = torch.unique(x.double(), return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # the highest rank of each distinct value, in ascending order
    return (last - (counts.double() - 1) / 2)[inverse]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation over the pairs where both are finite; NaN under three pairs or for a constant."""
    ok = a.isfinite() & b.isfinite()
    if int(ok.sum()) < 3:
        return math.nan
    ra, rb = ranks(a[ok]), ranks(b[ok])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float((ra.square().sum() * rb.square().sum()).sqrt())
    return float((ra * rb).sum()) / den if den > 0 else math.nan


def prefers(target: float, foil: float) -> float:
    """1 when the target scores higher, 0.5 on a tie, 0 when lower; NaN when either has no score."""
    if math.isnan(target) or math.isnan(foil):
        return math.nan
    return 1.0 if target > foil else 0.5 if target == foil else 0.0


def candidates(source: Tensor, target: Tensor, wrong: Tensor | None, generator: torch.Generator) -> dict[str, Tensor]:
    """The target and its foils, (B, T, C, H, W) each; `wrong_edit` only when another target of this shape exists."""
    blurred = F.avg_pool2d(target.flatten(0, 1), 3, stride=1, padding=1, count_include_pad=False).view_as(target)
    out = {
        "target": target,
        "source": source,
        "wrong_edit": wrong,
        "half_edit": (source + target) / 2,
        "blurred": blurred,
        "noisy": (target + 0.1 * torch.randn(target.shape, generator=generator)).clamp(0, 1),
        "frozen": target[:, :1].expand_as(target).contiguous(),
    }
    return {k: v for k, v in out.items() if v is not None}


def oracle(videos: Tensor, samples: list[EditSample]) -> Tensor:
    """(B,) the mean of the oracle parts that apply (preservation is n/a for global edits)."""
    scores = oracle_scores(videos, samples)
    return torch.stack([scores[c].double() for c in ORACLE_PARTS]).nanmean(0)


def audit(dataset: EditDataset, rewards: Any, batch_size: int = 8, limit: int | None = None, seed: int = 0,
          progress: bool = True) -> dict[str, EvalReport]:
    """{term: per-sample report with COLUMNS}, the oracle first, then each of `rewards` (a RewardSet).

    Samples without a source or a target are left out; a dataset with none to audit is a DataError."""
    from rich.progress import Progress

    terms = [ORACLE, *rewards.names]
    rows: dict[str, list[dict[str, Any]]] = {t: [] for t in terms}
    spare: dict[tuple[int, ...], Tensor] = {}  # a target of each shape, the wrong edit of a batch of one
    indices = list(range(len(dataset) if limit is None else min(limit, len(dataset))))
    with Progress(disable=not progress, transient=True) as bar, torch.no_grad():
        task = bar.add_task("auditing", total=len(indices))
        for k, found in enumerate(batches(dataset, indices, batch_size)):
            bar.advance(task, len(found))
            batch = [s for s in found if s.source is not None and s.target is not None]
            if not batch:
                continue
            source = torch.stack([s.source for s in batch]).float()  # type: ignore[misc]
            target = torch.stack([s.target for s in batch]).float()  # type: ignore[misc]
            shape = tuple(target.shape[1:])
            wrong = target.roll(1, 0) if len(batch) > 1 else spare.get(shape)
            spare[shape] = target[:1]
            cands = candidates(source, target, wrong, torch.Generator().manual_seed(seed * 1_000_003 + k))
            videos, everyone = torch.cat(list(cands.values())), batch * len(cands)
            scores = {ORACLE: oracle(videos, everyone), **reward_scores(rewards, videos, everyone)}
            truth = scores[ORACLE].view(len(cands), len(batch))
            for term in terms:
                table = scores[term].double().cpu().view(len(cands), len(batch))  # candidate x sample
                for i, s in enumerate(batch):
                    got = dict(zip(cands, table[:, i].tolist()))
                    row = {f"vs_{f}": prefers(got["target"], got.get(f, math.nan)) for f in FOILS}
                    row["spearman"] = spearman(table[:, i], truth[:, i].cpu())
                    rows[term].append({"id": s.id, "category": s.category or "uncategorised", **row})
    if not rows[ORACLE]:
        raise DataError("the audit needs ground truth: no sample has both a source and a target video")
    return {t: EvalReport(rows[t], COLUMNS) for t in terms}


def write_audit(reports: dict[str, EvalReport], out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """audit.md (overall per term, then per category for each term), audit.csv (the same numbers, long),
    audit_samples.csv (every sample and term) and audit.png (a heat map per term)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {key: out / name for key, name in zip(("markdown", "table", "samples", "plot"), AUDIT_FILES)}
    tables = {t: r.table() for t, r in reports.items()}
    md = [f"# Reward audit{': ' + title if title else ''}\n",
          "How often each term scores the target above each foil (ties count half: 0.5 is chance), and its mean "
          "within-sample Spearman correlation with the oracle.\n", "## Overall\n",
          summary(reports)]
    md += [f"## {t}\n\n" + _table("category", [(e["category"], e) for e in table]) for t, table in tables.items()]
    paths["markdown"].write_text("\n".join(md))
    write_csv(paths["table"], ["term", "category", "n", *COLUMNS],
              [{"term": t, **e} for t, table in tables.items() for e in table])
    write_csv(paths["samples"], ["term", "id", "category", *COLUMNS],
              [{"term": t, **row} for t, r in reports.items() for row in r.rows])
    _plot(tables, paths["plot"])
    return paths


def summary(reports: dict[str, EvalReport]) -> str:
    """The overall row of every term, as a markdown table."""
    return _table("term", [(t, r.table()[-1]) for t, r in reports.items()])


def _table(first: str, entries: list[tuple[str, dict[str, Any]]]) -> str:
    cells = [[name, str(e["n"]), *("n/a" if math.isnan(e[c]) else f"{e[c]:.2f}" for c in COLUMNS)] for name, e in entries]
    return markdown_table([first, "n", *COLUMNS], cells)


def _plot(tables: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """One heat map per term: categories x (foils, Spearman), coloured by how far above chance (0.5 / 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = [e["category"] for e in next(iter(tables.values()))]
    size = (0.75 * len(COLUMNS) * len(tables) + 1, 0.4 * len(cats) + 2)
    fig, axes = plt.subplots(1, len(tables), figsize=size, squeeze=False)
    for ax, (term, table) in zip(axes[0], tables.items()):
        values = [[e[c] for c in COLUMNS] for e in table]
        above = [[2 * v - 1 if c.startswith("vs_") else v for c, v in zip(COLUMNS, row)] for row in values]
        ax.imshow(above, cmap="RdYlGn", vmin=-1, vmax=1, aspect="auto")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, "n/a" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(COLUMNS)), [c.removeprefix("vs_") for c in COLUMNS], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(cats)), cats, fontsize=7)
        ax.set_title(term, fontsize=9)
    fig.suptitle("target preferred over each foil (0.5: chance) | Spearman with the oracle", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def audit_folder(recipe: str, data: str | Path, overrides: list[str] | None = None, out: str | Path | None = None,
                 batch_size: int = 8, max_frames: int | None = None, limit: int | None = None,
                 progress: bool = True, allow_outside: bool = False) -> tuple[dict[str, EvalReport], dict[str, Path]]:
    """What `editrl judge --audit` does: the recipe's rewards audited on a manifest folder with targets, the report
    written to `out` (default runs/audit/RUN_NAME)."""
    from editrl.base import RecipeError
    from editrl.data.manifest import ManifestDataset, manifest_inputs
    from editrl.evaluate import recipe_rewards
    from editrl.files import check_output
    from editrl.preflight import load_recipe

    rec = load_recipe(recipe, overrides or [], check_paths=False)  # only its rewards are used
    out = Path(out or Path("runs/audit") / rec.run.name)
    check_output(out, [*manifest_inputs(data), Path(recipe)], folder=True, writes=AUDIT_FILES)
    rewards = recipe_rewards(rec)
    if rewards is None:
        raise RecipeError(f"recipe {recipe} has no rewards: add rewards.terms to audit")
    dataset = ManifestDataset(ManifestDataset.Options(path=str(data), max_frames=max_frames, allow_outside=allow_outside))
    reports = audit(dataset, rewards, batch_size, limit, progress=progress)
    return reports, write_audit(reports, out, title=f"{rec.run.name} on {data}")
