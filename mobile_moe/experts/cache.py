"""Device-side expert cache: a fixed pool of slots, pluggable eviction, pin counts, hit/miss/bytes counters.

On the CPU, a cache with a slot for every expert of a store in RAM is that store's memory (`shares_store`): the
experts are held once, not twice, and every lookup is a hit.

Three tiers (disk -> host -> device): a device cache given a `host` cache (itself filled from the disk store by the
reader pool) fills its missing slots through a `HostFeed` (tiers.py).
"""

from __future__ import annotations

from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field

import torch

from mobile_moe.errors import CacheTooSmall
from mobile_moe.experts.disk import DiskStore, aligned_empty
from mobile_moe.experts.eviction import make_eviction
from mobile_moe.experts.host_memory import allocate_host
from mobile_moe.experts.reader import Priority, ReadPool
from mobile_moe.experts.store import ExpertStore
from mobile_moe.experts.tiers import HostFeed
from mobile_moe.experts.trace import Trace
from mobile_moe.experts.transfer import Fence, Ticket, TransferEngine

Key = tuple[int, int]  # (layer, expert)


@dataclass
class CacheStats:
    """Counters of one cache since creation or the last reset."""

    hits: int = 0
    misses: int = 0
    prefetched: int = 0
    evictions: int = 0
    h2d_bytes: int = 0
    disk_reads: int = 0  # experts read from the on-disk store (misses of the host tier)
    disk_bytes: int = 0
    lookahead_issued: int = 0  # loads started on a lookahead guess
    lookahead_used: int = 0  # of those, experts the layer then asked for while still cached (precision = used / issued)
    host_hits: int = 0  # three tiers: loads of this cache served by the host tier without a disk read

    def snapshot(self) -> CacheStats:
        """A copy, for measuring deltas."""
        return CacheStats(**vars(self))


@dataclass
class _Slot:
    key: Key | None = None
    pins: int = 0
    ticket: Ticket | None = None  # the copy writing this slot, until compute has waited for it
    read_fence: Fence | None = None  # after the last compute that read this slot


@dataclass
class ExpertCache:
    """`num_slots` resident experts on `device`; an expert in use (pinned) is never evicted."""

    store: ExpertStore | DiskStore
    num_slots: int
    device: torch.device
    transfer: TransferEngine
    eviction_name: str = "lru"
    stats: CacheStats = field(default_factory=CacheStats)
    trace: Trace | None = None
    reader: ReadPool | None = None  # the disk tier: slots are filled by reads of `store` (a DiskStore), on CPU
    host: ExpertCache | None = None  # three tiers: slots are filled from this host cache of the disk store
    pin_pool: bool = False  # with `reader`: page-lock the slot pool (a host tier feeding a CUDA cache copies from it)

    def __post_init__(self) -> None:
        self.total_experts = self.store.total_experts  # routed experts of the model (a slot each makes them all resident)
        if self.reader is not None:  # records read straight into slots: page-aligned, one record apart
            assert isinstance(self.store, DiskStore) and self.device.type == "cpu"
            nbytes = self.num_slots * self.store.record_bytes
            self._host_buffer = allocate_host(nbytes, pin=True) if self.pin_pool else None
            flat = aligned_empty(nbytes) if self._host_buffer is None else self._host_buffer.data
            self.pool = flat.view(self.num_slots, self.store.record_bytes)
        elif self.shares_store:  # every expert where the store keeps it: no second copy of the experts in RAM
            self.pool = self.store.host.data.view(self.num_slots, self.store.expert_bytes)
        else:
            self.pool = torch.empty(self.num_slots, self.store.expert_bytes, dtype=torch.uint8, device=self.device)  # packed, as in the store
        self.fields = self.store.layout.views(self.pool)  # matrix -> each packed field as a typed view [S, ...]
        self.slots = [_Slot() for _ in range(self.num_slots)]
        self.free = list(range(self.num_slots - 1, -1, -1))  # stack: slot 0 is handed out first
        self.where: dict[Key, int] = {}
        self.eviction = make_eviction(self.eviction_name)
        self.rows = {layer: row for row, layer in enumerate(self.store.layers)}  # MoE layer -> its row of slot_table
        self.slot_table = torch.full((len(self.rows), self.store.num_experts), -1, dtype=torch.int64, device=self.device)  # [L, E], -1: absent
        self.slot_rows = {layer: self.slot_table[row] for layer, row in self.rows.items()}  # MoE layer -> its row [E], a view made once
        self._table_on_host = self.slot_table.numpy() if self.device.type == "cpu" else None  # the same memory: a write costs no dispatch
        self._settled = False  # every expert resident and every copy into the pool finished
        self._guessed: set[Key] = set()  # loaded on a lookahead guess, not asked for yet
        self.feed = HostFeed(self, self.host) if self.host is not None else None  # three tiers: fills slots from the host cache
        if self.shares_store:
            self._adopt_store()

    def close(self) -> None:
        """Wait for every copy and disk read still writing into the slots (so their memory can be reused the moment the
        cache is dropped: a copy on a side stream is not ordered before the next allocation), the host tier's too."""
        self.transfer.synchronize()
        for slot in self.slots:
            future = None if slot.ticket is None else slot.ticket.future
            if future is not None:
                wait_for([future])  # its error, if any, belongs to a request that is gone
        if self.host is not None:
            self.host.close()

    @property
    def shares_store(self) -> bool:
        """Whether the slots are the host store's own memory: on the CPU, a slot for every expert of a store in RAM."""
        return (
            self.device.type == "cpu"
            and isinstance(self.store, ExpertStore)
            and self.reader is None
            and self.host is None
            and self.num_slots == self.total_experts
        )

    def _adopt_store(self) -> None:
        """Every expert resident in the slot the store's layout gives it (MoE layer row x experts + expert), nothing copied."""
        self.slot_table.copy_(torch.arange(self.num_slots).view_as(self.slot_table))  # [L, E]: slot = row * E + expert
        for layer, row in self.rows.items():
            for expert in range(self.store.num_experts):
                key, slot = (layer, expert), row * self.store.num_experts + expert
                self.slots[slot] = _Slot(key=key)
                self.where[key] = slot
                self.eviction.inserted(key)
        self.free.clear()
        self._settled = True

    @property
    def all_resident(self) -> bool:
        """Whether every routed expert is in a slot, its copy finished (then compute needs no host decision at all)."""
        if len(self.where) < self.total_experts:
            return False
        if not self._settled:  # once: the last copies may still be in flight
            self.transfer.synchronize()
            for slot in range(self.num_slots):
                if self.reader is not None or self.host is not None:
                    self.ready(slot)  # disk reads: wait for each (a failed one raises here and leaves its slot empty)
                self.slots[slot].ticket = None
            self._settled = len(self.where) == self.total_experts
        return self._settled

    def acquire(self, layer: int, experts: list[int], wait: bool = True, priority: Priority = Priority.DEMAND) -> list[int]:
        """Make the experts resident (demand loads), pin them, and return their slots; compute may read them once this
        returns, or, with wait=False, once `ready` has been called on each (reads still in flight meanwhile). `priority`:
        of the disk reads this starts (a host tier filling a device cache's prefetch reads below demand)."""
        if len(experts) > self.num_slots:
            raise CacheTooSmall(f"expert cache has {self.num_slots} slots but one step needs {len(experts)} experts of layer {layer}")
        if self.feed is not None:
            self.feed.advance()
        pinned: dict[int, int] = {}  # position in `experts` -> its slot
        try:
            for i in sorted(range(len(experts)), key=lambda i: (layer, experts[i]) not in self.where):  # hits first: a miss's
                pinned[i] = self._pin(layer, experts[i], priority)  # load then never evicts an expert this call needs
            for slot in pinned.values() if wait else ():
                self.ready(slot)
        except BaseException:  # too small, or a copy or read that failed: the cache stays as usable as before
            self.abandon(list(pinned.values()))
            raise
        return [pinned[i] for i in range(len(experts))]

    def ready_first(self, slots: list[int]) -> list[int]:
        """Positions in `slots`, those whose fill has already finished first (then in issue order): the order to compute
        acquired experts in while the rest are still being read."""

        def pending(i: int) -> bool:
            ticket = self.slots[slots[i]].ticket
            if ticket is None:
                return False
            return not ticket.future.done() if ticket.future is not None else ticket.event is not None and not ticket.event.query()

        return sorted(range(len(slots)), key=pending)  # stable: issue order within each kind

    def abandon(self, slots: list[int]) -> None:
        """After a failure with `slots` acquired: settle their other fills (a failed one empties its slot), then unpin."""
        for slot in slots:
            try:
                self.ready(slot)
            except BaseException:  # noqa: BLE001 (the first failure is the one raised)
                pass
            self.slots[slot].pins -= 1

    def release(self, slots: list[int]) -> None:
        """Unpin slots returned by `acquire`; a later copy into them waits only for the compute queued so far."""
        fence = self.transfer.reader_fence()
        for slot in slots:
            self.slots[slot].read_fence = fence
            self.slots[slot].pins -= 1

    def prefetch(self, layer: int, experts: list[int], priority: Priority = Priority.FALLBACK) -> int:
        """Start loading experts that are not resident, without pinning; returns how many loads were issued."""
        if self.feed is not None:
            self.feed.advance()
        issued = 0
        for expert in experts:
            key = (layer, expert)
            if key in self.where:
                continue
            try:
                self._load(key, prefetch=True, priority=priority)
            except CacheTooSmall:  # every slot is pinned: nothing may make room for a prefetch
                break
            self.stats.prefetched += 1
            if priority is Priority.LOOKAHEAD:
                self.stats.lookahead_issued += 1
                self._guessed.add(key)
            if self.trace is not None:
                self.trace.record(layer, expert, False, "prefetch")
            issued += 1
        return issued

    def promote(self, key: Key) -> None:
        """A demand for an expert whose fill is still queued as a prefetch read: move that read ahead of the prefetches."""
        slot = self.where.get(key)
        if slot is not None:
            self._promote(key, slot)

    def _promote(self, key: Key, slot: int) -> None:
        """`promote` for an expert known to be in `slot`."""
        if self.reader is not None:
            ticket = self.slots[slot].ticket
            if ticket is not None and ticket.future is not None and not ticket.future.done():
                self.reader.submit(key, self.pool[slot], Priority.DEMAND)
        elif self.feed is not None:
            self.feed.promote(key, slot)

    def load_all(self) -> None:
        """Bring every expert in (all-resident reference); needs a slot per expert."""
        if self.num_slots < self.total_experts:
            raise CacheTooSmall(f"{self.num_slots} slots cannot hold all {self.total_experts} experts")
        if self.host is not None:  # through a host tier that may be smaller: as many at a time as it holds
            step = self.host.num_slots
            for layer in self.store.layers:
                for start in range(0, self.store.num_experts, step):
                    self.release(self.acquire(layer, list(range(start, min(start + step, self.store.num_experts)))))
            self.transfer.synchronize()
            return
        for layer in self.store.layers:
            self.prefetch(layer, list(range(self.store.num_experts)))
        self.transfer.synchronize()
        for slot in range(self.num_slots):
            self.ready(slot)

    def _pin(self, layer: int, expert: int, priority: Priority = Priority.DEMAND) -> int:
        """Count a hit or start a load (a demand one unless `priority` says otherwise), then pin the expert's slot."""
        key = (layer, expert)
        slot = self.where.get(key)
        if slot is not None and (self.reader is not None or self.feed is not None) and self._failed(slot):  # a failed earlier read (a prefetch): again
            self._forget(slot)
            slot = None
        hit = slot is not None
        if key in self._guessed:
            self._guessed.discard(key)
            self.stats.lookahead_used += hit
        if slot is not None:
            self.stats.hits += 1
            self.eviction.touched(key)
            if priority is Priority.DEMAND and (self.reader is not None or self.feed is not None):  # disk tier only
                self._promote(key, slot)
        else:
            self.stats.misses += 1
            slot = self._load(key, prefetch=priority is not Priority.DEMAND, priority=priority)
        if self.trace is not None:
            self.trace.record(layer, expert, hit)
        self.slots[slot].pins += 1
        return slot

    def _load(self, key: Key, prefetch: bool, priority: Priority = Priority.FALLBACK) -> int:
        """Take a slot (free or evicted) and start copying the expert into it after the slot's last reader and writer."""
        slot = self._take_slot()
        old = self.slots[slot]
        try:
            if self.reader is not None:
                ticket = self._read(key, slot, old.ticket, Priority.DEMAND if not prefetch else priority)
            elif self.feed is not None:
                ticket = self.feed.stage(key, slot, prefetch, Priority.DEMAND if not prefetch else priority, (old.read_fence, old.ticket))
            else:
                ticket = self.transfer.load(self.pool[slot], self.store.buffer(*key), prefetch, after=(old.read_fence, old.ticket))
        except BaseException:
            self.slots[slot] = _Slot(ticket=old.ticket, read_fence=old.read_fence)  # the slot is empty now, not lost
            self.free.append(slot)
            raise
        self.slots[slot] = _Slot(key=key, ticket=ticket)
        self.where[key] = slot
        self._set_slot(key, slot)
        self.eviction.inserted(key)
        if self.reader is not None:
            self.stats.disk_reads += 1
            self.stats.disk_bytes += ticket.nbytes
        elif self.host is None:
            self.stats.h2d_bytes += ticket.nbytes
        return slot

    def _read(self, key: Key, slot: int, previous: Ticket | None, priority: Priority) -> Ticket:
        """Queue a disk read of the expert into the slot, once any read still writing the slot has finished."""
        assert self.reader is not None and isinstance(self.store, DiskStore)
        if previous is not None:  # a read still writing this slot for its previous occupant
            try:
                self.transfer.wait(previous)
            except Exception:  # noqa: BLE001 (that occupant is gone; its failed read is no error of this load)
                pass
        future = self.reader.submit(key, self.pool[slot], priority)
        return Ticket(event=None, nbytes=self.store.record_bytes, future=future)

    def _take_slot(self) -> int:
        """A free slot, else the eviction policy's victim among unpinned slots."""
        if self.free:
            return self.free.pop()
        victim = self.eviction.victim(lambda key: self.slots[self.where[key]].pins == 0)
        if victim is None:
            raise CacheTooSmall(f"all {self.num_slots} expert cache slots are in use")
        slot = self.where.pop(victim)
        if self.feed is not None:
            self.feed.unstage(slot)
        self._guessed.discard(victim)  # a guess evicted before use: not used
        self._set_slot(victim, -1)
        self._settled = False
        self.eviction.removed(victim)
        self.stats.evictions += 1
        return slot

    def _set_slot(self, key: Key, slot: int) -> None:
        """Record in the expert-to-slot table where the expert lives (-1: absent)."""
        row = self.rows[key[0]]
        if self._table_on_host is not None:
            self._table_on_host[row, key[1]] = slot
        else:
            self.slot_table[row, key[1]] = slot

    def ready(self, slot: int) -> None:
        """Wait until an acquired slot's fill is usable: order compute after its copy if that is still in flight (a failed
        disk read raises, emptying the slot)."""
        ticket = self.slots[slot].ticket
        if ticket is None:
            return
        try:
            self.transfer.wait(ticket)  # three tiers, staged: the disk read into the host tier
            if self.feed is not None and self.feed.is_staged(slot):
                self.transfer.wait(self.feed.copy(slot))
        except BaseException:  # a failed disk read: the slot holds nothing usable, forget its expert
            self._forget(slot)
            raise
        self.slots[slot].ticket = None

    def _failed(self, slot: int) -> bool:
        """Whether the slot's fill was a disk read that has failed."""
        ticket = self.slots[slot].ticket
        future = None if ticket is None else ticket.future
        return future is not None and future.done() and future.exception() is not None

    def _forget(self, slot: int) -> None:
        """Empty a slot whose fill failed, so the expert is read again next time it is needed."""
        key = self.slots[slot].key
        if self.feed is not None:
            self.feed.unstage(slot)
        if key is not None and self.where.get(key) == slot:
            del self.where[key]
            self._guessed.discard(key)
            self._set_slot(key, -1)
            self.eviction.removed(key)
        self.slots[slot] = _Slot(pins=self.slots[slot].pins)  # a failing acquire drops its pins right after
        self.free.append(slot)
        self._settled = False
