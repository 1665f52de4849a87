"""`mobile-moe bench --shared-prefix N`: time to first token of a prompt of N tokens plus a short suffix (a chat's next
turn, an agent's next call), cold and after the N-token prompt was served, through `generate` (the Python API, chat)
and through the server's engine worker (its batch rows); rounds interleaved, medians."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from statistics import median

import torch

from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.engine.generate import GenerationResult
from mobile_moe.engine.llm import LLM
from mobile_moe.serve.worker import EngineWorker, Job

SUFFIX_TOKENS = 24  # the next turn's new tokens


def shared_prompts(llm: LLM, prefix_tokens: int) -> tuple[list[int], list[int], list[int]]:
    """(the shared prefix, the prefix + a suffix, an unrelated prompt of the same length as the prefix): seeded random ids;
    the unrelated one differs from the first token on, so that serving it leaves nothing to reuse."""
    gen = torch.Generator().manual_seed(0)
    vocab = llm.loaded.model.vocab_size
    ids = torch.randint(3, vocab, (2 * prefix_tokens + SUFFIX_TOKENS,), generator=gen).tolist()
    prefix, suffix, other = ids[:prefix_tokens], ids[prefix_tokens : prefix_tokens + SUFFIX_TOKENS], ids[prefix_tokens + SUFFIX_TOKENS :]
    other[0] = 2 if prefix[0] != 2 else 1
    return prefix, prefix + suffix, other


Ask = Callable[[list[int]], tuple[float, GenerationResult]]  # a prompt -> (seconds to its first token, its result)


def through_generate(llm: LLM, sampling: SamplingParams, policy: PolicyConfig) -> Ask:
    """A request through `LLM.generate`: its first token comes out of the prefill (`prefill_s`)."""

    def ask(prompt: list[int]) -> tuple[float, GenerationResult]:
        result = llm.generate(prompt, sampling, policy)
        return result.stats.prefill_s, result

    return ask


def through_worker(worker: EngineWorker, sampling: SamplingParams, policy: PolicyConfig) -> Ask:
    """A request through the server's engine worker: seconds from its submission to its first token."""

    def ask(prompt: list[int]) -> tuple[float, GenerationResult]:
        first: list[float] = []
        done = threading.Event()
        out: list[GenerationResult | BaseException | None] = []
        start = time.perf_counter()

        def on_done(result: GenerationResult | None, err: BaseException | None) -> None:
            out.append(err if err is not None else result)
            done.set()

        worker.submit(Job(prompt, sampling, policy, lambda _: first.append(time.perf_counter()) or True, on_done))
        done.wait()
        if not isinstance(out[0], GenerationResult):
            raise RuntimeError(f"the worker's request failed: {out[0]}")
        return (first[0] if first else time.perf_counter()) - start, out[0]

    return ask


def measure(ask: Ask, prefix: list[int], turn: list[int], other: list[int], rounds: int) -> dict:
    """Cold (after an unrelated prompt) and reused (after the prefix) time to first token of `turn`, interleaved."""
    cold, warm, reused, same = [], [], 0, True
    for _ in range(rounds):
        ask(other)
        t_cold, r_cold = ask(turn)
        ask(prefix)
        t_warm, r_warm = ask(turn)
        cold.append(t_cold)
        warm.append(t_warm)
        reused, same = r_warm.stats.reused_tokens, same and r_warm.token_ids == r_cold.token_ids
    return {
        "cold_ttft_s": median(cold),
        "reused_ttft_s": median(warm),
        "speedup": median(cold) / median(warm),
        "reused_tokens": reused,
        "same_tokens": same,
    }


def run_shared_prefix(llm: LLM, prefix_tokens: int, new_tokens: int, policy: PolicyConfig, rounds: int) -> dict:
    """TTFT of the prefix + suffix, cold and reused, through `generate` and the server's worker."""
    prefix, turn, other = shared_prompts(llm, prefix_tokens)
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    report = {"prefix_tokens": prefix_tokens, "suffix_tokens": SUFFIX_TOKENS, "policy": policy.name, "rounds": rounds, "threads": torch.get_num_threads()}
    report["generate"] = measure(through_generate(llm, sampling, policy), prefix, turn, other, rounds)
    worker = EngineWorker(llm, max_queue=4, max_batch=llm.config.max_batch)
    try:
        report["server"] = measure(through_worker(worker, sampling, policy), prefix, turn, other, rounds)
    finally:
        worker.close()
        worker.thread.join()
    return report


def shared_prefix_table(report: dict) -> str:
    """The report as lines: each path's cold and reused time to first token."""
    head = f"{report['prefix_tokens']}-token prefix + {report['suffix_tokens']} new tokens, policy {report['policy']}, {report['rounds']} rounds (medians)"
    lines = [head, f"{'path':<10}{'cold TTFT s':>13}{'reused TTFT s':>15}{'speedup':>9}{'reused':>8}  same tokens"]
    for path in ("generate", "server"):
        r = report[path]
        lines.append(f"{path:<10}{r['cold_ttft_s']:>13.3f}{r['reused_ttft_s']:>15.3f}{r['speedup']:>8.1f}x{r['reused_tokens']:>8}  {r['same_tokens']}")
    return "\n".join(lines)
