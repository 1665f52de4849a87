"""Mixtral: GQA attention, softmax top-k router with renormalised weights, no shared experts."""

from __future__ import annotations

from transformers import PretrainedConfig

from mobile_moe.layers.attention import GQAAttention
from mobile_moe.layers.moe import MoEBlock, RouterSpec
from mobile_moe.models.assemble import assemble
from mobile_moe.models.common import head_dim, rotary_for
from mobile_moe.models.transformer import CausalLM


def build(cfg: PretrainedConfig) -> CausalLM:
    """Mixtral-8x7B family."""
    hd, hidden = head_dim(cfg), cfg.hidden_size
    spec = RouterSpec(num_experts=cfg.num_local_experts, top_k=cfg.num_experts_per_tok, renormalize=True)

    def attention(i: int) -> GQAAttention:
        return GQAAttention(
            i,
            hidden,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
            qkv_bias=False,
            o_bias=False,
            qk_norm="none",
            eps=cfg.rms_norm_eps,
            clip_qkv=None,
        )

    return assemble(cfg, attention, lambda i: MoEBlock(i, hidden, spec, None, False), rotary_for(cfg, hd), spec, cfg.intermediate_size)
