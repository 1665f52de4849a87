"""`mobile-moe serve` on 127.0.0.1: the real openai client, streamed and not, concurrency, the queue limit, bad requests, faults."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import jsonschema
import openai
import pytest
import torch
import uvicorn
from test_processors import SCHEMA

from mobile_moe import LLM, PolicyConfig, SamplingParams, engine_config
from mobile_moe.cli import main
from mobile_moe.cli.serve import served_name
from mobile_moe.engine.calibration import DEMO_MODEL
from mobile_moe.serve.app import create_app
from mobile_moe.serve.streaming import Generation
from mobile_moe.serve.worker import EngineWorker, Job

PROMPT = "def add(a, b):"
MSGS = [{"role": "user", "content": PROMPT}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_log():
    """The server's log records (access lines, failures with their tracebacks) as formatted text, while inside."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(logging.Formatter().format(record))  # type: ignore[method-assign]
    log = logging.getLogger("mobile_moe.serve")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


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
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
        release.set()
        time.sleep(0.5)
        worker.batch.step = lambda: (_ for _ in ()).throw(RuntimeError("injected fault"))  # the worker starts a fresh batch after it
        with server_log() as lines:
            r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"] and "\n" not in r.json()["error"]["message"]
        logged = "\n".join(lines)
        assert "generation failed: injected fault" in logged and "Traceback" in logged and "RuntimeError: injected fault" in logged
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
        ("POST", "/v1/chat/completions", {"messages": MSGS, "max_tokens": True}, 400, "max_tokens: Input should be a valid integer"),
        ("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": True}, 400, "max_tokens: Input should be a valid integer"),
        ("POST", "/v1/chat/completions", {"messages": MSGS, "temperature": True}, 400, "temperature: Input should be a valid number"),
        ("POST", "/v1/chat/completions", {"messages": MSGS, "n": 2}, 400, "n: Input should be less than or equal to 1"),
        ("POST", "/v1/chat/completions", {"messages": MSGS, "stop": [""]}, 400, "stop: an empty stop string would stop every reply"),
        ("POST", "/v1/completions", {"prompt": PROMPT, "stop": ""}, 400, "stop: an empty stop string would stop every reply"),
        ("POST", "/v1/chat/completions", {"messages": MSGS, "tools": [{"type": "function"}]}, 400, "tools: not supported by this server"),
        ("POST", "/v1/chat/completions", {"messages": MSGS, "tool_choice": "auto"}, 400, "tool_choice: not supported by this server"),
        ("POST", "/v1/chat/completions", {"messages": MSGS, "echo": True}, 400, "echo: not supported by this server"),
        ("POST", "/v1/completions", {"prompt": PROMPT, "suffix": "x"}, 400, "suffix: not supported by this server (no insertion"),
        ("POST", "/v1/completions", {"prompt": PROMPT, "best_of": 2}, 400, "best_of: Input should be less than or equal to 1"),
        ("POST", "/v1/completions", {"prompt": PROMPT, "logit_bias": {"5": 1.0}}, 400, "logit_bias: not supported by this server"),
        ("POST", "/v1/completions", {"prompt": PROMPT, "frequency_penalty": 3}, 400, "frequency_penalty: Input should be less than or equal to 2"),
        ("POST", "/v1/chat/completions", {"messages": MSGS, "response_format": {"type": "xml"}}, 400, "response_format.type: Input should be"),
        ("POST", "/v1/chat/completions", {"messages": MSGS, "response_format": {"type": "json_schema"}}, 400, "response_format: json_schema is given with"),
        (
            "POST",
            "/v1/chat/completions",
            {"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
            400,
            "response_format: json_schema is not a schema xgrammar can compile",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            400,
            "messages.0.content: 'image_url' parts are not supported (text only)",
        ),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "tool", "content": "hi"}]}, 400, "messages.0.role"),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, 400, "messages.0.name: not supported"),
        ("POST", "/v1/chat/completions", {"messages": MSGS, "top_logprobs": 2}, 400, "top_logprobs: needs logprobs true"),
        (
            "POST",
            "/v1/chat/completions",
            {"messages": MSGS, "logprobs": True, "top_logprobs": 21},
            400,
            "top_logprobs: Input should be less than or equal to 20",
        ),
        ("POST", "/v1/chat/completions", {"messages": MSGS, "stream_options": {"include_usage": True}}, 400, "stream_options: only with stream true"),
        ("POST", "/v1/chat/completions", {"messages": MSGS, "max_tokens": 4, "max_completion_tokens": 5}, 400, "max_tokens and max_completion_tokens differ"),
        ("GET", "/v1/nothing", None, 404, "Not Found"),
        ("GET", "/v1/completions", None, 405, "Method Not Allowed"),
    ],
)
def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(server, method, path, body, status, needle):
    content = body if isinstance(body, bytes) else (None if body is None else json.dumps(body).encode())
    r = httpx.request(method, f"{server}{path}", content=content, headers={"content-type": "application/json"})
    message = r.json()["error"]["message"]
    assert r.status_code == status and needle in message and "\n" not in message
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
    learned = httpx.post(f"{server}/v1/completions", json=body | {"policy": "mobile"}).json()  # the shipped calibration: criterion learned
    assert learned["choices"][0]["logprobs"]["token_logprobs"][0] is None and len(learned["choices"][0]["logprobs"]["token_logprobs"]) == len(ids)


def test_several_prompts_in_one_request_are_generated_together(demo, server):
    prompts = [PROMPT, "import os\n"]
    got = httpx.post(f"{server}/v1/completions", json={"prompt": prompts, "max_tokens": 4, "temperature": 0}).json()
    assert [c["index"] for c in got["choices"]] == [0, 1]
    assert [c["text"] for c in got["choices"]] == [solo(demo, demo.encode(p), 4) for p in prompts]
    ids = httpx.post(f"{server}/v1/completions", json={"prompt": [demo.encode(p) for p in prompts], "max_tokens": 4, "temperature": 0}).json()
    assert [c["text"] for c in ids["choices"]] == [c["text"] for c in got["choices"]] and ids["usage"]["completion_tokens"] == 8
    assert httpx.post(f"{server}/v1/completions", json={"prompt": PROMPT, "max_tokens": 0}).status_code == 400  # scoring needs echo
    assert httpx.post(f"{server}/v1/completions", json={"prompt": prompts, "stream": True}).status_code == 400


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


def test_a_huge_model_name_is_echoed_cut_short(server):
    r = httpx.post(f"{server}/v1/completions", json={"model": "m" * 100_000, "prompt": PROMPT})
    assert r.status_code == 404 and len(r.json()["error"]["message"]) < 200 and "m" * 64 + "..." in r.json()["error"]["message"]


def test_chat_generates_up_to_the_cap_by_default_and_honours_max_completion_tokens(demo):
    with serving(demo, cap=24) as (url, _):
        free = httpx.post(f"{url}/v1/chat/completions", json={"messages": MSGS, "temperature": 0}, timeout=60).json()
        assert free["usage"]["completion_tokens"] == 24 and free["choices"][0]["finish_reason"] == "length"  # the greedy reply runs on
        five = httpx.post(f"{url}/v1/chat/completions", json={"messages": MSGS, "temperature": 0, "max_completion_tokens": 5}).json()
        assert five["usage"]["completion_tokens"] == 5 and free["choices"][0]["message"]["content"].startswith(five["choices"][0]["message"]["content"])
        legacy = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "temperature": 0}).json()
        assert legacy["usage"]["completion_tokens"] == 16  # OpenAI's legacy default


def sse(url: str, body: dict) -> list[dict]:
    """A stream's data chunks, parsed, up to [DONE]."""
    with httpx.stream("POST", url, json=body | {"stream": True}, timeout=60) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_chat_logprobs_whole_and_streamed_with_usage(demo, server):
    body = {"messages": MSGS, "temperature": 0, "max_tokens": 6, "logprobs": True, "top_logprobs": 2}
    whole = httpx.post(f"{server}/v1/chat/completions", json=body).json()
    content = whole["choices"][0]["logprobs"]["content"]
    prompt = demo.chat_prompt(MSGS)
    generated = demo.generate(prompt, SamplingParams(6), PolicyConfig("big")).token_ids
    logp = demo.logits(prompt + generated[:-1], "big").float().log_softmax(-1)[len(prompt) - 1 :]
    assert len(content) == 6 and "".join(e["token"] for e in content) == whole["choices"][0]["message"]["content"]
    for i, (entry, token) in enumerate(zip(content, generated)):
        assert entry["logprob"] == pytest.approx(float(logp[i, token]), abs=1e-4) and entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2 and entry["top_logprobs"][0]["token"] == entry["token"]  # greedy: the most probable
    chunks = sse(f"{server}/v1/chat/completions", body | {"stream_options": {"include_usage": True}})
    streamed = [e for c in chunks for choice in c["choices"] for e in (choice.get("logprobs") or {"content": []})["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-5)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6 and all(c["usage"] is None for c in chunks[:-1])
    mobile = httpx.post(f"{server}/v1/chat/completions", json=body | {"policy": "mobile"}).json()  # criterion learned: the emitting pass's scores
    assert len(mobile["choices"][0]["logprobs"]["content"]) == 6


def test_text_parts_and_the_developer_role(server):
    def reply(messages: list[dict]) -> str:
        r = httpx.post(f"{server}/v1/chat/completions", json={"messages": messages, "temperature": 0, "max_tokens": 6})
        return r.json()["choices"][0]["message"]["content"]

    parts = [{"type": "text", "text": "def add(a,"}, {"type": "text", "text": "b):"}]
    assert reply([{"role": "user", "content": parts}]) == reply([{"role": "user", "content": "def add(a,\nb):"}])
    assert reply([{"role": "developer", "content": "Be brief."}, *MSGS]) == reply([{"role": "system", "content": "Be brief."}, *MSGS])


def test_penalties_are_those_of_the_python_api(demo, server):
    penalties = {"frequency_penalty": 1.0, "presence_penalty": 0.5}
    got = httpx.post(f"{server}/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0} | penalties).json()["choices"][0]["text"]
    want = demo.generate(demo.encode(PROMPT), SamplingParams(24, **penalties), PolicyConfig("big")).text
    assert got == want and got != solo(demo, demo.encode(PROMPT), 24)


PET = SCHEMA  # required keys, an enum and a nested object


def test_response_format_json_schema_and_json_object(demo):
    pet = {"messages": [{"role": "user", "content": "A pet as JSON."}], "max_tokens": 256, "temperature": 1.0}
    schema = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET, "strict": True}}
    with serving(demo, cap=256) as (url, _):
        for seed, policy in enumerate(("big", "little", "mobile")):
            r = httpx.post(f"{url}/v1/chat/completions", json=pet | {"seed": seed, "policy": policy, "response_format": schema}, timeout=60).json()
            jsonschema.validate(json.loads(r["choices"][0]["message"]["content"]), PET)
            assert r["choices"][0]["finish_reason"] == "stop"
        chunks = sse(f"{url}/v1/chat/completions", pet | {"seed": 7, "response_format": schema})
        jsonschema.validate(json.loads("".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])), PET)
        anything = httpx.post(f"{url}/v1/completions", json={"prompt": "{", "max_tokens": 256, "temperature": 0, "response_format": {"type": "json_object"}})
        choice = anything.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and isinstance(json.loads(choice["text"]), dict)


def test_every_request_gets_an_access_log_line(server):
    with server_log() as lines:
        httpx.post(f"{server}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        sse(f"{server}/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
        httpx.post(f"{server}/v1/completions", json={"prompt": PROMPT, "max_tokens": True})
        deadline = time.monotonic() + 10
        while len(lines) < 3 and time.monotonic() < deadline:  # a line is written once the last byte is out
            time.sleep(0.01)
    assert len(lines) == 3 and all(" s" in line for line in lines)
    assert '"POST /v1/completions" 200 ' in lines[0] and "+4 tokens" in lines[0]
    assert '"POST /v1/completions" 200 ' in lines[1] and "+3 tokens" in lines[1]
    assert '"POST /v1/completions" 400 ' in lines[2]


def test_the_served_name_and_a_config_the_engine_cannot_run(demo, checkpoints, tmp_path, capsys):
    args = argparse.Namespace(served_model_name="gpt-4o-mini", model=None)
    assert served_name(args, demo) == "gpt-4o-mini"
    assert served_name(argparse.Namespace(served_model_name=None, model=None), demo) == "demo_model"
    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["mixtral"], bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"num_experts_per_tok": config["num_local_experts"] + 1}))
    capsys.readouterr()
    assert main(["serve", "--model", str(bad), "--port", str(free_port()), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "routes each token to 9 experts of 8" in err


def test_exact_requests_return_big_s_text_streamed_or_not_and_sample(server):
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    big = httpx.post(f"{server}/v1/completions", json=body | {"policy": "big"}).json()["choices"][0]["text"]
    exact = httpx.post(f"{server}/v1/completions", json=body | {"policy": "exact", "tau": 0.0}).json()
    assert exact["choices"][0]["text"] == big and exact["mobile_moe"]["policy"] == "exact"
    with httpx.stream("POST", f"{server}/v1/completions", json=body | {"policy": "exact", "tau": 0.0, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == big
    sampled = httpx.post(f"{server}/v1/completions", json=body | {"policy": "exact", "temperature": 0.7})
    assert sampled.status_code == 200 and sampled.json()["mobile_moe"]["policy"] == "exact"  # speculative sampling
