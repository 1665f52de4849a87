"""One matmul for several linears that read the same input (q/k/v, gate/up): fewer launches per decode token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class FusedLinear:
    """The concatenated weights of linears sharing an input; each original linear now views its rows."""

    weight: torch.Tensor  # [sum(out), in]
    bias: torch.Tensor | None  # [sum(out)]
    sizes: tuple[int, ...]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: [T, in] -> one output [T, out_i] per original linear."""
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def to_column_major(weight: torch.Tensor) -> torch.Tensor:
    """The same [out, in] matrix stored column-major (strides (1, out))."""
    return weight.t().contiguous().t()


def fuse_linears(linears: list[nn.Linear], column_major: bool = False) -> FusedLinear:
    """Concatenate the linears' weights (and biases), optionally stored column-major, and rebind each linear to its
    rows: no extra memory stays allocated."""
    sizes = tuple(lin.out_features for lin in linears)
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
