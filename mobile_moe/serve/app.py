"""OpenAI-compatible HTTP API over one engine worker: handlers validate, enqueue and stream; nothing in engine/ knows HTTP."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from mobile_moe.config import PolicyConfig
from mobile_moe.engine.llm import LLM
from mobile_moe.serve.handlers import Handlers, Usage
from mobile_moe.serve.metrics import Metrics
from mobile_moe.serve.schemas import MAX_BODY_BYTES, ChatRequest, CompletionRequest, error, invalid_json_message, validation_message
from mobile_moe.serve.worker import EngineWorker

log = logging.getLogger("mobile_moe.serve")


def access_line(request: Request, status: int, usage: Usage | None, seconds: float) -> str:
    """One request's access-log line: client, method, path, status, prompt + completion tokens, seconds."""
    client = f"{request.client.host}:{request.client.port}" if request.client else "-"
    tokens = f" {usage.prompt}+{usage.completion} tokens" if usage is not None and (usage.prompt or usage.completion) else ""
    return f'{client} "{request.method} {request.url.path}" {status}{tokens} {seconds:.3f} s'


def add_guard(app: FastAPI, api_key: str | None) -> None:
    """The middleware every request passes: body size, API key, and its access-log line (a stream's once it is sent)."""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        start = time.perf_counter()
        request.state.usage = Usage()
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            response = error(413, f"request body over {MAX_BODY_BYTES} bytes")
        elif api_key and request.url.path != "/health" and request.headers.get("authorization") != f"Bearer {api_key}":
            response = error(401, "missing or wrong API key", "authentication_error")
        else:
            response = await call_next(request)
            body = getattr(response, "body_iterator", None)
            if body is not None:  # a response still being sent (a stream): its line once the last byte is out
                response.body_iterator = logged(body, request, response.status_code, start)
                return response
        log.info(access_line(request, response.status_code, request.state.usage, time.perf_counter() - start))
        return response

    async def logged(body: AsyncIterator, request: Request, status: int, start: float) -> AsyncIterator:
        try:
            async for part in body:
                yield part
        finally:
            log.info(access_line(request, status, request.state.usage, time.perf_counter() - start))


def add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's JSON error in one line; an unexpected one logged with its traceback."""

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error(400, invalid_json_message(first, exc.body))
        return error(400, validation_message(first))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        why = " ".join(str(exc).split()) or type(exc).__name__
        log.error("%s %s failed: %s", request.method, request.url.path, why, exc_info=exc)
        return error(500, f"internal error: {why[:200]}", "server_error")


def create_app(llm: LLM, worker: EngineWorker, model_name: str, api_key: str | None, max_tokens_cap: int, defaults: PolicyConfig) -> FastAPI:
    """The FastAPI application; `model_name` is the name clients send and /v1/models lists."""
    app = FastAPI(title="mobile-moe", docs_url=None, redoc_url=None)
    metrics = Metrics(worker)
    app.state.metrics = metrics  # a Ray Serve replica mirrors it into Ray's metrics (cluster/replica.py)
    add_guard(app, api_key)
    add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "mobile-moe"}]}

    handlers = Handlers(llm, worker, metrics, model_name, max_tokens_cap, defaults)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await handlers.completions(body, request.state.usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await handlers.chat_completions(body, request.state.usage)

    return app
