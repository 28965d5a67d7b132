"""Instructor families: what differs between VLMs (prompt format, image processing, vision inputs), one adapter each.

`Instructor` (instructor.py) is one piece of code for every family: it builds the prompt with the adapter's
blocks, tokenizes, runs the frozen model and reads one hidden layer. An adapter says which transformers class
holds the model (no LM head: only hidden states are needed), how to load its image processor, how a system
prompt, the image placeholders and the instruction are written, and which tensors the model takes for the images.
A new family is one adapter class here plus a tiny config in presets.py.
"""

from __future__ import annotations

from typing import Any, Literal

from PIL import Image
from torch import Tensor, nn

from ..loading import check, load

Family = Literal["qwen2_5_vl", "qwen3_vl", "llava"]


def model_class(family: Family) -> type[nn.Module]:
    """The transformers backbone (no LM head: only hidden states are needed) for a VLM family."""
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLModel

        return Qwen2_5_VLModel
    if family == "qwen3_vl":
        from transformers import Qwen3VLModel

        return Qwen3VLModel
    from transformers import LlavaModel

    return LlavaModel


class QwenVL:
    """Qwen2.5-VL and Qwen3-VL: ChatML prompts; dynamic-resolution images, tokens per image from the patch grid.

    The stock Qwen processors pull in torchvision-based video processors; the PIL image processor used here needs
    only Pillow, and the prompt's placeholder tokens are written here instead.
    """

    default_layer = -1  # the last layer

    def __init__(self, path: str, config: Any, tokenizer: Any, pixels: dict[str, int]) -> None:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.image_processor = load("vlm", "image processor", path, Qwen2VLImageProcessorPil.from_pretrained, **pixels)
        self.image_token_id: int = config.image_token_id
        tok = tokenizer.convert_ids_to_tokens
        self.image_block = (tok(config.vision_start_token_id), tok(config.image_token_id), tok(config.vision_end_token_id))

    def system_block(self, system_prompt: str) -> str:
        return f"<|im_start|>system\n{system_prompt}<|im_end|>\n"

    def user_block(self, instruction: str, n_image_tokens: list[int]) -> str:
        start, pad, end = self.image_block
        images = "".join(f"{start}{pad * n}{end}" for n in n_image_tokens)
        return f"<|im_start|>user\n{images}{instruction}<|im_end|>\n<|im_start|>assistant\n"

    def vision(self, images: list[Image.Image]) -> tuple[list[int], dict[str, Tensor]]:
        """Tokens per image and the model's image tensors (on the host)."""
        out = self.image_processor(images=images, return_tensors="pt")
        merge = self.image_processor.merge_size**2
        return (out["image_grid_thw"].prod(-1) // merge).tolist(), {
            "pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"],
        }

    def token_inputs(self, ids: Tensor) -> dict[str, Tensor]:
        """Inputs derived from the token ids: the M-RoPE positions of the image tokens."""
        return {"mm_token_type_ids": (ids == self.image_token_id).int()}


class Llava:
    """LLaVA with a Llama-3 text model (llava-llama-3-8b, the multimodal encoder HunyuanVideo was aligned with).

    The prompt follows HunyuanVideo's template (Llama-3 headers, `<image>` placeholders then a newline before the
    text, as its image-to-video template writes them); each image is a fixed number of CLIP patch tokens.
    `default_layer` is the layer HunyuanVideo reads: the third from last (`hidden_state_skip_layer: 2`).
    """

    default_layer = -3

    def __init__(self, path: str, config: Any, tokenizer: Any, pixels: dict[str, int]) -> None:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        check("image_min_pixels / image_max_pixels", not pixels, "Qwen-VL resizing bounds; LLaVA's CLIP processor has one size")
        self.image_processor = load("vlm", "image processor", path, CLIPImageProcessorPil.from_pretrained)
        vision = config.vision_config
        self.tokens_per_image = (vision.image_size // vision.patch_size) ** 2 + int(config.vision_feature_select_strategy == "full")
        self.image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        self.bos = tokenizer.bos_token or ""

    def system_block(self, system_prompt: str) -> str:
        return f"{self.bos}<|start_header_id|>system<|end_header_id|>\n\n{system_prompt}<|eot_id|>"

    def user_block(self, instruction: str, n_image_tokens: list[int]) -> str:
        images = "".join(f"{self.image_token * n}\n" for n in n_image_tokens)
        return f"<|start_header_id|>user<|end_header_id|>\n\n{images}{instruction}<|eot_id|>"

    def vision(self, images: list[Image.Image]) -> tuple[list[int], dict[str, Tensor]]:
        out = self.image_processor(images=images, return_tensors="pt")
        return [self.tokens_per_image] * len(images), {"pixel_values": out["pixel_values"]}

    def token_inputs(self, ids: Tensor) -> dict[str, Tensor]:
        return {}


FAMILIES: dict[str, type[QwenVL | Llava]] = {"qwen2_5_vl": QwenVL, "qwen3_vl": QwenVL, "llava": Llava}
