"""Atomic writes: a crash or SIGKILL mid-write never leaves a half-written file behind.

Every file is written to a temporary sibling, flushed and fsynced, then renamed over the
target (rename is atomic on POSIX within one filesystem). Directories are built under a
temporary name and renamed into place the same way.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from lmstack.utils.errors import LmstackError


def _check_parent(path: Path) -> None:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmstackError(f"cannot create directory {parent}: {e.strerror}; choose a writable path") from None
    if not os.access(parent, os.W_OK):
        raise LmstackError(f"directory {parent} is not writable; choose a writable path")


def ensure_writable_dir(path: str | os.PathLike, fix: str) -> Path:
    """Create directory `path` and prove it writable by writing a scratch file in it.

    Called once before long work starts (training, a pipeline run) so a bad output path
    fails at the door. `os.access` is not enough there: it says yes to root and on some
    read-only mounts. `fix` ends the error message (e.g. "choose another --out")."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LmstackError(f"cannot write to {path}: it is a file, not a directory; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test.", suffix=".tmp"):
            pass
    except OSError as e:
        raise LmstackError(f"cannot write to {path}: directory is not writable ({e.strerror or e}); {fix}") from None
    return path


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by the
    classic set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def mkstemp_like_open(path: Path) -> tuple[int, str]:
    """A temp sibling of `path` for an atomic write, with the mode `open()` would give the
    final file (0o666 less the umask): mkstemp makes it 0o600, which the rename would keep."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    _check_parent(path)
    fd, tmp = mkstemp_like_open(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise LmstackError(f"could not write {path}: {e.strerror or e}; check free space and permissions") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name; rename it to `path` only on success.

    An existing `path` is replaced only after the new one is complete (old -> .old, new ->
    path, delete .old), so at every instant either the old or the new directory is whole.
    """
    path = Path(path)
    _check_parent(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~current_umask())   # as mkdir would (mkdtemp makes it 0o700)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
