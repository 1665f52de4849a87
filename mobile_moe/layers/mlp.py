"""Dense gated MLP (SwiGLU family) used for dense layers and shared experts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from mobile_moe.errors import UnsupportedArchitecture
from mobile_moe.layers.fused import FusedLinear, fuse_linears

ACTIVATIONS: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = MappingProxyType(
    {
        "silu": F.silu,
        "swish": F.silu,
        "gelu": F.gelu,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    }
)


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss experts' gated activation: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)."""

    alpha: float
    limit: float

    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """gate, up: [..., I] -> [..., I]."""
        gate = gate.clamp(max=self.limit)
        up = up.clamp(-self.limit, self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


Activation = Callable[[torch.Tensor], torch.Tensor] | ClampedSwiGLU  # act(gate) * up, or a two-input gated activation


def gated(act: Activation, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The expert's gated product: act(gate) * up, or the two-input rule of a gated activation. [..., I] -> [..., I]."""
    return act.gated(gate, up) if isinstance(act, ClampedSwiGLU) else act(gate) * up


def activation(name: str | ClampedSwiGLU) -> Activation:
    """The activation function named in a config (a gated activation object passes through)."""
    if isinstance(name, ClampedSwiGLU):
        return name
    if name not in ACTIVATIONS:
        raise UnsupportedArchitecture(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = activation(act)
        self.gate_up: FusedLinear | None = None

    def fuse_projections(self, column_major: bool = False) -> None:
        """Compute gate and up with one matmul from now on (weights must be final: loaded and placed)."""
        self.gate_up = fuse_linears([self.gate_proj, self.up_proj], column_major)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]."""
        gate, up = self.gate_up(x) if self.gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.act(gate) * up)
