"""Replays an expert-access trace on a layer-by-layer timeline to predict decode tokens per second.

Compute runs each decoder layer's dense part, then waits until every expert the layer uses is on the device, then
computes them. One host->device link carries expert copies one at a time: waiting demand misses go before waiting
prefetches, but a copy already on the link is never interrupted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import groupby

from mobile_moe.bench.profiles import HardwareProfile
from mobile_moe.experts.trace import Access

Key = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class ModelCost:
    """Sizes and per-pass counts that set compute and transfer time (counts: costinputs.count_decode_ops)."""

    num_layers: int
    dense_bytes: int  # every weight kept on the device, embedding table included
    expert_bytes: int  # one routed expert, packed: one copy
    embedding_bytes: int = 0  # the token-embedding table within dense_bytes: a token reads one row (0 if tied to the LM head)
    layer_bytes: tuple[int, ...] = ()  # each decoder layer's own dense weights; () = dense minus embedding, split evenly
    # kernel launches; defaults: count_decode_ops on the olmoe-1b-7b shape on CPU (per-expert loop, no grouped matmul)
    launches_per_layer: float = 51.0  # one decoder layer's dense part (norms, attention, router, shared experts)
    launches_per_moe_layer: float = 8.0  # one MoE layer's expert computation, fixed part
    launches_per_expert: float = 4.0  # added per expert the layer uses
    launches_per_pass: float = 15.0  # outside the decoder layers (positions, embedding, final norm, LM head, sampling)
    syncs_per_moe_layer: float = 1.0  # host syncs per MoE layer (engine target: one read of the router's choice)
    syncs_per_pass: float = 1.0  # host syncs per pass outside the layers (engine target: one read of the token)
    dequant_bytes: int = 0  # device memory traffic of dequantizing one expert for compute (0: read in place)

    def layer_reads(self) -> list[int]:
        """Dense bytes each decoder layer reads per token."""
        if self.layer_bytes:
            return list(self.layer_bytes)
        return [(self.dense_bytes - self.embedding_bytes) // self.num_layers] * self.num_layers

    def tail_reads(self) -> int:
        """Dense bytes read per token after the last layer (LM head, final norm): the rest, minus the embedding table."""
        return self.dense_bytes - self.embedding_bytes - sum(self.layer_reads())


@dataclass(frozen=True)
class Prediction:
    """Predicted decode speed and where the time goes."""

    tok_s: float
    decode_s: float
    stall_s: float
    h2d_gb: float
    steps: int


@dataclass
class Copy:
    """One expert copy on the link."""

    issued: float
    demand: bool
    seq: int
    done: float | None = None


class Link:
    """The host->device link: one copy at a time; a free link takes the oldest waiting demand copy, else the oldest prefetch."""

    def __init__(self, copy_s: float) -> None:
        self.copy_s, self.free, self.waiting, self.count = copy_s, 0.0, [], 0

    def issue(self, at: float, demand: bool) -> Copy:
        """Queue a copy issued at time `at`."""
        copy = Copy(at, demand, self.count)
        self.count += 1
        self.waiting.append(copy)
        return copy

    def arrival(self, copy: Copy) -> float:
        """Run the link until `copy` is done; its arrival time."""
        while copy.done is None:
            now = max(self.free, min(c.issued for c in self.waiting))
            nxt = min((c for c in self.waiting if c.issued <= now), key=lambda c: (not c.demand, c.seq))
            self.waiting.remove(nxt)
            nxt.done = self.free = now + self.copy_s
        return copy.done


class _Timeline:
    """The compute clock, the replayed cache and the link, carried from pass to pass."""

    def __init__(self, cost: ModelCost, hw: HardwareProfile, slots: int) -> None:
        mem, launch, sync = hw.mem_gbps * 1e9, hw.launch_us * 1e-6, hw.sync_us * 1e-6
        self.layer_s = [b / mem + cost.launches_per_layer * launch for b in cost.layer_reads()]
        self.router_sync_s = cost.syncs_per_moe_layer * sync
        self.expert_s = (cost.expert_bytes + cost.dequant_bytes) / mem + cost.launches_per_expert * launch
        self.moe_s = cost.launches_per_moe_layer * launch
        self.tail_s = cost.tail_reads() / mem + cost.launches_per_pass * launch + cost.syncs_per_pass * sync
        self.link = Link(cost.expert_bytes / (hw.link_gbps * 1e9) + hw.copy_latency_us * 1e-6)
        self.slots, self.expert_bytes, self.clock, self.moved = slots, cost.expert_bytes, 0.0, 0
        self.cache: OrderedDict[Key, Copy] = OrderedDict()  # LRU order; each resident expert's (maybe pending) copy

    def request(self, a: Access, at: float) -> Copy:
        """Replay one access at time `at` on the LRU cache (a miss issues a copy); the expert's copy."""
        key = (a.layer, a.expert)
        if key in self.cache:
            if a.kind == "demand":  # a prefetch of a resident expert does nothing, not even touch it
                self.cache.move_to_end(key)
            return self.cache[key]  # a prefetch still queued stays a prefetch: the engine waits on that copy
        if len(self.cache) >= self.slots:
            self.cache.popitem(last=False)
        self.moved += self.expert_bytes
        self.cache[key] = self.link.issue(at, a.kind == "demand")
        return self.cache[key]

    def run_pass(self, early: list[Access], body: list[Access]) -> tuple[float, float, int]:
        """(seconds, stall seconds, bytes moved) of one pass; `early` prefetches are issued at its start."""
        start = t = self.clock
        moved, stall = self.moved, 0.0
        for a in early:
            self.request(a, t)
        by_layer = _issue_layers(body)
        for layer, dense_s in enumerate(self.layer_s):
            issued = by_layer.get(layer, [])
            used = len({a.expert for a in issued if a.kind == "demand"})
            t += dense_s + (self.router_sync_s if used else 0.0)  # the router has run: misses and lookahead issue now
            copies = [(a, self.request(a, t)) for a in issued]
            if used:
                ready = max(t, *(self.link.arrival(c) for a, c in copies if a.kind == "demand"))
                stall, t = stall + ready - t, ready + self.moe_s + used * self.expert_s
        self.clock = t + self.tail_s
        return self.clock - start, stall, self.moved - moved


def _issue_layers(body: list[Access]) -> dict[int, list[Access]]:
    """Accesses grouped by the layer whose router issues them: a demand by its own layer, a prefetch by the next demand's."""
    groups: dict[int, list[Access]] = {}
    waiting: list[Access] = []
    for a in body:
        waiting.append(a)
        if a.kind == "demand":
            groups.setdefault(a.layer, []).extend(waiting)
            waiting = []
    return groups


def predict(trace: list[Access], cost: ModelCost, hw: HardwareProfile, slots: int) -> Prediction:
    """Replay every pass on one timeline (prefills warm the cache, untimed); decode passes (step > 0) are timed.

    A decode step is one token: its little pass and, after a fallback, its big pass share the step number (exact mode's
    steps whose tokens big takes back emit none: its speed is its tokens over `decode_s`, `drafts.replayed_tok_s`). Prefetches
    recorded after a pass's last demand (fallback prefetches) are issued at the start of the next pass.
    """
    if any(a.layer >= cost.num_layers for a in trace):
        raise ValueError(f"trace has layers beyond the cost model's {cost.num_layers}")
    line = _Timeline(cost, hw, slots)
    total = stall = 0.0
    moved = steps = previous_step = 0
    carried: list[Access] = []
    for _, group in groupby(trace, key=lambda a: a.pass_id):
        accesses = list(group)
        last = max((i for i, a in enumerate(accesses) if a.kind == "demand"), default=-1)
        if last < 0:
            carried += accesses
            continue
        seconds, waited, nbytes = line.run_pass(carried, accesses[: last + 1])
        carried = accesses[last + 1 :]
        step = accesses[last].step
        if step > 0:
            total, stall, moved = total + seconds, stall + waited, moved + nbytes
            steps += step != previous_step
        previous_step = step
    return Prediction(tok_s=steps / total if total else 0.0, decode_s=total, stall_s=stall, h2d_gb=moved / 1e9, steps=steps)
