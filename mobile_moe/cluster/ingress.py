"""The cluster's HTTP entry on Ray Serve: /health and /metrics for the whole deployment; every other request forwarded
whole (method, path, headers, body) through a streaming deployment handle to an engine replica that Serve's request
router picks, and its answer relayed byte for byte. A replica lost mid-stream ends the stream with an error event."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterable

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.serve.schema import DeploymentStatusOverview

from mobile_moe.cluster.affinity import KEY, conversation_key
from mobile_moe.cluster.metrics import replica_metrics
from mobile_moe.serve.app import add_error_handlers, add_guard
from mobile_moe.serve.handlers import RETRY_AFTER_S
from mobile_moe.serve.schemas import error

ENGINE = "Engine"  # the engine replicas' deployment name
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
SCRAPE_TIMEOUT_S = 5.0
RESENDS = 1  # a request whose replica was lost before answering is sent again this many times


def forwarded_scope(request: Request) -> dict:
    """The parts of an HTTP request's ASGI scope a replica's app reads (plain values: they travel through Ray)."""
    scope = request.scope
    keep = ("type", "http_version", "method", "scheme", "path", "raw_path", "query_string", "root_path", "headers", "client", "server")
    return {"asgi": {"version": "3.0", "spec_version": "2.4"}} | {k: scope[k] for k in keep if k in scope} | {"root_path": ""}


def lost(e: BaseException) -> str:
    """One line on a replica that failed a request."""
    kind = "the replica serving this request stopped" if isinstance(e, (ActorDiedError, ActorUnavailableError)) else "the replica failed"
    first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return f"{kind}: {first.strip()[:200]}"


def error_event(e: BaseException) -> bytes:
    """The single server's last events for a stream whose generation failed."""
    body = {"error": {"message": lost(e), "type": "server_error", "code": 503}}
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()


class Relayed(Response):
    """A replica's answer, sent as it arrives: its start message, then its body parts."""

    def __init__(self, start: dict, rest: DeploymentResponseGenerator) -> None:
        self.start, self.rest = start, rest
        self.status_code, self.background = start["status"], None
        self.raw_headers = list(start.get("headers", []))

    async def __call__(self, scope: dict, receive, send) -> None:
        """Relay the replica's messages; a stream whose replica is lost ends with an error event and [DONE]."""
        stream = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in self.raw_headers)
        await send(self.start)
        try:
            async for message in self.rest:
                await send(message)
        except (RayError, RayServeException) as e:
            if not stream:
                raise
            await send({"type": "http.response.body", "body": error_event(e), "more_body": False})
        finally:
            self.rest.cancel()  # the client left early: the replica drops the request


def health_answer(deployment: DeploymentStatusOverview | None) -> JSONResponse:
    """ok while every engine replica runs; degraded (200) while some run and others start, recover or stop; 503 with none."""
    states = {} if deployment is None else {getattr(k, "value", str(k)): n for k, n in deployment.replica_states.items() if n}
    running = states.get("RUNNING", 0)
    if deployment is not None and running and set(states) == {"RUNNING"} and deployment.status == "HEALTHY":
        return JSONResponse({"status": "ok"})
    body = {"status": "degraded" if running else "unavailable", "replicas": states, "message": "" if deployment is None else deployment.message}
    return JSONResponse(body, status_code=200 if running else 503)


def scrape(url: str) -> str:
    """One node's Prometheus export ('' when it does not answer)."""
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as r:
            return r.read().decode()
    except OSError:
        return ""


def export_urls(nodes: Iterable[dict]) -> list[str]:
    """Each alive node's metrics export (`ray start --metrics-export-port`)."""
    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in nodes if n.get("Alive") and n.get("MetricsExportPort")]


@serve.ingress()
class Ingress:
    """The ingress deployment: one FastAPI app per ingress replica, built by Serve after the constructor."""

    def __init__(self, engine: DeploymentHandle, api_key: str | None, app_name: str) -> None:
        self.engine = engine.options(stream=True)
        self.api_key, self.app_name = api_key, app_name

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="mobile-moe", docs_url=None, redoc_url=None, openapi_url=None)  # /openapi.json: the replicas' own
        add_guard(app, self.api_key)
        add_error_handlers(app)

        @app.get("/health")
        async def health() -> JSONResponse:
            status = await asyncio.to_thread(serve.status)
            application = status.applications.get(self.app_name)
            return health_answer(None if application is None else application.deployments.get(ENGINE))

        @app.get("/metrics")
        async def metrics() -> Response:
            urls = export_urls(await asyncio.to_thread(ray.nodes))
            texts = await asyncio.gather(*(asyncio.to_thread(scrape, u) for u in urls))
            return Response(replica_metrics(texts), media_type=CONTENT_TYPE_LATEST)

        @app.api_route("/{path:path}", methods=METHODS)
        async def forward(request: Request) -> Response:
            return await self.forward(request)

        return app

    async def forward(self, request: Request) -> Response:
        """Hand the request to a replica; answer with its response once its start arrives. A replica lost before it
        answered (nothing reached the client, and nothing of the request outlives its process) is asked again once:
        Serve routes the second call to a live replica."""
        body = await request.body()
        scope, key = forwarded_scope(request), conversation_key(request.url.path, body)
        for attempt in range(RESENDS + 1):
            call = self.engine.asgi.remote(scope, body, **{KEY: key})
            try:
                return Relayed(await call.__anext__(), call)
            except BackPressureError:
                busy = "every replica is busy and the request queue is full; retry later"
                return error(429, busy, "rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)})
            except (ActorDiedError, ActorUnavailableError) as e:
                if attempt == RESENDS:
                    return error(503, lost(e), "server_error")
            except (RayError, RayServeException) as e:
                call.cancel()
                return error(503, lost(e), "server_error")
        raise AssertionError("unreachable")
