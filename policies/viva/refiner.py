"""The trainable token refiner: VLM hidden states -> the DiT's text width, aware of the timestep and of padding.

HunyuanVideo's `HunyuanVideoTokenRefiner` from diffusers does the work (a projection, then self-attention blocks
gated by the timestep and the masked mean of the prompt); this wrapper fixes the interface the policy needs and
zeroes padded positions, the convention Wan's DiT was trained with (its text is zero-padded to 512 tokens).
For a DiT that also takes a pooled text vector (HunyuanVideo), `pool` makes it from the refined tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TokenRefiner(nn.Module):
    def __init__(
        self, in_dim: int, out_dim: int, num_layers: int = 2, num_heads: int = 1, mlp_ratio: float = 4.0,
        pooled_dim: int | None = None,
    ) -> None:
        super().__init__()
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoTokenRefiner

        if out_dim % num_heads:
            raise ValueError(f"refiner: the DiT text width {out_dim} is not divisible by refiner_heads={num_heads}")
        self.out_dim = out_dim
        # Its constructor's arguments, written beside its weights by `editrl export` (to rebuild it elsewhere).
        self.arguments = {"in_dim": in_dim, "out_dim": out_dim, "num_layers": num_layers, "num_heads": num_heads,
                          "mlp_ratio": mlp_ratio, "pooled_dim": pooled_dim}
        self.net = HunyuanVideoTokenRefiner(
            in_channels=in_dim,
            num_attention_heads=num_heads,
            attention_head_dim=out_dim // num_heads,
            num_layers=num_layers,
            mlp_ratio=mlp_ratio,
        )
        # Zero-initialised: the DiT's pooled input starts the same for every prompt and is learnt with the refiner.
        self.pooled = nn.Linear(out_dim, pooled_dim) if pooled_dim else None
        if self.pooled is not None:
            nn.init.zeros_(self.pooled.weight)
            nn.init.zeros_(self.pooled.bias)

    def forward(self, tokens: Tensor, mask: Tensor, timestep: Tensor) -> Tensor:
        """(B, L, in_dim), (B, L) bool, (B,) in [0, 1000] -> (B, L, out_dim) with zeros where `mask` is False."""
        out = self.net(tokens, timestep, mask)
        return out * mask.unsqueeze(-1).to(out.dtype)

    def pool(self, refined: Tensor, mask: Tensor) -> Tensor:
        """(B, L, out_dim) refined tokens (zeros at padding), (B, L) bool -> (B, pooled_dim): their projected mean.

        The count divides on the device (no read-back), clamped so an all-padding row gives zeros, not NaN.
        """
        if self.pooled is None:
            raise RuntimeError("this refiner was built without pooled_dim")
        mean = refined.sum(1) / mask.sum(1, keepdim=True).clamp_min(1).to(refined.dtype)
        return self.pooled(mean)


def pad_tokens(tokens: Tensor, length: int) -> Tensor:
    """Zero-pad (B, L, D) to `length` tokens, so a sample's output never depends on its batch."""
    if tokens.shape[1] >= length:
        return tokens
    return torch.nn.functional.pad(tokens, (0, 0, 0, length - tokens.shape[1]))
