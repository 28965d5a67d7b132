"""Toy text-to-video policy: a diffusers Wan transformer denoising pixels directly (no VAE).

The text encoder is a frozen random embedding of hashed words: enough for different prompts to condition
differently, with no tokenizer or weights to download. Latents are pixels scaled to [-1, 1].
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor, nn

from editrl.policy import DenoiserOptions, LoraPolicy, training_graph
from editrl.types import Condition, EditSample


class ToyT2VPolicy(LoraPolicy):
    class Options(DenoiserOptions):
        pretrained: str | None = None  # a saved WanTransformer3DModel directory; None builds a random one
        frames: int = 2
        height: int = 8
        width: int = 8
        text_len: int = 8
        text_dim: int = 32
        vocab: int = 4096
        num_layers: int = 2
        num_heads: int = 2
        head_dim: int = 12
        ffn_dim: int = 64
        init_seed: int = 0  # seed of the random transformer and text embedding
        guidance_scale: float = 1.0

    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    edits_video = False  # text-to-video: it ignores a sample's source, so `editrl edit` refuses its checkpoints

    def __init__(self, options: Options, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32) -> None:
        from diffusers import WanTransformer3DModel

        super().__init__()
        self.options, self.device, self.dtype = options, device, dtype
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.init_seed)
            if options.pretrained:
                self.denoiser = WanTransformer3DModel.from_pretrained(options.pretrained)
            else:
                self.denoiser = WanTransformer3DModel(
                    patch_size=(1, 2, 2),
                    num_attention_heads=options.num_heads,
                    attention_head_dim=options.head_dim,
                    in_channels=3,
                    out_channels=3,
                    text_dim=options.text_dim,
                    freq_dim=256,
                    ffn_dim=options.ffn_dim,
                    num_layers=options.num_layers,
                )
            self.text_embedding = nn.Embedding(options.vocab, options.text_dim)
        self.denoiser.to(device).requires_grad_(False)
        if dtype != torch.float32:
            self.denoiser.to(dtype)
        self.text_embedding.to(device=device, dtype=dtype).requires_grad_(False)
        self.configure_denoiser(options)

    def _tokens(self, text: str) -> list[int]:
        ids = [zlib.crc32(w.encode()) % self.options.vocab for w in text.lower().split()][: self.options.text_len]
        return ids + [0] * (self.options.text_len - len(ids))

    @torch.no_grad()
    def encode(self, samples: list[EditSample]) -> Condition:
        ids = torch.tensor([self._tokens(s.instruction) for s in samples], device=self.device)
        return Condition({"text": self.text_embedding(ids)}, len(samples))

    def init_noise(self, cond: Condition, generator: torch.Generator) -> Tensor:
        o = self.options
        shape = (cond.batch_size, 3, o.frames, o.height, o.width)
        return torch.randn(shape, generator=generator, device=generator.device).to(self.device, self.dtype)

    @training_graph
    def velocity(self, x: Tensor, sigma: Tensor, cond: Condition) -> Tensor:
        text = cond["text"]
        g = self.options.guidance_scale
        if g != 1.0:
            x, sigma, text = torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([text, torch.zeros_like(text)])
        v = self.denoiser(x.to(self.dtype), timestep=sigma * 1000, encoder_hidden_states=text, return_dict=False)[0]
        if g != 1.0:
            cond_v, uncond_v = v.chunk(2)
            v = uncond_v + g * (cond_v - uncond_v)
        return v

    def decode(self, x0: Tensor) -> Tensor:
        return ((x0.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)

    def encode_target(self, samples: list[EditSample]) -> Tensor:
        """x0 latents of the targets (SFT): pixels (T, C, H, W) in [0, 1] mapped to [-1, 1]."""
        targets = torch.stack([s.target for s in samples if s.target is not None])
        if len(targets) != len(samples):
            raise ValueError("every sample needs a target for supervised training")
        return (targets * 2 - 1).permute(0, 2, 1, 3, 4).to(self.device, self.dtype)
