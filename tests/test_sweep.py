"""Sweeps: expansion, resumable runs, results table and plots."""

import json

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
