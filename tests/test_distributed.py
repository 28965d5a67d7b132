"""DeepSpeed ZeRO-2/3 on 2 CPU ranks against one process on the same seeds.

The 2-rank runs are `torchrun` launches of this very file (`worker` below): each trains a recipe for 3 steps
under ZeRO-2 and then ZeRO-3, saving at step 2 and 3, then resumes from step 2 as if it had died there, and
dumps what each rank saw. The tests compare those dumps with a single-process run of the same recipe.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from editrl.config import RecipeError
from editrl.preflight import load_recipe
from editrl.distributed import all_gather_traffic

ROOT = Path(__file__).resolve().parents[1]
STAGES = (2, 3)
COMMON = ["train.progress=false", "run.threads=1", "train.steps=3", "train.save_every=2", "run.plugins=[test_distributed]"]
# name -> (recipe, overrides, ZeRO stages run one after the other in one launch)
# The toy case scores only some prompts, so that a rank can have nothing to train while the other trains.
CASES: dict[str, tuple[str, list[str], tuple[int, ...]]] = {
    "toy": ("toy", COMMON + ['rewards.terms=[{name: "test_distributed:brightness_or_none"}]'], STAGES),
    "viva_tiny": ("viva_tiny", COMMON + ["data.train.options.n=8"], STAGES),
    # An image editor: one-frame latents, the source's tokens joined to the sequence, host-side token counts.
    "qwen_image_edit_tiny": ("qwen_image_edit_tiny", COMMON + ["data.train.options.n=8"], STAGES),
    # Dynamic sampling: groups left without two scores are redrawn, each on the rank that holds the group.
    "toy_resample_tied": ("toy", COMMON + ['rewards.terms=[{name: "test_distributed:brightness_or_none"}]',
                                          "grpo.resample_tied=2"], STAGES),
    # Compiled DiT blocks under ZeRO-2 (ZeRO-3 refuses them: test_compile_is_refused_under_zero3).
    "toy_compiled": ("toy", COMMON + ["policy.options.compile=true", "grpo.beta=0.01"], (2,)),
}
# The tiny DiTs' tensors are all below DeepSpeed's persistence threshold (1e5 elements), which would keep
# them whole on every rank; the comms logger counts the all-gathers.
DS_JSON = {
    "zero_optimization": {"stage3_param_persistence_threshold": 0},
    "comms_logger": {"enabled": True, "prof_all": True, "verbose": False},
}


# ---------------------------------------------------------------------------------------------- worker


def brightness_or_none(instructions: list[str], edited: torch.Tensor, **kw: Any) -> list[float | None]:
    """Brightness, but no score at all for about half the prompts (like a judge that cannot parse its reply)."""
    return [None if zlib.crc32(i.encode()) % 2 else float(e.mean()) for i, e in zip(instructions, edited)]


def _recorded_advantages(trainer: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(advantages, train mask) of every step on this rank."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    advantages = trainer.advantages

    def record(ro: Any, metrics: dict[str, float]) -> Any:
        adv, mask = advantages(ro, metrics)
        seen.append((adv.detach().clone(), mask.clone()))
        return adv, mask

    trainer.advantages = record
    return seen


def _run(trainer: Any, steps: int, save_every: int) -> list[dict[str, float]]:
    """The trainer's own loop, minus logging: metrics of every step (already averaged over ranks)."""
    rows = []
    while trainer.step < steps:
        rows.append(trainer.train_step())
        if trainer.step % save_every == 0 or trainer.step == steps:
            trainer.save()
    return rows


def _held_fraction(module: torch.nn.Module) -> float:
    """Elements of `module`'s parameters this rank holds (its ZeRO-3 shard plus anything whole), over the total."""
    local = total = 0
    for p in module.parameters():
        local += p.data.numel() + (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0)
        total += getattr(p, "ds_numel", p.numel())
    return local / total


def _trainable(trainer: Any) -> dict[str, dict[str, torch.Tensor]]:
    """The trainable weights, gathered and copied (on CPU the state dict's tensors are the live parameters)."""
    with trainer.backend.gathered(trainer.policy):
        return {part: {k: v.clone() for k, v in tensors.items()} for part, tensors in trainer.policy.trainable_state_dict().items()}


def worker(spec_path: str) -> None:
    from editrl.checkpoint import checkpoint_root
    from editrl.harness import Timer
    from editrl.trainer import Trainer

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    for stage in spec["stages"]:
        out = Path(spec["out"]) / f"zero{stage}"
        recipe = load_recipe(
            spec["recipe"],
            spec["overrides"]
            + [f"run.output_dir={out / 'run'}", "distributed.backend=deepspeed", f"distributed.zero_stage={stage}",
               f"distributed.config={spec['ds_json']}"],
        )
        trainer = Trainer(recipe)
        backend, policy = trainer.backend, trainer.policy
        advantages = _recorded_advantages(trainer)
        held = _held_fraction(policy.denoiser)
        metrics = _run(trainer, recipe.train.steps, recipe.train.save_every)
        trained = _trainable(trainer)
        gathers = {
            "once": all_gather_traffic(_collect, trainer, Timer, gathered=True),
            "per_call": all_gather_traffic(_collect, trainer, Timer, gathered=False),
        }
        # Resume from step 2 as if the run had died right after saving it.
        root = checkpoint_root(recipe.output_dir)
        backend.barrier()
        if backend.is_main:
            shutil.rmtree(root / "step_000003")
            (root / "latest").unlink()
        backend.barrier()
        resumed = Trainer(recipe, resume=True)
        reloaded = _trainable(resumed)
        step3 = resumed.train_step()
        resumed.save()
        torch.save(
            {"advantages": advantages, "held": held, "metrics": metrics, "trained": trained, "gathers": gathers,
             "reloaded": reloaded, "resumed_step": resumed.step, "step3": step3, "resumed_trained": _trainable(resumed)},
            out / f"rank{backend.rank}.pt",
        )
        backend.barrier()


def _collect(trainer: Any, timer_cls: Any, gathered: bool) -> None:
    if gathered:
        with trainer.backend.inference(trainer.policy):
            trainer.collect(timer_cls())
    else:
        trainer.collect(timer_cls())


# ---------------------------------------------------------------------------------------------- launches


def launch(case: str, out: Path, nproc: int = 2) -> dict[int, list[dict[str, Any]]]:
    """Run `worker` on `nproc` ranks; returns {stage: [rank 0 dump, rank 1 dump, ...]}."""
    from editrl.base import free_port

    recipe, overrides, stages = CASES[case]
    out.mkdir(parents=True, exist_ok=True)
    ds_json = out / "ds.json"
    ds_json.write_text(json.dumps(DS_JSON))
    spec = out / "spec.json"
    spec.write_text(json.dumps({"recipe": recipe, "overrides": overrides, "out": str(out), "stages": list(stages),
                                "ds_json": str(ds_json)}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__, str(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return {s: [torch.load(out / f"zero{s}" / f"rank{r}.pt", weights_only=False) for r in range(nproc)] for s in stages}


def single_process(case: str, out: Path) -> dict[str, Any]:
    """The same recipe on one process without DeepSpeed: the reference the ranks must reproduce."""
    from editrl.trainer import Trainer

    recipe, overrides, _ = CASES[case]
    rec = load_recipe(recipe, overrides + [f"run.output_dir={out}"])
    trainer = Trainer(rec)
    advantages = _recorded_advantages(trainer)
    metrics = _run(trainer, rec.train.steps, rec.train.save_every)
    return {"advantages": advantages, "metrics": metrics, "trained": _trainable(trainer)}


_RUNS: dict[str, tuple[str, dict[str, Any], dict[int, list[dict[str, Any]]], Path]] = {}


def _runs(case: str, tmp_path_factory: Any) -> tuple[str, dict[str, Any], dict[int, list[dict[str, Any]]], Path]:
    """(recipe, single-process result, rank dumps by stage, rank output dir); each case runs once per session."""
    if case not in _RUNS:
        out = tmp_path_factory.mktemp(case)
        _RUNS[case] = CASES[case][0], single_process(case, out / "single"), launch(case, out / "ranks"), out / "ranks"
    return _RUNS[case]


@pytest.fixture(scope="module", params=list(CASES))
def runs(request: Any, tmp_path_factory: Any) -> tuple[str, dict[str, Any], dict[int, list[dict[str, Any]]], Path]:
    return _runs(request.param, tmp_path_factory)


def _at(ranks: dict[int, list[dict[str, Any]]], stage: int) -> list[dict[str, Any]]:
    """The rank dumps of one ZeRO stage; a case that does not run the stage skips."""
    if stage not in ranks:
        pytest.skip(f"this case does not run ZeRO-{stage}")
    return ranks[stage]


def _flat(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{part}/{k}": v for part, tensors in state.items() for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------------- 2 ranks vs 1


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_advantages_match_one_process(runs: Any, stage: int) -> None:
    _, single, ranks, _ = runs
    for step, (expected, _) in enumerate(single["advantages"]):
        got = torch.cat([r["advantages"][step][0] for r in _at(ranks, stage)])  # rank r holds global groups r, r+1, ...
        # Step 1 sees the same weights, so only the group layout and the seeds matter: identical. Later steps
        # follow weights equal up to float rounding, which advantages amplify: the tiny models' group reward std
        # (~1e-5) is below the 1e-4 in the denominator, so one float32 ulp of reward (~3e-8) moves A by ~3e-4.
        tol = 1e-5 if step == 0 else 2e-3
        torch.testing.assert_close(got, expected, atol=tol, rtol=0, msg=f"step {step + 1}")
    assert float(single["advantages"][0][0].abs().sum()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_loss_and_gradient_match_one_process(runs: Any, stage: int) -> None:
    _, single, ranks, _ = runs
    for step, (one, two) in enumerate(zip(single["metrics"], _at(ranks, stage)[0]["metrics"]), 1):
        assert ("train/skipped" in two) == ("train/skipped" in one), step
        if "train/skipped" in one:
            continue
        components = [k for k in one if k.startswith("reward/") and k.endswith("/mean") and k != "reward/total/mean"]
        for key in components:  # raw scores (the total may be a sum of z-scores, ~0 by construction)
            assert two[key] == pytest.approx(one[key], rel=1e-4), (step, key)
        # On-policy the clipped loss is -mean(A * ratio) with zero-mean A per group and ratio = 1 up to the
        # forward pass's rounding (~1e-5): it is ~0 and compares only at that noise level.
        assert two["train/loss"] == pytest.approx(one["train/loss"], abs=2e-4), step
        # The sharp check is the reduced gradient: its norm is taken after DeepSpeed averages the ranks' gradients.
        assert two["train/grad_norm"] == pytest.approx(one["train/grad_norm"], rel=1e-3), step
    assert all(_at(ranks, stage)[0]["metrics"][i] == _at(ranks, stage)[1]["metrics"][i] for i in range(3))


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_ranks_agree_on_gathered_weights(runs: Any, stage: int) -> None:
    _, single, ranks, _ = runs
    first, second = (_flat(r["trained"]) for r in _at(ranks, stage))
    assert first.keys() == second.keys() and any("lora" in k for k in first)
    for k in first:
        assert torch.equal(first[k], second[k]), k
    one = _flat(single["trained"])
    assert one.keys() == first.keys()
    for k in one:
        assert first[k].shape == one[k].shape, k  # whole tensors, not ZeRO-3's empty placeholders
        torch.testing.assert_close(first[k], one[k], atol=2e-4, rtol=1e-3, msg=k)
    lora_b = [v for k, v in first.items() if "lora_B" in k]
    assert any(float(v.abs().sum()) > 0 for v in lora_b)  # LoRA B starts at zero: it trained


@pytest.mark.slow
def test_zero3_holds_half_the_dit_per_rank(runs: Any) -> None:
    _, _, ranks, _ = runs
    for r in _at(ranks, 3):
        assert 0.45 <= r["held"] <= 0.6, r["held"]
    for r in ranks[2]:
        assert r["held"] == 1.0  # ZeRO-2 shards the optimiser state and gradients, not the weights


@pytest.mark.slow
def test_zero3_rollout_gathers_the_dit_once(runs: Any) -> None:
    recipe, _, ranks, _ = runs
    once, per_call = _at(ranks, 3)[0]["gathers"]["once"], ranks[3][0]["gathers"]["per_call"]
    print(f"\n{recipe}: ZeRO-3 all-gathers for one step's rollouts: gathered once {once}, per layer call {per_call}")
    steps = load_recipe(recipe).sampling.steps
    # Per layer call, every denoising step all-gathers the whole DiT again; gathered once, one DiT's worth in all.
    assert 0 < once["bytes"] and once["bytes"] * steps <= per_call["bytes"]
    assert once["calls"] < per_call["calls"]
    assert ranks[2][0]["gathers"]["once"]["calls"] == 0  # ZeRO-2 weights are whole: nothing to gather


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_resume_continues_exactly(runs: Any, stage: int) -> None:
    _, _, ranks, out = runs
    dumps = _at(ranks, stage)
    adapter = load_file(str(out / f"zero{stage}" / "run" / "checkpoints" / "step_000002" / "adapter.safetensors"))
    for r in dumps:
        assert r["resumed_step"] == 3
        reloaded = r["reloaded"]["adapter"]
        assert reloaded.keys() == adapter.keys()
        for k in adapter:
            assert torch.equal(reloaded[k], adapter[k]), k
        uninterrupted = {k: v for k, v in r["metrics"][2].items() if not k.startswith("time/")}
        assert uninterrupted.keys() <= r["step3"].keys()
        for key, value in uninterrupted.items():
            assert r["step3"][key] == pytest.approx(value, rel=1e-5, abs=1e-9, nan_ok=True), key
        for k, v in _flat(r["trained"]).items():
            torch.testing.assert_close(_flat(r["resumed_trained"])[k], v, atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_consolidated_checkpoint_edits_in_one_process(runs: Any, stage: int) -> None:
    from editrl.checkpoint import load_checkpoint
    from editrl.data.base import build_dataset
    from editrl.rollout import edit_videos

    _, _, ranks, out = runs
    dumps = _at(ranks, stage)
    policy, recipe = load_checkpoint(out / f"zero{stage}" / "run" / "checkpoints" / "step_000003")
    assert recipe.distributed.backend == "deepspeed"
    for k, v in _flat(policy.trainable_state_dict()).items():
        assert torch.equal(v, _flat(dumps[0]["resumed_trained"])[k]), k  # written by the resumed run
    data = build_dataset(recipe.data.train.kind, recipe.data.train.options)
    video = edit_videos(policy, [data[0]], steps=2, shift=recipe.sampling.shift, seed=0)
    assert video.ndim == 5 and video.shape[0] == 1 and torch.isfinite(video).all()
    assert 0 <= float(video.min()) and float(video.max()) <= 1
    if data[0].source is not None:  # an editing policy: the user's command too
        import typer
        from typer.testing import CliRunner

        from editrl.data.video import read_video, write_video
        from editrl.inference import register

        app = typer.Typer()
        register(app)

        src, edited = write_video(out / f"src{stage}.mp4", data[0].source), out / f"edited{stage}.mp4"
        result = CliRunner().invoke(app, ["edit", "--checkpoint", str(out / f"zero{stage}" / "run"), "--video", str(src),
                                          "--instruction", data[0].instruction, "--out", str(edited), "--steps", "2"])
        assert result.exit_code == 0, result.output
        assert read_video(edited).shape == data[0].source.shape


@pytest.mark.slow
def test_toy_case_has_ranks_with_unequal_work(tmp_path_factory: Any) -> None:
    """In the toy case a rank sometimes has fewer trainable samples than the other: it pads with zero-weight passes
    (ZeRO's collectives must pair up) and the tests above show the numbers still match one process."""
    _, _, ranks, _ = _runs("toy", tmp_path_factory)
    for stage in STAGES:
        first, second = ranks[stage]
        counts = [(int(a[1].sum()), int(b[1].sum())) for a, b in zip(first["advantages"], second["advantages"])]
        assert any(x != y for x, y in counts), counts


# ---------------------------------------------------------------------------------------------- one process


@pytest.mark.slow
def test_same_recipe_runs_on_one_process_from_the_cli(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "editrl", "train", "toy", f"run.output_dir={run}", "train.steps=2", "train.save_every=2",
           "train.progress=false", "run.threads=1", "distributed.backend=deepspeed", "distributed.zero_stage=3"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (run / "checkpoints" / "step_000002" / "adapter.safetensors").is_file()
    shards = sorted(p.name for p in (run / "checkpoints" / "zero" / "step_000002").glob("*optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]


# ---------------------------------------------------------------------------------------------- config


def test_deepspeed_config_follows_the_recipe(tmp_path: Path) -> None:
    from editrl.distributed import deepspeed_config

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 10}))
    rec = load_recipe("toy", ["distributed.backend=deepspeed", "distributed.zero_stage=3", "distributed.offload=cpu",
                              f"distributed.config={user}", "optim.grad_clip=0.5"])
    cfg = deepspeed_config(rec)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 1000  # merged, not replaced
    assert zero["offload_optimizer"] == {"device": "cpu"} and zero["offload_param"] == {"device": "cpu"}
    assert cfg["gradient_clipping"] == 0.5 and cfg["steps_per_print"] == 10
    assert cfg["zero_allow_untested_optimizer"] and cfg["managed_gradient_accumulation"] is False
    two = deepspeed_config(load_recipe("toy", ["distributed.backend=deepspeed", "distributed.offload=cpu"]))
    assert "offload_param" not in two["zero_optimization"]


def test_bad_deepspeed_json_is_one_clear_error(tmp_path: Path) -> None:
    from editrl.distributed import deepspeed_config

    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 3")
    with pytest.raises(RecipeError, match=r"distributed.config: .*bad.json is not valid JSON"):
        deepspeed_config(load_recipe("toy", [f"distributed.config={bad}"]))
    with pytest.raises(FileNotFoundError, match="distributed.config: .*missing.json does not exist"):
        deepspeed_config(load_recipe("toy", [f"distributed.config={tmp_path / 'missing.json'}"]))


def test_multi_process_launch_needs_a_distributed_backend(monkeypatch: Any) -> None:
    from editrl.distributed import make_backend

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match="launched on 2 processes but distributed.backend=none"):
        make_backend(load_recipe("toy"))


def test_compile_is_refused_under_zero3_and_off_by_default_there() -> None:
    from editrl.checkpoint import policy_from_recipe

    zero3 = ["distributed.backend=deepspeed", "distributed.zero_stage=3"]
    with pytest.raises(RecipeError, match="policy.options.compile: .*ZeRO-3"):
        load_recipe("toy", [*zero3, "policy.options.compile=true"])
    assert policy_from_recipe(load_recipe("toy", zero3)).options.compile is False  # auto: off under ZeRO-3


def test_ema_is_refused_under_zero3_set_by_the_deepspeed_json(tmp_path: Path) -> None:
    """The recipe refuses EMA with its own zero_stage=3 (test_config); a DeepSpeed JSON can ask for stage 3 too."""
    from editrl.distributed import make_backend

    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    rec = load_recipe("toy", ["distributed.backend=deepspeed", f"distributed.config={tmp_path / 'ds.json'}",
                              "optim.ema.enabled=true"])
    with pytest.raises(RecipeError, match="optim.ema: not available with ZeRO-3"):
        make_backend(rec)


if __name__ == "__main__":
    worker(sys.argv[1])


@pytest.mark.slow
def test_resampled_groups_match_one_process(tmp_path_factory: Any) -> None:
    """Dynamic sampling draws the same extra groups on 2 ranks as on 1 (and it did draw some)."""
    _, single, ranks, _ = _runs("toy_resample_tied", tmp_path_factory)
    drawn = [(m["groups/resampled"], m["groups/still_tied"]) for m in single["metrics"]]
    assert sum(d for d, _ in drawn) > 0, drawn
    for stage in STAGES:
        assert [(m["groups/resampled"], m["groups/still_tied"]) for m in ranks[stage][0]["metrics"]] == drawn, stage
