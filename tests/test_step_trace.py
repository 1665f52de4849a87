"""The shape of one decode step: a forced-fallback mobile step on the demo model, traced with `sys.setprofile`, enters
few of the package's modules and functions outside the model's own layers (docs/design.md walks the same step)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import mobile_moe
from mobile_moe import LLM, PolicyConfig, SamplingParams, engine_config
from mobile_moe.engine.calibration import DEMO_MODEL
from mobile_moe.engine.generate import new_decoder
from mobile_moe.engine.step import StepRow, decode_step
from mobile_moe.policy.policies import Policy

PACKAGE = Path(mobile_moe.__file__).parent
MODEL_CODE = ("models", "layers")  # the model's own layers: not counted


def traced_step(expert_cache: int) -> tuple[set[str], set[str], int]:
    """(modules, functions) of the package outside the model's layers that one forced-fallback mobile decode step enters,
    and the step's fallback count. Functions are named ones: comprehensions and lambdas are expressions (Python 3.12
    inlines comprehensions), not steps a reader follows."""
    llm = LLM(DEMO_MODEL, engine_config(progress=False, expert_cache=expert_cache))
    ids, sampling, config = llm.prepare([5, 6, 7, 8], SamplingParams(max_new_tokens=4), PolicyConfig("mobile", tau=1.0, criterion="max_prob"))
    runner, policy = llm.runner, Policy(config)
    dec = new_decoder(runner, runner.decode_kv(len(ids) + 4), ids, sampling, policy)
    token = dec.read(runner.forward(runner.ids(ids), dec.kv, dec.first.with_mode(policy.prefill_mode)), with_confidence=False)[0]
    decode_step(runner, [StepRow(dec, token, 1)])  # a first step: lazy set-up stays out of the trace
    token = dec.result.steps[-1].token
    entered: set[tuple[str, str]] = set()

    def profile(frame, event, arg) -> None:
        path = Path(frame.f_code.co_filename)
        if event == "call" and path.is_relative_to(PACKAGE) and not frame.f_code.co_name.startswith("<"):
            entered.add((path.relative_to(PACKAGE).as_posix(), frame.f_code.co_qualname))

    falls = dec.result.stats.fallback_tokens
    sys.setprofile(profile)
    try:
        decode_step(runner, [StepRow(dec, token, 2)])
    finally:
        sys.setprofile(None)
    outside = {(m, f) for m, f in entered if m.split("/")[0] not in MODEL_CODE}
    return {m for m, _ in outside}, {f"{m}:{f}" for m, f in outside}, dec.result.stats.fallback_tokens - falls


@pytest.mark.parametrize(
    "expert_cache, max_modules, max_functions",
    [
        (10_000, 10, 27),  # every expert resident: no loads, no host planning
        (16, 12, 47),  # 16 of 256 slots: each layer's misses load through the cache, LRU eviction and the transfer engine
    ],
)
def test_a_fallback_step_enters_few_modules_and_functions(expert_cache: int, max_modules: int, max_functions: int):
    modules, functions, fell_back = traced_step(expert_cache)
    assert fell_back == 1  # tau 1.0: the little pass is never confident enough
    assert {"engine/step.py", "engine/runner.py", "policy/policies.py"} <= modules
    assert len(modules) <= max_modules, sorted(modules)
    assert len(functions) <= max_functions, sorted(functions)
