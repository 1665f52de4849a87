"""`mobile-moe serve` on 127.0.0.1: the real openai client, streamed and not, concurrency, the queue limit, bad requests, faults."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
import uvicorn

from mobile_moe import LLM, PolicyConfig, SamplingParams, engine_config
from mobile_moe.engine.calibration import DEMO_MODEL
from mobile_moe.serve.app import create_app
from mobile_moe.serve.streaming import Generation
from mobile_moe.serve.worker import EngineWorker, Job

PROMPT = "def add(a, b):"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(llm: LLM, max_queue: int = 64, api_key: str | None = None, cap: int = 64, max_batch: int = 1):
    """A live server in a thread; yields (base url, worker)."""
    worker = EngineWorker(llm, max_queue, max_batch)
    app = create_app(llm, worker, "demo", api_key, cap, PolicyConfig("big"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}", worker
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        worker.close()


@pytest.fixture(scope="module")
def demo():
    return LLM(DEMO_MODEL, engine_config(progress=False))


@pytest.fixture(scope="module")
def server(demo):
    with serving(demo) as (url, _):
        yield url


def solo(llm: LLM, ids: list[int], tokens: int) -> str:
    return llm.decode(llm.generate(ids, SamplingParams(max_new_tokens=tokens), PolicyConfig("big")).token_ids)


def test_openai_client_completions_and_chat_equal_generate(demo, server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    want = solo(demo, demo.encode(PROMPT), 8)
    done = client.completions.create(model="demo", prompt=PROMPT, max_tokens=8, temperature=0)
    assert done.choices[0].text == want and done.usage.completion_tokens == 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="demo", prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
    assert streamed == want
    messages = [{"role": "user", "content": PROMPT}]
    want_chat = solo(demo, demo.chat_prompt(messages), 8)
    reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == want_chat
    chunks = client.chat.completions.create(model="demo", messages=messages, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want_chat
    assert [m.id for m in client.models.list().data] == ["demo"]


def test_mobile_knobs_are_echoed_with_the_fallback_count(server):
    body = httpx.post(f"{server}/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "policy": "mobile", "tau": 0.5}).json()
    ext = body["mobile_moe"]
    assert (ext["policy"], ext["tau"]) == ("mobile", 0.5) and 0 <= ext["fallback_tokens"] <= 5
    learned = httpx.post(f"{server}/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "policy": "mobile", "criterion": "learned"}).json()
    assert learned["mobile_moe"]["criterion"] == "learned"  # the shipped calibration's fitted predictor and tau


def test_concurrent_streams_each_equal_their_solo_output(demo, server):
    prompts = [f"x{i} = {i} *" for i in range(64)]
    alone = [solo(demo, demo.encode(p), 3) for p in prompts]

    def ask(prompt: str) -> str:
        text = ""
        with httpx.stream("POST", f"{server}/v1/completions", json={"prompt": prompt, "max_tokens": 3, "temperature": 0, "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    with ThreadPoolExecutor(max_workers=64) as pool:
        assert list(pool.map(ask, prompts)) == alone


def test_a_full_queue_answers_429_and_a_fault_answers_500(demo):
    release = threading.Event()
    with serving(demo, max_queue=1) as (url, worker):
        blocker = Job(demo.encode(PROMPT), SamplingParams(max_new_tokens=2), PolicyConfig("big"), lambda t: release.wait(30) or True, lambda r, e: None)
        worker.submit(blocker)  # holds the only place
        r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        release.set()
        time.sleep(0.5)
        worker.batch.step = lambda: (_ for _ in ()).throw(RuntimeError("injected fault"))  # the worker starts a fresh batch after it
        r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == solo(demo, demo.encode(PROMPT), 4)


@pytest.mark.parametrize(
    "method, path, body, status, needle",
    [
        ("POST", "/v1/completions", {"model": "gpt-4", "prompt": PROMPT}, 404, "The model `gpt-4` does not exist; this server serves `demo`"),
        ("POST", "/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
        (
            "POST",
            "/v1/completions",
            b"{not json",
            400,
            "request body is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        ),
        ("POST", "/v1/completions", b'{"prompt": "x",\n "max_tokens": }', 400, "request body is not valid JSON: Expecting value: line 2 column 16 (char 31)"),
        ("POST", "/v1/completions", {"max_tokens": 4}, 400, "prompt"),
        ("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens"),
        ("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
        ("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": -3}, 400, "max_tokens"),
        ("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 65}, 400, "above this server's cap 64"),
        ("POST", "/v1/completions", {"prompt": "x " * 2000}, 400, "context"),
        ("POST", "/v1/completions", {"prompt": PROMPT, "temperature": 3}, 400, "temperature"),
        ("POST", "/v1/completions", {"prompt": PROMPT, "top_p": 0}, 400, "top_p"),
        ("POST", "/v1/completions", {"prompt": PROMPT, "policy": "huge"}, 400, "policy"),
        ("POST", "/v1/completions", b'{"prompt": "x", "tau": NaN}', 400, "tau: Input should be a finite number"),
        ("POST", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature: Input should be a finite number"),
        ("POST", "/v1/completions", b'{"prompt": "x", "temperature": Infinity}', 400, "temperature: Input should be a finite number"),
        ("POST", "/v1/completions", b'{"prompt": "x", "top_p": NaN}', 400, "top_p: Input should be a finite number"),
        (
            "POST",
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}',
            400,
            "top_p: Input should be a finite number",
        ),
        ("POST", "/v1/chat/completions", {"max_tokens": 4}, 400, "messages"),
        ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
        ("POST", "/v1/completions", b'{"prompt": "' + b"x" * (1 << 20) + b'"}', 413, "body over"),
        ("GET", "/v1/nothing", None, 404, "Not Found"),
        ("GET", "/v1/completions", None, 405, "Method Not Allowed"),
    ],
)
def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(server, method, path, body, status, needle):
    content = body if isinstance(body, bytes) else (None if body is None else json.dumps(body).encode())
    r = httpx.request(method, f"{server}{path}", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status and needle in r.json()["error"]["message"]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


@pytest.mark.parametrize(
    "body, message",
    [
        (b'{"prompt": "x", "temperature": NaN}', "temperature: Input should be a finite number"),
        (b'{"prompt": "x", "max_tokens": 4,}', "request body is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 33 (char 32)"),
    ],
)
def test_nan_and_malformed_json_are_openai_format_errors(server, body, message):
    r = httpx.post(f"{server}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json() == {"error": {"message": message, "type": "invalid_request_error", "code": 400}}


def test_api_key_guards_every_route_but_health(demo):
    with serving(demo, api_key="sekrit") as (url, _):
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit")
        assert client.completions.create(model="demo", prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text


def test_a_client_that_leaves_mid_stream_frees_the_worker(demo):
    with serving(demo) as (url, worker):
        results = []
        reported = worker._done
        worker._done = lambda job, result, err: (results.append(result), reported(job, result, err))
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 60, "temperature": 0, "stream": True}) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))  # one chunk, then hang up
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0}, timeout=60)
        assert ok.status_code == 200
        assert results[0].finish_reason == "cancelled" and len(results[0].token_ids) < 60
        metrics = httpx.get(f"{url}/metrics").text
        assert "mobile_moe_requests_total 2.0" in metrics and "mobile_moe_queue_depth 0.0" in metrics
        assert "# TYPE mobile_moe_requests_total counter" in metrics and "# HELP mobile_moe_fallback_rate" in metrics  # exposition format
        assert "mobile_moe_batch_occupancy 0.0" in metrics and "mobile_moe_queue_seconds_count 2.0" in metrics


def test_stop_strings_cut_the_text_and_end_generation(demo, server):
    full = httpx.post(f"{server}/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0}).json()["choices"][0]["text"]
    stop = full.strip()[2:5]  # a piece from inside the greedy continuation
    cut = httpx.post(f"{server}/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stop": [stop]}).json()
    assert cut["choices"][0]["text"] == full[: full.index(stop)] and cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] < 12


def test_echo_and_logprobs_score_the_prompt_as_lm_eval_asks(demo, server):
    ids = demo.encode(PROMPT)
    body = {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 2, "temperature": 0}
    choice = httpx.post(f"{server}/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == demo.decode(ids) and len(lp["token_logprobs"]) == len(ids) == len(lp["tokens"]) and lp["token_logprobs"][0] is None
    want = demo.logits(ids[:-1], "big").float().log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp["token_logprobs"][1:]), want, atol=1e-4)
    assert all(len(top) == 2 and max(top.values()) >= got - 1e-6 for top, got in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]))
    one = httpx.post(f"{server}/v1/completions", json=body | {"max_tokens": 1}).json()["choices"][0]["logprobs"]  # lm-eval's loglikelihood call
    assert len(one["token_logprobs"]) == len(ids) + 1 and one["token_logprobs"][-1] == pytest.approx(max(one["top_logprobs"][-1].values()), abs=1e-5)
    little = httpx.post(f"{server}/v1/completions", json=body | {"policy": "little"}).json()["choices"][0]["logprobs"]["token_logprobs"]
    assert little[1:] != lp["token_logprobs"][1:]  # little scores with little experts, not one big prefill
    mobile = httpx.post(f"{server}/v1/completions", json=body | {"policy": "mobile", "criterion": "margin", "tau": 0.3}).json()
    picks = [
        m == pytest.approx(b, abs=1e-5) or m == pytest.approx(s, abs=1e-5)
        for m, b, s in zip(mobile["choices"][0]["logprobs"]["token_logprobs"][1:], lp["token_logprobs"][1:], little[1:])
    ]
    assert all(picks)  # each position scored by the pass mobile would have emitted it from


def test_several_prompts_in_one_request_are_generated_together(demo, server):
    prompts = [PROMPT, "import os\n"]
    got = httpx.post(f"{server}/v1/completions", json={"prompt": prompts, "max_tokens": 4, "temperature": 0}).json()
    assert [c["index"] for c in got["choices"]] == [0, 1]
    assert [c["text"] for c in got["choices"]] == [solo(demo, demo.encode(p), 4) for p in prompts]
    ids = httpx.post(f"{server}/v1/completions", json={"prompt": [demo.encode(p) for p in prompts], "max_tokens": 4, "temperature": 0}).json()
    assert [c["text"] for c in ids["choices"]] == [c["text"] for c in got["choices"]] and ids["usage"]["completion_tokens"] == 8
    assert httpx.post(f"{server}/v1/completions", json={"prompt": PROMPT, "max_tokens": 0}).status_code == 400  # scoring needs echo
    assert httpx.post(f"{server}/v1/completions", json={"prompt": prompts, "stream": True}).status_code == 400
    bad = httpx.post(
        f"{server}/v1/completions", json={"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1, "policy": "mobile", "criterion": "learned"}
    )
    assert bad.status_code == 400 and "logits criterion" in bad.json()["error"]["message"]


def test_a_streamed_character_split_over_tokens_arrives_whole(demo):
    text = "x = '日本語 é ü'"
    ids = demo.encode(text)
    loop = asyncio.new_event_loop()
    try:
        gen = Generation(demo, loop, [], lambda result: None)
        for token in ids:
            gen.on_token(token)
        gen.on_done(None, None)
        loop.run_until_complete(asyncio.sleep(0))  # run the queued hand-overs
        deltas = []
        while not gen.events.empty():
            event = gen.events.get_nowait()
            deltas += [event[1]] if event[0] == "text" else []
    finally:
        loop.close()
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
