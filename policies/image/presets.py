"""Tiny random image-editing pipelines for CPU tests, built once into the cache and loaded like real ones.

Each preset is a folder with the subfolders of the real diffusers repository (Qwen/Qwen-Image-Edit-2509:
transformer, vae, text_encoder, processor; black-forest-labs/FLUX.1-Kontext-dev: transformer, vae, text_encoder,
tokenizer, text_encoder_2, tokenizer_2), each written by `save_pretrained`, so the policy always loads through
`from_pretrained`: the code path a user with real weights runs is the one tested. Tokenizers are learnt locally
(nothing is downloaded). The folder lives under $EDITRL_CACHE (default ~/.cache/editrl) with its version in its
name: bump it when a config below changes. It is built into a temporary folder under a lock and renamed into place,
so concurrent test processes build it once and a killed build leaves nothing behind.

The tiny VAEs are pre-fitted as autoencoders on procedural edit images (one frame of the synthetic generator's
scenes), as the VIVA presets' are on videos: a random VAE decodes every latent to nearly the same grey image, so
edits, and the rewards that score them, could not vary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from ..viva.presets import SPECIAL_TOKENS, TINY_VLM, VAE_FIT, _build_atomic, _build_tokenizer, _prefit, cache_root

Pipeline = Literal["qwen_image_edit", "flux_kontext"]
PIPELINES: dict[str, str] = {"qwen_image_edit": "qwen-image-edit-tiny-v1", "flux_kontext": "flux-kontext-tiny-v1"}

# Qwen-Image's MMDiT at toy size: 2x2 patches of 16 latent channels (64 packed), 3D RoPE axes summing to the head
# width, text width = the tiny Qwen2.5-VL's hidden size.
TINY_QWEN_DIT = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=TINY_VLM["qwen2_5_vl"]["text"]["hidden_size"], axes_dims_rope=(4, 6, 6),
)
# Qwen-Image's causal 3D VAE with 4x spatial compression (the real one: 8x): a 32x32 image keeps an 8x8 latent.
TINY_QWEN_VAE = dict(base_dim=16, z_dim=16, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True])
# Images reach the VLM as 4x4 patches of 14 px: 4 tokens each after the 2x2 merge.
TINY_QWEN_PROCESSOR = dict(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=56 * 56)
# FLUX.1's layout at toy size: one dual- and one single-stream block, the guidance embedding of the distilled -dev
# models, T5 tokens of width 32 and a CLIP pooled vector of width 32.
TINY_FLUX_DIT = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)
# FLUX's 2D AutoencoderKL (16 latent channels, no quant convs) with 4x spatial compression.
TINY_FLUX_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 16, 16), layers_per_block=1, latent_channels=16, norm_num_groups=4,
    use_quant_conv=False, use_post_quant_conv=False,
)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77)
TINY_T5 = dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu")  # T5 v1.1's MLP
CLIP_TOKENS = ["<|startoftext|>", "<|endoftext|>"]
T5_TOKENS = ["<pad>", "</s>", "<unk>"]


def tiny_pipeline(name: Pipeline) -> str:
    """The tiny preset's pipeline folder, built first if it is not in the cache (once, under a lock)."""
    from filelock import FileLock

    from editrl.monitor import announce, skipped

    path = cache_root() / PIPELINES[name]
    if path.is_dir():
        skipped("preset", f"cached in {path}")
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{PIPELINES[name]}.lock")):
        if not path.is_dir():
            announce("preset", f"building the tiny {name} pipeline into {path} (once, a minute)")
            _build_atomic(path, BUILDERS[name])
    return str(path)


def _fit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) images (B, C, H, W) in [-1, 1]: sources and targets of one-frame procedural edits of every op."""
    import numpy as np

    from editrl.data.procedural import OPS, ProceduralGenerator

    gen = ProceduralGenerator(frames=1, size=VAE_FIT["size"])
    rng = np.random.default_rng(VAE_FIT["seed"])
    images = []
    for i in range(VAE_FIT["pairs"] + VAE_FIT["held_out"]):
        sample = gen.generate(OPS[i % len(OPS)], rng, f"vae-fit-{i}")
        images += [sample.source[0], sample.target[0]]
    data = torch.stack(images) * 2 - 1
    split = 2 * VAE_FIT["pairs"]
    return data[:split].contiguous(), data[split:].contiguous()


@dataclass(frozen=True)
class QwenSpec:
    """The configs of a Qwen-Image-Edit pipeline's parts (the tiny preset's, or benchmarks/scale.py's real ones)."""

    dit: dict[str, Any]  # QwenImageTransformer2DModel
    vae: dict[str, Any]  # AutoencoderKLQwenImage
    vlm_text: dict[str, Any]  # Qwen2.5-VL text config (without vocab and token ids)
    vlm_vision: dict[str, Any]
    processor: dict[str, Any]  # Qwen2VLImageProcessorPil


@dataclass(frozen=True)
class FluxSpec:
    """The configs of a FLUX.1-Kontext pipeline's parts."""

    dit: dict[str, Any]  # FluxTransformer2DModel
    vae: dict[str, Any]  # AutoencoderKL
    clip: dict[str, Any]  # CLIPTextConfig (without vocab and token ids)
    t5: dict[str, Any]  # T5Config (idem)


TINY_QWEN = QwenSpec(TINY_QWEN_DIT, TINY_QWEN_VAE, TINY_VLM["qwen2_5_vl"]["text"],
                     dict(TINY_VLM["qwen2_5_vl"]["vision"], patch_size=TINY_QWEN_PROCESSOR["patch_size"]), TINY_QWEN_PROCESSOR)
TINY_FLUX = FluxSpec(TINY_FLUX_DIT, TINY_FLUX_VAE, TINY_CLIP, TINY_T5)
Save = Callable[[str, Callable[[], torch.nn.Module]], None]  # (subfolder, model factory): build it and save it there


def write_qwen(directory: Path, spec: QwenSpec, save: Save) -> None:
    """A Qwen-Image-Edit pipeline folder: the processor (a local tokenizer and the PIL image processor) written here,
    the models through `save`."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = directory / "processor"
    vocab = _build_tokenizer(processor, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    Qwen2VLImageProcessorPil(**spec.processor).save_pretrained(processor)
    ids = {t: SPECIAL_TOKENS.index(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(spec.vlm_text, vocab_size=vocab, pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        vision_config=spec.vlm_vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    # As the real repo stores it: the whole VLM with its LM head (the policy loads only what it reads).
    save("text_encoder", lambda: Qwen2_5_VLForConditionalGeneration(config))
    save("transformer", lambda: QwenImageTransformer2DModel(**spec.dit))
    save("vae", lambda: AutoencoderKLQwenImage(**spec.vae))


def write_flux(directory: Path, spec: FluxSpec, save: Save) -> None:
    """A FLUX.1-Kontext pipeline folder: CLIP and T5 tokenizers learnt locally, the models through `save`."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_vocab = _build_tokenizer(
        directory / "tokenizer", CLIP_TOKENS, "<|startoftext|> $A <|endoftext|>",
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=77,
    )
    t5_vocab = _build_tokenizer(
        directory / "tokenizer_2", T5_TOKENS, "$A </s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=512,
    )
    clip = CLIPTextConfig(**spec.clip, vocab_size=clip_vocab, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    t5 = T5Config(**spec.t5, vocab_size=t5_vocab, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    save("text_encoder", lambda: CLIPTextModel(clip))
    save("text_encoder_2", lambda: T5EncoderModel(t5))
    save("transformer", lambda: FluxTransformer2DModel(**spec.dit))
    save("vae", lambda: AutoencoderKL(**spec.vae))


def _tiny(directory: Path, fit: Callable[[Callable[[], Any], Path], Any]) -> Save:
    """The tiny presets' `save`: on the CPU in float32; the VAE pre-fitted by `fit` first."""

    def save(sub: str, make: Callable[[], torch.nn.Module]) -> None:
        if sub == "vae":
            (directory / sub).mkdir()
            fit(make, directory / sub)
        else:
            make().save_pretrained(directory / sub)

    return save


def _fit_qwen_vae(make: Callable[[], Any], directory: Path) -> None:
    """Pre-fitted on one-frame videos; its per-channel latent mean and std measured on the fit images."""
    train, held = (x[:, :, None] for x in _fit_images())  # the 3D VAE takes one-frame videos
    vae, z = _prefit(make, directory, (train, held))
    vae.register_to_config(latents_mean=z.mean(dim=(0, 2, 3, 4)).tolist(), latents_std=z.std(dim=(0, 2, 3, 4)).tolist())
    vae.save_pretrained(directory)


def _fit_flux_vae(make: Callable[[], Any], directory: Path) -> None:
    """Pre-fitted on images; its shift and scale (FLUX's convention) make the fit images' latents zero-mean, unit-variance."""
    vae, z = _prefit(make, directory, _fit_images())
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))
    vae.save_pretrained(directory)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "qwen_image_edit": lambda d: write_qwen(d, TINY_QWEN, _tiny(d, _fit_qwen_vae)),
    "flux_kontext": lambda d: write_flux(d, TINY_FLUX, _tiny(d, _fit_flux_vae)),
}

