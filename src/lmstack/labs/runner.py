"""Run a lab into a folder, or every lab into a gallery.

    run_lab("attention", "runs/labs/attention", quick=True, seed=0)
        -> runs/labs/attention/{numbers.json, <figures>.png|.html, index.html}
    run_all("runs/labs", quick=True)
        -> runs/labs/<name>/... for every lab, runs/labs/index.html (the gallery), summary.json

Labs train micro models (widths of 32-128): their matmuls are far too small to split across
threads, and on a shared machine two intra-op threads that wait for each other made a step
up to 20x slower than one (measured). So a lab runs with one torch thread and no progress
bars (it reports its own steps through `log`); both settings are restored afterwards.
Training runs and data go to a scratch folder that is deleted when the lab ends; only what
the page shows is written to the output folder.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

from lmstack.labs.base import LabContext, LabResult
from lmstack.labs.page import gallery_page, lab_page
from lmstack.labs.registry import LABS, LabError, get_lab
from lmstack.utils import LmstackError, atomic_write_bytes, atomic_write_json, atomic_write_text, ensure_writable_dir


@contextlib.contextmanager
def _lab_settings():
    import torch
    threads, no_bar = torch.get_num_threads(), os.environ.get("LMSTACK_NO_PROGRESS")
    torch.set_num_threads(1)
    os.environ["LMSTACK_NO_PROGRESS"] = "1"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if no_bar is None:
            os.environ.pop("LMSTACK_NO_PROGRESS", None)
        else:
            os.environ["LMSTACK_NO_PROGRESS"] = no_bar


def _check_seed(seed) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise LabError(f"seed={seed!r} must be an int >= 0")


def _writable(out: str | os.PathLike) -> Path:
    try:
        return ensure_writable_dir(out, "choose another --out")
    except LmstackError as e:
        raise LabError(str(e)) from None


def run_lab(name: str, out: str | os.PathLike, *, quick: bool = False, seed: int = 0,
            log: Callable[[str], None] = lambda line: None) -> dict:
    """Run lab `name` and write its folder `out`. Returns {"name", "out", "seconds", "insight",
    "numbers", "figures"}. Raises LabError for an unknown lab, a missing optional dependency
    or an output folder that cannot be written, before any work."""
    spec = get_lab(name)
    message = spec.missing_message()
    if message:
        raise LabError(message)
    _check_seed(seed)
    out = _writable(out)
    run = spec.load()
    from lmstack.utils import seed_everything
    with _lab_settings(), tempfile.TemporaryDirectory(prefix=f"lmstack-lab-{spec.name}-") as work:
        seed_everything(seed)
        t0 = time.perf_counter()
        result = run(LabContext(quick=quick, seed=seed, work=Path(work), log=log))
        seconds = time.perf_counter() - t0
    if not isinstance(result, LabResult):
        raise TypeError(f"lab {spec.name}: run() must return a LabResult, got {type(result).__name__}")
    for fig in result.figures:
        if fig.png is not None:
            atomic_write_bytes(out / fig.filename, fig.png)
        else:
            atomic_write_text(out / fig.filename, fig.html)
    record = {"lab": spec.name, "number": spec.number, "title": spec.title, "seed": seed, "quick": quick,
              "seconds": round(seconds, 2), "insight": result.insight.to_dict(), "built": result.built,
              "notes": result.notes, "figures": [f.filename for f in result.figures], "numbers": result.numbers}
    atomic_write_json(out / "numbers.json", record)
    atomic_write_text(out / "index.html", lab_page(spec, result, seed, quick, seconds))
    return {"name": spec.name, "out": str(out), "seconds": seconds, "insight": record["insight"],
            "numbers": result.numbers, "figures": record["figures"]}


def run_all(out: str | os.PathLike, *, quick: bool = False, seed: int = 0, names: list[str] | None = None,
            log: Callable[[str], None] = lambda line: None) -> list[dict]:
    """Run every lab (or `names`) into out/<name>/ and write the gallery out/index.html and
    out/summary.json. A lab that lacks an optional dependency is marked, one that fails is
    reported; neither stops the others. Returns one entry per lab:
    {"name", "status": ok|missing|failed, "seconds", "insight" or "message"}."""
    _check_seed(seed)
    specs = [get_lab(n) for n in names] if names else list(LABS.values())
    root = _writable(out)
    entries, gallery = [], []
    for spec in specs:
        entry = {"name": spec.name, "status": "ok", "seconds": 0.0}
        message = spec.missing_message()
        if message:
            entry.update(status="missing", message=message)
            log(f"[{spec.name}] skipped: {message}")
        else:
            log(f"[{spec.name}] running")
            try:
                res = run_lab(spec.name, root / spec.name, quick=quick, seed=seed, log=log)
            except Exception as e:   # one broken lab must not hide the others' results
                entry.update(status="failed", message=f"{type(e).__name__}: {e}")
                log(f"[{spec.name}] FAILED: {entry['message']}")
            else:
                pngs = [f for f in res["figures"] if f.endswith(".png")]
                entry.update(seconds=round(res["seconds"], 2), insight=res["insight"],
                             thumbnail=f"{spec.name}/{pngs[0]}" if pngs else None)
                log(f"[{spec.name}] {res['seconds']:.1f} s: {res['insight']['sentence']}")
        entries.append(entry)
        gallery.append({**entry, "spec": spec})
    atomic_write_text(root / "index.html", gallery_page(gallery, quick, seed))
    atomic_write_json(root / "summary.json", {"quick": quick, "seed": seed, "labs": entries})
    return entries
