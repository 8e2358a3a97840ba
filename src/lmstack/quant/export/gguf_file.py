"""The GGUF container (version 3), written by us: typed metadata, tensor infos, aligned data.

    file  = header, metadata key/values, tensor infos, padding, tensor data
    header: b"GGUF", version u32 = 3, tensor count u64, metadata count u64
    kv:     key (string), value type u32, value         string = u64 byte length + UTF-8
            an array value = item type u32, count u64, items
    info:   name (string), n_dims u32, dims u64[n_dims] (GGML order: the fastest-varying dim
            first, i.e. a torch shape reversed), ggml type u32, offset u64 (from the start of
            the data section, a multiple of the alignment)
    data:   starts at the first multiple of `general.alignment` (32) after the infos; each
            tensor's bytes are padded with zeros to the next multiple.

All integers are little-endian. The data sizes are known from the shapes alone, so the
header and infos are written first and the tensors are then encoded and streamed one at a
time: memory holds one tensor's bytes, not the file. The file appears under its name only
when complete (a temporary sibling renamed over it); on any error nothing is left behind.
"""
from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Callable

from lmstack.quant.export.ggml_blocks import GGML_TYPES, nbytes
from lmstack.utils import LmstackError
from lmstack.utils.io import mkstemp_like_open

MAGIC = b"GGUF"
VERSION = 3
ALIGNMENT = 32


class ValueType(IntEnum):
    """GGUF metadata value types (gguf.h)."""
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR = {ValueType.UINT8: "B", ValueType.INT8: "b", ValueType.UINT16: "H", ValueType.INT16: "h",
           ValueType.UINT32: "I", ValueType.INT32: "i", ValueType.FLOAT32: "f", ValueType.BOOL: "?",
           ValueType.UINT64: "Q", ValueType.INT64: "q", ValueType.FLOAT64: "d"}


@dataclass(frozen=True)
class KV:
    """One metadata entry. For an ARRAY, `item` is the type of its items and `value` a list."""
    key: str
    type: ValueType
    value: Any
    item: ValueType | None = None


@dataclass(frozen=True)
class TensorPlan:
    """One tensor to write: GGUF name, torch shape, GGML kind, and a function giving its bytes."""
    name: str
    shape: tuple[int, ...]
    kind: str
    data: Callable[[], bytes]

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.kind)


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(t: ValueType, v: Any) -> bytes:
    if t == ValueType.STRING:
        return _string(v)
    return struct.pack("<" + _SCALAR[t], v)


def encode_kv(kv: KV) -> bytes:
    out = [_string(kv.key), struct.pack("<I", kv.type)]
    if kv.type == ValueType.ARRAY:
        out.append(struct.pack("<IQ", kv.item, len(kv.value)))
        if kv.item == ValueType.STRING:
            out += [_string(v) for v in kv.value]
        else:   # one struct call for a whole numeric array (token types: 100k items)
            out.append(struct.pack(f"<{len(kv.value)}{_SCALAR[kv.item]}", *kv.value))
    else:
        out.append(_value(kv.type, kv.value))
    return b"".join(out)


def _pad(n: int) -> int:
    return -n % ALIGNMENT


def header_bytes(kvs: list[KV], tensors: list[TensorPlan]) -> bytes:
    """Everything before the data section, padding included."""
    out = [MAGIC, struct.pack("<IQQ", VERSION, len(tensors), len(kvs))]
    out += [encode_kv(kv) for kv in kvs]
    offset = 0
    for t in tensors:
        dims = t.shape[::-1]                       # GGML order: fastest-varying first
        out.append(_string(t.name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, GGML_TYPES[t.kind], offset))
        offset += t.nbytes + _pad(t.nbytes)
    head = b"".join(out)
    return head + b"\0" * _pad(len(head))


def check_output_file(path: str | os.PathLike, overwrite: bool, fix: str = "choose another --out") -> Path:
    """Refuse, before any work, an output path that cannot be written: a missing or read-only
    folder, a folder in the file's place, or an existing file without `overwrite`. The
    check writes and removes a scratch file (os.access says yes to root on read-only mounts)."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise LmstackError(f"cannot write {path}: the folder {parent} does not exist (or is not a folder); {fix}")
    if path.is_dir():
        raise LmstackError(f"cannot write {path}: it is a folder; give a file name such as {path / 'model.gguf'}")
    if path.exists() and not overwrite:
        raise LmstackError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it, or {fix}")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise LmstackError(f"cannot write {path}: {parent} is not writable ({e.strerror or e}); {fix}") from None
    return path


def write_gguf(path: str | os.PathLike, kvs: list[KV], tensors: list[TensorPlan]) -> int:
    """Write a GGUF file atomically; returns its size in bytes. Each tensor's `data()` must
    return exactly `nbytes` bytes (checked: a short tensor would shift every later one)."""
    path = Path(path)
    names = [t.name for t in tensors]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise LmstackError(f"GGUF tensor names must be unique; repeated: {repeated}")
    fd, tmp = mkstemp_like_open(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header_bytes(kvs, tensors))
            for t in tensors:
                data = t.data()
                if len(data) != t.nbytes:
                    raise LmstackError(f"GGUF tensor {t.name}: {len(data)} bytes encoded where its {t.kind} shape "
                                       f"{t.shape} takes {t.nbytes}")
                f.write(data)
                f.write(b"\0" * _pad(len(data)))
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise LmstackError(f"could not write {path}: {e.strerror or e}; check free space and permissions") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return size
