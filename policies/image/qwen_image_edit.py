"""Qwen-Image-Edit as an editrl policy: diffusers' QwenImageTransformer2DModel, AutoencoderKLQwenImage and the
Qwen2.5-VL text encoder, conditioned as `QwenImageEditPipeline` (`variant: edit`, Qwen-Image-Edit) or
`QwenImageEditPlusPipeline` (`variant: edit_plus`, Qwen-Image-Edit-2509 / 2511: several input images) condition them.

The prompt: the pipeline's chat template with the images' placeholders ("Picture 1: ..." for edit_plus), the VLM's
last hidden states with the template's first 64 tokens dropped (its `prompt_template_encode_start_idx`). The DiT's
sequence: the noisy latent tokens, then the source's (and, edit_plus with a reference, the reference's) latent tokens,
with `img_shapes` listing each image for the DiT's RoPE; the velocity is read off the noisy tokens. True CFG (the
pipelines' `true_cfg_scale`, here `guidance_scale`) runs the negative prompt with the same images in the same DiT call
and renormalises each guided token to the conditional one's norm, as the pipelines do; `guidance_scale: 1` is the
no-CFG mode (no negative prompt is encoded).

Text is stored zero-padded to `text_len` with each row's token count on the host, and the DiT reads all `text_len`
tokens with the padding masked (as the pipelines do for a batch of prompts of unequal lengths), so a row's numbers
never depend on the other rows of its batch: the rollout's and the update's micro-batches agree bit for bit, in bf16
too. `text_len` is then the DiT's text length: set it near the longest prompt (about 250 tokens a 384x384 picture
plus the instruction). flow_grpo's Qwen-Image-Edit trainer trims to each batch's longest row instead.
A reference image is resized to the source's size, so every request of a batch has one sequence layout per number of
images; a batch mixing requests with and without a reference runs one DiT call per layout. The VLM reads images
through transformers' PIL image processor (`Qwen2VLImageProcessorPil`, no torchvision) and the placeholders are
expanded here exactly as `Qwen2VLProcessor` does.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from editrl.policy import training_graph
from editrl.types import Condition, EditSample

from ..loading import check
from .base import ImageEditOptions, ImageEditPolicy

# diffusers' QwenImageEditPipeline / QwenImageEditPlusPipeline: the prompt templates and the tokens they drop.
SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
    "<|im_end|>\n<|im_start|>user\n"
)
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
TEMPLATES = {"edit": SYSTEM + IMAGE + "{}<|im_end|>\n<|im_start|>assistant\n",
             "edit_plus": SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n"}
PICTURE = "Picture {}: " + IMAGE  # edit_plus: each input image
DROP_TOKENS = 64  # prompt_template_encode_start_idx
IMAGE_PAD = "<|image_pad|>"


class QwenImageEditOptions(ImageEditOptions):
    variant: Literal["edit", "edit_plus"] = "edit_plus"  # QwenImageEditPipeline, or ...PlusPipeline (2509, 2511)
    use_reference: bool = True  # edit_plus: a request's reference image is its second picture
    guidance_scale: float = Field(4.0, ge=1.0)  # the pipelines' true_cfg_scale (their default 4.0); 1: no CFG
    vlm_image_area: int = Field(384 * 384, ge=1)  # edit_plus: the area each image is resized to for the VLM
    text_len: int = Field(1024, ge=1)  # the DiT's text tokens, each prompt zero-padded (the pipelines' limit is 1024)


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about `area` pixels at aspect `ratio`, multiples of 32 (the pipelines' function)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions as dims

    return dims(area, ratio)


class QwenImageEditPolicy(ImageEditPolicy):
    Options = QwenImageEditOptions
    options: QwenImageEditOptions
    preset_name = "qwen_image_edit"
    components = {"transformer": "config.json", "vae": "config.json", "text_encoder": "config.json",
                  "processor": "preprocessor_config.json"}
    # flow_grpo's Qwen-Image-Edit trainer (scripts/train_qwenimage_edit.py): attention and MLPs of both streams.
    default_lora_targets = [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
    ]

    def __init__(self, options: QwenImageEditOptions, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32) -> None:
        from diffusers import AutoencoderKLQwenImage, QwenImageEditPlusPipeline, QwenImageTransformer2DModel
        from transformers import AutoTokenizer, Qwen2_5_VLModel
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        super().__init__()
        self.start(options, device, dtype)
        self.pipeline_class = QwenImageEditPlusPipeline
        self.tokenizer = self.load("processor", "tokenizer", AutoTokenizer.from_pretrained)
        self.vlm_images = self.load("processor", "image processor", Qwen2VLImageProcessorPil.from_pretrained)
        # The VLM without its LM head: the pipelines read only its hidden states.
        self.text_encoder = self.frozen(self.load("text_encoder", "Qwen2.5-VL", Qwen2_5_VLModel.from_pretrained, dtype=dtype))
        self.vae = self.frozen(self.load("vae", "AutoencoderKLQwenImage", AutoencoderKLQwenImage.from_pretrained))
        self.vae_scale_factor = 2 ** len(self.vae.temperal_downsample)
        z = self.vae.config.z_dim
        self.latents_mean = torch.tensor(self.vae.config.latents_mean, device=device).view(1, z, 1, 1)
        self.latents_std = torch.tensor(self.vae.config.latents_std, device=device).view(1, z, 1, 1)
        dit = self.load("transformer", "QwenImageTransformer2DModel", QwenImageTransformer2DModel.from_pretrained, torch_dtype=dtype)
        c = dit.config
        check("pretrained (transformer)", c.in_channels == 4 * z, f"the DiT takes {c.in_channels} channels, 4 x the VAE's {z} packed")
        check("pretrained (transformer)", not c.guidance_embeds, "a guidance-distilled Qwen-Image DiT (guidance_embeds) is not supported")
        self.setup_denoiser(dit)

    # ------------------------------------------------------------------ VAE

    def vae_input(self, x: Tensor) -> Tensor:
        return x[:, :, None]  # a one-frame video for the 3D VAE

    def vae_output(self, x: Tensor) -> Tensor:
        return x[:, :, 0]

    def from_vae(self, z: Tensor) -> Tensor:
        return (z[:, :, 0] - self.latents_mean) / self.latents_std

    def to_vae(self, z: Tensor) -> Tensor:
        return (z / (1.0 / self.latents_std) + self.latents_mean)[:, :, None]  # the pipelines' exact arithmetic

    # ------------------------------------------------------------------ encode

    @torch.no_grad()
    def encode(self, samples: list[EditSample]) -> Condition:
        sources = self.images(samples, "source")
        plus = self.options.variant == "edit_plus"
        refs: list[Tensor | None] = [s.reference if plus and self.options.use_reference else None for s in samples]
        pictures = [[src] + ([r] if r is not None else []) for src, r in zip(sources, refs)]
        prompts = [s.instruction for s in samples]
        cfg = self.guidance_scale != 1.0
        if cfg:  # the negative prompt with the same images; one VLM call for both
            prompts, pictures = prompts + [self.options.negative_prompt] * len(samples), pictures + pictures
        tokens, counts = self.encode_prompts(prompts, pictures)
        n = len(samples)
        data: dict[str, Any] = {
            "tokens": tokens[:n], "counts": counts[:n], "source": self.encode_pixels(sources).to(self.dtype),
        }
        if cfg:
            data["neg_tokens"], data["neg_counts"] = tokens[n:], counts[n:]
        if plus and self.options.use_reference:
            data["reference"], data["has_reference"] = self.encode_references(refs, sources)
        return Condition(data, n)

    def encode_prompts(self, prompts: list[str], pictures: list[list[Tensor]]) -> tuple[Tensor, Tensor]:
        """The pipelines' `_get_qwen_prompt_embeds` for a batch: (N, text_len, hidden) zero-padded, and each row's
        token count on the host."""
        plus = self.options.variant == "edit_plus"
        images = [self.vlm_image(img) for row in pictures for img in row]
        vision = self.vlm_images(images=images, return_tensors="pt")
        per_image = iter((vision["image_grid_thw"].prod(-1) // self.vlm_images.merge_size**2).tolist())
        texts = []
        for prompt, row in zip(prompts, pictures):
            text = TEMPLATES[self.options.variant].format(
                "".join(PICTURE.format(i + 1) for i in range(len(row))) + prompt if plus else prompt
            )
            head, *rest = text.split(IMAGE_PAD)  # Qwen2VLProcessor's expansion: one pad token per image token, in order
            texts.append(head + "".join(IMAGE_PAD * next(per_image) + part for part in rest))
        enc = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
        out = self.text_encoder(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
            pixel_values=vision["pixel_values"].to(self.device, self.text_encoder.dtype),
            image_grid_thw=vision["image_grid_thw"].to(self.device), output_hidden_states=True,
        )
        hidden, mask = out.hidden_states[-1], enc["attention_mask"].bool()
        rows = [h[m][DROP_TOKENS:] for h, m in zip(hidden, mask)]
        longest = max(len(r) for r in rows)
        if longest > self.options.text_len:
            raise ValueError(f"a prompt of {longest} tokens is longer than policy.options.text_len={self.options.text_len}")
        tokens = hidden.new_zeros(len(rows), self.options.text_len, hidden.shape[-1])
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
        return tokens, torch.tensor([len(r) for r in rows])

    def vlm_image(self, image: Tensor) -> Any:
        """What the VLM sees of an image: edit, the image itself; edit_plus, resized to `vlm_image_area` at its
        aspect ratio (the pipeline's CONDITION_IMAGE_SIZE), by the pipelines' PIL resize."""
        pil = self.pil(image[None])[0]
        if self.options.variant == "edit":
            return pil
        width, height = calculate_dimensions(self.options.vlm_image_area, pil.width / pil.height)
        return self.image_processor.resize(pil, height, width)

    def encode_references(self, refs: list[Tensor | None], sources: Tensor) -> tuple[Tensor, Tensor]:
        """Reference latents at the source's size (zeros for requests without one) and which requests have one."""
        have = torch.tensor([r is not None for r in refs])
        height, width = sources.shape[-2:]
        out = torch.zeros(len(refs), self.vae.config.z_dim, *self.latent_size(height, width), device=self.device, dtype=self.dtype)
        if bool(have.any()):
            pils = [self.pil(r[None])[0] for r in refs if r is not None]
            out[have] = self.encode_vae(self.image_processor.preprocess(pils, height, width)).to(self.dtype)
        return out, have

    # ------------------------------------------------------------------ velocity

    @training_graph
    def velocity(self, x: Tensor, sigma: Tensor, cond: Condition) -> Tensor:
        have = cond.get("has_reference")
        if have is None or bool(have.all()) or not bool(have.any()):
            return self.predict(x, sigma, cond, have is not None and bool(have.all()))
        v = torch.empty(x.shape, device=x.device, dtype=torch.float32)  # a batch of two layouts: one call each
        for rows, with_reference in ((torch.nonzero(have).flatten(), True), (torch.nonzero(~have).flatten(), False)):
            at = rows.to(x.device)
            v[at] = self.predict(x[at], sigma.to(x.device)[at], cond.index(rows), with_reference)
        return v

    def predict(self, x: Tensor, sigma: Tensor, cond: Condition, with_reference: bool) -> Tensor:
        """One DiT call as the pipelines make it (both CFG branches in one batch), the velocity of the noisy tokens."""
        latents = self.pack(x.to(self.dtype))
        images = [cond["source"]] + ([cond["reference"]] if with_reference else [])
        hidden = torch.cat([latents, *(self.pack(z) for z in images)], dim=1)
        tokens, counts, timestep = cond["tokens"], cond["counts"], self.timestep(sigma)
        cfg = self.guidance_scale != 1.0
        if cfg:
            if cond.get("neg_tokens") is None:
                raise RuntimeError("guidance_scale > 1 but this condition was encoded without the negative prompt")
            tokens, counts = torch.cat([tokens, cond["neg_tokens"]]), torch.cat([counts, cond["neg_counts"]])
            hidden, timestep = torch.cat([hidden, hidden]), torch.cat([timestep, timestep])
        # Every row reads all `text_len` tokens, its padding masked: a row's numbers never depend on its batch's other
        # rows, so the rollout and the update (other micro-batches) agree bit for bit. No mask when nothing is padded.
        width = tokens.shape[1]
        mask = None if bool((counts == width).all()) else (torch.arange(width) < counts[:, None]).to(self.device)
        _, _, h, w = x.shape
        shapes = [[(1, h // 2, w // 2)] * (1 + len(images))] * hidden.shape[0]
        v = self.denoiser(
            hidden_states=hidden, timestep=timestep, encoder_hidden_states=tokens.to(self.dtype),
            encoder_hidden_states_mask=mask, img_shapes=shapes, return_dict=False,
        )[0][:, : latents.shape[1]]
        if cfg:
            v = self.guide(*v.chunk(2), self.guidance_scale, rescale=True)
        return self.unpack(v, x).float()

