"""Teacher-forced log-probabilities of a token sequence under a policy (what lm-eval's loglikelihood asks for).

Scoring is one prefill, which would run big for every policy; so little scores with little experts, and mobile
scores each position through the pass mobile would have emitted it from: little's distribution where little is
confident (criterion >= tau; `learned` reads the little pass's router signals too), big's elsewhere. Like `eval`'s teacher-forced mobile perplexity this is an
estimate: each pass runs over the whole sequence with its own KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mobile_moe.config import PolicyConfig
from mobile_moe.engine.llm import LLM
from mobile_moe.errors import InvalidParameter
from mobile_moe.policy.importance import LOGIT_CRITERIA, confidence_tensor, signal_confidence, step_signals


@dataclass(frozen=True)
class TokenLogprobs:
    """Per token of the sequence: its log-probability given the tokens before it (None for the first), and the `top`
    most probable tokens there (empty for the first)."""

    token_logprobs: list[float | None]
    top: list[list[tuple[int, float]]]


def policy_logprobs(llm: LLM, ids: list[int], policy: PolicyConfig) -> torch.Tensor:
    """Log-probabilities [T - 1, V] of each next token after positions 0..T-2, under the policy (see module doc)."""
    if policy.name == "big":
        return llm.logits(ids[:-1], "big").float().log_softmax(-1)
    if policy.name == "little":
        return llm.logits(ids[:-1], "little", policy.little_k).float().log_softmax(-1)
    if policy.tau is None or policy.criterion not in (*LOGIT_CRITERIA, "learned") or (policy.criterion == "learned" and policy.learned is None):
        raise InvalidParameter(f"teacher-forced mobile scoring needs a tau and a logits criterion ({', '.join(LOGIT_CRITERIA)}) or a fitted learned one")
    little, confidence = little_confidence(llm, ids[:-1], policy)
    big = llm.logits(ids[:-1], "big").float().log_softmax(-1)
    return torch.where((confidence >= policy.tau)[:, None], little, big)


def little_confidence(llm: LLM, ids: list[int], policy: PolicyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Little's teacher-forced log-probabilities [T, V] and its confidence at each position [T] under the policy's
    criterion (`learned`: from each position's logits and router signals, as a decode step of it would measure)."""
    if policy.criterion != "learned":
        little = llm.logits(ids, "little", policy.little_k).float().log_softmax(-1)
        return little, torch.stack([confidence_tensor(row, policy.criterion) for row in little])
    logits, gates = llm.routed_logits(ids, "little", policy.little_k)  # [T, V], [T, L, k]
    k = llm.little_k(policy)
    signals = torch.stack([step_signals(row, gate, k) for row, gate in zip(logits, gates)])  # [T, len(SIGNALS)]
    return logits.float().log_softmax(-1), signal_confidence(signals, "learned", policy.learned)


def score_tokens(llm: LLM, ids: list[int], policy: PolicyConfig, top: int) -> TokenLogprobs:
    """Each token's log-probability under the policy and the `top` alternatives at its position (top 0: none)."""
    if len(ids) < 2:
        return TokenLogprobs([None] * len(ids), [[] for _ in ids])
    logp = policy_logprobs(llm, ids, policy)  # [T - 1, V]
    target = torch.tensor(ids[1:], device=logp.device)
    chosen = logp.gather(1, target[:, None])[:, 0].tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in ids]
    if top > 0:
        values, indices = logp.topk(top, dim=-1)
        tops[1:] = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    return TokenLogprobs([None, *chosen], tops)
