"""Exact mode: little drafts, big verifies each draft in one pass; greedy output is big's, token for token, and sampled
output follows big's distribution (speculative sampling)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import open_llm, small_cache
from test_mobile import _quantile_tau

from mobile_moe import LLM, PolicyConfig, SamplingParams, engine_config
from mobile_moe.engine.generate import generate
from mobile_moe.errors import InvalidParameter
from mobile_moe.layers.sampler import probabilities
from mobile_moe.policy.policies import Policy

PROMPTS = [[7, 3, 44, 19, 28, 90, 11], [40, 41, 12, 60, 3]]
SAMPLING = SamplingParams(max_new_tokens=24, stop_at_eos=False)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2", "olmoe"])  # GQA, MLA with a dense first layer, plain softmax
@pytest.mark.parametrize("draft_max", [1, 3, 8])
def test_greedy_exact_is_big_token_for_token(checkpoints, arch: str, draft_max: int):
    llm = open_llm(checkpoints[arch], expert_cache=6, dtype="float32")
    for prompt in PROMPTS:
        big = llm.generate(prompt, SAMPLING, PolicyConfig("big"))
        for tau in (0.0, _quantile_tau(llm, prompt, 0.5)):  # 0: drafts end only when full; a median tau: also when unsure
            exact = llm.generate(prompt, SAMPLING, PolicyConfig("exact", tau=tau, criterion="max_prob", draft_max=draft_max))
            assert exact.token_ids == big.token_ids
            assert len(exact.steps) == len(exact.token_ids)
            assert exact.stats.fallback_tokens > 0  # big verified drafts


def _run(llm, prompt: list[int], config: PolicyConfig, eos: tuple[int, ...], on_token=None):
    """One request through the engine's decode loop with its own end-of-sequence ids."""
    sampling = SamplingParams(max_new_tokens=24, stop_at_eos=True)
    with llm.lock:
        return generate(llm.runner, prompt, sampling, Policy(llm.resolve_policy(config)), eos, on_token)


def test_a_draft_crossing_eos_is_verified_before_the_request_ends(checkpoints):
    """Little drafts an end-of-sequence token big would not emit there: big takes it back and decoding goes on; an EOS big
    agrees with ends the request as big alone would."""
    llm = open_llm(checkpoints["qwen3_moe"], expert_cache=6, dtype="float32")
    prompt = PROMPTS[1]
    big = llm.generate(prompt, SAMPLING, PolicyConfig("big")).token_ids
    little = llm.generate(prompt, SAMPLING, PolicyConfig("little", prefill="big")).token_ids
    slip = next(i for i, (b, t) in enumerate(zip(big, little)) if b != t and t not in big)  # a token only little emits
    config = PolicyConfig("exact", tau=0.0, criterion="max_prob", draft_max=64)  # drafts end only at the request's end
    for eos in ((little[slip],), (big[12],)):
        want = _run(llm, prompt, PolicyConfig("big"), eos)
        streamed: list[int] = []
        got = _run(llm, prompt, config, eos, on_token=lambda t, seen=streamed: seen.append(t) or True)
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
        assert got.stats.rolled_back_tokens > 0 or eos != (little[slip],)  # little's EOS was drafted, then taken back
        assert streamed == [t for t in got.token_ids if t not in eos]  # nothing taken back was ever streamed
    assert got.finish_reason == "stop"


def test_drafting_prefetches_what_the_verify_will_load(checkpoints, one_thread):
    """Each drafted position's other-half experts are loaded while little drafts on (not with --no-prefetch); the output
    stays big's."""
    llm = open_llm(checkpoints["olmoe"], expert_cache=small_cache("olmoe") * 2, dtype="float32")
    big = llm.generate(PROMPTS[0], SAMPLING, PolicyConfig("big")).token_ids
    for prefetch in (True, False):
        config = PolicyConfig("exact", tau=0.0, criterion="max_prob", draft_max=3, prefetch_on_fallback=prefetch)
        exact = llm.generate(PROMPTS[0], SAMPLING, config)
        assert exact.token_ids == big and (exact.stats.prefetched > 0) == prefetch


def test_a_cancelled_draft_leaves_the_engine_usable(checkpoints):
    llm = open_llm(checkpoints["deepseek_v2"], expert_cache=6, dtype="float32")
    prompt, config = PROMPTS[0], PolicyConfig("exact", tau=0.0, criterion="max_prob", draft_max=4)
    big = llm.generate(prompt, SAMPLING, PolicyConfig("big")).token_ids
    seen: list[int] = []
    cut = llm.generate(prompt, SAMPLING, config, on_token=lambda t: seen.append(t) or len(seen) < 6)
    assert cut.finish_reason == "cancelled" and cut.token_ids == seen == big[:6]
    assert llm.generate(prompt, SAMPLING, config).token_ids == big


def test_exact_rows_in_a_batch_equal_big_alone(checkpoints):
    llm = open_llm(checkpoints["qwen3_moe"], expert_cache=12, dtype="float32", max_batch=4, batch_little="always")
    policies = [PolicyConfig("exact", tau=0.0, criterion="max_prob", draft_max=3), PolicyConfig("big"), PolicyConfig("exact", tau=0.5, criterion="max_prob")]
    prompts = [PROMPTS[0], PROMPTS[1], [5, 6, 7]]
    together = llm.generate(prompts, SAMPLING, policies)
    assert [r.token_ids for r in together] == [llm.generate(p, SAMPLING, PolicyConfig("big")).token_ids for p in prompts]


def test_a_batch_step_run_big_first_verifies_the_open_drafts(checkpoints):
    """At batch >= 2 the governor may run a step big first (`--batch-little auto` tries it on its second step): an exact
    row's open draft is verified there, not taken as big's."""
    llm = open_llm(checkpoints["qwen3_moe"], expert_cache=12, dtype="float32", max_batch=2, batch_little="auto")
    got = llm.generate(PROMPTS, SAMPLING, PolicyConfig("exact", tau=0.0, criterion="max_prob", draft_max=4))
    assert [r.token_ids for r in got] == [llm.generate(p, SAMPLING, PolicyConfig("big")).token_ids for p in PROMPTS]
    assert llm.governor.big_steps > 0


def test_exact_mode_refuses_recurrent_layers(checkpoints):
    llm = open_llm(checkpoints["qwen3_5_moe"], expert_cache=small_cache("qwen3_5_moe"))
    for sampling in (SamplingParams(max_new_tokens=4), SamplingParams(max_new_tokens=4, temperature=0.7)):
        with pytest.raises(InvalidParameter, match="exact mode needs"):
            llm.generate(PROMPTS[0], sampling, PolicyConfig("exact", tau=0.5, criterion="max_prob"))


def _chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's chi-square test of counts against expected counts (the cells under 5 pooled into one): its p-value."""
    order = expected.argsort(descending=True)
    e, o = expected[order], observed[order]
    kept = e >= 5
    e, o = torch.cat([e[kept], e[~kept].sum()[None]]), torch.cat([o[kept], o[~kept].sum()[None]])
    stat = ((o - e) ** 2 / e.clamp_min(1e-12)).sum()
    return float(torch.special.gammaincc(torch.tensor((len(e) - 1) / 2, dtype=torch.float64), stat / 2))


def test_sampled_exact_mode_draws_from_big_s_distribution(checkpoints, one_thread):
    """Speculative sampling: over 400 seeds, the first two tokens (the second drafted by little, kept or replaced by big)
    follow big's distribution (temperature and top-p applied), and the same test rejects little's."""
    llm = LLM(checkpoints["mixtral"], engine_config(progress=False, dtype="float32", max_context=32))  # little: 1 expert of 2
    prompt, vocab, draws = PROMPTS[0], llm.loaded.model.vocab_size, 400
    sampling = [SamplingParams(max_new_tokens=3, temperature=0.3, top_p=0.9, seed=s, stop_at_eos=False) for s in range(draws)]
    observed = torch.zeros(vocab, vocab, dtype=torch.float64)
    for s in sampling:
        result = llm.generate(prompt, s, PolicyConfig("exact", tau=0.0, criterion="max_prob", draft_max=1))
        observed[result.token_ids[0], result.token_ids[1]] += 1
        assert len(result.token_ids) == 3
    first = probabilities(llm.logits(prompt)[-1], 0.3, 0.9).double()  # [V] the prompt's token comes from big's prefill

    def expected(mode: str) -> torch.Tensor:  # [V, V] P(first, second) when `mode` draws the second
        out = torch.zeros(vocab, vocab, dtype=torch.float64)
        for a in first.nonzero()[:, 0].tolist():
            out[a] = first[a] * probabilities(llm.logits(prompt + [a], mode=mode)[-1], 0.3, 0.9).double()
        return out.flatten() * draws

    assert _chi_square_p(observed.flatten(), expected("big")) > 1e-3
    assert _chi_square_p(observed.flatten(), expected("little")) < 1e-6  # the test tells the two apart


def test_a_forced_acceptance_rate_keeps_drafts_big_disagrees_with(checkpoints, one_thread):
    """Benchmarks on random weights force acceptance (a Policy's own field, never a PolicyConfig's): rate 0 rejects every
    drafted token (big's token in its place: big's output), rate 1 keeps every one (nothing taken back)."""
    llm = open_llm(checkpoints["qwen3_moe"], expert_cache=6, dtype="float32")
    config = llm.resolve_policy(PolicyConfig("exact", tau=0.0, criterion="max_prob", draft_max=3))
    big = llm.generate(PROMPTS[1], SAMPLING, PolicyConfig("big")).token_ids
    little = llm.generate(PROMPTS[1], SAMPLING, PolicyConfig("little", prefill="big")).token_ids
    with llm.lock:
        runs = {rate: generate(llm.runner, PROMPTS[1], SAMPLING, Policy(config, forced_acceptance=rate), ()) for rate in (0.0, 1.0)}
    assert runs[0.0].token_ids == big and runs[0.0].stats.rolled_back_tokens > 0
    kept = runs[1.0]
    assert kept.stats.rolled_back_tokens == 0 and kept.token_ids != big
    assert kept.token_ids[:4] == little[:4]  # the first draft is little's greedy continuation of big's first token
    with pytest.raises(InvalidParameter, match="forced acceptance"):
        Policy(PolicyConfig("mobile"), forced_acceptance=0.5)
    assert "forced_acceptance" not in {f.name for f in dataclasses.fields(PolicyConfig)}
