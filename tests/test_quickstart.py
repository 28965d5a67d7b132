"""The mission recipes: the tiny VAE pre-fit, the paper-scale dry run, the quickstart and its reward ablation sweep."""

import json
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from editrl.commands import register
from editrl.preflight import load_recipe
from editrl.policies.viva.policy import VivaOptions, VivaPolicy
from editrl.sweep import expand, load_spec, run_sweep

RECIPES = Path(__file__).parents[1] / "recipes"
ABLATION = RECIPES / "sweeps" / "reward_ablation.yaml"


def cli(*args: str):
    app = typer.Typer()
    register(app)
    return CliRunner().invoke(app, [str(a) for a in args])


def test_tiny_vae_is_prefitted_and_reports_its_reconstruction():
    from editrl.policies.viva.presets import tiny_paths

    report = json.loads((Path(tiny_paths("qwen2_5_vl")["vae"]) / "prefit.json").read_text())
    assert report["steps"] > 0 and report["seconds"] > 0
    assert report["held_out_psnr_db"] > report["initial_psnr_db"] + 3  # it learnt to reconstruct held-out videos
    assert report["held_out_psnr_db"] > report["mean_colour_psnr_db"] + 1  # beyond each frame's mean colour: structure


def test_paper_recipe_dry_run_lists_every_missing_piece_and_fails(tmp_path):
    closed = "[http://127.0.0.1:9/v1]"  # nothing listens on the discard port
    result = cli("train", RECIPES / "viva_grpo.yaml", "--dry-run",
                 *[f"rewards.terms.{i}.options.base_urls={closed}" for i in range(3)],
                 f"policy.init_from={tmp_path / 'no_sft'}", f"data.train.options.path={tmp_path / 'no_data'}")
    out = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "recipe ok" in out
    assert f"missing: policy.init_from: {tmp_path / 'no_sft'} does not exist" in out
    assert "missing: data.train.options: manifest not found" in out
    for part in ("vlm: Qwen/Qwen2.5-VL-7B-Instruct", "dit: Wan-AI/Wan2.1-T2V-1.3B-Diffusers/transformer",
                 "vae: Wan-AI/Wan2.1-T2V-1.3B-Diffusers/vae"):
        assert f"missing: policy (viva): {part} is not in the local Hugging Face cache" in out
    for i, judge in enumerate(("vlm_fidelity", "vlm_preservation", "vlm_aesthetics")):
        assert f"missing: rewards.terms.{i} ({judge}): judge server http://127.0.0.1:9/v1 is not reachable" in out
    assert "missing: rewards.terms.3 (laion_aesthetic): " in out
    assert "missing: run.device: cuda, but torch sees no CUDA GPU on this machine" in out
    assert "not ready: 11 " in out


def test_quickstart_dry_run_is_ready_and_policy_preflight_checks_local_weights(tmp_path):
    result = cli("train", "quickstart", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "ready" in result.output and "missing" not in result.output

    (tmp_path / "dit").mkdir()
    (tmp_path / "dit" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    problems = VivaPolicy.preflight(VivaOptions(vlm=str(tmp_path / "gone"), dit=str(tmp_path / "dit"), vae=str(tmp_path / "empty")))
    assert problems == [f"vlm: {tmp_path / 'gone'} does not exist (give a local directory or a hub id 'org/name[/subfolder]')",
                        f"vae: {tmp_path / 'empty'} has no config.json (not a saved model)"]


def test_reward_ablation_spec_has_four_variants_and_a_control_over_three_seeds():
    spec, base = load_spec(ABLATION)
    runs = expand(spec, base)  # validates every run's recipe
    assert list(spec.variants) == ["full", "no_fidelity", "no_preservation", "no_quality", "shuffled_advantages"]
    assert len(spec.seeds) >= 3 and len(runs) == 5 * len(spec.seeds)
    control = load_recipe(base, spec.variants["shuffled_advantages"])
    assert control.grpo.shuffle_advantages and all(w > 0 for w in control.rewards.weights().values())
    terms = [t.label for t in load_recipe(base).rewards.terms]
    for variant, term in zip(("no_fidelity", "no_preservation", "no_quality"), terms):
        weights = load_recipe(base, spec.variants[variant]).rewards.weights()
        assert weights[term] == 0 and all(w > 0 for k, w in weights.items() if k != term)


@pytest.mark.slow
def test_micro_reward_ablation_on_the_tiny_viva_preset(tmp_path):
    """Two variants of the real ablation x one seed, end to end: warm start, GRPO, held-out oracle table, plots."""
    real, _ = load_spec(ABLATION)
    warm = ["train.steps=2", "train.eval_every=null", "train.save_every=2", "data.train.options.n=4", "data.eval.options.n=4"]
    spec = {
        "name": "micro_ablation",
        "base": str(RECIPES / "quickstart.yaml"),
        "output_dir": str(tmp_path / "sweep"),
        "seeds": [0],
        "overrides": [
            "train.steps=2", "train.eval_every=2", "train.save_every=2", "train.progress=false",
            "grpo.batch_size=8", "data.train.options.n=4", "data.eval.options.n=4",
            f"policy.init_from={tmp_path / 'sft'}", f"policy.warm_start_overrides={json.dumps(warm)}",
        ],
        "variants": {k: real.variants[k] for k in ("full", "no_fidelity")},
        "metrics": real.metrics,
        "curves": real.curves,
    }
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = run_sweep(path)
    table = (out / "results.md").read_text()
    assert "| full | 1 |" in table and "| no_fidelity | 1 |" in table
    assert "eval/oracle/fidelity_psnr" in table and "eval/oracle/preservation_psnr" in table
    assert (out / "reward_curves.png").stat().st_size > 1000 and (out / "final_metrics.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (out / "no_fidelity" / "seed_0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["eval/oracle/fidelity_psnr"] > 0 and rows[1]["reward/fidelity/mean"] > 0  # logged, not rewarded
    assert (tmp_path / "sft" / "checkpoints").is_dir()  # one warm start, shared by both variants
