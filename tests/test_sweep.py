"""Sweeps: expansion, resumable runs, results table and plots."""

import json
import re

import pytest
import yaml

from editrl.config import RecipeError
from editrl.sweep import expand, load_spec, mean_ci, moving_average, run_sweep


def _spec(tmp_path, **extra):
    spec = {
        "name": "micro",
        "base": "toy",
        "output_dir": str(tmp_path / "sweep"),
        "seeds": [0],
        "overrides": ["train.steps=2", "train.save_every=1", "run.threads=1",
                      "data.eval={kind: prompts, options: {prompts: [a red ball, a blue sky]}}", "train.eval_every=2"],
        "variants": {"full": [], "no_brightness": ["rewards.terms=[{name: target_color}]"]},
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_mean_ci():
    assert mean_ci([1.0]) == (1.0, 0.0)
    m, h = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.303 * 1.0 / 3**0.5)


def test_moving_average_is_trailing_and_shorter_at_the_start():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0, 4.0], 10) == [2.0, 3.0]


def test_grid_expansion_and_early_validation(tmp_path):
    spec, base = load_spec(_spec(tmp_path, grid={"grpo.beta": [0.0, 0.1]}, seeds=[0, 1]))
    runs = expand(spec, base)
    assert sorted({r.variant for r in runs}) == ["beta=0.0", "beta=0.1", "full", "no_brightness"]
    assert len(runs) == 8
    bad, base = load_spec(_spec(tmp_path, variants={"typo": ["grpo.betta=1"]}))
    with pytest.raises(RecipeError, match="sweep variant 'typo': grpo.betta: unknown key"):
        expand(bad, base)


@pytest.mark.slow
def test_micro_sweep_runs_resumes_and_tabulates(tmp_path):
    path = _spec(tmp_path)
    out = run_sweep(path)
    table = (out / "results.md").read_text()
    assert "| full | 1 |" in table and "| no_brightness | 1 |" in table and "eval/brightness" in table
    assert (out / "reward_curves.png").stat().st_size > 1000 and (out / "final_metrics.png").stat().st_size > 1000
    csv_header = (out / "results.csv").read_text().splitlines()[0]
    assert csv_header.startswith("variant,seeds,eval/brightness mean,eval/brightness ci95")

    # A second invocation re-runs nothing; an unfinished run resumes from its checkpoint.
    log = out / "full" / "seed_0" / "train.log"
    before = log.read_text()
    (out / "full" / "seed_0" / "done.json").unlink()
    run_sweep(path)
    after = log.read_text()[len(before):]
    assert after.count("$ ") == 1 and "--resume" in after
    assert (out / "no_brightness" / "seed_0" / "train.log").read_text().count("$ ") == 1
    rows = [json.loads(line) for line in (out / "full" / "seed_0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"seeds": [0, 0]}, "seeds: seed 0 is listed twice: both runs would train into seed_0 and count as two"),
        ({"variants": {"../escape": []}}, "variant name '../escape' must be one folder name inside the sweep's output_dir"),
        ({"variants": {"a/b": []}}, "variant name 'a/b' must be one folder name"),
        ({"variants": {"": []}}, "variant name '' must be one folder name"),
        ({"variants": {"beta=0.0": []}, "grid": {"grpo.beta": [0.0]}}, "the grid's variant 'beta=0.0' has the name of another"),
    ],
)
def test_runs_never_share_or_leave_the_sweep_folder(tmp_path, extra, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        expand(*load_spec(_spec(tmp_path, **extra)))
    assert not (tmp_path / "sweep").exists()


def test_a_variant_named_twice_is_refused(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("name: s\nbase: toy\nvariants:\n  full: []\n  full: [train.steps=2]\n")
    with pytest.raises(RecipeError, match=re.escape(f"{path}:5: not valid YAML: 'full' is given twice (first on line 4)")):
        load_spec(path)


def test_a_sweep_leaves_a_run_another_process_trains(tmp_path, hold_lock, capsys):
    """A sweep started again while its first invocation runs: that run is left alone, named, and the sweep ends 2."""
    from editrl.base import TrainingError

    path = _spec(tmp_path, variants={"full": []})
    busy = tmp_path / "sweep" / "full" / "seed_0"
    holder = hold_lock(busy)
    with pytest.raises(TrainingError, match=r"1 of 1 runs are being trained by another process now \(full seed 0, "
                                            r"named above\): run the sweep again once it ends"):
        run_sweep(path)
    said = " ".join(capsys.readouterr().err.split())
    assert f"full seed 0: {busy} is in use by process {holder.pid} on " in said and ": left to it" in said
    assert sorted(p.name for p in busy.iterdir()) == [".editrl.lock"]  # no train.log appended, nothing started
