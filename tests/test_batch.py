"""Batched decode: every row equals its solo run (float32), rows join, leave and stop alone, fallbacks redo only their rows."""

from __future__ import annotations

import inspect
import json
import statistics
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import open_llm
from test_serve import serving

from mobile_moe import LLM, PolicyConfig, SamplingParams, engine_config
from mobile_moe.engine.calibration import DEMO_MODEL
from mobile_moe.engine.passes import PassSpec
from mobile_moe.engine.runner import RunnerOptions
from mobile_moe.layers.kv_cache import BatchKV
from mobile_moe.layers.moe import ExpertMode
from mobile_moe.policy.governor import LittleGovernor, bucket

PROMPTS = [[7, 3, 44, 19, 28], [90, 11, 5], [12, 13, 14, 15, 16, 17, 18, 19], [3], [61, 62, 8, 9]]
SAMPLING = SamplingParams(max_new_tokens=10, stop_at_eos=False)
ARCHS = ["qwen3_moe", "qwen3_5_moe", "gpt_oss", "deepseek_v2"]  # GQA, recurrent hybrid, sinks + sliding windows, MLA row by row


def batched_llm(path, rows: int = 8, **kw) -> LLM:
    return open_llm(path, dtype="float32", max_batch=rows, batch_little="always", **kw)


def middle_tau(llm: LLM, prompts: list[list[int]]) -> float:
    """A tau that makes roughly half of the steps fall back on these prompts."""
    probes = llm.generate(prompts, SAMPLING, PolicyConfig("mobile", tau=0.0))
    return statistics.median(s.confidence for r in probes for s in r.steps[1:])


@pytest.mark.parametrize("arch", ARCHS)
def test_each_row_of_a_batch_equals_its_solo_run(checkpoints, arch):
    llm = batched_llm(checkpoints[arch], expert_cache=12)
    tau = middle_tau(llm, PROMPTS)
    for policy in (PolicyConfig("big"), PolicyConfig("little"), PolicyConfig("mobile", tau=tau)):
        together = llm.generate(PROMPTS, SAMPLING, policy)
        alone = [llm.generate(p, SAMPLING, policy) for p in PROMPTS]
        assert [r.token_ids for r in together] == [r.token_ids for r in alone], policy.name
        assert [r.stats.fallback_tokens for r in together] == [r.stats.fallback_tokens for r in alone]
    assert 0 < sum(r.stats.fallback_tokens for r in together) < len(PROMPTS) * (SAMPLING.max_new_tokens - 1)


def test_rows_with_their_own_policies_lengths_and_seeds_join_and_leave(checkpoints):
    llm = batched_llm(checkpoints["qwen3_moe"], rows=3, expert_cache=12)
    samplings = [
        SamplingParams(max_new_tokens=n, stop_at_eos=False, temperature=t, seed=s)
        for n, t, s in ((4, 0.0, None), (12, 0.8, 1), (7, 0.0, None), (9, 1.0, 2), (3, 0.0, None))
    ]
    policies = [PolicyConfig(p) for p in ("big", "mobile", "little", "big", "mobile")]
    together = llm.generate(PROMPTS, samplings, policies)  # 3 rows: the last two join as the first ones finish
    alone = [llm.generate(p, s, pol) for p, s, pol in zip(PROMPTS, samplings, policies)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [len(r.token_ids) for r in together] == [4, 12, 7, 9, 3]


def test_a_row_stopped_mid_stream_leaves_the_others_unaffected(checkpoints):
    llm = batched_llm(checkpoints["qwen3_moe"], expert_cache=12)
    seen: dict[int, list[int]] = {}

    def on_token(row: int, token: int) -> bool:  # row 1 stops after 3 tokens (a cancelled client, a stop string)
        seen.setdefault(row, []).append(token)
        return not (row == 1 and len(seen[row]) == 3)

    together = llm.generate(PROMPTS, SAMPLING, PolicyConfig("big"), on_token=on_token)
    alone = [llm.generate(p, SAMPLING, PolicyConfig("big")) for p in PROMPTS]
    assert together[1].finish_reason == "cancelled" and together[1].token_ids == alone[1].token_ids[:3]
    assert [r.token_ids for i, r in enumerate(together) if i != 1] == [r.token_ids for i, r in enumerate(alone) if i != 1]
    assert seen[0] == together[0].token_ids


def test_a_fallback_recomputes_only_its_own_rows(checkpoints):
    passes: list[int] = []  # rows of each batched pass
    observe = lambda ctx: ctx.specs is not None and passes.append(len(ctx.specs))  # noqa: E731
    llm = batched_llm(checkpoints["qwen3_moe"], expert_cache=12, options=RunnerOptions(observe=observe))
    policies = [PolicyConfig("mobile", forced_fallback_rate=0.5), PolicyConfig("big"), PolicyConfig("little"), PolicyConfig("mobile", tau=0.0)]
    prompts = PROMPTS[:4]
    together = llm.generate(prompts, SAMPLING, policies)
    alone = [llm.generate(p, SAMPLING, pol) for p, pol in zip(prompts, policies)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.stats.fallback_tokens for r in together] == [4, 0, 0, 0]  # steps 2, 4, 6, 8 of 9
    assert passes.count(1) == 4 and passes.count(4) == SAMPLING.max_new_tokens - 1  # each fallback pass holds the one row


def test_bfloat16_batches_agree_with_solo_runs_within_rounding(checkpoints):
    llm = open_llm(checkpoints["qwen3_moe"], dtype="bfloat16", max_batch=8, expert_cache=12)
    together = llm.generate(PROMPTS, SAMPLING, PolicyConfig("big"))
    alone = [llm.generate(p, SAMPLING, PolicyConfig("big")) for p in PROMPTS]
    same = sum(a == b for x, y in zip(together, alone) for a, b in zip(x.token_ids, y.token_ids))
    assert same / (len(PROMPTS) * SAMPLING.max_new_tokens) >= 0.8  # batched matmuls round differently from single-row ones
    runner, pool = llm.runner, llm.runner.new_pool(2, 16)  # one step's logits: two rows together against each row alone
    caches = [pool.row(i, {}) for i in range(2)]
    for cache, prompt in zip(caches, PROMPTS[:2]):
        runner.forward(torch.tensor(prompt), cache, PassSpec(ExpertMode.BIG))
    together_logits = runner.forward_rows(torch.tensor([5, 6]), BatchKV(pool, [0, 1], caches, runner.ids), [PassSpec(), PassSpec()]).float()  # [2, V]
    for cache in caches:
        cache.rewind(1)
    alone_logits = torch.stack(
        [runner.forward_rows(torch.tensor([t]), BatchKV(pool, [i], [caches[i]], runner.ids), [PassSpec()])[0].float() for i, t in enumerate([5, 6])]
    )
    assert (together_logits - alone_logits).abs().max() <= 0.05 * alone_logits.abs().max()  # bf16: within 5% of the logit range


def test_the_batch_memory_is_planned_per_row(checkpoints):
    one = open_llm(checkpoints["olmoe"], gpu_memory=0.05, max_context=64)
    four = open_llm(checkpoints["olmoe"], gpu_memory=0.05, max_context=64, max_batch=4)
    assert four.plan.kv_bytes == 4 * one.plan.kv_bytes and four.plan.slots <= one.plan.slots
    assert "4 rows x 64 tokens" in four.plan.describe()


def test_the_governor_keeps_little_only_where_it_measured_cheaper():
    gov = LittleGovernor(explore_every=3)
    assert gov.little_pays(1) and bucket(5) == bucket(8) == 8
    assert gov.little_pays(8)  # no figure yet: try little first
    gov.observe(8, True, 2.0)
    assert not gov.little_pays(8)  # then big
    gov.observe(8, False, 1.0)
    assert not gov.little_pays(8)  # big measured cheaper
    gov.observe(8, False, 1.0)
    gov.observe(8, True, 0.1)  # little got cheap (mean 1.62 still above big's 1.0)
    assert not gov.little_pays(8)
    for _ in range(6):
        gov.observe(8, True, 0.1)
    assert gov.seconds[8, True] < 1.0 and gov.since_big[8] >= 3 and not gov.little_pays(8)  # cheaper, but big is due a re-measure
    gov.observe(8, False, 1.0)
    assert gov.little_pays(8) and gov.little_steps == 2 and gov.big_steps == 4
    assert LittleGovernor(enabled=False).little_pays(16)


def test_sixteen_concurrent_streams_each_equal_their_solo_output():
    llm = LLM(DEMO_MODEL, engine_config(progress=False, dtype="float32", max_batch=8))
    prompts = [f"def f{i}(x):" for i in range(16)]
    alone = [llm.decode(llm.generate(llm.encode(p), SamplingParams(max_new_tokens=6), PolicyConfig("big")).token_ids) for p in prompts]
    stop = alone[3].strip()[1:3]  # request 3 stops at a piece of its own continuation, mid-batch
    with serving(llm, max_batch=8) as (url, worker):

        def ask(i: int) -> str:
            body = {"prompt": prompts[i], "max_tokens": 6, "temperature": 0, "stream": True} | ({"stop": [stop]} if i == 3 else {})
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                return "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]")

        with ThreadPoolExecutor(max_workers=16) as pool:
            got = list(pool.map(ask, range(16)))
        assert got[3] == alone[3][: alone[3].index(stop)]
        assert got[:3] + got[4:] == alone[:3] + alone[4:]
        assert worker.batch.batched_steps > 0  # the streams did share steps


def test_sliding_window_layers_keep_a_bounded_ring_past_the_window(checkpoints):
    llm = batched_llm(checkpoints["gpt_oss"], max_context=64, expert_cache=12)  # window 4 in its sliding layers
    sampling, prompts = SamplingParams(max_new_tokens=40, stop_at_eos=False), PROMPTS[:3]
    policies = [PolicyConfig("big"), PolicyConfig("mobile", forced_fallback_rate=0.4), PolicyConfig("mobile", forced_fallback_rate=0.3, kv_repair=2)]
    whole = [llm.generate(p, sampling, pol) for p, pol in zip(prompts, policies)]  # every position kept (window + slack >= context)
    llm = batched_llm(checkpoints["gpt_oss"], max_context=64, expert_cache=12, options=RunnerOptions(kv_slack=8))  # a ring of 4 + 8 slots
    kv = llm.runner.new_kv(64)
    windows = llm.loaded.model.kv_windows()
    assert [t.shape[1] for t in kv.k] == [12 if w else 64 for w in windows] and None in windows
    ring = [llm.generate(p, sampling, pol) for p, pol in zip(prompts, policies)]
    together = llm.generate(prompts, sampling, policies)
    for a, b, c in zip(whole, ring, together):
        assert a.token_ids == b.token_ids == c.token_ids
        assert a.stats.fallback_tokens == b.stats.fallback_tokens == c.stats.fallback_tokens
    assert sum(r.stats.fallback_tokens for r in ring) > 0


def test_rows_roll_back_as_one_sequence_does_and_stream_only_final_tokens(checkpoints):
    """Rollback in a batch: a repaired row checks little's tokens as `generate` does; its callback sees only final tokens."""
    llm = batched_llm(checkpoints["qwen3_moe"], expert_cache=12)
    sampling = SamplingParams(max_new_tokens=16, stop_at_eos=False)
    policy = PolicyConfig("mobile", tau=middle_tau(llm, PROMPTS), criterion="max_prob", kv_repair=4, rollback=True)
    alone = [llm.generate(p, sampling, policy) for p in PROMPTS]
    streamed: dict[int, list[int]] = {}
    together = llm.generate(PROMPTS, sampling, policy, on_token=lambda i, t: streamed.setdefault(i, []).append(t) or True)
    assert sum(r.stats.rolled_back_tokens for r in together) > 0
    for i, (a, b) in enumerate(zip(alone, together)):
        assert a.token_ids == b.token_ids == streamed[i] and a.stats.rolled_back_tokens == b.stats.rolled_back_tokens
        assert [s.fell_back for s in a.steps] == [s.fell_back for s in b.steps]


class HostDataTensors(torch.overrides.TorchFunctionMode):
    """Records tensors made from host data (`torch.tensor`, `torch.as_tensor`) outside the transfer module: on CUDA each is a
    pageable copy that waits for the stream, an uncounted host sync (the transfer module stages them in pinned memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func in (torch.tensor, torch.as_tensor):
            caller = inspect.stack()[1]
            if not caller.filename.endswith("mobile_moe/experts/transfer.py"):
                self.made.append(f"{caller.filename}:{caller.lineno}")
        return func(*args, **(kwargs or {}))


def test_batched_steps_build_their_index_tensors_through_the_transfer_engine(checkpoints):
    """Row slots, row starts and the little-row mask of every batched step: no tensor from host data outside transfer."""
    llm = batched_llm(checkpoints["qwen3_moe"], rows=3, expert_cache=12)
    policies = [PolicyConfig(p) for p in ("big", "little", "big")]  # mixed big and little rows in one pass
    with HostDataTensors() as seen:
        llm.generate(PROMPTS[:3], SAMPLING, policies)
    assert not [where for where in seen.made if "/mobile_moe/" in where], seen.made


def test_batches_one_after_another_reuse_the_runners_pool_and_a_live_batch_keeps_its_own(checkpoints):
    llm = batched_llm(checkpoints["qwen3_moe"], expert_cache=12)
    first = llm.batch_decoder(4, 64)
    pool = first.pool
    second = llm.batch_decoder(2, 32)  # the first batch is still alive: its rows must not be overwritten
    assert second.pool is not pool
    del first, second
    again = llm.batch_decoder(3, 48)
    assert again.pool is pool and again.pool.k[0].data_ptr() == pool.k[0].data_ptr()  # lent again, not reallocated
    del again
    want = [r.token_ids for r in llm.generate(PROMPTS[:3], SAMPLING, PolicyConfig("mobile", tau=0.5))]
    held = llm.runner.held_pool
    assert [r.token_ids for r in llm.generate(PROMPTS[:3], SAMPLING, PolicyConfig("mobile", tau=0.5))] == want  # rows reused in place
    assert llm.runner.held_pool is held
