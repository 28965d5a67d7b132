"""The benchmark on trivial editors, whose oracle scores are known exactly, and the `editrl eval` command."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from editrl import metrics
from editrl.data.manifest import ManifestDataset
from editrl.data.procedural import OPS
from editrl.data.synth import synthesize
from editrl.evaluate import OVERALL, EvalReport, evaluate
from editrl.reward import FunctionReward, RewardSet
from editrl.types import EditSample

PERFECT = metrics.MAX_PSNR_DB


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "test"
    synthesize(out, 2 * len(OPS), seed=5, frames=5, size=(32, 32), split="test", progress=False)
    return out


@pytest.fixture(scope="module")
def dataset(data_dir) -> ManifestDataset:
    return ManifestDataset(ManifestDataset.Options(path=str(data_dir)))


def return_target(samples: list[EditSample]) -> torch.Tensor:
    return torch.stack([s.target for s in samples])


def return_source(samples: list[EditSample]) -> torch.Tensor:
    return torch.stack([s.source for s in samples])


def by_category(report: EvalReport) -> dict[str, dict]:
    return {row["category"]: row for row in report.table()}


def test_returning_the_target_scores_perfectly_everywhere(dataset, tmp_path):
    report = evaluate(return_target, dataset, batch_size=3, out_dir=tmp_path, progress=False)
    table = by_category(report)
    assert list(table) == [*OPS, OVERALL]
    assert table[OVERALL]["n"] == len(dataset) and all(table[op]["n"] == 2 for op in OPS)
    for cat, row in table.items():
        assert row["fidelity_psnr"] == PERFECT and row["fidelity_ssim"] == 1.0, cat
        assert row["temporal"] == 1.0, cat
        if cat == "style":  # a global edit: nothing outside the mask to preserve
            assert math.isnan(row["preservation_psnr"]) and math.isnan(row["preservation_ssim"])
        else:
            assert row["preservation_psnr"] == PERFECT and row["preservation_ssim"] == 1.0, cat


def test_returning_the_source_preserves_perfectly_and_fails_the_edit(dataset):
    report = evaluate(return_source, dataset, batch_size=4, progress=False)
    for row in report.rows:
        if not math.isnan(row["preservation_psnr"]):
            assert row["preservation_psnr"] == PERFECT and row["preservation_ssim"] == 1.0, row["id"]
        # SSIM forgives a global tone change (structure is kept), PSNR does not
        assert row["fidelity_psnr"] < 25 and row["fidelity_ssim"] < 0.99, row
    overall = report.overall()
    assert overall["fidelity_psnr"] < 20 and overall["fidelity_ssim"] < 0.5 and overall["temporal"] < 1.0


def test_per_sample_rows_match_the_metric_functions(dataset):
    def noisy(samples: list[EditSample]) -> torch.Tensor:
        t = return_target(samples)
        return (t + 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)

    report = evaluate(noisy, dataset, batch_size=5, limit=3, progress=False)
    assert [r["id"] for r in report.rows] == [dataset[i].id for i in range(3)]
    s = dataset[1]
    edited = noisy([dataset[0], dataset[1], dataset[2], dataset[3], dataset[4]])[1:2]
    expect_fid = metrics.fidelity(edited, s.target[None], s.mask[None])
    assert report.rows[1]["fidelity_psnr"] == pytest.approx(expect_fid["psnr"].item(), abs=1e-4)
    assert report.rows[1]["fidelity_ssim"] == pytest.approx(expect_fid["ssim"].item(), abs=1e-5)
    assert report.rows[1]["smoothness"] == pytest.approx(metrics.temporal_consistency(edited).item(), abs=1e-6)


def test_rewards_are_averaged_and_invalid_scores_excluded(dataset):
    def brightness(instructions, sources, edited, references, categories, **kw):
        return [None if c == "style" else float(e.mean()) for e, c in zip(edited, categories)]

    rewards = RewardSet([("bright", 1.0, FunctionReward(brightness, {}))])
    report = evaluate(return_target, dataset, rewards=rewards, progress=False)
    assert report.columns[-1] == "reward_bright"
    table = by_category(report)
    assert math.isnan(table["style"]["reward_bright"])
    expected = [float(dataset[i].target.mean()) for i in range(len(dataset)) if dataset.categories[i] != "style"]
    assert table[OVERALL]["reward_bright"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def test_outputs_on_disk(dataset, tmp_path):
    report = evaluate(return_source, dataset, out_dir=tmp_path, grid_per_category=1, grid_frames=3, progress=False)
    md = (tmp_path / "results.md").read_text()
    assert md.splitlines()[0].startswith("| category | n | fidelity_psnr")
    assert "| **overall** | 18 |" in md and "n/a" in md  # style has no preservation
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["category"] for r in rows] == [*OPS, OVERALL]
    assert float(rows[-1]["fidelity_psnr"]) == pytest.approx(report.overall()["fidelity_psnr"])
    with (tmp_path / "samples.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(dataset)
    grid = Image.open(tmp_path / "grid.png")
    scale = 96 // 32
    assert grid.width == 3 * 3 * 32 * scale + 2 * 6 + (6 + 32 * scale)  # + the reference column
    assert grid.height == 14 + len(OPS) * (14 + 32 * scale)
    # the grid's first row shows the first sample's source, then (for return_source) the same frames again
    px = torch.from_numpy(np.array(grid)).permute(2, 0, 1).float() / 255
    y0 = 14 + 14
    first = dataset[0].source[0]
    assert torch.allclose(px[:, y0 : y0 + 32 * scale : scale, 0 : 32 * scale : scale], first, atol=1 / 255)
    ref_row = OPS.index("reference_add")
    y_ref, x_ref = 14 + ref_row * (14 + 32 * scale) + 14, 3 * (3 * 32 * scale + 6)
    reference = dataset[dataset.categories.index("reference_add")].reference
    assert torch.allclose(px[:, y_ref : y_ref + 32 * scale : scale, x_ref : x_ref + 32 * scale : scale], reference, atol=1 / 255)


def test_an_editor_with_the_wrong_geometry_is_a_clear_error(dataset):
    with pytest.raises(ValueError, match=r"the editor returned \(1, 5, 3, 16, 16\)"):
        evaluate(lambda s: torch.zeros(1, 5, 3, 16, 16), dataset, batch_size=1, progress=False)


def test_eval_command_runs_the_benchmark(data_dir, tmp_path, monkeypatch):
    import typer

    import editrl.evaluate as ev
    from editrl.data.cli import register

    calls = {}

    def fake_editor(checkpoint, steps, seed, device, batch_size):
        calls.update(checkpoint=checkpoint, steps=steps, seed=seed)
        return return_target, None, None, batch_size or 4

    monkeypatch.setattr(ev, "checkpoint_editor", fake_editor)
    cli = typer.Typer()
    register(cli)
    ckpt = tmp_path / "run"
    result = CliRunner().invoke(cli, ["eval", "--checkpoint", str(ckpt), "--data", str(data_dir), "--steps", "3", "--limit", "9"])
    assert result.exit_code == 0, result.output
    assert calls == {"checkpoint": ckpt, "steps": 3, "seed": None}  # None: the run's own seed
    assert "| **overall** | 9 | 100.00 | 1.0000 |" in result.output
    assert {p.name for p in (ckpt / "eval").iterdir()} == {"results.md", "results.csv", "samples.csv", "grid.png"}
    result = CliRunner().invoke(cli, ["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "manifest not found" in result.output and "Traceback" not in result.output
