"""Edit-GRPO at paper scale: editrl's own Trainer on the VIVA policy, two schedules, and the model-time floor.

Random-weight models are built from configs (a Wan2.1-T2V-1.3B DiT, the Wan2.1 VAE, a Qwen2.5-VL-7B-width
instructor cut to `--vlm-layers` text layers: it runs once per group, a small share), saved with `save_pretrained`
and loaded through the recipe's paths (`policy.options.vlm/dit/vae`), so the run takes the code path of real
weights. The recipe (`recipe_tree`: LoRA on the DiT, KL to the adapter-free DiT, gradient checkpointing, pixel
rewards) is trained under two schedules that differ only in where the SDE runs and which steps train:

    default: Flow-GRPO's, SDE on every sampling step and every SDE step trained;
    fast:    SDE inside a window of 3 steps, 2 of them trained (`sampling.window.size=3`, `grpo.trained_steps=2`).

Each gets a fresh `Trainer`, `--warmup` untimed and `--steps` timed `train_step()` calls; the seconds per phase are
the trainer's own (`time/encode`, `rollout`, `decode`, `reward`: what the step waited for rewards, `train`, `step`).

The floor, timed once on the first trainer's DiT (LoRA included) and shapes (fastest of 5, synchronised): one DiT
forward at the micro-batch size without gradients, one forward+backward to the trainable parameters with gradient
checkpointing, and one `policy.velocity` call (refiner + DiT). Expected model time: rollout = chunks x sampling
steps DiT forwards; train = micro-batches x trained steps x (forward+backward + the reference's forward, beta > 0).
measured/expected near 1: the phase is bound by the DiT; above it, by other work (the refiner, sampler maths,
host overhead). "rollout / its velocity calls" above 1 is what the engine adds around the policy calls.
Peak memory: CUDA max allocated per schedule; on CPU the process's max RSS so far. `--out`/results.json is
rewritten after every phase (and every step), so a run cut off by a time limit keeps what it measured.

    .venv/bin/python benchmarks/scale.py --scale cpu               # about a minute on 2 CPU cores
    python benchmarks/scale.py --scale paper --out "$OUT"          # one H200: ~4 min at ~60 s per default step
    python benchmarks/scale.py --scale paper --steps 1             # ~6 min at the first probe's 165 s per step

The image editors (`--scale qwen_image_edit|flux_kontext`, `ImageScale`): the same trainer, schedules, floor and
report on the `qwen_image_edit` / `flux_kontext` policy, with the released models' configs (diffusers' defaults for
Qwen-Image-Edit's 20B MMDiT and VAE; FLUX.1-Kontext-dev's 12B DiT with its guidance embedding and FLUX's VAE), random
weights in bf16, editing 1024x1024 one-frame pairs, the text encoders (Qwen2.5-VL-7B widths, T5-XXL) cut to
`--vlm-layers` layers like the VIVA instructor (they run once per request). The models are saved as a diffusers
pipeline folder and loaded by `policy.options.pretrained`. They need a GPU (~45 GB of weights for Qwen-Image-Edit).

    python benchmarks/scale.py --scale qwen_image_edit --out "$OUT"

The last line printed (2 decimals):

    scale=<name> device=<device> model-compute share: default <x>, fast <y>; step ratio fast/default <z>

model compute = encode + rollout + decode + train; share = model compute / step time, means over the timed
steps (the rest: waiting for rewards, advantages, bookkeeping). z = default step time / fast step time, i.e. how
many times faster a fast step is: bigger = fast is faster. The goal at paper scale is z >= 3.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml
from rich.console import Console
from rich.table import Table

PHASES = ("encode", "rollout", "decode", "reward", "train")
MODEL_PHASES = ("encode", "rollout", "decode", "train")
SCHEDULES: dict[str, list[str]] = {
    "default": [],  # the recipe's defaults: SDE on all steps, all trained
    "fast": ["sampling.window.size=3", "grpo.trained_steps=2"],
}


@dataclass(frozen=True)
class Scale:
    """One benchmark size: model configs (random weights), clip geometry, GRPO layout and run defaults."""

    dit: dict[str, Any]  # WanTransformer3DModel config
    vae: dict[str, Any]  # AutoencoderKLWan config ({}: the Wan2.1 VAE)
    vlm_text: dict[str, Any]  # Qwen2.5-VL text config; its depth is `vlm_layers`
    vlm_vision: dict[str, Any]
    vlm_layers: int
    image_side: int  # the instructor sees each image at image_side x image_side pixels
    frames: int
    size: tuple[int, int]
    text_len: int
    group: int
    batch: int
    micro_batch: int  # a multiple of `group`: the rollout samples one micro-batch of whole groups per chunk
    sampling_steps: int
    lora_rank: int
    dtype: str
    warmup: int  # default untimed steps per schedule
    policy_options: dict[str, Any] = field(default_factory=dict)  # extra VIVA options

    def __post_init__(self) -> None:
        if self.micro_batch % self.group or self.batch % self.micro_batch:  # the floor's arithmetic assumes both
            raise ValueError(f"micro_batch {self.micro_batch} must hold whole groups of {self.group} and divide {self.batch}")


WAN_DIT = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, freq_dim=256, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
QWEN_ROPE = {"rope_type": "default", "rope_theta": 1e6}

SCALES: dict[str, Scale] = {
    # The H200 probe's configuration (/work/shared/device/h200-probe): Wan2.1-T2V-1.3B DiT (1.42B parameters),
    # the Wan2.1 VAE, Qwen2.5-VL-7B widths. Warm-up 1: on CUDA the policy compiles its DiT blocks during its first
    # calls (tens of seconds), which a timed step must not include.
    "paper": Scale(
        dit=dict(WAN_DIT, num_attention_heads=12, attention_head_dim=128, text_dim=4096, ffn_dim=8960, num_layers=30),
        vae={},
        vlm_text=dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                      rope_parameters=dict(QWEN_ROPE, mrope_section=[16, 24, 24])),
        vlm_vision=dict(depth=4, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                        fullatt_block_indexes=[3], window_size=112, patch_size=14),
        vlm_layers=4, image_side=448, frames=33, size=(240, 416), text_len=512,
        group=4, batch=8, micro_batch=4, sampling_steps=20, lora_rank=32, dtype="bfloat16", warmup=1,
        policy_options={"decode_dtype": "bfloat16", "decode_chunk": 4},  # one VAE call per rollout chunk
    ),
    # The same structure shrunk to about a minute on 2 CPU cores: a Wan DiT with Wan's patching (4 layers of 4 heads
    # x 32, 1.3M parameters), 9 frames at 64x112 (the paper's aspect: 3 latent frames + the reference, 140 tokens), a
    # Wan VAE at base width 8 (Wan2.1's 8x spatial, 4x temporal), a 2-layer Qwen2.5-VL; group, batch, micro-batch,
    # sampling steps, recipe and schedules as at paper scale, so the step ratio means the same. Measured here
    # (torch 2.13 CPU, 2 threads, the machine shared with other jobs at load 2.0-3.7): the whole command 50-92 s,
    # 48-52 s CPU time; default step 9.5-18 s, fast 3.5-7 s; DiT forward at batch 4 25-45 ms, forward+backward
    # 0.10-0.17 s. 6 DiT layers took 84 s + imports (60 s CPU); the VAE at base width 16 doubled the decode.
    "cpu": Scale(
        dit=dict(WAN_DIT, num_attention_heads=4, attention_head_dim=32, text_dim=256, ffn_dim=512, num_layers=4),
        vae=dict(base_dim=8, num_res_blocks=1),
        vlm_text=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      rope_parameters=dict(QWEN_ROPE, mrope_section=[2, 3, 3])),
        vlm_vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                        fullatt_block_indexes=[1], window_size=56, patch_size=14),
        vlm_layers=2, image_side=56, frames=9, size=(64, 112), text_len=64,
        group=4, batch=8, micro_batch=4, sampling_steps=20, lora_rank=4, dtype="float32", warmup=1,
    ),
}


@dataclass(frozen=True)
class ImageScale:
    """An image editor's benchmark size: its policy, pipeline configs (random weights), image size and GRPO layout.
    The fields `recipe_tree` reads are named as `Scale`'s."""

    policy: str  # qwen_image_edit | flux_kontext
    spec: Any  # the pipeline's configs: editrl.policies.image.presets.QwenSpec / FluxSpec
    vlm_layers: int  # text-encoder layers kept (Qwen2.5-VL text / T5)
    size: tuple[int, int]
    text_len: int
    group: int
    batch: int
    micro_batch: int
    sampling_steps: int
    lora_rank: int
    dtype: str
    warmup: int
    policy_options: dict[str, Any] = field(default_factory=dict)
    frames: int = 1

    def __post_init__(self) -> None:
        if self.micro_batch % self.group or self.batch % self.micro_batch:
            raise ValueError(f"micro_batch {self.micro_batch} must hold whole groups of {self.group} and divide {self.batch}")


def image_scales() -> dict[str, ImageScale]:
    """The released models' configs: diffusers' defaults are Qwen-Image's MMDiT and VAE; FLUX.1-Kontext-dev is FLUX.1's
    DiT with the guidance embedding, FLUX's 16-channel VAE, CLIP-L and T5-XXL (v1.1). One group of 2 at 1024x1024 per
    micro-batch, 10 sampling steps, no CFG: a default step of about a minute on one H200 (shared/device/h200-big-dits:
    a 1024x1024 edit is 8,192 image tokens; forward 0.47 s (Qwen) / 0.37 s (Kontext) at batch 1)."""
    from editrl.policies.image.presets import FluxSpec, QwenSpec

    layout = dict(size=(1024, 1024), group=2, batch=2, micro_batch=2, sampling_steps=10, lora_rank=32,
                  dtype="bfloat16", warmup=0, policy_options={"decode_dtype": "bfloat16"})
    paper = SCALES["paper"]
    qwen = QwenSpec(dit={}, vae={}, vlm_text=paper.vlm_text, vlm_vision=paper.vlm_vision,
                    processor=dict(patch_size=14, merge_size=2, min_pixels=3136, max_pixels=12845056))  # Qwen2.5-VL's
    flux = FluxSpec(
        dit=dict(guidance_embeds=True),
        vae=dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, sample_size=1024,
                 scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        clip=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  max_position_embeddings=77, projection_dim=768),
        t5=dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, feed_forward_proj="gated-gelu", num_layers=24),
    )
    return {
        "qwen_image_edit": ImageScale("qwen_image_edit", qwen, vlm_layers=4, text_len=1024, **layout),
        "flux_kontext": ImageScale("flux_kontext", flux, vlm_layers=4, text_len=512, **layout),
    }



# ---------------------------------------------------------------- models and recipe


def build_models(scale: Scale, vlm_layers: int, root: Path, device: str) -> dict[str, Any]:
    """Random-weight DiT, VAE and VLM (with tokenizer and image processor) saved under `root`; their paths and sizes."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from editrl.policies.viva import presets
    from editrl.policies.viva.instructor import model_class

    diffusers_logging.set_verbosity_error()  # "keep these modules in float32": about pretrained norms, not random ones
    dtype = getattr(torch, scale.dtype)
    torch.manual_seed(0)
    params: dict[str, float] = {}

    def save(name: str, model: torch.nn.Module) -> None:
        params[name] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        model.save_pretrained(root / name)

    with torch.device(device):
        save("dit", WanTransformer3DModel(**scale.dit).to(dtype))
    save("vae", AutoencoderKLWan(**scale.vae))  # the policy keeps its VAE in float32
    vocab = presets._build_tokenizer(root / "vlm")
    ids = {tok: i for i, tok in enumerate(presets.SPECIAL_TOKENS)}
    config = Qwen2_5_VLConfig(
        text_config=dict(scale.vlm_text, num_hidden_layers=vlm_layers, vocab_size=vocab, bos_token_id=None,
                         pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        vision_config=scale.vlm_vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.device(device):
        save("vlm", model_class("qwen2_5_vl")(config).to(dtype))
    pixels = scale.image_side**2
    Qwen2VLImageProcessorPil(patch_size=scale.vlm_vision["patch_size"], merge_size=2, min_pixels=pixels,
                             max_pixels=pixels).save_pretrained(root / "vlm")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"paths": {k: str(root / k) for k in ("dit", "vae", "vlm")}, "params_m": params}


def recipe_tree(scale: Scale, paths: dict[str, str], root: Path, device: str, threads: int | None) -> dict[str, Any]:
    """The probe's recipe for these models: rewards on pixels, KL to the adapter-free DiT, LoRA on the DiT."""
    return {
        "run": {"name": "scale", "output_dir": str(root / "run"), "seed": 0, "device": device, "dtype": scale.dtype,
                "threads": threads},
        "policy": {"name": "viva", "options": {
            **paths, "vlm_family": "qwen2_5_vl", "fusion": "add", "use_reference": True, "text_len": scale.text_len,
            "trainable": ["refiner"], "gradient_checkpointing": True, "guidance_scale": 1.0, **scale.policy_options}},
        "data": {"train": {"kind": "synthetic", "options": {
            "n": scale.batch // scale.group * 2, "frames": scale.frames, "size": list(scale.size), "split": "train",
            "cache_dir": str(root / "data")}}},
        "rewards": {"aggregation": "normalize_then_sum", "terms": [
            {"name": "oracle_fidelity", "label": "fidelity", "options": {"metric": "psnr"}},
            {"name": "oracle_preservation", "label": "preservation", "options": {"metric": "psnr"}},
            {"name": "temporal_consistency", "label": "quality", "options": {"reference": "source"}}]},
        "sampling": {"steps": scale.sampling_steps, "shift": 3.0, "sde": "flow_sde", "noise_level": 0.7},
        "grpo": {"group_size": scale.group, "batch_size": scale.batch, "micro_batch_size": scale.micro_batch,
                 "clip_range": 1e-3, "beta": 0.004, "adv_clip": 5.0},
        "optim": {"lr": 1e-4, "grad_clip": 1.0, "lora": {"rank": scale.lora_rank, "alpha": 2 * scale.lora_rank}},
    }  # no `train` section: the benchmark calls train_step() itself, never fit()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Models made in `dtype` directly: a 20B DiT never exists in float32 (82 GB) on its way to bf16."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_image_models(scale: ImageScale, vlm_layers: int, root: Path, device: str) -> dict[str, Any]:
    """The image editor's random-weight parts written as a diffusers pipeline folder under `root` (by the tiny presets'
    own writers, editrl.policies.image.presets); its path and the parts' sizes. The DiT and text encoders are made on
    `device` in the scale's dtype, the VAE in float32 (the policy keeps it so)."""
    from diffusers.utils import logging as diffusers_logging

    from editrl.policies.image import presets

    diffusers_logging.set_verbosity_error()
    dtype = getattr(torch, scale.dtype)
    torch.manual_seed(0)
    params: dict[str, float] = {}

    def save(sub: str, make: Callable[[], torch.nn.Module]) -> None:
        with torch.device(device), default_dtype(torch.float32 if sub == "vae" else dtype):
            model = make()
        params[sub] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        model.save_pretrained(root / sub)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    spec = scale.spec
    if scale.policy == "qwen_image_edit":
        presets.write_qwen(root, dataclasses.replace(spec, vlm_text=dict(spec.vlm_text, num_hidden_layers=vlm_layers)), save)
    else:
        presets.write_flux(root, dataclasses.replace(spec, t5=dict(spec.t5, num_layers=vlm_layers)), save)
    return {"paths": {"pipeline": str(root)}, "params_m": params}


def image_recipe_tree(scale: ImageScale, paths: dict[str, str], root: Path, device: str, threads: int | None) -> dict[str, Any]:
    """`recipe_tree`'s recipe (sampling, GRPO, LoRA, KL, pixel rewards) on the image policy and its pipeline folder;
    without the temporal reward (one frame has no motion)."""
    tree = recipe_tree(scale, {}, root, device, threads)  # type: ignore[arg-type]  # reads the fields both scales have
    tree["policy"] = {"name": scale.policy, "options": {
        "pretrained": paths["pipeline"], "text_len": scale.text_len, "gradient_checkpointing": True, "guidance_scale": 1.0,
        **scale.policy_options}}
    tree["rewards"]["terms"] = [t for t in tree["rewards"]["terms"] if t["name"] != "temporal_consistency"]
    return tree


# ---------------------------------------------------------------- measurement


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """The fastest of `repeats` calls of `fn` after a warm-up call, synchronised on CUDA: a floor, which other
    work on a shared machine can only raise."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def model_flops(model: torch.nn.Module, forward: Callable[[], Any], loss: Callable[[], torch.Tensor]) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs of `forward()` and of `loss().backward()` (a scalar from one call of `model`),
    counted by torch's FlopCounterMode with gradient checkpointing off: model FLOPs, the recomputation a checkpointed
    backward adds is not counted. (`backward`, not `autograd.grad`: the counter's module hooks refuse the latter.)"""
    from torch.utils.flop_counter import FlopCounterMode

    was = getattr(model, "gradient_checkpointing", False)
    model.gradient_checkpointing = False  # diffusers models check this flag at every call
    try:  # compiled regions run eagerly here: their kernels would hide their operations from the counter
        with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as fwd:
            forward()
        with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as both:
            loss().backward()
    finally:
        model.gradient_checkpointing = was
        for q in model.parameters():
            q.grad = None
    return float(fwd.get_total_flops()), float(both.get_total_flops())


def dense_peak_tflops(device: torch.device) -> float:
    """The device's dense matmul rate measured here, the denominator of "fraction of the card": 8192^3 GEMMs in bf16
    on CUDA (about 790 TFLOP/s on an H200), 1024^3 in float32 on a CPU."""
    cuda = device.type == "cuda"
    n, dtype, chain = (8192, torch.bfloat16, 20) if cuda else (1024, torch.float32, 4)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))

    def gemms() -> None:
        for _ in range(chain):
            torch.mm(a, b)

    return 2 * n**3 * chain / seconds(gemms, device, 3) / 1e12


def floor(trainer: Any, repeats: int) -> dict[str, float]:
    """The trainer's DiT alone on one micro-batch of the step's shapes: forward, and forward+backward; and the
    whole `policy.velocity` call the rollout makes (refiner + DiT), which tells policy overhead from engine overhead.
    Also the DiT's model FLOPs for both (LoRA included), from which the phases' TFLOP/s follow."""
    p, mb, g = trainer.policy, trainer.layout.micro_batch_size, trainer.recipe.grpo.group_size
    requests = [trainer.train_data[i] for i in range(mb // g)]
    dit = p.denoiser
    with torch.no_grad():
        cond = p.encode(requests).repeat_interleave(g)
        x = p.init_noise(cond, torch.Generator().manual_seed(0))
        dit_in = p.fuse(x, cond["source"], cond.get("reference")).to(p.dtype)
    timestep = torch.full((mb,), 500.0, device=trainer.device)
    # The refiner's output shape (its values do not change the DiT's cost); it needs gradients as the trained
    # refiner's output does, so that compiled blocks run the graphs the engine runs.
    text = torch.randn(mb, p.options.text_len, dit.config.text_dim, device=trainer.device, dtype=p.dtype)
    text.requires_grad_("refiner" in p.options.trainable)

    def call() -> torch.Tensor:
        return dit(dit_in, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]

    return time_dit(trainer, call, x, cond, repeats)


def time_dit(trainer: Any, call: Callable[[], torch.Tensor], x: torch.Tensor, cond: Any, repeats: int) -> dict[str, float]:
    """The floor's measurements of one micro-batch: `call()` (the DiT alone on the step's inputs) forward, and
    forward+backward to the trainable parameters, the whole `policy.velocity(x, ., cond)` call, and the DiT's model
    FLOPs for both (LoRA included)."""
    p, mb = trainer.policy, x.shape[0]
    dit = p.denoiser
    trained = [q for q in dit.parameters() if q.requires_grad]

    def forward() -> torch.Tensor:  # as the rollout runs it: compiled, on the training graph (editrl.policy.training_graph)
        with torch.set_grad_enabled(p.compiled):
            return call().detach()

    def loss() -> torch.Tensor:
        return call().float().mean()

    def forward_backward() -> None:  # autograd.grad: the same work as backward, leaving no .grad behind
        # (allow_unused: the last block's text stream of an MMDiT reaches no output, so its LoRA gets no gradient)
        torch.autograd.grad(loss(), trained, allow_unused=True)

    sigma = torch.full((mb,), 0.5, device=trainer.device)
    fwd = seconds(forward, trainer.device, repeats)
    with torch.no_grad():
        velocity = seconds(lambda: p.velocity(x, sigma, cond), trainer.device, repeats)
    dit.train()  # the train phase's mode (checkpointing itself applies whenever gradients are on)
    try:
        fwd_bwd = seconds(forward_backward, trainer.device, repeats)
        flops_fwd, flops_fwd_bwd = model_flops(dit, forward, loss)
    finally:
        dit.eval()
    return {"batch": mb, "dit_forward_s": fwd, "dit_forward_backward_s": fwd_bwd, "velocity_s": velocity,
            "dit_forward_flops": flops_fwd, "dit_forward_backward_flops": flops_fwd_bwd}


def image_floor(trainer: Any, repeats: int) -> dict[str, float]:
    """`floor` for the image editors, whose DiT inputs (the packed noisy and source tokens, position ids, text mask)
    the policy builds inside `velocity`: they are captured from one `velocity` call on a micro-batch of the step's
    shapes (a forward pre-hook on the DiT), then timed as `floor` times its own."""
    p, mb, g = trainer.policy, trainer.layout.micro_batch_size, trainer.recipe.grpo.group_size
    requests = [trainer.train_data[i] for i in range(mb // g)]
    captured: dict[str, Any] = {}
    with torch.no_grad():
        cond = p.encode(requests).repeat_interleave(g)
        x = p.init_noise(cond, torch.Generator().manual_seed(0))
        hook = p.denoiser.register_forward_pre_hook(lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True)
        try:
            p.velocity(x, torch.full((mb,), 0.5, device=trainer.device), cond)
        finally:
            hook.remove()
    return time_dit(trainer, lambda: p.denoiser(**captured)[0], x, cond, repeats)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Per schedule: mean seconds per phase over the timed steps, model-compute share, expected model time."""
    out: dict[str, Any] = {}
    fl, grpo = results.get("floor"), results["recipe"]["grpo"]
    # The rollout samples one micro-batch of whole groups per chunk; training takes the same micro-batches.
    chunks = micro = grpo["batch_size"] // grpo["micro_batch_size"]
    sampling_steps = results["recipe"]["sampling"]["steps"]
    for name, sched in results["schedules"].items():
        timed = [s for s in sched["steps"] if not s["warmup"]]
        if not timed:
            continue
        mean = {k: statistics.fmean(s.get(f"time/{k}", 0.0) for s in timed) for k in (*PHASES, "step")}
        mean["model"] = sum(mean[k] for k in MODEL_PHASES)
        row: dict[str, Any] = {"timed_steps": len(timed), "seconds": mean, "share": mean["model"] / mean["step"]}
        if fl:
            trained = statistics.fmean(s["sde/trained_steps"] for s in timed)
            per_train = fl["dit_forward_backward_s"] + (fl["dit_forward_s"] if grpo["beta"] > 0 else 0.0)
            expected = {"rollout": chunks * sampling_steps * fl["dit_forward_s"], "train": micro * trained * per_train}
            row["expected"] = expected
            if "dit_forward_flops" in fl:  # the phases' DiT model FLOPs over their seconds, and over the card's rate
                per_train_flops = fl["dit_forward_backward_flops"] + (fl["dit_forward_flops"] if grpo["beta"] > 0 else 0.0)
                flops = {"rollout": chunks * sampling_steps * fl["dit_forward_flops"], "train": micro * trained * per_train_flops}
                row["tflops"] = {k: v / mean[k] / 1e12 for k, v in flops.items()}
                if results.get("peak_tflops"):
                    row["card_fraction"] = {k: v / results["peak_tflops"] for k, v in row["tflops"].items()}
            row["measured_over_expected"] = {k: mean[k] / v for k, v in expected.items()}
            row["rollout_over_velocity_calls"] = mean["rollout"] / (chunks * sampling_steps * fl["velocity_s"])
        out[name] = row
    if "default" in out and "fast" in out:
        out["step_ratio"] = out["default"]["seconds"]["step"] / out["fast"]["seconds"]["step"]
    return out


# ---------------------------------------------------------------- run and report


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from editrl.preflight import load_recipe
    from editrl.trainer import Trainer

    scale: Scale | ImageScale = SCALES[args.scale] if args.scale in SCALES else image_scales()[args.scale]
    build, make_recipe, measure_floor = ((build_models, recipe_tree, floor) if isinstance(scale, Scale)
                                         else (build_image_models, image_recipe_tree, image_floor))
    device = torch.device(args.device)
    vlm_layers = args.vlm_layers or scale.vlm_layers
    warmup = scale.warmup if args.warmup is None else args.warmup
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "scale": args.scale, "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "warmup": warmup, "steps": args.steps, "vlm_layers": vlm_layers, "config": dataclasses.asdict(scale),
        "schedules": {},
    }

    def save() -> None:
        results["summary"] = summarise(results)
        results["elapsed_s"] = time.perf_counter() - t_start
        (out / "results.json").write_text(json.dumps(results, indent=1))

    with tempfile.TemporaryDirectory(prefix="editrl-scale-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        built = build(scale, vlm_layers, root / "models", args.device)  # type: ignore[arg-type]
        results.update(params_m=built["params_m"], build_s=time.perf_counter() - t0)
        tree = make_recipe(scale, built["paths"], root, args.device, args.threads)  # type: ignore[arg-type]
        if args.compile is not None:
            tree["policy"]["options"]["compile"] = args.compile == "true"
        results["recipe"] = tree
        recipe_path = root / "recipe.yaml"
        recipe_path.write_text(yaml.safe_dump(tree, sort_keys=False))
        save()
        console.log(f"built models in {results['build_s']:.1f} s: {built['params_m']} M parameters")
        for name, overrides in SCHEDULES.items():
            t0 = time.perf_counter()
            recipe = load_recipe(recipe_path, [*overrides, f"run.output_dir={root / name}"])
            trainer = Trainer(recipe, overwrite=True)
            sched: dict[str, Any] = {"overrides": overrides, "setup_s": time.perf_counter() - t0, "steps": []}
            results["schedules"][name] = sched
            if "floor" not in results:  # once, on the first trainer's DiT (same models and shapes for both)
                results["compiled"] = bool(getattr(trainer.policy, "compiled", False))
                results["floor"] = measure_floor(trainer, repeats=5)
                results["peak_tflops"] = dense_peak_tflops(device)
                save()
                console.log("floor: " + ", ".join(f"{k} {v:.4g}" for k, v in results["floor"].items()))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for i in range(warmup + args.steps):
                synchronize(device)
                metrics = trainer.train_step()
                synchronize(device)
                row = {k: v for k, v in metrics.items() if k.startswith(("time/", "sde/", "train/", "ratio/"))}
                row["warmup"] = i < warmup
                sched["steps"].append(row)
                sched["peak_memory_gib"] = peak_memory_gib(device)
                save()
                console.log(f"{name} step {i + 1}{' (warm-up)' if row['warmup'] else ''}: "
                            + ", ".join(f"{k} {metrics.get(f'time/{k}', 0.0):.2f}" for k in (*PHASES, "step")))
            trainer.pool.shutdown(wait=True)
            trainer.logger.close()
            del trainer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    save()
    return results


def report(results: dict[str, Any], console: Console) -> str:
    """Tables of seconds per phase and of the floor; returns the last line."""
    summary, names = results["summary"], list(results["schedules"])
    console.print(f"scale={results['scale']} on {results['device_name']} ({results['threads']} threads, DiT blocks "
                  f"{'compiled' if results.get('compiled') else 'eager'}): mean of {results['steps']} timed steps per "
                  f"schedule after {results['warmup']} warm-up")
    table = Table("seconds / step", *names)
    for key in (*PHASES, "step", "model"):
        label = "model compute" if key == "model" else key
        table.add_row(label, *(f"{summary[n]['seconds'][key]:.2f}" for n in names))
    table.add_row("model share", *(f"{summary[n]['share']:.2f}" for n in names))
    table.add_row("trained steps", *(f"{results['schedules'][n]['steps'][-1]['sde/trained_steps']:.0f}" for n in names))
    table.add_row("trainer setup s", *(f"{results['schedules'][n]['setup_s']:.1f}" for n in names))
    mem = "peak GiB (max allocated)" if results["device"].startswith("cuda") else "peak RSS GiB (process, so far)"
    table.add_row(mem, *(f"{results['schedules'][n]['peak_memory_gib']:.2f}" for n in names))
    console.print(table)
    fl = results["floor"]
    console.print(f"floor at batch {fl['batch']}: DiT forward {fl['dit_forward_s']:.4f} s, forward+backward "
                  f"{fl['dit_forward_backward_s']:.4f} s; policy.velocity (refiner + DiT) {fl['velocity_s']:.4f} s")
    floor_table = Table("", *names)

    def add(label: str, values: list[float], fmt: str = ".2f") -> None:
        floor_table.add_row(label, *(f"{v:{fmt}}" for v in values))

    for key in ("rollout", "train"):
        add(f"{key} expected s", [summary[n]["expected"][key] for n in names])
        add(f"{key} measured/expected", [summary[n]["measured_over_expected"][key] for n in names])
    add("rollout / its velocity calls", [summary[n]["rollout_over_velocity_calls"] for n in names])
    for key in ("rollout", "train"):
        if all("tflops" in summary[n] for n in names):
            add(f"{key} DiT TFLOP/s", [summary[n]["tflops"][key] for n in names], ".3g")
        if all("card_fraction" in summary[n] for n in names):
            add(f"{key} / card's dense rate", [summary[n]["card_fraction"][key] for n in names])
    console.print(floor_table)
    if results.get("peak_tflops"):
        console.print(f"the card's dense rate, measured here: {results['peak_tflops']:.3g} TFLOP/s "
                      f"({'bf16' if results['device'].startswith('cuda') else 'float32'} GEMMs)")
    return (f"scale={results['scale']} device={results['device']} model-compute share: "
            f"default {summary['default']['share']:.2f}, fast {summary['fast']['share']:.2f}; "
            f"step ratio fast/default {summary['step_ratio']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", choices=[*SCALES, *image_scales()], default="cpu", help="named configuration (default: cpu)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="default: cuda if available, else cpu")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per schedule")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default: paper 0, cpu 1)")
    ap.add_argument("--vlm-layers", type=int, default=None, help="instructor text layers (default: the scale's)")
    ap.add_argument("--out", default=os.environ.get("OUT"),
                    help="results.json goes here (default: $OUT, else a new temporary directory)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--compile", choices=["true", "false"], default=None,
                    help="policy.options.compile (default: the policy's own, on for CUDA)")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    args.out = args.out or tempfile.mkdtemp(prefix="editrl-scale-")
    console = Console(width=120)
    results = run(args, console)
    console.log(f"results: {Path(args.out) / 'results.json'} ({results['elapsed_s']:.0f} s in all)")
    print(report(results, console), flush=True)


if __name__ == "__main__":
    main()
