"""VIVA: instruction-based video editing as a flow-matching policy (VLM instructor + token refiner + video DiT).

`encode` runs everything that depends only on the request once (the frozen VLM on the instruction, the first
source frame and the reference image; the VAE on the source video and the reference), and the engine repeats
that condition for the group. The trainable refiner runs inside `velocity`, so GRPO and SFT gradients reach it.
The DiT sees the noisy latent fused with the source latent (`add`: summed, the paper; `concat`: stacked on
channels) and, with `use_reference`, the reference latent as one extra leading frame.

The policy is one piece of code for every backbone. What differs between DiT families (`options.backbone`: wan,
hunyuan_video) lives in an adapter in backbones.py, what differs between VLM families (`options.vlm_family`:
qwen2_5_vl, qwen3_vl, llava) in an adapter in vlms.py. Adding a DiT family is one adapter class (its diffusers
classes, latent geometry and statistics, refiner width, pooled width, LoRA targets, patch embedding and the DiT
call), registered in `backbones.BACKBONES` and the `backbone` option, plus a tiny random preset in presets.py
(a config, a builder and a cache directory); a VLM family is the same in vlms.py. The tests of the new pair then
run SFT, Edit-GRPO, checkpoints and `editrl edit` on its preset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from safetensors.torch import load_file
from torch import Tensor, nn

from editrl.base import RecipeError
from editrl.config import LoraOptions
from editrl.policy import DenoiserOptions, LoraPolicy, training_graph
from editrl.types import Condition, EditSample

from .backbones import BACKBONES
from .instructor import DEFAULT_SYSTEM_PROMPT, Family, Instructor, truncate
from ..loading import check, load, missing
from .refiner import TokenRefiner, pad_tokens


class VivaOptions(DenoiserOptions):
    preset: Literal["tiny"] | None = None  # tiny random models (CPU tests); explicit paths below override its parts
    backbone: Literal["wan", "hunyuan_video"] = "wan"  # the DiT/VAE family (backbones.py)
    vlm: str | None = None  # directory or hub id of a Qwen2.5-VL / Qwen3-VL / LLaVA checkpoint
    vlm_family: Family = "qwen2_5_vl"
    dit: str | None = None  # the backbone's DiT directory (a diffusers repo's `transformer` folder)
    vae: str | None = None  # the backbone's VAE directory (a diffusers repo's `vae` folder)
    hidden_layer: int | None = None  # which VLM hidden states condition the DiT (None: Qwen-VL -1, LLaVA -3)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    crop_system: bool = True  # drop the system prompt's tokens (identical for every request)
    image_min_pixels: int | None = None  # VLM image resizing bounds; None: the checkpoint's preprocessor config
    image_max_pixels: int | None = None
    text_len: int = Field(512, ge=1)  # DiT text tokens, zero-padded (Wan's convention is 512)
    refiner_layers: int = Field(2, ge=1)
    refiner_heads: int | None = None  # None: DiT text width // 128 (at least 1)
    fusion: Literal["add", "concat"] = "add"
    use_reference: bool = True  # reserve a reference latent frame (zeros for requests without a reference image)
    guidance_scale: float = Field(1.0, ge=1.0)  # > 1: classifier-free guidance against the empty instruction
    embedded_guidance: float = Field(6.0, ge=0.0)  # guidance-distilled DiTs (HunyuanVideo T2V): its guidance input
    trainable: list[Literal["refiner", "dit"]] = Field(default_factory=lambda: ["refiner"])  # trained fully
    gradient_checkpointing: bool = False
    init_seed: int = 0  # seed of the refiner's random initialisation
    decode_dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: a faster VAE decode (rewards see its pixels)
    decode_chunk: int = Field(4, ge=1)  # clips per VAE decode call: bounds decode memory at video sizes
    hub_kernels: bool = False  # let transformers swap the VLM's layers for kernels from the Hugging Face hub

    @model_validator(mode="after")
    def _weights_given(self) -> VivaOptions:
        missing = [k for k in ("vlm", "dit", "vae") if getattr(self, k) is None]
        if self.preset is None and missing:
            raise ValueError(f"give `preset: tiny` or paths for all of vlm, dit, vae (missing: {', '.join(missing)})")
        return self


class VivaPolicy(LoraPolicy):
    Options = VivaOptions
    dit_prefix = "dit."

    def __init__(self, options: VivaOptions, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.options, self.device, self.dtype = options, device, dtype
        self.guidance_scale = options.guidance_scale
        paths = {"vlm": options.vlm, "dit": options.dit, "vae": options.vae}
        if options.preset == "tiny":
            from .presets import tiny_paths

            tiny = tiny_paths(options.vlm_family, options.backbone)
            paths = {k: v or tiny[k] for k, v in paths.items()}
        self.instructor = Instructor(
            paths["vlm"], options.vlm_family, hidden_layer=options.hidden_layer, system_prompt=options.system_prompt,
            crop_system=options.crop_system, min_pixels=options.image_min_pixels, max_pixels=options.image_max_pixels,
            device=device, dtype=dtype, hub_kernels=options.hub_kernels,
        )
        family = BACKBONES[options.backbone]
        dit_cls, vae_cls = family.classes()
        # The VAE stays in float32: it is frozen, and its latents feed every step.
        self.vae = load("vae", family.vae_class, paths["vae"], vae_cls.from_pretrained)
        self.vae.to(device).eval().requires_grad_(False)
        if options.decode_dtype == "bfloat16":
            # The decoder's convolution and linear weights kept in bf16, which is what autocast casts them to at every
            # call: the same pixels without the casts (on an H200, 4 clips at 33x240x416 decoded in 0.76 s instead of
            # 0.88 s). Norm scales stay float32, as autocast computes norms; the encoder stays float32.
            for m in [*self.vae.post_quant_conv.modules(), *self.vae.decoder.modules()]:
                if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                    m.to(torch.bfloat16)
        self.denoiser = load("dit", family.dit_class, paths["dit"], dit_cls.from_pretrained, torch_dtype=dtype)
        self.backbone = family(self.denoiser, self.vae, options)
        z = self.backbone.latent_channels
        check("dit", self.denoiser.config.out_channels == z, f"the DiT predicts {self.denoiser.config.out_channels} channels, the VAE has {z}")
        if options.fusion == "concat" and self.denoiser.config.in_channels == z:
            self._widen_patch_embedding(2 * z)
        want = z if options.fusion == "add" else 2 * z
        check("dit", self.denoiser.config.in_channels == want,
              f"fusion={options.fusion} needs a DiT with {want} input channels, this one has {self.denoiser.config.in_channels}")
        self.denoiser.to(device).requires_grad_("dit" in options.trainable)
        if options.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        text_dim = self.backbone.text_dim
        heads = options.refiner_heads or max(1, text_dim // 128)
        check("refiner_heads", text_dim % heads == 0, f"the DiT text width {text_dim} does not split into {heads} heads")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.init_seed)
            self.refiner = TokenRefiner(
                self.instructor.hidden_size, text_dim, options.refiner_layers, heads, pooled_dim=self.backbone.pooled_dim
            )
        self.refiner.to(device).requires_grad_("refiner" in options.trainable)
        self.extra_trainable = {"refiner": self.refiner}  # always saved: its random init is not in any checkpoint
        self.dit_in_checkpoint = "dit" in options.trainable  # save the full DiT too (trained, or loaded from one)
        self.latents_mean = torch.tensor(self.backbone.latents_mean, device=device).view(1, z, 1, 1, 1)
        self.latents_std = torch.tensor(self.backbone.latents_std, device=device).view(1, z, 1, 1, 1)
        self.frame_step = self.backbone.frame_step
        self.size_step = self.backbone.size_step
        self.configure_denoiser(options)

    @classmethod
    def job_phases(cls, options: VivaOptions) -> list[str]:
        """The tiny preset is built (or found cached) as a phase of `editrl train`."""
        return ["preset"] if options.preset else []

    @classmethod
    def preflight(cls, options: VivaOptions) -> list[str]:
        """The weights this policy would load that are not here (dry runs); the tiny preset's parts are built locally."""
        given = {k: getattr(options, k) for k in ("vlm", "dit", "vae") if getattr(options, k) is not None}
        return [m for k, path in given.items() if (m := missing(k, path)) is not None]

    def _widen_patch_embedding(self, channels: int) -> None:
        """Concat fusion on a text-to-video DiT: new input channels start at zero (InstructPix2Pix's recipe)."""
        parent_name, _, name = self.backbone.patch_embedding.rpartition(".")
        parent = self.denoiser.get_submodule(parent_name)
        old = getattr(parent, name)
        new = nn.Conv3d(channels, old.out_channels, old.kernel_size, old.stride, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, : old.in_channels] = old.weight
            new.bias.copy_(old.bias)
        setattr(parent, name, new)
        self.denoiser.register_to_config(in_channels=channels)

    # ------------------------------------------------------------------ video geometry

    def conform_video(self, video: Tensor) -> tuple[Tensor, str | None]:
        """(T, C, H, W) trimmed to 4k+1 frames and resized to multiples of 16 (what the VAE and patches need)."""
        t, _, h, w = video.shape
        t2 = (t - 1) // self.frame_step * self.frame_step + 1
        h2, w2 = (max(1, int(s / self.size_step + 0.5)) * self.size_step for s in (h, w))  # nearest, halves up
        if (t2, h2, w2) == (t, h, w):
            return video, None
        out = video[:t2]
        if (h2, w2) != (h, w):
            out = F.interpolate(out, size=(h2, w2), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        note = (
            f"{t} frames of {h}x{w} -> {t2} frames of {h2}x{w2} "
            f"(the VAE needs {self.frame_step}k+1 frames and sizes divisible by {self.size_step})"
        )
        return out, note

    def _check_geometry(self, video: Tensor, what: str) -> None:
        t, _, h, w = video.shape
        if (t - 1) % self.frame_step or h % self.size_step or w % self.size_step:
            raise ValueError(
                f"{what}: {t} frames of {h}x{w}; the VIVA policy needs {self.frame_step}k+1 frames and sizes "
                f"divisible by {self.size_step} (`editrl edit` conforms videos automatically)"
            )

    # ------------------------------------------------------------------ VAE

    @torch.no_grad()
    def _encode_pixels(self, video: Tensor) -> Tensor:
        """(B, T, C, H, W) in [0, 1] -> normalised latents (B, z, F, h, w)."""
        x = (video.to(self.device, torch.float32) * 2 - 1).permute(0, 2, 1, 3, 4)
        z = self.vae.encode(x).latent_dist.mode()
        return (z - self.latents_mean) / self.latents_std

    def _videos(self, samples: list[EditSample], attr: str) -> Tensor:
        videos = []
        for s in samples:
            v = getattr(s, attr)
            if v is None:
                raise ValueError(f"sample {s.id!r}: the VIVA policy needs a {attr} video")
            self._check_geometry(v, f"sample {s.id!r} {attr}")
            videos.append(v)
        if len({tuple(v.shape) for v in videos}) > 1:
            raise ValueError(f"{attr} videos of one batch must share a shape: {', '.join(f'{s.id}={tuple(v.shape)}' for s, v in zip(samples, videos))}")
        return torch.stack(videos)

    # ------------------------------------------------------------------ policy protocol

    @torch.no_grad()
    def encode(self, samples: list[EditSample]) -> Condition:
        sources = self._videos(samples, "source")
        refs = [s.reference if self.options.use_reference else None for s in samples]
        images = [[src[0]] + ([r] if r is not None else []) for src, r in zip(sources, refs)]
        instructions = [s.instruction for s in samples]
        cfg = self.guidance_scale != 1.0
        if cfg:  # the null condition: the same images, an empty instruction; one VLM call for both
            instructions, images = instructions + [""] * len(samples), images + images
        hidden, mask = self.instructor(instructions, images)
        hidden, mask = truncate(hidden, mask, self.options.text_len)
        hidden = pad_tokens(hidden, self.options.text_len)
        mask = pad_tokens(mask[..., None].float(), self.options.text_len)[..., 0].bool()
        # Token counts on the host (one read-back per encode): `refine` needs their maximum at every denoising step.
        counts = mask.sum(1).cpu()
        data = {
            "tokens": hidden[: len(samples)], "mask": mask[: len(samples)], "counts": counts[: len(samples)],
            "source": self._encode_pixels(sources),
        }
        if cfg:
            data["null_tokens"], data["null_mask"] = hidden[len(samples) :], mask[len(samples) :]
            data["null_counts"] = counts[len(samples) :]
        if self.options.use_reference:
            data["reference"] = self._encode_references(refs, sources.shape[-2:], data["source"])
        return Condition(data, len(samples))

    def _encode_references(self, refs: list[Tensor | None], size: torch.Size, source: Tensor) -> Tensor:
        """One latent frame per request: the VAE-encoded reference resized to the video, or zeros without one."""
        out = torch.zeros_like(source[:, :, :1])
        have = [i for i, r in enumerate(refs) if r is not None]
        if have:
            imgs = torch.stack([F.interpolate(refs[i][None].float(), size=tuple(size), mode="bilinear", antialias=True)[0] for i in have])
            out[have] = self._encode_pixels(imgs.clamp(0, 1)[:, None])
        return out

    def init_noise(self, cond: Condition, generator: torch.Generator) -> Tensor:
        shape = tuple(cond["source"].shape)
        return torch.randn(shape, generator=generator, device=generator.device).to(self.device, self.dtype)

    @training_graph
    def velocity(self, x: Tensor, sigma: Tensor, cond: Condition) -> Tensor:
        tokens, mask, counts = cond["tokens"], cond["mask"], cond["counts"]
        source, ref = cond["source"], cond.get("reference")
        g = self.guidance_scale
        if g != 1.0:
            if cond.get("null_tokens") is None:
                raise RuntimeError("guidance_scale > 1 but this condition was encoded without the null condition")
            tokens, mask = torch.cat([tokens, cond["null_tokens"]]), torch.cat([mask, cond["null_mask"]])
            counts = torch.cat([counts, cond["null_counts"]])
            x, sigma, source = torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([source, source])
            ref = torch.cat([ref, ref]) if ref is not None else None
        timestep = sigma.to(self.device, torch.float32) * 1000
        text = self.refine(tokens, mask, int(counts.max()), timestep)
        pooled = self.refiner.pool(text, mask) if self.backbone.pooled_dim else None
        v = self.backbone.predict(
            self.denoiser, self.fuse(x, source, ref).to(self.dtype), timestep, text.to(self.dtype), mask, pooled
        ).float()
        if ref is not None:
            v = v[:, :, 1:]
        if g != 1.0:
            v_cond, v_null = v.chunk(2)
            v = v_null + g * (v_cond - v_null)
        return v

    def refine(self, tokens: Tensor, mask: Tensor, longest: int, timestep: Tensor) -> Tensor:
        """The refiner on the first `longest` tokens only (exact: padding is masked), zero-padded back to text_len.

        `longest` comes from the host-side token counts, so the call reads nothing back from the device. The
        refiner's weights stay float32 (trained with Adam); with a low-precision policy its matmuls run under autocast
        in the policy's dtype, as the DiT's do, instead of in float32 at every denoising step.
        """
        n = max(1, longest)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.refiner(tokens[:, :n].float(), mask[:, :n], timestep).float()
        return pad_tokens(out, tokens.shape[1])

    def fuse(self, x: Tensor, source: Tensor, ref: Tensor | None) -> Tensor:
        """The DiT input: noisy latent with the source latent (and the reference frame first)."""
        x = x.to(source.dtype)
        z = x + source if self.options.fusion == "add" else torch.cat([x, source], dim=1)
        if ref is None:
            return z
        if self.options.fusion == "concat":  # the reference sits in the condition channels, as the source does
            ref = torch.cat([torch.zeros_like(ref), ref], dim=1)
        return torch.cat([ref, z], dim=2)

    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        """Pixels in float32, `decode_chunk` clips per VAE call; `decode_dtype: bfloat16` runs the VAE under autocast."""
        z = x0.to(self.device, torch.float32) * self.latents_std + self.latents_mean
        low = self.options.decode_dtype == "bfloat16"
        videos = []
        for part in z.split(self.options.decode_chunk):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=low):
                videos.append(self.vae.decode(part).sample.float())
        video = torch.cat(videos)
        return ((video.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)

    def reconstruct(self, video: Tensor) -> Tensor:
        """The video through the VAE: the evaluation's ceiling, what an edit reaching the target's latent shows."""
        return self.decode(self._encode_pixels(video))

    def encode_target(self, samples: list[EditSample]) -> Tensor:
        """x0 latents of the targets (SFT)."""
        return self._encode_pixels(self._videos(samples, "target")).to(self.dtype)

    # ------------------------------------------------------------------ trainable parts

    def add_lora(self, lora: LoraOptions) -> None:
        if "dit" in self.options.trainable:
            raise RecipeError("policy.options.trainable: the DiT trains either fully ('dit') or through optim.lora, not both")
        super().add_lora(lora if lora.targets else lora.model_copy(update={"targets": self.backbone.lora_targets}))

    def trainable_state_dict(self) -> dict[str, dict[str, Tensor]]:
        """LoRA + refiner, plus the full DiT when it differs from its pretrained weights (trained or loaded)."""
        out = super().trainable_state_dict()
        if self.dit_in_checkpoint:
            base = {
                self.dit_prefix + k.replace(".base_layer.", "."): v.detach().cpu().contiguous()
                for k, v in self.denoiser.state_dict().items()
                if "lora_" not in k
            }
            out.setdefault("extra", {}).update(base)
        return out

    def load_trainable(self, directory: str | Path) -> None:
        directory = Path(directory)
        try:
            super().load_trainable(directory)
            extra = directory / self.extra_file
            if extra.exists():
                dit = {k[len(self.dit_prefix) :]: v for k, v in load_file(str(extra)).items() if k.startswith(self.dit_prefix)}
                if dit:
                    self._load_dit(dit)
        except RuntimeError as e:
            raise RecipeError(f"{directory}: its weights do not fit this policy: {str(e).strip().splitlines()[0]}") from e

    def _load_dit(self, state: dict[str, Tensor]) -> None:
        """Full DiT weights into the DiT, LoRA-wrapped or not (peft renames `x.weight` to `x.base_layer.weight`)."""
        own = self.denoiser.state_dict()
        mapped = {}
        for k, v in state.items():
            wrapped = ".base_layer.".join(k.rsplit(".", 1))
            key = k if k in own else wrapped
            if key not in own:
                raise RuntimeError(f"unexpected DiT weight {k}")
            mapped[key] = v
        missing = [k for k in own if "lora_" not in k and k not in mapped]
        if missing:
            raise RuntimeError(f"missing DiT weight {missing[0]}")
        self.denoiser.load_state_dict(mapped, strict=False)
        self.dit_in_checkpoint = True
