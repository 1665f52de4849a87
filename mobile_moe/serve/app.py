"""OpenAI-compatible HTTP API over one engine worker: handlers validate, enqueue and stream; nothing in engine/ knows HTTP."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.engine.generate import GenerationResult
from mobile_moe.engine.llm import LLM
from mobile_moe.errors import MobileMoeError
from mobile_moe.serve.scoring import scored_choice
from mobile_moe.serve.worker import EngineWorker, Job, QueueFull

MAX_BODY_BYTES = 1 << 20


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class Common(BaseModel):
    """Fields both endpoints take; policy/tau/criterion are this server's MoBiLE extensions."""

    model_config = ConfigDict(allow_inf_nan=False)  # JSON's NaN/Infinity literals: "should be a finite number", not a range error

    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: bool = False
    policy: Literal["big", "little", "mobile"] | None = None
    tau: float | None = Field(None, ge=0.0)
    criterion: Literal["max_prob", "entropy", "margin", "learned"] | None = None


class CompletionRequest(Common):
    prompt: str | list[int] | list[str] | list[list[int]]  # one prompt (text or ids) or several
    max_tokens: int = Field(16, ge=0)  # 0: score the prompt only (with echo)
    echo: bool = False  # the prompt's text (and, with logprobs, its tokens' scores) before the completion
    logprobs: int | None = Field(None, ge=0, le=20)  # per token: its log-probability and this many top alternatives


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    """An OpenAI-style JSON error."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def invalid_json_message(err: dict, body: object) -> str:
    """FastAPI's json_invalid error as json's own message: what is wrong, at which line, column and character."""
    loc = err.get("loc", ())
    pos = loc[-1] if loc and isinstance(loc[-1], int) else None
    what = (err.get("ctx") or {}).get("error", "JSON decode error")
    if pos is None:
        return f"request body is not valid JSON: {what}"
    doc = body.decode("utf-8", "replace") if isinstance(body, bytes) else body if isinstance(body, str) else ""
    line = doc.count("\n", 0, pos) + 1
    column = pos - doc.rfind("\n", 0, pos)  # 1-based, as json.JSONDecodeError counts
    return f"request body is not valid JSON: {what}: line {line} column {column} (char {pos})"


class Generation:
    """One request's tokens as they arrive from the worker thread, with stop strings applied to the text."""

    def __init__(self, llm: LLM, loop: asyncio.AbstractEventLoop, stops: list[str], on_finish: Callable[[GenerationResult | None], None]) -> None:
        self.llm, self.loop, self.stops, self.on_finish = llm, loop, stops, on_finish
        self.events: asyncio.Queue = asyncio.Queue()
        self.ids: list[int] = []
        self.text = ""  # the reply so far, cut at a stop string
        self.sent = ""  # the part of it already handed out
        self.stopped = False

    def on_token(self, token: int) -> bool:
        """Worker thread: decode, cut at a stop string, hand the new text to the loop; False stops generation.

        Text that could be the start of a stop string is held back until the next tokens decide.
        """
        self.ids.append(token)
        self.text = self.llm.decode(self.ids) or ""
        cut = min((self.text.find(s) for s in self.stops if s in self.text), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            self._send(len(self.text))
        else:
            self._send(len(self.text) - self._held_back(self.text))
        return not self.stopped

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        return max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)

    def _send(self, end: int) -> None:
        """Hand text[len(sent):end] to the event loop."""
        delta = self.text[len(self.sent):end]
        if delta:
            self.sent += delta
            self.loop.call_soon_threadsafe(self.events.put_nowait, ("text", delta))

    def on_done(self, result, err) -> None:
        """Worker thread: the generation ended (result) or failed (err); counted even when the client already left."""
        self._send(len(self.text))  # what was held back for a stop string that never came
        self.loop.call_soon_threadsafe(self.on_finish, result)
        self.loop.call_soon_threadsafe(self.events.put_nowait, ("done", result, err))


COUNTERS = {  # name -> help; each exported as mobile_moe_<name>_total
    "requests": "Generations that finished", "failed_requests": "Generations that failed", "prompt_tokens": "Prompt tokens",
    "completion_tokens": "Generated tokens", "fallback_tokens": "Decode steps recomputed with big",
}
ENGINE_COUNTERS = {  # the expert cache's own counters (rows decoded together share every expert load): name -> (CacheStats field, help)
    "expert_hits": ("hits", "Routed experts found cached"), "expert_misses": ("misses", "Routed experts loaded on demand"),
    "h2d_bytes": ("h2d_bytes", "Expert bytes copied host to device"), "disk_bytes": ("disk_bytes", "Expert bytes read from the disk store"),
}


class EngineCounters:
    """A prometheus collector reading the engine's expert-cache counters when scraped."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm

    def collect(self) -> Iterator[CounterMetricFamily]:
        """One counter per ENGINE_COUNTERS entry."""
        stats = self.llm.cache.stats
        for name, (field, text) in ENGINE_COUNTERS.items():
            yield CounterMetricFamily(f"mobile_moe_{name}", text, value=getattr(stats, field))


class Metrics:
    """/metrics through prometheus_client, in a registry of this app's own (no process-wide state)."""

    def __init__(self, worker: EngineWorker) -> None:
        self.registry = CollectorRegistry()
        self.counters = {name: Counter(f"mobile_moe_{name}", text, registry=self.registry) for name, text in COUNTERS.items()}
        self.totals = dict.fromkeys(COUNTERS, 0.0)  # the same sums, for the derived gauges
        self.decode_s = 0.0
        Gauge("mobile_moe_queue_depth", "Requests waiting or running", registry=self.registry).set_function(worker.depth)
        Gauge("mobile_moe_batch_occupancy", "Rows of the decode batch in use", registry=self.registry).set_function(worker.occupancy)
        Gauge("mobile_moe_batch_rows", "Rows the decode batch holds (--max-batch)", registry=self.registry).set(worker.max_batch)
        self.queue_seconds = Histogram("mobile_moe_queue_seconds", "Seconds a request waited before joining the batch", registry=self.registry,
                                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
        governor = worker.llm.governor
        Gauge("mobile_moe_batch_little_first_steps", "Batched steps whose mobile rows decoded little first (measured cheaper)",
              registry=self.registry).set_function(lambda: governor.little_steps)
        Gauge("mobile_moe_batch_big_instead_steps", "Batched steps whose mobile rows ran big (little measured dearer at that batch size)",
              registry=self.registry).set_function(lambda: governor.big_steps)
        worker.on_admit = self.queue_seconds.observe
        self.registry.register(EngineCounters(worker.llm))
        Gauge("mobile_moe_decode_tokens_per_second", "Generated tokens per second of decoding, all requests",
              registry=self.registry).set_function(self._tok_s)
        Gauge("mobile_moe_fallback_rate", "Share of generated tokens recomputed with big", registry=self.registry).set_function(self._fallback_rate)

    def record(self, result: GenerationResult | None, prompt_tokens: int) -> None:
        """Add one finished generation (None: one that failed)."""
        if result is None:
            self._add("failed_requests", 1)
            return
        s = result.stats
        self._add("requests", 1)
        self._add("prompt_tokens", prompt_tokens)
        self._add("completion_tokens", len(result.token_ids))
        self._add("fallback_tokens", s.fallback_tokens)
        self.decode_s += s.decode_s

    def _add(self, name: str, amount: float) -> None:
        self.counters[name].inc(amount)
        self.totals[name] += amount

    def _tok_s(self) -> float:
        return self.totals["completion_tokens"] / self.decode_s if self.decode_s else 0.0

    def _fallback_rate(self) -> float:
        return self.totals["fallback_tokens"] / max(self.totals["completion_tokens"], 1.0)

    def text(self) -> bytes:
        """The Prometheus exposition format (with # HELP and # TYPE lines)."""
        return generate_latest(self.registry)


def create_app(llm: LLM, worker: EngineWorker, model_name: str, api_key: str | None, max_tokens_cap: int, defaults: PolicyConfig) -> FastAPI:
    """The FastAPI application."""
    app = FastAPI(title="mobile-moe", docs_url=None, redoc_url=None)
    metrics = Metrics(worker)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            return error(413, f"request body over {MAX_BODY_BYTES} bytes")
        if api_key and request.url.path != "/health" and request.headers.get("authorization") != f"Bearer {api_key}":
            return error(401, "missing or wrong API key", "authentication_error")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error(400, invalid_json_message(first, exc.body))
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "mobile-moe"}]}

    def validate(body: Common, prompt: list[int]) -> tuple[PolicyConfig, SamplingParams | None] | JSONResponse:
        """The request's policy and sampling (None for max_tokens 0), or the error to answer."""
        if body.model is not None and body.model != model_name:  # as OpenAI and vLLM answer an unknown model
            return error(404, f"The model `{body.model}` does not exist; this server serves `{model_name}`", "invalid_request_error")
        if body.max_tokens > max_tokens_cap:
            return error(400, f"max_tokens {body.max_tokens} is above this server's cap {max_tokens_cap}")
        policy = replace(defaults, **{k: v for k, v in (("name", body.policy), ("tau", body.tau), ("criterion", body.criterion)) if v is not None})
        try:
            policy = llm.resolve_policy(policy)
            llm.check_prompt(prompt)
            return policy, (SamplingParams(body.max_tokens, body.temperature, body.top_p, body.seed) if body.max_tokens else None)
        except MobileMoeError as e:
            return error(400, str(e))

    def start(body: Common, prompt: list[int], policy: PolicyConfig, sampling: SamplingParams) -> tuple[Generation, Job] | JSONResponse:
        """Queue the generation; (its token stream, the job), or a 429."""
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        gen = Generation(llm, asyncio.get_running_loop(), stops, lambda result: metrics.record(result, len(prompt)))
        job = Job(prompt, sampling, policy, gen.on_token, gen.on_done)
        try:
            worker.submit(job)
        except QueueFull as e:
            return error(429, str(e), "rate_limit_error")
        return gen, job

    def meta(chat: bool) -> dict:
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_name}

    async def run(body: Common, prompt: list[int], chat: bool):
        checked = validate(body, prompt)
        if isinstance(checked, JSONResponse):
            return checked
        policy, sampling = checked
        assert sampling is not None
        started = start(body, prompt, policy, sampling)
        if isinstance(started, JSONResponse):
            return started
        gen, job = started
        if body.stream:
            return StreamingResponse(stream(gen, job, meta(chat), chat, policy), media_type="text/event-stream")
        return await complete(gen, job, meta(chat), chat, policy, len(prompt))

    async def score(body: CompletionRequest, prompts: list[list[int]]):
        """Several prompts, echo or logprobs: every prompt generated together (the worker batches them), then scored."""
        if body.stream:
            return error(400, "stream is not supported with echo, logprobs, max_tokens 0 or several prompts")
        if body.max_tokens == 0 and not body.echo:
            return error(400, "max_tokens 0 scores the prompt: it needs echo")
        checks = [validate(body, p) for p in prompts]
        bad = next((c for c in checks if isinstance(c, JSONResponse)), None)
        if bad is not None:
            return bad
        started = []
        for prompt, (policy, sampling) in zip(prompts, checks):  # type: ignore[misc]
            job = None if sampling is None else start(body, prompt, policy, sampling)
            if isinstance(job, JSONResponse):
                return job
            started.append(job)
        try:
            outs = [(("", None) if job is None else await collect(job[0])) for job in started]
            choices = [await asyncio.to_thread(scored_choice, llm, i, prompt, text, result, body.echo, body.logprobs, policy)
                       for i, (prompt, (text, result), (policy, _)) in enumerate(zip(prompts, outs, checks))]  # type: ignore[misc]
        except GenerationFailed as e:
            return error(500, f"generation failed: {e}", "server_error")
        except MobileMoeError as e:
            return error(400, str(e))
        completion = sum(0 if r is None else len(r.token_ids) for _, r in outs)
        usage = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": completion, "total_tokens": sum(map(len, prompts)) + completion}
        return JSONResponse({**meta(False), "object": "text_completion", "choices": choices, "usage": usage})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        many = isinstance(body.prompt, list) and bool(body.prompt) and not isinstance(body.prompt[0], int)
        items = body.prompt if many else [body.prompt]
        prompts = [llm.encode(p) if isinstance(p, str) else list(p) for p in items]  # type: ignore[union-attr]
        if many or body.echo or body.logprobs is not None or body.max_tokens == 0:
            return await score(body, prompts)
        return await run(body, prompts[0], chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        try:
            prompt = llm.chat_prompt([m.model_dump() for m in body.messages])
        except MobileMoeError as e:
            return error(400, str(e))
        return await run(body, prompt, chat=True)

    return app


def _finish(result, gen: Generation) -> str:
    """OpenAI finish_reason: a stop string or EOS is "stop", the token limit "length"."""
    return "stop" if gen.stopped or result.finish_reason == "stop" else "length"


def _extension(policy: PolicyConfig, result) -> dict:
    """The request's MoBiLE settings echoed back with its fallback count."""
    return {"policy": policy.name, "tau": policy.tau, "criterion": policy.criterion, "fallback_tokens": result.stats.fallback_tokens}


class GenerationFailed(Exception):
    """The engine failed a request (its message says why)."""


async def collect(gen: Generation) -> tuple[str, GenerationResult]:
    """Wait for the whole generation: (its text, cut at a stop string; the result)."""
    text = ""
    while True:
        event = await gen.events.get()
        if event[0] == "text":
            text += event[1]
            continue
        _, result, err = event
        if err is not None:
            raise GenerationFailed(' '.join(str(err).split()) or type(err).__name__)
        if result is None:
            raise GenerationFailed("the request was cancelled")
        return text, result


async def complete(gen: Generation, job: Job, meta: dict, chat: bool, policy: PolicyConfig, prompt_tokens: int) -> JSONResponse:
    """Wait for the whole generation and answer in one JSON object."""
    try:
        text, result = await collect(gen)
    except GenerationFailed as e:
        return error(500, f"generation failed: {e}", "server_error")
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(result.token_ids), "total_tokens": prompt_tokens + len(result.token_ids)}
    choice = {"index": 0, "finish_reason": _finish(result, gen)}
    choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    obj = "chat.completion" if chat else "text_completion"
    return JSONResponse({**meta, "object": obj, "choices": [choice], "usage": usage, "mobile_moe": _extension(policy, result)})


async def stream(gen: Generation, job: Job, meta: dict, chat: bool, policy: PolicyConfig) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, then [DONE]; a client that leaves cancels the job."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, extra: dict | None = None) -> str:
        choice = {"index": 0, "finish_reason": finish}
        choice |= {"delta": {} if delta is None else {"content": delta}} if chat else {"text": delta or ""}
        return f"data: {json.dumps({**meta, 'object': obj, 'choices': [choice], **(extra or {})})}\n\n"

    try:
        if chat:
            yield f"data: {json.dumps({**meta, 'object': obj, 'choices': [{'index': 0, 'delta': {'role': 'assistant'}, 'finish_reason': None}]})}\n\n"
        while True:
            event = await gen.events.get()
            if event[0] == "text":
                yield chunk(event[1], None)
                continue
            _, result, err = event
            if err is not None:
                yield f"data: {json.dumps({'error': {'message': str(err), 'type': 'server_error', 'code': 500}})}\n\n"
            else:
                yield chunk(None, _finish(result, gen), {"mobile_moe": _extension(policy, result)})
            yield "data: [DONE]\n\n"
            return
    finally:
        job.cancelled.set()  # the client left (or the stream ended): the worker stops at the next token
