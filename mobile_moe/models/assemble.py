"""Builds a CausalLM from per-layer attention and MLP factories; adapters supply the factories."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from transformers import PretrainedConfig

from mobile_moe.layers.moe import MoEBlock, RouterSpec
from mobile_moe.layers.rotary import RotaryEmbedding
from mobile_moe.models.common import eos_ids, max_context
from mobile_moe.models.transformer import Backbone, CausalLM, DecoderLayer, ModelInfo


def assemble(
    cfg: PretrainedConfig,
    attention: Callable[[int], nn.Module],
    mlp: Callable[[int], nn.Module],
    rotary: RotaryEmbedding,
    spec: RouterSpec,
    expert_intermediate: int,
    head_bias: bool = False,
) -> CausalLM:
    """A CausalLM whose layer i uses attention(i) and mlp(i) (and an LM head with a bias if `head_bias`)."""
    hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
    layers = [DecoderLayer(attention(i), mlp(i), hidden, eps) for i in range(cfg.num_hidden_layers)]
    moe_layers = tuple(i for i, layer in enumerate(layers) if isinstance(layer.mlp, MoEBlock))
    info = ModelInfo(
        model_type=cfg.model_type,
        max_context=max_context(cfg),
        moe_layers=moe_layers,
        top_k=spec.top_k,
        num_experts=spec.num_experts,
        hidden=hidden,
        expert_intermediate=expert_intermediate,
        hidden_act=cfg.hidden_act,
        eos_token_ids=eos_ids(cfg),
    )
    return CausalLM(Backbone(cfg.vocab_size, hidden, layers, eps), cfg.vocab_size, rotary, info, head_bias)
