"""Hugging Face interop: convert transformers checkpoints to our Transformer and back.

    model = Transformer.from_pretrained("path/to/hf_folder")   # auto-detected (same as load_hf)
    model = lmstack.model.from_pretrained("bert_or_t5_folder") # any of the three architecture types
    model = from_hf(hf_model)                                  # an in-memory transformers model
    export_hf(model, "out_dir")                                # transformers' from_pretrained loads it
    hf_name_table(cfg, "llama"), hf_module_name(cfg, "blocks.3.attn.qkv", "q")   # the names, for PEFT/GGUF

Families: gpt2, llama, qwen2, qwen3 (QK-norm), mistral, mixtral (decoder-only, loaded as a
Transformer); bert (BertForMaskedLM, as an Encoder); t5 (T5ForConditionalGeneration, t5 and
t5-v1.1, as an EncoderDecoder). The pieces live below the
model, so that checkpoint.py can read a HF folder without importing the Transformer:
config.json <-> ModelConfig in hf_config.py, the one name table per family (HF <-> our
tensor names, fused q|k|v and gate|up row slices, GPT-2's transposed Conv1D) in
hf_names.py, safe file reading in weights_io.py. This file builds Transformers from them.
Only safetensors weights are read (pytorch_model.bin would need unpickling: refused).
"""
from __future__ import annotations

from pathlib import Path

from lmstack.model.auto import build_model, model_class
from lmstack.model.checkpoint import check_declared_sizes, load_hf_folder, load_state, read_config
from lmstack.model.hf_config import FAMILIES, check_exportable, config_from_hf, config_to_hf, pick_family
from lmstack.model.hf_names import HFPart, NameEntry, hf_module_name, hf_name_table, iter_hf_names, \
    normalize_hf_names, state_from_hf, state_to_hf, t5_untied_if_stored
from lmstack.model.transformer import Transformer
from lmstack.model.weights_io import write_safetensors
from lmstack.utils import atomic_write_json

__all__ = ["FAMILIES", "HFPart", "NameEntry", "check_exportable", "config_from_hf", "config_to_hf", "export_hf",
           "from_hf", "hf_module_name", "hf_name_table", "iter_hf_names", "load_hf", "pick_family",
           "state_from_hf", "state_to_hf"]


def load_hf(path: str | Path) -> Transformer:
    """A Hugging Face model folder -> our model of its architecture type (a Transformer, an
    Encoder for bert, an EncoderDecoder for t5), in the dtype the weights are stored in.
    Sizes in config.json are checked against the safetensors headers before anything is built."""
    raw = read_config(path)
    return load_hf_folder(path, model_class(config_from_hf(raw, str(Path(path) / "config.json")).arch), raw)


def from_hf(hf_model) -> Transformer:
    """An in-memory transformers model -> our model of its type (same dtype as its weights)."""
    hf = hf_model.config.to_dict()
    source = f"{type(hf_model).__name__}.config"
    cfg = config_from_hf(hf, source)
    family = hf["model_type"]
    tensors = normalize_hf_names(family, dict(hf_model.state_dict()))
    if family == "t5":   # in memory a tied head is the embedding itself; an untied one is not
        head, emb = hf_model.get_output_embeddings().weight, hf_model.get_input_embeddings().weight
        cfg = t5_untied_if_stored(cfg, family, set() if head is emb else {"lm_head.weight"})
    check_declared_sizes(cfg, {k: tuple(v.shape) for k, v in tensors.items()}, family, type(hf_model).__name__,
                         source)
    model = build_model(cfg)
    load_state(model, state_from_hf(cfg, family, tensors, type(hf_model).__name__), source="HF model")
    return model.to(next(hf_model.parameters()).dtype)


def export_hf(model, path: str | Path, family: str | None = None) -> Path:
    """Write `model` as a Hugging Face folder (config.json + model.safetensors) that
    transformers loads (AutoModelForCausalLM, AutoModelForMaskedLM for bert,
    AutoModelForSeq2SeqLM for t5). Other files in `path` are kept."""
    path = Path(path)
    cfg = model.config
    family = family or pick_family(cfg)
    dtype = next(model.parameters()).dtype  # written as the model holds it
    hf_cfg = config_to_hf(cfg, family, dtype=str(dtype).removeprefix("torch."))
    write_safetensors(path / "model.safetensors", state_to_hf(model, family), {"format": "pt"})
    atomic_write_json(path / "config.json", hf_cfg)
    return path
