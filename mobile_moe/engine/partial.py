"""Partial fallbacks (`PolicyConfig.partial_fallback`): a big pass that resumes at the first layer where the little
model dropped a large share of the router's weight, from that layer's kept input (docs/design.md §1, options).

An optional part of the decode step with its own state: a decoder without it never enters this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mobile_moe.policy.little import first_dropping_layer


@dataclass
class PartialFallback:
    """Each little position's input to every layer, and the layer a fallback of it may start at."""

    share: float  # the dropped share of router weight that marks a layer (PolicyConfig.partial_fallback)
    inputs: torch.Tensor  # [W, layers, H]: each little position's input to every layer, in row position % W (W = repair window + 1)
    moe_layers: tuple[int, ...]
    kept: bool = False  # whether the last first pass filled its row of `inputs`
    start: int | None = None  # the decoder layer a partial fallback of the last little read starts at
    starts: list[int | None] = field(default_factory=list)  # the same for each trailing little position (None: inputs not kept)

    def input_row(self, length: int) -> torch.Tensor:
        """The row of `inputs` the little pass at position `length` fills ([layers, H])."""
        self.kept = True
        return self.inputs[length % self.inputs.shape[0]]

    def start_part(self, router_weights: torch.Tensor, little_k: int) -> torch.Tensor:
        """[1] float64: the MoE layer (its row) a fallback of this read would start at, from the pass's gate values [L, k]."""
        return first_dropping_layer(router_weights, little_k, self.share).double()[None]

    def read_start(self, value: float) -> None:
        """Take the start layer `start_part` measured (after the host sync)."""
        self.start = self.moe_layers[int(value)]

    def accepted(self, kept_little: bool) -> None:
        """A step's outcome: its position kept little's KV entries (kept_little), or not (big's; the window resets)."""
        self.starts = (self.starts + [self.start if self.kept else None])[-self.inputs.shape[0] :] if kept_little else []
        self.kept, self.start = False, None

    def resume_layer(self, repair: int) -> int:
        """The decoder layer a fallback's big pass starts at: the earliest start of this step and the `repair` positions it
        redoes, when all their inputs were kept; else 0 (every layer)."""
        starts = [self.start if self.kept else None] + (self.starts[-repair:] if repair else [])
        if len(starts) < repair + 1 or None in starts:
            return 0
        return min(s for s in starts if s is not None)

    def resumed_inputs(self, layer: int, start: int, positions: int) -> tuple[int, torch.Tensor] | None:
        """`CausalLM.forward`'s resume for a big pass over `positions` positions from `start` beginning at `layer`: their
        kept inputs there [positions, H]; None for a pass from the first layer."""
        if layer == 0:
            return None
        rows = self.inputs.shape[0]
        return layer, torch.stack([self.inputs[p % rows, layer] for p in range(start, start + positions)])
