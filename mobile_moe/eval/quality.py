"""Quality of big / little / MoBiLE on text: perplexity, greedy agreement with big, next-line accuracy, fallback rate."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm import tqdm

from mobile_moe.config import LearnedImportance, PolicyConfig, SamplingParams
from mobile_moe.engine.llm import LLM
from mobile_moe.errors import InvalidParameter
from mobile_moe.eval.agreement import Agreement, compare
from mobile_moe.eval.prompts import Prompt, predicted_next_line
from mobile_moe.policy.importance import confidence, signal_confidence, step_signals

PPL_WINDOW = 256


@dataclass(frozen=True)
class Run:
    """One policy's continuations of every prompt, scored against big's."""

    policy: str
    tau: float | None
    criterion: str | None
    agreement: float
    agreement_overall: float
    exact_match: float
    next_line_exact: float
    fallback_rate: float
    tokens: int
    agreement_ci: tuple[float, float] = (1.0, 1.0)  # 95% bootstrap interval over prompts
    prefill_agreement: float = 1.0  # share of prompts whose first (prefill) token is big's; not part of `agreement`
    judged_tokens: int = 0  # decode tokens `agreement` is computed on
    loads_per_token: float = 0.0  # experts copied to the device cache per decode step (on a miss or by prefetch)
    loads_vs_big: float = 1.0  # loads_per_token relative to big's on the same prompts and cache
    variant: str = ""  # little-pass knobs in use ("" for none)
    decode_steps: int = 0
    rolled_back_rate: float = 0.0  # little tokens a rollback took back, per emitted decode step (decoded, then replaced)
    per_prompt: tuple[tuple[int, int], ...] = field(default=(), repr=False)  # (matches, divergences) per judged prompt, for pooling

    def to_dict(self) -> dict:
        """JSON-ready (without the per-prompt counts)."""
        out = asdict(self)
        del out["per_prompt"]
        return out


@dataclass
class Continuations:
    """Generated ids and texts of one policy over all prompts, with its fallback counts."""

    ids: list[list[int]]
    texts: list[str]
    fallbacks: int
    decode_steps: int
    loads: int = 0  # experts copied to the device cache during decode
    rolled_back: int = 0  # little tokens rollbacks took back


def continue_prompts(llm: LLM, prompts: list[list[int]], policy: PolicyConfig, new_tokens: int, bar: tqdm | None = None) -> Continuations:
    """Greedy continuations of every prompt under one policy."""
    out = Continuations([], [], 0, 0)
    sampling = SamplingParams(max_new_tokens=new_tokens, stop_at_eos=True)
    for ids in prompts:
        result = llm.generate(ids, sampling, policy)
        out.ids.append(result.token_ids)
        out.texts.append(result.text or "")
        out.fallbacks += result.stats.fallback_tokens
        out.decode_steps += max(result.stats.tokens - 1, 0)
        out.rolled_back += result.stats.rolled_back_tokens
        out.loads += result.stats.decode_h2d_bytes // llm.loaded.store.expert_bytes  # misses and prefetches alike
        if bar is not None:
            bar.update()
    return out


def score(policy: PolicyConfig, cont: Continuations, big: Continuations, prompts: list[Prompt]) -> Run:
    """A Run comparing `cont` with big's continuations and the real next lines."""
    agree = compare(big.ids, cont.ids)
    predicted = [predicted_next_line(text) for text in cont.texts]
    hits = sum(line is not None and line.rstrip() == p.next_line.rstrip() for line, p in zip(predicted, prompts))
    mobile = policy.name == "mobile"
    loads, big_loads = _per_step(cont.loads, cont.decode_steps), _per_step(big.loads, big.decode_steps)
    return Run(
        policy=policy.name,
        tau=policy.tau if mobile else None,
        criterion=policy.criterion if mobile else None,
        agreement=agree.agreement,
        agreement_overall=agree.agreement_overall,
        exact_match=agree.exact_match,
        next_line_exact=hits / len(prompts) if prompts else 0.0,
        fallback_rate=_per_step(cont.fallbacks, cont.decode_steps),
        tokens=sum(len(i) for i in cont.ids),
        agreement_ci=agree.agreement_ci,
        prefill_agreement=agree.prefill_agreement,
        judged_tokens=agree.judged_tokens,
        loads_per_token=loads,
        loads_vs_big=loads / big_loads if big_loads else 1.0,
        variant=variant_name(policy),
        decode_steps=cont.decode_steps,
        per_prompt=agree.per_prompt,
        rolled_back_rate=_per_step(cont.rolled_back, cont.decode_steps),
    )


def variant_name(policy: PolicyConfig) -> str:
    """The little-pass knobs of a policy, as a short label ("" when none is on)."""
    knobs = [
        ("little-k", policy.little_k),
        ("layer-adaptive", policy.layer_adaptive),
        ("cache-prior", policy.cache_prior),
        ("kv-repair", policy.kv_repair or None),
        ("partial-fallback", policy.partial_fallback),
    ]
    label = "+".join(f"{name}={value:g}" for name, value in knobs if value is not None)
    return label + "+rollback" if policy.rollback_window else label


def _per_step(count: int, steps: int) -> float:
    """count / steps, 0 without steps."""
    return count / steps if steps else 0.0


def mobile_sweep(base: PolicyConfig, taus: Iterable[float]) -> list[PolicyConfig]:
    """The mobile policy of `base` at each tau."""
    return [replace(base, name="mobile", tau=tau) for tau in taus]


def policy_runs(
    llm: LLM,
    prompts: list[Prompt],
    mobiles: list[PolicyConfig],
    new_tokens: int,
    progress: bool = True,
    reference: LLM | None = None,
) -> tuple[list[Run], Agreement | None]:
    """big, little (once per knob setting among the mobiles) and each mobile configuration, all on the same prompts.

    With a `reference` (the same model with float experts), also how often this big's greedy tokens agree with the reference's big.
    """
    ids = [llm.encode(p.text) for p in prompts]
    knobs = dict.fromkeys((m.little_weights, m.layer_adaptive, m.cache_prior, m.little_k) for m in mobiles) or {("native", None, None, None): None}
    littles = [PolicyConfig("little", little_weights=w, layer_adaptive=a, cache_prior=c, little_k=n) for w, a, c, n in knobs]  # kv_repair: mobile only
    total = len(ids) * (1 + len(littles) + len(mobiles) + (reference is not None))
    with tqdm(total=total, desc="generating", unit="prompt", disable=(not progress) or None, leave=False) as bar:
        big_policy = PolicyConfig("big")
        big = continue_prompts(llm, ids, big_policy, new_tokens, bar)
        runs = [score(big_policy, big, big, prompts)]
        runs += [score(policy, continue_prompts(llm, ids, policy, new_tokens, bar), big, prompts) for policy in littles + mobiles]
        versus = None if reference is None else compare(continue_prompts(reference, ids, big_policy, new_tokens, bar).ids, big.ids)
    return runs, versus


@dataclass(frozen=True)
class TokenScores:
    """Per predicted token: log-probability of the true token under big and little, and little's confidence."""

    big: torch.Tensor  # [N]
    little: torch.Tensor  # [N]
    little_conf: torch.Tensor  # [N]
    files: int = 0  # files the scored windows came from
    files_total: int = 0  # files the windows were sampled from
    differs: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))  # [N] little's greedy token is not big's
    window: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [N] the window each position is in


def sample_windows(token_lists: list[list[int]], window: int, max_tokens: int, seed: int = 0) -> list[tuple[int, list[int]]]:
    """(file index, ids) windows of up to window + 1 tokens cut from every file, drawn in a seeded random order
    until max_tokens tokens are predicted (the last one shortened to fit); returned in file order."""
    pool = [(i, ids[s : s + window + 1]) for i, ids in enumerate(token_lists) for s in range(0, max(len(ids) - 1, 0), window)]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    picked, budget = [], max_tokens
    for j in order:
        if budget <= 0:
            break
        file, ids = pool[j]
        ids = ids[: budget + 1]
        picked.append((j, file, ids))
        budget -= len(ids) - 1
    return [(file, ids) for _, file, ids in sorted(picked)]


def token_scores(
    llm: LLM,
    texts: list[str],
    max_tokens: int,
    criterion: str | None,
    progress: bool = True,
    seed: int = 0,
    learned: LearnedImportance | None = None,
    little_k: int | None = None,
) -> TokenScores:
    """Teacher-forced scores on up to max_tokens tokens in windows of PPL_WINDOW tokens sampled (seeded) across all texts.

    little_conf is measured for the criterion (None: left empty): one of the logits alone, or `learned` (with its fitted
    predictor) from each position's logits and router signals in the little pass; little runs little_k experts (None: half).
    """
    eos = list(llm.eos_token_ids[:1])
    windows = sample_windows([llm.encode(text) + eos for text in texts], min(PPL_WINDOW, llm.max_context - 1), max_tokens, seed)
    big, little, conf, tops = [], [], [], {"big": [], "little": []}
    for _, ids in tqdm(windows, desc="perplexity", unit="window", disable=(not progress) or None, leave=False):
        target = torch.tensor(ids[1:])
        for mode, sink in (("big", big), ("little", little)):
            if mode == "little" and criterion == "learned":
                logits, gates = llm.routed_logits(ids[:-1], mode, little_k)  # [T, V], [T, L, k]
                conf.append(learned_confidence(logits, gates, llm.runner.little_k_of(little_k), learned).cpu())
            else:
                logits = llm.logits(ids[:-1], mode, little_k)
            logp = logits.float().log_softmax(-1)  # [T, V]
            sink.append(logp.gather(1, target[:, None].to(logp.device))[:, 0].cpu())
            tops[mode].append(logp.argmax(-1).cpu())
            if mode == "little" and criterion is not None and criterion != "learned":
                conf.append(torch.tensor([confidence(row, criterion) for row in logp]))
    window = torch.cat([torch.full((len(ids) - 1,), i) for i, (_, ids) in enumerate(windows)])
    return TokenScores(
        torch.cat(big),
        torch.cat(little),
        torch.cat(conf) if conf else torch.zeros(0),
        files=len({f for f, _ in windows}),
        files_total=len(texts),
        differs=torch.cat(tops["big"]) != torch.cat(tops["little"]),
        window=window,
    )


def learned_confidence(logits: torch.Tensor, gates: torch.Tensor, little_k: int, learned: LearnedImportance | None) -> torch.Tensor:
    """logits [T, V] and gate values [T, L, k] of a little pass -> the learned criterion's confidence at each position [T]."""
    if learned is None:
        raise InvalidParameter("the learned criterion needs a fitted predictor (calibrate, or the model's mobile_moe.json)")
    signals = torch.stack([step_signals(row, gate, little_k) for row, gate in zip(logits, gates)])  # [T, len(SIGNALS)]
    return signal_confidence(signals, "learned", learned)


def perplexity(logprobs: torch.Tensor) -> float:
    """exp(mean negative log-likelihood)."""
    return math.exp(-float(logprobs.mean()))


def mobile_perplexity(scores: TokenScores, tau: float, rollback: int = 0) -> float:
    """Teacher-forced MoBiLE perplexity: little's prediction where it is confident (>= tau), big's elsewhere; with
    `rollback` N (repair N + rollback), also big's where little's greedy token differs from big's and a fallback
    follows within N positions of the same window (that fallback takes the little token back and emits big's).

    An estimate: each pass runs over the whole window with its own KV cache, while real MoBiLE decoding
    mixes the two passes' KV entries.
    """
    return perplexity(torch.where(big_positions(scores, tau, rollback), scores.big, scores.little))


def big_positions(scores: TokenScores, tau: float, rollback: int = 0) -> torch.Tensor:
    """[N] bool: the positions mobile emits from big's pass (see `mobile_perplexity`)."""
    falls = scores.little_conf < tau  # [N]
    big = falls.clone()
    n = falls.numel()
    for ahead in range(1, rollback + 1):  # a fallback `ahead` positions later, in the same window, checks this one
        later = torch.zeros(n, dtype=torch.bool)
        later[: n - ahead] = falls[ahead:] & (scores.window[ahead:] == scores.window[: n - ahead])
        big |= later & scores.differs
    return big
