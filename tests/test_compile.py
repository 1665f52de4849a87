"""Compiled decode: every layer type's segment compiles with fullgraph=True and decodes exactly as the eager layers."""

from __future__ import annotations

import pytest
import torch
from conftest import open_llm, small_cache

from mobile_moe import LLM, engine_config
from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.models.transformer import before_experts

STEPS = SamplingParams(max_new_tokens=3, temperature=0.0, stop_at_eos=False)  # two decode passes: the KV length changes once


def _fullgraph(llm: LLM) -> None:
    """Decode `llm` through segments compiled with fullgraph=True: any graph break or host read inside raises."""
    torch._dynamo.reset()  # each test starts with no cached graphs, so its recompiles are its own
    llm.runner.compiled = torch.compile(before_experts, fullgraph=True)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2", "gpt_oss", "qwen3_5_moe"])  # GQA; MLA + dense layer; sinks + sliding; DeltaNet
def test_every_layer_type_compiles_whole_and_decodes_like_eager(checkpoints, arch: str):
    llm = open_llm(checkpoints[arch], expert_cache=small_cache(arch))  # offloaded: the expert dispatch runs between segments
    want = llm.generate([5, 6, 7, 8], STEPS, PolicyConfig("mobile", tau=0.9, criterion="max_prob"))
    _fullgraph(llm)
    got = llm.generate([5, 6, 7, 8], STEPS, PolicyConfig("mobile", tau=0.9, criterion="max_prob"))
    assert got.token_ids == want.token_ids
    assert [s.fell_back for s in got.steps] == [s.fell_back for s in want.steps]


def test_compiled_resident_decode_equals_eager_and_reads_the_host_once_per_token(checkpoints):
    eager = LLM(checkpoints["olmoe"], engine_config(progress=False, dtype="float32"))
    compiled = LLM(checkpoints["olmoe"], engine_config(progress=False, dtype="float32", compile=True))
    for llm in (eager, compiled):
        llm.reset_cache(llm.loaded.store.total_experts)
        llm.cache.load_all()
    assert compiled.runner.compiled is not None and eager.runner.compiled is None
    sampling = SamplingParams(max_new_tokens=8, temperature=0.0, stop_at_eos=False)
    want, got = eager.generate([3, 4, 5], sampling), compiled.generate([3, 4, 5], sampling)
    assert got.token_ids == want.token_ids
    assert got.stats.decode_host_syncs == len(got.token_ids) - 1  # the token, nothing per layer
