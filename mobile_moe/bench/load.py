"""Load test of the server: N concurrent streaming requests against one stream alone, in one process and one run.

`python -m mobile_moe.bench.load --streams 16 --tokens 64 --max-batch 16` starts `mobile-moe serve` on the demo model
in a child process and, in each of --rounds rounds, sends each prompt alone (its solo output and rate), then all N at
once; it prints JSON: one stream's tok/s, the aggregate tok/s of the N, their ratio, time to first token (p50, p95),
and how many concurrent streams equal their solo greedy output (medians over rounds, and each round). One asyncio
client drives every stream. Other flags go to `serve` (e.g. --dtype, --expert-cache).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time


async def stream(client, url: str, prompt: str, tokens: int, policy: str) -> tuple[str, float, float]:
    """(text, seconds to the first token, seconds in all) of one streaming greedy completion."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "policy": policy}
    start, first, text = time.perf_counter(), None, ""
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                piece = json.loads(line[6:])["choices"][0]["text"]
                if piece and first is None:
                    first = time.perf_counter() - start
                text += piece
    total = time.perf_counter() - start
    return text, total if first is None else first, total


async def measure(url: str, prompts: list[str], tokens: int, policy: str, rounds: int) -> tuple[list, list, str]:
    """Per round, (each prompt alone, all at once, wall seconds of all at once); then the /metrics text. One event loop
    drives every stream: a light client (one thread), so the machine's cores go to the server."""
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 1, max_keepalive_connections=len(prompts) + 1)
    alone, together = [], []
    async with httpx.AsyncClient(limits=limits) as client:
        await stream(client, url, prompts[0], 4, policy)  # warm-up
        for _ in range(rounds):  # alone and together interleaved: the machine's drift hits both
            alone.append([await stream(client, url, p, tokens, policy) for p in prompts])  # each stream by itself: solo output and rate
            start = time.perf_counter()
            results = await asyncio.gather(*(stream(client, url, p, tokens, policy) for p in prompts))
            together.append((list(results), time.perf_counter() - start))
        metrics = (await client.get(f"{url}/metrics")).text
    return alone, together, metrics


def start_server(max_batch: int, dtype: str, threads: int, extra: list[str]) -> tuple[str, subprocess.Popen]:
    """`mobile-moe serve` on the demo model in a child process (its own interpreter: the clients here do not share its
    GIL), on a free port; (url, process) once /health answers."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "mobile_moe",
        "serve",
        "--port",
        str(port),
        "--max-batch",
        str(max_batch),
        "--dtype",
        dtype,
        "--quiet",
        "--threads",
        str(threads),
        *extra,
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start within 60 s")


def run(streams: int, tokens: int, max_batch: int, policy: str, dtype: str, threads: int, rounds: int, extra: list[str]) -> dict:
    """The measurement (see the module docstring); ratios per round, medians over rounds."""
    prompts = [f"def task_{i}(items):\n    " for i in range(streams)]
    url, proc = start_server(max_batch, dtype, threads, extra)
    try:
        alone, together, metrics = asyncio.run(measure(url, prompts, tokens, policy, rounds))
    finally:
        proc.terminate()
        proc.wait(30)
    count = tokens * streams  # stop_at_eos: a stream ending early would make this an upper bound (see completion_tokens_total)
    per_round = []
    for solo, (results, wall) in zip(alone, together):
        firsts = sorted(r[1] for r in results)
        one = statistics.median(tokens / r[2] for r in solo)
        per_round.append(
            {
                "one_stream_tok_s": one,
                "aggregate_tok_s": count / wall,
                "aggregate_over_one": count / wall / one,
                "one_stream_ttft_s": statistics.median(r[1] for r in solo),
                "ttft_p50_s": statistics.median(firsts),
                "ttft_p95_s": firsts[min(len(firsts) - 1, round(0.95 * (len(firsts) - 1)))],
                "wall_s": wall,
                "streams_equal_solo": sum(r[0] == a[0] for r, a in zip(results, solo)),
            }
        )
    out = {"streams": streams, "tokens": tokens, "max_batch": max_batch, "policy": policy, "dtype": dtype, "threads": threads, "rounds": rounds}
    out |= {key: statistics.median(r[key] for r in per_round) for key in per_round[0]}
    out["streams_equal_solo"] = min(r["streams_equal_solo"] for r in per_round)  # the worst round
    out["per_round"] = per_round
    out["completion_tokens_total"] = _metric(metrics, "mobile_moe_completion_tokens_total")
    return out


def _metric(text: str, name: str) -> float | None:
    """A sample's value from the exposition text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--policy", choices=["big", "little", "mobile"], default="big")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1: on 2 cores the other serves HTTP)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (each stream alone, all together); medians over rounds")
    args, extra = p.parse_known_args(argv)  # anything else goes to `mobile-moe serve`
    print(json.dumps(run(args.streams, args.tokens, args.max_batch, args.policy, args.dtype, args.threads, args.rounds, extra), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
