"""Yardsticks beside every evaluation: copy (the source unedited), ceiling (the target through the policy's
autoencoder) and the share of the gap between them that the editor closes; the before/after table and frame grid."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from editrl import metrics
from editrl.data.manifest import ManifestDataset
from editrl.data.procedural import OPS
from editrl.data.synth import synthesize
from editrl.evaluate import ORACLE_COLUMNS, OVERALL, evaluate, gap_closed, save_grid, yardsticks
from editrl.policy import Reconstructs
from editrl.summary import eval_before_after
from editrl.types import EditSample


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> ManifestDataset:
    out = tmp_path_factory.mktemp("yard") / "test"
    synthesize(out, len(OPS), seed=7, frames=5, size=(32, 32), split="test", progress=False)
    return ManifestDataset(ManifestDataset.Options(path=str(out)))


class Blur:
    """A stand-in autoencoder: a 3x3 box blur loses detail as a VAE does, and is known exactly."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.calls = 0

    def reconstruct(self, video: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        b, t, c, h, w = video.shape
        flat = torch.nn.functional.avg_pool2d(video.reshape(b * t, c, h, w), 3, stride=1, padding=1, count_include_pad=False)
        return flat.reshape(video.shape)


def sources(samples: list[EditSample]) -> torch.Tensor:
    return torch.stack([s.source for s in samples])


def targets(samples: list[EditSample]) -> torch.Tensor:
    return torch.stack([s.target for s in samples])


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_gap_closed_is_the_share_from_copy_to_ceiling():
    assert gap_closed(12.0, 8.0, 16.0) == 50.0 and gap_closed(8.0, 8.0, 16.0) == 0.0 and gap_closed(20.0, 8.0, 16.0) == 150.0
    assert math.isnan(gap_closed(12.0, 8.0, math.nan))  # no ceiling
    assert math.isnan(gap_closed(12.0, 16.0, 16.0)) and math.isnan(gap_closed(12.0, 16.0, 8.0))  # no gap to close


def test_copy_and_ceiling_score_like_editors_per_category(dataset, tmp_path):
    blur = Blur()
    marks = yardsticks(dataset, blur, batch_size=4, progress=False)
    assert set(marks) == {"copy", "ceiling"} and isinstance(blur, Reconstructs)
    copy = evaluate(sources, dataset, batch_size=4, progress=False).table()
    ceiling = evaluate(lambda s: blur.reconstruct(targets(s)), dataset, batch_size=4, progress=False).table()
    report = evaluate(targets, dataset, batch_size=4, progress=False, out_dir=tmp_path, yardsticks=marks)
    table = report.table()
    assert [e["category"] for e in table] == [*OPS, OVERALL]
    for entry, c, top in zip(table, copy, ceiling):
        for col in ORACLE_COLUMNS:
            assert same(entry[f"copy_{col}"], c[col]) and same(entry[f"ceiling_{col}"], top[col]), (entry["category"], col)
        # returning the target beats the blurred target: more than the whole gap
        assert entry["gap_closed_fidelity_psnr"] > 100
    # the editor that copies closes nothing of the gap, exactly
    nothing = evaluate(sources, dataset, batch_size=4, progress=False, yardsticks=marks).overall()
    assert nothing["gap_closed_fidelity_psnr"] == 0.0 and nothing["gap_closed_fidelity_ssim"] == 0.0
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["ceiling_fidelity_psnr"]) == pytest.approx(ceiling[-1]["fidelity_psnr"])
    assert float(rows[-1]["gap_closed_fidelity_ssim"]) == pytest.approx(table[-1]["gap_closed_fidelity_ssim"])
    md = (tmp_path / "results.md").read_text()
    assert "| category | n | fidelity_psnr | copy | ceiling | gap closed | fidelity_ssim | copy | ceiling | gap closed |" in md
    overall = table[-1]
    assert f"| **overall** | {len(OPS)} | {metrics.MAX_PSNR_DB:.2f} | {overall['copy_fidelity_psnr']:.2f} |" in md


def test_a_policy_without_an_autoencoder_has_no_ceiling(dataset, tmp_path):
    class NoVae:
        device = torch.device("cpu")

    marks = yardsticks(dataset, NoVae(), batch_size=4, progress=False)
    assert list(marks) == ["copy"]
    report = evaluate(targets, dataset, batch_size=4, progress=False, out_dir=tmp_path, yardsticks=marks)
    overall = report.overall()
    assert math.isnan(overall["ceiling_fidelity_psnr"]) and math.isnan(overall["gap_closed_fidelity_psnr"])
    assert overall["copy_fidelity_psnr"] < 20
    md_overall = [line for line in (tmp_path / "results.md").read_text().splitlines() if "**overall**" in line]
    assert md_overall[1].endswith("| n/a | n/a |")  # the yardstick table: ceiling and gap closed of fidelity_ssim
    with (tmp_path / "results.csv").open() as f:
        assert list(csv.DictReader(f))[-1]["ceiling_fidelity_psnr"] == ""


def test_prompt_only_data_has_no_yardsticks():
    from editrl.data.prompts import PromptDataset

    assert yardsticks(PromptDataset(PromptDataset.Options(prompts=["a red ball"])), Blur(), progress=False) == {}


def test_a_grid_of_one_frame_shows_the_middle_frame_of_each_column(tmp_path):
    frames = torch.linspace(0, 1, 5).view(5, 1, 1, 1).expand(5, 3, 8, 8).contiguous()  # frame k is grey k/4
    sample = EditSample(id="a", instruction="x", source=frames, target=1 - frames, category="add")
    path = save_grid(tmp_path / "g.png", [(sample, [frames * 0, frames * 0 + 1])], frames=1, labels=("start", "end"))
    px = np.array(Image.open(path))
    scale, y = 96 // 8, 14 + 14
    panel = 8 * scale + 6
    assert px.shape[1] == 4 * panel - 6  # source | start | end | target
    greys = [px[y + 1, j * panel + 1, 0] for j in range(4)]
    assert greys == [128, 0, 255, 128]  # the middle frame (k = 2) of the source and the target


def test_before_after_table_shows_the_yardsticks_and_the_gap_closed(tmp_path):
    rows = [
        {"step": 0, "eval/total": 1.0, "eval/oracle/fidelity_psnr": 10.0, "eval/oracle/smoothness": 0.9,
         "eval/copy/fidelity_psnr": 8.0, "eval/copy/smoothness": 0.8, "eval/ceiling/fidelity_psnr": 18.0},
        {"step": 5, "reward/total/mean": 0.0},
        {"step": 10, "eval/total": 2.0, "eval/oracle/fidelity_psnr": 13.0, "eval/oracle/smoothness": 0.95,
         "eval/copy/fidelity_psnr": 8.0, "eval/copy/smoothness": 0.8, "eval/ceiling/fidelity_psnr": 18.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    console = Console(record=True, width=200)
    console.print(eval_before_after(tmp_path))
    lines = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
             for line in console.export_text().replace("┃", "│").splitlines() if line.count("│") > 2}
    assert lines["metric"] == ["step 0", "step 10", "change", "copy", "ceiling", "gap closed"]
    assert lines["oracle/fidelity_psnr"] == ["10.0000", "13.0000", "+3.0000", "8.0000", "18.0000", "20% -> 50%"]
    assert lines["oracle/smoothness"] == ["0.9000", "0.9500", "+0.0500", "0.8000", "n/a", ""]
    assert lines["total"] == ["1.0000", "2.0000", "+1.0000", "", "", ""]
    assert not any(k.startswith(("copy", "ceiling")) for k in lines)


def test_the_trainer_scores_yardsticks_once_and_draws_the_frame_grid(dataset, toy_overrides, monkeypatch):
    import editrl.evaluate as ev
    from editrl.monitor import read_metrics
    from editrl.preflight import load_recipe
    from editrl.trainer import train

    calls = []
    monkeypatch.setattr(ev, "yardsticks", lambda *a, **k: calls.append(1) or yardsticks(*a, **k))
    recipe = load_recipe("toy", toy_overrides + [
        "policy.options={frames: 5, height: 32, width: 32}", "train.steps=2", "train.eval_every=1", "train.save_every=2",
        f"data.eval={{kind: manifest, options: {{path: {dataset.options.path}}}}}",
    ])
    run = train(recipe)
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "eval/total" in r]
    assert len(evals) == 3 and len(calls) == 1
    copy = evaluate(sources, dataset, progress=False).overall()
    for row in evals:
        assert row["eval/copy/fidelity_psnr"] == pytest.approx(copy["fidelity_psnr"])
        assert row["eval/copy/preservation_psnr"] == metrics.MAX_PSNR_DB
        assert not any(k.startswith("eval/ceiling/") for k in row)  # the toy has no autoencoder
    grid = Image.open(run / "before_after.png")
    assert grid.size == (4 * (96 + 6) - 6, 14 + 4 * (14 + 96))  # 4 categories, one frame, 4 columns


def test_scores_come_back_to_the_host_once_per_batch(dataset):
    """The editor's and the yardsticks' scores stay on the device until one read-back per batch (a sync on a GPU)."""
    from test_device_loop import READS

    reads: list[str] = []

    class Counted(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func in READS:
                reads.append(func.__name__)
            out = super().__torch_function__(func, types, args, kwargs or {})
            return out.as_subclass(torch.Tensor) if func is torch.Tensor.cpu else out

    class Marked(Blur):
        def reconstruct(self, video: torch.Tensor) -> torch.Tensor:
            return super().reconstruct(video).as_subclass(Counted)

    batches = math.ceil(len(dataset) / 4)
    yardsticks(dataset, Marked(), batch_size=4, progress=False)
    assert reads == ["tolist"] * batches
    reads.clear()
    evaluate(lambda s: sources(s).as_subclass(Counted), dataset, batch_size=4, grid_per_category=0, progress=False)
    assert reads == ["tolist"] * batches


def test_the_viva_ceiling_is_its_vae_round_trip(dataset):
    from editrl.policy import build_policy

    policy = build_policy("viva", {"preset": "tiny", "text_len": 32, "refiner_heads": 2})
    assert isinstance(policy, Reconstructs)
    video = torch.stack([dataset[i].target for i in range(3)])
    out = policy.reconstruct(video)
    assert out.shape == video.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    psnr = metrics.psnr(out, video)
    assert bool((psnr > 12).all()) and bool((psnr < 40).all()), psnr  # the pre-fitted tiny VAE: close, and lossy
