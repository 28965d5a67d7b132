"""DiT backbones: what differs between video DiT families, one small adapter each (`policy.options.backbone`).

The policy's encode / velocity / decode are one piece of code for every family. An adapter names the diffusers
classes of the DiT and VAE, reads the latent geometry (channels, frames and pixels per latent step, patching) and
the latent statistics from their configs, says which width the token refiner writes, whether the DiT takes a pooled
text vector, which modules a LoRA wraps and where the input patch embedding is, and calls the DiT. A new family is
one adapter class (here or in its own file), its name in BACKBONES and in `VivaOptions.backbone`, plus a tiny
preset in presets.py.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from ..loading import check


class Wan:
    """Wan 2.x (`WanTransformer3DModel` + `AutoencoderKLWan`): per-channel latent mean/std, text zero-padded to
    `text_len` with no mask (Wan's convention), no pooled vector."""

    dit_class: ClassVar[str] = "WanTransformer3DModel"
    vae_class: ClassVar[str] = "AutoencoderKLWan"
    lora_targets: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    patch_embedding: ClassVar[str] = "patch_embedding"  # the DiT's input Conv3d (concat fusion widens it)

    def __init__(self, dit: nn.Module, vae: nn.Module, options: Any) -> None:
        c, v = dit.config, vae.config
        self.latent_channels: int = v.z_dim
        self.text_dim: int = c.text_dim
        self.pooled_dim: int | None = None
        self.frame_step: int = v.scale_factor_temporal
        self.size_step: int = v.scale_factor_spatial * c.patch_size[1]
        self.latents_mean: list[float] = list(v.latents_mean)
        self.latents_std: list[float] = list(v.latents_std)

    @staticmethod
    def classes() -> tuple[Any, Any]:
        from diffusers import AutoencoderKLWan, WanTransformer3DModel

        return WanTransformer3DModel, AutoencoderKLWan

    def predict(self, dit: Callable[..., Any], x: Tensor, timestep: Tensor, text: Tensor, mask: Tensor, pooled: Tensor | None) -> Tensor:
        return dit(x, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]


class HunyuanVideo:
    """HunyuanVideo (`HunyuanVideoTransformer3DModel` + `AutoencoderKLHunyuanVideo`): one latent scaling factor (no
    shift), text with its attention mask, a pooled text vector, and, on the guidance-distilled T2V model, a guidance
    embedding fed `options.embedded_guidance` (x1000, as diffusers' HunyuanVideoPipeline does).

    The pooled vector comes from the instructor, not from HunyuanVideo's CLIP-L text encoder: the token refiner's
    masked mean of its own output, through a zero-initialised linear layer trained with the refiner (see
    refiner.py). CLIP would read only the instruction text, so "remove the cat" would pull the DiT's global
    modulation towards a cat; the instructor's tokens have read the frames and know the edit. It also spares a
    fourth frozen model. Zero-initialised, the pooled input starts prompt-independent; SFT teaches it.

    Every tensor stays on the device: the DiT sums the mask itself, so `predict` reads nothing back to the host.
    """

    dit_class: ClassVar[str] = "HunyuanVideoTransformer3DModel"
    vae_class: ClassVar[str] = "AutoencoderKLHunyuanVideo"
    # Attention and MLPs of both streams; the single-stream blocks' fused projections (`proj_out` also names the
    # final output projection, which a LoRA then wraps too).
    lora_targets: ClassVar[list[str]] = [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
    ]
    patch_embedding: ClassVar[str] = "x_embedder.proj"

    def __init__(self, dit: nn.Module, vae: nn.Module, options: Any) -> None:
        c, v = dit.config, vae.config
        check("dit", c.patch_size_t == 1, f"patch_size_t={c.patch_size_t}: the reference frame needs a DiT that patches frames singly")
        self.latent_channels: int = v.latent_channels
        self.text_dim: int = c.text_embed_dim
        self.pooled_dim: int | None = c.pooled_projection_dim
        self.frame_step: int = v.temporal_compression_ratio
        self.size_step: int = v.spatial_compression_ratio * c.patch_size
        self.latents_mean: list[float] = [0.0] * v.latent_channels
        self.latents_std: list[float] = [1 / v.scaling_factor] * v.latent_channels
        self.guidance = options.embedded_guidance * 1000 if c.guidance_embeds else None

    @staticmethod
    def classes() -> tuple[Any, Any]:
        from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel

        return HunyuanVideoTransformer3DModel, AutoencoderKLHunyuanVideo

    def predict(self, dit: Callable[..., Any], x: Tensor, timestep: Tensor, text: Tensor, mask: Tensor, pooled: Tensor | None) -> Tensor:
        assert pooled is not None
        guidance = None if self.guidance is None else torch.full((x.shape[0],), self.guidance, device=x.device, dtype=x.dtype)
        return dit(
            x, timestep=timestep, encoder_hidden_states=text, encoder_attention_mask=mask,
            pooled_projections=pooled.to(x.dtype), guidance=guidance, return_dict=False,
        )[0]


BACKBONES: dict[str, type[Wan | HunyuanVideo]] = {"wan": Wan, "hunyuan_video": HunyuanVideo}
