"""`lmstack lab`: list, one lab end to end, errors, and `all` writing a gallery."""
import json
from dataclasses import dataclass

import pytest

from lmstack.cli.main import main
from lmstack.labs import LABS, Figure, Insight, LabResult, registry


def test_list(capsys):
    assert main(["lab", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in LABS) and "Is attention really" in out


def test_unknown_lab_lists_the_labs(capsys):
    assert main(["lab", "atention", "--quick"]) == 1
    err = capsys.readouterr().err
    assert "unknown lab 'atention'" in err and "kv-cache" in err and "Traceback" not in err


def test_unwritable_out_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert main(["lab", "attention", "--quick", "--out", str(tmp_path / "f")]) == 1
    err = capsys.readouterr().err
    assert "it is a file" in err and "choose another --out" in err


def test_one_lab_end_to_end(tmp_path, capsys):
    out = tmp_path / "kv"
    assert main(["lab", "6", "--quick", "--out", str(out), "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "numbers.json").read_text())
    assert record["lab"] == "kv-cache" and record["seed"] == 1 and record["quick"] is True
    assert record["insight"]["sentence"] in printed and f"{out}/index.html" in printed


@dataclass(frozen=True)
class _StandIn(registry.LabSpec):
    fn: object = None

    def load(self):
        return self.fn


def _tiny(ctx):
    return LabResult(["nothing"], {"v": ctx.seed}, [Figure("p", "a page", html="<b>x</b>")],
                     Insight("v is the seed", True, f"v = {ctx.seed}"))


@pytest.fixture
def only_stand_ins():
    saved = dict(LABS)
    LABS.clear()
    LABS.update({"a": _StandIn("a", 1, "A", "a?", "a", "none", (), _tiny),
                 "b": _StandIn("b", 2, "B", "b?", "what b shows", "none", ("no_such_mod_b",), _tiny)})
    yield
    LABS.clear()
    LABS.update(saved)


def test_all_writes_a_gallery(tmp_path, capsys, only_stand_ins):
    assert main(["lab", "all", "--quick", "--out", str(tmp_path), "--seed", "4"]) == 0   # missing is not failure
    out = capsys.readouterr().out
    assert "v = 4" in out and "no_such_mod_b" in out and f"{tmp_path}/index.html" in out
    gallery = (tmp_path / "index.html").read_text()
    assert "a/index.html" in gallery and "what b shows" in gallery
    assert json.loads((tmp_path / "a" / "numbers.json").read_text())["numbers"] == {"v": 4}
