"""What compiling the decode step costs per start: `mobile-moe generate` on the demo model as separate processes, eager
(--no-compile), the default (layers compiled ahead of time once per machine, engine/aot.py: one cold build into a fresh
cache dir, then warm starts) and --compile (torch.compile, traced again in every process), interleaved over rounds.

    python scripts/compiled_starts.py --rounds 3 --threads 1

Prints, per system: process wall time (start to exit), the engine's load time, decode tok/s and the request's total, as
medians over the rounds (the cold build is one run)."""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

STATS = re.compile(r"load ([\d.]+)s, .* ([\d.]+) tok/s decode, total ([\d.]+)s")
PROMPT = "The capital of France is"


def run(flags: list[str], threads: int, tokens: int, cache: str) -> tuple[float, float, float, float]:
    """One `mobile-moe generate` process: (wall s, load s, decode tok/s, request total s)."""
    env = dict(os.environ, MOBILE_MOE_COMPILED_DIR=cache)
    cmd = [sys.executable, "-m", "mobile_moe", "generate", "--max-new-tokens", str(tokens), "--threads", str(threads), "--prompt", PROMPT, *flags]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    found = STATS.search(done.stderr + done.stdout)
    if found is None:
        raise SystemExit(f"no stats line in: {done.stderr[-2000:]}")
    return wall, float(found[1]), float(found[2]), float(found[3])


def main() -> None:
    """Interleave the systems over rounds and print medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    systems = {"eager (--no-compile)": ["--no-compile"], "default, warm cache": [], "--compile": ["--compile"]}
    results: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in systems}
    with tempfile.TemporaryDirectory() as cache:
        cold = run([], args.threads, args.new_tokens, cache)  # the one-time build into the fresh cache dir
        print(f"default, cold build: wall {cold[0]:.2f} s, load {cold[1]:.2f} s, decode {cold[2]:.0f} tok/s, total {cold[3]:.2f} s", flush=True)
        for r in range(args.rounds):
            for name, flags in systems.items():
                results[name].append(run(flags, args.threads, args.new_tokens, cache))
                wall, load, tps, total = results[name][-1]
                print(f"round {r + 1} {name}: wall {wall:.2f} s, load {load:.2f} s, decode {tps:.0f} tok/s, total {total:.2f} s", flush=True)
    print(f"medians over {args.rounds} rounds, --threads {args.threads}, {args.new_tokens} tokens:")
    for name, rows in results.items():
        wall, load, tps, total = (statistics.median(col) for col in zip(*rows))
        print(f"  {name:22s} wall {wall:5.2f} s  load {load:4.2f} s  decode {tps:5.0f} tok/s  request total {total:5.2f} s")


if __name__ == "__main__":
    main()
