"""Teacher feature caching and slide embedding (one Ray Data engine for both)."""

from fusedist.features.cache import CacheResult, run_cache
from fusedist.features.config import CacheConfig, EmbedConfig, EncoderRef, EngineConfig
from fusedist.features.embed import EmbedResult, run_embed

__all__ = ["CacheConfig", "CacheResult", "EmbedConfig", "EmbedResult", "EncoderRef",
           "EngineConfig", "run_cache", "run_embed"]
