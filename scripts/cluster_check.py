"""`mobile-moe serve --replicas 2` against `mobile-moe serve` on the demo model (CPU, float32, 1 thread per engine, greedy).

`python scripts/cluster_check.py [--streams 32] [--tokens 64] [--max-batch 16]` starts each server as a child process:
1. the single server: every prompt's stream (the reference);
2. the cluster (local Ray, 2 replicas, conversation router): seconds from launch to the first answer; `--streams`
   concurrent streams (lost ones, outputs equal to the reference, share per replica); 16 two-turn chats (second turns on
   their first turn's replica, prompt tokens reused); then 1.5x `--streams` streams, one replica killed (ray.kill of its actor)
   once the first answer starts: streams that hang, end with an error event, complete equal to the reference; seconds
   until Serve runs 2 replicas again;
3. the cluster with Serve's power-of-two-choices router: the same 16 two-turn chats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
HEADER = "x-mobile-moe-replica"
HANG_S = 180  # a stream still open after this long counts as hung


def launch(port: int, *flags: str) -> tuple[subprocess.Popen, float, str]:
    """A server child process; (it, seconds until its first completion answered, its stderr log path)."""
    log = f"/tmp/cluster_check_{port}.log"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # fails at once when an earlier server still holds the port
    cmd = [sys.executable, "-m", "mobile_moe", "serve", "--port", str(port), "--dtype", "float32", "--threads", "1", "--quiet", *flags]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=os.environ | {"PYTHONPATH": str(ROOT)})  # noqa: SIM115
    while True:
        if proc.poll() is not None:
            sys.exit(f"the server exited: see {log}")
        try:
            if httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=5).status_code == 200:
                return proc, time.perf_counter() - start, log
        except httpx.HTTPError:
            pass
        time.sleep(0.25)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()  # SIGTERM: the server takes its application (and its local Ray) down
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


async def stream(client: httpx.AsyncClient, url: str, prompt: str, tokens: int, started: list) -> tuple[str | None, str, str]:
    """(replica, text, how it ended: done / error / lost)."""
    try:
        async with client.stream("POST", url + "/v1/completions", json={"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}) as r:
            started.append(r.headers.get(HEADER))
            text, end = "", "lost"
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    end = "done" if end == "lost" else end
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        end = "error"
                    else:
                        text += "".join(c["text"] for c in event["choices"])
            return r.headers.get(HEADER), text, end if r.status_code == 200 else f"http {r.status_code}"
    except httpx.HTTPError as e:
        return None, "", f"lost ({type(e).__name__})"


async def streams(url: str, prompts: list[str], tokens: int, on_start=None) -> list[tuple[str | None, str, str]]:
    """Every prompt streamed at once; `on_start(replica)` runs once, when the first answer starts."""
    started: list = []
    async with httpx.AsyncClient(timeout=HANG_S) as client:
        tasks = [asyncio.create_task(stream(client, url, p, tokens, started)) for p in prompts]
        if on_start is not None:
            while not started:
                await asyncio.sleep(0.02)
            await asyncio.to_thread(on_start, started[0])
        return await asyncio.gather(*tasks)


def reused(url: str) -> float:
    """mobile_moe_reused_tokens_total summed over the replicas (as Ray exported it last)."""
    metrics = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("mobile_moe_reused_tokens_total{"))


def chats(url: str) -> tuple[int, float]:
    """16 two-turn chats: (second turns served by their first turn's replica, prompt tokens the chats took from held
    prefixes instead of prefilling, over the replicas)."""
    time.sleep(12)  # Ray exports the replicas' metrics every 10 s by default
    same, before = 0, reused(url)
    for i in range(16):
        first = [{"role": "user", "content": f"def task_{i}(items):"}]
        r1 = httpx.post(url + "/v1/chat/completions", json={"messages": first, "max_tokens": 16, "temperature": 0}, timeout=60)
        turn = [*first, {"role": "assistant", "content": r1.json()["choices"][0]["message"]["content"]}, {"role": "user", "content": "Now sort them."}]
        r2 = httpx.post(url + "/v1/chat/completions", json={"messages": turn, "max_tokens": 16, "temperature": 0}, timeout=60)
        same += r1.headers[HEADER] == r2.headers[HEADER]
    time.sleep(12)
    return same, reused(url) - before


def connect(log: str) -> None:
    """Join the cluster's own Ray instance (its address is in the server's summary)."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # as the server's instance runs (Ray 2.60's default; the token is in ~/.ray), before ray loads
    import ray

    ray.init(address=re.search(r"local Ray instance \(([^)]+)\)", Path(log).read_text())[1], logging_level="error", log_to_driver=False)


def kill(url: str, replica: str) -> float:
    """ray.kill the replica's actor; prints when /health says degraded; returns the time of the kill."""
    import ray

    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
    start = time.perf_counter()
    while time.perf_counter() - start < 60 and httpx.get(url + "/health", timeout=30).json()["status"] != "degraded":
        time.sleep(0.1)
    print(f"  /health degraded {time.perf_counter() - start:.1f} s after the kill", flush=True)
    return start


def restored(start: float, replicas: int) -> float:
    """Seconds from `start` until Serve runs `replicas` engine replicas again."""
    from ray import serve

    while True:
        states = serve.status().applications["mobile-moe"].deployments["Engine"].replica_states
        if states.get("RUNNING") == replicas and sum(states.values()) == replicas:
            return time.perf_counter() - start
        time.sleep(0.2)


def report(name: str, results: list, want: list[str]) -> None:
    ends = Counter(end for _, _, end in results)
    equal = sum(end == "done" and text == w for (_, text, end), w in zip(results, want))
    shares = Counter(replica.rsplit("#", 1)[-1] for replica, _, end in results if end == "done" and replica)
    print(f"{name}: {len(results)} streams, ends {dict(ends)}, {equal} equal to the single server's, per replica {dict(shares)}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    a = p.parse_args()
    prompts = [f"def function_{i}(x, y):\n    " for i in range(a.streams * 3 // 2)]
    batch = ["--max-batch", str(a.max_batch)]
    single, first, _ = launch(8310, *batch)
    try:
        print(f"single server: first answer {first:.1f} s after launch", flush=True)
        want = [text for _, text, _ in asyncio.run(streams("http://127.0.0.1:8310", prompts, a.tokens))]
    finally:
        stop(single)
    cluster, first, log = launch(8311, "--replicas", "2", *batch)
    try:
        print(f"2 replicas: first answer {first:.1f} s after launch", flush=True)
        measure_cluster("http://127.0.0.1:8311", log, prompts, want, a)
    finally:
        stop(cluster)
    pow2, _, _ = launch(8312, "--replicas", "2", "--request-router", "power-of-two", *batch)
    try:
        same, hits = chats("http://127.0.0.1:8312")
        print(f"power-of-two router: {same} of 16 second turns on their first turn's replica; prompt tokens reused {hits:g}", flush=True)
    finally:
        stop(pow2)


def measure_cluster(url: str, log: str, prompts: list[str], want: list[str], a: argparse.Namespace) -> None:
    """Streams, chats, then a replica killed mid-run."""
    report("2 replicas", asyncio.run(streams(url, prompts[: a.streams], a.tokens)), want)
    same, hits = chats(url)
    print(f"conversation router: {same} of 16 second turns on their first turn's replica; prompt tokens reused {hits:g}", flush=True)
    connect(log)
    killed: list = []
    results = asyncio.run(streams(url, prompts, a.tokens, lambda replica: killed.extend([replica, kill(url, replica)])))
    report(f"replica {killed[0].rsplit('#', 1)[-1]} killed", results, want)
    print(f"  errors on the killed replica: {sum(end == 'error' and r == killed[0] for r, _, end in results)}", flush=True)
    print(f"  2 replicas running again {restored(killed[1], 2):.1f} s after the kill", flush=True)
    import ray

    ray.shutdown()  # leave the cluster before it stops (a driver whose cluster is gone exits)


if __name__ == "__main__":
    main()
