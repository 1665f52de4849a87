"""Expert-access traces: every (pass, layer, expert) request with hit/miss, replayable by the cost model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Access:
    """One expert request: a demand access by a pass, or a prefetch issued before one."""

    step: int  # decode step (0 = prefill)
    pass_id: int  # increments with every forward pass
    mode: str  # big | little
    layer: int
    expert: int
    hit: bool
    kind: str  # demand | prefetch


class Trace:
    """Collects accesses; the engine sets `step`, `pass_id` and `mode` before each pass."""

    def __init__(self) -> None:
        self.accesses: list[Access] = []
        self.step = 0
        self.pass_id = 0
        self.mode = "big"

    def record(self, layer: int, expert: int, hit: bool, kind: str = "demand") -> None:
        """Append one access in the current pass."""
        self.accesses.append(Access(self.step, self.pass_id, self.mode, layer, expert, hit, kind))

    def save(self, path: Path) -> None:
        """Write as JSON lines."""
        with path.open("w") as f:
            for a in self.accesses:
                f.write(json.dumps(asdict(a)) + "\n")


def load_trace(path: Path) -> list[Access]:
    """Read a JSONL trace."""
    return [Access(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
