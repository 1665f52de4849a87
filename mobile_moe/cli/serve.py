"""`mobile-moe serve`: the OpenAI-compatible HTTP server over one engine worker."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mobile_moe.cli.common import THREADS_DEFAULT, add_engine_args, add_policy_args, check_flags, open_llm, policy_flags, set_threads
from mobile_moe.config import PolicyConfig
from mobile_moe.errors import InvalidParameter
from mobile_moe.loading.hub import parse_hub_id

if TYPE_CHECKING:  # the engine (and torch) load only when a server starts
    from mobile_moe.engine.llm import LLM

SERVE_SWITCH_INTERVAL_S = 2e-4  # the HTTP thread hands the GIL back to the engine sooner: +5% tok/s under 16 streams (measured)


DEFAULT_MAX_BATCH = 16  # the server's rows: 16 concurrent demo streams decode at 4x one stream's rate on 2 CPU cores


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """`serve`."""
    s = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (completions and chat, streaming) over one engine worker",
        description="OpenAI-compatible HTTP server (completions and chat, streaming) over one engine worker. "
        "A request without `temperature` samples at temperature 1.0, as OpenAI's API does, unlike generate and chat, "
        'which default to greedy decoding (--temperature 0): send "temperature": 0 for greedy replies.',
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback only)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    s.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every route but /health")
    s.add_argument("--max-queue", type=int, default=64, help="requests running or waiting at most; more get HTTP 429 (default: 64)")
    s.add_argument(
        "--max-tokens-cap",
        type=int,
        default=1024,
        help="largest max_tokens a request may ask; a chat request without max_tokens generates up to the context within it (default: 1024)",
    )
    s.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the model name clients send and /v1/models lists; the default name is then refused (default: the hub id, else the directory's name)",
    )
    s.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        metavar="N",
        help=f"requests decoded together (continuous batching; the memory plan reserves KV for N rows) (default: {DEFAULT_MAX_BATCH})",
    )
    s.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help=f"torch CPU threads for the engine (default: {THREADS_DEFAULT}: "
        "the HTTP side keeps a core; on 2 cores, 16 streams decoded 1.9x faster with 1 thread than with 2)",
    )
    s.add_argument(
        "--batch-little",
        choices=["auto", "always"],
        default="auto",
        help="at batch >= 2, mobile requests decode little first only where measured cheaper than big (auto), or always (default: auto)",
    )
    add_replica_args(s)
    add_engine_args(s)
    add_policy_args(s)
    s.set_defaults(handler=cmd_serve)


def add_replica_args(s: argparse.ArgumentParser) -> None:
    """Replicas on Ray Serve (the [cluster] extra): docs/serving.md#replicas-on-ray-serve."""
    s.add_argument(
        "--replicas",
        type=int,
        metavar="N",
        help="run N engine replicas on Ray Serve behind this one endpoint, each with its own model and batch (needs the [cluster] extra) "
        "(default: one engine in this process, no Ray)",
    )
    s.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="with --replicas: join this Ray cluster (the address `ray start --head` prints, or `auto`) (default: start a local Ray instance)",
    )
    s.add_argument("--max-replicas", type=int, metavar="M", help="with --replicas: autoscale between N and M replicas on ongoing requests (default: N, fixed)")
    s.add_argument(
        "--request-router",
        choices=["conversation", "power-of-two"],
        default="conversation",
        help="with --replicas: a chat's later turns to the replica that served it (its held prefix), else the shorter queue of two; "
        "or Serve's default power of two choices only (default: conversation)",
    )


def check_bindable(host: str, port: int) -> None:
    """Raise InvalidParameter unless a server could listen on host:port now."""
    if not 0 < port < 65536:
        raise InvalidParameter(f"--port must be between 1 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise InvalidParameter(f"--host {host}: {e.strerror or e}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as e:
            raise InvalidParameter(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    """`mobile-moe serve`: runs until interrupted."""
    if args.max_queue < 1 or args.max_tokens_cap < 1 or args.max_batch < 1:
        raise InvalidParameter("--max-queue, --max-tokens-cap and --max-batch must be >= 1")
    check_flags(args)  # the defaults a request's policy starts from
    if args.replicas is not None or args.ray_address is not None or args.max_replicas is not None:
        return serve_replicas(args)
    set_threads(args.threads)
    try:
        import prometheus_client  # noqa: F401 (the server's /metrics)
        import uvicorn

        from mobile_moe.serve.app import create_app
        from mobile_moe.serve.worker import EngineWorker
    except ImportError as e:
        raise InvalidParameter(f"serving needs the [serve] extra: pip install 'mobile-moe[serve]' ({e.name} is missing)") from None
    check_bindable(args.host, args.port)  # a bad or busy port fails in one line, before the model loads
    sys.setswitchinterval(SERVE_SWITCH_INTERVAL_S)
    llm = open_llm(args)
    defaults = policy_flags(args)
    name = served_name(args, llm)
    app = create_app(llm, EngineWorker(llm, args.max_queue, args.max_batch), name, args.api_key, args.max_tokens_cap, defaults)
    log_requests()
    print(startup_summary(llm, llm.resolve_policy(defaults), name, args), file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def serve_replicas(args: argparse.Namespace) -> int:
    """--replicas: the same server as engine replicas on Ray Serve (cluster/app.py)."""
    check_cluster_flags(args)
    if args.threads is not None and args.threads < 1:
        raise InvalidParameter(f"--threads must be >= 1, got {args.threads}")
    try:
        import prometheus_client  # noqa: F401 (the server's /metrics)

        from mobile_moe.cluster.app import serve_replicas as deploy
    except ImportError as e:
        raise InvalidParameter(f"--replicas needs the [cluster] extra: pip install 'mobile-moe[cluster]' ({e.name} is missing)") from None
    return deploy(args)


def check_cluster_flags(args: argparse.Namespace) -> None:
    """The replica flags' own rules (one line each, before Ray starts)."""
    if args.replicas is None:
        raise InvalidParameter("--ray-address and --max-replicas need --replicas")
    if args.replicas < 1:
        raise InvalidParameter(f"--replicas must be >= 1, got {args.replicas}")
    if args.max_replicas is not None and args.max_replicas < args.replicas:
        raise InvalidParameter(f"--max-replicas {args.max_replicas} is below --replicas {args.replicas}")


def served_name(args: argparse.Namespace, llm: LLM) -> str:
    """--served-model-name, else a hub model's repo id, else the checkpoint directory's name."""
    if args.served_model_name is not None:
        if not args.served_model_name.strip():
            raise InvalidParameter("--served-model-name must not be empty")
        return args.served_model_name
    hub = parse_hub_id(str(args.model)) if args.model and not Path(args.model).exists() else None
    return str(hub[0] if hub else llm.path.name)


def startup_summary(llm: LLM, policy: PolicyConfig, name: str, args: argparse.Namespace) -> str:
    """What the server runs, in a few lines: model, policy, dtypes, threads, expert cache, batch and queue, address."""
    import torch

    plan, store = llm.plan, llm.loaded.store
    experts = getattr(getattr(store, "format", None), "name", "?")
    knobs = f" (criterion {policy.criterion}, tau {policy.tau:g})" if policy.name in ("mobile", "exact") else ""
    cache_mib = plan.slots * plan.expert_bytes / 2**20
    return "\n".join(
        [
            f"mobile-moe serve: model {llm.path}, served as `{name}`",
            f"  policy {policy.name}{knobs}; {llm.device} {str(llm.loaded.dtype).removeprefix('torch.')}, experts {experts}; threads {torch.get_num_threads()}",
            f"  expert cache {plan.slots} of {plan.total_experts} slots ({cache_mib:.1f} MiB); context {llm.max_context} tokens",
            f"  max batch {args.max_batch}, max queue {args.max_queue}, max_tokens cap {args.max_tokens_cap}" + (", API key required" if args.api_key else ""),
            f"  listening on http://{args.host}:{args.port}/v1 (one access-log line per request below)",
        ]
    )


def log_requests() -> None:
    """The server's access-log lines and failures (with their tracebacks) on stderr, as `mobile-moe serve: ...`."""
    log = logging.getLogger("mobile_moe.serve")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mobile-moe serve: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
