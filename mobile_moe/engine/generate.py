"""The decode loop shared by all policies (docs/design.md §1)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mobile_moe.config import SamplingParams
from mobile_moe.engine.metrics import GenerationStats
from mobile_moe.engine.partial import PartialFallback
from mobile_moe.engine.passes import PassSpec, for_policy
from mobile_moe.engine.prefix import held_prefix, prefill_writer
from mobile_moe.engine.processors import Processors, TokenLogprob, for_sampling
from mobile_moe.engine.runner import Runner
from mobile_moe.engine.step import StepRow, decode_step, verify_tail
from mobile_moe.errors import InvalidParameter
from mobile_moe.experts.cache import CacheStats
from mobile_moe.layers.kv_cache import KVCache, SequenceSnapshot
from mobile_moe.layers.sampler import exponential_race, probabilities, sample
from mobile_moe.loading.budget import PREFILL_CHUNK
from mobile_moe.policy.acceptance import first_rejected, verdict_parts
from mobile_moe.policy.policies import Policy

TokenCallback = Callable[[int], bool]  # called with each emitted token; returning False stops generation after it


@dataclass(frozen=True)
class StepRecord:
    """One emitted token: the first pass's token, confidence and signals, and whether big replaced it."""

    first_token: int
    confidence: float | None
    fell_back: bool
    token: int
    signals: tuple[float, ...] = ()  # the little pass's importance signals (policy/importance.SIGNALS), when measured


@dataclass
class GenerationResult:
    """Generated ids (prompt excluded), optional text, counters and a per-token record."""

    token_ids: list[int]
    stats: GenerationStats
    steps: list[StepRecord] = field(default_factory=list)
    text: str | None = None
    finish_reason: str = "length"  # length | stop (an EOS token) | cancelled (the token callback asked to stop)
    logprobs: list[TokenLogprob] | None = None  # per emitted token, with SamplingParams.logprobs


@dataclass
class Decoder:
    """State of one generation: runner, KV cache, sampling, policy, result so far."""

    runner: Runner
    kv: KVCache
    sampling: SamplingParams
    policy: Policy
    generator: torch.Generator | None
    result: GenerationResult
    first: PassSpec  # every decode step's first pass (big, or little recording its routing when it may fall back); little_k resolved
    fallback: PassSpec  # its big pass: the same knobs, every top-k expert, nothing recorded (made once, not per step)
    little_positions: int = 0  # trailing KV positions written by little passes (since the last big pass)
    rollback: bool = False  # a repairing fallback also checks little's tokens at the repaired positions (`check_repaired`)
    sampled: torch.Tensor | None = None  # [2, 1] int64 on the device: the last `read`'s token in one row, alternating, so a
    # pass's input (the other row) stays intact for a fallback that reruns it
    next_token: int | None = None  # the last `read`'s token on the host
    next_row: int = 0  # the row of `sampled` holding it
    partial: PartialFallback | None = None  # partial fallbacks, when its policy asks for them (`enable_partial`)
    processor: Processors | None = None  # the request's logits processing (engine/processors.py): applied on every read
    draft_probs: torch.Tensor | None = None  # exact, sampling: [draft_max + 1, V] the distribution each drafted token was drawn
    # from, in row little_positions (speculative sampling's p_little)

    @property
    def speculative(self) -> bool:
        """Whether big's verdict on a draft comes from `verify_draft` (exact mode sampling, or a forced acceptance rate);
        greedy exact mode compares big's greedy tokens (`read_checked`)."""
        return self.policy.verifies and (self.sampling.temperature > 0.0 or self.policy.forced_acceptance is not None)

    def read(self, logits: torch.Tensor, with_confidence: bool) -> tuple[int, int, float | None, tuple[float, ...]]:
        """(sampled token, greedy token, confidence or None, signals) of one pass's logits [V], in one host sync; the
        sampled token also stays on the device (`sampled`), so the next decode pass uploads nothing."""
        parts = self.read_parts(logits, with_confidence, lambda: self.runner.weight_buf)
        values = self.parse(self.to_host(parts), with_confidence)
        self.next_token = values[0]
        return values

    def to_host(self, parts: list[torch.Tensor]) -> list[float]:
        """`read_parts` (+ anything else) in one host sync; the sampled token (parts[0]) also stays on the device."""
        if self.sampled is None:
            self.sampled = torch.zeros(2, 1, dtype=torch.int64, device=parts[0].device)
        self.next_row = 1 - self.next_row
        self.sampled[self.next_row].copy_(parts[0])  # a float64 holds every vocabulary id exactly
        return self.runner.cache.transfer.to_host(torch.cat(parts))

    def read_checked(self, logits: torch.Tensor, little: list[int]) -> tuple[int, int | None, int]:
        """Big's logits [r + 1, V] over r repaired positions and this step -> (this step's token, the first repaired row
        whose greedy token is not the `little` token emitted there (None: all agree), big's token there), in one sync."""
        parts = self.read_parts(logits[-1], False, lambda: self.runner.weight_buf)
        values = self.to_host(parts + [logits[:-1].argmax(-1).double()])  # + [r] big's greedy tokens
        self.next_token = int(values[0])
        big = [int(v) for v in values[2:]]
        wrong = next((i for i, (b, t) in enumerate(zip(big, little)) if b != t), None)
        return self.next_token, wrong, big[wrong] if wrong is not None else -1

    def input_ids(self, token: int) -> torch.Tensor:
        """The decode pass's input [1] for `token`: the device copy `read` left when it holds that token, else uploaded."""
        if self.sampled is not None and self.next_token == token:
            return self.sampled[self.next_row]
        return self.runner.ids([token])

    def read_parts(self, logits: torch.Tensor, with_confidence: bool, router_weights: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
        """What `read` brings to the host for logits [V], still on the device: token, greedy token[, confidence, signals]."""
        if self.processor is not None:
            self.processor.apply(logits)  # in place: penalties and a grammar's mask, before anything reads them
        if self.draft_probs is not None:  # a drafted token's distribution is kept for big's verdict
            probs = probabilities(logits, self.sampling.temperature, self.sampling.top_p)  # [V]
            self.draft_probs[self.little_positions].copy_(probs)
            token = exponential_race(probs, self.generator)
        else:
            token = sample(logits, self.sampling.temperature, self.sampling.top_p, self.generator)
        greedy = token if self.sampling.temperature == 0.0 else logits.argmax()
        parts = [token.double()[None], greedy.double()[None]]
        if with_confidence:
            little_k = self.first.little_k
            assert little_k is not None
            conf, signals = self.policy.measure(logits, router_weights, little_k)
            parts += [conf.double()[None]] + ([] if signals is None else [signals.double()])  # + [S]
            if self.partial is not None:  # + the MoE layer a partial fallback would start at
                parts.append(self.partial.start_part(router_weights(), little_k))
        return parts

    def parse(self, values: list[float], with_confidence: bool) -> tuple[int, int, float | None, tuple[float, ...]]:
        """`read`'s result from the host values of `read_parts` (a partial fallback's start layer goes to `partial`)."""
        if not with_confidence:
            return int(values[0]), int(values[1]), None, ()
        if self.partial is not None:
            self.partial.read_start(values[-1])
            values = values[:-1]
        return int(values[0]), int(values[1]), values[2], tuple(values[3:])

    def accept(self, token: int, greedy: int, conf: float | None, signals: tuple[float, ...], fell_back: bool, little_pass: bool) -> None:
        """Record a decode step's outcome (the first pass's token `greedy` and, after a fallback, big's `token`);
        `little_pass`: whether the position kept in the KV cache was written by a little pass."""
        if fell_back:
            self.result.stats.fallback_tokens += 1
            self.result.steps.append(StepRecord(greedy, conf, True, token, signals))
        else:
            self.result.steps.append(StepRecord(token, conf, False, token, signals))
        kept = little_pass and not fell_back
        self.little_positions = self.little_positions + 1 if kept else 0
        if self.partial is not None:
            self.partial.accepted(kept)

    def check_repaired(self, logits: torch.Tensor, repair: int, greedy: int | None, conf: float | None, signals: tuple[float, ...]) -> int:
        """After a repairing big pass (logits [repair + 1, V]): where big's greedy token differs from a little token
        emitted at a repaired position, take back that token and every later one (their KV positions too) and put big's
        in its place; else this step's big token, as a plain fallback (greedy None: the step ran no first pass).
        Returns the token emitted last."""
        if self.speculative:
            wrong, big = self.verify_draft(logits, repair)
            nxt = big
        else:
            nxt, wrong, big = self.read_checked(logits, self.result.token_ids[-repair:])
        if wrong is None:
            self.accept(nxt, nxt if greedy is None else greedy, conf, signals, fell_back=True, little_pass=False)
            return nxt
        taken = repair - wrong  # tokens after the first wrong one's input, the wrong one included
        self.kv.rewind(taken)  # their positions: the inputs after the wrong token's
        return self.take_back(taken, big)

    def verify_draft(self, logits: torch.Tensor, n: int) -> tuple[int | None, int]:
        """Big's verdict on the last n emitted (drafted) tokens from its logits [R, V] over them (R = n, or n + 1 with the
        position after them), in one host sync: (the first one it rejects, None when it keeps all; the token it emits
        there or after them, -1 for R = n and none rejected). Sampling: speculative sampling (policy/acceptance.py)."""
        drafted = self.runner.ids(self.result.token_ids[-n:])  # [n]
        sampling = self.sampling
        parts = verdict_parts(logits, drafted, self.draft_probs, sampling.temperature, sampling.top_p, self.generator, self.policy.forced_acceptance)
        self.next_token = None  # the token is chosen on the host: the next pass uploads its input
        return first_rejected(self.runner.cache.transfer.to_host(parts), n)

    def take_back(self, taken: int, big: int) -> int:
        """Take back the last `taken` emitted tokens, the first of them one big disagrees with, and record big's token
        `big` in its place (their KV positions already rewound). Returns `big`."""
        result = self.result
        first = result.steps[-taken]  # the little step that emitted the wrong token
        del result.token_ids[-taken:], result.steps[-taken:]
        result.stats.fallback_tokens += 1
        result.stats.rolled_back_tokens += taken
        result.steps.append(StepRecord(first.first_token, first.confidence, True, big, first.signals))
        self.little_positions = 0
        if self.partial is not None:
            self.partial.accepted(False)
        return big


def new_decoder(runner: Runner, kv: KVCache, prompt: list[int], sampling: SamplingParams, policy: Policy) -> Decoder:
    """The state of one generation over a fresh KV cache (its own sampler seeded from `sampling.seed`) and its passes."""
    device = runner.model.device
    seed = 0 if sampling.seed is None and policy.forced_acceptance is not None else sampling.seed  # a forced rate's draws: seeded
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    first = for_policy(policy.config, policy.decode_mode, runner.little_k_of(policy.config.little_k), policy.may_fall_back)
    result = GenerationResult(token_ids=[], stats=GenerationStats(prompt_tokens=len(prompt)), logprobs=None if sampling.logprobs is None else [])
    dec = Decoder(runner, kv, sampling, policy, generator, result, first, first.big(), processor=for_sampling(sampling, result.logprobs))
    if policy.verifies and sampling.temperature > 0.0:
        dec.draft_probs = torch.zeros(policy.draft_max + 1, runner.model.vocab_size, device=device)
    return dec


def rolls_back(policy: Policy, sampling: SamplingParams, kv: KVCache) -> bool:
    """Whether repairing fallbacks also check little's tokens: exact mode (greedy, or by speculative sampling), else asked
    for and greedy (a sampled token has no single right answer to check), and with repair possible (no recurrent layers)."""
    if policy.verifies and kv.recurrent:
        raise InvalidParameter("exact mode needs every drafted position rewound, and this model's recurrent layers cannot be: use policy big")
    return policy.config.rollback_window > 0 and (policy.verifies or sampling.temperature == 0.0) and not kv.recurrent


def enable_partial(dec: Decoder) -> None:
    """Partial fallbacks for this decoder when its policy asks for them and its KV cache allows (no recurrent layers,
    whose states go back only to before the step): the per-position layer inputs they resume from."""
    share = dec.policy.config.partial_fallback
    if share is None or dec.kv.recurrent or not dec.policy.may_fall_back:
        return
    model = dec.runner.model
    rows = (dec.policy.config.kv_repair or 0) + 1  # this step and the positions a fallback may repair
    inputs = torch.zeros(rows, len(model.model.layers), model.info.hidden, dtype=model.dtype, device=model.device)
    dec.partial = PartialFallback(share, inputs, model.info.moe_layers)


def stream_for(dec: Decoder, on_token: TokenCallback | None) -> Stream:
    """The decoder's token stream: held back by its repair window when it rolls back, else passing each token at once."""
    return Stream(on_token, dec.policy.config.rollback_window if dec.rollback else 0)


@dataclass
class Stream:
    """Hands emitted tokens to the callback once final: `hold` tokens behind the newest while a rollback may still take
    them back, all of them at the end."""

    on_token: TokenCallback | None
    hold: int
    sent: int = 0

    def send(self, result: GenerationResult, upto: int | None = None) -> bool:
        """Pass the tokens no rollback can take back any more; False (and the result cut there) when the callback stops."""
        end = len(result.token_ids) - self.hold if upto is None else upto
        while self.on_token is not None and self.sent < end:
            self.sent += 1
            if not self.on_token(result.token_ids[self.sent - 1]):
                del result.token_ids[self.sent :], result.steps[self.sent :]
                result.finish_reason = "cancelled"
                return False
        return True

    def finish(self, result: GenerationResult) -> None:
        """The held tokens once decoding has stopped (an EOS that stopped it is not passed on, as without holding)."""
        if result.finish_reason != "cancelled":
            self.send(result, len(result.token_ids) - (result.finish_reason == "stop"))


def emit(result: GenerationResult, token: int, sampling: SamplingParams, eos: tuple[int, ...], processor: Processors | None = None) -> bool:
    """Append an emitted token; whether generation goes on (not EOS, not a finished grammar, under the token limit; the
    callback is `Stream`'s)."""
    result.token_ids.append(token)
    if processor is not None and processor.advance(token):
        result.finish_reason = "stop"
        return False
    if sampling.stop_at_eos and token in eos:
        result.finish_reason = "stop"
        return False
    return len(result.token_ids) < sampling.max_new_tokens


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill(runner: Runner, prompt: list[int], kv: KVCache, spec: PassSpec) -> torch.Tensor:
    """The prompt in chunks of PREFILL_CHUNK tokens (bounded activations); logits of its last position [V]."""
    for start in range(0, len(prompt), PREFILL_CHUNK):
        logits = runner.forward(runner.ids(prompt[start : start + PREFILL_CHUNK]), kv, spec)
    return logits


def generate(
    runner: Runner,
    prompt: list[int],
    sampling: SamplingParams,
    policy: Policy,
    eos: tuple[int, ...],
    on_token: TokenCallback | None = None,
) -> GenerationResult:
    """Prefill the prompt, then decode token by token under the policy; stops at EOS, the token limit, or when `on_token` says so."""
    device = runner.model.device
    writer = prefill_writer(policy, runner.little_k_of(policy.config.little_k))
    kv, reused = runner.sequence_kv(prompt, writer, len(prompt) + sampling.max_new_tokens)
    dec = new_decoder(runner, kv, prompt, sampling, policy)
    dec.rollback = rolls_back(policy, sampling, dec.kv)
    enable_partial(dec)
    stream = stream_for(dec, on_token)
    stats, before = dec.result.stats, Counters.now(runner)
    stats.reused_tokens, stats.prefix_hits = reused, int(reused > 0)

    start = time.perf_counter()
    token, _, _, _ = dec.read(_prefill(runner, prompt[reused:], dec.kv, dec.first.with_mode(policy.prefill_mode)), with_confidence=False)
    _synchronize(device)
    stats.prefill_s = time.perf_counter() - start
    boundary = prompt_boundary(runner, dec.kv)
    dec.result.steps.append(StepRecord(token, None, False, token))
    after_prefill = Counters.now(runner)

    start = time.perf_counter()
    decode(runner, dec, token, eos, stream)
    _synchronize(device)
    stats.decode_s = time.perf_counter() - start
    stats.tokens = len(dec.result.token_ids)
    fill_counters(stats, runner, before, after_prefill)
    runner.remember(dec.kv, held_prefix(prompt, dec.result.steps, dec.kv, writer, policy, boundary))
    return dec.result


def decode(runner: Runner, dec: Decoder, token: int, eos: tuple[int, ...], stream: Stream) -> None:
    """Emit `token` (the prompt's) and decode step by step until EOS, the token limit or the callback stops it; exact mode
    verifies an open draft before stopping, and goes on where big took drafted tokens back."""
    step = 0
    while True:
        while emit(dec.result, token, dec.sampling, eos, dec.processor) and stream.send(dec.result):
            step += 1
            token = decode_step(runner, [StepRow(dec, token, step)])[0]
        late = verify_tail(runner, dec) if dec.policy.verifies and dec.result.finish_reason != "cancelled" else None
        if late is None:
            break
        token, dec.result.finish_reason = late, "length"  # big took back drafted tokens: go on from its own
    stream.finish(dec.result)


def prompt_boundary(runner: Runner, kv: KVCache) -> SequenceSnapshot | None:
    """A copy of the recurrent states right after a prompt, where a later request sharing the prompt resumes (None: no
    recurrent layers, or no reuse)."""
    return kv.snapshot() if kv.recurrent and runner.prefixes.enabled else None


@dataclass(frozen=True)
class Counters:
    """The engine's running counters at one moment: a request's counters are differences of two of these."""

    cache: CacheStats
    wait_s: float
    host_syncs: int
    graph_captures: int = 0
    graph_replays: int = 0

    @staticmethod
    def now(runner: Runner) -> Counters:
        """The counters of the runner's cache and transfer engine now."""
        transfer, graphs = runner.cache.transfer, runner.graphs
        captures, replays = (0, 0) if graphs is None else (graphs.captures, graphs.replays)
        return Counters(runner.cache.stats.snapshot(), transfer.wait_s(), transfer.host_syncs, captures, replays)


def fill_counters(stats: GenerationStats, runner: Runner, start: Counters, after_prefill: Counters) -> None:
    """Counters accumulated since `start` (the request), and since `after_prefill` (its decode phase alone)."""
    end = Counters.now(runner)
    now, before, decoded = end.cache, start.cache, after_prefill.cache
    stats.host_syncs, stats.decode_host_syncs = end.host_syncs - start.host_syncs, end.host_syncs - after_prefill.host_syncs
    stats.transfer_wait_s, stats.decode_transfer_wait_s = end.wait_s - start.wait_s, end.wait_s - after_prefill.wait_s
    stats.expert_hits, stats.decode_expert_hits = now.hits - before.hits, now.hits - decoded.hits
    stats.expert_misses, stats.decode_expert_misses = now.misses - before.misses, now.misses - decoded.misses
    stats.h2d_bytes, stats.decode_h2d_bytes = now.h2d_bytes - before.h2d_bytes, now.h2d_bytes - decoded.h2d_bytes
    stats.disk_bytes, stats.decode_disk_bytes = now.disk_bytes - before.disk_bytes, now.disk_bytes - decoded.disk_bytes
    stats.host_tier_hits = now.host_hits - before.host_hits
    stats.graph_captures, stats.graph_replays = end.graph_captures - start.graph_captures, end.graph_replays - start.graph_replays
    stats.prefetched = now.prefetched - before.prefetched
    stats.cache_slots = runner.cache.num_slots
    stats.expert_path = runner.executor.path(resident=len(runner.cache.where) >= runner.cache.store.total_experts)
    stats.total_experts = runner.cache.store.total_experts
    stats.host_pinned_bytes = runner.cache.store.pinned_bytes
