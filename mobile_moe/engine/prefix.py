"""Prefix reuse (docs/design.md §10): a held sequence remembers which token ids its leading positions hold and who wrote
them, so that the next request sharing that prefix prefills only the rest.

A position's KV entries may serve a request only if that request, run cold, would write the same entries there: prompt
positions prefilled by big serve any big prefill; positions prefilled by little serve only a prefill by the same little
model; positions a little decode pass wrote serve nobody (a cold prefill of those tokens runs another pass); positions a
big decode pass wrote (policy big, a fallback's big pass) serve a big prefill. Recurrent layers cannot go back to an
earlier position, so their models reuse exactly the prompt of the request before, from a copy of the states taken there.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, replace
from itertools import takewhile

from mobile_moe.layers.kv_cache import KVCache, SequenceSnapshot
from mobile_moe.layers.moe import ExpertMode
from mobile_moe.policy.policies import Policy

Writer = tuple[int, str] | None  # who wrote a position: None big; (little_k, weight rule) a little prefill
UNSHARED: Writer = (0, "decode")  # a little decode pass (or a pass whose experts a host-side knob chose): serves no request
SINGLE = "single"  # the index's key of the runner's one held sequence (`Runner.decode_kv`); a pool row's key is its slot


def prefill_writer(policy: Policy, little_k: int) -> Writer:
    """Who writes a request's prompt positions: big, or its little model; a little prefill whose host-side knobs could
    choose a one-token chunk's experts (`PassSpec.host_knobs`) is never shared."""
    config = policy.config
    if policy.prefill_mode is ExpertMode.BIG:
        return None
    return UNSHARED if config.layer_adaptive is not None or config.cache_prior is not None else (little_k, config.little_weights)


@dataclass(frozen=True)
class HeldPrefix:
    """What a held sequence's buffers hold that a later request may reuse: the ids of its leading positions, all written
    by `writer`, and where their reuse stops being safe."""

    tokens: tuple[int, ...]
    writer: Writer
    extent: int  # positions ever written into the buffers: a ring layer's oldest held position follows from it
    boundary: SequenceSnapshot | None = None  # recurrent layers: their states after the request's prompt (None: no reuse)
    recurrent: bool = False  # whether the model has recurrent layers

    def reusable(self, prompt: list[int], writer: Writer, ring_slack: int | None) -> int:
        """Leading positions of `prompt` a request whose prefill is `writer` may take from here: the common prefix, short of
        the prompt's last token (its logits are needed); with recurrent layers exactly the boundary or nothing; with ring
        layers (`ring_slack` positions past the window) nothing unless every key the next query sees is still held."""
        if writer != self.writer or writer == UNSHARED:
            return 0
        n = sum(1 for _ in takewhile(lambda pair: pair[0] == pair[1], zip(self.tokens, prompt[:-1])))
        if self.recurrent:
            return self.boundary.length if self.boundary is not None and 0 < self.boundary.length <= n else 0
        if ring_slack is not None and self.extent - n > ring_slack:
            return 0
        return n


def held_prefix(prompt: list[int], steps: list, kv: KVCache, writer: Writer, policy: Policy, boundary: SequenceSnapshot | None) -> HeldPrefix:
    """A finished request's reusable prefix in `kv`: its prompt (written by `writer`) and, when big wrote them too, the
    decoded positions after it. `steps`: its `StepRecord`s (position len(prompt) + j holds steps[j]'s token, written by step
    j + 1); `boundary`: its recurrent states after the prompt."""
    length = kv.length
    tokens = list(prompt[:length])  # a request cancelled while its prompt was read holds only part of it
    if writer is None:  # a big prefill: the decoded positions a big pass wrote extend it
        big = policy.decode_mode is ExpertMode.BIG
        for j in range(max(0, min(length - len(prompt), len(steps) - 1))):
            fell_back = steps[j + 1].fell_back and policy.config.partial_fallback is None  # a partial fallback keeps little's first layers
            if not (big or fell_back):
                break
            tokens.append(steps[j].token)
    extent = length + policy.config.rollback_window  # a rollback may have taken back positions it wrote
    kept = boundary if boundary is not None and boundary.length == len(prompt) else None
    return HeldPrefix(tuple(tokens), writer, extent, kept, bool(kv.recurrent))


class PrefixIndex:
    """The prefixes held by a runner's sequences (its one held KV cache, each row of its held pool), and the recurrent-state
    snapshots they keep: at most `snapshots` of them, the oldest dropped first. Disabled, it remembers nothing."""

    def __init__(self, enabled: bool, snapshots: int) -> None:
        self.enabled, self.snapshots = enabled, snapshots
        self.held: dict[Hashable, HeldPrefix] = {}  # key (SINGLE or a pool slot) -> its prefix, oldest first

    def take(self, key: Hashable) -> HeldPrefix | None:
        """The prefix a sequence holds, forgotten from here (a request is about to overwrite what follows it)."""
        return self.held.pop(key, None)

    def peek(self, key: Hashable) -> HeldPrefix | None:
        """The prefix a sequence holds, left in place."""
        return self.held.get(key)

    def remember(self, key: Hashable, prefix: HeldPrefix) -> None:
        """Keep a finished request's prefix (newest last), dropping the oldest snapshots past the limit."""
        if not self.enabled:
            return
        self.held.pop(key, None)
        self.held[key] = prefix
        with_states = [k for k, p in self.held.items() if p.boundary is not None]
        for old in with_states[: max(0, len(with_states) - self.snapshots)]:
            self.held[old] = replace(self.held[old], boundary=None)

    def forget_rows(self) -> None:
        """Drop every pool row's prefix (the pool they lived in is gone)."""
        self.held = {k: p for k, p in self.held.items() if k == SINGLE}

    def positions(self) -> int:
        """Positions held for reuse, over every sequence."""
        return sum(len(p.tokens) for p in self.held.values())

    def snapshot_bytes(self) -> int:
        """Bytes of the recurrent-state snapshots kept."""
        return sum(t.numel() * t.element_size() for p in self.held.values() if p.boundary for s in p.boundary.recurrent.values() for t in s.values())
