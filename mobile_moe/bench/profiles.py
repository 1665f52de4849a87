"""Hardware profiles for the cost model: link bandwidth, device memory bandwidth, fixed per-kernel costs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class HardwareProfile:
    """What decides decode speed when experts stream over the host link."""

    name: str
    link_gbps: float  # pinned host->device GB/s
    mem_gbps: float  # device memory GB/s (batch-1 decode reads every weight once)
    layer_overhead_us: float = 250.0  # eager launches of one layer's dense part (attention, norms, router)
    expert_call_us: float = 60.0  # one batched expert computation (gather + 2 bmm + activation)


# Consumer cards from public specs; the H200 link from shared/hardware/h200-calibration.json (pinned, 9-350 MB copies).
PROFILES: Mapping[str, HardwareProfile] = MappingProxyType({
    "rtx4090": HardwareProfile("rtx4090", link_gbps=25.0, mem_gbps=1008.0),
    "rtx3090": HardwareProfile("rtx3090", link_gbps=25.0, mem_gbps=936.0),
    "rtx4060ti-16gb": HardwareProfile("rtx4060ti-16gb", link_gbps=12.5, mem_gbps=288.0),
    "h200": HardwareProfile("h200", link_gbps=54.4, mem_gbps=4800.0),
})

