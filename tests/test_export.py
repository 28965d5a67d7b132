"""`editrl export`: a run's LoRA in diffusers' format, loaded by the matching pipeline, reproduces editrl's policy."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from editrl.base import DataError
from editrl.checkpoint import load_checkpoint, policy_from_recipe, write_checkpoint
from editrl.export import LORA_FILE, export_run, write_export
from editrl.policy import build_policy
from editrl.preflight import load_recipe
from editrl.rollout import sample_ode
from editrl.trainer import train
from editrl.types import EditSample

# A LoRA that moves the output well past the tolerances below (the default lr barely moves it in 2 steps).
TOY = ["train.steps=2", "optim.lr=0.05"]
SAMPLES = [EditSample(id="a", instruction="a bright red ball"), EditSample(id="b", instruction="the dark night sky")]


def wan_pipeline(transformer, shift: float):
    """WanPipeline around a transformer only: no text encoder (prompt_embeds are given) and no VAE (latent output)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=transformer)


def pipeline_ode(pipe, cond, latents, steps: int) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt_embeds=cond["text"], latents=latents.clone(), num_inference_steps=steps, guidance_scale=1.0,
               output_type="latent")
    return out.frames


@pytest.fixture
def toy_run(toy_overrides):
    return train(load_recipe("toy", toy_overrides + TOY))


def test_the_lora_in_a_wan_pipeline_gives_the_policys_ode_output(toy_run, tmp_path):
    """Same base transformer, same text embeddings, same initial noise, same flow-matching Euler schedule: the
    pipeline with the exported LoRA and editrl's policy agree to float32 rounding (atol 1e-5; here they agree exactly),
    while the base alone is far off."""
    out = tmp_path / "export"
    export_run(toy_run, out)
    policy, recipe = load_checkpoint(toy_run)
    s = recipe.sampling
    steps = s.eval_steps or s.steps
    cond = policy.encode(SAMPLES)
    want = sample_ode(policy, cond, steps, s.shift, torch.Generator().manual_seed(0))
    latents = policy.init_noise(cond, torch.Generator().manual_seed(0))

    pipe = wan_pipeline(build_policy(recipe.policy.name, recipe.policy.options).denoiser, s.shift)
    bare = pipeline_ode(pipe, cond, latents, steps)
    pipe.load_lora_weights(out)
    got = pipeline_ode(pipe, cond, latents, steps)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (bare - want).abs().max() > 1e-2

    merged = tmp_path / "merged"
    export_run(toy_run, merged, merge=True)
    from diffusers import WanTransformer3DModel

    fused = pipeline_ode(wan_pipeline(WanTransformer3DModel.from_pretrained(merged / "transformer"), s.shift), cond, latents, steps)
    torch.testing.assert_close(fused, want, atol=1e-5, rtol=1e-5)  # the merge rounds W + BA once


def test_the_export_holds_the_lora_with_its_scaling_and_a_readme(toy_run, tmp_path):
    export_run(toy_run, tmp_path / "export")
    files = {p.name for p in (tmp_path / "export").iterdir()}
    assert files == {LORA_FILE, "recipe.yaml", "README.md"}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "export" / LORA_FILE), "pt") as f:
        keys, meta = list(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("transformer.blocks.") and ".lora_" in k for k in keys)
    assert (meta["transformer.r"], meta["transformer.lora_alpha"]) == (8, 8.0)
    readme = (tmp_path / "export" / "README.md").read_text()
    assert "WanPipeline" in readme and 'pipe.load_lora_weights("DIR")' in readme


def test_an_ema_run_exports_its_ema_weights(toy_overrides, tmp_path):
    run = train(load_recipe("toy", toy_overrides + TOY + ["optim.ema.enabled=true", "optim.ema.decay=0.5"]))
    _, _, ema = export_run(run, tmp_path / "export")
    assert ema
    exported = load_file(str(tmp_path / "export" / LORA_FILE))
    live = load_file(str(run / "checkpoints" / "step_000002" / "adapter.safetensors"))
    policy, _ = load_checkpoint(run)
    shadow = torch.load(run / "checkpoints" / "step_000002" / "state.pt", weights_only=True)["ema"]["shadow_params"]
    names = [n for n, p in policy.denoiser.named_parameters() if p.requires_grad]
    assert len(names) == len(shadow) == len(exported)
    for name, value in zip(names, shadow):
        key = "transformer." + name.replace(".default", "")
        torch.testing.assert_close(exported[key], value, atol=0, rtol=0)
    assert any(not torch.equal(exported["transformer." + k], v) for k, v in live.items())


def test_the_destination_is_checked_before_anything_loads(toy_run, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="is not empty: choose another folder, or pass --overwrite"):
        export_run(toy_run, busy)
    assert (busy / "notes.txt").read_text() == "mine"
    for inside in (toy_run, toy_run / "exported", toy_run.parent):
        with pytest.raises(DataError, match="overlaps the run"):
            export_run(toy_run, inside, overwrite=True)
    export_run(toy_run, busy, overwrite=True)
    assert not (busy / "notes.txt").exists() and (busy / LORA_FILE).is_file()

    from editrl.cli import COMMAND_MODULES, app

    for name in COMMAND_MODULES:
        __import__(name, fromlist=["register"]).register(app)
    result = CliRunner().invoke(app, ["export", str(toy_run), "--to", str(busy)])
    assert result.exit_code == 2 and "is not empty" in result.output


def test_a_viva_export_writes_the_refiner_and_its_lora_loads_in_diffusers(tmp_path):
    """The tiny VIVA editor (Wan DiT): LoRA for WanPipeline, the refiner's weights and arguments, a README."""
    recipe = load_recipe("viva_tiny", [f"run.output_dir={tmp_path / 'run'}"])
    policy = policy_from_recipe(recipe)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)  # a trained-looking LoRA and refiner
    write_checkpoint(tmp_path / "run" / "checkpoints" / "step_000001", 1, recipe, policy, {}, None)
    out = tmp_path / "export"
    _, written, _ = export_run(tmp_path / "run", out)
    assert set(written) == {LORA_FILE, "refiner.safetensors", "refiner.json", "recipe.yaml", "README.md"}

    from editrl.policies.viva.refiner import TokenRefiner

    refiner = TokenRefiner(**json.loads((out / "refiner.json").read_text()))
    refiner.load_state_dict(load_file(str(out / "refiner.safetensors")))
    for k, v in policy.refiner.state_dict().items():
        assert torch.equal(refiner.state_dict()[k], v)
    readme = (out / "README.md").read_text()
    assert "refiner.safetensors" in readme and "editrl edit --checkpoint" in readme

    from diffusers import WanTransformer3DModel

    from editrl.policies.viva.presets import tiny_paths

    pipe = wan_pipeline(WanTransformer3DModel.from_pretrained(tiny_paths("qwen2_5_vl")["dit"]), recipe.sampling.shift)
    pipe.load_lora_weights(out)
    assert_same_dit_output(pipe.transformer, policy.denoiser, text_dim=policy.backbone.text_dim)


def assert_same_dit_output(loaded, trained, text_dim: int, **inputs) -> None:
    g = torch.Generator().manual_seed(0)
    c = trained.config
    x = torch.randn(1, c.in_channels, 2, 4, 4, generator=g)
    args = dict(timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 6, text_dim, generator=g),
                return_dict=False, **inputs)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, **args)[0], trained(x, **args)[0], atol=1e-5, rtol=1e-5)


def test_a_hunyuan_video_lora_loads_in_its_pipeline(tmp_path):
    """HunyuanVideo's DiT (VIVA's paper backbone): the LoRA written for HunyuanVideoPipeline loads back exactly."""
    from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    from editrl.config import LoraOptions
    from editrl.policies.viva.backbones import HunyuanVideo
    from editrl.policies.viva.presets import TINY_HUNYUAN_DIT
    from editrl.policy import LoraPolicy

    torch.manual_seed(0)
    base = HunyuanVideoTransformer3DModel(**TINY_HUNYUAN_DIT)
    base.save_pretrained(tmp_path / "base")
    policy = LoraPolicy()
    policy.denoiser = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "base")
    policy.add_lora(LoraOptions(rank=4, alpha=8, targets=HunyuanVideo.lora_targets))
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    (tmp_path / "export").mkdir()
    write_export(policy, load_recipe("viva_tiny"), tmp_path / "export", merge=False, ema=False)
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "base"),
                                vae=None, scheduler=None, text_encoder_2=None, tokenizer_2=None)
    pipe.load_lora_weights(tmp_path / "export")
    c = base.config
    g = torch.Generator().manual_seed(1)
    inputs = dict(encoder_attention_mask=torch.ones(1, 6, dtype=torch.bool),
                  pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                  guidance=torch.tensor([6000.0]) if c.guidance_embeds else None)
    assert_same_dit_output(pipe.transformer, policy.denoiser, text_dim=c.text_embed_dim, **inputs)
