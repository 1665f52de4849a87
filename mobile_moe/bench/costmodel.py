"""Replays an expert-access trace under a hardware profile and cache size to predict decode tokens per second."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import groupby

from mobile_moe.bench.profiles import HardwareProfile
from mobile_moe.experts.trace import Access


@dataclass(frozen=True)
class ModelCost:
    """Sizes that set compute and transfer time."""

    num_layers: int
    dense_bytes: int  # all weights kept on the device (read once per pass)
    expert_bytes: int


@dataclass(frozen=True)
class Prediction:
    """Predicted decode speed and where the time goes."""

    tok_s: float
    decode_s: float
    stall_s: float
    h2d_gb: float
    steps: int


class _LRU:
    """The cache replayed with a given number of slots."""

    def __init__(self, slots: int) -> None:
        self.slots, self.keys = slots, OrderedDict()

    def access(self, key: tuple[int, int]) -> bool:
        """True on a hit; a miss inserts the key, evicting the least recent."""
        if key in self.keys:
            self.keys.move_to_end(key)
            return True
        if len(self.keys) >= self.slots:
            self.keys.popitem(last=False)
        self.keys[key] = None
        return False


def pass_time(accesses: list[Access], cache: _LRU, cost: ModelCost, hw: HardwareProfile) -> tuple[float, float, int]:
    """(seconds, stall seconds, bytes moved) of one forward pass.

    Compute = every layer's dense part (weights read from device memory + fixed launch cost) plus one batched
    expert call per MoE layer. On-demand misses stall compute for their whole copy; prefetched copies run in
    the background and stall only by what exceeds the pass's compute time.
    """
    link = hw.link_gbps * 1e9
    compute = cost.dense_bytes / (hw.mem_gbps * 1e9) + cost.num_layers * hw.layer_overhead_us * 1e-6
    layers = {a.layer for a in accesses if a.kind == "demand"}
    demand = [a for a in accesses if a.kind == "demand"]
    compute += len(layers) * hw.expert_call_us * 1e-6 + len(demand) * cost.expert_bytes / (hw.mem_gbps * 1e9)
    demand_bytes = background_bytes = 0
    for a in accesses:
        hit = cache.access((a.layer, a.expert))
        if not hit:
            if a.kind == "prefetch":
                background_bytes += cost.expert_bytes
            else:
                demand_bytes += cost.expert_bytes
    stall = demand_bytes / link + max(0.0, background_bytes / link - compute)
    return compute + stall, stall, demand_bytes + background_bytes


def predict(trace: list[Access], cost: ModelCost, hw: HardwareProfile, slots: int) -> Prediction:
    """Replay every pass (prefills warm the replayed cache); decode passes (step > 0) are timed.

    A decode step is one token: its little pass and, after a fallback, its big pass share the step number.
    """
    cache = _LRU(slots)
    total = stall = 0.0
    moved = steps = 0
    previous_step = 0
    carried: list[Access] = []  # fallback prefetches, issued after a pass, overlap the next one
    for _, group in groupby(trace, key=lambda a: a.pass_id):
        accesses = list(group)
        last_demand = max((i for i, a in enumerate(accesses) if a.kind == "demand"), default=-1)
        accesses, trailing = carried + accesses[: last_demand + 1], accesses[last_demand + 1 :]
        carried = trailing
        if not any(a.kind == "demand" for a in accesses):
            carried = accesses + carried
            continue
        seconds, waited, nbytes = pass_time(accesses, cache, cost, hw)
        step = accesses[-1].step
        if step > 0:
            total, stall, moved = total + seconds, stall + waited, moved + nbytes
            steps += step != previous_step
        previous_step = step
    return Prediction(tok_s=steps / total if total else 0.0, decode_s=total, stall_s=stall, h2d_gb=moved / 1e9, steps=steps)
