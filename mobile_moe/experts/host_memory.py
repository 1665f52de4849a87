"""Page-locked host memory of an exact size: one page-aligned allocation registered with the CUDA runtime.

`torch.empty(..., pin_memory=True)` goes through torch's caching host allocator, which rounds every block up
to a power of two (a 54 GiB expert store would pin 64 GiB); registering an ordinary allocation pins exactly
what it holds. Next to transfer.py, this is the only module that talks to the CUDA runtime.
"""

from __future__ import annotations

import logging
import mmap
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

PAGE = mmap.PAGESIZE
CUDA_HOST_REGISTER_DEFAULT = 0

log = logging.getLogger("mobile_moe")

# (address, bytes) -> a function that unpins; raises RuntimeError when the memory cannot be pinned.
Pinner = Callable[[int, int], Callable[[], None]]


def cuda_pinner(address: int, nbytes: int) -> Callable[[], None]:
    """Page-lock [address, address + nbytes) for DMA with cudaHostRegister; returns the unpinning call."""
    cudart = torch.cuda.cudart()
    status = int(cudart.cudaHostRegister(address, nbytes, CUDA_HOST_REGISTER_DEFAULT))
    if status != 0:
        raise RuntimeError(f"cudaHostRegister returned CUDA error {status}")
    return lambda: cudart.cudaHostUnregister(address)


@dataclass
class HostBuffer:
    """`data`: uint8 [nbytes] starting on a page boundary; `pinned_bytes`: how much of it is page-locked."""

    data: torch.Tensor
    pinned_bytes: int
    _raw: torch.Tensor = field(repr=False)


def allocate_host(nbytes: int, pin: bool, pinner: Pinner = cuda_pinner) -> HostBuffer:
    """An exact-size host buffer, page-locked when `pin`; pinning failures fall back to pageable memory with a warning."""
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)  # one spare page to start on a page boundary
    offset = (-raw.data_ptr()) % PAGE
    data = raw[offset : offset + nbytes]
    if not pin or nbytes == 0:
        return HostBuffer(data, 0, raw)
    try:
        unpin = pinner(data.data_ptr(), nbytes)
    except RuntimeError as e:
        log.warning("could not pin %.2f GiB of host memory for the experts (%s); using pageable memory, copies will be slower", nbytes / 2**30, e)
        return HostBuffer(data, 0, raw)
    buffer = HostBuffer(data, nbytes, raw)
    weakref.finalize(buffer, unpin)
    return buffer


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (RAM a new allocation can take without swapping), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
