"""Export a run as a Hugging Face folder, quantized NF4 runs in bitsandbytes' own layout.

    export_hf_folder(model, "out/", tokenizer=tok)     # AutoModelForCausalLM.from_pretrained("out/")

A float run goes through model/hf.py's export_hf. An NF4 run (QLoRA's format, which our
NF4Linear stores bit for bit as bitsandbytes does) is written the way transformers saves a
`load_in_4bit` model, so transformers + bitsandbytes load it without re-quantizing:

    config.json  quantization_config: quant_method "bitsandbytes", load_in_4bit,
                 bnb_4bit_quant_type "nf4", bnb_4bit_use_double_quant, bnb_4bit_compute_dtype,
                 llm_int8_skip_modules (the linears left in float, lm_head always)
    <linear>.weight                              (rows * in / 2, 1) uint8 codes, two per byte
    <linear>.weight.absmax                       (n_blocks,) uint8 codes (double-quantized)
    <linear>.weight.nested_absmax                (ceil(n_blocks / 256),) float32
    <linear>.weight.quant_map / nested_quant_map (16,) NF4 / (256,) dynamic float32 tables
    <linear>.weight.quant_state.bitsandbytes__nf4  uint8 bytes of the JSON {quant_type,
                 blocksize, dtype, shape, nested_blocksize, nested_dtype, nested_offset}
(bitsandbytes' QuantState.as_dict(packed=True)). Our q|k|v and gate|up linears are split into
HF's q_proj, k_proj ... by rows. NF4 blocks lie inside a row, so each part keeps its codes;
the double-quantized absmax is shared in chunks of 256 blocks, so a part that starts on a
chunk boundary keeps its codes and chunk scales (and the whole linear's offset), and a part
that does not gets its absmax as the exact float32 values instead (a QuantState without
nesting, which bitsandbytes reads the same way). Either way each HF tensor dequantizes to
exactly the weight our module computes with. A quantized LM head is written in float.

Also written: tokenizer.json (our on-disk format is HF's) with a tokenizer_config.json, and
generation_config.json with the end-of-text id. The folder appears whole or not at all.
INT runs (rtn, gptq, awq) have no bitsandbytes layout: dequantize=True writes float weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from lmstack.model import Transformer
from lmstack.model.checkpoint import load_state
from lmstack.model.hf import config_to_hf, export_hf, iter_hf_names, pick_family
from lmstack.model.quant_formats import ABSMAX_BLOCK, DYNAMIC_MAP, NF4_CODE
from lmstack.model.quantized import NF4Linear
from lmstack.model.weights_io import write_safetensors
from lmstack.quant.export.weights import check_transforms, float_state, quant_modules
from lmstack.utils import LmstackError, atomic_dir, atomic_write_json

QS_KEY = "quant_state.bitsandbytes__nf4"


def bnb_nf4_part(m: NF4Linear, name: str, rows: tuple[int, int] | None, dtype: torch.dtype) -> dict[str, Tensor]:
    """The bitsandbytes tensors of rows [r0, r1) of an NF4 linear, saved as HF weight `name`."""
    out_f, in_f = m.base_linear_shape
    r0, r1 = rows or (0, out_f)
    per_row = in_f // m.blocksize
    b0, b1 = r0 * per_row, r1 * per_row                       # the part's absmax blocks
    state = {"quant_type": "nf4", "blocksize": m.blocksize, "dtype": str(dtype).removeprefix("torch."),
             "shape": [r1 - r0, in_f]}
    t = {name: m.weight[r0:r1].reshape(-1, 1).clone(), f"{name}.quant_map": NF4_CODE.clone()}
    if b0 % ABSMAX_BLOCK == 0:     # the part's absmax chunks are whole chunks of the linear's
        t[f"{name}.absmax"] = m.weight_absmax[b0:b1].clone()
        t[f"{name}.nested_absmax"] = m.weight_absmax_scale[b0 // ABSMAX_BLOCK:-(-b1 // ABSMAX_BLOCK)].float()
        t[f"{name}.nested_quant_map"] = DYNAMIC_MAP.clone()
        state.update(nested_blocksize=ABSMAX_BLOCK, nested_dtype="float32",
                     nested_offset=float(m.weight_absmax_offset))
    else:
        t[f"{name}.absmax"] = m.absmax()[b0:b1].clone()
    t[f"{name}.{QS_KEY}"] = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
    return {k: v.detach().contiguous().cpu() for k, v in t.items()}


def bnb_quantization_config(skip: list[str], double_quant: bool, dtype: torch.dtype) -> dict:
    """config.json's quantization_config, as transformers writes it for load_in_4bit NF4."""
    dt = str(dtype).removeprefix("torch.")
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": double_quant, "bnb_4bit_compute_dtype": dt,
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def nf4_state_to_hf(model: nn.Module, family: str) -> tuple[dict[str, Tensor], list[str]]:
    """HF-named tensors of an NF4 model (bitsandbytes layout) and the HF linears left in float."""
    cfg = model.config
    quant = quant_modules(model)
    dtype = _float_dtype(model)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out: dict[str, Tensor] = {}
    skip = ["lm_head"]
    for e in iter_hf_names(cfg, family):
        module, param = e.ours.rsplit(".", 1)
        m = quant.get(module)
        for p in e.parts:
            if m is not None and param == "weight" and module != "lm_head":
                out.update(bnb_nf4_part(m, p.name, p.rows, dtype))
                continue
            t = m.dequantize(dtype).detach().cpu() if m is not None and param == "weight" else sd[e.ours]
            out[p.name] = (t if p.rows is None else t[p.rows[0]:p.rows[1]]).contiguous()
            if param == "weight" and p.role is not None and module != "lm_head":
                skip.append(p.name.removesuffix(".weight"))       # a linear we did not quantize
    return out, skip


def _check_nf4(model: nn.Module, family: str, records: list[dict]) -> None:
    methods = sorted({r.get("method") for r in records})
    if methods != ["nf4"] or not all(isinstance(m, NF4Linear) for m in quant_modules(model).values()):
        raise LmstackError(f"Hugging Face export writes quantized runs in bitsandbytes' NF4 layout only; this run is "
                           f"quantized with {methods}. Pass dequantize=True (--dequantize) to write float weights, "
                           f"or export to GGUF (--format gguf --type q8_0|q4_0)")
    if family in ("gpt2", "mixtral"):
        why = "Conv1D linears" if family == "gpt2" else "stacked expert tensors, which bitsandbytes does not quantize"
        raise LmstackError(f"cannot write NF4 weights for Hugging Face {family} ({why}); pass dequantize=True "
                           f"(--dequantize) to write float weights")


def _float_copy(model: nn.Module) -> nn.Module:
    """A plain float Transformer holding the weights a quantized model computes with."""
    plain = Transformer(model.config)
    state = {k: v for k, v in float_state(model).items() if k in plain.state_dict()}
    load_state(plain, state, source="the dequantized model")
    return plain.to(_float_dtype(model)).eval()


def _tokenizer_files(folder: Path, tokenizer, eos: int | None, context_length: int) -> None:
    tokenizer.save(folder / "tokenizer.json")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length,
           "clean_up_tokenization_spaces": False}
    if eos is not None:   # GPT-2's convention: one end-of-text token is also the BOS
        text = tokenizer.decode([eos])
        cfg.update(bos_token=text, eos_token=text)
    atomic_write_json(folder / "tokenizer_config.json", cfg)


def check_output_folder(path: str | Path, overwrite: bool, fix: str = "choose another --out") -> Path:
    """Refuse an output folder that exists with files in it (unless `overwrite`), that is a
    file, or whose parent does not exist; nothing is created here."""
    path = Path(path)
    if not path.parent.is_dir():
        raise LmstackError(f"cannot write {path}: the folder {path.parent} does not exist (or is not a folder); {fix}")
    if path.exists() and not path.is_dir():
        raise LmstackError(f"cannot write the folder {path}: it is a file; {fix}")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise LmstackError(f"{path} exists and is not empty; pass overwrite=True (--overwrite) to replace it, or {fix}")
    return path


def export_hf_folder(model: nn.Module, path: str | Path, tokenizer=None, eos_token_id: int | None = None,
                     dequantize: bool = False, overwrite: bool = False, family: str | None = None) -> Path:
    """Write `model` (and `tokenizer`) as a Hugging Face folder that transformers loads: float
    runs as they are, NF4 runs in bitsandbytes' layout, other quantized runs with dequantize=True
    as float. `overwrite` replaces an existing non-empty folder (atomically, when complete)."""
    cfg = model.config
    records = [r for r in check_transforms(model, ("quant",), "Hugging Face export") if r.get("kind") == "quant"]
    family = family or pick_family(cfg)
    config_to_hf(cfg, family)                                 # raises if the family cannot express it
    if records and not dequantize:
        _check_nf4(model, family, records)
    path = check_output_folder(path, overwrite)
    eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eot_token", None)
    with atomic_dir(path) as tmp:
        if records and not dequantize:
            tensors, skip = nf4_state_to_hf(model, family)
            dtype = _float_dtype(model)
            hf_cfg = config_to_hf(cfg, family, dtype=str(dtype).removeprefix("torch."))
            hf_cfg["quantization_config"] = bnb_quantization_config(skip, True, dtype)
            write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
            atomic_write_json(tmp / "config.json", hf_cfg)
        else:
            export_hf(_float_copy(model) if records else model, tmp, family)
        if eos is not None:
            atomic_write_json(tmp / "generation_config.json", {"bos_token_id": eos, "eos_token_id": eos})
        if tokenizer is not None:
            _tokenizer_files(tmp, tokenizer, eos, cfg.context_length)
    return path
