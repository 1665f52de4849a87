"""GLM-4.5 (glm4_moe): GQA with partial rotary and optional q/k norm, DeepSeek-V3's sigmoid group router, shared experts."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from mobile_moe.layers.attention import GQAAttention
from mobile_moe.layers.mlp import GatedMLP
from mobile_moe.layers.moe import MoEBlock
from mobile_moe.models.assemble import assemble
from mobile_moe.models.common import head_dim, rotary_dim, rotary_for
from mobile_moe.models.deepseek import sigmoid_group_router
from mobile_moe.models.transformer import CausalLM


def build(cfg: PretrainedConfig) -> CausalLM:
    """GLM-4.5 / GLM-4.5-Air family."""
    hd, hidden, act = head_dim(cfg), cfg.hidden_size, cfg.hidden_act
    spec = sigmoid_group_router(cfg)
    rot = rotary_dim(cfg, hd)  # the first head_dim * partial_rotary_factor channels, half-split ("rotate_half") layout

    def attention(i: int) -> GQAAttention:
        return GQAAttention(
            i,
            hidden,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
            qkv_bias=bool(cfg.attention_bias),
            o_bias=False,
            qk_norm="head" if cfg.use_qk_norm else "none",
            eps=cfg.rms_norm_eps,
            clip_qkv=None,
            rotary_dim=rot,
        )

    def mlp(i: int) -> nn.Module:
        if i < cfg.first_k_dense_replace:
            return GatedMLP(hidden, cfg.intermediate_size, act)
        return MoEBlock(i, hidden, spec, GatedMLP(hidden, cfg.moe_intermediate_size * cfg.n_shared_experts, act), shared_gate=False)

    return assemble(cfg, attention, mlp, rotary_for(cfg, rot), spec, cfg.moe_intermediate_size)
