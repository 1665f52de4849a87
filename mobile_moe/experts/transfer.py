"""Host->device copies. The only module that owns CUDA streams and events; on CPU the same calls run synchronously."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class Ticket:
    """A copy in flight; `event` is None when the copy already finished (CPU)."""

    event: torch.cuda.Event | None
    nbytes: int


class TransferEngine:
    """Copies expert buffers on a dedicated stream and makes compute wait only for what it uses."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.is_cuda else None
        self.bytes_copied = 0
        self.copies = 0
        self.wait_s = 0.0

    def load(self, dst: torch.Tensor, src: torch.Tensor) -> Ticket:
        """Start copying host `src` into device `dst`; returns a ticket to wait on before reading `dst`."""
        nbytes = src.numel() * src.element_size()
        self.bytes_copied += nbytes
        self.copies += 1
        if not self.is_cuda:
            start = time.perf_counter()
            dst.copy_(src)
            self.wait_s += time.perf_counter() - start  # compute waits for a synchronous copy
            return Ticket(event=None, nbytes=nbytes)
        assert self.copy_stream is not None
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))  # slot may still be read by compute
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return Ticket(event=event, nbytes=nbytes)

    def wait(self, ticket: Ticket) -> None:
        """Block compute until the ticket's copy is done, timing how long the host had to wait for it."""
        if ticket.event is None:
            return
        if not ticket.event.query():
            start = time.perf_counter()
            ticket.event.synchronize()
            self.wait_s += time.perf_counter() - start
        torch.cuda.current_stream(self.device).wait_event(ticket.event)
        ticket.event = None

    def synchronize(self) -> None:
        """Wait for every copy issued so far."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
