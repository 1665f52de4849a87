"""Does exact mode pay, and where (`bench --drafts`): the costs a draft-and-verify cycle is made of, measured on this
machine, a model of the cycle's speed over big for draft lengths 1..8, and exact mode itself run beside big.

A cycle of draft length n: n little passes, then one big pass over the n drafted positions and the step's input. With
little's greedy token equal to big's with probability p at each position (independently), a cycle emits
1 + p + ... + p^n tokens (the accepted prefix, then big's own token), so exact mode over big is

    speedup(n) = (1 - p^(n+1)) / (1 - p) * t_big(1) / (n * t_little + t_big(n + 1)),

t_big(m) being a big pass over m positions. Offloaded, t_big(m) grows with the union of the experts m consecutive
positions route to (measured here from big's own routing); the same replay of expert accesses the bench's other
systems use (`costmodel.predict`) predicts each cycle on the consumer-GPU and disk profiles from exact mode's traces
(tokens over the replayed decode seconds: a step whose token big takes back emits nothing).

On random weights (`bench --drafts --synthetic S --accept-rate P`) little's agreement with big says nothing of a trained
model's, so exact mode keeps each drafted token with probability P (a bench-only field of the engine's Policy, never
reachable from a request) and runs beside big in interleaved rounds: measured, modelled at P, and replayed.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from statistics import median

import torch

from mobile_moe.bench.costmodel import ModelCost, predict
from mobile_moe.bench.profiles import HardwareProfile
from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.engine.generate import GenerationResult, generate
from mobile_moe.engine.llm import LLM
from mobile_moe.engine.passes import BIG, LITTLE
from mobile_moe.experts.trace import Access, Trace
from mobile_moe.policy.policies import Policy

POSITIONS = 9  # big passes over 1..9 positions: verifying drafts of 1..8 tokens
DRAFTS = (1, 2, 3, 4, 5, 6, 7, 8)


@dataclass
class DraftCosts:
    """What a draft-and-verify cycle costs on this model and machine, and exact mode's measured and modelled speed."""

    acceptance: float  # P(little's greedy token == big's), teacher-forced on big's greedy output
    little_s: float  # one little decode pass
    big_s: list[float]  # a big pass over m = 1..POSITIONS positions
    union: list[float]  # distinct experts per MoE layer that m = 1..POSITIONS consecutive decode tokens route to (big)
    big_tok_s: float  # big decoding alone, measured beside exact mode
    rows: list[dict] = field(default_factory=list)  # per draft length: modelled and measured speed over big


def modelled_speedup(acceptance: float, n: int, little_s: float, big_s: list[float]) -> float:
    """Exact mode over big for draft length n from the cycle's costs (the module's formula)."""
    tokens = float(n + 1) if acceptance >= 1.0 else (1.0 - acceptance ** (n + 1)) / (1.0 - acceptance)
    return tokens * big_s[0] / (n * little_s + big_s[n])


def expected_union(runs: list[list[list[set[int]]]], span: int) -> float:
    """Mean over runs, windows of `span` consecutive decode tokens and MoE layers of the number of distinct experts the
    window routes to (runs[r][t][l]: run r's token t's experts at MoE layer l)."""
    sizes = [
        len(set().union(*(tokens[t][layer] for t in range(start, start + span))))
        for tokens in runs
        for start in range(len(tokens) - span + 1)
        for layer in range(len(tokens[0]))
    ]
    return sum(sizes) / len(sizes) if sizes else float("nan")


def routed_sets(trace: list[Access]) -> list[list[list[set[int]]]]:
    """Per request (a new one starts where the step number does not grow), each decode pass's experts per MoE layer in
    layer order, from a big run's trace (one pass per step)."""
    runs: list[list[dict[int, set[int]]]] = []
    last_pass, last_step = None, 0
    for a in trace:
        if a.step == 0 or a.kind != "demand":
            continue
        if a.pass_id != last_pass:
            if not runs or a.step <= last_step:
                runs.append([])
            runs[-1].append({})
            last_pass, last_step = a.pass_id, a.step
        runs[-1][-1].setdefault(a.layer, set()).add(a.expert)
    return [[[by_layer[layer] for layer in sorted(by_layer)] for by_layer in run] for run in runs]


def acceptance(llm: LLM, prompt: list[int], big: list[int]) -> float:
    """Share of big's greedy tokens little's greedy choice equals, teacher-forced on the prompt and big's output."""
    ids = prompt + big[:-1]
    little = llm.logits(ids, mode="little")[len(prompt) - 1 :].argmax(-1).tolist()  # little's choice at each decoded position
    return sum(a == b for a, b in zip(little, big)) / len(big)


@torch.inference_mode()
def pass_seconds(llm: LLM, prompt: list[int], tokens: list[int], positions: int, little: bool, repeats: int = 3) -> float:
    """Median seconds of one pass over `positions` of the decoded tokens after the prompt (big, or little over one)."""
    runner = llm.runner
    kv = runner.new_kv(len(prompt) + len(tokens) + positions)
    runner.forward(runner.ids(prompt), kv, BIG)
    times = []
    for start in range(0, max(len(tokens) - positions, 1), max((len(tokens) - positions) // repeats, 1))[:repeats]:
        kv.rewind(kv.length - len(prompt))
        if start:
            runner.forward(runner.ids(tokens[:start]), kv, BIG)
        ids = runner.ids(tokens[start : start + positions])
        begin = time.perf_counter()
        runner.cache.transfer.to_host(runner.forward(ids, kv, runner.resolved(LITTLE) if little else BIG)[:1])  # waits for the pass
        times.append(time.perf_counter() - begin)
    return median(times)


def run_drafts(  # noqa: PLR0913 - what the run measures, on what
    llm: LLM,
    prompts: list[list[int]],
    new_tokens: int,
    slots: int,
    cost: ModelCost,
    profiles: dict[str, HardwareProfile],
    drafts: tuple[int, ...] = DRAFTS,
    scaled: tuple[ModelCost, int] | None = None,
) -> DraftCosts:
    """Measure the cycle's parts at `slots` cache slots, model exact mode over big for each draft length, and run exact
    mode (tau 0: drafts end only when full) beside big, traced, predicting both on each profile (and, with `scaled`,
    the same traces replayed with another model's sizes and cache slots: this model's routing at real widths)."""
    sampling = SamplingParams(max_new_tokens=new_tokens, stop_at_eos=False)
    big_trace = Trace()
    llm.reset_cache(slots, big_trace)
    bigs = [llm.generate(p, sampling, PolicyConfig("big")) for p in prompts]
    big_tok_s = sum(len(r.token_ids) - 1 for r in bigs) / sum(r.stats.decode_s for r in bigs)
    routed = routed_sets(big_trace.accesses)
    llm.reset_cache(slots)
    costs = DraftCosts(
        acceptance=sum(acceptance(llm, p, r.token_ids) for p, r in zip(prompts, bigs)) / len(prompts),
        little_s=median(pass_seconds(llm, p, r.token_ids, 1, little=True) for p, r in zip(prompts, bigs)),
        big_s=[median(pass_seconds(llm, p, r.token_ids, m, little=False) for p, r in zip(prompts, bigs)) for m in range(1, POSITIONS + 1)],
        union=[expected_union(routed, m) for m in range(1, POSITIONS + 1)],
        big_tok_s=big_tok_s,
    )
    plans = {"": (cost, slots)} | ({} if scaled is None else {"scaled": scaled})
    big_tokens = sum(len(r.token_ids) - 1 for r in bigs)
    big_predicted = {(tag, name): replayed_tok_s(big_trace.accesses, c, hw, n, big_tokens) for tag, (c, n) in plans.items() for name, hw in profiles.items()}
    for n in drafts:
        costs.rows.append(_exact_row(llm, prompts, sampling, slots, n, costs, plans, profiles, big_predicted))
    return costs


def _exact_row(
    llm: LLM,
    prompts: list[list[int]],
    sampling: SamplingParams,
    slots: int,
    n: int,
    costs: DraftCosts,
    plans: dict[str, tuple[ModelCost, int]],
    profiles: dict[str, HardwareProfile],
    big_predicted: dict[tuple[str, str], float],
) -> dict:
    """Exact mode with draft length n: modelled and measured speed over big, and its trace replayed on each profile
    under each plan of sizes and slots ('': this model's; 'scaled': real widths)."""
    trace = Trace()
    llm.reset_cache(slots, trace)
    results = [llm.generate(p, sampling, PolicyConfig("exact", tau=0.0, criterion="max_prob", draft_max=n)) for p in prompts]
    tokens = sum(len(r.token_ids) - 1 for r in results)
    tok_s = tokens / sum(r.stats.decode_s for r in results)
    rolled_back = sum(r.stats.rolled_back_tokens for r in results)
    return {
        "draft": n,
        "modelled_speedup": modelled_speedup(costs.acceptance, n, costs.little_s, costs.big_s),
        "measured_speedup": tok_s / costs.big_tok_s,
        "tok_s": tok_s,
        "rolled_back_per_token": rolled_back / sum(len(r.token_ids) for r in results),
        **{
            f"predicted_speedup{'_' + tag if tag else ''}": {
                name: replayed_tok_s(trace.accesses, c, hw, m, tokens) / big_predicted[tag, name] for name, hw in profiles.items()
            }
            for tag, (c, m) in plans.items()
        },
    }


def replayed_tok_s(trace: list[Access], cost: ModelCost, hw: HardwareProfile, slots: int, tokens: int) -> float:
    """Decode tokens per second of a traced run replayed on `hw`: its `tokens` over the replay's decode seconds (not the
    replay's steps: exact mode's rolled-back steps cost passes and emit nothing)."""
    seconds = predict(trace, cost, hw, slots).decode_s
    return tokens / seconds if seconds else 0.0


def forced_exact(llm: LLM, draft: int, rate: float, prefetch: bool = True) -> Callable[[list[int], SamplingParams], GenerationResult]:
    """A prompt's generation by exact mode (tau 0: drafts end only when full) keeping each drafted token with probability
    `rate` (random weights only: the engine's Policy made here, as no request can make it); prefetch: drafting loads the
    verify's experts."""
    config = PolicyConfig("exact", tau=0.0, criterion="max_prob", draft_max=draft, prefetch_on_fallback=prefetch)
    policy = Policy(llm.resolve_policy(config), forced_acceptance=rate)
    calls = itertools.count()  # each call its own seed for the draws (bench gives every prompt seed 0): rounds differ

    def run(ids: list[int], sampling: SamplingParams) -> GenerationResult:
        llm.check_prompt(ids)
        with llm.lock:
            return generate(llm.runner, ids, dataclasses.replace(sampling, seed=next(calls)), policy, llm.eos_token_ids)

    return run


def drafts_table(costs: DraftCosts) -> str:
    """The report as text: the cycle's parts, then one row per draft length."""
    lines = [
        f"little's greedy acceptance {costs.acceptance:.1%}; little pass {costs.little_s * 1e3:.2f} ms; big decoding {costs.big_tok_s:.1f} tok/s",
        "positions m:          " + " ".join(f"{m:>7}" for m in range(1, POSITIONS + 1)),
        "big pass over m (ms): " + " ".join(f"{s * 1e3:7.2f}" for s in costs.big_s),
        "experts/layer, m tok: " + " ".join(f"{u:7.1f}" for u in costs.union),
        "",
        "draft  modelled  measured  " + "  ".join(costs.rows[0]["predicted_speedup"]) if costs.rows else "",
    ]
    for row in costs.rows:
        profiles = "  ".join(f"{v:>{len(k)}.2f}" for k, v in row["predicted_speedup"].items())
        lines.append(f"{row['draft']:>5}  {row['modelled_speedup']:8.2f}  {row['measured_speedup']:8.2f}  {profiles}")
    if costs.rows and "predicted_speedup_scaled" in costs.rows[0]:
        lines += ["", "at real widths (this model's routing, the scaled sizes and slots): draft  " + "  ".join(costs.rows[0]["predicted_speedup_scaled"])]
        for row in costs.rows:
            lines.append(f"{row['draft']:>5}  " + "  ".join(f"{v:>{len(k)}.2f}" for k, v in row["predicted_speedup_scaled"].items()))
    return "\n".join(lines)


def drafts_json(costs: DraftCosts) -> dict:
    """The report as JSON."""
    return asdict(costs)
