"""lm-evaluation-harness through the in-process backend, on local tasks built here (no dataset download)."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from mobile_moe import LLM, PolicyConfig
from mobile_moe.engine.calibration import DEMO_MODEL
from mobile_moe.eval.lm_eval_backend import MobileMoeLM

TASKS = {
    "tiny_mc": 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
    "metric_list:\n  - metric: acc\n",
    "tiny_ppl": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{question}}{{choices[0]}}"\nmetric_list:\n  - metric: word_perplexity\n',
    "tiny_gen": 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{choices[0]}}"\n'
    'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\nmetric_list:\n  - metric: exact_match\n',
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> TaskManager:
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    docs = [{"question": f"def add_{i}(a, b):\n    return", "choices": [" a + b", " a * b", " None"], "answer": 0} for i in range(4)]
    docs += [{"question": f"for i in range({i}):\n    print(", "choices": ["i)", "x)", "0)"], "answer": 0} for i in range(4)]
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for name, body in TASKS.items():
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'docs.jsonl'}\ntest_split: test\n"
        (root / f"{name}.yaml").write_text(head + body)
    return TaskManager(include_path=str(root), include_defaults=False)  # index only these tasks (the built-in ones take seconds)


def scores(model: MobileMoeLM | str, tasks: TaskManager, **kwargs) -> dict:
    results = simple_evaluate(model=model, tasks=list(TASKS), task_manager=tasks, bootstrap_iters=0, log_samples=True, **kwargs)
    return {name: results["results"][name] for name in TASKS} | {"samples": results["samples"]}


def test_big_little_and_mobile_score_differently_on_a_local_task(tasks, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    big, little = scores(MobileMoeLM(policy="big", dtype="float32"), tasks), scores(MobileMoeLM(policy="little", dtype="float32"), tasks)
    mobile = scores(MobileMoeLM(policy="mobile", criterion="margin", tau=0.3, dtype="float32"), tasks)
    ppl = [r["tiny_ppl"]["word_perplexity,none"] for r in (big, little, mobile)]
    assert len(set(ppl)) == 3 and ppl[0] < ppl[1]  # teacher-forced under each policy: little is worse than big here
    lls = lambda r: [s["resps"] for s in r["samples"]["tiny_mc"]]  # noqa: E731
    assert lls(big) != lls(little)  # loglikelihoods come from each policy's own pass, not one big prefill
    gens = lambda r: [s["resps"] for s in r["samples"]["tiny_gen"]]  # noqa: E731
    assert gens(big) != gens(little) and all(0.0 <= r["tiny_mc"]["acc,none"] <= 1.0 for r in (big, little, mobile))


def test_registering_mobile_moe_keeps_lm_evals_own_models():
    """lm-eval fills its model registry only while it is empty: the backend's import must not hide `local-completions`."""
    from lm_eval.api.registry import model_registry

    assert {"mobile-moe", "local-completions", "hf"} <= set(model_registry.keys())


@contextmanager
def serving(llm: LLM):
    """`mobile-moe serve` in a thread (policy big), on a port the OS picked and this socket holds; yields the base URL."""
    import uvicorn

    from mobile_moe.serve.app import create_app
    from mobile_moe.serve.worker import EngineWorker

    worker = EngineWorker(llm, 64, 8)
    app = create_app(llm, worker, llm.path.name, None, 64, PolicyConfig("big"))  # served as the CLI names it: the directory's name
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        worker.close()
        sock.close()


def test_local_completions_through_the_server_scores_as_the_in_process_backend(tasks, monkeypatch):
    """lm-eval's own `local-completions` client against the server: the same scores as MobileMoeLM, both policy big."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    local = MobileMoeLM(policy="big", dtype="float32")
    docs = {name: [0, 4, 6] for name in TASKS}  # both kinds of document; in doc 6 two choices are 0.013 apart
    with serving(local.llm) as url:  # the same weights in the same process, one at a time
        args = (
            f"model={local.llm.path.name},base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={DEMO_MODEL},"
            "num_concurrent=1,max_retries=1,tokenized_requests=True"
        )
        served = scores("local-completions", tasks, model_args=args, samples=docs)
    ours = scores(local, tasks, samples=docs)
    resps = lambda r, name: [s["resps"] for s in sorted(r["samples"][name], key=lambda s: s["doc_id"])]  # noqa: E731
    # Both sides score the same token ids (lm-eval's, sent as ids; MobileMoeLM's own encoding gives the same ones on these
    # documents) with the same float32 weights; only the passes' shapes differ (the server scores each prompt plus the one
    # token lm-eval has it generate), which moves a
    # sum of float32 log-probs by ~5e-6. 1e-3 is far above that and far below the 0.013 between doc 6's choices.
    pairs = list(zip(sum(resps(served, "tiny_mc"), []), sum(resps(ours, "tiny_mc"), []), strict=True))
    diffs = [abs(a[0] - b[0]) for (a,), (b,) in pairs]  # (loglikelihood, is_greedy) per document and choice
    assert len(pairs) == 9 and max(diffs) < 1e-3, diffs  # observed: < 1e-5
    assert [a[1] for (a,), _ in pairs] == [b[1] for _, (b,) in pairs]
    assert served["tiny_mc"]["acc,none"] == ours["tiny_mc"]["acc,none"]
    for (a,), (b,) in zip(resps(served, "tiny_ppl"), resps(ours, "tiny_ppl"), strict=True):
        assert a == pytest.approx(b, abs=1e-3)  # rolling loglikelihood: one window after the EOS/BOS token on both sides
    assert resps(served, "tiny_gen") == resps(ours, "tiny_gen")  # greedy, cut at lm-eval's stop strings by the server
