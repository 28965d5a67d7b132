"""FLUX.1-Kontext as an editrl policy: diffusers' FluxTransformer2DModel, AutoencoderKL, CLIP-L and T5, conditioned as
`FluxKontextPipeline` conditions them.

The prompt: CLIP's pooled output (the pipeline's 77 tokens) and T5's hidden states over `text_len` tokens padded to
that length (its `max_sequence_length`), with all-zero text ids. The DiT's sequence: the noisy latent tokens, then the
source image's latent tokens; their position ids are the pipeline's (row, column) grid, with the source's first
coordinate set to 1. The distilled guidance embedding takes `embedded_guidance` (the pipeline's `guidance_scale`, 2.5
in its examples); true CFG against a negative prompt (the pipeline's `true_cfg_scale`, here `guidance_scale`) runs
both branches in one DiT call, without the renormalisation Qwen-Image uses. Kontext conditions on one image: a
request's reference image is not used.

Training: FLUX.1-Kontext's forward+backward fails on an H200 under torch's cuDNN attention (shared/device/
h200-big-dits), so on CUDA the policy's attention defaults to flash (`attention: auto`).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from editrl.policy import training_graph
from editrl.types import Condition, EditSample

from ..loading import check
from .base import ImageEditOptions, ImageEditPolicy


class FluxKontextOptions(ImageEditOptions):
    embedded_guidance: float = Field(2.5, ge=0.0)  # the guidance embedding's input (the pipeline's guidance_scale)
    text_len: int = Field(512, ge=1, le=512)  # T5 tokens (the pipeline's max_sequence_length)


class FluxKontextPolicy(ImageEditPolicy):
    Options = FluxKontextOptions
    options: FluxKontextOptions
    preset_name = "flux_kontext"
    # `attention: auto` is flash where it runs (CUDA): Kontext's backward fails under cuDNN's, torch's default on an
    # H200 (shared/device/h200-big-dits); elsewhere torch's native choice.
    default_attention = "flash"
    components = {"transformer": "config.json", "vae": "config.json", "text_encoder": "config.json",
                  "text_encoder_2": "config.json", "tokenizer": "tokenizer_config.json",
                  "tokenizer_2": "tokenizer_config.json"}
    # flow_grpo's FLUX.1-Kontext trainer (scripts/train_flux_kontext.py): attention and MLPs of both streams and the
    # single-stream blocks' MLP input.
    default_lora_targets = [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
    ]

    def __init__(self, options: FluxKontextOptions, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32) -> None:
        from diffusers import AutoencoderKL, FluxKontextPipeline, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        super().__init__()
        self.start(options, device, dtype)
        self.pipeline_class = FluxKontextPipeline
        self.tokenizer = self.load("tokenizer", "CLIP tokenizer", AutoTokenizer.from_pretrained)
        self.tokenizer_2 = self.load("tokenizer_2", "T5 tokenizer", AutoTokenizer.from_pretrained)
        self.text_encoder = self.frozen(self.load("text_encoder", "CLIPTextModel", CLIPTextModel.from_pretrained, dtype=dtype))
        self.text_encoder_2 = self.frozen(self.load("text_encoder_2", "T5EncoderModel", T5EncoderModel.from_pretrained, dtype=dtype))
        self.vae = self.frozen(self.load("vae", "AutoencoderKL", AutoencoderKL.from_pretrained))
        check("pretrained (vae)", self.vae.config.shift_factor is not None, "the VAE has no shift_factor: not FLUX's VAE")
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        dit = self.load("transformer", "FluxTransformer2DModel", FluxTransformer2DModel.from_pretrained, torch_dtype=dtype)
        z = self.vae.config.latent_channels
        check("pretrained (transformer)", dit.config.in_channels == 4 * z, f"the DiT takes {dit.config.in_channels} channels, 4 x the VAE's {z} packed")
        self._ids: dict[tuple[int, int, int], tuple[Tensor, Tensor]] = {}
        self.setup_denoiser(dit)

    # ------------------------------------------------------------------ VAE

    def from_vae(self, z: Tensor) -> Tensor:
        return (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def to_vae(self, z: Tensor) -> Tensor:
        return z / self.vae.config.scaling_factor + self.vae.config.shift_factor

    # ------------------------------------------------------------------ encode

    @torch.no_grad()
    def encode(self, samples: list[EditSample]) -> Condition:
        sources = self.images(samples, "source")
        prompts = [s.instruction for s in samples]
        cfg = self.guidance_scale != 1.0
        if cfg:
            prompts = prompts + [self.options.negative_prompt] * len(samples)
        text, pooled = self.encode_prompts(prompts)
        n = len(samples)
        data: dict[str, Any] = {"text": text[:n], "pooled": pooled[:n], "source": self.encode_pixels(sources).to(self.dtype)}
        if cfg:
            data["neg_text"], data["neg_pooled"] = text[n:], pooled[n:]
        return Condition(data, n)

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """The pipeline's `encode_prompt`: T5 hidden states (N, text_len, width) and CLIP's pooled output (N, width)."""
        clip = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                              return_tensors="pt")
        pooled = self.text_encoder(clip.input_ids.to(self.device), output_hidden_states=False).pooler_output
        t5 = self.tokenizer_2(prompts, padding="max_length", max_length=self.options.text_len, truncation=True,
                              return_tensors="pt")
        text = self.text_encoder_2(t5.input_ids.to(self.device), output_hidden_states=False)[0]
        return text.to(self.text_encoder_2.dtype), pooled.to(self.text_encoder.dtype)

    # ------------------------------------------------------------------ velocity

    def ids(self, h: int, w: int, text_len: int) -> tuple[Tensor, Tensor]:
        """Position ids of the text (all zero), and of the noisy tokens then the source's (first coordinate 1), as the
        pipeline builds them; made once per geometry."""
        if (h, w, text_len) not in self._ids:
            make = self.pipeline_class._prepare_latent_image_ids
            latent = make(1, h // 2, w // 2, self.device, self.dtype)
            image = make(1, h // 2, w // 2, self.device, self.dtype)
            image[..., 0] = 1
            text = torch.zeros(text_len, 3, device=self.device, dtype=self.text_encoder_2.dtype)
            self._ids[h, w, text_len] = text, torch.cat([latent, image])
        return self._ids[h, w, text_len]

    @training_graph
    def velocity(self, x: Tensor, sigma: Tensor, cond: Condition) -> Tensor:
        latents = self.pack(x.to(self.dtype))
        hidden = torch.cat([latents, self.pack(cond["source"])], dim=1)
        text, pooled, timestep = cond["text"], cond["pooled"], self.timestep(sigma)
        cfg = self.guidance_scale != 1.0
        if cfg:
            if cond.get("neg_text") is None:
                raise RuntimeError("guidance_scale > 1 but this condition was encoded without the negative prompt")
            text, pooled = torch.cat([text, cond["neg_text"]]), torch.cat([pooled, cond["neg_pooled"]])
            hidden, timestep = torch.cat([hidden, hidden]), torch.cat([timestep, timestep])
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((hidden.shape[0],), self.options.embedded_guidance, device=self.device, dtype=torch.float32)
        text_ids, image_ids = self.ids(x.shape[-2], x.shape[-1], text.shape[1])
        v = self.denoiser(
            hidden_states=hidden, timestep=timestep, guidance=guidance, pooled_projections=pooled.to(self.dtype),
            encoder_hidden_states=text.to(self.dtype), txt_ids=text_ids, img_ids=image_ids, return_dict=False,
        )[0][:, : latents.shape[1]]
        if cfg:
            v = self.guide(*v.chunk(2), self.guidance_scale, rescale=False)
        return self.unpack(v, x).float()
