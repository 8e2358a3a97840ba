"""Weights on disk: safetensors read header first, sharded indexes, atomic writes, free memory.

The layer below the model: it knows files, not models (no Transformer, no config), so our
checkpoint format (checkpoint.py) and Hugging Face's (hf.py) both stand on it.

A safetensors file is 8 bytes (little-endian u64 N), then N bytes of JSON header
    {"wte.weight": {"dtype": "F32", "shape": [V, C], "data_offsets": [begin, end]}, ...,
     "__metadata__": {...}}
then the raw tensor data (offsets relative to its start). `read_header` reads only those
first 8 + N bytes, bounds N before reading it, and checks every entry against the file's
real size, so the sizes a file declares can be compared with a config (and with free memory)
before a single tensor is allocated. Nothing here unpickles: .bin/.pt weights are refused.

    header = read_header("run/model.safetensors")        # {name: TensorInfo(dtype, shape, nbytes)}
    files = hf_weight_files(Path("hf_folder"))            # model.safetensors or the index's shards
    tensors = read_safetensors(files[0])                  # header checked, then the data
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from torch import Tensor

from lmstack.utils import LmstackError, atomic_write_bytes

# safetensors' own limit (100 MB): room for ~1M tensor entries; a real 70B model's is ~100 KB
MAX_HEADER_BYTES = 100_000_000
MAX_JSON_BYTES = 64 * 2**20          # config.json / index.json: a few KB in practice
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# bytes per element of each safetensors dtype
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U64": 8, "U32": 4, "U16": 2, "C64": 8, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1,
               "F8_E5M2FNUZ": 1, "F8_E8M0": 1}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header declares it (checked against the file's size)."""
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: Path


def read_header(file: str | Path) -> dict[str, TensorInfo]:
    """The tensors `file` declares, without reading their data. Raises LmstackError naming the
    file and the bad value for a header that is too long, not JSON, or not consistent with
    the file's size (an entry whose bytes lie outside the file or disagree with its shape)."""
    file = Path(file)
    if not file.is_file():
        raise LmstackError(f"weights file {file} not found")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LmstackError(f"{file} is {size} bytes, too short for a safetensors header; the file is damaged")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise LmstackError(f"{file} declares a header of {n} bytes, but the file has {size - 8} bytes after the "
                               f"length field and a header may be at most {MAX_HEADER_BYTES}; the file is damaged "
                               f"or not safetensors")
        raw = f.read(n)
    try:
        entries = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmstackError(f"{file}: the safetensors header is not valid JSON ({e}); the file is damaged") from None
    if not isinstance(entries, dict):
        raise LmstackError(f"{file}: the safetensors header is a JSON {type(entries).__name__}, not an object")
    data_bytes = size - 8 - n
    out = {}
    for name, e in entries.items():
        if name != "__metadata__":
            out[name] = _check_entry(file, name, e, data_bytes)
    return out


def _check_entry(file: Path, name: str, e, data_bytes: int) -> TensorInfo:
    def bad(what: str) -> LmstackError:
        return LmstackError(f"{file}: header entry {name!r} {what}; the file is damaged or not safetensors")
    if not isinstance(e, dict):
        raise bad(f"is {e!r}, not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise bad(f"has dtype {dtype!r}; readable dtypes: {sorted(DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"has shape {shape!r}, not a list of non-negative ints")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise bad(f"has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if not begin <= end <= data_bytes:
        raise bad(f"has data_offsets [{begin}, {end}] outside the {data_bytes} data bytes the file holds")
    if end - begin != nbytes:
        raise bad(f"has shape {shape} of {dtype} ({nbytes} bytes) but data_offsets span {end - begin} bytes")
    return TensorInfo(dtype, tuple(shape), nbytes, file)


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    """The headers of several shards as one; a tensor declared by two shards is an error."""
    out: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in out:
                raise LmstackError(f"tensor {name!r} is in both {out[name].file} and {f}; a checkpoint's shards "
                                   f"must hold each tensor once")
            out[name] = info
    return out


def read_safetensors(file: str | Path) -> dict[str, Tensor]:
    """Every tensor of `file` (on the CPU); the header is checked before any data is read."""
    from safetensors.torch import load_file
    read_header(file)
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise LmstackError(f"cannot read {file}: {e}; the file is damaged or not safetensors") from None


def write_safetensors(file: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (contiguous, CPU) to `file` atomically: a crash leaves the old file whole."""
    from safetensors.torch import save
    atomic_write_bytes(file, save(tensors, metadata=metadata))


def read_json(file: Path, what: str) -> dict:
    """A JSON object from a small file (config.json, an index); errors name the file."""
    if not file.is_file():
        raise LmstackError(f"{what} {file} not found")
    size = file.stat().st_size
    if size > MAX_JSON_BYTES:
        raise LmstackError(f"{file} is {size} bytes; a {what} is at most {MAX_JSON_BYTES} (a few KB in practice)")
    try:
        obj = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmstackError(f"{file} is not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(obj, dict):
        raise LmstackError(f"{file} holds a JSON {type(obj).__name__}; a {what} is a JSON object")
    return obj


def inside(folder: Path, name, where: str) -> Path:
    """`folder / name` for a relative file name that stays inside `folder` (no '..', no
    absolute path, no backslash or drive). Symlinks are not resolved: a Hugging Face cache
    snapshot links its files into a blob store, and that is the user's own layout."""
    if not isinstance(name, str) or not name:
        raise LmstackError(f"{where}: {name!r} is not a file name")
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name or ":" in name:
        raise LmstackError(f"{where} points at {name!r}, outside the model folder {folder}; only relative paths "
                           f"inside it are allowed")
    return folder / p


def hf_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a Hugging Face folder: model.safetensors, or the shards that
    model.safetensors.index.json names (each once, in name order, all inside `folder`)."""
    if (folder / SINGLE).exists():
        return [folder / SINGLE]
    if (folder / INDEX).exists():
        index = read_json(folder / INDEX, "sharded checkpoint index")
        wmap = index.get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise LmstackError(f"{folder / INDEX} has no 'weight_map' object (tensor name -> shard file)")
        files = [inside(folder, f, f"{folder / INDEX} weight_map") for f in sorted(set(map(str, wmap.values())))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise LmstackError(f"{folder / INDEX} names shard(s) {missing} that are not in {folder}; the download "
                               f"is incomplete")
        return files
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise LmstackError(f"{folder} holds only pickled PyTorch weights; lmstack never unpickles. Convert them to "
                           f"safetensors first (transformers: save_pretrained(..., safe_serialization=True))")
    raise LmstackError(f"no {SINGLE} (or sharded {INDEX}) in {folder}")


def available_memory() -> int | None:
    """Bytes of RAM the kernel could give us now without swapping (None if unknown):
    MemAvailable from /proc/meminfo (Linux), else free pages from sysconf."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024        # the value is in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(need: int, what: str) -> None:
    """Raise before allocating when `need` bytes exceed the memory available now."""
    have = available_memory()
    if have is not None and need > have:
        raise LmstackError(f"{what} needs about {_gb(need)} of memory but only {_gb(have)} is available; free "
                           f"memory, or use a machine with more")


def _gb(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"
