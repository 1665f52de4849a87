"""Eviction policies for the expert cache: which unpinned resident expert makes room."""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from typing import Hashable, Protocol


class EvictionPolicy(Protocol):
    """Tracks resident keys and picks a victim among the evictable ones."""

    def inserted(self, key: Hashable) -> None:
        """A key became resident."""
        ...

    def touched(self, key: Hashable) -> None:
        """A resident key was used."""
        ...

    def removed(self, key: Hashable) -> None:
        """A key left the cache."""
        ...

    def victim(self, evictable: Iterable[Hashable]) -> Hashable:
        """The key to evict among those allowed."""
        ...


class LRU:
    """Least recently used first."""

    def __init__(self) -> None:
        self.order: OrderedDict[Hashable, None] = OrderedDict()

    def inserted(self, key: Hashable) -> None:
        """New keys are the most recent."""
        self.order[key] = None

    def touched(self, key: Hashable) -> None:
        """Move to most recent."""
        self.order.move_to_end(key)

    def removed(self, key: Hashable) -> None:
        """Forget the key."""
        del self.order[key]

    def victim(self, evictable: Iterable[Hashable]) -> Hashable:
        """Oldest evictable key."""
        allowed = set(evictable)
        return next(k for k in self.order if k in allowed)


class LFU:
    """Least frequently used first (counts survive eviction); ties go to the least recent."""

    def __init__(self) -> None:
        self.counts: Counter[Hashable] = Counter()
        self.recency = LRU()

    def inserted(self, key: Hashable) -> None:
        """Count the load as a use."""
        self.counts[key] += 1
        self.recency.inserted(key)

    def touched(self, key: Hashable) -> None:
        """Count a use."""
        self.counts[key] += 1
        self.recency.touched(key)

    def removed(self, key: Hashable) -> None:
        """Keep the count, drop recency."""
        self.recency.removed(key)

    def victim(self, evictable: Iterable[Hashable]) -> Hashable:
        """Fewest uses, oldest first among equals."""
        allowed = set(evictable)
        rank = {k: i for i, k in enumerate(self.recency.order) if k in allowed}
        return min(rank, key=lambda k: (self.counts[k], rank[k]))


def make_eviction(name: str) -> EvictionPolicy:
    """Eviction policy by name."""
    return {"lru": LRU, "lfu": LFU}[name]()
