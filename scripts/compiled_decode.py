"""Steady decode speed of the demo model, every expert resident, float32: eager, the default (layers compiled ahead of
time, engine/aot.py, from the cache dir) and --compile (torch.compile), each in a fresh process taking turns over rounds.

    python scripts/compiled_decode.py --rounds 2 --threads 1

Each process times a warm-up request (the default builds its package here on a cold cache; --compile traces), then two
greedy 64-token requests, and checks their tokens against eager's."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SYSTEMS = {"eager": False, "default": None, "compile": True}  # EngineConfig.compile of each


def child(system: str, threads: int) -> None:
    """Run one system in this process and print its figures as one JSON line."""
    started = time.perf_counter()
    import torch

    from mobile_moe import LLM, engine_config
    from mobile_moe.config import PolicyConfig, SamplingParams

    torch.set_num_threads(threads)
    llm = LLM("mobile_moe/demo_model", engine_config(progress=False, dtype="float32", compile=SYSTEMS[system]))
    ready = time.perf_counter()
    big, tokens = PolicyConfig("big"), SamplingParams(max_new_tokens=64, temperature=0.0, stop_at_eos=False)
    llm.generate([3, 4, 5, 6, 7], SamplingParams(max_new_tokens=2, temperature=0.0, stop_at_eos=False), big)
    warm = time.perf_counter()
    speeds, outputs = [], []
    for prompt in ([3, 4, 5, 6, 7], [9, 4, 5, 6, 7, 8, 10]):
        t = time.perf_counter()
        outputs.append(llm.generate(prompt, tokens, big).token_ids)
        speeds.append(64 / (time.perf_counter() - t))
    figures = {"start_to_ready_s": ready - started, "warm_up_s": warm - ready, "tok_s": speeds, "tokens": outputs}
    print(json.dumps({**figures, "compiler_imported": any(m.startswith("torch._dynamo") for m in sys.modules)}))


def main() -> None:
    """Take turns over the systems in fresh processes and print each run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.threads)
        return
    for r in range(args.rounds):
        want = None
        for system in SYSTEMS:
            out = subprocess.run([sys.executable, __file__, "--child", system, "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            want = row["tokens"] if want is None else want
            speeds = " / ".join(f"{s:.0f}" for s in row["tok_s"])
            print(
                f"round {r + 1} {system:10s} start->ready {row['start_to_ready_s']:.2f} s, warm-up request {row['warm_up_s']:.2f} s, "
                f"decode {speeds} tok/s, compiler imported: {row['compiler_imported']}, tokens equal eager's: {row['tokens'] == want}",
                flush=True,
            )


if __name__ == "__main__":
    main()
