"""`mobile-moe serve --replicas` on a local Ray instance: two engine replicas (sharing one --offload-dir) behind the
ingress answer as the single server does; metrics of every replica; conversation affinity; a replica killed mid-run."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

ray = pytest.importorskip("ray", reason="the [cluster] extra (ray[serve]) is not installed")
serve = pytest.importorskip("ray.serve", reason="the [cluster] extra (ray[serve]) is not installed")

from test_serve import free_port, serving  # noqa: E402

from mobile_moe import LLM, engine_config  # noqa: E402
from mobile_moe.cli import build_parser  # noqa: E402
from mobile_moe.cluster.affinity import PROMPT_KEY_CHARS, conversation_key  # noqa: E402
from mobile_moe.cluster.app import APP_NAME, build_app, engine_options  # noqa: E402
from mobile_moe.cluster.ingress import ENGINE, health_answer  # noqa: E402
from mobile_moe.cluster.metrics import replica_metrics  # noqa: E402
from mobile_moe.cluster.replica import STORE_LOCK  # noqa: E402
from mobile_moe.engine.calibration import DEMO_MODEL  # noqa: E402

PROMPT = "def add(a, b):"
MSGS = [{"role": "user", "content": PROMPT}]
MAX_BATCH = 4
RESTORE_S = 120  # bound on a killed replica's replacement (Serve restarts it; the model loads in seconds)


def serve_args(*flags: str):
    return build_parser().parse_args(["serve", "--quiet", *flags])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray instance (small object store, no dashboard) running the app with 2 replicas; yields its URL."""
    offload = tmp_path_factory.mktemp("offload")
    args = serve_args("--replicas", "2", "--served-model-name", "demo", "--threads", "1", "--max-batch", str(MAX_BATCH), "--offload-dir", str(offload))
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, logging_level="error", log_to_driver=False,
             _system_config={"metrics_report_interval_ms": 1000})  # fmt: skip
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", offload=offload)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def single():
    """The single server (`mobile-moe serve` without --replicas) over the same model."""
    llm = LLM(DEMO_MODEL, engine_config(progress=False))
    with serving(llm, cap=1024) as (url, _):
        yield url


def answer(url: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """Status and JSON body, without the fields that differ between any two answers (id, created)."""
    r = httpx.post(url + path, json=body, timeout=60) if body is not None else httpx.get(url + path, timeout=60)
    data = r.json()
    return r.status_code, {k: v for k, v in data.items() if k not in ("id", "created")}


def events(url: str, body: dict, started: list | None = None) -> tuple[str | None, list]:
    """A stream's replica (appended to `started` once its answer starts) and its data events (parsed; [DONE] kept as a string)."""
    with httpx.stream("POST", url, json=body | {"stream": True}, timeout=120) as r:
        replica = r.headers.get("x-mobile-moe-replica")
        (started if started is not None else []).append(replica)
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    return replica, [line if line == "[DONE]" else json.loads(line) for line in lines]


def chunks_without_ids(chunks: list) -> list:
    return [c if isinstance(c, str) else {k: v for k, v in c.items() if k not in ("id", "created")} for c in chunks]


def test_requests_through_the_ingress_equal_the_single_server(cluster, single):
    bodies = {
        "/v1/completions": [
            {"prompt": PROMPT, "max_tokens": 12, "temperature": 0},
            {"prompt": PROMPT, "max_tokens": 2, "echo": True, "logprobs": 2, "temperature": 0},
            {"prompt": [PROMPT, "import os\n"], "max_tokens": 4, "temperature": 0},
            {"prompt": PROMPT, "max_tokens": True},  # a 400, worded the same
            {"prompt": PROMPT, "model": "gpt-4"},  # a 404
        ],
        "/v1/chat/completions": [{"messages": MSGS, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2}],
    }
    for path, items in bodies.items():
        for body in items:
            got, want = answer(cluster.url, path, body), answer(single, path, body)
            assert got[0] == want[0] and _close(got[1], want[1])
    for path, body in [
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}),
        ("/v1/chat/completions", {"messages": MSGS, "max_tokens": 8, "temperature": 0}),
    ]:
        replica, got = events(cluster.url + path, body | {"stream_options": {"include_usage": True}})
        assert replica is not None and replica.startswith(f"SERVE_REPLICA::{APP_NAME}#{ENGINE}#")
        assert chunks_without_ids(got) == chunks_without_ids(events(single + path, body | {"stream_options": {"include_usage": True}})[1])
    assert answer(cluster.url, "/v1/models") == answer(single, "/v1/models")
    assert answer(cluster.url, "/health") == answer(single, "/health") == (200, {"status": "ok"})
    assert httpx.get(cluster.url + "/nowhere").json() == httpx.get(single + "/nowhere").json()
    assert (cluster.offload / STORE_LOCK).exists() and (cluster.offload / "manifest.json").exists()  # one store, built under the lock


def _close(got: object, want: object) -> bool:
    """Equal, floats within 1e-4 (the replicas run 1 thread, this process more: sums may round differently)."""
    if isinstance(want, float) and isinstance(got, float):
        return abs(got - want) <= 1e-4
    if isinstance(want, dict) and isinstance(got, dict):
        return got.keys() == want.keys() and all(_close(got[k], want[k]) for k in want)
    if isinstance(want, list) and isinstance(got, list):
        return len(got) == len(want) and all(_close(g, w) for g, w in zip(got, want))
    return got == want


def test_a_conversation_stays_on_its_replica_and_metrics_name_every_replica(cluster):
    served = []
    for i in range(6):
        first = [{"role": "user", "content": f"def f{i}(x):"}]
        r1 = httpx.post(cluster.url + "/v1/chat/completions", json={"messages": first, "max_tokens": 6, "temperature": 0}, timeout=60)
        reply = r1.json()["choices"][0]["message"]["content"]
        turn = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "again"}]
        r2 = httpx.post(cluster.url + "/v1/chat/completions", json={"messages": turn, "max_tokens": 6, "temperature": 0}, timeout=60)
        served.append((r1.headers["x-mobile-moe-replica"], r2.headers["x-mobile-moe-replica"]))
    assert all(a == b for a, b in served)  # each second turn went to its first turn's replica
    deadline, text = time.monotonic() + 30, ""
    while time.monotonic() < deadline:  # Ray exports each replica's metrics every second here
        text = httpx.get(cluster.url + "/metrics").text
        series = [line for line in text.splitlines() if line.startswith("mobile_moe_requests_total{")]
        if len(series) == 2 and sum(float(s.split()[-1]) for s in series) >= 12:
            break
        time.sleep(0.5)
    assert len([line for line in text.splitlines() if line.startswith("mobile_moe_batch_rows{")]) == 2  # one series per replica
    assert "# TYPE mobile_moe_requests_total counter" in text
    hits = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("mobile_moe_prefix_hits_total{"))
    assert hits >= 6  # the replicas reused held prefixes (the turns share them)


def test_a_killed_replica_ends_its_streams_and_is_replaced(cluster, single):
    body = {"prompt": PROMPT, "max_tokens": 160, "temperature": 0}
    want = httpx.post(single + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    results: dict[int, tuple[str | None, list]] = {}
    started: list[str | None] = []
    run = lambda i: results.__setitem__(i, events(cluster.url + "/v1/completions", body, started))  # noqa: E731
    threads = [threading.Thread(target=run, args=(i,)) for i in range(3 * MAX_BATCH)]  # 2 replicas x MAX_BATCH rows run, the rest wait
    for t in threads:
        t.start()
    while not started:
        time.sleep(0.05)
    victim = started[0]  # a replica streaming its rows
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    deadline, health = time.monotonic() + RESTORE_S, {}
    while health.get("status") != "degraded" and time.monotonic() < deadline:  # Serve notices the loss within seconds
        health = httpx.get(cluster.url + "/health", timeout=60).json()
        time.sleep(0.2)
    assert health["status"] == "degraded" and health["replicas"]["RUNNING"] == 1
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)  # no stream hangs
    ended = {i: (replica, chunks[-2]) for i, (replica, chunks) in results.items()}
    failed = [i for i, (_, last) in ended.items() if "error" in last]
    assert all(ended[i][0] == victim and "replica serving this request stopped" in ended[i][1]["error"]["message"] for i in failed)
    assert len(failed) <= MAX_BATCH  # only the victim's running rows: the queued requests went to a live replica
    for i, (replica, chunks) in results.items():
        if i not in failed:
            assert "".join(c["choices"][0]["text"] for c in chunks[:-1] if c["choices"]) == want and replica != victim
    deadline = time.monotonic() + RESTORE_S
    while time.monotonic() < deadline:
        states = serve.status().applications[APP_NAME].deployments[ENGINE].replica_states
        if states.get("RUNNING") == 2 and sum(states.values()) == 2:
            break
        time.sleep(0.5)
    assert states.get("RUNNING") == 2  # Serve replaced the killed replica
    assert httpx.get(cluster.url + "/health").json() == {"status": "ok"}


def test_conversation_keys():
    chat = "/v1/chat/completions"
    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    key = conversation_key(chat, json.dumps({"messages": turn1}).encode())
    assert key is not None and key == conversation_key(chat, json.dumps({"messages": turn2}).encode())
    assert key != conversation_key(chat, json.dumps({"messages": [{"role": "user", "content": "hi!"}]}).encode())
    long = "x" * PROMPT_KEY_CHARS
    prompt = lambda text: conversation_key("/v1/completions", json.dumps({"prompt": text}).encode())  # noqa: E731
    assert prompt(long + "1") == prompt(long + "2") is not None
    assert prompt("short") is None
    assert conversation_key(chat, b"{not json") is None and conversation_key("/v1/models", b"") is None


def test_replica_metrics_are_read_back_under_the_single_server_names():
    export = "\n".join(
        [
            "# HELP ray_mobile_moe_requests_total Generations that finished",
            "# TYPE ray_mobile_moe_requests_total counter",
            'ray_mobile_moe_requests_total{Component="core_worker",application="mobile-moe",deployment="Engine",replica="a1"} 3.0',
            "# HELP ray_mobile_moe_queue_depth Requests waiting or running",
            "# TYPE ray_mobile_moe_queue_depth gauge",
            'ray_mobile_moe_queue_depth{replica="a1"} 2.0',
            "# HELP ray_serve_num_ongoing_requests x",
            "# TYPE ray_serve_num_ongoing_requests gauge",
            'ray_serve_num_ongoing_requests{replica="a1"} 2.0',
        ]
    )
    first = 'ray_mobile_moe_requests_total{Component="core_worker",application="mobile-moe",deployment="Engine",replica="a1"} 3.0'
    other = export.replace(first, 'ray_mobile_moe_requests_total{replica="b2"} 5.0').replace('replica="a1"', 'replica="b2"')
    text = replica_metrics([export, other]).decode()
    assert 'mobile_moe_requests_total{replica="a1"} 3.0' in text and 'mobile_moe_requests_total{replica="b2"} 5.0' in text
    assert 'mobile_moe_queue_depth{replica="a1"} 2.0' in text and "serve_num_ongoing" not in text and "ray_" not in text


def test_health_answers_and_serve_options_from_flags():
    def status(kind: str, **states: int):
        return SimpleNamespace(status=kind, replica_states=states, message="a replica's health check failed")

    assert json.loads(health_answer(status("HEALTHY", RUNNING=2)).body) == {"status": "ok"}
    degraded = health_answer(status("UNHEALTHY", RUNNING=1, STARTING=1))
    assert degraded.status_code == 200 and json.loads(degraded.body)["status"] == "degraded"
    assert health_answer(status("UNHEALTHY", STARTING=2)).status_code == 503
    options = engine_options(serve_args("--replicas", "2", "--max-batch", "8", "--max-queue", "32", "--threads", "1"))
    assert (options["num_replicas"], options["max_ongoing_requests"], options["max_queued_requests"]) == (2, 8, 32)
    assert options["ray_actor_options"] == {"num_cpus": 1}
    gpu = engine_options(serve_args("--replicas", "2", "--max-replicas", "4", "--device", "cuda"))
    assert gpu["ray_actor_options"] == {"num_gpus": 1, "num_cpus": 1} and "num_replicas" not in gpu
    assert gpu["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 4, "target_ongoing_requests": 12}


def test_a_config_file_s_args_are_the_cli_flags():
    from mobile_moe.cluster.app import app_builder
    from mobile_moe.errors import InvalidParameter

    assert isinstance(app_builder({"max-batch": 4, "policy": "mobile", "quiet": True, "offload_dir": None}), serve.Application)
    with pytest.raises(InvalidParameter, match="--replicas must be >= 1"):
        app_builder({"replicas": 0})
    with pytest.raises(SystemExit):  # argparse's one line: an unknown choice
        app_builder({"policy": "fast"})
