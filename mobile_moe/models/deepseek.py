"""DeepSeek-V2 (softmax, greedy or group-limited routing) and V3 (sigmoid + correction bias, group top-k), both with MLA."""

from __future__ import annotations

import math

from torch import nn
from transformers import PretrainedConfig

from mobile_moe.layers.attention import MLADims, MLAttention
from mobile_moe.layers.mlp import GatedMLP
from mobile_moe.layers.moe import MoEBlock, RouterSpec
from mobile_moe.models.assemble import assemble
from mobile_moe.models.common import rope_parameters, rotary_for
from mobile_moe.models.transformer import CausalLM


def _attention_scale(cfg: PretrainedConfig) -> float:
    """Softmax scale: 1/sqrt(qk_head_dim), times YaRN's mscale squared when the rope asks for it."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    params = rope_parameters(cfg)
    mscale_all_dim = params.get("mscale_all_dim", 0)
    factor = params.get("factor", 1.0)
    if params["rope_type"] != "default" and mscale_all_dim and factor > 1:
        mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


def sigmoid_group_router(cfg: PretrainedConfig) -> RouterSpec:
    """DeepSeek-V3's router (GLM-4.5 uses the same): sigmoid + correction bias, top-2-sum group top-k, renormalised, scaled."""
    return RouterSpec(
        num_experts=cfg.n_routed_experts,
        top_k=cfg.num_experts_per_tok,
        scaling=float(cfg.routed_scaling_factor),
        logits_fp32=True,
        scoring="sigmoid",
        renormalize=bool(cfg.norm_topk_prob),
        renorm_eps=1e-20,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        group_score="top2_sum",
        correction_bias=True,
    )


def _router_spec(cfg: PretrainedConfig, v3: bool) -> RouterSpec:
    if v3:
        return sigmoid_group_router(cfg)
    grouped = cfg.topk_method == "group_limited_greedy"
    # transformers' DeepSeek-V2 never renormalises (norm_topk_prob is false in every released V2 checkpoint).
    return RouterSpec(
        num_experts=cfg.n_routed_experts,
        top_k=cfg.num_experts_per_tok,
        scaling=float(cfg.routed_scaling_factor),
        logits_fp32=True,
        scoring="softmax",
        n_group=cfg.n_group if grouped else 1,
        topk_group=cfg.topk_group if grouped else 1,
    )


def _build(cfg: PretrainedConfig, v3: bool) -> CausalLM:
    hidden, act, eps = cfg.hidden_size, cfg.hidden_act, cfg.rms_norm_eps
    spec = _router_spec(cfg, v3)
    dims = MLADims(hidden, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim)
    layout = "interleaved" if (not v3 or getattr(cfg, "rope_interleave", True)) else "half"
    scale, mlp_bias = _attention_scale(cfg), bool(getattr(cfg, "mlp_bias", False))

    def attention(i: int) -> MLAttention:
        return MLAttention(i, dims, bias=bool(cfg.attention_bias), eps=eps, scale=scale, rope_layout=layout)

    def mlp(i: int) -> nn.Module:
        if i < cfg.first_k_dense_replace:
            return GatedMLP(hidden, cfg.intermediate_size, act, bias=mlp_bias)
        n_shared = getattr(cfg, "n_shared_experts", 0) or 0
        shared = GatedMLP(hidden, cfg.moe_intermediate_size * n_shared, act, bias=mlp_bias) if n_shared else None
        return MoEBlock(i, hidden, spec, shared, shared_gate=False)

    return assemble(cfg, attention, mlp, rotary_for(cfg, cfg.qk_rope_head_dim), spec, cfg.moe_intermediate_size)


def build_v2(cfg: PretrainedConfig) -> CausalLM:
    """DeepSeek-V2 / V2-Lite."""
    return _build(cfg, v3=False)


def build_v3(cfg: PretrainedConfig) -> CausalLM:
    """DeepSeek-V3 family."""
    return _build(cfg, v3=True)
