"""Registry of supported architectures, keyed by the config's model_type."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from transformers import PretrainedConfig

from mobile_moe.errors import UnsupportedArchitecture
from mobile_moe.models import deepseek, ernie4_5_moe, glm4_moe, gpt_oss, mixtral, olmoe, qwen3_5_moe, qwen_moe
from mobile_moe.models.transformer import CausalLM

BUILDERS: Mapping[str, Callable[[PretrainedConfig], CausalLM]] = MappingProxyType(
    {
        "mixtral": mixtral.build,
        "qwen2_moe": qwen_moe.build_qwen2_moe,
        "qwen3_moe": qwen_moe.build_qwen3_moe,
        "olmoe": olmoe.build,
        "deepseek_v2": deepseek.build_v2,
        "deepseek_v3": deepseek.build_v3,
        "glm4_moe": glm4_moe.build,
        "ernie4_5_moe": ernie4_5_moe.build,
        "gpt_oss": gpt_oss.build,
        "qwen3_5_moe": qwen3_5_moe.build,
        "qwen3_5_moe_text": qwen3_5_moe.build,
    }
)
SUPPORTED = tuple(BUILDERS)


def check_supported(model_type: str | None, architectures: list[str] | None = None) -> None:
    """Raise UnsupportedArchitecture naming the supported ones unless model_type is implemented."""
    if model_type not in BUILDERS:
        named = model_type or (architectures or ["<none>"])[0]
        raise UnsupportedArchitecture(f"architecture {named!r} is not supported (supported model_type: {', '.join(SUPPORTED)})")


def build_model(cfg: PretrainedConfig) -> CausalLM:
    """Our runtime model for a supported config (parameters not yet loaded)."""
    check_supported(cfg.model_type)
    return BUILDERS[cfg.model_type](cfg)
