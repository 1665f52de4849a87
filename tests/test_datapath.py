"""The data path below the model: exact pinned host memory, copy ordering, O(1) slot choice, in-place expert compute."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mobile_moe.experts.cache import ExpertCache
from mobile_moe.experts.eviction import make_eviction
from mobile_moe.experts.executor import ExpertExecutor, grouped_matches_loop, grouped_mm_works, plan_groups
from mobile_moe.experts.host_memory import PAGE, allocate_host
from mobile_moe.experts.store import ExpertShape, ExpertStore
from mobile_moe.experts.transfer import IndexRing, Ticket, TransferEngine

SHAPE = ExpertShape(hidden=8, intermediate=4)


class FakePinner:
    """Records what would be registered with the CUDA runtime, and what was unpinned."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.pinned, self.unpinned = fail, [], []

    def __call__(self, address: int, nbytes: int):
        if self.fail:
            raise RuntimeError("cudaHostRegister returned CUDA error 2")
        self.pinned.append((address, nbytes))
        return lambda: self.unpinned.append(address)


def filled_store(layers: int = 2, experts: int = 6, pinner=None) -> ExpertStore:
    """A store whose every value names its layer and expert."""
    store = ExpertStore(list(range(layers)), experts, SHAPE, torch.float32, pin=pinner is not None, pinner=pinner or FakePinner())
    for layer in store.layers:
        for matrix in ("gate_up", "down"):
            store.fields[layer][matrix][0].copy_((torch.arange(experts, dtype=torch.float32) + 100 * layer)[:, None, None])
    return store


def test_store_pins_exactly_the_experts_bytes_in_one_page_aligned_block():
    pinner = FakePinner()
    store = filled_store(layers=3, experts=5, pinner=pinner)
    expert_bytes = 3 * 8 * 4 * 4
    assert store.pinned_bytes == 3 * 5 * expert_bytes  # not rounded up to a power of two
    assert pinner.pinned == [(store.host.data.data_ptr(), 3 * 5 * expert_bytes)]
    assert store.host.data.data_ptr() % PAGE == 0
    assert torch.equal(store.buffer(2, 4).view(torch.float32), torch.full((SHAPE.numel,), 204.0))  # layer views carve the one block
    del store
    assert len(pinner.unpinned) == 1


class Records(logging.Handler):
    """Collects the engine's log records."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_pinning_failure_falls_back_to_pageable_memory_with_one_warning():
    log, seen = logging.getLogger("mobile_moe"), Records()
    log.addHandler(seen)
    try:
        store = filled_store(pinner=FakePinner(fail=True))
    finally:
        log.removeHandler(seen)
    assert store.pinned_bytes == 0
    assert torch.equal(store.buffer(1, 2).view(torch.float32), torch.full((SHAPE.numel,), 102.0))
    assert len(seen.records) == 1 and "pageable" in seen.records[0].getMessage()


def test_unpinned_allocation_registers_nothing():
    pinner = FakePinner()
    buffer = allocate_host(10_000, pin=False, pinner=pinner)
    assert buffer.pinned_bytes == 0 and not pinner.pinned and buffer.data.numel() == 10_000


@dataclass
class FakeTransfer(TransferEngine):
    """Records every copy (stream, destination slot, what it waits for) instead of running streams."""

    pool_ptr: int = 0
    slot_bytes: int = 1
    log: list[tuple[str, int, tuple]] = field(default_factory=list)
    fences: int = 0

    def __post_init__(self) -> None:
        super().__init__(torch.device("cpu"))

    def load(self, dst, src, prefetch, after=()):
        ticket = super().load(dst, src, prefetch, after)
        slot = (dst.data_ptr() - self.pool_ptr) // self.slot_bytes
        self.log.append(("prefetch" if prefetch else "demand", slot, tuple(d for d in after if d is not None)))
        return Ticket(event=f"copy{len(self.log)}", nbytes=ticket.nbytes)  # stays "in flight" until waited on

    def wait(self, ticket):
        ticket.event = None

    def reader_fence(self):
        self.fences += 1
        return f"read{self.fences}"


def fake_cache(slots: int) -> ExpertCache:
    transfer = FakeTransfer()
    cache = ExpertCache(filled_store(), slots, torch.device("cpu"), transfer)
    transfer.pool_ptr, transfer.slot_bytes = cache.pool.data_ptr(), cache.pool[0].numel()
    return cache


def test_demand_loads_use_their_own_stream_and_copies_wait_only_for_their_slot():
    cache = fake_cache(3)
    log = cache.transfer.log
    cache.release(cache.acquire(0, [0, 1]))  # both slots read, then fenced by "read1"
    assert [(stream, deps) for stream, _, deps in log] == [("demand", ()), ("demand", ())]
    cache.prefetch(1, [4, 5])  # slot 2 is free; then the oldest (layer 0, expert 0) is evicted
    assert log[2] == ("prefetch", 2, ())
    assert log[3][0] == "prefetch" and log[3][2] == ("read1",)  # waits for the slot's last reader, not all compute
    queued = cache.slots[log[3][1]].ticket
    cache.release(cache.acquire(1, [3]))  # a demand miss after queued prefetches evicts the oldest unpinned slot
    stream, slot, deps = log[4]
    assert stream == "demand"
    old_write = [d for d in deps if isinstance(d, Ticket)]
    assert all(t is queued for t in old_write)  # only a copy still writing the same slot can hold it back
    assert (1, 3) in cache.where and cache.where[(1, 3)] == slot


def test_overwriting_a_slot_whose_prefetch_is_still_in_flight_waits_for_that_copy():
    cache = fake_cache(2)
    cache.prefetch(0, [0, 1])  # two copies in flight, never waited on
    first = cache.slots[cache.where[(0, 0)]].ticket
    cache.release(cache.acquire(0, [2]))  # evicts (0, 0) while its copy has not been consumed
    assert cache.transfer.log[-1][2] == (first,)


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_choosing_a_victim_among_10000_slots_looks_at_few_keys(eviction):
    store = ExpertStore([0], 12_000, ExpertShape(hidden=1, intermediate=1), torch.float32, pin=False)
    cache = ExpertCache(store, 10_000, torch.device("cpu"), TransferEngine(torch.device("cpu")), eviction)
    for start in range(0, 10_000, 100):
        cache.release(cache.acquire(0, list(range(start, start + 100))))
    cache.release(cache.acquire(0, [0, 1, 2]))  # touched again: no longer the first victims
    pinned = cache.acquire(0, [5, 6, 7, 8])
    scanned, misses = cache.eviction.scanned, 0
    for expert in range(10_000, 11_000):
        cache.release(cache.acquire(0, [expert]))
        misses += 1
    assert cache.eviction.scanned - scanned <= misses * 2 + len(pinned)  # O(1) per miss, not O(slots)
    assert all((0, e) in cache.where for e in (0, 1, 2, 5, 6, 7, 8))
    cache.release(pinned)


def test_lfu_buckets_keep_least_used_first_and_recency_among_equals():
    policy = make_eviction("lfu")
    for key in "abc":
        policy.inserted(key)
    policy.touched("a"), policy.touched("a"), policy.touched("b")
    assert policy.victim(lambda k: True) == "c"
    policy.removed("c")
    assert policy.victim(lambda k: True) == "b"
    assert policy.victim(lambda k: k != "b") == "a"
    assert policy.victim(lambda k: False) is None


def test_pairs_are_planned_per_expert_in_groups_that_fit_the_cache():
    groups = plan_groups([3, 1, 1, 2, 3, 0], group_size=2)
    assert [(g.experts, g.counts, g.positions) for g in groups] == [([0, 1], [1, 2], [5, 1, 2]), ([2, 3], [1, 2], [3, 0, 4])]


class LargestOutput(TorchDispatchMode):
    """Tracks the largest new tensor any dispatched op produced (views and in-place results share an input's storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in [*args, *(kwargs or {}).values()] if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def reference_moe(cache: ExpertCache, x, indices, weights):
    """sum_j w[t, j] * expert_{indices[t, j]}(x[t]) straight from the store, in rank order."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            gate_up, down = (cache.store.fields[0][m][0][e] for m in ("gate_up", "down"))  # [2I, H], [H, I]
            gate, up = (gate_up @ x[t]).chunk(2)
            out[t] += weights[t, j] * (down @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("tokens", [1, 5])
def test_experts_are_computed_in_place_and_combined_in_a_fixed_order(grouped, tokens):
    store = ExpertStore([0], 8, ExpertShape(hidden=16, intermediate=8), torch.float32, pin=False)
    for matrix in ("gate_up", "down"):
        store.fields[0][matrix][0].normal_(generator=torch.Generator().manual_seed(0))
    cache = ExpertCache(store, 5, torch.device("cpu"), TransferEngine(torch.device("cpu")))
    executor = ExpertExecutor(cache, torch.nn.functional.silu, torch.float32, grouped=grouped)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, 16, generator=gen)
    indices = torch.stack([torch.randperm(8, generator=gen)[:3] for _ in range(tokens)])
    weights = torch.rand(tokens, 3, generator=gen)
    with LargestOutput() as watch:
        got = executor.run(0, x, indices, weights)
    torch.testing.assert_close(got, reference_moe(cache, x, indices, weights), rtol=1e-5, atol=1e-5)
    assert watch.largest < 2 * 16 * 8  # gate_up's elements: no op materialised a copy of any expert's weights
    assert torch.equal(executor.run(0, x, indices, weights), got)
    assert cache.transfer.host_syncs == 2  # one read of the routing per layer call


def test_grouped_matmul_probe_runs_and_is_used_only_on_cuda():
    cpu = torch.device("cpu")
    assert grouped_matches_loop(cpu, torch.float32, torch.nn.functional.silu, TransferEngine(cpu))
    assert not grouped_mm_works(fake_cache(3), torch.nn.functional.silu, torch.float32)  # CPU keeps the per-expert loop


@pytest.mark.parametrize("grouped", [False, True])
def test_biased_experts_with_the_clamped_swiglu_match_the_gpt_oss_formula(grouped):
    from mobile_moe.layers.mlp import ClampedSwiGLU

    store = ExpertStore([0], 6, ExpertShape(hidden=16, intermediate=8, bias=True), torch.float32, pin=False)
    gen = torch.Generator().manual_seed(2)
    for matrix in ("gate_up", "down"):
        for part in store.fields[0][matrix]:  # weight, then bias
            part.normal_(generator=gen)
    cache = ExpertCache(store, 4, torch.device("cpu"), TransferEngine(torch.device("cpu")))
    act = ClampedSwiGLU(alpha=1.702, limit=1.5)
    x = torch.randn(5, 16, generator=gen)
    indices = torch.stack([torch.randperm(6, generator=gen)[:3] for _ in range(5)])
    weights = torch.rand(5, 3, generator=gen)
    got = ExpertExecutor(cache, act, torch.float32, grouped=grouped).run(0, x, indices, weights)
    want = torch.zeros_like(x)
    (gu_w, gu_b), (d_w, d_b) = (store.fields[0][m] for m in ("gate_up", "down"))
    for t in range(5):
        for j in range(3):
            e = int(indices[t, j])
            gate, up = (gu_w[e] @ x[t] + gu_b[e]).chunk(2)
            gate, up = gate.clamp(max=1.5), up.clamp(-1.5, 1.5)
            want[t] += weights[t, j] * (d_w[e] @ ((up + 1) * gate * torch.sigmoid(1.702 * gate)) + d_b[e])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class FakeFence:
    """A copy's fence that has passed once `done` (waiting for it makes it so)."""

    def __init__(self, done: bool) -> None:
        self.done, self.waited = done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited, self.done = True, True


def test_the_index_ring_rewrites_a_chunk_only_after_the_copy_that_read_it():
    ring = IndexRing(10, pin=False)
    first = ring.stage([1, 2, 3])
    ring.fenced(slow := FakeFence(done=False))
    second = ring.stage([4, 5, 6])
    ring.fenced(FakeFence(done=True))
    assert first.tolist() == [1, 2, 3] and second.tolist() == [4, 5, 6]  # consecutive chunks of one buffer
    assert second.data_ptr() == first.data_ptr() + 3 * 8
    ring.stage([7])
    ring.fenced(FakeFence(done=True))
    assert not slow.waited and ring.waits == 0
    wrapped = ring.stage([8, 9, 10, 11])  # does not fit the 3 values left: back to the start, over the first chunk
    assert wrapped.data_ptr() == first.data_ptr() and wrapped.tolist() == [8, 9, 10, 11]
    assert slow.waited and ring.waits == 1  # the first chunk's copy had not finished: waited for, once
    assert ring.stage(list(range(11))) is None  # larger than the ring: staged elsewhere
