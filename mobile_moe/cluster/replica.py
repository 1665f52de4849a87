"""One engine replica on Ray Serve: its own LLM and continuous-batching worker behind the single server's FastAPI app,
which runs in process each HTTP request the ingress forwards (ASGI messages through a streaming deployment handle), so
a replica answers exactly as `mobile-moe serve` does."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from filelock import FileLock
from ray import serve

from mobile_moe.cli.common import open_llm, policy_flags
from mobile_moe.cli.serve import SERVE_SWITCH_INTERVAL_S, log_requests, served_name, startup_summary
from mobile_moe.cluster.metrics import RayMirror
from mobile_moe.engine.llm import LLM
from mobile_moe.serve.app import create_app
from mobile_moe.serve.worker import EngineWorker

STORE_LOCK = ".mobile-moe-store.lock"  # in the --offload-dir: held while a replica opens (and maybe builds) the store
REPLICA_HEADER = b"x-mobile-moe-replica"  # the replica that answered (its Ray Serve id), on every forwarded response


def open_shared_llm(args: argparse.Namespace) -> LLM:
    """The flags' model; replicas sharing one --offload-dir open it in turn under a file lock, so the first builds the
    expert store and the others wait, then read it."""
    if args.offload_dir is None:
        return open_llm(args)
    directory = Path(args.offload_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory / STORE_LOCK)):
        return open_llm(args)


class EngineReplica:
    """A Serve deployment class (cluster.py applies the deployment options): one model, one engine worker, one app."""

    def __init__(self, args: argparse.Namespace) -> None:
        sys.setswitchinterval(SERVE_SWITCH_INTERVAL_S)
        self.llm = open_shared_llm(args)
        defaults = policy_flags(args)
        name = served_name(args, self.llm)
        self.worker = EngineWorker(self.llm, args.max_queue, args.max_batch)
        self.app = create_app(self.llm, self.worker, name, args.api_key, args.max_tokens_cap, defaults)
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()
        self.summary = startup_summary(self.llm, self.llm.resolve_policy(defaults), name, args)
        self.mirror = RayMirror(self.app.state.metrics.registry)
        self.mirror.start()
        log_requests()  # the access-log lines (with token counts) on the replica's stderr, which Ray forwards to the driver

    async def asgi(self, scope: dict, body: bytes, conversation: str | None = None) -> AsyncIterator[dict]:
        """One forwarded HTTP request through the app: yields its ASGI response messages (the start, then body parts).
        `conversation` is for the request router (affinity.py); closing the stream early cancels the request."""
        messages: asyncio.Queue[dict | None] = asyncio.Queue()
        left = asyncio.Event()
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if pending:
                return pending.pop()
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self.replica.encode())]}
            messages.put_nowait(message)

        task = asyncio.create_task(self.app(scope, receive, send))
        task.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while (message := await messages.get()) is not None:
                yield message
            task.result()  # an error the app's handlers did not answer
        finally:
            left.set()
            task.cancel()  # the ingress went away: the app's stream ends and the worker drops the row

    def check_health(self) -> None:
        """Serve's periodic health check: the replica is restarted once its engine worker has stopped."""
        if not self.worker.thread.is_alive():
            raise RuntimeError("the engine worker thread stopped")

    def describe(self) -> str:
        """What this replica runs (the single server's start-up summary)."""
        return self.summary

    def __del__(self) -> None:
        if hasattr(self, "mirror"):
            self.mirror.stop.set()
        if hasattr(self, "worker"):
            self.worker.close()
