"""The cost model's per-layer timeline on hand-made traces, its measured inputs, and the hardware profiles' constants."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mobile_moe import LLM, engine_config
from mobile_moe.bench.costinputs import LaunchCounter, count_decode_ops, model_cost, swiglu_expert_launches
from mobile_moe.bench.costmodel import Link, ModelCost, predict
from mobile_moe.bench.profiles import PROFILES, HardwareProfile
from mobile_moe.bench.synthetic import build_synthetic, full_size_cost, synthetic_config
from mobile_moe.experts.formats import Int4Format
from mobile_moe.experts.trace import Access
from mobile_moe.models.registry import build_model

MS = 1e-3
# 1 GB/s link and 1e6-byte experts: one copy takes exactly 1 ms; no launch, sync or per-copy costs.
HW = HardwareProfile("test", link_gbps=1.0, mem_gbps=1000.0, launch_us=0.0, sync_us=0.0, copy_latency_us=0.0)
EXPERT = 10**6


def cost(layer_bytes: tuple[int, ...] = (10**6,) * 4, **kw) -> ModelCost:
    """4 layers, each reading 1e6 dense bytes in 1 us at 1000 GB/s; expert compute 1 us; no launches or syncs."""
    zero = dict(launches_per_layer=0, launches_per_moe_layer=0, launches_per_expert=0, launches_per_pass=0, syncs_per_moe_layer=0, syncs_per_pass=0)
    return ModelCost(len(layer_bytes), sum(layer_bytes), EXPERT, layer_bytes=layer_bytes, **{**zero, **kw})


def demand(pass_id: int, layer: int, expert: int, step: int = 1) -> Access:
    return Access(step, pass_id, "big", layer, expert, False, "demand")


def prefetch(pass_id: int, layer: int, expert: int, step: int = 1) -> Access:
    return Access(step, pass_id, "big", layer, expert, False, "prefetch")


WARM = [demand(1, layer, 0, step=0) for layer in range(4)]  # prefill: expert 0 of every layer resident


def test_layer0_miss_stalls_for_the_whole_copy_despite_later_compute():
    heavy = cost((10**6, 10**9, 10**9, 10**9))  # layers 1-3 compute 1 ms each: nothing hides layer 0's copy
    p = predict(WARM + [demand(2, 0, 5)] + [demand(2, layer, 0) for layer in (1, 2, 3)], heavy, HW, 16)
    assert p.stall_s == pytest.approx(1 * MS)
    assert p.decode_s == pytest.approx(4 * MS + 5e-6)  # 3 ms of later compute + the whole 1 ms stall + 5 us


def test_fallback_prefetch_for_layer0_hides_behind_nothing():
    little = [demand(2, layer, 0) for layer in range(4)] + [prefetch(2, 0, 5)]  # prefetch issued after the little pass
    big = [demand(3, 0, 0), demand(3, 0, 5)] + [demand(3, layer, 0) for layer in (1, 2, 3)]
    p = predict(WARM + little + big, cost((10**6, 10**9, 10**9, 10**9)), HW, 16)
    assert p.stall_s == pytest.approx(1 * MS - 1e-6)  # issued at the big pass's start, needed after 1 us
    assert p.steps == 1


def test_prefetches_queue_behind_each_other():
    link = Link(copy_s=1.0)
    copies = [link.issue(0.0, demand=False) for _ in range(3)]
    assert [link.arrival(c) for c in copies] == [1.0, 2.0, 3.0]
    one = predict(WARM + [demand(2, 0, 0), prefetch(2, 3, 9)] + [demand(3, layer, 0) for layer in range(3)] + [demand(3, 3, 9)], cost(), HW, 16)
    four_trace = [demand(2, 0, 0)] + [prefetch(2, layer, 9) for layer in range(4)]
    four_trace += [x for layer in range(4) for x in (demand(3, layer, 0), demand(3, layer, 9))]
    four = predict(WARM + four_trace, cost(), HW, 16)
    assert one.stall_s == pytest.approx(1 * MS - 7e-6)  # needed after 3 layers and a router: 7 us
    assert four.stall_s == pytest.approx(4 * MS - 10e-6)  # layer 3's copy went fourth


def test_demand_waits_only_for_the_copy_in_flight():
    link = Link(copy_s=1.0)
    queued = [link.issue(0.0, demand=False) for _ in range(5)]
    urgent = link.issue(0.5, demand=True)
    assert link.arrival(urgent) == 2.0  # after the prefetch already on the link, before the other four
    assert link.arrival(queued[1]) == 3.0
    prefetches = [prefetch(2, 3, e) for e in range(10, 18)]  # 8 ms of prefetches for layer 3, issued first
    big = [demand(3, 0, 5)] + [demand(3, layer, 0) for layer in (1, 2, 3)]
    p = predict(WARM + [demand(2, layer, 0) for layer in range(4)] + prefetches + big, cost(), HW, 64)
    assert p.stall_s == pytest.approx(2 * MS - 1e-6)  # not 9 ms


def test_lookahead_prefetch_hides_behind_one_layer():
    heavy = cost((10**6, 2 * 10**9, 10**6, 10**6))  # layer 1 computes 2 ms: a copy for layer 1 issued at layer 0 hides
    plain = WARM + [demand(2, 0, 0), demand(2, 1, 7), demand(2, 2, 0), demand(2, 3, 0)]
    ahead = WARM + [prefetch(2, 1, 7), demand(2, 0, 0), demand(2, 1, 7), demand(2, 2, 0), demand(2, 3, 0)]
    assert predict(plain, heavy, HW, 16).stall_s == pytest.approx(1 * MS)
    assert predict(ahead, heavy, HW, 16).stall_s == 0.0


def test_embedding_table_does_not_change_speed():
    trace = WARM + [demand(2, 0, 5)] + [demand(2, layer, 0) for layer in (1, 2, 3)]
    base = ModelCost(4, 4 * 10**6, EXPERT)
    with_table = ModelCost(4, 4 * 10**6 + 10**9, EXPERT, embedding_bytes=10**9)
    assert predict(trace, with_table, PROFILES["rtx4090"], 16) == predict(trace, base, PROFILES["rtx4090"], 16)
    read_per_token = ModelCost(4, 4 * 10**6 + 10**9, EXPERT)  # the old accounting: the whole table read every token
    assert predict(trace, read_per_token, PROFILES["rtx4090"], 16).tok_s < predict(trace, base, PROFILES["rtx4090"], 16).tok_s


def test_predictions_move_with_link_and_memory_bandwidth():
    trace = WARM + [x for step in range(1, 6) for x in (demand(step + 1, 0, step), *(demand(step + 1, layer, 0) for layer in (1, 2, 3)))]
    speeds = [predict(trace, cost(), replace(HW, link_gbps=gbps), 16).tok_s for gbps in (0.5, 1.0, 2.0, 4.0)]
    assert speeds == sorted(speeds) and speeds[0] < speeds[-1]
    slow_memory = replace(HW, mem_gbps=1.0)
    assert predict(trace, cost(), slow_memory, 16).tok_s < predict(trace, cost(), HW, 16).tok_s


def test_launches_and_syncs_are_charged_from_counts():
    trace = WARM + [demand(2, layer, 0) for layer in range(4)]  # all hits: compute only
    hw = replace(HW, launch_us=10.0, sync_us=20.0)
    c = cost(launches_per_layer=3, launches_per_moe_layer=2, launches_per_expert=1, launches_per_pass=5, syncs_per_moe_layer=1, syncs_per_pass=1)
    per_layer = 1e-6 + 3 * 10e-6 + 20e-6 + 2 * 10e-6 + (1e-6 + 10e-6)  # dense, launches, router sync, expert call
    assert predict(trace, c, hw, 16).decode_s == pytest.approx(4 * per_layer + 5 * 10e-6 + 20e-6)


def test_h200_profile_reproduces_the_calibrated_copy_times():
    """The H200 copies of docs/design.md §8, pinned [GB/s, ms per copy] of expert-sized buffers."""
    h200 = PROFILES["h200"]
    for nbytes, ms in ((9437184, 0.174), (12582912, 0.231), (17301504, 0.316), (352321536, 6.366)):
        assert nbytes / (h200.link_gbps * 1e9) + h200.copy_latency_us * 1e-6 == pytest.approx(ms * MS, rel=0.01)
    assert all(p.source and p.source != "assumed" for p in PROFILES.values())


def test_launch_cost_is_the_calibrated_expert_time_over_its_kernels():
    launches = swiglu_expert_launches()
    assert launches == 5  # gate, up, down linears, silu, mul
    h200 = PROFILES["h200"]
    olmoe_expert = launches * h200.launch_us + 12582912 / (h200.mem_gbps * 1e9) * 1e6
    assert olmoe_expert == pytest.approx(77.4, rel=0.05)  # expert_ffn_us["olmoe"]


def test_launch_counter_counts_casts_but_not_views_or_no_op_casts():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with torch.inference_mode(), LaunchCounter() as counter:
        y = x.float()  # a cast: a kernel
        x.to(torch.bfloat16)  # already bf16: returns x itself, no kernel
        y.view(8, 4).transpose(0, 1)  # views: no kernel
        torch.nn.functional.rms_norm(y, (8,)).to(x.dtype)  # the norm and its cast back
    assert counter.counts["pass"] == 3


def test_count_decode_ops_and_model_cost_on_a_small_model():
    loaded = build_synthetic("qwen3-30b-a3b", torch.device("cpu"), shrink=16)
    llm = LLM(loaded, engine_config(expert_cache=16, progress=False))
    ops = count_decode_ops(llm)
    assert ops.per_layer > 10 and ops.per_moe_layer > 0 and ops.per_expert >= 1 and ops.per_pass > 0
    c = model_cost(loaded.model, loaded.store.expert_bytes, ops)
    assert c.launches_per_layer == ops.per_layer and len(c.layer_bytes) == c.num_layers == 48
    head = loaded.model.lm_head.weight
    assert c.embedding_bytes == head.numel() * head.element_size()  # same shape as the (untied) embedding table
    assert c.tail_reads() >= head.numel() * head.element_size()  # the LM head is read in full every token


def test_full_size_meta_model_cost():
    with torch.device("meta"):
        model = build_model(synthetic_config("olmoe-1b-7b"))
    c = model_cost(model, 12582912, bytes_per_param=2)
    assert c.embedding_bytes == 2 * 50304 * 2048
    assert c.tail_reads() == 2 * (50304 * 2048 + 2048 + 64)  # LM head, final norm, rotary frequencies
    assert c.dense_bytes - c.embedding_bytes - c.tail_reads() == sum(c.layer_bytes)


def test_packed_experts_cost_their_packed_bytes_plus_dequantization():
    bf16 = full_size_cost("qwen3-30b-a3b")
    int4 = full_size_cost("qwen3-30b-a3b", Int4Format(64))
    numel = 3 * 2048 * 768
    assert bf16.expert_bytes == 2 * numel and bf16.dequant_bytes == 0
    assert int4.expert_bytes == numel // 2 + 2 * 2 * (numel // 64)  # codes + float16 scale and zero per group of 64
    assert int4.dequant_bytes == 2 * 2 * numel  # bf16 weights written once, read once by the matmuls
    trace = WARM + [demand(2, layer, 1) for layer in range(4)]  # every layer misses once: transfer-bound
    slow_link = replace(HW, link_gbps=0.1)
    assert predict(trace, int4, slow_link, 8).tok_s > 3 * predict(trace, bf16, slow_link, 8).tok_s
    fast_link_slow_memory = replace(HW, link_gbps=1e6, mem_gbps=1.0)  # where dequantizing costs more than it saves
    assert predict(trace, int4, fast_link_slow_memory, 8).tok_s < predict(trace, bf16, fast_link_slow_memory, 8).tok_s
