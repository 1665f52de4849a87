"""Host-memory store of routed experts: one contiguous packed buffer per expert, so one copy moves it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mobile_moe.experts.host_memory import Pinner, allocate_host, cuda_pinner

Part = Literal["gate", "up", "down"]
PARTS: tuple[Part, ...] = ("gate", "up", "down")


@dataclass(frozen=True)
class ExpertShape:
    """Shape of one SwiGLU expert; its packed buffer is [gate (I*H) | up (I*H) | down (H*I)]."""

    hidden: int
    intermediate: int

    @property
    def numel(self) -> int:
        """Elements in one packed expert."""
        return 3 * self.hidden * self.intermediate

    @property
    def gate_up_numel(self) -> int:
        """Elements of the stacked gate and up projections."""
        return 2 * self.hidden * self.intermediate

    def part_shape(self, part: Part) -> tuple[int, int]:
        """Weight shape of one projection as checkpoints store it ([out, in])."""
        return (self.hidden, self.intermediate) if part == "down" else (self.intermediate, self.hidden)

    def part_range(self, part: Part) -> slice:
        """Where a projection lives in the packed buffer."""
        n = self.hidden * self.intermediate
        return slice(PARTS.index(part) * n, (PARTS.index(part) + 1) * n)


class ExpertStore:
    """Routed experts of every MoE layer in one exact-size host allocation (page-locked when the device is CUDA)."""

    def __init__(self, moe_layers: list[int], num_experts: int, shape: ExpertShape, dtype: torch.dtype, pin: bool, pinner: Pinner = cuda_pinner) -> None:
        self.shape, self.dtype, self.num_experts = shape, dtype, num_experts
        layer_bytes = num_experts * self.expert_bytes
        self.host = allocate_host(layer_bytes * len(moe_layers), pin, pinner)
        self.layers: dict[int, torch.Tensor] = {
            layer: self.host.data[i * layer_bytes : (i + 1) * layer_bytes].view(dtype).view(num_experts, shape.numel)
            for i, layer in enumerate(moe_layers)
        }  # layer -> [E, numel], views of one allocation
        self.filled: set[tuple[int, int, Part]] = set()

    @property
    def pinned_bytes(self) -> int:
        """Bytes of host memory page-locked for the experts (0 when pageable)."""
        return self.host.pinned_bytes

    @property
    def expert_bytes(self) -> int:
        """Bytes moved to bring one expert to the device."""
        return self.shape.numel * self.dtype.itemsize

    @property
    def total_experts(self) -> int:
        """Number of routed experts across all MoE layers."""
        return self.num_experts * len(self.layers)

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        """The packed [numel] host buffer of one expert."""
        return self.layers[layer][expert]

    def put(self, layer: int, expert: int, part: Part, weight: torch.Tensor) -> None:
        """Copy one projection ([I, H] for gate/up, [H, I] for down) into the expert's buffer."""
        want = self.shape.part_shape(part)
        if tuple(weight.shape) != want:
            raise ValueError(f"layer {layer} expert {expert} {part}: shape {tuple(weight.shape)}, expected {want}")
        self.layers[layer][expert, self.shape.part_range(part)].copy_(weight.reshape(-1))
        self.filled.add((layer, expert, part))

    def put_fused(self, layer: int, part: Literal["gate_up", "down"], weight: torch.Tensor) -> None:
        """Copy a fused 3-D tensor of all experts: gate_up [E, 2I, H] (gate rows first) or down [E, H, I]."""
        E, s = self.num_experts, self.shape
        if part == "gate_up":
            want = (E, 2 * s.intermediate, s.hidden)
            cols, parts = slice(0, s.gate_up_numel), ("gate", "up")
        else:
            want = (E, s.hidden, s.intermediate)
            cols, parts = s.part_range("down"), ("down",)
        if tuple(weight.shape) != want:
            raise ValueError(f"layer {layer} fused {part}: shape {tuple(weight.shape)}, expected {want}")
        self.layers[layer][:, cols].copy_(weight.reshape(E, -1))
        self.filled.update((layer, e, p) for e in range(E) for p in parts)

    def missing(self) -> list[str]:
        """Names of expert projections never filled."""
        return [
            f"layer {layer} expert {e} {p}" for layer in self.layers for e in range(self.num_experts) for p in PARTS
            if (layer, e, p) not in self.filled
        ]
