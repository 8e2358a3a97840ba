"""Model folders on disk: ours (written by save_pretrained) and Hugging Face's, read safely.

Our folder:  model.safetensors   every parameter (a tied LM head is stored once, as wte)
             config.json         {"lmstack_format": 1, ...ModelConfig fields, "transforms": [...]}
A Hugging Face folder is told apart by `model_type` in its config.json; its weights are one
model.safetensors or shards named by model.safetensors.index.json.

A file is not trusted for its sizes. Before anything is allocated, the sizes config.json
declares (n_layer, vocab_size, n_embd, heads, context ...) are compared with the shapes in
the safetensors headers (read alone, see weights_io.py) through the name table
(hf_names.py), and the memory the load needs with the memory available. A mismatch names
the file, the field, the declared value and what the weights hold.

This module sits below the Transformer: it builds whatever model class it is given
(`Transformer.from_pretrained` passes itself), so no import points back up.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import Tensor

from lmstack.model.config import ConfigError, ModelConfig, check_arch
from lmstack.model.hf_config import config_from_hf, hf_field_names
from lmstack.model.hf_names import has_fused_experts, iter_hf_names, layer_prefix, normalize_hf_names, \
    state_from_hf, stored_tensors, t5_untied_if_stored
from lmstack.model.transforms import apply_transforms, check_record, get_transforms, transform_file
from lmstack.model.weights_io import check_memory, hf_weight_files, read_header, read_headers, read_json, \
    read_safetensors, write_safetensors
from lmstack.utils import LmstackError, atomic_write_json, pick_device, pick_dtype

FORMAT_KEY = "lmstack_format"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class SizeError(LmstackError, ValueError):
    """A config whose declared sizes the weights (or the machine's memory) do not bear out."""


# ---- writing ---------------------------------------------------------------------------------
def state_for_saving(model) -> dict[str, Tensor]:
    """The model's tensors keyed by name, without the tied LM head (it is `wte.weight`)."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_pretrained(model, path: str | Path) -> None:
    path = Path(path)
    write_safetensors(path / WEIGHTS, state_for_saving(model), {"format": "pt", FORMAT_KEY: str(FORMAT_VERSION)})
    record = {FORMAT_KEY: FORMAT_VERSION, **model.config.to_dict()}
    transforms = get_transforms(model)
    if transforms:  # a transformed model: loading rebuilds these before reading the weights
        record["transforms"] = transforms
    atomic_write_json(path / CONFIG, record)


# ---- reading ---------------------------------------------------------------------------------
def read_config(path: str | Path) -> dict:
    path = Path(path)
    f = path / CONFIG if path.is_dir() else path
    if not f.exists():
        raise LmstackError(f"no {CONFIG} in {path}; expected a folder written by save_pretrained or a "
                           f"Hugging Face model folder")
    return read_json(f, "model config")


def load_pretrained(path: str | Path, model_cls, device=None, dtype=None):
    """Our folder or a HF folder -> `model_cls(cfg)` with the weights, on `device` in `dtype`
    (None = as stored), in eval mode."""
    path = Path(path)
    raw = read_config(path)
    if "model_type" in raw:
        model = load_hf_folder(path, model_cls, raw)
    elif FORMAT_KEY in raw:
        model = _load_ours(path, model_cls, raw)
    else:
        raise LmstackError(f"{path / CONFIG} is neither an lmstack config (no {FORMAT_KEY!r}) nor a Hugging "
                           f"Face one (no 'model_type')")
    return _place(model, device, dtype)


def _load_ours(path: Path, model_cls, raw: dict):
    source = str(path / CONFIG)
    if raw[FORMAT_KEY] != FORMAT_VERSION:
        raise LmstackError(f"{source} has {FORMAT_KEY}={raw[FORMAT_KEY]}; this lmstack reads version {FORMAT_VERSION}")
    records = raw.get("transforms")
    try:
        cfg = ModelConfig.from_dict({k: v for k, v in raw.items() if k not in (FORMAT_KEY, "transforms")})
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    _check_class(cfg, model_cls, source)
    # a transform may keep extra tensors in a file of its own (its names are checked by load_state)
    extra = []
    for i, rec in enumerate(records if isinstance(records, list) else []):
        check_record(rec, f"{source} transforms[{i}]")
        if "file" in rec:
            extra.append(transform_file(path, rec, source))
    header = read_header(path / WEIGHTS)
    for f in extra:
        header.update(read_header(f))
    # a transform may replace a linear by one whose tensors have other shapes (a packed
    # quantized weight): then only the linears' names are checked here, shapes after rebuilding
    n = check_declared_sizes(cfg, {k: v.shape for k, v in header.items()}, None, str(path / WEIGHTS), source,
                             check_linears=not records)
    _check_load_memory(n, header, str(path))
    model = model_cls(cfg)
    apply_transforms(model, records, source=source)   # structure first, then the weights
    tensors = read_safetensors(path / WEIGHTS)
    for f in extra:
        tensors.update(read_safetensors(f))
    load_state(model, tensors, source=str(path / WEIGHTS))
    return model.to(stored_dtype(tensors))


def load_hf_folder(path: str | Path, model_cls, raw: dict | None = None):
    """A Hugging Face folder -> `model_cls(cfg)` in the dtype its weights are stored in."""
    path = Path(path)
    raw = read_config(path) if raw is None else raw
    source = str(path / CONFIG)
    cfg = config_from_hf(raw, source)
    _check_class(cfg, model_cls, source)
    family = raw["model_type"]
    files = hf_weight_files(path)
    header = normalize_hf_names(family, read_headers(files))
    cfg = t5_untied_if_stored(cfg, family, header)
    where = str(files[0]) if len(files) == 1 else f"the {len(files)} shards in {path}"
    n = check_declared_sizes(cfg, {k: v.shape for k, v in header.items()}, family, where, source)
    _check_load_memory(n, header, str(path))
    model = model_cls(cfg)
    tensors: dict[str, Tensor] = {}
    for f in files:
        tensors.update(read_safetensors(f))
    load_state(model, state_from_hf(cfg, family, tensors, str(path)), source=str(path))
    return model.to(stored_dtype(tensors))


def _check_class(cfg: ModelConfig, model_cls, source: str) -> None:
    """An encoder-decoder checkpoint is not loaded as decoder-only, nor the reverse."""
    arch = getattr(model_cls, "ARCH", None)
    if arch is not None:
        check_arch(cfg, arch, f"{model_cls.__name__}.from_pretrained", source)


def _check_load_memory(n_params: int, header: dict, source: str) -> None:
    """Loading holds the file's tensors and the freshly built model (default dtype) at once."""
    file_bytes = sum(info.nbytes for info in header.values())
    model_bytes = n_params * torch.get_default_dtype().itemsize
    check_memory(file_bytes + model_bytes, f"loading {source} ({n_params:,} parameters: {file_bytes:,} bytes of "
                                           f"weights + {model_bytes:,} bytes for the model)")


def _place(model, device, dtype):
    if isinstance(dtype, str):
        dtype = pick_dtype(dtype)
    if isinstance(device, str):
        device = pick_device(device)
    if dtype is None:
        dtype = next(model.parameters()).dtype
    return model.to(device=device, dtype=dtype).eval()


def stored_dtype(tensors: dict[str, Tensor]) -> torch.dtype:
    """The floating dtype the weights were saved in (float32 if none is floating)."""
    return next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)


# ---- checks ----------------------------------------------------------------------------------
def check_declared_sizes(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], family: str | None,
                         weights: str, config: str = CONFIG, check_linears: bool = True) -> int:
    """Compare what `cfg` declares with the tensors the weights hold (`shapes`: name -> shape,
    from the safetensors headers; HF names for a `family`, ours for None). Stops at the first
    difference, so the work is bounded by the weights, not by the declared sizes. Returns the
    parameter count the config implies. Extra HF tensors (buffers) are allowed."""
    rename = hf_field_names(family) if family else {}

    def field(name: str) -> str:
        return f"{rename.get(name, name)}={getattr(cfg, name)}"

    # layers first: merely listing the tensors of a declared n_layer of 10**6 would take long
    rx = re.compile(re.escape(layer_prefix(family)).replace(r"\{i\}", r"(\d+)"))
    layers = {int(m[1]) for name in shapes if (m := rx.match(name))}
    if len(layers) != cfg.n_layer:
        raise SizeError(f"{config} declares {field('n_layer')} but {weights} holds {len(layers)} layers "
                        f"({layer_prefix(family).format(i='N')}...); the config does not describe these weights")
    if cfg.n_encoder_layer:
        rx = re.compile(re.escape(layer_prefix(family, encoder=True)).replace(r"\{i\}", r"(\d+)"))
        layers = {int(m[1]) for name in shapes if (m := rx.match(name))}
        if len(layers) != cfg.n_encoder_layer:
            raise SizeError(f"{config} declares {field('n_encoder_layer')} but {weights} holds {len(layers)} encoder "
                            f"layers ({layer_prefix(family, encoder=True).format(i='N')}...); the config does not "
                            f"describe these weights")
    table = stored_tensors(cfg) if family is None else iter_hf_names(cfg, family, has_fused_experts(shapes))
    n_params = 0
    for e in table:
        for p in e.parts:
            if p.name not in shapes:
                raise SizeError(f"{weights} has no tensor {p.name!r} that {config} implies ({_hint(e.ours, field)}); "
                                f"the weights were saved from another config")
            if p.role is not None and not check_linears:
                continue
            got, want = tuple(shapes[p.name]), e.part_shape(p)
            if p.index is not None:           # one slice of an (n_expert, ...) stack
                want = (cfg.n_expert, *want)
            if got != want:
                raise SizeError(_mismatch(e, p, got, want, weights, config, field))
        n_params += math.prod(e.shape)
    return n_params


_HINTS = (("experts.", "n_expert"), ("router", "n_expert"), ("q_norm", "qk_norm"), ("k_norm", "qk_norm"),
          ("cross_", "arch"), ("encoder.", "arch"), ("head_transform", "arch"), ("head_norm", "arch"),
          ("lm_head.bias", "arch"), ("score", "n_labels"), ("wtt", "n_token_types"), ("norm_emb", "embed_norm"),
          ("rel_bias", "pos_emb"), ("qkv.bias", "qkv_bias"), ("norm.bias", "norm"), ("norm_f.bias", "norm"),
          (".bias", "bias"), ("wpe", "pos_emb"), ("lm_head", "tie_embeddings"))


def _hint(ours: str, field) -> str:
    return next((field(f) for key, f in _HINTS if key in ours), f"our {ours}")


def _dim_fields(ours: str, role: str | None) -> list[list[str]]:
    """The config fields that set each dim of (a row slice `role` of) our tensor `ours`."""
    C = ["n_embd"]
    if ours.startswith(("wte.", "lm_head.")):
        return [["vocab_size"], C]
    if ours.startswith("wpe."):
        return [["context_length"], C]
    if ours.startswith("wtt."):
        return [["n_token_types"], C]
    if "rel_bias." in ours:
        return [["rel_num_buckets"], ["n_head"]]
    if ours.startswith("score."):
        return [["n_labels"], C]
    if ".cross_attn.q." in ours:
        return [["n_head", "head_dim"], C]
    if ".cross_attn.kv." in ours:
        return [["n_kv_head", "head_dim"], C]
    if ".cross_attn.proj." in ours:
        return [C, ["n_head", "head_dim"]]
    if ".qkv." in ours:
        rows = {"q": ["n_head", "head_dim"], "k": ["n_kv_head", "head_dim"], "v": ["n_kv_head", "head_dim"]}
        return [rows.get(role, ["n_head", "n_kv_head", "head_dim"]), C]
    if ".attn.proj." in ours:
        return [C, ["n_head", "head_dim"]]
    if "_norm.weight" in ours and ".attn." in ours:
        return [["head_dim"]]
    if ".router." in ours:
        return [["n_expert"], C]
    if ".fc." in ours:
        return [["intermediate_size"], C]
    if ".proj." in ours:
        return [C, ["intermediate_size"]]
    return [C]                                                   # norms


def _mismatch(e, p, got, want, weights, config, field) -> str:
    dims = _dim_fields(e.ours, p.role)
    if e.transposed:
        dims = dims[::-1]
    if p.index is not None:
        dims = [["n_expert"], *dims]
    differ = [i for i in range(min(len(got), len(want))) if got[i] != want[i]] or range(len(want))
    names = dict.fromkeys(f for i in differ if i < len(dims) for f in dims[i])
    return (f"{weights}: tensor {p.name!r} has shape {got}, but {config} declares "
            f"{', '.join(field(f) for f in names)}, which needs {want}; the config does not describe these weights")


def load_state(model, tensors: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Copy `tensors` into `model`, keeping the model's dtype. Names and shapes must match the
    model's exactly (the tied LM head may be absent); the first mismatch is reported."""
    expected = model.state_dict()
    tied = model.config.tie_embeddings
    optional = {"lm_head.weight"} if tied else set()
    for name, want in expected.items():  # in model order, so "first" means first in the network
        if name not in tensors:
            if name in optional:
                continue
            raise LmstackError(f"{source} has no tensor {name!r} that the model needs; it was saved from a "
                               f"different config (e.g. n_layer, bias, tie_embeddings)")
        if tuple(tensors[name].shape) != tuple(want.shape):
            raise LmstackError(f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)} but the config "
                               f"gives {tuple(want.shape)}; the checkpoint is from another config")
    extra = [name for name in tensors if name not in expected]
    if extra:
        raise LmstackError(f"{source} has tensor {extra[0]!r} that the model does not have; it was saved from a "
                           f"different config")
    with torch.no_grad():
        params = dict(model.named_parameters(remove_duplicate=False))
        params.update(dict(model.named_buffers()))
        for name, t in tensors.items():
            if tied and name == "lm_head.weight":
                continue  # same storage as wte.weight (checked equal shape above)
            params[name].copy_(t)
