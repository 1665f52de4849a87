"""A decode row's routed experts as one custom op, when every expert is resident: no host read in Python.

The op receives the device-side slot ids of the row's experts (looked up in the cache's expert-to-slot table, on
the device) and the slot pool's packed fields, and reads the slot ids inside, where compute needs them (on CPU
that costs nothing; nothing waits on a device). To torch.compile the op is one opaque node with a known output
shape, so a decoder layer compiles with `fullgraph=True` around it. Results equal the executor's per-expert loop
bit for bit: the same per-expert matmuls and the same fixed-order combine.
"""

from __future__ import annotations

import torch

from mobile_moe.experts.formats import ExpertFormat
from mobile_moe.experts.kernels import layout_format
from mobile_moe.layers.mlp import ACTIVATIONS, Activation, ClampedSwiGLU, gated

CLAMPED_SWIGLU = "clamped_swiglu"


@torch.library.custom_op("mobile_moe::resident_experts", mutates_args=())
def resident_experts(
    x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, gate_up: list[torch.Tensor], down: list[torch.Tensor],
    layout: str, group_size: int, activation: str, alpha: float, limit: float, bias: bool,
) -> torch.Tensor:
    """x: [1, H], slots: [n] int64, weights: [1, n]; gate_up / down: the pool's packed fields [S, ...] (a bias field last
    when `bias`) -> sum_j weights[0, j] * expert_{slots[j]}(x)  [1, H]."""
    fmt = layout_format(layout, group_size, x.dtype)
    act: Activation = ClampedSwiGLU(alpha, limit) if activation == CLAMPED_SWIGLU else ACTIVATIONS[activation]
    outs = []
    for slot in slots.tolist():
        gu, gu_bias = split_bias([f[slot] for f in gate_up], bias)
        dn, dn_bias = split_bias([f[slot] for f in down], bias)
        outs.append(expert_output(fmt, act, x, gu, dn, gu_bias, dn_bias))  # [1, H]
    return combine(outs, weights, x.dtype)


@resident_experts.register_fake
def _(x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, gate_up: list[torch.Tensor], down: list[torch.Tensor],
      layout: str, group_size: int, activation: str, alpha: float, limit: float, bias: bool) -> torch.Tensor:
    return torch.empty_like(x)


def expert_output(
    fmt: ExpertFormat, act: Activation, x: torch.Tensor, gate_up: list[torch.Tensor], down: list[torch.Tensor],
    gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
) -> torch.Tensor:
    """x: [P, H] -> one expert's gated MLP output [P, H] from its packed fields, through the format's matmul."""
    gate, up = _biased(fmt.linear(x, gate_up, x.dtype), gate_up_bias).chunk(2, dim=-1)
    return _biased(fmt.linear(gated(act, gate, up), down, x.dtype), down_bias)


def combine(outs: list[torch.Tensor], weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One row's expert outputs (each [1, H], rank order) and weights [1, n] -> their weighted sum [1, H], in a fixed order."""
    return (torch.cat(outs) * weights.view(-1, 1).to(dtype)).sum(0, keepdim=True)


def split_bias(fields: list[torch.Tensor], bias: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """A matrix's fields -> (weight fields, bias or None)."""
    return (fields[:-1], fields[-1]) if bias else (fields, None)


def _biased(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y [P, out] plus a packed bias [out] in y's dtype (None: y itself)."""
    return y if bias is None else y + bias.to(y.dtype)


def activation_args(act: Activation) -> tuple[str, float, float]:
    """(name, alpha, limit) naming an activation for the op."""
    if isinstance(act, ClampedSwiGLU):
        return CLAMPED_SWIGLU, act.alpha, act.limit
    return next(name for name, f in ACTIVATIONS.items() if f is act), 0.0, 0.0
