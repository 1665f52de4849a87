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
        buffers: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    ) -> None:
        self.max_len = max_len
        if buffers is None:
            buffers = ([torch.zeros(h, max_len, d, device=device, dtype=dtype) for h, d in k_shapes],
                       [torch.zeros(h, max_len, d, device=device, dtype=dtype) for h, d in v_shapes])
        self.k, self.v = buffers  # per layer [H, max_len, D]: own tensors, or one row of a `KVPool`
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


class KVPool:
    """Key/value buffers for up to `rows` sequences decoded together: per layer [rows, H, max_len, D], one row per sequence.

    Contiguous rows with per-row lengths (not pages): a row is a `KVCache` over views of the pool, so every
    single-sequence path (prefill, fallback rewind, snapshots) works on it unchanged, and a batched decode pass reads
    the rows of its batch as one [B, H, S, D] tensor (a view when the rows are adjacent).
    """

    def __init__(self, k_shapes: list[tuple[int, int]], v_shapes: list[tuple[int, int]], rows: int, max_len: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.rows, self.max_len = rows, max_len
        self.k = [torch.zeros(rows, h, max_len, d, device=device, dtype=dtype) for h, d in k_shapes]
        self.v = [torch.zeros(rows, h, max_len, d, device=device, dtype=dtype) for h, d in v_shapes]

    def row(self, slot: int, recurrent: dict[int, RecurrentState]) -> KVCache:
        """An empty sequence over row `slot` (its old contents are masked by the length, then overwritten)."""
        return KVCache([], [], self.max_len, torch.device("meta"), torch.float32, recurrent,
                       buffers=([k[slot] for k in self.k], [v[slot] for v in self.v]))

    @property
    def nbytes(self) -> int:
        """Bytes of all rows' buffers."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass(frozen=True)
class LayerBatchKV:
    """One layer's view of a batch of decode rows (one new token each) for one pass: the pool's buffers, the rows'
    slots and their lengths, and each row's own `LayerKV` (recurrent layers and layers without a batched path use those)."""

    k: torch.Tensor  # [R, H, max_len, D] the whole pool
    v: torch.Tensor
    batch: "BatchKV"
    index: int  # the layer

    @property
    def rows(self) -> list[LayerKV]:
        """Each row's single-sequence view of this layer."""
        return [kv.layer(self.index) for kv in self.batch.caches]

    def write(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each row's new entry k_new/v_new [B, H, D] at its length; return keys/values [B, H, S, D], S = longest row + 1."""
        b = self.batch
        self.k[b.slot_index, :, b.start_index] = k_new
        self.v[b.slot_index, :, b.start_index] = v_new
        S = b.span
        if b.adjacent is not None:
            lo, hi = b.adjacent
            return self.k[lo:hi, :, :S], self.v[lo:hi, :, :S]
        return self.k[b.slot_index, :, :S], self.v[b.slot_index, :, :S]  # a gathered copy: rows not adjacent in the pool


class BatchKV:
    """The sequences of one batched decode pass: rows of a `KVPool`, each with its own length; one new position each."""

    def __init__(self, pool: KVPool, slots: list[int], caches: list[KVCache]) -> None:
        self.pool, self.slots, self.caches = pool, slots, caches
        device = pool.k[0].device if pool.k else torch.device("cpu")
        self.starts = [kv.length for kv in caches]
        self.slot_index = torch.tensor(slots, device=device)  # [B]
        self.start_index = torch.tensor(self.starts, device=device)  # [B]
        self.span = max(self.starts) + 1
        lo = min(slots)
        self.adjacent = (lo, lo + len(slots)) if slots == list(range(lo, lo + len(slots))) else None
        self._masks: dict[int | None, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.caches)

    def check_room(self) -> None:
        """Raise unless every row has room for one more position."""
        for kv in self.caches:
            kv.check_room(1)

    def layer(self, index: int) -> LayerBatchKV:
        """Layer `index` of every row."""
        return LayerBatchKV(self.pool.k[index], self.pool.v[index], self, index)

    def mask(self, window: int | None = None) -> torch.Tensor:
        """[B, 1, 1, S] bool: row b's new token (position starts[b]) sees keys 0..starts[b], or only the `window` latest."""
        if window not in self._masks:
            k_pos = torch.arange(self.span, device=self.start_index.device)[None, :]  # [1, S]
            q_pos = self.start_index[:, None]  # [B, 1]
            keep = k_pos <= q_pos
            if window is not None:
                keep = keep & (k_pos > q_pos - window)
            self._masks[window] = keep[:, None, None, :]
        return self._masks[window]

    def advance(self) -> None:
        """Commit the position each row's pass wrote."""
        for kv in self.caches:
            kv.advance(1)
