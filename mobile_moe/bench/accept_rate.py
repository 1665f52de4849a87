"""`bench --drafts --synthetic S --accept-rate P[,P...]`: exact mode on random weights, its acceptance forced at each
stated rate, beside big in interleaved rounds (on the disk tier each system's run after its own disk probe); measured
speed over big, the cycle formula at the rate from this model's pass costs, and this run's traces replayed on the
cost model's profiles (`bench/drafts.py`)."""

from __future__ import annotations

from dataclasses import asdict
from statistics import median

from mobile_moe.bench.bench import ROUND_PROBE_RECORDS, BenchSettings, SystemResult, _median_of_rounds, _run_system, disk_probe_gb_s
from mobile_moe.bench.costmodel import ModelCost
from mobile_moe.bench.drafts import expected_union, forced_exact, modelled_speedup, pass_seconds, replayed_tok_s, routed_sets
from mobile_moe.bench.profiles import HardwareProfile
from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.engine.llm import LLM


def run_accept_rates(  # noqa: PLR0913 - what the run measures, on what
    llm: LLM,
    settings: BenchSettings,
    rates: list[float],
    draft: int,
    cost: ModelCost,
    profiles: dict[str, HardwareProfile],
    probe: bool,
    prefetch: bool = True,
) -> dict:
    """Big and exact mode (draft `draft`, tau 0) at each forced rate, greedy, once per round in turn (prefetching while
    drafting; with `prefetch`, the first rate also without: what it buys); then one pass of each kind timed for the
    formula. `probe`: the disk tier's probe before each system's run."""
    slots = llm.planned_slots
    llm.reset_cache(slots)
    llm.generate(settings.prompts[0], SamplingParams(max_new_tokens=4, stop_at_eos=False))  # warm-up: kernels, allocator
    systems = {"big": None} | {f"exact@{r:g}{'' if prefetch else ' no-prefetch'}": forced_exact(llm, draft, r, prefetch) for r in rates}
    if prefetch:
        systems[f"exact@{rates[0]:g} no-prefetch"] = forced_exact(llm, draft, rates[0], prefetch=False)
    rounds: dict[str, list[SystemResult]] = {name: [] for name in systems}
    traces, outputs = {}, {}
    for _ in range(settings.rounds):
        for name, run in systems.items():
            disk = disk_probe_gb_s(llm.loaded.store, records=ROUND_PROBE_RECORDS) if probe else float("nan")  # type: ignore[arg-type]
            result, traces[name], outputs[name] = _run_system(llm, name, PolicyConfig("big"), settings, slots, run=run)
            result.disk_probe_gb_s = disk
            rounds[name].append(result)
    prompt, big_out = settings.prompts[0], outputs["big"][0]
    little_s = pass_seconds(llm, prompt, big_out, 1, little=True)
    big_s = {m: pass_seconds(llm, prompt, big_out, m, little=False) for m in (1, draft + 1)}
    tokens = {name: sum(len(o) - 1 for o in outs) for name, outs in outputs.items()}
    replayed = {name: {hw: replayed_tok_s(traces[name], cost, p, slots, tokens[name]) for hw, p in profiles.items()} for name in systems}
    report = {
        "draft": draft,
        "rates": rates,
        "little_s": little_s,
        "big_s": {str(m): v for m, v in big_s.items()},
        "union": {str(m): expected_union(routed_sets(traces["big"]), m) for m in (1, draft + 1)},
        "systems": [],
    }
    for name, results in rounds.items():
        rate = None if systems[name] is None else float(name.split("@")[1].split()[0])
        row = asdict(_median_of_rounds(results)) | {
            "rounds_tok_s": [r.decode_tok_s for r in results],
            "x_big": median(r.decode_tok_s / b.decode_tok_s for r, b in zip(results, rounds["big"])),  # per round, then the median
            "tokens_per_big_pass": 1.0 / results[-1].fallback_rate if rate is not None and results[-1].fallback_rate else 1.0,
            "same_tokens_as_big": sum(a == b for a, b in zip(outputs[name], outputs["big"])) / len(outputs["big"]),
            "predicted_x_big": {hw: replayed[name][hw] / replayed["big"][hw] for hw in profiles},
        }
        if rate is not None:
            padded = [big_s[1]] + [float("nan")] * (draft - 1) + [big_s[draft + 1]]  # modelled_speedup reads [0] and [n]
            row["modelled_x_big"] = modelled_speedup(rate, draft, little_s, padded)
        report["systems"].append(row)
    return report


def accept_rates_table(report: dict) -> str:
    """The report as text: one row per system, measured beside modelled and replayed."""
    profiles = list(report["systems"][0]["predicted_x_big"])
    n = report["draft"]
    lines = [
        f"draft {n}, acceptance forced; little pass {report['little_s'] * 1e3:.1f} ms, big pass over 1 / {n + 1} positions "
        f"{report['big_s']['1'] * 1e3:.1f} / {report['big_s'][str(n + 1)] * 1e3:.1f} ms; experts per layer over 1 / {n + 1} tokens "
        f"{report['union']['1']:.1f} / {report['union'][str(n + 1)]:.1f}",
        f"{'system':<22} {'tok/s':>7} {'x big':>6} {'modelled':>8} " + " ".join(f"{p:>{max(len(p), 6)}}" for p in profiles) + "  tok/big pass  disk MB/tok",
    ]
    for row in report["systems"]:
        predicted = " ".join(f"{row['predicted_x_big'][p]:>{max(len(p), 6)}.2f}" for p in profiles)
        modelled = f"{row['modelled_x_big']:8.2f}" if "modelled_x_big" in row else f"{'':>8}"
        lines.append(
            f"{row['name']:<22} {row['decode_tok_s']:7.2f} {row['x_big']:6.2f} {modelled} {predicted}  {row['tokens_per_big_pass']:12.2f}"
            f"  {row['disk_bytes_per_token'] / 1e6:11.1f}"
        )
    return "\n".join(lines)
