"""What a request does to the logits of every pass before a token is read from them, and what it records of each
emitted token: its log-probabilities (as the pass produced them), frequency/presence penalties, a grammar's mask.

The decoder calls `apply(logits)` on every read (prefill, little and big passes, a fallback's big pass: the last read
before a token is emitted is the one it came from) and `advance(token)` once per emitted token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.engine.grammar import GrammarState
from mobile_moe.errors import InvalidParameter


class LogitsProcessor(Protocol):
    """A per-request hook on the logits: `apply` before a read, in place; `advance` with the emitted token."""

    def apply(self, logits: torch.Tensor) -> None: ...

    def advance(self, token: int) -> bool: ...  # whether generation must end here (a finished grammar)


@dataclass(frozen=True)
class TokenLogprob:
    """An emitted token's log-probability under the pass it came from, and the most probable tokens there."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


class LogprobRecord:
    """Appends each emitted token's TokenLogprob to `sink`, from the raw logits of the last read (before penalties and mask)."""

    def __init__(self, top: int, sink: list[TokenLogprob]) -> None:
        self.top, self.sink = top, sink
        self.last: torch.Tensor | None = None

    def apply(self, logits: torch.Tensor) -> None:
        """Keep this read's log-probabilities [V] (a new tensor: later processors change `logits`)."""
        self.last = logits.float().log_softmax(-1)

    def advance(self, token: int) -> bool:
        """Record the emitted token's entry (one host sync)."""
        assert self.last is not None, "a token is emitted from a read"
        values, ids = self.last.topk(self.top) if self.top else (self.last[:0], self.last[:0])
        host = torch.cat([self.last[token : token + 1].double(), values.double(), ids.double()]).tolist()
        n = self.top
        self.sink.append(TokenLogprob(token, host[0], [(int(i), v) for v, i in zip(host[1 : 1 + n], host[1 + n :])]))
        return False


class Penalties:
    """OpenAI's frequency and presence penalties over the tokens generated so far (the prompt's are not counted)."""

    def __init__(self, frequency: float, presence: float) -> None:
        self.frequency, self.presence = frequency, presence
        self.counts: torch.Tensor | None = None  # [V] on the logits' device, made at the first read

    def apply(self, logits: torch.Tensor) -> None:
        """logits -= frequency * count + presence * (count > 0), in place."""
        if self.counts is None:
            self.counts = torch.zeros(logits.shape[-1], dtype=torch.float32, device=logits.device)
        logits -= (self.frequency * self.counts + self.presence * (self.counts > 0)).to(logits.dtype)

    def advance(self, token: int) -> bool:
        """Count the token (on the device: no host sync)."""
        assert self.counts is not None, "a token is emitted from a read"
        self.counts[token] += 1
        return False


@dataclass
class Processors:
    """A request's processors, applied in order: the log-probability record first (raw logits), then penalties, then the mask."""

    parts: list[LogitsProcessor]

    @torch.inference_mode()  # logits come from inference-mode passes: changed in place only inside one
    def apply(self, logits: torch.Tensor) -> None:
        """Every processor on this read's logits [V], in place."""
        for part in self.parts:
            part.apply(logits)

    @torch.inference_mode()
    def advance(self, token: int) -> bool:
        """Every processor takes the emitted token; whether one of them ends generation."""
        return any([part.advance(token) for part in self.parts])


def for_sampling(sampling: SamplingParams, logprobs: list[TokenLogprob] | None) -> Processors | None:
    """The processors a request's sampling asks for (None: none, the plain path); `logprobs` receives the record."""
    parts: list[LogitsProcessor] = []
    if sampling.logprobs is not None:
        assert logprobs is not None
        parts.append(LogprobRecord(sampling.logprobs, logprobs))
    if sampling.frequency_penalty or sampling.presence_penalty:
        parts.append(Penalties(sampling.frequency_penalty, sampling.presence_penalty))
    if sampling.grammar is not None:
        parts.append(GrammarState(sampling.grammar))
    return Processors(parts) if parts else None


def check_processing(sampling: SamplingParams, policy: PolicyConfig) -> None:
    """One line unless the request's processing and its policy go together: rollback takes emitted tokens back, which
    a grammar, the penalties' counts and the log-probability record do not follow."""
    constrained = sampling.json_schema is not None or sampling.grammar is not None
    processed = constrained or sampling.logprobs is not None or sampling.frequency_penalty or sampling.presence_penalty
    if processed and policy.name == "exact":
        raise InvalidParameter("exact mode takes drafted tokens back: it does not go with logprobs, penalties or a json_schema (use policy big)")
    if processed and policy.name == "mobile" and policy.rollback and sampling.temperature == 0.0:
        raise InvalidParameter("rollback takes tokens back: it does not go with logprobs, penalties or a json_schema (use --kv-repair without --rollback)")
