"""OpenAI-compatible HTTP API over one engine worker: handlers validate, enqueue and stream; nothing in engine/ knows HTTP."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from mobile_moe.config import PolicyConfig
from mobile_moe.engine.llm import LLM
from mobile_moe.serve.handlers import Handlers
from mobile_moe.serve.metrics import Metrics
from mobile_moe.serve.schemas import MAX_BODY_BYTES, ChatRequest, CompletionRequest, error, invalid_json_message
from mobile_moe.serve.worker import EngineWorker


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

    handlers = Handlers(llm, worker, metrics, model_name, max_tokens_cap, defaults)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await handlers.completions(body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        return await handlers.chat_completions(body)

    return app
