"""`mobile-moe serve --replicas N`: engine replicas on Ray Serve behind one OpenAI endpoint. The flags become Serve
deployment options here (the table in docs/serving.md); `app_builder` gives `serve deploy` the same application from a
config file's `args`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import ray
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException

from mobile_moe.cli.serve import check_bindable, check_cluster_flags
from mobile_moe.cluster.affinity import ConversationRouter
from mobile_moe.cluster.ingress import ENGINE, Ingress
from mobile_moe.cluster.replica import EngineReplica
from mobile_moe.errors import MobileMoeError

APP_NAME = "mobile-moe"
ROUTERS = {"conversation": ConversationRouter, "power-of-two": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"}
AUTOSCALE_TARGET = 0.75  # autoscaling keeps this share of each replica's --max-batch rows busy
HEALTH_CHECK_PERIOD_S, HEALTH_CHECK_TIMEOUT_S = 5.0, 30.0
CONSTRUCTOR_RETRIES = 3  # a replica that cannot load the model fails the deployment after this many tries
INGRESS_HEADROOM = 64  # the ingress's ongoing requests beyond every row and queue place (/health, /metrics, refusals)


def engine_options(args: argparse.Namespace) -> dict:
    """The engine deployment's Serve options: one GPU (and a CPU) per replica on cuda, --threads CPUs on cpu; a free row per
    request Serve sends (max_ongoing_requests = --max-batch: none waits inside a replica); --max-queue waiting at the router."""
    gpu = str(args.device).startswith("cuda")
    options = {
        "name": ENGINE,
        "ray_actor_options": {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": args.threads or 1},
        "max_ongoing_requests": args.max_batch,
        "max_queued_requests": args.max_queue,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
        "request_router_config": {"request_router_class": ROUTERS[args.request_router]},
    }
    if args.max_replicas is None:
        return options | {"num_replicas": args.replicas}
    target = max(1, round(args.max_batch * AUTOSCALE_TARGET))
    return options | {"autoscaling_config": {"min_replicas": args.replicas, "max_replicas": args.max_replicas, "target_ongoing_requests": target}}


def ingress_options(args: argparse.Namespace) -> dict:
    """The ingress deployment's: one replica without a CPU of its own (it waits on the engines), room for every request."""
    most = (args.max_replicas or args.replicas) * args.max_batch + args.max_queue + INGRESS_HEADROOM
    return {"name": "Ingress", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": most}


def build_app(args: argparse.Namespace) -> serve.Application:
    """The Serve application: the ingress deployment over the engine deployment."""
    engine_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "handler"})
    engine_args.threads = args.threads or 1
    engine = serve.deployment(**engine_options(engine_args))(EngineReplica).bind(engine_args)
    return serve.deployment(**ingress_options(args))(Ingress).bind(engine, args.api_key, APP_NAME)


def app_builder(config: dict) -> serve.Application:
    """`serve deploy`'s import_path target: a config file's `args` are `mobile-moe serve`'s flags without the dashes
    (`max-batch: 16`; a switch: `true`); --replicas defaults to 1, the file's deployment options override the flags'."""
    from mobile_moe.cli import build_parser

    argv = ["serve"]
    for key, value in config.items():
        flag = "--" + str(key).replace("_", "-")
        argv += [flag] if value is True else [] if value is False or value is None else [flag, str(value)]
    args = build_parser().parse_args(argv)
    args.replicas = 1 if args.replicas is None else args.replicas
    check_cluster_flags(args)
    return build_app(args)


def local_cpus(args: argparse.Namespace) -> int:
    """Logical CPUs of a local Ray instance: the cores, or as many as the replicas ask for."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(cores, args.replicas * (args.threads or 1))


def serve_replicas(args: argparse.Namespace) -> int:
    """Deploy, print what runs, serve until interrupted, then take the application down."""
    check_cluster_flags(args)
    local = args.ray_address is None
    if local:
        check_bindable(args.host, args.port)
    started = time.perf_counter()
    context = ray.init(
        address="local" if local else args.ray_address, **({"num_cpus": local_cpus(args), "include_dashboard": False} if local else {}), logging_level="warning"
    )
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        summary = serve.get_deployment_handle(ENGINE, APP_NAME).describe.remote().result()
    except (RayError, RayServeException, RuntimeError) as e:
        ray.shutdown()
        last = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise MobileMoeError(f"the replicas did not start: {last[-1] if last else type(e).__name__}") from None
    where = f"a local Ray instance ({context.address_info['gcs_address']})" if local else f"the Ray cluster at {context.address_info['gcs_address']}"
    scale = f"{args.replicas} replicas" if args.max_replicas is None else f"{args.replicas} to {args.max_replicas} replicas (autoscaling)"
    print(summary.replace("mobile-moe serve:", f"mobile-moe serve: {scale} on {where}, router {args.request_router};", 1), file=sys.stderr)
    print(f"  ready in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a service manager's stop: as Ctrl-C, the application taken down
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if not local:
            serve.delete(APP_NAME)  # Serve and the cluster stay up for their other applications
        ray.shutdown()
    return 0
