"""Three tiers (disk -> host -> device): how a device cache's missing slots are filled from a host cache of the disk store.

A miss is made resident in the host cache first (a hit there, or a read from disk by the reader pool at the load's
priority), then copied to the device once that read has finished. Until the copy is issued the device slot is
*staged*; the host slot stays pinned until the copy has finished, so no read overwrites a record the link is still
moving. Staged copies are issued as their reads finish, at the next acquire or prefetch, or when compute needs them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mobile_moe.errors import CacheTooSmall
from mobile_moe.experts.reader import Priority
from mobile_moe.experts.transfer import Fence, Ticket

if TYPE_CHECKING:
    from mobile_moe.experts.cache import ExpertCache, Key


@dataclass
class _Staged:
    """A device slot waiting for its record's disk read into the host tier; its copy is issued once that is done."""

    host_slot: int
    prefetch: bool
    after: tuple[Fence | Ticket | None, ...]  # the slot's previous reader and writer


class HostFeed:
    """Fills the slots of `device` (a cache on the compute device) from `host` (a CPU cache read from the disk store)."""

    def __init__(self, device: ExpertCache, host: ExpertCache) -> None:
        self.device, self.host = weakref.proxy(device), host  # the device cache owns this feed: no cycle keeps a dropped pool alive
        self.staged: dict[int, _Staged] = {}  # device slot -> its fill waiting for a disk read
        self.holds: list[tuple[Fence, int]] = []  # (copy's end, host slot) pinned until that copy is done

    def stage(self, key: Key, slot: int, prefetch: bool, priority: Priority, after: tuple) -> Ticket:
        """Pin the expert in the host tier (reading it from disk if it is not there), and copy it into the device slot
        now if it is there already, else once that read is done (the returned ticket then waits for the read)."""
        host, stats = self.host, self.device.stats
        reads = host.stats.disk_reads
        try:
            host_slot = host.acquire(key[0], [key[1]], wait=False, priority=priority)[0]
        except CacheTooSmall:  # every host slot is pinned by fills in flight: a demand finishes them and tries once more
            if prefetch:
                raise
            self.drain()
            host_slot = host.acquire(key[0], [key[1]], wait=False, priority=priority)[0]
        if host.stats.disk_reads > reads:
            stats.disk_reads += 1
            stats.disk_bytes += host.store.record_bytes
        else:
            stats.host_hits += 1
        self.staged[slot] = _Staged(host_slot, prefetch, after)
        read = host.slots[host_slot].ticket
        if read is None or read.future is None or read.future.done():
            return self.copy(slot)
        return Ticket(event=None, nbytes=self.device.store.expert_bytes, future=read.future)

    def is_staged(self, slot: int) -> bool:
        """Whether the device slot's copy still waits for its disk read."""
        return slot in self.staged

    def copy(self, slot: int) -> Ticket:
        """Issue a staged slot's copy from the host tier (its read has finished, or is waited for here: that read's
        error is raised, the host slot given back)."""
        device, host = self.device, self.host
        staged = self.staged.pop(slot)
        try:
            host.ready(staged.host_slot)
        except BaseException:
            host.abandon([staged.host_slot])
            raise
        source = host.pool[staged.host_slot, : device.store.expert_bytes]
        ticket = device.transfer.load(device.pool[slot], source, staged.prefetch, after=staged.after)
        device.stats.h2d_bytes += ticket.nbytes
        device.slots[slot].ticket = ticket
        if ticket.event is None:  # the copy is done (CPU)
            host.release([staged.host_slot])
        else:
            self.holds.append((ticket.event, staged.host_slot))
        return ticket

    def unstage(self, slot: int) -> None:
        """Drop a staged fill that will not be needed (its slot is evicted or emptied): the host slot is unpinned."""
        staged = self.staged.pop(slot, None)
        if staged is not None:  # its read may go on: a later read into that host slot waits for it
            self.host.release([staged.host_slot])

    def promote(self, key: Key, slot: int) -> None:
        """A demand for a staged expert: its read, if still queued as a prefetch, goes ahead of the prefetches."""
        if slot in self.staged:
            self.host.promote(key)

    def advance(self) -> None:
        """Give back host slots whose copies have finished, and issue the copies of staged slots whose reads have
        finished (a failed read is left for the device cache's `ready` to raise)."""
        if self.holds:
            done = [fence.query() for fence, _ in self.holds]
            self.host.release([host_slot for (_, host_slot), finished in zip(self.holds, done) if finished])
            self.holds = [hold for hold, finished in zip(self.holds, done) if not finished]
        for slot in [s for s, staged in self.staged.items() if self._read_succeeded(staged.host_slot)]:
            self.copy(slot)

    def drain(self) -> None:
        """Wait for every staged read and every copy out of the host tier, and give back their host slots."""
        for slot in list(self.staged):
            try:
                self.copy(slot)
            except BaseException:  # noqa: BLE001 (the slot keeps its failed read: raised when it is needed, or read again)
                pass
        self.device.transfer.synchronize()
        self.host.release([host_slot for _, host_slot in self.holds])
        self.holds.clear()

    def _read_succeeded(self, host_slot: int) -> bool:
        """Whether the host slot's fill is finished and did not fail."""
        ticket = self.host.slots[host_slot].ticket
        future = None if ticket is None else ticket.future
        return future is None or (future.done() and future.exception() is None)
