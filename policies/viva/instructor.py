"""The VLM instructor: a frozen VLM reads the instruction and images; its hidden states condition the editor.

One piece of code for every VLM family: the family's adapter (vlms.py) writes the prompt blocks and prepares
the images; this module tokenizes, runs the model once per batch and returns one hidden layer with its mask.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from editrl.data.video import to_uint8

from ..loading import check, load
from .vlms import FAMILIES, Family, model_class

__all__ = ["DEFAULT_SYSTEM_PROMPT", "Family", "Instructor", "model_class", "to_pil", "truncate"]

DEFAULT_SYSTEM_PROMPT = (
    "You are a video editing assistant. The image is the first frame of the video to edit; a second image, "
    "when given, is a reference for the edit. Describe how the video should look after the instruction is "
    "applied, keeping everything the instruction does not mention unchanged."
)


def to_pil(image: Tensor) -> Image.Image:
    """(C, H, W) float in [0, 1] -> an RGB PIL image."""
    return Image.fromarray(to_uint8(image[None])[0])


class Instructor(nn.Module):
    """Encodes (instruction, first frame, reference image) into VLM hidden states plus a padding mask.

    `hidden_layer` indexes `hidden_states` (None: the family's default, -1 for Qwen-VL, -3 for LLaVA as HunyuanVideo
    reads it). With `crop_system` the system prompt's tokens are dropped from the output: they are identical for
    every request.
    """

    def __init__(
        self,
        path: str,
        family: Family,
        *,
        hidden_layer: int | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        crop_system: bool = True,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        device: torch.device = torch.device("cpu"),
        dtype: torch.dtype = torch.float32,
        hub_kernels: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoTokenizer

        config = load("vlm", "VLM config", path, AutoConfig.from_pretrained)
        check("vlm_family", config.model_type == family, f"{path} holds a {config.model_type!r} model, not {family!r}")
        self.tokenizer = load("vlm", "tokenizer", path, AutoTokenizer.from_pretrained)
        pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        self.vlm = FAMILIES[family](path, config, self.tokenizer, pixels)
        self.image_processor = self.vlm.image_processor
        cls = model_class(family)
        # transformers 5 swaps layers for kernels fetched from the hub on every load unless told otherwise: on an
        # offline machine that fails ("Kernels are not available"). Off unless the recipe asks (hub_kernels).
        self.model = load("vlm", cls.__name__, path, cls.from_pretrained, dtype=dtype, use_kernels=hub_kernels)
        self.model.to(device).eval().requires_grad_(False)
        n_layers = config.text_config.num_hidden_layers
        layer = self.vlm.default_layer if hidden_layer is None else hidden_layer
        check("hidden_layer", -(n_layers + 1) <= layer <= n_layers, f"{layer} is out of range for a {n_layers}-layer VLM")
        self.hidden_layer = layer
        self.hidden_size: int = config.text_config.hidden_size
        self.system_block = self.vlm.system_block(system_prompt)
        self.crop = len(self.tokenizer(self.system_block, add_special_tokens=False)["input_ids"]) if crop_system else 0
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.device = device

    def prompt(self, instruction: str, n_image_tokens: list[int]) -> str:
        return self.system_block + self.vlm.user_block(instruction, n_image_tokens)

    @torch.no_grad()
    def forward(self, instructions: list[str], images: list[list[Tensor]]) -> tuple[Tensor, Tensor]:
        """Hidden states (B, L, hidden) and mask (B, L) bool for each instruction with its images ((C, H, W) each).

        One batched VLM call for the whole list: right padding, so every row's real tokens come first.
        """
        flat = [to_pil(img) for row in images for img in row]
        vision: dict[str, Any] = {}
        counts: list[list[int]] = [[] for _ in images]
        if flat:
            per_image, vision = self.vlm.vision(flat)
            tokens = iter(per_image)
            counts = [[next(tokens) for _ in row] for row in images]
        texts = [self.prompt(ins, n) for ins, n in zip(instructions, counts)]
        enc = self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        extra = {}
        if flat:
            extra = {k: v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device) for k, v in vision.items()}
            extra.update(self.vlm.token_inputs(ids))
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
