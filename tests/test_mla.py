"""DeepSeek MLA: the absorbed path equals the decompress path, and decode no longer re-projects the KV cache."""

from __future__ import annotations

import pytest
import torch
from conftest import open_llm
from torch.utils.flop_counter import FlopCounterMode

from mobile_moe.engine.passes import PassSpec
from mobile_moe.layers.attention import AttentionInput, MLADims, MLAttention
from mobile_moe.layers.kv_cache import KVCache
from mobile_moe.layers.moe import ExpertMode

PROMPT = [5, 17, 33, 8, 61, 12]
DECODE = [40, 3, 77, 21]
ARCHS = ["deepseek_v2", "deepseek_v3"]


def mla_layers(llm) -> list[MLAttention]:
    """Every MLA module of the model."""
    return [m for m in llm.runner.model.modules() if isinstance(m, MLAttention)]


def run(llm, absorb: bool | None) -> torch.Tensor:
    """Prefill, decode a few tokens, rewind one, decode a different token and two more: [steps, V] logits."""
    for m in mla_layers(llm):
        m.absorb = absorb
    runner = llm.runner
    kv = runner.new_kv(len(PROMPT) + len(DECODE) + 3)
    got = [runner.forward(torch.tensor(PROMPT), kv, PassSpec(ExpertMode.BIG))]
    got += [runner.forward(torch.tensor([t]), kv, PassSpec(ExpertMode.BIG)) for t in DECODE]
    kv.rewind(1)
    got += [runner.forward(torch.tensor([t]), kv, PassSpec(ExpertMode.BIG)) for t in (9, 50, 2)]
    for m in mla_layers(llm):
        m.absorb = None
    return torch.stack(got)


@pytest.mark.parametrize("arch", ARCHS)
def test_absorbed_matches_decompressed_with_rewind(checkpoints, arch):
    llm = open_llm(checkpoints[arch], expert_cache=6)
    assert mla_layers(llm)
    decompressed = run(llm, False)
    torch.testing.assert_close(run(llm, True), decompressed, atol=1e-5, rtol=0)  # absorbed prefill (masked) too
    torch.testing.assert_close(run(llm, None), decompressed, atol=1e-5, rtol=0)  # automatic choice


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_never_applies_kv_b_proj(checkpoints, arch):
    """By default prefill decompresses (T rows through kv_b_proj), decode steps absorb (no rows)."""
    llm = open_llm(checkpoints[arch], expert_cache=6)
    rows: list[int] = []
    hooks = [m.kv_b_proj.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0])) for m in mla_layers(llm)]
    try:
        kv = llm.runner.new_kv(len(PROMPT) + len(DECODE))
        llm.runner.forward(torch.tensor(PROMPT), kv, PassSpec(ExpertMode.BIG))
        assert rows == [len(PROMPT)] * len(hooks)
        rows.clear()
        for t in DECODE:
            llm.runner.forward(torch.tensor([t]), kv, PassSpec(ExpertMode.BIG))
        assert rows == []
    finally:
        for h in hooks:
            h.remove()


DIMS = MLADims(hidden=64, heads=8, q_lora_rank=48, kv_lora_rank=64, qk_nope_dim=32, qk_rope_dim=16, v_dim=32)


def decode_flops(layer: MLAttention, context: int) -> int:
    """FLOPs of one decode step of `layer` whose cache already holds context - 1 positions."""
    d = layer.d
    kv = KVCache([(1, d.kv_lora_rank)], [(1, d.qk_rope_dim)], context, torch.device("cpu"), torch.float32)
    kv.k[0].normal_()
    kv.v[0].normal_()
    kv.length = context - 1
    cos, sin = torch.ones(1, d.qk_rope_dim // 2), torch.zeros(1, d.qk_rope_dim // 2)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(torch.randn(1, d.hidden), AttentionInput(cos=cos, sin=sin, mask=None), kv.layer(0))
    return counter.get_total_flops()


def test_decode_flops_grow_only_by_attention():
    torch.manual_seed(0)
    layer = MLAttention(0, DIMS, bias=False, eps=1e-6, scale=0.1, rope_layout="interleaved")
    d, dS = DIMS, 256 - 16
    attention = 2 * d.heads * dS * (d.kv_lora_rank + d.qk_rope_dim) + 2 * d.heads * dS * d.kv_lora_rank
    reprojection = 2 * dS * d.kv_lora_rank * d.heads * (d.qk_nope_dim + d.v_dim)
    assert decode_flops(layer, 256) - decode_flops(layer, 16) <= attention
    layer.absorb = False  # the old path: re-projects every cached latent each step
    assert decode_flops(layer, 256) - decode_flops(layer, 16) >= reprojection
