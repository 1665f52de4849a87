"""Per-sequence state: preallocated per-layer key/value cache plus recurrent layers' states, with snapshot/restore.

MoBiLE drops a step on fallback: attention layers forget it by truncating the KV length, recurrent layers
(linear attention, short convolutions, Mamba) by restoring a copy of their small state taken before the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class RecurrentState:
    """One recurrent layer's per-sequence tensors (no sequence axis); a snapshot is a copy of them."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of the state tensors."""
        return {name: t.clone() for name, t in self.tensors.items()}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Overwrite the state in place with a snapshot's values."""
        for name, t in snapshot.items():
            self.tensors[name].copy_(t)


@dataclass(frozen=True)
class LayerKV:
    """One layer's view of a sequence for one pass: its key/value buffers [H, max_len, D] filled up to `start`, or its
    recurrent state. Passed to the layer as an argument, so a compiled layer serves every layer of its type."""

    k: torch.Tensor
    v: torch.Tensor
    start: int  # positions already filled
    recurrent: RecurrentState | None = None

    def write(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store [H, T, D] entries at `start`; return the keys/values up to start + T (bounds checked by `KVCache.layer`)."""
        end = self.start + k_new.shape[1]
        self.k[:, self.start : end] = k_new
        self.v[:, self.start : end] = v_new
        return self.k[:, :end], self.v[:, :end]


@dataclass(frozen=True)
class SequenceSnapshot:
    """What `KVCache.restore` needs to return to an earlier point: the KV length and copies of recurrent states."""

    length: int
    recurrent: dict[int, dict[str, torch.Tensor]]


class KVCache:
    """Keys and values for one sequence: per layer [heads, max_len, dim] tensors and a shared length; plus recurrent states."""

    def __init__(
        self,
        k_shapes: list[tuple[int, int]],
        v_shapes: list[tuple[int, int]],
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
        recurrent: dict[int, RecurrentState] | None = None,
    ) -> None:
        self.max_len = max_len
        self.k = [torch.zeros(h, max_len, d, device=device, dtype=dtype) for h, d in k_shapes]
        self.v = [torch.zeros(h, max_len, d, device=device, dtype=dtype) for h, d in v_shapes]
        self.recurrent = recurrent or {}  # layer -> state of its recurrent token mixer
        self.length = 0

    def check_room(self, n: int) -> None:
        """Raise unless n more positions fit."""
        if self.length + n > self.max_len:
            raise IndexError(f"KV cache holds {self.max_len} positions, step needs {self.length + n}")

    def layer(self, index: int) -> LayerKV:
        """Layer `index`'s buffers at the current length."""
        return LayerKV(self.k[index], self.v[index], self.length, self.recurrent.get(index))

    def advance(self, n: int) -> None:
        """Commit n positions written by the last forward pass."""
        self.length += n

    def rewind(self, n: int) -> None:
        """Forget the last n positions; the next pass overwrites them (recurrent states cannot: use snapshot/restore)."""
        if n > self.length:
            raise ValueError(f"cannot rewind {n} positions from length {self.length}")
        if n and self.recurrent:
            raise ValueError("recurrent layers cannot rewind positions; restore a snapshot instead")
        self.length -= n

    def snapshot(self) -> SequenceSnapshot:
        """The current point of the sequence: the KV length (no copy) and copies of the recurrent states."""
        return SequenceSnapshot(self.length, {layer: state.snapshot() for layer, state in self.recurrent.items()})

    def restore(self, snapshot: SequenceSnapshot) -> None:
        """Return to a snapshot taken earlier in this sequence: truncate the KV cache, copy the recurrent states back."""
        if snapshot.length > self.length:
            raise ValueError(f"cannot restore length {snapshot.length} from length {self.length}")
        self.length = snapshot.length
        for layer, tensors in snapshot.recurrent.items():
            self.recurrent[layer].restore(tensors)
