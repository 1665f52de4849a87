"""Rotary position embeddings: cos/sin tables and the two layouts checkpoints use."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

RopeLayout = Literal["half", "interleaved"]


class RotaryEmbedding(nn.Module):
    """Turns positions into (cos, sin) tables of shape [T, rot_dim // 2]."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = attention_scaling

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] int -> (cos, sin), each [T, rot_dim // 2] float32."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: RopeLayout) -> torch.Tensor:
    """x: [H, T, D] with D = rot_dim; cos/sin: [T, D/2]. 'half' rotates (x[:D/2], x[D/2:]), 'interleaved' pairs (x0, x1).

    The interleaved result is laid out de-interleaved ([evens | odds]); queries and keys share the
    layout, so attention scores equal those of the checkpoint's own formulation.
    """
    if layout == "half":
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
