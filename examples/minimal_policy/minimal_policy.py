"""A policy written against editrl's `Policy` protocol alone (editrl.policy.Policy): no LoraPolicy, no diffusers.

A text-to-video flow model in pixel space small enough to read at once: each pixel's velocity comes from an MLP of
the pixel, the noise level and the prompt's mean word embedding (hashed words: no tokenizer, nothing to download).
It implements the protocol's required members and none of its OPTIONAL ones, and trains under Edit-GRPO:

    PYTHONPATH=examples/minimal_policy editrl train toy policy.name=minimal_policy:MinimalPolicy 'policy.options={}' train.steps=1
"""

from __future__ import annotations

import contextlib
import zlib
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from editrl.config import LoraOptions
from editrl.types import Condition, EditSample

FRAMES, SIZE, WIDTH, VOCAB = 2, 8, 32, 1024
ADAPTER = "lora.safetensors"


class PixelMLP(nn.Module):
    """v(x, sigma, text) per pixel: x (B, 3, T, H, W), sigma (B,), text (B, WIDTH)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3 + 1 + WIDTH, WIDTH)
        self.out = nn.Linear(WIDTH, 3)

    def forward(self, x: Tensor, sigma: Tensor, text: Tensor) -> Tensor:
        b, _, t, h, w = x.shape
        pixels = x.permute(0, 2, 3, 4, 1)
        cond = torch.cat([sigma.view(b, 1, 1, 1, 1).expand(b, t, h, w, 1), text.view(b, 1, 1, 1, -1).expand(b, t, h, w, WIDTH)], -1)
        return self.out(F.gelu(self.inp(torch.cat([pixels, cond.to(pixels.dtype)], -1)))).permute(0, 4, 1, 2, 3)


class MinimalPolicy:
    """Built by editrl as `MinimalPolicy(options, device=..., dtype=...)`; it has no options."""

    def __init__(self, options: dict[str, Any], device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32) -> None:
        if options:
            raise ValueError(f"MinimalPolicy takes no options, got {sorted(options)}")
        self.device, self.dtype = device, dtype
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = PixelMLP()
            self.words = nn.Embedding(VOCAB, WIDTH)
        self.net.to(device, dtype).requires_grad_(False)
        self.words.to(device, dtype).requires_grad_(False)

    # -- sampling
    @torch.no_grad()
    def encode(self, samples: list[EditSample]) -> Condition:
        ids = [[zlib.crc32(word.encode()) % VOCAB for word in s.instruction.lower().split()] or [0] for s in samples]
        text = torch.stack([self.words(torch.tensor(i, device=self.device)).mean(0) for i in ids])
        return Condition({"text": text}, len(samples))

    def init_noise(self, cond: Condition, generator: torch.Generator) -> Tensor:
        shape = (cond.batch_size, 3, FRAMES, SIZE, SIZE)
        return torch.randn(shape, generator=generator, device=generator.device).to(self.device, self.dtype)

    def velocity(self, x: Tensor, sigma: Tensor, cond: Condition) -> Tensor:
        return self.net(x.to(self.dtype), sigma.to(self.device, self.dtype), cond["text"])

    def decode(self, x0: Tensor) -> Tensor:
        return ((x0.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)

    # -- training
    def add_lora(self, lora: LoraOptions) -> None:
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.targets or ["inp", "out"])
        inject_adapter_in_model(config, self.net)
        for name, p in self.net.named_parameters():
            p.requires_grad_("lora_" in name)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        layers = [m for m in self.net.modules() if isinstance(m, LoraLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    def save_trainable(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items() if "lora_" in k}
        save_file(state, str(Path(directory) / ADAPTER))

    def load_trainable(self, directory: str | Path) -> None:
        self.net.load_state_dict(load_file(str(Path(directory) / ADAPTER)), strict=False)
