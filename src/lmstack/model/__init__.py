"""Floor 1: the model. One ModelConfig, one Transformer, a KV-cache protocol, checkpoints
(safetensors) and Hugging Face interop (`lmstack.model.hf`, imported on use)."""
from lmstack.model.cache import ContiguousKVCache, KVCache
from lmstack.model.config import PRESETS, ConfigError, ModelConfig
from lmstack.model.transformer import Block, Transformer

__all__ = ["ModelConfig", "ConfigError", "PRESETS", "Transformer", "Block", "KVCache", "ContiguousKVCache"]
