"""Routed-expert computation straight out of the device cache: no weight copies, one host sync per layer.

The layer's (token, expert) pairs are planned on the host from one read of the router's choice; each cached
expert's weights are read in place, either by one grouped matmul over the whole slot pool (`torch._grouped_mm`,
where the device runs it correctly: probed once) or by a short loop of per-expert matmuls. Pair outputs are
combined by a weighted sum in a fixed order, so results do not depend on atomics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from mobile_moe.experts.cache import ExpertCache
from mobile_moe.experts.store import ExpertShape, ExpertStore
from mobile_moe.experts.transfer import TransferEngine

Activation = Callable[[torch.Tensor], torch.Tensor]
PROBE_HIDDEN, PROBE_INTERMEDIATE = 256, 128  # the grouped-matmul probe's expert: tiny, but aligned like real ones


@dataclass(frozen=True)
class ExpertGroup:
    """Experts computed together (they fit the cache at once) and their pairs, grouped by expert."""

    experts: list[int]  # ascending
    counts: list[int]  # pairs routed to each expert
    positions: list[int]  # flat pair positions (token * n + rank), expert by expert


def plan_groups(flat: list[int], group_size: int) -> list[ExpertGroup]:
    """flat: expert id of each pair [T * n] -> groups of at most `group_size` distinct experts."""
    by_expert: dict[int, list[int]] = {}
    for position, expert in enumerate(flat):
        by_expert.setdefault(expert, []).append(position)
    experts = sorted(by_expert)
    groups = []
    for start in range(0, len(experts), group_size):
        chunk = experts[start : start + group_size]
        groups.append(ExpertGroup(chunk, [len(by_expert[e]) for e in chunk], [p for e in chunk for p in by_expert[e]]))
    return groups


class ExpertExecutor:
    """Runs a layer's chosen experts: makes them resident (via the cache), then computes them in place."""

    def __init__(self, cache: ExpertCache, act: Activation, grouped: bool | None = None) -> None:
        self.cache = cache
        self.act = act
        self.grouped = grouped_mm_works(cache, act) if grouped is None else grouped

    def run(self, layer: int, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [T, H], indices/weights: [T, n] -> sum_j weights[:, j] * expert_{indices[:, j]}(x)  [T, H]."""
        T, n = indices.shape
        flat = self.cache.transfer.to_host(indices.flatten())  # the layer's one host sync: which experts to bring
        pairs = x.new_empty(T * n, x.shape[1])  # [P, H] each pair's weighted output
        w = weights.flatten().to(x.dtype)  # [P]
        for group in plan_groups(flat, self.cache.num_slots):
            slots = self.cache.acquire(layer, group.experts)
            try:
                position = self.cache.transfer.to_device(group.positions)  # [Pg]
                y = self._compute(x[position // n], slots, group.counts)  # [Pg, H]
                pairs[position] = y * w[position, None]
            finally:
                self.cache.release(slots)
        return pairs.view(T, n, -1).sum(1)  # fixed-order combine: deterministic on every device

    def _compute(self, xs: torch.Tensor, slots: list[int], counts: list[int]) -> torch.Tensor:
        """xs: [Pg, H], rows grouped by expert (slot order as given) -> expert outputs [Pg, H]."""
        if self.grouped:
            return self._compute_grouped(xs, slots, counts)
        outs, start = [], 0
        for slot, count in zip(slots, counts):
            gate, up = F.linear(xs[start : start + count], self.cache.gate_up[slot]).chunk(2, dim=-1)
            outs.append(F.linear(self.act(gate) * up, self.cache.down[slot]))
            start += count
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _compute_grouped(self, xs: torch.Tensor, slots: list[int], counts: list[int]) -> torch.Tensor:
        """Two grouped matmuls over the whole slot pool: group s holds the rows routed to slot s (most are empty)."""
        order = sorted(range(len(slots)), key=slots.__getitem__)  # grouped_mm wants rows in slot order
        starts = [0, *accumulate(counts)]
        rows = [r for i in order for r in range(starts[i], starts[i] + counts[i])]
        transfer = self.cache.transfer
        row_index = transfer.to_device(rows)
        per_slot = torch.zeros(self.cache.num_slots, dtype=torch.int64, device=xs.device)
        per_slot[transfer.to_device([slots[i] for i in order])] = transfer.to_device([counts[i] for i in order])
        offs = per_slot.cumsum(0).to(torch.int32)  # [S] end row of each slot's group
        gate_up = torch._grouped_mm(xs[row_index], self.cache.gate_up.transpose(1, 2), offs=offs)  # [Pg, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        y = torch._grouped_mm((self.act(gate) * up).contiguous(), self.cache.down.transpose(1, 2), offs=offs)  # [Pg, H]
        return torch.empty_like(y).index_copy_(0, row_index, y)  # back to the caller's row order


def grouped_mm_works(cache: ExpertCache, act: Activation) -> bool:
    """Whether to compute with grouped matmuls: on CUDA, when a one-time probe shows they run correctly."""
    if cache.device.type != "cuda" or not hasattr(torch, "_grouped_mm") or cache.num_slots < 2:
        return False
    return grouped_matches_loop(cache.device, cache.store.dtype, act, cache.transfer)


def grouped_matches_loop(device: torch.device, dtype: torch.dtype, act: Activation, transfer: TransferEngine) -> bool:
    """Probe: grouped matmuls over a tiny random two-slot pool give the per-expert loop's result."""
    tiny = ExpertStore([0], 2, ExpertShape(hidden=PROBE_HIDDEN, intermediate=PROBE_INTERMEDIATE), dtype, pin=False)
    probe = ExpertCache(tiny, 2, device, transfer)
    probe.pool.normal_(0.0, 0.02)
    xs = torch.randn(3, PROBE_HIDDEN, dtype=dtype, device=device)
    try:
        got = ExpertExecutor(probe, act, grouped=True)._compute(xs, [1, 0], [2, 1])
    except (RuntimeError, ValueError, TypeError):  # unsupported dtype, strides or device
        return False
    want = ExpertExecutor(probe, act, grouped=False)._compute(xs, [1, 0], [2, 1])
    return bool(torch.allclose(got.float(), want.float(), rtol=2e-2, atol=1e-3))
