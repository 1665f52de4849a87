"""What one forward pass does, described once by its caller: frozen, passed into `Runner.forward`, read by every MoE layer.

A policy becomes its passes' descriptions when a request starts (`for_policy`); nothing about a pass is written onto
the runner by its callers, so two requests (or two rows of a batch) never see each other's settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from mobile_moe.config import PolicyConfig
from mobile_moe.layers.moe import ExpertMode


@dataclass(frozen=True)
class PassSpec:
    """One pass: which experts (big, or little with `little_k` of the top-k and its weight rule), whether it records each
    MoE layer's routing for a fallback, and the little model's host-side knobs for a single decode row."""

    mode: ExpertMode = ExpertMode.BIG
    little_k: int | None = None  # experts per token of a little pass (None: the model's default, half of top-k)
    little_weights: str = "native"
    record: bool = False  # keep each MoE layer's top-k of the last position (`Runner.routing_buf`)
    lookahead: bool = False  # start loading the next MoE layer's guessed experts (one decode row)
    layer_adaptive: float | None = None  # little runs big where the router is unsure (one decode row)
    cache_prior: float | None = None  # little prefers resident experts of similar score (one decode row)
    host_knobs: bool = field(init=False)  # whether a little decode row decides its experts on the host (layer-adaptive or cache prior)

    def __post_init__(self) -> None:
        object.__setattr__(self, "host_knobs", self.layer_adaptive is not None or self.cache_prior is not None)

    def big(self) -> PassSpec:
        """The same pass with every top-k expert (a fallback, or a prompt under a big prefill), recording nothing."""
        return replace(self, mode=ExpertMode.BIG, record=False)

    def with_mode(self, mode: ExpertMode) -> PassSpec:
        """The same knobs for a pass of another mode, recording nothing."""
        return replace(self, mode=mode, record=False)


BIG = PassSpec()
LITTLE = PassSpec(ExpertMode.LITTLE)


def for_policy(config: PolicyConfig, mode: ExpertMode, little_k: int, record: bool) -> PassSpec:
    """The description of a request's passes in `mode` under a policy (little_k: resolved for the model)."""
    return PassSpec(mode, little_k, config.little_weights, record, config.lookahead, config.layer_adaptive, config.cache_prior)
