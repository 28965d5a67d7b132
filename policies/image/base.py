"""What the image-editing policies share: an image is a one-frame video, edited through a diffusers pipeline's own
VAE and its 2x2-packed latent tokens.

A policy here mirrors one diffusers pipeline (Qwen-Image-Edit, FLUX.1-Kontext): its components load with
`from_pretrained` from the pipeline's folder or hub id (`pretrained`, or the tiny random `preset`), and its encode /
velocity reproduce how the pipeline encodes the prompt, packs the latents, joins the source latents to the sequence
and calls the DiT, so that an ODE sample through the policy equals the pipeline's output for the same noise and sigmas
(tests/test_image_policies.py). This module holds what does not differ between the two: the latent tokens
(the pipelines' own `_pack_latents` / `_unpack_latents`), the VAE round trip through diffusers' `VaeImageProcessor`,
the image geometry, and classifier-free guidance. Latents stay packed, (B, tokens, 4 x latent channels), the DiT's
own layout: nothing is re-packed per denoising step.

Differences from the pipelines, all deliberate: the edit has the source's size (conformed to the latent grid), where
the pipelines resize the input towards a fixed area (about 1024x1024); and the VAE runs in float32 whatever the
policy's dtype (it is frozen, and its latents feed every step), as the VIVA policy's does.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from editrl.policy import DenoiserOptions, LoraPolicy
from editrl.types import EditSample

from ..loading import load, missing


class ImageEditOptions(DenoiserOptions):
    preset: Literal["tiny"] | None = None  # the tiny random pipeline (CPU tests); `pretrained` names real weights
    pretrained: str | None = None  # a diffusers pipeline folder or hub id, e.g. Qwen/Qwen-Image-Edit-2509
    guidance_scale: float = Field(1.0, ge=1.0)  # > 1: true classifier-free guidance against `negative_prompt`
    negative_prompt: str = " "
    gradient_checkpointing: bool = False
    decode_dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: a faster VAE decode (rewards see its pixels)
    decode_chunk: int = Field(4, ge=1)  # images per VAE decode call: bounds decode memory at 1024x1024

    @model_validator(mode="after")
    def _weights_given(self) -> ImageEditOptions:
        if (self.preset is None) == (self.pretrained is None):
            raise ValueError("give one of `preset: tiny` or `pretrained` (a diffusers pipeline folder or hub id)")
        return self


class ImageEditPolicy(LoraPolicy):
    """Shared by the image policies; a subclass loads its components, encodes prompts and calls its DiT."""

    Options: ClassVar[type[ImageEditOptions]]
    preset_name: ClassVar[str]  # the policy's registered name, and its tiny preset's
    # Subfolder of the pipeline -> the file that shows it is there (for dry runs).
    components: ClassVar[dict[str, str]]
    pipeline_class: Any  # the diffusers pipeline class whose static pack/unpack/ids helpers the policy uses

    options: ImageEditOptions
    vae: nn.Module
    vae_scale_factor: int

    def __init__(self) -> None:
        super().__init__()
        from diffusers.image_processor import VaeImageProcessor

        self.image_processor = VaeImageProcessor()  # the pipelines' [0, 1] <-> [-1, 1] maps, resizing and PIL helpers

    # ------------------------------------------------------------------ loading

    def start(self, options: ImageEditOptions, device: torch.device, dtype: torch.dtype) -> None:
        """The settings every subclass's `__init__` begins with; the pipeline folder (the tiny one built if needed)."""
        self.options, self.device, self.dtype = options, device, dtype
        self.guidance_scale = options.guidance_scale
        if options.pretrained is not None:
            self.pretrained = options.pretrained
        else:
            from .presets import tiny_pipeline

            self.pretrained = tiny_pipeline(self.preset_name)

    def load(self, sub: str, what: str, loader: Any, **kwargs: Any) -> Any:
        """A component of the pipeline by its subfolder, through `loader` (a `from_pretrained`)."""
        return load(f"pretrained ({sub})", what, f"{self.pretrained}/{sub}", loader, **kwargs)

    def frozen(self, module: nn.Module) -> nn.Module:
        """A loaded encoder or VAE on the policy's device, in eval mode, without gradients."""
        return module.to(self.device).eval().requires_grad_(False)

    @classmethod
    def job_phases(cls, options: ImageEditOptions) -> list[str]:
        """The tiny preset is built (or found cached) as a phase of `editrl train`."""
        return ["preset"] if options.preset else []

    @classmethod
    def preflight(cls, options: ImageEditOptions) -> list[str]:
        """The components this policy would load that are not here (dry runs); the tiny preset is built locally."""
        if options.pretrained is None:
            return []
        return [m for sub, config in cls.components.items()
                if (m := missing(f"pretrained ({sub})", f"{options.pretrained}/{sub}", config)) is not None]

    def setup_denoiser(self, denoiser: nn.Module) -> None:
        """The loaded DiT frozen on the policy's device (a LoRA trains it), with checkpointing, the attention backend
        and compilation as configured: the last step of a subclass's `__init__`."""
        self.denoiser = denoiser.to(self.device).requires_grad_(False)
        if self.options.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.configure_denoiser(self.options)

    # ------------------------------------------------------------------ geometry

    @property
    def size_step(self) -> int:
        """Pixels per packed latent token along each side: the VAE's compression x the 2x2 packing."""
        return self.vae_scale_factor * 2

    def conform_video(self, video: Tensor) -> tuple[Tensor, str | None]:
        """(T, C, H, W) -> its first frame, resized to the nearest multiples of `size_step` (what the latents need)."""
        t, _, h, w = video.shape
        step = self.size_step
        h2, w2 = (max(1, int(s / step + 0.5)) * step for s in (h, w))  # nearest, halves up
        if (t, h2, w2) == (1, h, w):
            return video, None
        out = video[:1]
        if (h2, w2) != (h, w):
            out = F.interpolate(out, size=(h2, w2), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        return out, f"{t} frames of {h}x{w} -> 1 frame of {h2}x{w2} (an image editor; sizes divisible by {step})"

    def images(self, samples: list[EditSample], attr: str) -> Tensor:
        """(B, C, H, W) in [0, 1] from one-frame `source` / `target` videos of one size."""
        out = []
        for s in samples:
            v = getattr(s, attr)
            if v is None:
                raise ValueError(f"sample {s.id!r}: the {self.preset_name} policy needs a {attr} image")
            t, _, h, w = v.shape
            if t != 1 or h % self.size_step or w % self.size_step:
                raise ValueError(
                    f"sample {s.id!r} {attr}: {t} frames of {h}x{w}; the {self.preset_name} policy edits images (1 frame) "
                    f"with sizes divisible by {self.size_step} (`editrl edit` conforms them automatically)"
                )
            out.append(v[0])
        if len({tuple(v.shape) for v in out}) > 1:
            raise ValueError(f"{attr} images of one batch must share a size: "
                             + ", ".join(f"{s.id}={tuple(v.shape)}" for s, v in zip(samples, out)))
        return torch.stack(out)

    def pil(self, images: Tensor) -> list[Any]:
        """(B, C, H, W) in [0, 1] -> PIL images, rounded to 8 bits as the pipelines' inputs are."""
        return self.image_processor.numpy_to_pil(self.image_processor.pt_to_numpy(images.detach().float().cpu()))

    # ------------------------------------------------------------------ VAE (subclasses map latents to the VAE's space)

    def to_vae(self, z: Tensor) -> Tensor:
        """Normalised latents -> the VAE's own latent space (and layout)."""
        raise NotImplementedError

    def from_vae(self, z: Tensor) -> Tensor:
        """The VAE's latents -> normalised latents (B, C, h, w)."""
        raise NotImplementedError

    def encode_pixels(self, images: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> normalised latents (B, c, h, w)."""
        return self.encode_vae(self.image_processor.normalize(images))

    @torch.no_grad()
    def encode_vae(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> normalised latents (B, c, h, w): the VAE's mode, as the pipelines take it
        (`sample_mode="argmax"`)."""
        x = self.vae_input(x.to(self.device, torch.float32)).contiguous()  # same pixels, same latents, whatever the layout
        return self.from_vae(self.vae.encode(x).latent_dist.mode())

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """The latent grid of an image of (height, width)."""
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def vae_input(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] in the VAE's input layout."""
        return x

    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        """Latents (B, c, h, w) -> (B, 1, C, H, W) in [0, 1] by the pipelines' postprocessing, `decode_chunk` images
        per VAE call; `decode_dtype: bfloat16` runs the VAE under autocast."""
        z = self.to_vae(x0.to(self.device, torch.float32))
        low = self.options.decode_dtype == "bfloat16"
        parts = []
        for part in z.split(self.options.decode_chunk):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=low):
                parts.append(self.vae_output(self.vae.decode(part, return_dict=False)[0]).float())
        return self.image_processor.postprocess(torch.cat(parts), output_type="pt")[:, None]

    def vae_output(self, x: Tensor) -> Tensor:
        """The VAE's decoded output -> images (B, C, H, W) in [-1, 1]."""
        return x

    def reconstruct(self, video: Tensor) -> Tensor:
        """The image through the VAE: the evaluation's ceiling, what an edit reaching the target's latent shows."""
        return self.decode(self.encode_pixels(video[:, 0]))

    def encode_target(self, samples: list[EditSample]) -> Tensor:
        """x0 latents of the targets (SFT)."""
        return self.encode_pixels(self.images(samples, "target")).to(self.dtype)

    # ------------------------------------------------------------------ latent tokens

    def pack(self, z: Tensor) -> Tensor:
        """(B, c, h, w) latents -> (B, h/2 x w/2, 4c) tokens, by the pipeline's own `_pack_latents`."""
        b, c, h, w = z.shape
        return self.pipeline_class._pack_latents(z, b, c, h, w)

    def unpack(self, tokens: Tensor, like: Tensor) -> Tensor:
        """Tokens back to latents shaped as `like` (B, c, h, w), by the pipeline's own `_unpack_latents`."""
        scale = self.vae_scale_factor
        height, width = like.shape[-2] * scale, like.shape[-1] * scale
        return self.pipeline_class._unpack_latents(tokens, height, width, scale).reshape(like.shape)

    # ------------------------------------------------------------------ sampling

    def init_noise(self, cond: Any, generator: torch.Generator) -> Tensor:
        """Gaussian latents shaped as the source's: what the pipelines' `prepare_latents` draws (in float32, then cast
        to the policy's dtype)."""
        shape = tuple(cond["source"].shape)
        return torch.randn(shape, generator=generator, device=generator.device).to(self.device, self.dtype)

    def timestep(self, sigma: Tensor) -> Tensor:
        """The DiT's timestep input as the pipelines make it: the scheduler's float32 sigma x 1000 cast to the latents'
        dtype, then / 1000 (the DiT multiplies by 1000 again)."""
        return (sigma.to(self.device, torch.float32) * 1000).to(self.dtype) / 1000

    @staticmethod
    def guide(v_cond: Tensor, v_neg: Tensor, scale: float, rescale: bool) -> Tensor:
        """True classifier-free guidance; `rescale`: Qwen-Image's renormalisation of each token's guided velocity to
        the conditional one's norm."""
        v = v_neg + scale * (v_cond - v_neg)
        if rescale:
            v = v * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(v, dim=-1, keepdim=True))
        return v
