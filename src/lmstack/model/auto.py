"""One loader for the three architecture types: a config's `arch` picks the model class.

    model = lmstack.model.from_pretrained("runs/t5")     # ours or a Hugging Face folder
    model = lmstack.model.build_model(cfg)               # a fresh model of cfg.arch

    arch               class            called as
    decoder            Transformer      model(ids) -> next-token logits
    encoder            Encoder          model(input_ids) -> masked-LM logits
    encoder-decoder    EncoderDecoder   model(input_ids, decoder_input_ids=...) -> the decoder's logits

Each class's own `from_pretrained` loads only its architecture type (loading an encoder-decoder
as `Transformer.from_pretrained` is an error naming `arch`); this one reads the config first.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmstack.model.checkpoint import FORMAT_KEY, read_config
from lmstack.model.config import ARCHS, ConfigError, ModelConfig
from lmstack.model.encoder import Encoder
from lmstack.model.encoder_decoder import EncoderDecoder
from lmstack.model.hf_config import config_from_hf
from lmstack.model.transformer import Transformer
from lmstack.utils import LmstackError

MODEL_CLASSES: dict[str, type[Transformer]] = {"decoder": Transformer, "encoder": Encoder,
                                               "encoder-decoder": EncoderDecoder}


def model_class(arch: str) -> type[Transformer]:
    """The class that builds models of `arch`."""
    if arch not in MODEL_CLASSES:
        raise ConfigError(f"arch={arch!r} is not valid; choose one of {list(ARCHS)}")
    return MODEL_CLASSES[arch]


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of the architecture type `cfg.arch` asks for."""
    return model_class(cfg.arch)(cfg)


def config_arch(path: str | Path) -> str:
    """The architecture type a checkpoint folder (ours or Hugging Face's) holds."""
    raw = read_config(path)
    if "model_type" in raw:
        return config_from_hf(raw, str(Path(path) / "config.json")).arch
    if FORMAT_KEY in raw:
        return raw.get("arch", "decoder")
    raise LmstackError(f"{Path(path) / 'config.json'} is neither an lmstack config (no {FORMAT_KEY!r}) nor a Hugging "
                       f"Face one (no 'model_type')")


def from_pretrained(path: str | Path, device: str | torch.device | None = None,
                    dtype: torch.dtype | str | None = None) -> nn.Module:
    """Load a checkpoint folder (ours or Hugging Face's) as the model its `arch` says, in eval mode."""
    return model_class(config_arch(path)).from_pretrained(path, device=device, dtype=dtype)
