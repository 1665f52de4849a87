"""`mobile-moe bench --batch 1,2,4,8,16`: aggregate decode speed and expert bytes per generated token at each batch
size, big and mobile, from the same cache size, over the decode steps in which every row of the batch decodes;
sizes and systems interleaved in rounds, speeds are medians."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.engine.llm import LLM
from mobile_moe.errors import InvalidParameter
from mobile_moe.policy.policies import Policy


def _one(llm: LLM, prompts: list[list[int]], sampling: SamplingParams, policy: PolicyConfig, slots: int) -> dict:
    """A fresh cache of `slots`, then the prompts decoded together; measured over the steps in which every row decodes
    (after the last prompt joined, until the first row finishes), so prefill's loads and partial batches stay out."""
    llm.reset_cache(slots)
    batch = llm.batch_decoder(len(prompts), max(map(len, prompts)) + sampling.max_new_tokens)
    for ids in prompts:
        batch.add(ids, sampling, Policy(llm.resolve_policy(policy)))
    while any(not r.decoding for r in batch.rows):
        batch.step()
    governor, cache = llm.governor, llm.cache
    before, stats0, rows = (governor.little_steps, governor.big_steps), cache.stats.snapshot(), list(batch.rows)
    fallbacks0, instead0 = sum(r.result.stats.fallback_tokens for r in rows), sum(r.result.stats.big_instead_tokens for r in rows)
    steps, start = 0, time.perf_counter()
    while len([r for r in batch.rows if r.decoding]) == len(prompts):
        batch.step()
        steps += 1
    wall = time.perf_counter() - start
    stats, generated = cache.stats.snapshot(), steps * len(prompts)
    window = {
        "aggregate_tok_s": generated / wall,
        "steps": steps,
        "expert_bytes_per_token": (stats.h2d_bytes + stats.disk_bytes - stats0.h2d_bytes - stats0.disk_bytes) / generated,
        "expert_loads_per_token": (stats.misses - stats0.misses) / generated,
        "experts_computed_per_token": (stats.hits + stats.misses - stats0.hits - stats0.misses) / generated,
        "fallback_rate": (sum(r.result.stats.fallback_tokens for r in rows) - fallbacks0) / generated,
        "big_instead_rate": (sum(r.result.stats.big_instead_tokens for r in rows) - instead0) / generated,
        "little_steps": governor.little_steps - before[0],
        "big_steps": governor.big_steps - before[1],
    }
    while batch.rows:  # the rest of the rows' tokens, outside the window
        batch.step()
    return window


def run_batch_bench(
    llm: LLM,
    prompts: list[list[int]],
    sizes: list[int],
    new_tokens: int,
    mobile: PolicyConfig,
    slots: int,
    temperature: float,
    rounds: int,
    on_update: Callable[[dict], None] | None = None,
) -> dict:
    """Every (batch size, system) once per round, interleaved; speed is the median over rounds, counters the last round's.
    `on_update` gets the report so far (`complete` false) after each (size, system), and the whole one."""
    if max(sizes) > len(prompts) or max(sizes) > llm.config.max_batch:
        raise InvalidParameter(f"batch {max(sizes)} needs as many prompts and --max-batch (have {len(prompts)} and {llm.config.max_batch})")
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, seed=0, stop_at_eos=False)
    systems = {"big": PolicyConfig("big"), "mobile": mobile}
    runs: dict[tuple[int, str], list[dict]] = {}
    head = {
        "sizes": sizes,
        "new_tokens": new_tokens,
        "slots": slots,
        "total_experts": llm.cache.store.total_experts,
        "rounds": rounds,
        "batch_little": llm.config.batch_little,
    }
    for _ in range(rounds):
        for size in sizes:
            for name, policy in systems.items():
                runs.setdefault((size, name), []).append(_one(llm, prompts[:size], sampling, policy, slots))
                if on_update is not None:
                    on_update({**head, "rows": batch_rows(runs), "complete": False})
    report = {**head, "rows": batch_rows(runs), "complete": True}
    if on_update is not None:
        on_update(report)
    return report


def batch_rows(runs: dict[tuple[int, str], list[dict]]) -> list[dict]:
    """One row per (batch size, system) measured so far: median speed over its rounds, the last round's counters, and speed against
    the smallest batch and against big at the same size (None until that one is measured)."""
    rows = [
        {"batch": size, "system": name, **measured[-1], "aggregate_tok_s": median(m["aggregate_tok_s"] for m in measured)}
        for (size, name), measured in runs.items()
    ]
    smallest = min(r["batch"] for r in rows)
    one = {r["system"]: r["aggregate_tok_s"] for r in rows if r["batch"] == smallest}
    big = {r["batch"]: r["aggregate_tok_s"] for r in rows if r["system"] == "big"}
    for r in rows:
        r["speedup_over_smallest_batch"] = r["aggregate_tok_s"] / one[r["system"]] if r["system"] in one else None
        r["ratio_to_big"] = r["aggregate_tok_s"] / big[r["batch"]] if r["batch"] in big else None
    return rows


def batch_table(report: dict) -> str:
    """The report as a text table."""
    head = (
        f"{'batch':>5} {'system':<7} {'agg tok/s':>9} {'x batch 1':>9} {'vs big':>6} {'expert MB/tok':>13} {'loads/tok':>9} {'fallback':>8} {'big-instead':>11}"
    )
    lines = [
        f"{report['slots']} of {report['total_experts']} expert slots, {report['new_tokens']} tokens per row, decode steps with every "
        f"row decoding, median of {report['rounds']} rounds, mobile at batch: {report['batch_little']}",
        head,
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['batch']:>5} {r['system']:<7} {r['aggregate_tok_s']:>9.2f} {r['speedup_over_smallest_batch']:>9.2f} "
            f"{r['ratio_to_big']:>6.2f} {r['expert_bytes_per_token'] / 2**20:>13.2f} {r['expert_loads_per_token']:>9.2f} "
            f"{r['fallback_rate']:>8.0%} {r['big_instead_rate']:>11.0%}"
        )
    return "\n".join(lines)


def plot_batches(report: dict, path: Path) -> None:
    """PNG: aggregate tok/s and expert bytes per generated token against batch size, big and mobile."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidParameter("--plot needs matplotlib: pip install 'mobile-moe[plot]'") from None
    fig, (speed, traffic) = plt.subplots(1, 2, figsize=(10, 4))
    for system in ("big", "mobile"):
        rows = sorted((r for r in report["rows"] if r["system"] == system), key=lambda r: r["batch"])
        sizes = [r["batch"] for r in rows]
        speed.plot(sizes, [r["aggregate_tok_s"] for r in rows], marker="o", label=system)
        traffic.plot(sizes, [r["expert_bytes_per_token"] / 2**20 for r in rows], marker="o", label=system)
    for ax, label in ((speed, "aggregate decode tok/s"), (traffic, "expert MiB loaded per generated token")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (concurrent sequences)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{report['slots']} of {report['total_experts']} expert slots, {report['new_tokens']} tokens per row", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
