"""Decode speed of `generate` on the demo model per thread count, interleaved, alone or beside one busy-loop process.

Each run is a fresh `python -m mobile_moe generate --json` (the default thread count is chosen per process); the
settings take turns round by round, so a change in the machine's load falls on all of them alike. Prints, per
setting, the median decode tok/s, every run's, the prefill times and the threads each run reported.
Usage: python scripts/threads.py [--settings 1,2,default] [--rounds 5] [--busy] [--policy mobile] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

BUSY_LOOP = "while True: pass"


def run_once(setting: str, policy: str, tokens: int) -> dict:
    """One generate's stats; `default` passes no --threads (and clears OMP_NUM_THREADS, which the default defers to)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    threads = [] if setting == "default" else ["--threads", setting]
    cmd = [sys.executable, "-m", "mobile_moe", "generate", "--prompt", "def fibonacci(n):", "--max-new-tokens", str(tokens), "--policy", policy]
    done = subprocess.run([*cmd, "--json", "--quiet", *threads], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout)["stats"]


def main() -> None:
    """Run the rounds and print one line per setting."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default="1,2,default")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--busy", action="store_true", help="keep one busy-loop process running beside the runs")
    p.add_argument("--policy", default="mobile")
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args()
    settings = args.settings.split(",")
    loop = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if args.busy else None
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    load = os.getloadavg()[0]
    try:
        for _ in range(args.rounds):
            for setting in settings:
                runs[setting].append(run_once(setting, args.policy, args.tokens))
    finally:
        if loop is not None:
            loop.kill()
    print(f"{'beside a busy loop' if args.busy else 'no busy loop'}; load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    for setting, stats in runs.items():
        speeds = [s["decode_tok_s"] for s in stats]
        print(
            f"threads {setting}: decode {statistics.median(speeds):.1f} tok/s median; runs {[round(v, 1) for v in speeds]}; "
            f"prefill s {[round(s['prefill_s'], 3) for s in stats]}; threads used {sorted({s['threads'] for s in stats})}"
        )


if __name__ == "__main__":
    main()
