"""Progress bars (tqdm) that stay quiet when output is not a terminal unless asked."""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             disable: bool | None = None, **kw) -> tqdm:
    """A tqdm bar. Disabled automatically when stderr is not a TTY (logs, CI) or when
    LMSTACK_NO_PROGRESS=1."""
    if disable is None:
        disable = os.environ.get("LMSTACK_NO_PROGRESS") == "1" or not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True, **kw)
