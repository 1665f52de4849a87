"""Hardware profiles for the cost model: link and memory bandwidth, per-copy, per-launch and per-sync costs, with sources."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

# Per eager kernel launch: the H200 calibration times one eager SwiGLU expert at batch 1 at 77-80 us for 9-17 MB
# experts (docs/design.md §8, expert_ffn_us); weight reads take 2-4 us of that at 4.8 TB/s and
# such an expert launches 5 kernels (3 linear, silu, mul: costinputs.swiglu_expert_launches), so ~15 us per launch.
# Consumer cards: assumed the same (a launch costs host time, not GPU time).
LAUNCH_US = 15.0
# Per host sync: assumption, not measured: a stream-synchronize round trip (~5-10 us) plus the drained GPU idling
# until the next launch reaches it (about one launch).
SYNC_US = 20.0
# Per copy: an H2D copy's fixed cost. H200: a least-squares fit t = latency + bytes / bandwidth over the calibration's
# pinned copies of 1 MiB..336 MiB gives 4.0 us + bytes / 55.4 GB/s (within 0.3% on every expert size, 4% on 1 MiB).
# Consumer cards: assumed the same 4 us (driver + DMA setup).
COPY_LATENCY_US = 4.0


@dataclass(frozen=True)
class HardwareProfile:
    """What decides decode speed when experts stream over the host link."""

    name: str
    link_gbps: float  # pinned host->device GB/s for large copies
    mem_gbps: float  # device memory GB/s (batch-1 decode reads every weight it uses once)
    launch_us: float = LAUNCH_US  # host cost of one eager kernel launch
    sync_us: float = SYNC_US  # one host sync (device->host read that drains the launch queue)
    copy_latency_us: float = COPY_LATENCY_US  # fixed cost of one host->device copy, on top of bytes / link
    source: str = "assumed"


_CONSUMER = "launch, sync and per-copy costs: see profiles.py (H200-derived or assumed)"
PROFILES: Mapping[str, HardwareProfile] = MappingProxyType(
    {
        "rtx4090": HardwareProfile(
            "rtx4090",
            link_gbps=25.0,
            mem_gbps=1008.0,
            source=("public specs: PCIe 4.0 x16 (31.5 GB/s raw, ~25 GB/s pinned in practice), GDDR6X 1008 GB/s; " + _CONSUMER),
        ),
        "rtx3090": HardwareProfile(
            "rtx3090",
            link_gbps=25.0,
            mem_gbps=936.0,
            source=("public specs: PCIe 4.0 x16 (31.5 GB/s raw, ~25 GB/s pinned in practice), GDDR6X 936 GB/s; " + _CONSUMER),
        ),
        "rtx4060ti-16gb": HardwareProfile(
            "rtx4060ti-16gb",
            link_gbps=12.5,
            mem_gbps=288.0,
            source=("public specs: PCIe 4.0 x8 (15.8 GB/s raw, ~12.5 GB/s pinned in practice), GDDR6 288 GB/s; " + _CONSUMER),
        ),
        "h200": HardwareProfile(
            "h200",
            link_gbps=55.4,
            mem_gbps=4800.0,
            source=(
                "link and per-copy latency: fit to measured pinned copies on an H200 (docs/design.md §8; PCIe Gen5 x16, "
                "54.3-55.4 GB/s measured for 9-336 MiB); launch cost from its expert_ffn_us; HBM3e 4.8 TB/s public spec"
            ),
        ),
    }
)


# The disk tier on a CPU: the "link" is the SSD (experts read into the host cache, which compute reads in place).
# Per-op cost on this project's CPU: one small F.linear dispatches in 6-8 us (docs/performance.md); a host "sync"
# costs nothing there. Disk profiles' link rates: this machine's O_DIRECT probe at the record size, and public specs.
CPU_OP_US = 6.0
DISK_LINKS_GBPS: Mapping[str, float] = MappingProxyType({"nvme-pcie4": 7.0, "sata-ssd": 0.5})


def disk_profiles(disk_probe_gbps: float, memory_probe_gbps: float) -> dict[str, HardwareProfile]:
    """Cost-model profiles of the CPU disk tier: this machine as measured, and the same CPU with other SSDs."""

    def cpu(name: str, link: float, source: str) -> HardwareProfile:
        return HardwareProfile(name, link_gbps=link, mem_gbps=memory_probe_gbps, launch_us=CPU_OP_US, sync_us=0.0, copy_latency_us=0.0, source=source)

    profiles = {"this-disk": cpu("this-disk", disk_probe_gbps, "this machine: bench's O_DIRECT probe and memory probe")}
    for name, link in DISK_LINKS_GBPS.items():
        profiles[name] = cpu(name, link, f"public spec ~{link:g} GB/s sequential reads; this machine's CPU and memory probe")
    return profiles


def device_profile(device: torch.device, memory_gbps: float, link_gbps: float | None) -> HardwareProfile:
    """This machine as a bench run measured it: on CUDA its pinned-copy and memory probes (launch, sync and copy costs as above);
    on a CPU the memory probe for both (a cache fill is a host copy) and its per-op cost."""
    if device.type == "cuda" and link_gbps is not None:
        return HardwareProfile(
            "this-device",
            link_gbps=link_gbps,
            mem_gbps=memory_gbps,
            source="this run: pinned host->device copy probe and device memory probe; launch, sync and copy costs: profiles.py",
        )
    return HardwareProfile(
        "this-device",
        link_gbps=memory_gbps,
        mem_gbps=memory_gbps,
        launch_us=CPU_OP_US,
        sync_us=0.0,
        copy_latency_us=0.0,
        source="this cpu: its memory probe for memory and cache fills; per-op cost: profiles.py",
    )
