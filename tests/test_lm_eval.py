"""lm-evaluation-harness through the in-process backend, on local tasks built here (no dataset download)."""

from __future__ import annotations

import json

import pytest
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from mobile_moe.eval.lm_eval_backend import MobileMoeLM

TASKS = {
    "tiny_mc": "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
               "metric_list:\n  - metric: acc\n",
    "tiny_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{question}}{{choices[0]}}\"\n"
                "metric_list:\n  - metric: word_perplexity\n",
    "tiny_gen": "output_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{choices[0]}}\"\n"
                "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\nmetric_list:\n  - metric: exact_match\n",
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


def scores(model: MobileMoeLM, tasks: TaskManager) -> dict:
    results = simple_evaluate(model=model, tasks=list(TASKS), task_manager=tasks, bootstrap_iters=0, log_samples=True)
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
