"""Whether little still pays at a batch size: a decision from measured step costs (decisions only, no model code).

At batch B the union of the rows' little halves approaches the union of their full top-k, and one fallback row
makes the step two passes. So, per batch-size bucket, the governor keeps running means of the seconds a step took
when the mobile rows decoded little first (fallback sub-batch included) and when they ran big, tries each side
when it has no figure (and big again every `explore_every` mobile steps, since costs drift with the cache and the
rows' lengths), and otherwise picks the cheaper one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SMOOTHING = 0.2  # weight of a new measurement in a running mean


def bucket(batch: int) -> int:
    """Batch sizes measured together: 2, 3-4, 5-8, ... (the next power of two)."""
    return 1 << max(batch - 1, 0).bit_length()


@dataclass
class LittleGovernor:
    """Per step of a batch with mobile rows: decode them little first (True) or big (False)."""

    enabled: bool = True  # False: always little first, as a single stream does
    explore_every: int = 64
    seconds: dict[tuple[int, bool], float] = field(default_factory=dict)  # (bucket, little first) -> mean step seconds
    since_big: dict[int, int] = field(default_factory=dict)  # bucket -> little-first steps since big was last measured
    little_steps: int = 0  # steps decided little first (batches of 2+ with mobile rows)
    big_steps: int = 0  # steps decided big

    def little_pays(self, batch: int) -> bool:
        """The decision for a step of `batch` rows (a single row always decodes little first)."""
        if not self.enabled or batch < 2:
            return True
        b = bucket(batch)
        if (b, True) not in self.seconds:
            choice = True
        elif (b, False) not in self.seconds or self.since_big.get(b, 0) >= self.explore_every:
            choice = False
        else:
            choice = self.seconds[b, True] <= self.seconds[b, False]
        if choice:
            self.little_steps += 1
        else:
            self.big_steps += 1
        return choice

    def observe(self, batch: int, little_first: bool, seconds: float) -> None:
        """A step of `batch` rows took `seconds` with the given choice."""
        if not self.enabled or batch < 2:
            return
        b = bucket(batch)
        key = (b, little_first)
        self.seconds[key] = seconds if key not in self.seconds else (1 - SMOOTHING) * self.seconds[key] + SMOOTHING * seconds
        self.since_big[b] = self.since_big.get(b, 0) + 1 if little_first else 0
