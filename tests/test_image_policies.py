"""The image editors (Qwen-Image-Edit, FLUX.1-Kontext) at tiny size: an ODE sample through the policy is the diffusers
pipeline's, the tiny presets, geometry, LoRA and its reference, SFT and Edit-GRPO with checkpoints, every SDE kind and
objective on-policy, and the paper recipes' dry runs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_device_loop import watch
from test_viva_hunyuan import cli

from editrl.checkpoint import load_checkpoint
from editrl.config import LoraOptions
from editrl.monitor import read_metrics
from editrl.policy import build_policy
from editrl.preflight import load_recipe
from editrl.rollout import sample_ode
from editrl.sde import sigma_schedule
from editrl.trainer import Trainer
from editrl.types import EditSample

NAMES = ["qwen_image_edit", "flux_kontext"]
SIZE, STEPS, SHIFT, PROMPT, NEGATIVE = 32, 4, 3.0, "make the square red", "blurry"
TINY = {"qwen_image_edit": {"vlm_image_area": 64 * 64, "text_len": 256}, "flux_kontext": {"text_len": 32}}
HOST_KEYS = ("counts", "neg_counts", "has_reference")  # token counts and layouts the Qwen policy keeps on the host
RECIPES = Path(__file__).parents[1] / "recipes"
# Equivalence tolerance, float32. The policy and the pipeline run the same operations on the same values up to float32
# rounding in the last bits: the policy pads every prompt to `text_len` with the padding masked (the pipelines pass
# one unpadded prompt without a mask), runs both CFG branches in one DiT call where the pipelines make two, and its
# VAE's convolutions may pick other kernels than for the pipeline's input layout. Measured over 4 Euler steps: at most
# 1.4e-6 on latents of magnitude ~4.5, 7e-7 on pixels. A real mismatch moves them by far more: another prompt (the
# tiny VLM's random weights read text weakly) by 6e-3, another guidance embedding by more (the controls below assert
# 100 x TOL).
TOL = 1e-5


def policy(name, **options):
    return build_policy(name, {"preset": "tiny", **TINY[name], **options})


def image(seed):
    """A random 8-bit image as (3, SIZE, SIZE) in [0, 1], exactly what a PNG the pipeline reads would give."""
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255


def request(reference=False, seed=0, instruction=PROMPT):
    return EditSample(id=f"s{seed}", instruction=instruction, source=image(seed)[None], target=image(seed + 10)[None],
                      reference=image(seed + 20) if reference else None)


def ode(p, sample):
    """The policy's ODE sample through the engine's sampler, and the initial noise as the pipeline's packed latents."""
    cond = p.encode([sample])
    x0 = sample_ode(p, cond, STEPS, SHIFT, torch.Generator().manual_seed(0))
    return x0, p.pack(p.init_noise(cond, torch.Generator().manual_seed(0)))


def schedule():
    """editrl's sigmas, passed to the pipeline as `sigmas=` (its scheduler appends the final 0). The pipeline's
    scheduler is built with shift 1 and no dynamic shifting, so it uses them as given."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(), sigma_schedule(STEPS, SHIFT)[:-1].tolist()


def velocity(p, cond, x=None, sigma=0.6):
    x = p.init_noise(cond, torch.Generator().manual_seed(1)) if x is None else x
    with torch.no_grad():
        return p.velocity(x, torch.full((x.shape[0],), sigma), cond)


def run_args(run_dir, steps):
    return [f"run.output_dir={run_dir}", "run.threads=null", "train.progress=false", f"train.steps={steps}",
            f"train.save_every={steps}", "data.train.options.n=8"]


# ---------------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("variant,cfg,reference", [
    ("edit", 1.0, False), ("edit", 4.0, False), ("edit_plus", 1.0, True), ("edit_plus", 4.0, True),
])
def test_qwen_ode_sample_is_the_pipelines(variant, cfg, reference, monkeypatch):
    """QwenImageEditPipeline / QwenImageEditPlusPipeline built from the policy's own components (the text encoder loaded
    with its LM head, as the pipelines hold it) and a stock Qwen2VLProcessor, fed the policy's initial noise and sigmas.
    The pipelines resize the input to about 1024x1024 for the VAE (and, edit_plus, to 384x384 for the VLM); those
    module-level sizes are set to the tiny test's so that both sides see the same pixels."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_module
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus_module
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    p = policy("qwen_image_edit", variant=variant, guidance_scale=cfg, negative_prompt=NEGATIVE)
    monkeypatch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: (SIZE, SIZE, None))
    monkeypatch.setattr(plus_module, "VAE_IMAGE_SIZE", SIZE * SIZE)
    monkeypatch.setattr(plus_module, "CONDITION_IMAGE_SIZE", p.options.vlm_image_area)
    sample = request(reference)
    x0, noise = ode(p, sample)
    scheduler, sigmas = schedule()
    pipe = (QwenImageEditPlusPipeline if variant == "edit_plus" else QwenImageEditPipeline)(
        scheduler=scheduler, vae=p.vae, transformer=p.denoiser, tokenizer=p.tokenizer,
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(f"{p.pretrained}/text_encoder"),
        processor=Qwen2VLProcessor(image_processor=p.vlm_images, tokenizer=p.tokenizer, video_processor=Qwen2VLVideoProcessor()),
    )
    images = p.pil(torch.stack([sample.source[0]] + ([sample.reference] if reference else [])))
    kw = dict(image=images if variant == "edit_plus" else images[0], prompt=PROMPT, height=SIZE, width=SIZE,
              negative_prompt=NEGATIVE if cfg > 1 else None, true_cfg_scale=cfg, sigmas=sigmas, latents=noise)
    latents = pipe(**kw, output_type="latent").images
    torch.testing.assert_close(p.pack(x0), latents, rtol=0, atol=TOL)
    torch.testing.assert_close(p.decode(x0)[:, 0], pipe(**kw, output_type="pt").images, rtol=0, atol=TOL)
    other = pipe(**{**kw, "prompt": "remove the ball"}, output_type="latent").images  # control: the prompt is read
    assert (other - latents).abs().max() > 100 * TOL


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_kontext_ode_sample_is_the_pipelines(cfg):
    """FluxKontextPipeline built from the policy's components, at the source's size (max_area, no auto-resize to
    Kontext's preferred resolutions), fed the policy's initial noise, sigmas and both guidances."""
    from diffusers import FluxKontextPipeline

    p = policy("flux_kontext", guidance_scale=cfg, negative_prompt=NEGATIVE)
    sample = request()
    x0, noise = ode(p, sample)
    scheduler, sigmas = schedule()
    pipe = FluxKontextPipeline(scheduler=scheduler, vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer,
                               text_encoder_2=p.text_encoder_2, tokenizer_2=p.tokenizer_2, transformer=p.denoiser)
    kw = dict(image=p.pil(sample.source)[0], prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=cfg,
              guidance_scale=p.options.embedded_guidance, height=SIZE, width=SIZE, max_area=SIZE * SIZE,
              _auto_resize=False, max_sequence_length=p.options.text_len, sigmas=sigmas, latents=noise)
    latents = pipe(**kw, output_type="latent").images
    torch.testing.assert_close(p.pack(x0), latents, rtol=0, atol=TOL)
    torch.testing.assert_close(p.decode(x0)[:, 0], pipe(**kw, output_type="pt").images, rtol=0, atol=TOL)
    other = pipe(**{**kw, "guidance_scale": 6.0}, output_type="latent").images  # control: the guidance embedding is read
    assert (other - latents).abs().max() > 100 * TOL


# ---------------------------------------------------------------------------------------------- presets and geometry


@pytest.mark.parametrize("name,dit,vae", [
    ("qwen_image_edit", "QwenImageTransformer2DModel", "AutoencoderKLQwenImage"),
    ("flux_kontext", "FluxTransformer2DModel", "AutoencoderKL"),
])
def test_tiny_preset_is_a_pipeline_folder_with_a_prefitted_vae(name, dit, vae):
    p = policy(name)
    root = Path(p.pretrained)
    assert json.loads((root / "transformer/config.json").read_text())["_class_name"] == dit
    assert json.loads((root / "vae/config.json").read_text())["_class_name"] == vae
    assert p.preflight(p.Options(pretrained=str(root))) == []  # every component the real repo has is there
    report = json.loads((root / "vae/prefit.json").read_text())
    assert report["fit_shape"][-2:] == [SIZE, SIZE] and report["held_out_psnr_db"] > report["mean_colour_psnr_db"]


@pytest.mark.parametrize("name", NAMES)
def test_images_are_one_frame_videos_through_every_stage(name):
    p = policy(name)
    assert p.size_step == 8  # the tiny VAEs compress 4x; latents pack 2x2
    cond = p.encode([request(), request(seed=1)])
    assert cond["source"].shape == (2, 16, 8, 8)
    v = velocity(p, cond.repeat_interleave(2))
    assert v.shape == (4, 16, 8, 8) and v.dtype == torch.float32 and torch.isfinite(v).all()
    assert p.decode(v).shape == (4, 1, 3, SIZE, SIZE)
    assert p.encode_target([request()]).shape == (1, 16, 8, 8)
    assert p.reconstruct(request().target[None]).shape == (1, 1, 3, SIZE, SIZE)
    conformed, note = p.conform_video(torch.rand(5, 3, 30, 44))
    assert conformed.shape == (1, 3, 32, 48) and "1 frame of 32x48" in note
    assert p.conform_video(conformed) == (conformed, None)
    clip = EditSample(id="clip", instruction=PROMPT, source=torch.rand(5, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="edits images \\(1 frame\\)"):
        p.encode([clip])


def test_qwen_reads_the_reference_and_a_mixed_batch_is_each_request_alone():
    p = policy("qwen_image_edit", guidance_scale=4.0, negative_prompt=NEGATIVE)
    batch = [request(reference=True), request(seed=1), request(reference=True, seed=2)]
    cond = p.encode(batch)
    assert cond["has_reference"].tolist() == [True, False, True] and cond["counts"].device.type == "cpu"
    x = p.init_noise(cond, torch.Generator().manual_seed(1))
    together = velocity(p, cond, x)  # one DiT call per layout (with and without the reference's tokens)
    for i, sample in enumerate(batch):
        alone = velocity(p, p.encode([sample]), x[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=TOL)
    no_ref = velocity(p, p.encode([request(seed=0)]), x[:1])
    assert (no_ref - together[:1]).abs().max() > 1e-2  # the reference's tokens change the edit


@pytest.mark.parametrize("name,targets", [
    ("qwen_image_edit", ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.img_mlp.net.2",
                         "transformer_blocks.1.txt_mlp.net.0.proj"]),
    ("flux_kontext", ["transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff_context.net.2",
                      "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.attn.to_q"]),
])
def test_lora_wraps_the_peers_targets_and_the_reference_is_the_base_model(name, targets):
    p = policy(name)
    cond = p.encode([request()])
    base = velocity(p, cond)
    p.add_lora(LoraOptions(rank=4, alpha=4))
    wrapped = {n.split(".lora_")[0] for n, _ in p.denoiser.named_parameters() if "lora_A" in n}
    assert set(targets) <= wrapped
    assert torch.equal(velocity(p, cond), base)  # LoRA B starts at zero
    with torch.no_grad():
        for q in p.trainable_parameters():
            q.add_(0.1)
    assert (velocity(p, cond) - base).abs().max() > 1e-3
    with p.reference():
        assert torch.equal(velocity(p, cond), base)


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", NAMES)
def test_sft_then_grpo_train_and_checkpoints_reload(name, tmp_path):
    sft, grpo = tmp_path / "sft", tmp_path / "grpo"
    cli("sft", f"{name}_sft_tiny", *run_args(sft, 2), "data.eval.options.n=4", "train.eval_every=2")
    assert any("eval/fm_loss" in r for r in read_metrics(sft / "metrics.jsonl"))
    sft_policy, _ = load_checkpoint(sft)
    trainer = Trainer(load_recipe(f"{name}_tiny", [*run_args(grpo, 2), f"policy.init_from={sft}"]))
    sample = trainer.train_data[0]
    assert sample.source.shape == (1, 3, SIZE, SIZE)  # the synthetic generator's one-frame pairs
    torch.testing.assert_close(velocity(trainer.policy, trainer.policy.encode([sample])),
                               velocity(sft_policy, sft_policy.encode([sample])))  # GRPO starts from the SFT LoRA
    start = {n: q.detach().clone() for n, q in trainer.policy.denoiser.named_parameters() if q.requires_grad}
    run = trainer.fit().run_dir
    rows = read_metrics(run / "metrics.jsonl")
    assert len(rows) == 2 and all(r["samples/trained"] > 0 for r in rows)
    assert any(not torch.equal(start[n], q) for n, q in trainer.policy.denoiser.named_parameters() if n in start)
    loaded, recipe = load_checkpoint(run)
    assert recipe.policy.name == name
    cond = trainer.policy.encode([sample])
    torch.testing.assert_close(velocity(loaded, loaded.encode([sample])), velocity(trainer.policy, cond), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("overrides", [
    ["sampling.sde=flow_sde"], ["sampling.sde=cps"], ["sampling.sde=dance"], ["grpo.loss=reinforce"],
    ["grpo.loss=nft"], ["grpo.loss=nft", "sampling.sde=ode"], ["policy.options.guidance_scale=3.0"],
], ids=["flow_sde", "cps", "dance", "reinforce", "nft", "nft_ode", "cfg"])
def test_every_sde_kind_and_objective_trains_on_policy_without_read_backs(name, overrides, tmp_path, monkeypatch):
    recipe = load_recipe(f"{name}_tiny", [*run_args(tmp_path / "run", 1), "grpo.beta=0.01", "sampling.steps=4", *overrides])
    trainer = Trainer(recipe)
    calls = watch(trainer, monkeypatch, host_keys=HOST_KEYS)
    metrics = trainer.train_step()
    assert "rollout" in calls and "step_loss" in calls
    assert metrics["samples/trained"] > 0 and metrics["train/grad_norm"] > 0 and metrics["train/kl"] >= 0
    ratios = [v for k, v in metrics.items() if k.startswith("ratio/") and k.endswith("/mean")]
    if "grpo.loss=nft" in overrides:
        assert not ratios and "train/nft_old_deviation" in metrics
    else:
        assert len(ratios) == 3 and all(r == pytest.approx(1.0, abs=1e-5) for r in ratios)  # the first update is on-policy


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("compile_", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_first_update_ratio_is_exactly_one_in_bf16(name, compile_, tmp_path):
    """As tests/test_denoiser.py asks of every policy: rollout and update compute the same log-probabilities bit for
    bit in bf16, compiled blocks included, with the KL's reference pass and (Qwen) CFG's two branches in one call."""
    from test_denoiser import first_update_log_ratios

    cfg = ["policy.options.guidance_scale=3.0"] if name == "qwen_image_edit" else []
    recipe = load_recipe(f"{name}_tiny", [*run_args(tmp_path / "run", 1), "run.dtype=bfloat16", "sampling.steps=4",
                                          "grpo.beta=0.01", f"policy.options.compile={str(compile_).lower()}", *cfg])
    trainer = Trainer(recipe)
    assert trainer.policy.compiled == compile_
    assert max(first_update_log_ratios(trainer)) <= 1e-6


# ---------------------------------------------------------------------------------------------- paper recipes


@pytest.mark.parametrize("recipe,parts", [
    ("qwen_image_edit_grpo.yaml", ["Qwen/Qwen-Image-Edit-2509/transformer", "Qwen/Qwen-Image-Edit-2509/processor"]),
    ("flux_kontext_nft.yaml", ["black-forest-labs/FLUX.1-Kontext-dev/transformer",
                               "black-forest-labs/FLUX.1-Kontext-dev/tokenizer_2"]),
])
def test_paper_recipe_dry_run_lists_the_layout_weights_and_judges(recipe, parts):
    closed = "[http://127.0.0.1:9/v1]"  # nothing listens on the discard port
    terms = len(load_recipe(str(RECIPES / recipe), [], check_paths=False).rewards.terms)
    result = cli("train", RECIPES / recipe, "--dry-run", *[f"rewards.terms.{i}.options.base_urls={closed}" for i in range(terms)],
                 code=2)
    assert "Traceback" not in result.output and "recipe ok" in result.output and "'groups_per_step'" in result.output
    missing = [line for line in result.output.splitlines() if line.startswith("missing:")]
    for part in parts:
        assert sum(part in line for line in missing) == 1
    assert sum("127.0.0.1:9" in line for line in missing) == terms and any("data/image_edit/train" in m for m in missing)
