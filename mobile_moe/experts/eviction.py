"""Eviction policies for the expert cache: which unpinned resident expert makes room."""

from __future__ import annotations

import bisect
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Protocol


class EvictionPolicy(Protocol):
    """Tracks resident keys and picks a victim; `scanned` counts keys examined while choosing victims."""

    scanned: int

    def inserted(self, key: Hashable) -> None:
        """A key became resident."""
        ...

    def touched(self, key: Hashable) -> None:
        """A resident key was used."""
        ...

    def removed(self, key: Hashable) -> None:
        """A key left the cache."""
        ...

    def victim(self, evictable: Callable[[Hashable], bool]) -> Hashable | None:
        """The key to evict among those `evictable` accepts, or None when there is none."""
        ...


def _first(keys: Iterable[Hashable], evictable: Callable[[Hashable], bool], policy: LFU) -> Hashable | None:
    """The first evictable key in `keys`, counting every key examined on the policy."""
    for key in keys:
        policy.scanned += 1
        if evictable(key):
            return key
    return None


class LRU:
    """Least recently used first; in-use keys were just touched, so the scan from the oldest end stops at once."""

    def __init__(self) -> None:
        self.order: OrderedDict[Hashable, None] = OrderedDict()
        self.scanned = 0

    def inserted(self, key: Hashable) -> None:
        """New keys are the most recent."""
        self.order[key] = None

    def touched(self, key: Hashable) -> None:
        """Move to most recent."""
        self.order.move_to_end(key)

    def removed(self, key: Hashable) -> None:
        """Forget the key."""
        del self.order[key]

    def victim(self, evictable: Callable[[Hashable], bool]) -> Hashable | None:
        """Oldest evictable key."""
        for key in self.order:
            self.scanned += 1
            if evictable(key):
                return key
        return None


class LFU:
    """Least frequently used first (counts survive eviction); ties go to the least recent.

    Keys live in buckets by use count, each bucket in recency order, and the counts that have a non-empty
    bucket are kept sorted, so a victim is found without looking at every resident key.
    """

    def __init__(self) -> None:
        self.counts: Counter[Hashable] = Counter()
        self.buckets: dict[int, OrderedDict[Hashable, None]] = {}
        self.levels: list[int] = []  # sorted counts with a non-empty bucket
        self.scanned = 0

    def inserted(self, key: Hashable) -> None:
        """Count the load as a use."""
        self.counts[key] += 1
        self._enter(key)

    def touched(self, key: Hashable) -> None:
        """Count a use."""
        self._leave(key)
        self.counts[key] += 1
        self._enter(key)

    def removed(self, key: Hashable) -> None:
        """Keep the count, leave the buckets."""
        self._leave(key)

    def victim(self, evictable: Callable[[Hashable], bool]) -> Hashable | None:
        """Fewest uses, oldest first among equals."""
        for level in self.levels:
            key = _first(self.buckets[level], evictable, self)
            if key is not None:
                return key
        return None

    def _enter(self, key: Hashable) -> None:
        """Add a key to the bucket of its count."""
        level = self.counts[key]
        if level not in self.buckets:
            self.buckets[level] = OrderedDict()
            bisect.insort(self.levels, level)
        self.buckets[level][key] = None

    def _leave(self, key: Hashable) -> None:
        """Remove a key from the bucket of its count."""
        level = self.counts[key]
        bucket = self.buckets[level]
        del bucket[key]
        if not bucket:
            del self.buckets[level]
            self.levels.pop(bisect.bisect_left(self.levels, level))


def make_eviction(name: str) -> EvictionPolicy:
    """Eviction policy by name."""
    return {"lru": LRU, "lfu": LFU}[name]()
