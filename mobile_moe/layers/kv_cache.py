"""Per-sequence state: preallocated per-layer key/value cache plus recurrent layers' states, with snapshot/restore.

MoBiLE drops a step on fallback: attention layers forget it by truncating the KV length, recurrent layers
(linear attention, short convolutions, Mamba) by restoring a copy of their small state taken before the step.
"""

from __future__ import annotations

from collections.abc import Callable
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


def ring_mask(ends: torch.Tensor, queries: torch.Tensor, capacity: int, width: int, window: int) -> torch.Tensor:
    """Which ring slots each query sees: slot j of a ring of `capacity` filled up to position end-1 holds position
    p = end-1 - ((end-1 - j) mod capacity); query q sees it iff 0 <= p <= q and p > q - window.
    ends: [B, 1], queries: [B, T] positions -> [B, T, width] bool over the first `width` slots."""
    j = torch.arange(width, device=queries.device)[None, None, :]  # [1, 1, W]
    last = (ends - 1)[:, :, None]  # [B, 1, 1]
    p = last - torch.remainder(last - j, capacity)  # [B, 1, W]
    q = queries[:, :, None]  # [B, T, 1]
    return (p >= 0) & (p <= q) & (p > q - window)


@dataclass(frozen=True)
class LayerKV:
    """One layer's view of a sequence for one pass: its key/value buffers [H, max_len, D] filled up to `start`, or its
    recurrent state. Passed to the layer as an argument, so a compiled layer serves every layer of its type.

    A sliding-window layer may keep a ring of `ring` slots instead (position p in slot p mod ring, ring >= window + the
    longest write or rewind), so its memory is bounded by the window, not the context.

    A decode pass (one new position) also carries `position`, the device-held copy of `start` [1]: the new key is written
    with an index there, so the step's tensor code depends on no host value but the length it reads. With `span` set
    (a fixed key count >= start + 1, for a captured graph) it reads that many keys, the unfilled ones masked."""

    k: torch.Tensor
    v: torch.Tensor
    start: int  # positions already filled
    recurrent: RecurrentState | None = None
    ring: int | None = None  # slots of a ring buffer (None: position p lives at index p)
    position: torch.Tensor | None = None  # [1] int64 on the device: start, for a one-position write
    span: int | None = None  # keys a decode pass reads (None: exactly start + 1)

    def write(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store [H, T, D] entries at `start`; return the keys/values up to start + T (bounds checked by `KVCache.layer`);
        for a ring, its filled slots in slot order (see `window_mask`)."""
        if self.position is not None and k_new.shape[1] == 1:  # a decode write at the device-held position
            at = self.position if self.ring is None else torch.remainder(self.position, self.ring)  # [1]
            self.k.index_copy_(1, at, k_new)
            self.v.index_copy_(1, at, v_new)
            width = self.decode_width()
            return self.k[:, :width], self.v[:, :width]
        end = self.start + k_new.shape[1]
        if self.ring is None:
            self.k[:, self.start : end] = k_new
            self.v[:, self.start : end] = v_new
            return self.k[:, :end], self.v[:, :end]
        slots = torch.arange(self.start, end, device=k_new.device) % self.ring  # [T]
        self.k.index_copy_(1, slots, k_new)
        self.v.index_copy_(1, slots, v_new)
        width = min(end, self.ring)
        return self.k[:, :width], self.v[:, :width]

    def window_mask(self, length: int, window: int) -> torch.Tensor:
        """[T, S] bool for the T queries just written (positions start..start+T-1) over what `write` returned: each sees
        the `window` latest keys up to itself."""
        device = self.k.device
        if self.position is not None and length == 1:  # a decode pass: the query's position is on the device
            queries, width = self.position[None, :], self.decode_width()  # [1, 1]
        else:
            queries = torch.arange(self.start, self.start + length, device=device)[None, :]  # [1, T]
            width = self.start + length if self.ring is None else min(self.start + length, self.ring)
        if self.ring is None:
            k_pos = torch.arange(width, device=device)[None, :]
            return (k_pos <= queries[0, :, None]) & (k_pos > queries[0, :, None] - window)
        return ring_mask(queries[:, -1:] + 1, queries, self.ring, width, window)[0]

    def decode_width(self) -> int:
        """Keys (ring slots) a decode pass reads: `span` when fixed, else the filled length start + 1; at most the ring."""
        width = self.span if self.span is not None else self.start + 1
        return width if self.ring is None else min(width, self.ring)


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
        rings: list[int | None] | None = None,
    ) -> None:
        self.max_len = max_len
        self.rings = rings or [None] * len(buffers[0] if buffers else k_shapes)  # per layer: ring slots, or None (max_len positions)
        if buffers is None:
            sizes = [max_len if r is None else r for r in self.rings]
            buffers = (
                [torch.zeros(h, n, d, device=device, dtype=dtype) for (h, d), n in zip(k_shapes, sizes)],
                [torch.zeros(h, n, d, device=device, dtype=dtype) for (h, d), n in zip(v_shapes, sizes)],
            )
        self.k, self.v = buffers  # per layer [H, max_len or ring, D]: own tensors, or one row of a `KVPool`
        self.recurrent = recurrent or {}  # layer -> state of its recurrent token mixer
        self.length = 0
        device = self.k[0].device if self.k else device
        self.position = torch.zeros(1, dtype=torch.int64, device=device)  # [1] the length, held on the device for decode passes

    def reset(self) -> None:
        """Empty again, in place (every tensor keeps its address: captured graphs read them): length 0, recurrent states
        zero. Keys and values past the length are never read unmasked, so they are left as they are."""
        self.length = 0
        self.position.zero_()
        for state in self.recurrent.values():
            for t in state.tensors.values():
                t.zero_()

    def keep(self, length: int, boundary: SequenceSnapshot | None = None) -> None:
        """Take up, in an emptied cache, the first `length` positions its buffers already hold (a reused prefix): the length
        set, the recurrent states copied from `boundary` (their snapshot at that length)."""
        self.length = length
        self.position.fill_(length)
        if boundary is not None:
            for layer, tensors in boundary.recurrent.items():
                self.recurrent[layer].restore(tensors)

    def copy_prefix(self, other: KVCache, length: int) -> None:
        """Copy the first `length` positions of `other`'s buffers into this cache's (same layers and ring sizes; a ring
        layer's whole ring is copied, its slots being positions modulo the ring)."""
        for dst, src, ring in zip(self.k + self.v, other.k + other.v, self.rings + self.rings):
            if ring is None:
                dst[:, :length].copy_(src[:, :length])  # [H, length, D]
            else:
                dst.copy_(src)  # [H, ring, D]

    def check_room(self, n: int) -> None:
        """Raise unless n more positions fit."""
        if self.length + n > self.max_len:
            raise IndexError(f"KV cache holds {self.max_len} positions, step needs {self.length + n}")

    def layer(self, index: int, span: int | None = None) -> LayerKV:
        """Layer `index`'s buffers at the current length (a decode pass reading `span` keys, when given)."""
        return LayerKV(self.k[index], self.v[index], self.length, self.recurrent.get(index), self.rings[index], self.position, span)

    def advance(self, n: int) -> None:
        """Commit n positions written by the last forward pass (the device copy moves by a device add: no sync)."""
        self.length += n
        self.position.add_(n)

    def rewind(self, n: int) -> None:
        """Forget the last n positions; the next pass overwrites them (recurrent states cannot: use snapshot/restore)."""
        if n > self.length:
            raise ValueError(f"cannot rewind {n} positions from length {self.length}")
        if n and self.recurrent:
            raise ValueError("recurrent layers cannot rewind positions; restore a snapshot instead")
        if n:
            self.length -= n
            self.position.sub_(n)

    def snapshot(self) -> SequenceSnapshot:
        """The current point of the sequence: the KV length (no copy) and copies of the recurrent states."""
        return SequenceSnapshot(self.length, {layer: state.snapshot() for layer, state in self.recurrent.items()})

    def restore(self, snapshot: SequenceSnapshot) -> None:
        """Return to a snapshot taken earlier in this sequence: truncate the KV cache, copy the recurrent states back."""
        if snapshot.length > self.length:
            raise ValueError(f"cannot restore length {snapshot.length} from length {self.length}")
        self.position.sub_(self.length - snapshot.length)
        self.length = snapshot.length
        for layer, tensors in snapshot.recurrent.items():
            self.recurrent[layer].restore(tensors)


class KVPool:
    """Key/value buffers for up to `rows` sequences decoded together: per layer [rows, H, max_len, D], one row per sequence.

    Contiguous rows with per-row lengths (not pages): a row is a `KVCache` over views of the pool, so every
    single-sequence path (prefill, fallback rewind, snapshots) works on it unchanged, and a batched decode pass reads
    the rows of its batch as one [B, H, S, D] tensor (a view when the rows are adjacent).
    """

    def __init__(
        self,
        k_shapes: list[tuple[int, int]],
        v_shapes: list[tuple[int, int]],
        rows: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
        rings: list[int | None] | None = None,
    ) -> None:
        self.rows, self.max_len = rows, max_len
        self.rings = rings or [None] * len(k_shapes)  # per layer: ring slots (sliding windows), or None
        sizes = [max_len if r is None else r for r in self.rings]
        self.k = [torch.zeros(rows, h, n, d, device=device, dtype=dtype) for (h, d), n in zip(k_shapes, sizes)]
        self.v = [torch.zeros(rows, h, n, d, device=device, dtype=dtype) for (h, d), n in zip(v_shapes, sizes)]

    def row(self, slot: int, recurrent: dict[int, RecurrentState]) -> KVCache:
        """An empty sequence over row `slot` (its old contents are masked by the length, then overwritten)."""
        return KVCache(
            [],
            [],
            self.max_len,
            torch.device("meta"),
            torch.float32,
            recurrent,
            buffers=([k[slot] for k in self.k], [v[slot] for v in self.v]),
            rings=self.rings,
        )

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
    batch: BatchKV
    index: int  # the layer

    @property
    def rows(self) -> list[LayerKV]:
        """Each row's single-sequence view of this layer."""
        return [kv.layer(self.index) for kv in self.batch.caches]

    @property
    def ring(self) -> int | None:
        """Ring slots of this layer (sliding window), or None."""
        return self.batch.pool.rings[self.index]

    def write(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each row's new entry k_new/v_new [B, H, D] at its length; return keys/values [B, H, S, D], S = longest row + 1
        (a ring: its first min(ring, S) slots, in slot order; `BatchKV.mask` knows which hold what)."""
        b, ring = self.batch, self.ring
        at = b.start_index if ring is None else b.start_index % ring
        self.k[b.slot_index, :, at] = k_new
        self.v[b.slot_index, :, at] = v_new
        S = b.span if ring is None else min(b.span, ring)
        if b.adjacent is not None:
            lo, hi = b.adjacent
            return self.k[lo:hi, :, :S], self.v[lo:hi, :, :S]
        return self.k[b.slot_index, :, :S], self.v[b.slot_index, :, :S]  # a gathered copy: rows not adjacent in the pool


class BatchKV:
    """The sequences of one batched decode pass: rows of a `KVPool`, each with its own length; one new position each."""

    def __init__(self, pool: KVPool, slots: list[int], caches: list[KVCache], to_device: Callable[[list[int]], torch.Tensor]) -> None:
        """to_device: host ints -> an int64 tensor on the pool's device, copied without a host sync (the transfer engine's)."""
        self.pool, self.slots, self.caches = pool, slots, caches
        self.starts = [kv.length for kv in caches]
        self.slot_index = to_device(slots)  # [B]
        self.start_index = to_device(self.starts)  # [B]
        self.span = max(self.starts) + 1
        lo = min(slots)
        self.adjacent = (lo, lo + len(slots)) if slots == list(range(lo, lo + len(slots))) else None
        self._masks: dict[tuple[int | None, int | None], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.caches)

    def check_room(self) -> None:
        """Raise unless every row has room for one more position."""
        for kv in self.caches:
            kv.check_room(1)

    def layer(self, index: int) -> LayerBatchKV:
        """Layer `index` of every row."""
        return LayerBatchKV(self.pool.k[index], self.pool.v[index], self, index)

    def mask(self, window: int | None = None, ring: int | None = None) -> torch.Tensor:
        """[B, 1, 1, S] bool: row b's new token (position starts[b]) sees keys 0..starts[b], or only the `window` latest
        (over a ring of `ring` slots: S = min(ring, span), by what each slot holds)."""
        key = (window, ring)
        if key not in self._masks:
            q_pos = self.start_index[:, None]  # [B, 1]
            if ring is not None:
                keep = ring_mask(q_pos + 1, q_pos, ring, min(ring, self.span), window or ring)[:, 0]  # [B, S]
            else:
                k_pos = torch.arange(self.span, device=self.start_index.device)[None, :]  # [1, S]
                keep = k_pos <= q_pos
                if window is not None:
                    keep = keep & (k_pos > q_pos - window)
            self._masks[key] = keep[:, None, None, :]
        return self._masks[key]

    def advance(self) -> None:
        """Commit the position each row's pass wrote."""
        for kv in self.caches:
            kv.advance(1)
