"""A linear layer whose weight is stored quantized (int8 / int4) and multiplied by its format's kernel.

The module knows nothing of the formats: it holds a format object (the expert formats of experts/formats.py and
their fused kernel layouts in experts/kernels.py fit the `WeightFormat` protocol) and the packed fields, registered
as buffers under the format's field names, so a checkpoint's `<name>.qweight` / `<name>.scales` load into it.
Loading (loading/dense.py) decides which linears become quantized and repacks them into a kernel's layout.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class FieldLike(Protocol):
    """One packed field: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


class WeightFormat(Protocol):
    """What a quantized linear needs of a weight format."""

    name: str

    def fields(self, out: int, inp: int) -> list[FieldLike]:
        """The packed fields of one [out, inp] matrix."""
        ...

    def linear(self, x: torch.Tensor, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """x: [M, in] -> x @ w.T [M, out]."""
        ...


class QuantLinear(nn.Module):
    """y = x @ w.T + b with w packed in `fmt`; a fused member (see `fuse_quantized`) reads its rows of the fused output."""

    def __init__(self, fmt: WeightFormat, parts: list[torch.Tensor], bias: torch.Tensor | None, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.names: tuple[str, ...] = ()
        self.fmt = fmt
        self.set_parts(fmt, parts)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.rows: tuple[QuantLinear, int, int] | None = None  # (fused module, first row, end row) once fused into another

    @property
    def parts(self) -> list[torch.Tensor]:
        """The packed fields, in the format's order."""
        return [getattr(self, name) for name in self.names]

    def set_parts(self, fmt: WeightFormat, parts: list[torch.Tensor]) -> None:
        """Hold `parts` in `fmt` from now on (the old fields are released)."""
        for name in self.names:
            delattr(self, name)
        self.fmt = fmt
        self.names = tuple(f.name for f in fmt.fields(self.out_features, self.in_features)) if parts else ()
        for name, part in zip(self.names, parts, strict=True):
            self.register_buffer(name, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out]."""
        if self.rows is not None:
            fused, start, end = self.rows
            return fused(x)[..., start:end]
        lead = x.shape[:-1]
        y = self.fmt.linear(x.reshape(-1, self.in_features), self.parts, x.dtype)  # [M, out]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt!r}"


def fuse_quantized(linears: list[QuantLinear]) -> QuantLinear | None:
    """One QuantLinear over the concatenated rows of `linears` (portable layouts: every field is rows first), each of
    which then reads its rows of the fused output and holds no weights; None when their formats differ."""
    fmt = linears[0].fmt
    if any(lin.fmt is not fmt and repr(lin.fmt) != repr(fmt) for lin in linears) or any(lin.rows is not None for lin in linears):
        return None
    has_bias = [lin.bias is not None for lin in linears]
    if any(has_bias) and not all(has_bias):
        return None
    parts = [torch.cat(fields) for fields in zip(*(lin.parts for lin in linears))]  # each [sum(out), ...]
    bias = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None  # type: ignore[union-attr]
    fused = QuantLinear(fmt, parts, bias, linears[0].in_features, sum(lin.out_features for lin in linears))
    start = 0
    for lin in linears:
        lin.set_parts(lin.fmt, [])
        lin.bias = None
        lin.rows = (fused, start, start + lin.out_features)  # a plain attribute: the fused module is its owner's, not this one's
        start += lin.out_features
    return fused
