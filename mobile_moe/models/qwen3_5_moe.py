"""Qwen3.5-MoE (qwen3_5_moe, qwen3_5_moe_text): Gated DeltaNet and gated full-attention layers, sigmoid-gated shared expert."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from mobile_moe.errors import CheckpointError
from mobile_moe.layers.attention import GQAAttention
from mobile_moe.layers.deltanet import DeltaNetDims, GatedDeltaNet
from mobile_moe.layers.mlp import GatedMLP
from mobile_moe.layers.moe import MoEBlock, RouterSpec
from mobile_moe.layers.norm import RMSNorm
from mobile_moe.models.assemble import assemble
from mobile_moe.models.common import head_dim, require, rotary_dim, rotary_for
from mobile_moe.models.transformer import CausalLM

LAYER_TYPES = ("linear_attention", "full_attention")


def layer_types(cfg: PretrainedConfig) -> list[str]:
    """The config's per-layer token mixers, checked to be known and one per layer."""
    types = list(cfg.layer_types or [])
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise CheckpointError(f"config.json layer_types has unsupported entry {unknown[0]!r} (supported: {', '.join(LAYER_TYPES)})")
    if len(types) != cfg.num_hidden_layers:
        raise CheckpointError(f"config.json layer_types has {len(types)} entries for {cfg.num_hidden_layers} layers")
    return types


def build(cfg: PretrainedConfig) -> CausalLM:
    """Qwen3.5-35B-A3B family; a full (vision-language) config contributes its text_config, the vision tower is not built."""
    cfg = cfg.get_text_config()
    require(cfg, "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "layer_types")
    types, hd, hidden, act = layer_types(cfg), head_dim(cfg), cfg.hidden_size, cfg.hidden_act
    spec = RouterSpec(num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok, renormalize=True)
    rot = rotary_dim(cfg, hd)  # text-only positions: the three mrope sections share one position, so plain half-layout rope
    delta = DeltaNetDims(
        hidden,
        cfg.linear_num_key_heads,
        cfg.linear_num_value_heads,
        cfg.linear_key_head_dim,
        cfg.linear_value_head_dim,
        cfg.linear_conv_kernel_dim,
    )

    def attention(i: int) -> nn.Module:
        if types[i] == "linear_attention":
            return GatedDeltaNet(i, delta, eps=cfg.rms_norm_eps, act=act)
        bias = bool(cfg.attention_bias)
        return GQAAttention(
            i,
            hidden,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
            qkv_bias=bias,
            o_bias=bias,
            qk_norm="head",
            eps=cfg.rms_norm_eps,
            clip_qkv=None,
            rotary_dim=rot,
            output_gate=True,
        )

    def mlp(i: int) -> nn.Module:
        return MoEBlock(i, hidden, spec, GatedMLP(hidden, cfg.shared_expert_intermediate_size, act), shared_gate=True)

    model = assemble(cfg, attention, mlp, rotary_for(cfg, rot), spec, cfg.moe_intermediate_size)
    for module in model.modules():
        if type(module) is RMSNorm:  # layer, final and q/k norms scale by (1 + weight)
            module.unit_offset = True
    return model
