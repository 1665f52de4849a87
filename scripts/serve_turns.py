"""The server (HTTP, in process) on OLMoE-1B-7B widths, 4 layers, int4 experts, CPU: time until the answer of a chat's
second turn (a 1,024-token conversation + 24 new tokens) starts, against a cold 1,048-token prompt.

`python scripts/serve_turns.py [PREFIX_CACHE_GB]` (default 1; 0: without prefix reuse) builds the synthetic model in
memory (as `bench --synthetic` does), serves it with the server's own app and engine worker, and per policy, in each of
3 rounds: an unrelated short request, a cold 1,048-token prompt (timed), the first turn (1,000 tokens, a 24-token
reply), then the second turn (timed); every timed request asks for one token, so its time is the time to the answer's
start. Prints the medians and the /metrics prefix lines.
"""

from __future__ import annotations

import socket
import statistics
import sys
import threading
import time

import httpx
import torch
import uvicorn

from mobile_moe import LLM, PolicyConfig, SamplingParams, engine_config
from mobile_moe.bench.synthetic import build_synthetic
from mobile_moe.serve.app import create_app
from mobile_moe.serve.worker import EngineWorker

REPLY, NEW = 24, 24  # the first turn's reply, the second turn's new message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(url: str, prompt: list[int], tokens: int, policy: str, tau: float | None) -> float:
    """Seconds one greedy completion took."""
    body = {"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "policy": policy, **({} if tau is None else {"tau": tau})}
    start = time.perf_counter()
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return time.perf_counter() - start


def main(prefix_gb: float) -> None:
    torch.set_num_threads(2)
    loaded = build_synthetic("olmoe-1b-7b", torch.device("cpu"), expert_dtype="int4", layers=4)
    llm = LLM(loaded, engine_config(progress=False, max_batch=2, prefix_cache=prefix_gb))
    worker = EngineWorker(llm, 8, 2)
    app = create_app(llm, worker, "m", None, 4096, PolicyConfig("big"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.config.port}"
    gen = torch.Generator().manual_seed(1)
    first_turn, new_message = torch.randint(3, 50000, (1024 - REPLY,), generator=gen).tolist(), torch.randint(3, 50000, (NEW,), generator=gen).tolist()
    for policy, tau in (("big", None), ("mobile", 0.0)):  # mobile at tau 0: little writes the whole reply
        config = PolicyConfig(policy, tau=tau, criterion=None if tau is None else "max_prob")
        sampling = SamplingParams(max_new_tokens=REPLY, temperature=0.0, stop_at_eos=False)
        reply = llm.generate(first_turn, sampling, config).token_ids  # what the server answers (greedy)
        second = first_turn + reply + new_message
        cold, turn = [], []
        for _ in range(3):
            ask(url, torch.randint(3, 50000, (64,), generator=gen).tolist(), 1, policy, tau)  # nothing shared with what follows
            cold.append(ask(url, torch.randint(3, 50000, (len(second),), generator=gen).tolist(), 1, policy, tau))
            ask(url, first_turn, REPLY, policy, tau)
            turn.append(ask(url, second, 1, policy, tau))
        c, t = statistics.median(cold), statistics.median(turn)
        name = policy if tau is None else f"{policy} tau {tau:g}"
        print(f"policy {name}: cold {len(second)}-token prompt {c:.2f} s, second turn {t:.2f} s, {c / t:.1f}x (cold {cold}, turn {turn})", flush=True)
    metrics = httpx.get(f"{url}/metrics").text
    print("\n".join(line for line in metrics.splitlines() if line.startswith(("mobile_moe_prefix", "mobile_moe_reused")) and "_created" not in line))
    server.should_exit = True
    worker.close()


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)
