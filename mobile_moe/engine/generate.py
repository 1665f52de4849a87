"""The decode loop shared by all policies (DESIGN.md §1)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mobile_moe.config import SamplingParams
from mobile_moe.engine.metrics import GenerationStats
from mobile_moe.engine.runner import Runner
from mobile_moe.experts.cache import CacheStats
from mobile_moe.layers.kv_cache import KVCache
from mobile_moe.layers.moe import ExpertMode
from mobile_moe.layers.sampler import sample
from mobile_moe.policy.policies import Policy


@dataclass(frozen=True)
class StepRecord:
    """One emitted token: the first pass's token and confidence, and whether big replaced it."""

    first_token: int
    confidence: float | None
    fell_back: bool
    token: int


@dataclass
class GenerationResult:
    """Generated ids (prompt excluded), optional text, counters and a per-token record."""

    token_ids: list[int]
    stats: GenerationStats
    steps: list[StepRecord] = field(default_factory=list)
    text: str | None = None
    finish_reason: str = "length"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(runner: Runner, prompt: list[int], sampling: SamplingParams, policy: Policy, eos: tuple[int, ...]) -> GenerationResult:
    """Prefill the prompt, then decode token by token under the policy; stops at EOS or the token limit."""
    device = runner.model.lm_head.weight.device
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None
    kv = runner.new_kv(len(prompt) + sampling.max_new_tokens)
    cache, transfer = runner.cache, runner.cache.transfer
    before, wait_before = cache.stats.snapshot(), transfer.wait_s
    result = GenerationResult(token_ids=[], stats=GenerationStats(prompt_tokens=len(prompt)))

    start = time.perf_counter()
    logits = runner.forward(torch.tensor(prompt, device=device), kv, policy.prefill_mode)
    token = sample(logits, sampling.temperature, sampling.top_p, generator)
    _synchronize(device)
    result.stats.prefill_s = time.perf_counter() - start
    result.steps.append(StepRecord(token, None, False, token))

    start = time.perf_counter()
    while True:
        result.token_ids.append(token)
        if sampling.stop_at_eos and token in eos:
            result.finish_reason = "stop"
            break
        if len(result.token_ids) >= sampling.max_new_tokens:
            break
        token = _decode_step(runner, kv, token, sampling, policy, generator, result)
    _synchronize(device)
    result.stats.decode_s = time.perf_counter() - start
    result.stats.tokens = len(result.token_ids)
    _fill_counters(result.stats, runner, before, transfer.wait_s - wait_before)
    return result


def _decode_step(runner: Runner, kv: KVCache, token: int, sampling: SamplingParams, policy: Policy, generator: torch.Generator | None, result: GenerationResult) -> int:
    """One MoBiLE step: first pass (big or little); if the policy says so, rewind and redo it with big."""
    ids = torch.tensor([token], device=kv.k[0].device)
    logits = runner.forward(ids, kv, policy.decode_mode, record=policy.may_fall_back)
    conf = policy.confidence(logits) if policy.may_fall_back else None
    if conf is None or not policy.falls_back(conf):
        nxt = sample(logits, sampling.temperature, sampling.top_p, generator)
        result.steps.append(StepRecord(nxt, conf, False, nxt))
        return nxt
    first = int(logits.argmax())
    routing_log = runner.routing_log or {}
    kv.rewind(1)
    if policy.config.prefetch_on_fallback:
        runner.prefetch_other_half(routing_log)
    logits = runner.forward(ids, kv, ExpertMode.BIG)
    nxt = sample(logits, sampling.temperature, sampling.top_p, generator)
    result.stats.fallback_tokens += 1
    result.steps.append(StepRecord(first, conf, True, nxt))
    return nxt


def _fill_counters(stats: GenerationStats, runner: Runner, before: CacheStats, wait_s: float) -> None:
    """Cache counters accumulated during this request."""
    now = runner.cache.stats
    stats.expert_hits = now.hits - before.hits
    stats.expert_misses = now.misses - before.misses
    stats.prefetched = now.prefetched - before.prefetched
    stats.h2d_bytes = now.h2d_bytes - before.h2d_bytes
    stats.transfer_wait_s = wait_s
    stats.cache_slots = runner.cache.num_slots
    stats.total_experts = runner.cache.store.total_experts
