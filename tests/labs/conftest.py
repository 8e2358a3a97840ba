"""Every lab runs once per test session in --quick mode (seed 0); the tests of a lab read what
it wrote. The time each lab took is printed at the end of the session (-s or the summary)."""
from __future__ import annotations

import json
import re
import time

import pytest

from lmstack.labs import run_lab

_TIMES: dict[str, float] = {}


@pytest.fixture(scope="session")
def quick_lab(tmp_path_factory):
    """quick_lab(name) -> {"out": Path, "numbers": dict, "record": numbers.json, "html": index.html}."""
    root = tmp_path_factory.mktemp("labs")
    done: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in done:
            t0 = time.perf_counter()
            res = run_lab(name, root / name, quick=True, seed=0)
            _TIMES[name] = time.perf_counter() - t0
            out = root / name
            record = json.loads((out / "numbers.json").read_text())
            done[name] = {"out": out, "numbers": res["numbers"], "record": record, "result": res,
                          "html": (out / "index.html").read_text()}
        return done[name]
    return get


def _assert_page(lab: dict) -> None:
    """The folder has numbers.json, every figure and a self-contained index.html that shows the
    insight sentence, and no page loads anything from a network."""
    out, record = lab["out"], lab["record"]
    assert record["quick"] is True and record["seed"] == 0
    assert record["figures"], "a lab draws at least one figure"
    for name in record["figures"]:
        data = (out / name).read_bytes()
        assert len(data) > 500, name
        if name.endswith(".png"):
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
    for page in [out / "index.html", *[out / f for f in record["figures"] if f.endswith(".html")]]:
        text = page.read_text()
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), f"{page.name} loads from a network"
        assert "<script src" not in text and "<link" not in text
    import html
    assert html.escape(record["insight"]["sentence"], quote=True) in lab["html"]
    assert record["built"] and all(isinstance(b, str) for b in record["built"])


@pytest.fixture(scope="session")
def assert_page():
    return _assert_page


def pytest_terminal_summary(terminalreporter):
    if _TIMES:
        terminalreporter.write_line("lab --quick times: " + ", ".join(f"{k} {v:.1f}s" for k, v in _TIMES.items())
                                    + f"; total {sum(_TIMES.values()):.1f}s")
