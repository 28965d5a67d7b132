"""VIVA on its paper's pair at tiny size, HunyuanVideo DiT/VAE + LLaVA-Llama-3 instructor: the adapters, no host syncs,
SFT, Edit-GRPO, checkpoints, resume and `editrl edit`."""

import json
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file
from test_device_loop import watch
from typer.testing import CliRunner

from editrl import commands, inference
from editrl.checkpoint import load_checkpoint
from editrl.config import LoraOptions
from editrl.data.base import build_dataset
from editrl.data.video import read_video, write_video
from editrl.policies.viva.instructor import Instructor
from editrl.policies.viva.presets import tiny_paths
from editrl.policy import build_policy
from editrl.preflight import load_recipe
from editrl.trainer import Trainer
from editrl.types import EditSample

PAIR = ["policy.options.backbone=hunyuan_video", "policy.options.vlm_family=llava"]
PAPER_RECIPE = Path(__file__).parents[1] / "recipes" / "viva_hunyuan_grpo.yaml"


def viva(**options):
    return build_policy("viva", {
        "preset": "tiny", "backbone": "hunyuan_video", "vlm_family": "llava", "text_len": 64, "refiner_heads": 2, **options,
    })


def samples(n=2, refs=(True, False), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        EditSample(id=f"s{i}", instruction=["make the sky red", "remove the ball", "add a dog"][i % 3],
                   source=torch.rand(5, 3, 32, 32, generator=g), target=torch.rand(5, 3, 32, 32, generator=g),
                   reference=torch.rand(3, 24, 40, generator=g) if refs[i % len(refs)] else None)
        for i in range(n)
    ]


def velocity(policy, cond, sigma=0.6):
    x = policy.init_noise(cond, torch.Generator().manual_seed(1))
    with torch.no_grad():
        return policy.velocity(x, torch.full((cond.batch_size,), sigma), cond)


def cli(*args, code=0):
    app = typer.Typer()
    commands.register(app)
    inference.register(app)
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def run_args(run_dir, steps):
    return [f"run.output_dir={run_dir}", "run.threads=null", "train.progress=false", f"train.steps={steps}",
            f"train.save_every={steps}", "data.train.options.n=8", *PAIR]


def test_preset_is_hunyuan_video_and_llava_and_its_vae_is_prefitted():
    paths = tiny_paths("llava", "hunyuan_video")
    configs = {k: json.loads((Path(paths[k]) / "config.json").read_text()) for k in paths}
    assert configs["dit"]["_class_name"] == "HunyuanVideoTransformer3DModel" and configs["dit"]["guidance_embeds"]
    assert configs["vae"]["_class_name"] == "AutoencoderKLHunyuanVideo" and configs["vlm"]["model_type"] == "llava"
    report = json.loads((Path(paths["vae"]) / "prefit.json").read_text())
    assert report["held_out_psnr_db"] > report["initial_psnr_db"] + 3
    assert report["held_out_psnr_db"] > report["mean_colour_psnr_db"]


def test_llava_instructor_reads_hunyuans_layer_its_template_and_the_images():
    path = tiny_paths("llava", "hunyuan_video")["vlm"]
    ins = Instructor(path, "llava")
    assert ins.hidden_layer == -3 and ins.crop > 10  # HunyuanVideo's layer; the system block is cropped
    assert ins.prompt("x", [16]).startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    frame, ref = torch.rand(3, 32, 32), torch.rand(3, 20, 30)
    hidden, mask = ins(["make the sky red", "make the sky red"], [[frame, ref], [frame]])
    n_ref, n_plain = mask.sum(1).tolist()
    assert n_ref == n_plain + ins.vlm.tokens_per_image + 1 == n_plain + 17  # 16 patch tokens and a newline
    other = ins(["make the sky red"], [[torch.rand(3, 32, 32)]])[0]
    assert not torch.allclose(other[0, :n_plain], hidden[1, :n_plain])  # the frame is read


@pytest.mark.parametrize("fusion", ["add", "concat"])
def test_shapes_through_every_stage_on_hunyuan_geometry(fusion):
    p = viva(fusion=fusion)
    assert (p.frame_step, p.size_step) == (4, 8)  # 4x temporal VAE; 4x spatial VAE x 2x2 patches
    cond = p.encode(samples(2))
    assert cond["source"].shape == (2, 16, 2, 8, 8) and cond["reference"].shape == (2, 16, 1, 8, 8)
    assert cond["counts"].device.type == "cpu" and torch.equal(cond["counts"], cond["mask"].sum(1))
    if fusion == "concat":  # the widened x_embedder starts as the text-to-video DiT
        assert p.denoiser.x_embedder.proj.weight[:, 16:].abs().sum() == 0
    v = velocity(p, cond.repeat_interleave(2))
    assert v.shape == (4, 16, 2, 8, 8) and torch.isfinite(v).all()
    assert p.decode(v).shape == (4, 5, 3, 32, 32)
    assert p.encode_target(samples(1)).shape == (1, 16, 2, 8, 8)
    video, note = p.conform_video(torch.rand(7, 3, 30, 44))
    assert video.shape == (5, 3, 32, 48) and "sizes divisible by 8" in note


def test_the_dit_reads_the_mask_the_pooled_vector_and_the_guidance_embedding():
    p = viva()
    batch = samples(3, refs=(True, False, True))
    together = velocity(p, p.encode(batch).index([1]))
    torch.testing.assert_close(together, velocity(p, p.encode([batch[1]])), rtol=1e-5, atol=1e-5)  # padding masked
    cond = p.encode(batch[:2])
    base = velocity(p, cond)
    with torch.no_grad():
        p.refiner.pooled.weight.normal_()  # zero-initialised: the pooled vector starts prompt-independent
    assert not torch.allclose(velocity(p, cond), base)
    assert not torch.allclose(velocity(viva(embedded_guidance=1.0), cond), base)


def test_classifier_free_guidance_and_lora_reference():
    p = viva(guidance_scale=3.0)
    cond = p.encode(samples(2))
    guided = velocity(p, cond)
    p.guidance_scale = 1.0
    v_cond = velocity(p, cond)
    null = cond.index([0, 1])
    null.data.update(tokens=cond["null_tokens"], mask=cond["null_mask"], counts=cond["null_counts"])
    v_null = velocity(p, null)
    torch.testing.assert_close(guided, v_null + 3.0 * (v_cond - v_null), rtol=1e-5, atol=1e-5)
    p.add_lora(LoraOptions(rank=4, alpha=4))
    wrapped = {n.split(".lora_")[0] for n, q in p.denoiser.named_parameters() if "lora_A" in n}
    for target in ("transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.ff_context.net.2",
                   "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.attn.to_q"):
        assert target in wrapped
    with torch.no_grad():
        for q in p.denoiser.parameters():
            if q.requires_grad:
                q.add_(0.1)
    assert not torch.allclose(velocity(p, cond), v_cond)
    with p.reference():
        assert torch.equal(velocity(p, cond), v_cond)


def test_rollout_and_update_read_nothing_back(tmp_path, monkeypatch):
    recipe = load_recipe("viva_tiny", [*run_args(tmp_path / "run", 1), "data.train.options.n=4", "grpo.beta=0.01"])
    trainer = Trainer(recipe)
    calls = watch(trainer, monkeypatch, host_keys=("counts",))
    metrics = trainer.train_step()
    assert "rollout" in calls and "step_loss" in calls
    assert metrics["samples/trained"] > 0 and metrics["train/grad_norm"] > 0  # LoRA and refiner got gradients


def test_grpo_trains_checkpoints_resumes_exactly_and_edits(tmp_path):
    run, straight = tmp_path / "run", tmp_path / "straight"
    cli("train", "viva_tiny", *run_args(run, 2))
    cli("train", "viva_tiny", *run_args(run, 3), "--resume")
    cli("train", "viva_tiny", *run_args(straight, 3))
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["samples/trained"] > 0 for r in steps)
    last = "checkpoints/step_000003"
    for name in ("adapter.safetensors", "trainable.safetensors"):
        assert (run / last / name).read_bytes() == (straight / last / name).read_bytes()  # exact resume
    assert "refiner.pooled.weight" in load_file(str(run / last / "trainable.safetensors"))
    policy, recipe = load_checkpoint(run)
    assert recipe.policy.options["backbone"] == "hunyuan_video" and type(policy.denoiser).__name__.startswith("HunyuanVideo")
    video = write_video(tmp_path / "in.mp4", torch.rand(7, 3, 30, 40))
    result = cli("edit", "--checkpoint", run, "--video", video, "--instruction", "make the sky red",
                 "--out", tmp_path / "out.mp4", "--steps", 2)
    assert "note:" in result.output  # conformed to 5 frames of 32x40
    assert read_video(tmp_path / "out.mp4").shape == (5, 3, 32, 40)


def test_sft_lowers_the_loss_resumes_exactly_and_starts_grpo(tmp_path):
    def sft(run_dir, steps, *extra):
        cli("sft", "viva_sft_tiny", *run_args(run_dir, steps), "data.eval.options.n=4", *extra)

    sft(tmp_path / "long", 20, "train.eval_every=20")
    losses = [r["eval/fm_loss"] for r in map(json.loads, (tmp_path / "long/metrics.jsonl").read_text().splitlines())
              if "eval/fm_loss" in r]
    assert len(losses) == 2 and losses[1] < 0.9 * losses[0], losses
    run, straight = tmp_path / "sft", tmp_path / "straight"
    sft(run, 2, "train.eval_every=null")
    sft(run, 3, "train.eval_every=null", "--resume")
    sft(straight, 3, "train.eval_every=null")
    last = "checkpoints/step_000003/trainable.safetensors"
    assert (run / last).read_bytes() == (straight / last).read_bytes()
    sft_policy, _ = load_checkpoint(run)
    assert sft_policy.dit_in_checkpoint
    grpo = Trainer(load_recipe("viva_tiny", [*run_args(tmp_path / "grpo", 1), f"policy.init_from={run}"])).policy
    request = build_dataset("synthetic", {"n": 8, "frames": 5, "size": [32, 32]})[0]
    torch.testing.assert_close(velocity(grpo, grpo.encode([request])), velocity(sft_policy, sft_policy.encode([request])))


def test_paper_recipe_dry_run_lists_the_hunyuan_and_llava_weights(tmp_path):
    closed = "[http://127.0.0.1:9/v1]"  # nothing listens on the discard port
    result = cli("train", PAPER_RECIPE, "--dry-run", *[f"rewards.terms.{i}.options.base_urls={closed}" for i in range(3)],
                 f"policy.init_from={tmp_path / 'no_sft'}", code=2)
    out = " ".join(result.output.split())
    assert "Traceback" not in result.output and "recipe ok" in out
    for part in ("vlm: xtuner/llava-llama-3-8b-v1_1-transformers", "dit: hunyuanvideo-community/HunyuanVideo/transformer",
                 "vae: hunyuanvideo-community/HunyuanVideo/vae", "data/viva/train", "no_sft does not exist"):
        assert part in out
