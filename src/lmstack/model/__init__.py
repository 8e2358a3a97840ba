"""Floor 1: the model. One ModelConfig; the Transformer (decoder-only) and the two types built
from its blocks, Encoder (BERT-style) and EncoderDecoder (T5-style); one loader for all three
(`from_pretrained`); a KV-cache protocol, checkpoints (safetensors) and Hugging Face interop
(`lmstack.model.hf`, imported on use)."""
from lmstack.model.cache import ContiguousKVCache, KVCache
from lmstack.model.config import PRESETS, ConfigError, ModelConfig
from lmstack.model.transformer import Block, Transformer
from lmstack.model.attention import EncoderMemory
from lmstack.model.encoder import Encoder
from lmstack.model.encoder_decoder import EncoderDecoder
from lmstack.model.auto import build_model, from_pretrained, model_class
from lmstack.model.replace import LinearTarget, find_linears, linear_roles, replace_linears
from lmstack.model.transforms import apply_transforms, get_transforms, record_transform, register_transform
from lmstack.model.lora import LoRALinear, inject_lora  # registers the "lora" transform
from lmstack.model.quantized import IntLinear, NF4Linear, QuantLinear  # registers the "quant" transform
from lmstack.model.heads import add_score_head  # registers the "score_head" transform
from lmstack.model.pruned import PruneError  # registers the "prune" transform (values only)

__all__ = ["ModelConfig", "ConfigError", "PRESETS", "Transformer", "Block", "KVCache", "ContiguousKVCache",
           "Encoder", "EncoderDecoder", "EncoderMemory", "build_model", "from_pretrained", "model_class",
           "LinearTarget", "find_linears", "linear_roles", "replace_linears", "apply_transforms", "get_transforms",
           "record_transform", "register_transform", "LoRALinear", "inject_lora",
           "QuantLinear", "IntLinear", "NF4Linear", "PruneError"]
