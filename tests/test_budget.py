"""Budgets plan without allocating, follow --max-context, and what the engine reports about syncs and pinned memory."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import open_llm

from mobile_moe import LLM, engine_config
from mobile_moe.bench.synthetic import SHAPES, synthetic_config
from mobile_moe.cli import main
from mobile_moe.config import CacheConfig, EngineConfig, SamplingParams
from mobile_moe.engine import generate as generate_module
from mobile_moe.engine.calibration import DEMO_MODEL
from mobile_moe.errors import CacheTooSmall, PromptTooLong
from mobile_moe.loading.budget import GIB, plan_for_config


def h200_plan(name: str, gb: float, max_context: int = 4096):
    """The slot plan of a real-size shape on CUDA under a budget, computed on the meta device."""
    return plan_for_config(synthetic_config(name), EngineConfig(device="cuda", cache=CacheConfig(gpu_memory_gb=gb), max_context=max_context))


@pytest.mark.parametrize("name", list(SHAPES))
def test_every_real_size_shape_plans_on_a_cpu_machine_within_the_h200(name):
    plan = h200_plan(name, 140)
    fixed = plan.dense_bytes + plan.kv_bytes + plan.scratch_bytes
    assert fixed + plan.slots * plan.expert_bytes <= 140 * GIB
    # every expert when they all fit (all but GLM-4.5-Air's 190 GB of bf16 experts), else as many as fit
    assert plan.slots == plan.total_experts or fixed + (plan.slots + 1) * plan.expert_bytes > 140 * GIB


def test_budget_split_names_every_part_and_follows_max_context():
    short, long = h200_plan("qwen1.5-moe-a2.7b", 6, max_context=1024), h200_plan("qwen1.5-moe-a2.7b", 6)
    assert long.kv_bytes == 4 * short.kv_bytes and long.slots < short.slots
    assert long.dense_bytes + long.kv_bytes + long.scratch_bytes + (long.slots + 1) * long.expert_bytes > 6 * GIB
    assert "3.46 GiB dense weights" in long.describe() and "4096 tokens" in long.describe()
    with pytest.raises(CacheTooSmall, match="too small for one layer's top-4"):
        h200_plan("qwen1.5-moe-a2.7b", 4)  # what the old benchmark script asked for


def test_bench_plan_only_prints_the_plan_and_loads_nothing(capsys):
    assert main(["bench", "--synthetic", "mixtral-8x7b", "--device", "cuda", "--gpu-memory", "12", "--plan-only"]) == 0
    assert "25 of 256 expert slots (336.0 MiB each)" in capsys.readouterr().out


def test_max_context_bounds_prompts(checkpoints):
    llm = open_llm(checkpoints["olmoe"], max_context=16)
    with pytest.raises(PromptTooLong, match="shorter than --max-context 16"):
        llm.generate(list(range(3, 20)))
    assert len(llm.generate(list(range(3, 10)), SamplingParams(max_new_tokens=50, stop_at_eos=False)).token_ids) == 16 - 7


def test_prefill_in_chunks_gives_the_same_tokens(checkpoints, monkeypatch):
    llm = open_llm(checkpoints["qwen3_moe"], expert_cache=4)
    prompt, sampling = list(range(3, 40)), SamplingParams(max_new_tokens=6, stop_at_eos=False)
    whole = llm.generate(prompt, sampling).token_ids
    monkeypatch.setattr(generate_module, "PREFILL_CHUNK", 5)
    assert llm.generate(prompt, sampling).token_ids == whole


@pytest.mark.parametrize("policy", ["big", "little"])
def test_host_syncs_per_token_are_one_per_moe_layer_plus_one_with_offloaded_experts(policy, capsys):
    assert main(["generate", "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6", "--policy", policy, "--expert-cache", "64", "--json", "--quiet"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    moe_layers = json.loads((DEMO_MODEL / "config.json").read_text())["num_hidden_layers"]
    assert stats["host_syncs_per_token"] == moe_layers + 1  # the routing read per MoE layer, then token (+ confidence)
    assert stats["decode_host_syncs"] == 5 * (moe_layers + 1)
    assert stats["host_pinned_bytes"] == 0  # CPU: nothing to pin


@pytest.mark.parametrize("policy", ["big", "little"])
def test_every_expert_in_ram_is_the_store_itself_and_decodes_with_one_host_sync_per_token(policy, capsys):
    llm = LLM(DEMO_MODEL, engine_config(progress=False))
    store = llm.loaded.store
    assert llm.cache.shares_store and llm.cache.pool.data_ptr() == store.host.data.data_ptr()  # the experts are held once
    first_layer = next(iter(store.layers))
    assert llm.cache.all_resident and llm.cache.fields["gate_up"][0].data_ptr() == store.fields[first_layer]["gate_up"][0].data_ptr()
    assert main(["generate", "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6", "--policy", policy, "--json", "--quiet"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["host_syncs_per_token"] == 1 and stats["decode_host_syncs"] == 5  # resident from the first request: no routing read
    assert stats["expert_misses"] == 0 and stats["h2d_bytes"] == 0 and stats["hit_rate"] == 1.0


def test_mobile_fallback_costs_one_more_pass_and_one_prefetch_read(checkpoints):
    llm = open_llm(checkpoints["olmoe"], expert_cache=8)
    from mobile_moe.config import PolicyConfig

    stats = llm.generate([3, 4, 5], SamplingParams(max_new_tokens=9, stop_at_eos=False), PolicyConfig("mobile", forced_fallback_rate=0.5)).stats
    layers, steps = len(llm.info.moe_layers), stats.tokens - 1
    assert stats.decode_host_syncs == steps * (layers + 1) + stats.fallback_tokens * (1 + layers + 1)
    assert torch.isfinite(torch.tensor(stats.decode_tok_s))


def test_engine_settings_are_given_by_keyword_only():
    """EngineConfig and CacheConfig grow fields; a positional call would silently bind a value to the wrong one."""
    with pytest.raises(TypeError):
        EngineConfig("cuda")  # type: ignore[misc]
    with pytest.raises(TypeError):
        CacheConfig(8)  # type: ignore[misc]
    assert EngineConfig(device="cuda", cache=CacheConfig(slots=8)).cache.slots == 8
