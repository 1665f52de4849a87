"""Helpers adapters share: rotary frequencies, context length, end-of-sequence ids."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from mobile_moe.errors import CheckpointError, UnsupportedArchitecture
from mobile_moe.layers.rotary import RotaryEmbedding

STATIC_ROPE_TYPES = ("default", "linear", "yarn", "llama3")


def require(cfg: PretrainedConfig, *names: str) -> None:
    """Raise CheckpointError naming the first field the adapter needs that config.json leaves null (transformers lets some be None)."""
    for name in names:
        if getattr(cfg, name, None) is None:
            raise CheckpointError(f"config.json ({cfg.model_type}) needs a value for {name!r}: it is missing or null")


def rope_parameters(cfg: PretrainedConfig) -> dict:
    """The config's rope parameters as a dict (rope_type, rope_theta, ...)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if "rope_theta" not in params:
        params = {**params, "rope_theta": getattr(cfg, "rope_theta", 10000.0)}
    return {"rope_type": "default", **params}


def rotary_for(cfg: PretrainedConfig, dim: int) -> RotaryEmbedding:
    """Rotary embedding over `dim` channels, for the rope types whose frequencies do not change with length."""
    params = rope_parameters(cfg)
    rope_type = params["rope_type"]
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedArchitecture(f"rope type {rope_type!r} is not supported (supported: {', '.join(STATIC_ROPE_TYPES)})")
    if rope_type == "default":
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))
        return RotaryEmbedding(inv_freq, 1.0)
    with torch.device("cpu"):  # models are built under a meta device; frequencies are real numbers (YaRN builds tensors inside)
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
    return RotaryEmbedding(inv_freq, float(scaling))


def rotary_dim(cfg: PretrainedConfig, head_dim: int) -> int:
    """Channels of a head that rotary rotates: head_dim times the rope's partial_rotary_factor (default 1)."""
    return int(head_dim * rope_parameters(cfg).get("partial_rotary_factor", 1.0))


def max_context(cfg: PretrainedConfig) -> int:
    """Longest sequence the engine will run: the model's positions, capped by an active sliding window.

    Up to the window length sliding-window attention equals full causal attention, so capping keeps
    the computation exact.
    """
    limit = int(cfg.max_position_embeddings)
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True):
        limit = min(limit, int(window))
    return limit


def eos_ids(cfg: PretrainedConfig) -> tuple[int, ...]:
    """End-of-sequence token ids of the config (none, one or several)."""
    eos = getattr(cfg, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def head_dim(cfg: PretrainedConfig) -> int:
    """Attention head width, explicit or hidden / heads."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
