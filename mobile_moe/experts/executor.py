"""Routed-expert computation straight out of the device cache: no weight copies, one host sync per layer.

The layer's (token, expert) pairs are planned on the host from one read of the router's choice. Cached
experts in the compute dtype are read in place, either by one grouped matmul over the whole slot pool
(`torch._grouped_mm`, where the device runs it correctly: probed once) or by a short loop of per-expert
matmuls; quantized experts go through their format's matmul in that loop: a fused weight-only kernel for decode
rows where the store was repacked for one (experts/kernels.py), else dequantize-then-matmul. Pair outputs are
combined by a weighted sum in a fixed order, so results do not depend on atomics.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from mobile_moe.errors import InvalidParameter
from mobile_moe.experts.cache import ExpertCache
from mobile_moe.experts.dispatch import combine, expert_output, pool_experts, split_bias, tiled_experts
from mobile_moe.experts.formats import ExpertFormat, FloatFormat, Mxfp4Format
from mobile_moe.experts.kernels import CudaInt4, FusedFormat, TiledFormat
from mobile_moe.experts.store import MATRICES, ExpertShape, ExpertStore
from mobile_moe.experts.transfer import TransferEngine
from mobile_moe.layers.mlp import Activation, gated

PROBE_HIDDEN, PROBE_INTERMEDIATE = 256, 128  # the grouped-matmul probe's expert: tiny, but aligned like real ones


@dataclass(frozen=True)
class ExpertGroup:
    """Experts computed together (they fit the cache at once) and their pairs, grouped by expert."""

    experts: list[int]  # ascending
    counts: list[int]  # pairs routed to each expert
    positions: list[int]  # flat pair positions (token * n + rank), expert by expert


def plan_groups(flat: list[int], group_size: int) -> list[ExpertGroup]:
    """flat: expert id of each pair [T * n] (-1: skip the pair) -> groups of at most `group_size` distinct experts."""
    if len(flat) <= group_size and len(set(flat)) == len(flat) and min(flat) >= 0:  # one token's distinct experts (decode): one group
        order = sorted(range(len(flat)), key=flat.__getitem__)
        return [ExpertGroup([flat[p] for p in order], [1] * len(flat), order)]
    by_expert: dict[int, list[int]] = {}
    for position, expert in enumerate(flat):
        if expert >= 0:  # -1: a pair not run
            by_expert.setdefault(expert, []).append(position)
    experts = sorted(by_expert)
    groups = []
    for start in range(0, len(experts), group_size):
        chunk = experts[start : start + group_size]
        groups.append(ExpertGroup(chunk, [len(by_expert[e]) for e in chunk], [p for e in chunk for p in by_expert[e]]))
    return groups


class ExpertExecutor:
    """Runs a layer's chosen experts: makes them resident (via the cache), then computes them in place."""

    def __init__(
        self, cache: ExpertCache, act: Activation, dtype: torch.dtype, grouped: bool | None = None, compiled: bool = False, device_indexed: bool | None = None
    ) -> None:
        self.cache, self.act, self.dtype = cache, act, dtype
        self.in_place = cache.store.format.reads_in_place(dtype)
        self.bias = cache.store.shape.bias  # each matrix's last packed field is its bias [out] (gpt-oss)
        if grouped and not self.in_place:  # a pass this path cannot run is refused here, not found mid-pass
            raise InvalidParameter(f"grouped matmuls read float experts in place; {cache.store.format} experts in {dtype} go through their format's matmul")
        self.grouped = (self.in_place and grouped_mm_works(cache, act, dtype)) if grouped is None else grouped
        # compiled decode with experts read in place (a float pool): one fused call per token and layer instead of a loop
        self.pooled = torch.compile(pool_experts, fullgraph=True, dynamic=False) if compiled and self.in_place and not self.grouped else None
        # resident decode off the CPU (or captured): slots indexed on the device (a host read would stall the stream each layer)
        self.device_indexed = cache.device.type != "cpu" if device_indexed is None else device_indexed
        # per slot: (gate_up fields, down fields, gate_up bias, down bias) as views, made once (indexing the pool per call
        # costs a dispatch each); a matrix's bias, when experts have one, is its last packed field
        self.slot_fields = [self._split(tuple([f[slot] for f in cache.fields[m]] for m in MATRICES)) for slot in range(cache.num_slots)]
        # tiled int4 / int8 experts without biases: a resident token's experts in two kernel calls over the pool, not two per expert
        self.tiled = cache.store.format if isinstance(cache.store.format, TiledFormat) and not self.bias and cache.device.type == "cpu" else None
        self.pool_fields = self._pool_fields()  # what the compiled call reads, made once

    def path(self, resident: bool) -> str:
        """How routed experts are computed, chosen when this executor was built: `pooled` (one compiled call over the pool),
        `grouped` (grouped matmuls over the pool: offloaded passes, and resident ones off the CPU), else each expert through
        its format's matmul (`matmul_path`)."""
        if self.pooled is not None:
            return "pooled"
        if self.tiled is not None and resident:
            return f"tiled-{self.tiled.name}-experts"
        if self.grouped and (not resident or self.device_indexed):
            return "grouped"
        return matmul_path(self.cache.store.format, self.dtype)

    def run(self, layer: int, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [T, H], indices/weights: [T, n] -> sum_j weights[:, j] * expert_{indices[:, j]}(x)  [T, H]."""
        T, n = indices.shape
        flat = self.cache.transfer.to_host(indices.flatten())  # the layer's one host sync: which experts to bring
        if T == 1 and not self.grouped:
            return self._run_one_token(layer, x, flat, weights)
        unused = -1 in flat  # pairs marked -1 (little rows of a mixed batch) are not run and add nothing
        pairs = (x.new_zeros if unused else x.new_empty)(T * n, x.shape[1])  # [P, H] each pair's weighted output
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

    def run_resident(self, layer: int, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decode with every expert resident: the slots come from the cache's device-side expert-to-slot table by tensor
        indexing, so the host plans nothing and the cache's bookkeeping is not touched. On CPU they are read where compute
        needs them (nothing waits for that read) and results equal `run`'s bit for bit; elsewhere the experts are gathered
        on the device (`_gathered`). x: [1, H], indices/weights: [1, n]."""
        cache = self.cache
        cache.stats.hits += indices.shape[1]
        if self.pooled is not None:  # compiled: the slot ids stay on the device
            return self._pooled(x, cache.slot_rows[layer][indices[0]], weights)
        if self.device_indexed:
            slots = cache.slot_rows[layer][indices[0]]  # [n] on the device
            return self._grouped_in_place(x, slots, weights) if self.grouped else self._gathered(x, slots, weights)
        if self.tiled is not None:  # two kernel calls over the pool; each row as `_expert` computes it
            return tiled_experts(self.act, x, cache.slot_rows[layer][indices[0]], weights, *self.pool_fields)
        slots = cache.slot_rows[layer][indices[0]].tolist()  # rank order
        return combine([self._expert(x, slot) for slot in slots], weights, x.dtype)

    def _grouped_in_place(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [1, H], slots [n] on the device (rank order, distinct), weights [1, n] -> [1, H]: float experts read in place by
        two grouped matmuls over the whole pool (empty groups read nothing), their offsets built on the device: no host read
        and no copy of the weights, so a CUDA graph can hold it."""
        ordered, order = slots.sort()  # [n]: grouped_mm wants rows in slot order
        per_slot = torch.zeros(self.cache.num_slots, dtype=torch.int64, device=x.device).index_add_(0, ordered, torch.ones_like(ordered))  # [S]
        y = self._grouped_pool(x.expand(slots.shape[0], -1), per_slot, ordered if self.bias else None)  # [n, H], slot order
        return combine([torch.empty_like(y).index_copy_(0, order, y)], weights, x.dtype)  # rows back in rank order

    def _grouped_pool(self, xs: torch.Tensor, per_slot: torch.Tensor, row_slot: torch.Tensor | None) -> torch.Tensor:
        """xs: [P, H] rows in slot order, per_slot [S] rows of each slot, row_slot [P] each row's slot -> expert outputs
        [P, H]: two grouped matmuls over the whole slot pool (group s holds slot s's rows; most are empty)."""
        offs = per_slot.cumsum(0).to(torch.int32)  # [S] end row of each slot's group
        gate_up_w, down_w = self.cache.fields["gate_up"][0], self.cache.fields["down"][0]  # [S, 2I, H], [S, H, I]
        gate_up = torch._grouped_mm(xs.contiguous(), gate_up_w.transpose(1, 2), offs=offs)  # [P, 2I]
        if row_slot is not None:  # each row adds its slot's biases
            gate_up = gate_up + self.cache.fields["gate_up"][-1][row_slot].to(gate_up.dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        y = torch._grouped_mm(gated(self.act, gate, up).contiguous(), down_w.transpose(1, 2), offs=offs)  # [P, H]
        if row_slot is not None:
            y = y + self.cache.fields["down"][-1][row_slot].to(y.dtype)
        return y

    def _gathered(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [1, H], slots [n] on the device (rank order), weights [1, n] -> [1, H]: each field of the n experts gathered by
        one indexed copy, then each expert through its format's matmul; no host read, so a CUDA graph can hold it. The
        quantized formats' path: a float pool reads its experts in place (`_grouped_in_place`)."""
        gathered = {m: [f.index_select(0, slots) for f in self.cache.fields[m]] for m in MATRICES}  # [n, ...] per field
        outs = []
        for i in range(slots.shape[0]):
            gate_up, down, gate_up_b, down_b = self._split(tuple([f[i] for f in gathered[m]] for m in MATRICES))
            outs.append(expert_output(self.cache.store.format, self.act, x, gate_up, down, gate_up_b, down_b))  # [1, H]
        return combine(outs, weights, x.dtype)

    def _run_one_token(self, layer: int, x: torch.Tensor, experts: list[int], weights: torch.Tensor) -> torch.Tensor:
        """Decode: x [1, H], `experts` distinct, in rank order -> [1, H], the same fixed-order combine without index plumbing."""
        if self.pooled is not None and len(experts) <= self.cache.num_slots:  # compiled, one group: a fused call over the pool
            slots = self.cache.acquire(layer, experts)
            try:
                return self._pooled(x, self.cache.transfer.to_device(slots), weights)
            finally:
                self.cache.release(slots)
        cache = self.cache
        outs: list[torch.Tensor] = [x] * len(experts)
        for group in plan_groups(experts, cache.num_slots):
            slots = cache.acquire(layer, group.experts, wait=False)  # loads in flight: cached experts are computed meanwhile
            try:
                for i in cache.ready_first(slots):
                    cache.ready(slots[i])
                    outs[group.positions[i]] = self._expert(x, slots[i])  # [1, H]
            except BaseException:
                cache.abandon(slots)
                raise
            cache.release(slots)
        return combine(outs, weights, x.dtype)  # [n, H] -> [1, H], rank order: the same sum whatever order they were computed in

    def _pooled(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [1, H], slots [n] on the device (rank order), weights [1, n] -> [1, H], through the compiled `pool_experts`."""
        assert self.pooled is not None
        return self.pooled(self.act, x, slots, weights, *self.pool_fields)

    def _pool_fields(self) -> tuple[torch.Tensor | None, ...]:
        """A float pool's (gate_up [S, 2I, H], down [S, H, I], their biases or None), a tiled pool's (codes, scales) of gate_up
        then of down, as typed views of every slot; () for other formats."""
        if self.tiled is not None:
            return (*self.cache.fields["gate_up"], *self.cache.fields["down"])
        if not self.in_place:
            return ()
        (gate_up, *gate_up_b), (down, *down_b) = self.cache.fields["gate_up"], self.cache.fields["down"]  # weight [+ bias]
        return gate_up, down, gate_up_b[-1] if self.bias else None, down_b[-1] if self.bias else None

    def _compute(self, xs: torch.Tensor, slots: list[int], counts: list[int]) -> torch.Tensor:
        """xs: [Pg, H], rows grouped by expert (slot order as given) -> expert outputs [Pg, H]."""
        if self.grouped:
            return self._compute_grouped(xs, slots, counts)
        outs, start = [], 0
        for slot, count in zip(slots, counts):
            outs.append(self._expert(xs[start : start + count], slot))
            start += count
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _expert(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """x: [P, H] -> one cached expert's output [P, H], through its format's matmul (in place, fused kernel or dequantized)."""
        gate_up, down, gate_up_b, down_b = self.slot_fields[slot]  # fields; biases [2I], [H] or None
        return expert_output(self.cache.store.format, self.act, x, gate_up, down, gate_up_b, down_b)

    def _split(self, fields: tuple[list[torch.Tensor], list[torch.Tensor]]) -> tuple:
        """(gate_up fields, down fields) -> (weight fields, weight fields, gate_up bias or None, down bias or None)."""
        (gate_up, gate_up_b), (down, down_b) = split_bias(fields[0], self.bias), split_bias(fields[1], self.bias)
        return gate_up, down, gate_up_b, down_b

    def _compute_grouped(self, xs: torch.Tensor, slots: list[int], counts: list[int]) -> torch.Tensor:
        """Two grouped matmuls over the whole slot pool: group s holds the rows routed to slot s (most are empty)."""
        order = sorted(range(len(slots)), key=slots.__getitem__)  # grouped_mm wants rows in slot order
        starts = [0, *accumulate(counts)]
        rows = [r for i in order for r in range(starts[i], starts[i] + counts[i])]
        transfer = self.cache.transfer
        row_index = transfer.to_device(rows)  # [Pg]
        per_slot = torch.zeros(self.cache.num_slots, dtype=torch.int64, device=xs.device)
        per_slot[transfer.to_device([slots[i] for i in order])] = transfer.to_device([counts[i] for i in order])
        row_slot = transfer.to_device([slots[i] for i in order for _ in range(counts[i])]) if self.bias else None  # [Pg]
        y = self._grouped_pool(xs[row_index], per_slot, row_slot)  # [Pg, H]
        return torch.empty_like(y).index_copy_(0, row_index, y)  # back to the caller's row order


def matmul_path(fmt: ExpertFormat, dtype: torch.dtype) -> str:
    """One expert's matmul: tinygemm (CUDA int4), tiled-int4 / tiled-int8 (the project's tiled CPU kernels), cpu-int4 /
    cpu-int8 (torch's CPU weight-only kernels), mxfp4 or reference (dequantized first), in-place (float experts read where
    they are)."""
    if isinstance(fmt, CudaInt4):
        return "tinygemm"
    if isinstance(fmt, TiledFormat):
        return f"tiled-{fmt.name}"
    if isinstance(fmt, FusedFormat):
        return f"cpu-{fmt.name}"
    if isinstance(fmt, Mxfp4Format):
        return "mxfp4"
    return "in-place" if fmt.reads_in_place(dtype) else "reference"


def grouped_mm_works(cache: ExpertCache, act: Activation, dtype: torch.dtype) -> bool:
    """Whether to compute with grouped matmuls: on CUDA, when a one-time probe shows they run correctly."""
    if cache.device.type != "cuda" or not hasattr(torch, "_grouped_mm") or cache.num_slots < 2:
        return False
    return grouped_matches_loop(cache.device, dtype, act, cache.transfer)


def grouped_matches_loop(device: torch.device, dtype: torch.dtype, act: Activation, transfer: TransferEngine) -> bool:
    """Probe: grouped matmuls over a tiny random two-slot pool give the per-expert loop's result."""
    tiny = ExpertStore([0], 2, ExpertShape(hidden=PROBE_HIDDEN, intermediate=PROBE_INTERMEDIATE), FloatFormat(dtype), pin=False)
    probe = ExpertCache(tiny, 2, device, transfer)
    for field in (probe.fields["gate_up"][0], probe.fields["down"][0]):
        field.normal_(0.0, 0.02)
    xs = torch.randn(3, PROBE_HIDDEN, dtype=dtype, device=device)
    try:
        got = ExpertExecutor(probe, act, dtype, grouped=True)._compute(xs, [1, 0], [2, 1])
    except (RuntimeError, ValueError, TypeError):  # unsupported dtype, strides or device
        return False
    want = ExpertExecutor(probe, act, dtype, grouped=False)._compute(xs, [1, 0], [2, 1])
    return bool(torch.allclose(got.float(), want.float(), rtol=2e-2, atol=1e-3))
