"""Policy `big` reproduces transformers exactly (with a cache far smaller than the model); `little` equals the k/2 model."""

from __future__ import annotations

import pytest
import torch
from checkpoints import ARCHITECTURES, reference_model
from conftest import little_k, open_llm, small_cache

from mobile_moe import PolicyConfig, SamplingParams
from mobile_moe.engine.passes import PassSpec
from mobile_moe.layers.moe import ExpertMode

PROMPT = [5, 17, 33, 8, 61, 12, 40, 3, 77, 21]
ATOL = 1e-4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cache_is_under_a_quarter_of_the_experts(checkpoints, arch):
    llm = open_llm(checkpoints[arch], expert_cache=small_cache(arch))
    assert llm.cache.num_slots * 4 < llm.loaded.store.total_experts


def reference_and_ours(path, **overrides):
    """(transformers' logits of PROMPT, our LLM with a cache under a quarter of the experts)."""
    with torch.no_grad():
        expected = reference_model(path, **overrides)(torch.tensor([PROMPT])).logits[0]
    return expected, open_llm(path, expert_cache=small_cache(path.name))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_big_prefill_logits_match_transformers(checkpoints, arch):
    expected, llm = reference_and_ours(checkpoints[arch])
    torch.testing.assert_close(llm.logits(PROMPT), expected, atol=ATOL, rtol=0)
    assert llm.cache.stats.misses > llm.cache.num_slots  # experts really streamed through the small cache


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_big_stepwise_decode_matches_transformers(checkpoints, arch):
    """Prefill 4 tokens, then feed the rest one at a time through the KV cache; compare every step's logits."""
    expected, llm = reference_and_ours(checkpoints[arch])
    runner = llm.runner
    kv = runner.new_kv(len(PROMPT))
    got = [runner.forward(torch.tensor(PROMPT[:4]), kv, PassSpec(ExpertMode.BIG))]
    for token in PROMPT[4:]:
        got.append(runner.forward(torch.tensor([token]), kv, PassSpec(ExpertMode.BIG)))
    torch.testing.assert_close(torch.stack(got), expected[3:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_big_greedy_generation_matches_transformers_generate(checkpoints, arch):
    ref = reference_model(checkpoints[arch])
    llm = open_llm(checkpoints[arch], expert_cache=small_cache(arch))
    with torch.no_grad():
        out = ref.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = out[0, len(PROMPT) :].tolist()
    got = llm.generate(PROMPT, SamplingParams(max_new_tokens=12, stop_at_eos=False), PolicyConfig("big")).token_ids
    assert got == expected


# With little_weights=native, `little` keeps the ceil(k/2) best-ranked of the top-k and applies the
# architecture's own weight rule to them. For every architecture that is exactly transformers run with
# num_experts_per_tok = ceil(k/2): the top-ceil(k/2) of a ranking is the prefix of its top-k; renormalising
# architectures (Mixtral, Qwen3-MoE, DeepSeek-V3, GLM-4.5, ERNIE-4.5) renormalise over the kept experts in both;
# raw-weight ones (OLMoE, Qwen2-MoE, DeepSeek-V2) gather the same probabilities; the group choice (DeepSeek,
# GLM-4.5) and the correction bias (DeepSeek-V3, GLM-4.5, ERNIE-4.5) do not depend on k; shared experts and
# dense layers are untouched.
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_little_equals_transformers_with_half_the_experts(checkpoints, arch):
    ref = reference_model(checkpoints[arch], num_experts_per_tok=little_k(arch))
    llm = open_llm(checkpoints[arch], expert_cache=small_cache(arch))
    with torch.no_grad():
        expected = ref(torch.tensor([PROMPT])).logits[0]
        out = ref.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    torch.testing.assert_close(llm.logits(PROMPT, mode="little"), expected, atol=ATOL, rtol=0)
    got = llm.generate(PROMPT, SamplingParams(max_new_tokens=8, stop_at_eos=False), PolicyConfig("little")).token_ids
    assert got == out[0, len(PROMPT) :].tolist()


def test_little_differs_from_big(checkpoints):
    """Sanity: half the experts is a different model (else the little tests prove nothing)."""
    llm = open_llm(checkpoints["qwen3_moe"], expert_cache=4)
    assert (llm.logits(PROMPT, "big") - llm.logits(PROMPT, "little")).abs().max() > 1e-2


def test_rescaled_little_weights_sum_to_the_big_weights():
    from mobile_moe.layers.moe import RouterSpec, route, select

    spec = RouterSpec(num_experts=8, top_k=4, renormalize=False)
    routing = route(torch.randn(5, 8), spec, None)
    _, big = select(routing, spec, ExpertMode.BIG)
    idx, little = select(routing, spec, ExpertMode.LITTLE, "rescale")
    assert idx.shape == (5, 2)
    torch.testing.assert_close(little.sum(-1), big.sum(-1))
    _, native = select(routing, spec, ExpertMode.LITTLE, "native")
    torch.testing.assert_close(native, big[:, :2])


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_5_moe_text"])
def test_hybrid_long_prompt_in_pieces_matches_transformers(checkpoints, arch):
    """150 tokens (several 64-token delta-rule chunks), fed as 70 then 80 through the recurrent states and the KV cache, as
    transformers is fed. Tolerance 5e-4: float32 rounding of the chunked delta rule, as large as transformers' own split vs
    whole runs differ on these random weights (up to 2e-4 with torch 2.13, 5e-4 with 2.14; ours is 1.7e-4 from its split)."""
    prompt = [(7 * i + 3) % 90 + 5 for i in range(150)]
    ref = reference_model(checkpoints[arch])
    with torch.no_grad():
        head = ref(torch.tensor([prompt[:70]]), use_cache=True)
        tail = ref(torch.tensor([prompt[70:]]), cache=head.cache, use_cache=True)
    expected = torch.cat((head.logits[0], tail.logits[0]))
    llm = open_llm(checkpoints[arch], expert_cache=small_cache(arch))
    kv = llm.runner.new_kv(len(prompt))
    first = llm.runner.forward(torch.tensor(prompt[:70]), kv, PassSpec(ExpertMode.BIG), all_logits=True)
    rest = llm.runner.forward(torch.tensor(prompt[70:]), kv, PassSpec(ExpertMode.BIG), all_logits=True)
    torch.testing.assert_close(torch.cat((first, rest)), expected, atol=5e-4, rtol=0)
