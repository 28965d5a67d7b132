"""Named presets: tiny random models for CPU tests, built once into a cache dir and then loaded like real ones.

Building writes ordinary `save_pretrained` directories (VLM + tokenizer + image processor, DiT, VAE), so the
policy always goes through `from_pretrained`: the code path a user with real weights runs is the one tested.
The cache is $EDITRL_CACHE (default ~/.cache/editrl); each part has its own directory in PARTS, versioned in its
name: bump that version when the part's config below changes (other parts stay cached).

The tiny VAEs are pre-fitted as autoencoders on procedural edit videos when they are built: a random VAE decodes
every latent to nearly the same grey video, so edits (and the rewards that score them) could not vary.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from .vlms import Family, model_class

V = TypeVar("V", bound=torch.nn.Module)
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<pad>", "<image>"]
# Words the tiny tokenizer learns merges from; anything else still tokenises (byte-level BPE).
CORPUS = [
    "system user assistant video editing instruction image frame reference",
    "make turn change replace remove add keep the a an of to in on with into and",
    "sky car cat dog tree house person ball road water background foreground object",
    "red green blue yellow white black orange purple bright dark colour color",
    "square circle left right top bottom brighter darker bigger smaller",
]

TINY_VLM_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
)
TINY_VLM = {
    "qwen2_5_vl": dict(
        text=dict(**TINY_VLM_TEXT, bos_token_id=None,
                  rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    fullatt_block_indexes=[1], window_size=56, patch_size=14),
    ),
    "qwen3_vl": dict(
        text=dict(**TINY_VLM_TEXT, head_dim=16,
                  rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True, "rope_theta": 5e6}),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    num_position_embeddings=64, deepstack_visual_indexes=[1], patch_size=16),
    ),
    # 3 text layers: the -3 hidden layer HunyuanVideo reads is then a layer's output, not the embeddings.
    # 56 px images of 14 px patches: 16 tokens each.
    "llava": dict(
        text=dict(TINY_VLM_TEXT, num_hidden_layers=3),
        vision=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, image_size=56, patch_size=14),
    ),
}
TINY_DIT = dict(
    patch_size=(1, 1, 1), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=256, ffn_dim=128, num_layers=2,
)
# 4x spatial (not Wan's 8x): a 32x32 video keeps an 8x8 latent, enough to place the objects an edit adds or removes.
# Wan 2.2's residual (average-pool / duplicate) shortcuts: without them the pre-fit below ended at the mean-colour
# plateau (held-out 15.05 dB against 15.23 dB for each frame's mean colour); with them and lr 3e-3, 17.3 dB in 400 steps.
TINY_VAE = dict(
    base_dim=16, z_dim=16, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True], scale_factor_spatial=4,
    is_residual=True,
)
# HunyuanVideo's layout at toy size: dual- and single-stream blocks, its own token refiner, a guidance embedding,
# 2x2 patches (a 32x32 video: 8x8 latents, 4x4 tokens a frame), 3D RoPE axes summing to the head width.
TINY_HUNYUAN_DIT = dict(
    in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
    num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=32,
    pooled_projection_dim=16, rope_axes_dim=(4, 6, 6),
)
# The causal 3D VAE with 4x temporal and (as the Wan preset) 4x spatial compression. It has no residual shortcuts to
# add: the pre-fit below ends at 15.87 dB held-out, against 15.23 dB for each frame's mean colour (Wan: 17.3 dB); no
# attention, 2x spatial or other learning rates did better in 200 steps. Enough for edits and rewards to vary.
TINY_HUNYUAN_VAE = dict(
    latent_channels=16, block_out_channels=(16, 16, 16), down_block_types=("HunyuanVideoDownBlock3D",) * 3,
    up_block_types=("HunyuanVideoUpBlock3D",) * 3, layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=4,
    temporal_compression_ratio=4,
)
# The pre-fit: Adam on the reconstruction MSE of procedural edit videos (sources and targets of every operation), on
# `device` (benchmarks/probes.py sets a GPU there; the preset itself is built on the CPU).
VAE_FIT = dict(pairs=64, held_out=8, frames=5, size=(32, 32), steps=400, batch_size=8, lr=3e-3, warmup=20, seed=1234,
               device="cpu")
# Each part's directory under the cache, its version in its path. The Wan and Qwen parts keep the v4 directories
# they had before the other backbones existed.
PARTS = {
    "vlm/qwen2_5_vl": "viva-tiny-v4/vlm-qwen2_5_vl",
    "vlm/qwen3_vl": "viva-tiny-v4/vlm-qwen3_vl",
    "vlm/llava": "viva-tiny-llava-v1/vlm",
    "dit/wan": "viva-tiny-v4/dit",
    "vae/wan": "viva-tiny-v4/vae",
    "dit/hunyuan_video": "viva-tiny-hunyuan_video-v1/dit",
    "vae/hunyuan_video": "viva-tiny-hunyuan_video-v1/vae",
}


def cache_root() -> Path:
    return Path(os.environ.get("EDITRL_CACHE", "~/.cache/editrl")).expanduser()


def tiny_paths(family: Family, backbone: str = "wan") -> dict[str, str]:
    """{"vlm", "dit", "vae"} directories of the tiny preset, building whatever is missing (once, under a lock)."""
    from filelock import FileLock

    from editrl.monitor import announce, skipped

    root = cache_root()
    keys = {"vlm": f"vlm/{family}", "dit": f"dit/{backbone}", "vae": f"vae/{backbone}"}
    paths = {name: root / PARTS[key] for name, key in keys.items()}
    where = Path(os.path.commonpath([path.parent for path in paths.values()]))
    if all(path.is_dir() for path in paths.values()):
        skipped("preset", f"cached in {where}")
    else:
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / ".viva-tiny.lock")):
            missing = [name for name, path in paths.items() if not path.is_dir()]
            if missing:
                announce("preset", f"building {', '.join(missing)} into {where} (once, minutes)")
            for name in missing:
                _build_atomic(paths[name], BUILDERS[keys[name]])
    return {k: str(v) for k, v in paths.items()}


def _build_atomic(path: Path, build: Callable[[Path], None]) -> None:
    """Build into a temporary directory and rename it into place: a killed build leaves no half directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            build(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_tokenizer(directory: Path, special: list[str] = SPECIAL_TOKENS, template: str | None = None, **roles: Any) -> int:
    """A byte-level BPE tokenizer learnt on CORPUS with `special` tokens first; `roles`: its pad/eos/bos tokens (and
    any other tokenizer setting); `template`: the special tokens it wraps each text in, e.g. "$A </s>" (none if None)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if template is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, tok.token_to_id(t)) for t in special if t in template.split()]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **(roles or {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"}))
    fast.save_pretrained(directory)
    return len(fast)


def _build_vlm(directory: Path, family: Family) -> None:
    """A tiny Qwen-VL with its tokenizer and PIL image processor."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vocab = _build_tokenizer(directory)
    ids = {t: SPECIAL_TOKENS.index(t) for t in SPECIAL_TOKENS}
    spec = TINY_VLM[family]
    config_cls = Qwen2_5_VLConfig if family == "qwen2_5_vl" else Qwen3VLConfig
    config = config_cls(
        text_config=dict(spec["text"], vocab_size=vocab, pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        vision_config=spec["vision"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model_class(family)(config).save_pretrained(directory)
    # Images are resized to about 4x4 patches: a handful of tokens each after the 2x2 merge.
    side = 4 * spec["vision"]["patch_size"]
    Qwen2VLImageProcessorPil(
        patch_size=spec["vision"]["patch_size"], merge_size=2, min_pixels=side * side, max_pixels=side * side
    ).save_pretrained(directory)


def _build_llava(directory: Path) -> None:
    """A tiny LLaVA (CLIP vision tower + Llama text model) saved as LlavaForConditionalGeneration, as the real one is."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab = _build_tokenizer(directory, LLAMA3_TOKENS, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<pad>")
    ids = {t: i for i, t in enumerate(LLAMA3_TOKENS)}
    spec = TINY_VLM["llava"]
    config = LlavaConfig(
        text_config=dict(spec["text"], model_type="llama", vocab_size=vocab, bos_token_id=ids["<|begin_of_text|>"],
                         eos_token_id=ids["<|eot_id|>"], pad_token_id=ids["<pad>"]),
        vision_config=spec["vision"],
        image_token_id=ids["<image>"],
        image_seq_length=(spec["vision"]["image_size"] // spec["vision"]["patch_size"]) ** 2,
    )
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    side = spec["vision"]["image_size"]
    CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(directory)


def _build_dit(directory: Path) -> None:
    from diffusers import WanTransformer3DModel

    WanTransformer3DModel(**TINY_DIT).save_pretrained(directory)


def _build_hunyuan_dit(directory: Path) -> None:
    from diffusers import HunyuanVideoTransformer3DModel

    HunyuanVideoTransformer3DModel(**TINY_HUNYUAN_DIT).save_pretrained(directory)


def _build_vae(directory: Path) -> None:
    """A tiny AutoencoderKLWan, pre-fitted; its per-channel latent mean and std are measured on the fit videos."""
    from diffusers import AutoencoderKLWan

    vae, z = _prefit(lambda: AutoencoderKLWan(**TINY_VAE), directory)
    vae.register_to_config(latents_mean=z.mean(dim=(0, 2, 3, 4)).tolist(), latents_std=z.std(dim=(0, 2, 3, 4)).tolist())
    vae.save_pretrained(directory)


def _build_hunyuan_vae(directory: Path) -> None:
    """A tiny AutoencoderKLHunyuanVideo, pre-fitted; its one scaling factor (HunyuanVideo's convention, no shift)
    makes the fit videos' latents unit-variance."""
    from diffusers import AutoencoderKLHunyuanVideo

    vae, z = _prefit(lambda: AutoencoderKLHunyuanVideo(**TINY_HUNYUAN_VAE), directory)
    vae.register_to_config(scaling_factor=float(1 / z.std()))
    vae.save_pretrained(directory)


def _prefit(
    make_vae: Callable[[], V], directory: Path, data: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[V, torch.Tensor]:
    """A new VAE pre-fitted on procedural videos (or `data`: (train, held-out) batches in [-1, 1] shaped as the VAE
    takes them), and its latents of the training batch (for its statistics).

    The fit runs on one thread (a shared CPU slows multi-threaded small ops down badly, and one thread makes the
    result the same on every machine) and writes `prefit.json` with its time and held-out reconstruction PSNR.
    """
    from editrl.monitor import console, duration, progress

    cfg = VAE_FIT
    train, held = (v.to(cfg["device"]) for v in (data or _fit_videos()))
    vae = make_vae().to(cfg["device"])
    for m in vae.modules():  # He init: with PyTorch's default, this small VAE barely leaves the mean-colour plateau
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            torch.nn.init.zeros_(m.bias)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg["lr"])
    steps, warmup = cfg["steps"], cfg["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / steps))
    )
    gen = torch.Generator().manual_seed(cfg["seed"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    before = _reconstruction_psnr(vae, held)
    t0 = time.perf_counter()
    try:
        with progress("VAE pre-fit", steps) as bar:
            for _ in range(steps):
                x = train[torch.randint(len(train), (cfg["batch_size"],), generator=gen)]
                loss = torch.nn.functional.mse_loss(vae.decode(vae.encode(x).latent_dist.mode()).sample, x)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update(advance=1, note=f"mse {loss.item():.4f}")
        vae.eval()
        with torch.no_grad():
            z = vae.encode(train).latent_dist.mode().cpu()
        psnr = _reconstruction_psnr(vae, held)
        vae.to("cpu")
    finally:
        torch.set_num_threads(threads)
    report = {"seconds": round(time.perf_counter() - t0, 1), "held_out_psnr_db": round(psnr, 2),
              "initial_psnr_db": round(before, 2), "mean_colour_psnr_db": round(_mean_colour_psnr(held), 2), **cfg,
              "fit_shape": list(train.shape)}
    console.print(f"  VAE pre-fit: held-out reconstruction {psnr:.2f} dB in {duration(report['seconds'])}", highlight=False)
    (directory / "prefit.json").write_text(json.dumps(report, indent=1))
    return vae, z


def _fit_videos() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) videos (B, C, T, H, W) in [-1, 1]: sources and targets of procedural edits of every op."""
    import numpy as np

    from editrl.data.procedural import OPS, ProceduralGenerator

    cfg = VAE_FIT
    gen = ProceduralGenerator(frames=cfg["frames"], size=cfg["size"])
    rng = np.random.default_rng(cfg["seed"])
    videos = []
    for i in range(cfg["pairs"] + cfg["held_out"]):
        sample = gen.generate(OPS[i % len(OPS)], rng, f"vae-fit-{i}")
        videos += [sample.source, sample.target]
    data = torch.stack(videos).permute(0, 2, 1, 3, 4) * 2 - 1
    split = 2 * cfg["pairs"]
    return data[:split].contiguous(), data[split:].contiguous()


@torch.no_grad()
def _reconstruction_psnr(vae: torch.nn.Module, videos: torch.Tensor) -> float:
    """PSNR (dB) of the VAE's reconstruction of videos in [-1, 1] (peak-to-peak 2)."""
    recon = vae.decode(vae.encode(videos).latent_dist.mode()).sample
    return float(10 * torch.log10(4 / torch.mean((recon - videos) ** 2)))


def _mean_colour_psnr(videos: torch.Tensor) -> float:
    """The PSNR of predicting each frame's mean colour: a yardstick for the reconstruction PSNR in `prefit.json`."""
    flat = videos.mean(dim=(-2, -1), keepdim=True).expand_as(videos)
    return float(10 * torch.log10(4 / torch.mean((flat - videos) ** 2)))


BUILDERS: dict[str, Callable[[Path], None]] = {
    "vlm/qwen2_5_vl": lambda d: _build_vlm(d, "qwen2_5_vl"),
    "vlm/qwen3_vl": lambda d: _build_vlm(d, "qwen3_vl"),
    "vlm/llava": _build_llava,
    "dit/wan": _build_dit,
    "vae/wan": _build_vae,
    "dit/hunyuan_video": _build_hunyuan_dit,
    "vae/hunyuan_video": _build_hunyuan_vae,
}
