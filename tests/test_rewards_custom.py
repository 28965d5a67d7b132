"""Custom rewards end to end (examples/custom_reward) and `editrl judge` on a manifest folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from editrl import judge as judge_cmd
from editrl.preflight import load_recipe
from editrl.data.manifest import write_manifest, write_sample
from editrl.types import EditSample

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_reward"


@pytest.fixture
def example_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))


def cli() -> typer.Typer:
    app = typer.Typer()
    judge_cmd.register(app)
    app.command("noop", hidden=True)(lambda: None)  # typer flattens a one-command app; keep `judge` a subcommand
    return app


def make_folder(root: Path, with_edits: bool = True) -> Path:
    """Three synthetic edits: perfect (edited == target), untouched (edited == source), no edit at all."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, kind in enumerate(["perfect", "untouched", "none"]):
        source = torch.rand(5, 3, 16, 16, generator=g)
        mask = torch.zeros(5, 1, 16, 16, dtype=torch.bool)
        mask[..., :8, :8] = True
        target = torch.where(mask, torch.zeros_like(source), source)
        target[:, 0][mask[:, 0]] = 1.0  # the masked box turns red
        edited = {"perfect": target, "untouched": source, "none": None}[kind] if with_edits else None
        sample = EditSample(id=f"s{i}", instruction=f"make box {i} red", source=source, target=target, mask=mask, edited=edited)
        rows.append(write_sample(root, sample))
    write_manifest(root, rows)
    return root


def write_recipe(path: Path, terms: list[dict]) -> Path:
    recipe = {
        "run": {"plugins": sorted({t["name"].split(":")[0] for t in terms if ":" in t["name"]})},
        "policy": {"name": "toy_t2v"},
        "data": {"train": {"kind": "prompts", "options": {"prompts": ["x"]}}},
        "rewards": {"terms": terms},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_example_recipe_trains_with_its_custom_rewards(example_on_path, tmp_path):
    from editrl.trainer import train

    recipe = load_recipe(
        EXAMPLE / "recipe.yaml",
        [f"run.output_dir={tmp_path / 'run'}", "train.steps=2", "train.save_every=2", "train.progress=false", "run.threads=null"],
    )
    run = train(recipe)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["reward/redness/invalid"] == 0 and r["reward/contrast/invalid"] == 0
        assert -1 <= r["reward/redness/mean"] <= 1 and r["reward/contrast/mean"] > 0


def test_judge_scores_a_folder_and_prints_a_table(example_on_path, tmp_path):
    data = make_folder(tmp_path / "data")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        [
            {"name": "oracle_fidelity", "options": {"metric": "psnr"}},
            {"name": "pixel_preservation", "options": {"metric": "ssim"}},
            {"name": "my_rewards:redness", "label": "redness"},
        ],
    )
    out = tmp_path / "scores.jsonl"
    result = CliRunner().invoke(cli(), ["judge", "--recipe", str(recipe), "--data", str(data), "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "s0" in result.output and "s1" in result.output and "s2" not in result.output  # s2 has no edit
    assert "(2/2 valid)" in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["s0", "s1"]
    perfect, untouched = rows
    assert perfect["scores"]["oracle_fidelity"] == pytest.approx(100.0)  # edited == target inside the mask
    assert untouched["scores"]["oracle_fidelity"] < 20
    assert untouched["scores"]["pixel_preservation"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["scores"]["pixel_preservation"] == pytest.approx(1.0, abs=1e-6)  # the change is inside the mask
    assert perfect["scores"]["redness"] > untouched["scores"]["redness"]


def test_judge_shows_why_a_score_is_missing(tmp_path):
    data = make_folder(tmp_path / "data")
    everything = tmp_path / "data" / "masks"
    for f in everything.glob("*.npz"):  # global edits: nothing to preserve
        from editrl.data.manifest import save_mask

        save_mask(f, torch.ones(5, 1, 16, 16, dtype=torch.bool))
    recipe = write_recipe(tmp_path / "r.yaml", [{"name": "oracle_preservation"}])
    result = CliRunner().invoke(cli(), ["judge", "-r", str(recipe), "-d", str(data)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "invalid" in result.output and "(0/2 valid)" in result.output


def test_judge_errors_are_one_line(tmp_path):
    data = make_folder(tmp_path / "data", with_edits=False)
    recipe = write_recipe(tmp_path / "r.yaml", [{"name": "pixel_preservation"}])
    result = CliRunner().invoke(cli(), ["judge", "-r", str(recipe), "-d", str(data)])
    assert result.exit_code == 2
    assert "names an `edited` video" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli(), ["judge", "-r", str(recipe), "-d", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    bad = write_recipe(tmp_path / "bad.yaml", [{"name": "vlm_fidelity", "options": {"model": "m", "base_urls": ["http://127.0.0.1:9/v1"], "timeout": 1}}])
    result = CliRunner().invoke(cli(), ["judge", "-r", str(bad), "-d", str(make_folder(tmp_path / "d2"))])
    assert result.exit_code == 2
    assert "judge server http://127.0.0.1:9/v1 is not reachable" in result.output


def test_a_reward_plugin_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    """A user's reward class whose constructor raises (a missing weights file) stops `judge` with one line."""
    (tmp_path / "broken_reward.py").write_text(
        "class Broken:\n"
        "    needs = frozenset({'edited'})\n"
        "    def __init__(self, path='weights.pt'):\n"
        "        raise FileNotFoundError(f'no such file: {path}')\n"
        "    def __call__(self, batch):\n"
        "        raise AssertionError('never built')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = make_folder(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", [{"name": "broken_reward:Broken"}])
    result = CliRunner().invoke(cli(), ["judge", "-r", str(recipe), "-d", str(data)])
    assert result.exit_code == 2, result.output
    assert "reward 'broken_reward:Broken' could not be built: FileNotFoundError: no such file: weights.pt" in result.output
    assert "Traceback" not in result.output


def test_judge_and_eval_read_media_outside_the_folder_only_when_allowed(tmp_path):
    data = make_folder(tmp_path / "data")
    manifest = data / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    (data / rows[0]["edited"]).rename(tmp_path / "outside.mp4")
    rows[0]["edited"] = "../outside.mp4"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path / "r.yaml", [{"name": "oracle_fidelity"}])
    refused = CliRunner().invoke(cli(), ["judge", "-r", str(recipe), "-d", str(data)])
    assert refused.exit_code == 2 and "is outside the data folder" in refused.output, refused.output
    allowed = CliRunner().invoke(cli(), ["judge", "-r", str(recipe), "-d", str(data), "--allow-outside"],
                                 env={"COLUMNS": "200"})
    assert allowed.exit_code == 0 and "(2/2 valid)" in allowed.output, allowed.output

    from editrl.data.cli import run_benchmark
    from editrl.base import DataError
    from editrl.monitor import console

    def copy(samples):
        return torch.stack([s.source for s in samples])

    with pytest.raises(DataError, match="is outside the data folder"):
        run_benchmark(copy, data, tmp_path / "eval", None, 2, None, "fail", console)
    run_benchmark(copy, data, tmp_path / "eval", None, 2, None, "fail", console, allow_outside=True)
    assert (tmp_path / "eval" / "results.csv").is_file()
