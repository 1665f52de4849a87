"""Compiled decode: every layer type's segment compiles with fullgraph=True and decodes exactly as the eager layers."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import open_llm, small_cache

from mobile_moe import LLM, engine_config
from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.engine.aot import AotLayers
from mobile_moe.engine.passes import PassSpec
from mobile_moe.engine.runner import RunnerOptions
from mobile_moe.experts.dispatch import combine, pool_experts
from mobile_moe.experts.native import CACHE_ENV
from mobile_moe.layers.moe import ExpertMode

STEPS = SamplingParams(max_new_tokens=3, temperature=0.0, stop_at_eos=False)  # two decode passes: the KV length changes once


def _fullgraph(path: Path, arch: str) -> LLM:
    """The checkpoint decoding through layer segments compiled with fullgraph=True: any graph break or host read inside raises."""
    torch._dynamo.reset()  # each test starts with no cached graphs, so its recompiles are its own
    return LLM(path, engine_config(progress=False, expert_cache=small_cache(arch), compile=True), RunnerOptions(fullgraph=True))


def _all_resident(path: Path, options: RunnerOptions | None = None) -> tuple[LLM, LLM]:
    """The checkpoint opened eager and compiled (float32, the compiled one built with `options`), every expert loaded."""
    pair = LLM(path, engine_config(progress=False, dtype="float32")), LLM(path, engine_config(progress=False, dtype="float32", compile=True), options)
    for llm in pair:
        llm.reset_cache(llm.loaded.store.total_experts)
        llm.cache.load_all()
    return pair


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2", "gpt_oss", "qwen3_5_moe"])  # GQA; MLA + dense layer; sinks + sliding; DeltaNet
def test_every_layer_type_compiles_whole_and_decodes_like_eager(checkpoints, arch: str):
    llm = open_llm(checkpoints[arch], expert_cache=small_cache(arch))  # offloaded: the expert dispatch runs between segments
    want = llm.generate([5, 6, 7, 8], STEPS, PolicyConfig("mobile", tau=0.9, criterion="max_prob"))
    got = _fullgraph(checkpoints[arch], arch).generate([5, 6, 7, 8], STEPS, PolicyConfig("mobile", tau=0.9, criterion="max_prob"))
    assert got.token_ids == want.token_ids
    assert [s.fell_back for s in got.steps] == [s.fell_back for s in want.steps]


def test_compiled_resident_decode_equals_eager_and_reads_the_host_once_per_token(checkpoints):
    eager, compiled = _all_resident(checkpoints["olmoe"])
    assert compiled.runner.compiled is not None and eager.runner.compiled is None
    sampling = SamplingParams(max_new_tokens=8, temperature=0.0, stop_at_eos=False)
    want, got = eager.generate([3, 4, 5], sampling), compiled.generate([3, 4, 5], sampling)
    assert got.token_ids == want.token_ids
    assert got.stats.decode_host_syncs == len(got.token_ids) - 1  # the token, nothing per layer


@pytest.mark.parametrize("arch", ["deepseek_v2", "gpt_oss"])  # MLA, shared experts and a dense layer; sinks, sliding window, biases
def test_resident_layers_compile_whole_experts_included_and_decode_like_eager(checkpoints, arch: str):
    """Every expert resident: each MoE layer (attention, router, the mode's choice, slot lookup, experts) compiles with
    fullgraph=True into one call, for big and for mobile's little and fallback passes, and decodes as eager does."""
    torch._dynamo.reset()
    resident: list[bool] = []  # whether each decode pass took the all-resident path (with --compile: the whole-layer call)
    observe = lambda ctx: ctx.specs is None and resident.append(ctx.resident)  # noqa: E731
    eager, compiled = _all_resident(checkpoints[arch], RunnerOptions(fullgraph=True, observe=observe))
    sampling = SamplingParams(max_new_tokens=5, temperature=0.0, stop_at_eos=False)
    for policy in (PolicyConfig("big"), PolicyConfig("mobile", tau=0.9, criterion="max_prob")):
        want, got = eager.generate([5, 6, 7, 8], sampling, policy), compiled.generate([5, 6, 7, 8], sampling, policy)
        assert got.token_ids == want.token_ids
        assert [s.fell_back for s in got.steps] == [s.fell_back for s in want.steps]
    assert compiled.runner.resident_layer is not None and any(resident)  # decode passes took the whole-layer path


@pytest.mark.parametrize("arch", ["gpt_oss"])  # clamped SwiGLU experts with biases (SiLU: the resident test above)
def test_compiled_expert_call_decodes_like_the_eager_loop(checkpoints, arch: str):
    """With --compile a decode token's experts run as one fused call over the slot pool (offloaded and resident)."""
    torch._dynamo.reset()
    eager = open_llm(checkpoints[arch], expert_cache=small_cache(arch))
    compiled = LLM(checkpoints[arch], engine_config(progress=False, expert_cache=small_cache(arch), compile=True))
    assert compiled.runner.executor.pooled is not None and eager.runner.executor.pooled is None
    sampling = SamplingParams(max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    mobile = PolicyConfig("mobile", tau=0.9, criterion="max_prob")
    for policy in (PolicyConfig("big"), mobile):
        want, got = eager.generate([5, 6, 7, 8], sampling, policy), compiled.generate([5, 6, 7, 8], sampling, policy)
        assert got.token_ids == want.token_ids
        assert [s.fell_back for s in got.steps] == [s.fell_back for s in want.steps]
    for llm in (eager, compiled):
        llm.reset_cache(llm.loaded.store.total_experts)
        llm.cache.load_all()
    assert compiled.generate([5, 6, 7, 8], sampling).token_ids == eager.generate([5, 6, 7, 8], sampling).token_ids


def test_compiled_expert_call_matches_each_expert_computed_alone(checkpoints):
    """The fused call (the gather folded into each matvec) equals the per-expert loop within float32 rounding."""
    llm = open_llm(checkpoints["gpt_oss"], expert_cache=16)
    executor = llm.runner.executor
    torch._dynamo.reset()
    executor.pooled = torch.compile(pool_experts, fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, llm.info.hidden, generator=gen)
    slots, weights = [3, 0, 11, 7], torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    for slot in range(16):
        executor.cache.fields["gate_up"][0][slot].normal_(0.0, 0.05, generator=gen)
        executor.cache.fields["down"][0][slot].normal_(0.0, 0.05, generator=gen)
    want = combine([executor._expert(x, s) for s in slots], weights, x.dtype)
    # sums in another order: float32 rounding relative to the output's scale (an entry near zero has no relative bound)
    torch.testing.assert_close(executor._pooled(x, torch.tensor(slots), weights), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss"])  # plain GQA; sinks, a sliding-window ring, biases
def test_fixed_span_decode_reuses_one_compiled_graph_per_bucket_and_decodes_like_eager(checkpoints, arch: str):
    """With the device-held position and a fixed key span, a compiled resident step depends on no host value that changes
    from step to step: after the first step of a bucket nothing recompiles (what a captured CUDA graph needs)."""
    torch._dynamo.reset()
    eager, compiled = _all_resident(checkpoints[arch], RunnerOptions(span_bucket=16, fullgraph=True, dynamic=False))
    runner = compiled.runner
    prompt = [3, 4, 5, 6, 7]
    want = eager.generate(prompt, SamplingParams(max_new_tokens=10, temperature=0.0, stop_at_eos=False))
    kv = runner.new_kv(32)
    runner.forward(runner.ids(prompt), kv, PassSpec(ExpertMode.BIG))  # the prompt (eager)
    token = runner.ids([want.token_ids[0]])
    got = [int(runner.forward(token, kv, PassSpec(ExpertMode.BIG)).argmax())]  # the first decode step compiles the bucket's graphs
    with torch.compiler.set_stance("fail_on_recompile"):  # positions 6..14: the same 16-key bucket
        for t in want.token_ids[1:-1]:
            got.append(int(runner.forward(runner.ids([t]), kv, PassSpec(ExpertMode.BIG)).argmax()))
    assert got == want.token_ids[1:]


def test_default_build_compiles_once_per_machine_then_loads_the_cached_package(checkpoints, tmp_path, monkeypatch, capsys):
    """By default a small CPU model decodes through whole layers compiled ahead of time: the first build compiles them
    (saying so, once), a later build loads the package from the cache dir without compiling, and both decode as eager."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    sampling, big = SamplingParams(max_new_tokens=8, temperature=0.0, stop_at_eos=False), PolicyConfig("big")
    eager = LLM(checkpoints["olmoe"], engine_config(progress=False, dtype="float32", compile=False))
    want = eager.generate([3, 4, 5], sampling, big).token_ids
    built: list[list[str]] = []
    for _ in range(2):  # the cold build, then a fresh engine on the warm cache
        llm = LLM(checkpoints["olmoe"], engine_config(dtype="float32"))
        assert llm.compiled_dir == tmp_path and isinstance(llm.runner.resident_layer, AotLayers)
        capsys.readouterr()
        assert llm.generate([3, 4, 5], sampling, big).token_ids == want
        assert all(llm.runner.resident_layer.loaders.values())  # the decode passes went through a package
        built.append([line for line in capsys.readouterr().err.splitlines() if "compiling the decode step" in line])
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.pt2" for stem in sorted(llm.runner.resident_layer.loaders)]
    assert [len(lines) for lines in built] == [1, 0]
    assert str(tmp_path) in built[0][0]


def test_default_build_decodes_eagerly_where_no_package_can_be_built(checkpoints, tmp_path, monkeypatch, caplog):
    """A cache dir that cannot be made (here: a file's place) leaves the default path eager, with one warning, same tokens."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "file" / "compiled"))
    sampling = SamplingParams(max_new_tokens=4, temperature=0.0, stop_at_eos=False)
    want = LLM(checkpoints["olmoe"], engine_config(progress=False, dtype="float32", compile=False)).generate([3, 4, 5], sampling).token_ids
    project_log = logging.getLogger("mobile_moe")  # on the project's logger itself: it does not propagate once the CLI has set it up
    project_log.addHandler(caplog.handler)
    try:
        llm = LLM(checkpoints["olmoe"], engine_config(progress=False, dtype="float32"))
        tokens = llm.generate([3, 4, 5], sampling).token_ids
    finally:
        project_log.removeHandler(caplog.handler)
    assert tokens == want
    warnings = {id(r) for r in caplog.records if "decoding eagerly" in r.getMessage()}  # one record, seen twice where it propagates
    assert list(llm.runner.resident_layer.loaders.values()) == [None] and len(warnings) == 1
