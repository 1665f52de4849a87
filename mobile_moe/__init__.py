"""mobile-moe: offloaded Mixture-of-Experts inference with MoBiLE big/little decoding."""

from mobile_moe.config import CacheConfig, EngineConfig, PolicyConfig, SamplingParams
from mobile_moe.engine.llm import LLM, engine_config
from mobile_moe.errors import MobileMoeError

__all__ = ["LLM", "CacheConfig", "EngineConfig", "PolicyConfig", "SamplingParams", "MobileMoeError", "engine_config"]
__version__ = "0.1.0"
