"""Benchmark plumbing on CPU: synthetic shapes at reduced width, traces, the cost model, the bench report."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from mobile_moe import LLM, PolicyConfig, SamplingParams, engine_config
from mobile_moe.bench.bench import default_prompts
from mobile_moe.bench.costmodel import ModelCost, predict
from mobile_moe.bench.hf_baseline import bench_gpu, clock_timings, max_memory_map, run_baseline
from mobile_moe.bench.profiles import PROFILES
from mobile_moe.bench.synthetic import SHAPES, build_synthetic, full_size_cost, synthetic_config
from mobile_moe.cli import main
from mobile_moe.errors import InvalidParameter
from mobile_moe.experts.formats import make_format
from mobile_moe.experts.trace import Trace, load_trace
from mobile_moe.loading.loader import load

SYSTEM_FIELDS = ("name", "decode_tok_s", "ttft_s", "h2d_gb_per_token", "hit_rate", "fallback_rate", "transfer_wait_share", "ratio_to_big")


SHRINK = {"gpt-oss-20b": 32, "qwen3.5-35b-a3b": 64, "glm-4.5-air": 64, "ernie-4.5-21b-a3b": 32}  # thousands of experts: keep CI small


@pytest.mark.parametrize("name", list(SHAPES))
def test_synthetic_shapes_keep_structure_when_shrunk(name):
    shrink = SHRINK.get(name, 16)
    full, small = synthetic_config(name), synthetic_config(name, shrink=shrink)
    for key in ("num_hidden_layers", "num_experts_per_tok", "num_experts", "num_local_experts", "n_routed_experts", "first_k_dense_replace"):
        assert getattr(full, key, None) == getattr(small, key, None)
    assert small.hidden_size == full.hidden_size // shrink
    loaded = build_synthetic(name, torch.device("cpu"), shrink=shrink)
    info = loaded.model.info
    assert info.top_k == full.num_experts_per_tok and info.hidden == small.hidden_size
    assert loaded.store.total_experts == info.num_experts * len(info.moe_layers)
    llm = LLM(loaded, engine_config(expert_cache=info.top_k, progress=False))
    out = llm.generate([3, 4, 5], SamplingParams(max_new_tokens=3, stop_at_eos=False))
    assert len(out.token_ids) == 3 and out.stats.expert_misses > 0


def test_synthetic_shapes_keep_their_first_layers_for_a_rehearsal():
    cfg = synthetic_config("olmoe-1b-7b", shrink=16, layers=2)
    assert cfg.num_hidden_layers == 2 and cfg.num_experts == 64 and cfg.hidden_size == 128
    loaded = build_synthetic("olmoe-1b-7b", torch.device("cpu"), shrink=16, layers=2)
    assert len(loaded.model.model.layers) == 2 and loaded.store.total_experts == 2 * 64
    llm = LLM(loaded, engine_config(expert_cache=16, progress=False))
    assert [len(p) for p in default_prompts(llm, 3, random_len=5)] == [5, 5, 5]  # bench --prompt-tokens 5 (no tokenizer: random ids)
    assert full_size_cost("olmoe-1b-7b", layers=2).num_layers == 2  # predictions for the layers the run kept, at full width
    assert synthetic_config("deepseek-v2-lite", layers=2).num_hidden_layers == 2
    for name, layers in (("deepseek-v2-lite", 1), ("olmoe-1b-7b", 0), ("olmoe-1b-7b", 17)):  # only dense layers; none; too many
        with pytest.raises(InvalidParameter, match="--layers"):
            synthetic_config(name, layers=layers)


def test_full_size_expert_bytes_match_the_calibrated_shapes():
    """bf16 expert sizes equal the ones measured on the H200 (docs/design.md §8)."""
    sizes = {"olmoe-1b-7b": 12582912, "qwen1.5-moe-a2.7b": 17301504, "deepseek-v2-lite": 17301504, "qwen3-30b-a3b": 9437184, "mixtral-8x7b": 352321536}
    for name, expected in sizes.items():
        cfg = synthetic_config(name)
        inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
        assert 3 * cfg.hidden_size * inter * 2 == expected


def test_new_shapes_have_their_published_expert_sizes():
    """Per-expert bytes of the full-width shapes: bf16, and gpt-oss as it ships (MXFP4 blocks, scales and float32 biases)."""
    bf16 = {"qwen3.5-35b-a3b": 3 * 2048 * 512 * 2, "glm-4.5-air": 3 * 4096 * 1408 * 2, "ernie-4.5-21b-a3b": 3 * 2560 * 1536 * 2}
    for name, expected in bf16.items():
        assert full_size_cost(name).expert_bytes == expected
    mxfp4 = full_size_cost("gpt-oss-20b", make_format("mxfp4", torch.bfloat16))
    assert mxfp4.expert_bytes == 13_253_760


def test_forced_fallback_rate_is_exact_and_evenly_spaced():
    llm = LLM(build_synthetic("qwen3-30b-a3b", torch.device("cpu"), shrink=16), engine_config(expert_cache=16, progress=False))
    out = llm.generate([5, 6, 7], SamplingParams(max_new_tokens=21, stop_at_eos=False), PolicyConfig("mobile", forced_fallback_rate=0.25))
    assert out.stats.fallback_tokens == 5  # 20 decode steps x 0.25
    assert [i for i, s in enumerate(out.steps) if s.fell_back] == [4, 8, 12, 16, 20]


def _trace(policy: PolicyConfig, slots: int) -> tuple[list, ModelCost, int]:
    loaded = build_synthetic("olmoe-1b-7b", torch.device("cpu"), shrink=16)
    llm = LLM(loaded, engine_config(expert_cache=slots, progress=False))
    trace = Trace()
    llm.reset_cache(slots, trace)
    for prompt in ([3, 4, 5, 6], [9, 8, 7]):
        llm.generate(prompt, SamplingParams(max_new_tokens=9, stop_at_eos=False), policy)
    cost = ModelCost(len(loaded.model.model.layers), 10**8, 12 * 2**20)  # real-size expert bytes on the shrunk trace
    return trace.accesses, cost, slots


def test_trace_roundtrip_and_replay_counts_decode_steps(tmp_path):
    accesses, cost, slots = _trace(PolicyConfig("big"), 16)
    trace = Trace()
    trace.accesses = accesses
    trace.save(tmp_path / "t.jsonl")
    assert load_trace(tmp_path / "t.jsonl") == accesses
    p = predict(accesses, cost, PROFILES["rtx4090"], slots)
    assert p.steps == 16 and p.tok_s > 0 and p.h2d_gb > 0


def test_cost_model_moves_the_right_way():
    accesses, cost, slots = _trace(PolicyConfig("big"), 16)
    base = PROFILES["rtx4090"]
    slow_link = replace(base, link_gbps=base.link_gbps / 4)
    assert predict(accesses, cost, slow_link, slots).tok_s < predict(accesses, cost, base, slots).tok_s
    assert predict(accesses, cost, base, slots * 8).tok_s > predict(accesses, cost, base, slots).tok_s
    assert predict(accesses, cost, base, 1024).h2d_gb < predict(accesses, cost, base, slots).h2d_gb


def test_cost_model_sees_little_move_fewer_bytes_than_big():
    big, cost, slots = _trace(PolicyConfig("big"), 16)
    little, _, _ = _trace(PolicyConfig("little"), 16)
    hw = PROFILES["rtx4060ti-16gb"]
    assert predict(little, cost, hw, slots).h2d_gb < predict(big, cost, hw, slots).h2d_gb
    assert predict(little, cost, hw, slots).tok_s > predict(big, cost, hw, slots).tok_s


def test_bench_cli_reports_every_system(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--synthetic",
            "deepseek-v2-lite",
            "--shrink",
            "16",
            "--prompts",
            "2",
            "--new-tokens",
            "5",
            "--expert-cache",
            "24",
            "--fallback-rate",
            "0.5",
            "--json",
            str(out),
            "--trace-dir",
            str(tmp_path / "tr"),
            "--quiet",
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    names = [s["name"] for s in report["systems"]]
    assert names == ["big", "mobile", "little", "resident", "transformers"]  # accelerate offloads only on cuda
    for s in report["systems"]:
        assert set(SYSTEM_FIELDS) <= set(s)
    mobile = report["systems"][1]
    assert mobile["fallback_rate"] == pytest.approx(0.5)
    assert report["systems"][0]["ratio_to_big"] == 1.0
    assert set(report["predicted"]) == set(PROFILES) and all(set(p) == {"big", "mobile", "little"} for p in report["predicted"].values())
    assert "driven at rate 0.5" in report["mobile"]["note"]
    assert report["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()  # the feature set the kernel measurements ran
    assert sorted(p.name for p in (tmp_path / "tr").iterdir()) == ["big.jsonl", "little.jsonl", "mobile.jsonl", "resident.jsonl"]


def test_token_clock_arithmetic_clamps_nothing():
    """TTFT = first token's stamp - start; decode = last stamp - first stamp over n - 1 intervals."""
    assert clock_timings(10.0, [10.5, 10.7, 10.9, 11.3]) == pytest.approx((0.5, 0.8, 3))
    assert clock_timings(1.0, [1.25]) == (0.25, 0.0, 0)  # one token: no decode interval, none invented
    with pytest.raises(ValueError):
        clock_timings(0.0, [])


def test_accelerate_places_on_the_bench_device_not_gpu_0():
    """`--device cuda:1`: accelerate gets GPU 1's budget (or its free memory) and no other GPU, the rest on the CPU."""
    gpu = bench_gpu(torch.device("cuda:1"))  # an explicit index needs no CUDA
    assert gpu == 1
    assert max_memory_map(gpu, 4.0, 10**9) == {1: "4.0GiB", "cpu": "200GiB"}
    assert max_memory_map(gpu, None, 10**9) == {1: 10**9, "cpu": "200GiB"}


def test_accelerate_baseline_times_every_decode_token(checkpoints):
    loaded = load(checkpoints["olmoe"], torch.device("cpu"), progress=False)
    prompts, new_tokens = [[3, 4, 5], [6, 7, 8, 9], [10, 11]], 5
    r = run_baseline(loaded, torch.device("cpu"), None, prompts, new_tokens, progress=False)
    assert r.steps == len(prompts) * (new_tokens - 1)
    assert 0 < r.decode_tok_s < float("inf") and r.decode_tok_s == pytest.approx(r.steps / r.decode_s)
    assert r.ttft_s > 0 and r.placement == "whole model on cpu (no offload)"
    llm = LLM(loaded, engine_config(expert_cache=6, progress=False))
    greedy = SamplingParams(max_new_tokens=new_tokens, stop_at_eos=False)
    assert r.token_ids == [llm.generate(p, greedy).token_ids for p in prompts]  # transformers' greedy tokens are ours


@pytest.mark.parametrize("expert_dtype", ["int8", "int4"])
def test_synthetic_shapes_build_packed_experts_directly(expert_dtype):
    group = 16 if expert_dtype == "int4" else None  # the shrunk expert width (48) is not a multiple of the default 64
    loaded = build_synthetic("qwen3-30b-a3b", torch.device("cpu"), shrink=16, expert_dtype=expert_dtype, group_size=group)
    store = loaded.store
    assert str(store.format).startswith(expert_dtype) and store.missing() == []
    w = store.format.dequantize([f[0] for f in store.fields[0]["gate_up"]], torch.float32)
    assert w.shape == (2 * 48, 128) and 0.5 * 0.02 < w.std() < 2 * 0.02  # random codes and scales give init-sized weights
    llm = LLM(loaded, engine_config(expert_cache=16, progress=False))
    out = llm.generate([3, 4, 5], SamplingParams(max_new_tokens=3, stop_at_eos=False, temperature=1.0, seed=0))
    assert out.stats.h2d_bytes == out.stats.expert_misses * store.expert_bytes


def test_bench_batch_sweep_reports_each_size_and_system(tmp_path, capsys):
    out, plot = tmp_path / "batch.json", tmp_path / "batch.png"
    code = main(
        [
            "bench",
            "--synthetic",
            "olmoe-1b-7b",
            "--shrink",
            "16",
            "--expert-cache",
            "64",
            "--batch",
            "1,3",
            "--new-tokens",
            "6",
            "--rounds",
            "1",
            "--quiet",
            "--json",
            str(out),
            "--plot",
            str(plot),
        ]
    )
    assert code == 0 and plot.stat().st_size > 0
    report = json.loads(out.read_text())
    assert [(r["batch"], r["system"]) for r in report["rows"]] == [(1, "big"), (1, "mobile"), (3, "big"), (3, "mobile")]
    for r in report["rows"]:
        assert r["aggregate_tok_s"] > 0 and r["steps"] >= 1 and r["expert_loads_per_token"] <= r["experts_computed_per_token"]
        assert r["little_steps"] + r["big_steps"] == (r["steps"] if r["batch"] > 1 and r["system"] == "mobile" else 0)
    assert "fallbacks driven at rate" in report["mobile_note"] and "agg tok/s" in capsys.readouterr().out
    assert main(["bench", "--plot", str(plot)]) == 2  # --plot draws the batch sweep only


def test_bench_shared_prefix_reports_cold_and_reused_time_to_first_token(tmp_path, capsys):
    out = tmp_path / "prefix.json"
    common = ["bench", "--synthetic", "olmoe-1b-7b", "--shrink", "16", "--layers", "2", "--new-tokens", "3", "--rounds", "1", "--quiet"]
    assert main([*common, "--shared-prefix", "40", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for path in ("generate", "server"):
        r = report[path]
        assert r["reused_tokens"] == 40 and r["same_tokens"] and r["cold_ttft_s"] > 0 and r["reused_ttft_s"] > 0
    assert "reused TTFT s" in capsys.readouterr().out
    assert main([*common, "--shared-prefix", "40", "--prefix-cache", "0", "--json", str(out)]) == 0
    assert [json.loads(out.read_text())[p]["reused_tokens"] for p in ("generate", "server")] == [0, 0]
