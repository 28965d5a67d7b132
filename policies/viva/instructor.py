"""The VLM instructor: a frozen Qwen-VL reads the instruction and images; its hidden states condition the editor.

The prompt is built here, image placeholder tokens included, instead of by the stock Qwen processors: those
pull in torchvision-based video processors, while the PIL image processor used here needs only Pillow.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor, nn

from editrl.data.video import to_uint8

from .loading import check, load

Family = Literal["qwen2_5_vl", "qwen3_vl"]

DEFAULT_SYSTEM_PROMPT = (
    "You are a video editing assistant. The image is the first frame of the video to edit; a second image, "
    "when given, is a reference for the edit. Describe how the video should look after the instruction is "
    "applied, keeping everything the instruction does not mention unchanged."
)


def model_class(family: Family) -> type[nn.Module]:
    """The transformers backbone (no LM head: only hidden states are needed) for a VLM family."""
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLModel

        return Qwen2_5_VLModel
    from transformers import Qwen3VLModel

    return Qwen3VLModel


def to_pil(image: Tensor) -> Image.Image:
    """(C, H, W) float in [0, 1] -> an RGB PIL image."""
    return Image.fromarray(to_uint8(image[None])[0])


class Instructor(nn.Module):
    """Encodes (instruction, first frame, reference image) into VLM hidden states plus a padding mask.

    `hidden_layer` indexes `hidden_states` (-1: the last layer; HunyuanVideo uses -3). With `crop_system`
    the system prompt's tokens are dropped from the output: they are identical for every request.
    """

    def __init__(
        self,
        path: str,
        family: Family,
        *,
        hidden_layer: int = -1,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        crop_system: bool = True,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        device: torch.device = torch.device("cpu"),
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        config = load("vlm", "VLM config", path, AutoConfig.from_pretrained)
        check("vlm_family", config.model_type == family, f"{path} holds a {config.model_type!r} model, not {family!r}")
        self.tokenizer = load("vlm", "tokenizer", path, AutoTokenizer.from_pretrained)
        pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        self.image_processor = load("vlm", "image processor", path, Qwen2VLImageProcessorPil.from_pretrained, **pixels)
        cls = model_class(family)
        self.model = load("vlm", cls.__name__, path, cls.from_pretrained, dtype=dtype)
        self.model.to(device).eval().requires_grad_(False)
        n_layers = config.text_config.num_hidden_layers
        check("hidden_layer", -(n_layers + 1) <= hidden_layer <= n_layers, f"{hidden_layer} is out of range for a {n_layers}-layer VLM")
        self.hidden_layer = hidden_layer
        self.hidden_size: int = config.text_config.hidden_size
        self.image_token_id: int = config.image_token_id
        tok = self.tokenizer.convert_ids_to_tokens
        self.image_block = (tok(config.vision_start_token_id), tok(config.image_token_id), tok(config.vision_end_token_id))
        self.system_block = f"<|im_start|>system\n{system_prompt}<|im_end|>\n"
        self.crop = len(self.tokenizer(self.system_block, add_special_tokens=False)["input_ids"]) if crop_system else 0
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.device = device

    def prompt(self, instruction: str, n_image_tokens: list[int]) -> str:
        start, pad, end = self.image_block
        images = "".join(f"{start}{pad * n}{end}" for n in n_image_tokens)
        return f"{self.system_block}<|im_start|>user\n{images}{instruction}<|im_end|>\n<|im_start|>assistant\n"

    @torch.no_grad()
    def forward(self, instructions: list[str], images: list[list[Tensor]]) -> tuple[Tensor, Tensor]:
        """Hidden states (B, L, hidden) and mask (B, L) bool for each instruction with its images ((C, H, W) each).

        One batched VLM call for the whole list: right padding, so every row's real tokens come first.
        """
        flat = [to_pil(img) for row in images for img in row]
        vision: dict[str, Any] = {}
        counts: list[list[int]] = [[] for _ in images]
        if flat:
            vision = dict(self.image_processor(images=flat, return_tensors="pt"))
            merge = self.image_processor.merge_size**2
            per_image = iter((vision["image_grid_thw"].prod(-1) // merge).tolist())
            counts = [[next(per_image) for _ in row] for row in images]
        texts = [self.prompt(ins, n) for ins, n in zip(instructions, counts)]
        enc = self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        extra = {}
        if flat:
            extra = dict(
                pixel_values=vision["pixel_values"].to(self.device, self.model.dtype),
                image_grid_thw=vision["image_grid_thw"].to(self.device),
                mm_token_type_ids=(ids == self.image_token_id).int(),  # M-RoPE positions of the image tokens
            )
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **extra)
        hidden = out.hidden_states[self.hidden_layer][:, self.crop :]
        return hidden, mask[:, self.crop :].bool()


def truncate(hidden: Tensor, mask: Tensor, max_tokens: int) -> tuple[Tensor, Tensor]:
    """At most `max_tokens` tokens (the DiT's text length), warning once when real tokens are cut."""
    if hidden.shape[1] <= max_tokens:
        return hidden, mask
    if bool(mask[:, max_tokens:].any()):
        warnings.warn(f"instructor: prompts longer than text_len={max_tokens} tokens are truncated", stacklevel=2)
    return hidden[:, :max_tokens], mask[:, :max_tokens]
