"""Qwen1.5-MoE (qwen2_moe: qkv bias, sigmoid-gated shared expert) and Qwen3-MoE (per-head q/k norm)."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from mobile_moe.layers.attention import GQAAttention
from mobile_moe.layers.mlp import GatedMLP
from mobile_moe.layers.moe import MoEBlock, RouterSpec
from mobile_moe.models.assemble import assemble
from mobile_moe.models.common import head_dim, rotary_for
from mobile_moe.models.transformer import CausalLM


def _is_moe_layer(cfg: PretrainedConfig, i: int) -> bool:
    """Qwen's rule: sparse every decoder_sparse_step layers, except mlp_only_layers."""
    only_dense = getattr(cfg, "mlp_only_layers", None) or []
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return i not in only_dense and cfg.num_experts > 0 and (i + 1) % step == 0


def _build(cfg: PretrainedConfig, qwen3: bool) -> CausalLM:
    hd, hidden, act = head_dim(cfg), cfg.hidden_size, cfg.hidden_act
    spec = RouterSpec(num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok, renormalize=bool(cfg.norm_topk_prob))
    bias = bool(getattr(cfg, "attention_bias", False)) if qwen3 else bool(getattr(cfg, "qkv_bias", True))

    def attention(i: int) -> GQAAttention:
        return GQAAttention(
            i,
            hidden,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
            qkv_bias=bias,
            o_bias=bias and qwen3,
            qk_norm="head" if qwen3 else "none",
            eps=cfg.rms_norm_eps,
            clip_qkv=None,
        )

    def mlp(i: int) -> nn.Module:
        if not _is_moe_layer(cfg, i):
            return GatedMLP(hidden, cfg.intermediate_size, act)
        shared_size = 0 if qwen3 else getattr(cfg, "shared_expert_intermediate_size", 0)
        shared = GatedMLP(hidden, shared_size, act) if shared_size else None
        return MoEBlock(i, hidden, spec, shared, shared_gate=shared is not None)

    return assemble(cfg, attention, mlp, rotary_for(cfg, hd), spec, cfg.moe_intermediate_size)


def build_qwen2_moe(cfg: PretrainedConfig) -> CausalLM:
    """Qwen1.5-MoE-A2.7B family."""
    return _build(cfg, qwen3=False)


def build_qwen3_moe(cfg: PretrainedConfig) -> CausalLM:
    """Qwen3-30B-A3B family."""
    return _build(cfg, qwen3=True)
