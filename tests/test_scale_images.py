"""benchmarks/scale.py's image scales (`--scale qwen_image_edit|flux_kontext`): the released models' configs, and the
whole benchmark (building the pipeline folder, the recipe, both schedules, the floor, the report) at tiny configs on
CPU. The real sizes need a GPU (tens of GB of weights)."""

import argparse
import dataclasses
import io

from rich.console import Console
from test_scale_benchmark import load_benchmark

from editrl.policies.image.presets import TINY_FLUX, TINY_QWEN


def test_image_scales_are_the_released_configs():
    scales = load_benchmark().image_scales()
    qwen, kontext = scales["qwen_image_edit"], scales["flux_kontext"]
    assert qwen.spec.dit == {} and qwen.spec.vae == {}  # diffusers' defaults are Qwen-Image's 20B MMDiT and its VAE
    assert qwen.spec.vlm_text["hidden_size"] == 3584 and qwen.spec.processor["patch_size"] == 14  # Qwen2.5-VL-7B's
    assert kontext.spec.dit == {"guidance_embeds": True}  # FLUX.1's 12B DiT with the -dev models' guidance embedding
    assert kontext.spec.vae["latent_channels"] == 16 and kontext.spec.vae["block_out_channels"] == (128, 256, 512, 512)
    assert (kontext.spec.t5["d_model"], kontext.spec.t5["d_ff"], kontext.spec.clip["hidden_size"]) == (4096, 10240, 768)
    for scale in (qwen, kontext):
        assert (scale.size, scale.dtype, scale.frames) == ((1024, 1024), "bfloat16", 1)


def test_image_scales_run_end_to_end_at_tiny_configs(tmp_path, monkeypatch):
    bench = load_benchmark()
    real = bench.image_scales()
    tiny = {name: dataclasses.replace(real[name], spec=spec, size=(32, 32), text_len=text_len, dtype="float32",
                                      sampling_steps=4, lora_rank=4, vlm_layers=2, policy_options={})
            for name, spec, text_len in (
                ("qwen_image_edit", TINY_QWEN, 256),
                ("flux_kontext", dataclasses.replace(TINY_FLUX, vae=dict(TINY_FLUX.vae, shift_factor=0.0, scaling_factor=1.0)), 32),
            )}  # the tiny presets register their VAEs' statistics after the pre-fit, which the benchmark skips
    monkeypatch.setattr(bench, "image_scales", lambda: tiny)
    for name in tiny:
        args = argparse.Namespace(scale=name, device="cpu", steps=1, warmup=0, vlm_layers=None, out=str(tmp_path / name),
                                  threads=None, compile=None)
        results = bench.run(args, Console(file=io.StringIO()))
        assert results["recipe"]["policy"]["name"] == name and results["params_m"]["transformer"] > 0
        assert [s["steps"][-1]["sde/trained_steps"] for s in results["schedules"].values()] == [3, 2]
        assert all(results["floor"][k] > 0 for k in ("dit_forward_s", "dit_forward_backward_s", "velocity_s",
                                                     "dit_forward_flops", "dit_forward_backward_flops"))
        line = bench.report(results, Console(file=io.StringIO()))
        assert line.startswith(f"scale={name} device=cpu model-compute share: default ") and "step ratio fast/default" in line
