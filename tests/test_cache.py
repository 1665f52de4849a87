"""Expert cache: eviction order, pinning, counters, and bytes that really moved."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import open_llm

from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.errors import CacheTooSmall
from mobile_moe.experts.cache import ExpertCache
from mobile_moe.experts.store import ExpertShape, ExpertStore
from mobile_moe.experts.transfer import TransferEngine


def make_cache(slots: int, eviction: str = "lru", experts: int = 6) -> ExpertCache:
    store = ExpertStore([0, 1], experts, ExpertShape(hidden=4, intermediate=3), torch.float32, pin=False)
    for layer in (0, 1):
        for e in range(experts):
            for part in ("gate", "up", "down"):
                shape = store.shape.part_shape(part)
                store.put(layer, e, part, torch.full(shape, 100.0 * layer + e))
    return ExpertCache(store, slots, torch.device("cpu"), TransferEngine(torch.device("cpu")), eviction)


def use(cache: ExpertCache, layer: int, *experts: int) -> list[int]:
    slots = cache.acquire(layer, list(experts))
    cache.release(slots)
    return slots


def resident(cache: ExpertCache) -> set[tuple[int, int]]:
    return set(cache.where)


def test_lru_evicts_least_recently_used():
    cache = make_cache(3)
    use(cache, 0, 0), use(cache, 0, 1), use(cache, 0, 2)
    use(cache, 0, 0)  # 1 is now the oldest
    use(cache, 0, 3)
    assert resident(cache) == {(0, 0), (0, 2), (0, 3)}
    use(cache, 1, 0)  # evicts 2
    assert resident(cache) == {(0, 0), (0, 3), (1, 0)}


def test_lfu_evicts_least_frequently_used():
    cache = make_cache(2, "lfu")
    for _ in range(3):
        use(cache, 0, 0)
    use(cache, 0, 1)
    use(cache, 0, 2)  # 1 used once, 0 three times
    assert resident(cache) == {(0, 0), (0, 2)}


def test_pinned_expert_is_never_evicted():
    cache = make_cache(2)
    pinned = cache.acquire(0, [0])  # oldest, but in use
    use(cache, 0, 1)
    use(cache, 0, 2)
    assert (0, 0) in resident(cache) and (0, 2) in resident(cache)
    held = cache.acquire(0, [3])
    with pytest.raises(CacheTooSmall):
        cache.acquire(0, [4])  # both slots pinned
    cache.release(pinned + held)
    use(cache, 0, 4)


def test_request_larger_than_cache_is_refused():
    with pytest.raises(CacheTooSmall, match="2 slots"):
        make_cache(2).acquire(0, [0, 1, 2])


def test_hits_misses_and_bytes_match_what_was_copied():
    cache = make_cache(3)
    use(cache, 0, 0, 1)
    use(cache, 0, 1, 2)
    use(cache, 1, 0)  # evicts (0, 0)
    use(cache, 0, 0)  # miss again
    s = cache.stats
    assert (s.hits, s.misses, s.evictions) == (1, 5, 2)
    assert s.h2d_bytes == cache.transfer.bytes_copied == 5 * cache.store.expert_bytes
    assert cache.transfer.copies == 5
    for (layer, expert), slot in cache.where.items():  # the copied bytes are the expert's own
        assert torch.equal(cache.pool[slot], cache.store.buffer(layer, expert))
        assert torch.all(cache.fields["gate_up"][0][slot] == 100.0 * layer + expert)


def test_prefetch_loads_without_pinning_and_turns_misses_into_hits():
    cache = make_cache(3)
    assert cache.prefetch(1, [4, 5]) == 2
    assert cache.stats.prefetched == 2 and all(s.pins == 0 for s in cache.slots)
    use(cache, 1, 4, 5)
    assert cache.stats.hits == 2 and cache.stats.misses == 0


def test_prefetch_stops_when_every_slot_is_pinned():
    cache = make_cache(2)
    held = cache.acquire(0, [0, 1])
    assert cache.prefetch(1, [2, 3]) == 0
    assert set(cache.where) == {(0, 0), (0, 1)}
    cache.release(held)


def test_lookahead_precision_counts_guesses_the_layer_then_used():
    from mobile_moe.experts.reader import Priority

    cache = make_cache(4)
    assert cache.prefetch(0, [1, 2], Priority.LOOKAHEAD) == 2
    cache.prefetch(0, [3])  # a fallback prefetch is not a guess
    cache.release(cache.acquire(0, [1, 3]))
    cache.release(cache.acquire(0, [1]))  # asked twice: counted once
    assert (cache.stats.lookahead_issued, cache.stats.lookahead_used) == (2, 1)


def test_reset_cache_frees_the_old_slot_pool_at_once(checkpoints):
    """A new cache never waits for the garbage collector to drop the old pool (two pools may not fit)."""
    llm = open_llm(checkpoints["qwen3_moe"], expert_cache=4)
    llm.generate([3, 4, 5], SamplingParams(max_new_tokens=3), PolicyConfig("mobile", tau=0.9, criterion="max_prob"))
    old, passes = weakref.ref(llm.cache.pool), []
    collecting = lambda phase, info: passes.append(phase)  # noqa: E731
    gc.disable()
    gc.callbacks.append(collecting)
    try:
        llm.reset_cache(6)
    finally:
        gc.callbacks.remove(collecting)
        gc.enable()
    assert old() is None and passes == [] and llm.cache.num_slots == 6  # freed by reference counting alone


class CountingTransfer(TransferEngine):
    """A CPU transfer engine that counts waits for every copy in flight."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.synchronized = 0

    def synchronize(self) -> None:
        self.synchronized += 1


def test_closing_a_cache_waits_for_every_copy_into_its_slots():
    """On CUDA a copy on a side stream is not ordered before the next allocation: a dropped pool's memory could be handed
    out while a prefetch still writes into it. reset_cache closes the old cache first."""
    cache = make_cache(4)
    transfer = CountingTransfer()
    cache.transfer = transfer
    cache.prefetch(0, [1, 2])
    cache.close()
    assert transfer.synchronized == 1
