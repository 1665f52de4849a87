"""Per-request logits processing through the Python API: a JSON schema's grammar (every policy, batched rows),
frequency/presence penalties and each emitted token's log-probabilities; and mobile scoring with the learned criterion."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from mobile_moe import LLM, PolicyConfig, SamplingParams, engine_config
from mobile_moe.engine.calibration import DEMO_MODEL
from mobile_moe.engine.scoring import score_tokens
from mobile_moe.errors import InvalidParameter

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "size": {"type": "object", "properties": {"w": {"type": "integer", "minimum": 0, "maximum": 999}}, "required": ["w"]},
    },
    "required": ["name", "kind", "size"],
}


@pytest.fixture(scope="module")
def demo():
    return LLM(DEMO_MODEL, engine_config(progress=False, max_batch=2))


def pet_prompt(llm: LLM) -> list[int]:
    return llm.chat_prompt([{"role": "user", "content": "Describe a pet as JSON."}])


@pytest.mark.parametrize("policy", ["big", "little", "mobile"])
def test_sampled_replies_match_the_schema_and_stop(demo, policy):
    for seed in range(3):
        result = demo.generate(pet_prompt(demo), SamplingParams(128, temperature=1.0, seed=seed, json_schema=SCHEMA), PolicyConfig(policy))
        jsonschema.validate(json.loads(result.text), SCHEMA)
        assert result.finish_reason == "stop"


def test_a_constrained_row_beside_a_free_one_in_one_batch(demo):
    free = demo.encode("def add(a, b):")
    alone = demo.generate(free, SamplingParams(12), PolicyConfig("mobile")).token_ids
    sampling = [SamplingParams(128, json_schema=SCHEMA), SamplingParams(12)]
    constrained, other = demo.generate([pet_prompt(demo), free], sampling, PolicyConfig("mobile"))
    jsonschema.validate(json.loads(constrained.text), SCHEMA)
    assert constrained.finish_reason == "stop" and other.token_ids == alone


def teacher_forced(llm: LLM, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """Big's log-probabilities [len(generated), V] at each generated position."""
    return llm.logits(prompt + generated[:-1], "big").float().log_softmax(-1)[len(prompt) - 1 :]


def test_penalties_lower_the_logits_of_generated_tokens(demo):
    prompt = demo.encode("x = 1\nx = 1\nx = 1\n")
    plain = demo.generate(prompt, SamplingParams(24), PolicyConfig("big")).token_ids
    penalised = demo.generate(prompt, SamplingParams(24, frequency_penalty=1.0, presence_penalty=0.5), PolicyConfig("big")).token_ids
    assert penalised != plain
    logp = teacher_forced(demo, prompt, penalised)
    for i, token in enumerate(penalised):
        counts = torch.bincount(torch.tensor(penalised[:i], dtype=torch.long), minlength=logp.shape[1]).float()
        assert int((logp[i] - 1.0 * counts - 0.5 * (counts > 0)).argmax()) == token  # greedy over the penalised logits


def test_logprobs_are_the_emitting_pass_distribution(demo):
    prompt = demo.encode("def add(a, b):")
    result = demo.generate(prompt, SamplingParams(8, logprobs=3), PolicyConfig("big"))
    assert [e.token for e in result.logprobs] == result.token_ids
    logp = teacher_forced(demo, prompt, result.token_ids)
    for i, entry in enumerate(result.logprobs):
        assert entry.logprob == pytest.approx(float(logp[i, entry.token]), abs=1e-4)
        assert len(entry.top) == 3 and entry.top[0][0] == entry.token  # greedy: the token is the most probable
        assert [t for t, _ in entry.top] == logp[i].topk(3).indices.tolist()


def test_bad_schema_and_rollback_are_refused_in_one_line(demo):
    with pytest.raises(InvalidParameter, match="json_schema is not a schema xgrammar can compile") as bad:
        demo.generate(pet_prompt(demo), SamplingParams(8, json_schema={"type": "bogus"}))
    assert "\n" not in str(bad.value)
    rollback = PolicyConfig("mobile", kv_repair=2, rollback=True)
    with pytest.raises(InvalidParameter, match="rollback takes tokens back"):
        demo.generate(pet_prompt(demo), SamplingParams(8, json_schema=SCHEMA), rollback)
    with pytest.raises(InvalidParameter, match="frequency_penalty must be in"):
        SamplingParams(8, frequency_penalty=2.5)


def test_mobile_scoring_with_the_learned_criterion_picks_little_or_big_per_position(demo):
    ids = demo.encode("def add(a, b):\n    return a + b\n")
    policy = demo.resolve_policy(PolicyConfig("mobile"))
    assert policy.criterion == "learned"  # the shipped calibration's
    mobile = score_tokens(demo, ids, policy, 0).token_logprobs[1:]
    big = score_tokens(demo, ids, PolicyConfig("big"), 0).token_logprobs[1:]
    little = score_tokens(demo, ids, demo.resolve_policy(PolicyConfig("little")), 0).token_logprobs[1:]
    picks = [m == pytest.approx(b, abs=1e-5) or m == pytest.approx(s, abs=1e-5) for m, b, s in zip(mobile, big, little)]
    assert all(picks) and mobile != big and mobile != little
