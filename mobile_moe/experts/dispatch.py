"""One expert's gated MLP from its packed fields, and the fixed-order combine of a row's expert outputs."""

from __future__ import annotations

import torch

from mobile_moe.experts.formats import ExpertFormat
from mobile_moe.layers.mlp import Activation, gated


def expert_output(
    fmt: ExpertFormat,
    act: Activation,
    x: torch.Tensor,
    gate_up: list[torch.Tensor],
    down: list[torch.Tensor],
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
) -> torch.Tensor:
    """x: [P, H] -> one expert's gated MLP output [P, H] from its packed fields, through the format's matmul."""
    y = fmt.linear(x, gate_up, x.dtype)  # [P, 2I]
    gate, up = (y if gate_up_bias is None else y + gate_up_bias.to(y.dtype)).chunk(2, dim=-1)
    y = fmt.linear(gated(act, gate, up), down, x.dtype)  # [P, H]
    return y if down_bias is None else y + down_bias.to(y.dtype)


def pool_experts(
    act: Activation,
    x: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
) -> torch.Tensor:
    """One token's experts read straight from the slot pool, for torch.compile: x [1, H], slots [n] (rank order),
    weights [1, n], gate_up [S, 2I, H], down [S, H, I], biases [S, 2I] / [S, H] or None -> the weighted sum [1, H].
    Written as indexed products and sums so the compiler fuses the gather into each matvec (eager would copy the weights)."""
    h = (gate_up[slots] * x).sum(-1)  # [n, 2I]
    if gate_up_bias is not None:
        h = h + gate_up_bias[slots].to(h.dtype)
    gate, up = h.chunk(2, dim=-1)
    y = (down[slots] * gated(act, gate, up)[:, None, :]).sum(-1)  # [n, H]
    if down_bias is not None:
        y = y + down_bias[slots].to(y.dtype)
    return (y * weights.view(-1, 1).to(x.dtype)).sum(0, keepdim=True)


def tiled_experts(
    act: Activation,
    x: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    gate_up_codes: torch.Tensor,
    gate_up_scales: torch.Tensor,
    down_codes: torch.Tensor,
    down_scales: torch.Tensor,
) -> torch.Tensor:
    """One token's experts from a pool in a tiled layout (experts/kernels.py `TiledInt4`, `TiledInt8`): x [1, H], slots [n]
    (rank order), weights [1, n], each matrix's codes [S, ...] and scales (int4: (scale, zero) pairs [S, out / 16, in / g,
    16, 2]; int8: [S, out]) -> the weighted sum [1, H]: two kernel calls, rows rounded as the per-expert path rounds them."""
    gate_up = tiled_pool_linear(x, gate_up_codes, gate_up_scales, slots).to(x.dtype)  # [n, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    y = tiled_pool_linear(gated(act, gate, up), down_codes, down_scales, slots).to(x.dtype)  # [n, H]
    return (y * weights.view(-1, 1).to(x.dtype)).sum(0, keepdim=True)


def tiled_pool_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x [1 or n, in], a tiled pool's codes [S, ...] and scales, slots [n] -> [n, out] float32 through
    `torch.ops.mobile_moe_native` (registered when the pool was packed); the scales' rank tells int8 ([S, out]) from int4."""
    xb = x.to(torch.bfloat16).contiguous()
    if scales.dim() == 2:
        return torch.ops.mobile_moe_native.int8_tiles_experts(xb, codes, scales, slots)
    return torch.ops.mobile_moe_native.int4_tiles_experts(xb, codes, scales, slots, codes.shape[2] * 2 // scales.shape[2])


def combine(outs: list[torch.Tensor], weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One row's expert outputs (each [1, H], rank order) and weights [1, n] -> their weighted sum [1, H], in a fixed order."""
    return (torch.cat(outs) * weights.view(-1, 1).to(dtype)).sum(0, keepdim=True)


def split_bias(fields: list[torch.Tensor], bias: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """A matrix's fields -> (weight fields, bias or None)."""
    return (fields[:-1], fields[-1]) if bias else (fields, None)
