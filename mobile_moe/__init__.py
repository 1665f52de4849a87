"""mobile-moe: offloaded Mixture-of-Experts inference with MoBiLE big/little decoding."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mobile_moe.config import CacheConfig, EngineConfig, PolicyConfig, SamplingParams
from mobile_moe.errors import MobileMoeError

if TYPE_CHECKING:
    from mobile_moe.engine.llm import LLM, engine_config

__all__ = ["LLM", "CacheConfig", "EngineConfig", "PolicyConfig", "SamplingParams", "MobileMoeError", "engine_config"]
__version__ = "0.1.0"
LAZY = ("LLM", "engine_config")  # they load torch: imported on first use, so `mobile-moe --version` answers at once


def __getattr__(name: str) -> object:
    """`mobile_moe.LLM` and `mobile_moe.engine_config`, imported when first asked for."""
    if name in LAZY:
        from mobile_moe.engine import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'mobile_moe' has no attribute {name!r}")
