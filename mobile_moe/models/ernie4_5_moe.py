"""ERNIE-4.5-MoE: interleaved rotary, softmax router with a selection-only correction bias, clamped renormalisation, shared experts."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from mobile_moe.layers.attention import GQAAttention
from mobile_moe.layers.mlp import GatedMLP
from mobile_moe.layers.moe import MoEBlock, RouterSpec
from mobile_moe.models.assemble import assemble
from mobile_moe.models.common import head_dim, require, rotary_for
from mobile_moe.models.transformer import CausalLM

# Fields the config class types `int | None` but the model cannot run without.
REQUIRED = ("num_key_value_heads", "moe_num_experts", "moe_k", "moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval", "moe_norm_min")


def _is_moe_layer(cfg: PretrainedConfig, i: int) -> bool:
    """ERNIE's rule: every moe_layer_interval-th layer from moe_layer_start_index to moe_layer_end_index (inclusive)."""
    return (i + 1) % cfg.moe_layer_interval == 0 and cfg.moe_layer_start_index <= i <= cfg.moe_layer_end_index


def router_spec(cfg: PretrainedConfig) -> RouterSpec:
    """Softmax in float32; top-k of softmax + correction bias; the softmax values renormalised by max(sum, moe_norm_min)."""
    return RouterSpec(
        num_experts=cfg.moe_num_experts,
        top_k=cfg.moe_k,
        scoring="softmax",
        renormalize=True,
        renorm_min=float(cfg.moe_norm_min),
        correction_bias=True,
        logits_fp32=True,
    )


def build(cfg: PretrainedConfig) -> CausalLM:
    """ERNIE-4.5-21B-A3B family (and ERNIE-4.5-300B-A47B)."""
    require(cfg, *REQUIRED)
    hd, hidden, act, bias = head_dim(cfg), cfg.hidden_size, cfg.hidden_act, bool(cfg.use_bias)
    spec = router_spec(cfg)

    def attention(i: int) -> GQAAttention:
        return GQAAttention(
            i,
            hidden,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
            qkv_bias=bias,
            o_bias=bias,
            qk_norm="none",
            eps=cfg.rms_norm_eps,
            clip_qkv=None,
            rope_layout="interleaved",
            rope_fp32=True,
        )

    def mlp(i: int) -> nn.Module:
        if not _is_moe_layer(cfg, i):
            return GatedMLP(hidden, cfg.intermediate_size, act, bias=bias)
        n_shared = cfg.moe_num_shared_experts or 0
        shared = GatedMLP(hidden, cfg.moe_intermediate_size * n_shared, act, bias=bias) if n_shared else None
        return MoEBlock(i, hidden, spec, shared, shared_gate=False)

    return assemble(cfg, attention, mlp, rotary_for(cfg, hd), spec, cfg.moe_intermediate_size, head_bias=bias)
