"""What the trainer shows while it runs: a tqdm bar on a terminal, and plain lines where no one
watches a terminal.

A bar redraws one line with carriage returns, which a log file, `tee`, CI or `nohup` turns
into nothing useful, so the bar is off when stderr is not a terminal. Then, or whenever
stdout is not a terminal (`make demo > log` keeps the bar on screen and the lines in the
file), a line like

    train step 120/750 (16%)  loss 2.431  4,650 tok/s  elapsed 0:53  ETA 4:41

goes to stdout (to stderr when only stderr is redirected) after the first step, then at most
every `every_s` seconds, and at the last step. ETA = steps left x mean time per step of
this run (a resumed run counts from its own start). LMSTACK_NO_PROGRESS=1 silences both.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO

from lmstack.utils import progress

EVERY_S = 30.0


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def line_stream() -> TextIO | None:
    """Where plain progress lines go: stdout unless it is a terminal, else stderr unless it
    is one; None when both are terminals (the bar is enough) or LMSTACK_NO_PROGRESS=1."""
    if os.environ.get("LMSTACK_NO_PROGRESS") == "1":
        return None
    for stream in (sys.stdout, sys.stderr):
        if not stream.isatty():
            return stream
    return None


class TrainProgress:
    """`set_postfix(loss=, tok_s=, mfu=)` after a metrics line, `update(1)` after each step."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, every_s: float = EVERY_S,
                 stream: TextIO | None | str = "auto", clock: Callable[[], float] = time.perf_counter):
        self.total, self.step, self.every_s, self.clock = total, initial, every_s, clock
        self.stream = (line_stream() if stream == "auto" else stream) if enabled else None
        self.bar = progress(total=total, initial=initial, desc="train", disable=None if enabled else True)
        self.start_step, self.t_start = initial, clock()
        self.t_line: float | None = None
        self.loss: float | None = None
        self.tok_s: float | None = None

    def set_postfix(self, loss: float, tok_s: float, mfu: float) -> None:
        self.loss, self.tok_s = loss, tok_s
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:.0f}", mfu=f"{100 * mfu:.1f}%")

    def update(self, n: int = 1) -> None:
        self.step += n
        self.bar.update(n)
        if self.stream is None:
            return
        now = self.clock()
        if self.t_line is None or now - self.t_line >= self.every_s or self.step >= self.total:
            self.t_line = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        done = self.step - self.start_step
        elapsed = now - self.t_start
        parts = [f"train step {self.step}/{self.total} ({100 * self.step / max(1, self.total):.0f}%)"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.tok_s is not None:
            parts.append(f"{self.tok_s:,.0f} tok/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if 0 < done and self.step < self.total:
            parts.append(f"ETA {_clock((self.total - self.step) * elapsed / done)}")
        return "  ".join(parts)

    def close(self) -> None:
        self.bar.close()
