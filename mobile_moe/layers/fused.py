"""One matmul for several linears that read the same input (q/k/v, gate/up): fewer launches per decode token.

Quantized linears (layers/qlinear.py) fuse too: their packed rows are concatenated into one QuantLinear."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mobile_moe.layers.qlinear import QuantLinear, fuse_quantized


@dataclass(frozen=True)
class FusedLinear:
    """The concatenated weights of linears sharing an input; each original linear now views its rows."""

    weight: torch.Tensor | None  # [sum(out), in]; None when quantized
    bias: torch.Tensor | None  # [sum(out)]
    sizes: tuple[int, ...]
    quantized: QuantLinear | None = None  # the fused quantized linear (its members read their rows of it)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: [T, in] -> one output [T, out_i] per original linear."""
        y = F.linear(x, self.weight, self.bias) if self.quantized is None else self.quantized(x)  # [T, sum(out)]
        return y.split(self.sizes, dim=-1)


def to_column_major(weight: torch.Tensor) -> torch.Tensor:
    """The same [out, in] matrix stored column-major (strides (1, out))."""
    return weight.t().contiguous().t()


def fuse_linears(linears: list[nn.Module], column_major: bool = False) -> FusedLinear | None:
    """Concatenate the linears' weights (and biases), optionally stored column-major, and rebind each linear to its
    rows: no extra memory stays allocated. None when they cannot fuse (quantized in different formats, or mixed)."""
    sizes = tuple(lin.out_features for lin in linears)
    if any(isinstance(lin, QuantLinear) for lin in linears):
        fused = fuse_quantized(linears) if all(isinstance(lin, QuantLinear) for lin in linears) else None  # type: ignore[arg-type]
        return None if fused is None else FusedLinear(None, None, sizes, fused)
    weight = torch.cat([lin.weight.detach() for lin in linears])
    weight = to_column_major(weight) if column_major else weight
    has_bias = [lin.bias is not None for lin in linears]
    if any(has_bias) and not all(has_bias):
        raise ValueError("cannot fuse linears of which only some have a bias")
    bias = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None
    for i, lin in enumerate(linears):
        lin.weight = nn.Parameter(weight.split(sizes)[i], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.split(sizes)[i], requires_grad=False)
    return FusedLinear(weight, bias, sizes)
