"""gpt-oss: attention sinks, alternating sliding-window / full layers, YaRN rotary, biased router and experts, clamped SwiGLU."""

from __future__ import annotations

from dataclasses import replace

from torch import nn
from transformers import PretrainedConfig

from mobile_moe.layers.attention import GQAAttention
from mobile_moe.layers.mlp import ClampedSwiGLU
from mobile_moe.layers.moe import MoEBlock, RouterSpec
from mobile_moe.models.assemble import assemble
from mobile_moe.models.common import head_dim, require, rotary_for
from mobile_moe.models.transformer import CausalLM

REQUIRED = ("num_key_value_heads", "num_local_experts", "num_experts_per_tok", "layer_types")


def router_spec(cfg: PretrainedConfig) -> RouterSpec:
    """Linear router with a bias; top-k of the logits, softmax over the selected k (so a kept prefix is renormalised)."""
    return RouterSpec(
        num_experts=cfg.num_local_experts,
        top_k=cfg.num_experts_per_tok,
        scoring="topk_softmax",
        renormalize=True,
        bias=True,
    )


def build(cfg: PretrainedConfig) -> CausalLM:
    """gpt-oss-20b / gpt-oss-120b."""
    require(cfg, *REQUIRED)
    hd, hidden, bias = head_dim(cfg), cfg.hidden_size, bool(getattr(cfg, "attention_bias", True))
    spec = router_spec(cfg)

    def attention(i: int) -> GQAAttention:
        window = cfg.sliding_window if cfg.layer_types[i] == "sliding_attention" else None
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
            sinks=True,
            sliding_window=window,
        )

    def mlp(i: int) -> nn.Module:
        return MoEBlock(i, hidden, spec, None, shared_gate=False)

    model = assemble(cfg, attention, mlp, rotary_for(cfg, hd), spec, cfg.intermediate_size)
    model.info = replace(
        model.info,
        max_context=int(cfg.max_position_embeddings),  # windows are applied per layer, so they do not cap the context
        hidden_act=ClampedSwiGLU(alpha=float(getattr(cfg, "swiglu_alpha", 1.702)), limit=float(cfg.swiglu_limit)),
        expert_bias=True,
        interleaved_experts=True,
    )
    return model
