"""The lab table, the runner's errors, the page and the gallery (with stand-in labs, so these
tests do not train anything), and determinism from the seed."""
import json
from dataclasses import dataclass

import pytest

from lmstack.labs import LABS, Figure, Insight, LabError, LabResult, get_lab, run_all, run_lab
from lmstack.labs import registry
from lmstack.labs.page import flatten


def _png() -> bytes:
    from lmstack.labs import plot
    fig, ax = plot.subplots(width=2, height=2)
    ax.plot([0, 1], [0, 1])
    return plot.to_png(fig)


def _ok(ctx):
    return LabResult(["a stand-in"], {"x": 1.5, "nested": {"y": [1, 2]}},
                     [Figure("line", "a line", png=_png()), Figure("page", "a page", html="<p>hi</p>")],
                     Insight("x is big", ctx.seed == 0, f"x = 1.5 with seed {ctx.seed}"), ["a note"])


def _boom(ctx):
    raise RuntimeError("exploded on purpose")


@dataclass(frozen=True)
class StandIn(registry.LabSpec):
    fn: object = None

    def load(self):
        return self.fn


@pytest.fixture
def stand_ins(monkeypatch):
    specs = {"fake-ok": StandIn("fake-ok", 90, "Fake", "Does it work?", "a line", "none", ("matplotlib",), _ok),
             "fake-boom": StandIn("fake-boom", 91, "Boom", "Does it fail well?", "nothing", "none", (), _boom),
             "fake-missing": StandIn("fake-missing", 92, "Missing", "Needs more?", "a plot of nothing", "none",
                                     ("no_such_module_for_labs",), _ok)}
    for k, v in specs.items():
        monkeypatch.setitem(registry.LABS, k, v)
    return specs


def test_table_lists_every_lab():
    numbers = [s.number for s in LABS.values()]
    assert numbers == list(range(1, 17))
    assert get_lab("3") is LABS["attention"] and get_lab("kv-cache").module == "kv_cache"
    for s in LABS.values():
        assert s.question.endswith("?") and s.shows and "matplotlib" in s.requires
        assert callable(s.load())


def test_unknown_lab_lists_the_labs():
    with pytest.raises(LabError) as e:
        get_lab("attenton")
    assert all(name in str(e.value) for name in LABS)


def test_missing_dependency_says_which_and_what_it_would_show(stand_ins, tmp_path):
    with pytest.raises(LabError, match=r"needs no_such_module_for_labs .*it would show: a plot of nothing"):
        run_lab("fake-missing", tmp_path / "x")
    assert not (tmp_path / "x").exists()                                  # refused before any work
    assert "tiktoken" in LABS["tokenization"].requires
    assert {"transformers", "llama_cpp"} <= set(LABS["stacks"].requires)


def test_missing_extra_names_the_pip_command(stand_ins, monkeypatch):
    assert "pip install no_such_module_for_labs" in stand_ins["fake-missing"].missing_message()
    monkeypatch.setitem(registry.EXTRAS, "no_such_module_for_labs", "plots")
    assert "pip install 'lmstack[plots]'" in stand_ins["fake-missing"].missing_message()
    assert stand_ins["fake-ok"].missing_message() is None


def test_without_llama_cpp_the_stacks_lab_says_so_and_the_gallery_marks_it(monkeypatch, tmp_path):
    real = registry.importlib.util.find_spec
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda m: None if m == "llama_cpp" else real(m))
    msg = LABS["stacks"].missing_message()
    assert msg.startswith("lab 'stacks' needs llama_cpp (pip install 'lmstack[llamacpp]'); it would show: ")
    assert "llama.cpp" in msg and "the same greedy tokens" in msg
    with pytest.raises(LabError, match="needs llama_cpp"):
        run_lab("stacks", tmp_path / "stacks")
    entries = run_all(tmp_path / "gallery", quick=True, names=["stacks"])
    assert entries[0]["status"] == "missing"
    assert "missing dependency" in (tmp_path / "gallery" / "index.html").read_text()


def test_unwritable_output_is_a_clear_error(stand_ins, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(LabError, match="it is a file"):
        run_lab("fake-ok", blocker)
    with pytest.raises(LabError, match="cannot write|not a directory|cannot create"):
        run_lab("fake-ok", blocker / "sub")
    with pytest.raises(LabError, match="seed"):
        run_lab("fake-ok", tmp_path / "ok", seed=-1)
    with pytest.raises(LabError, match="seed"):
        run_all(tmp_path / "gallery", seed=-1, names=["fake-ok"])
    assert not (tmp_path / "ok").exists() and not (tmp_path / "gallery").exists()   # refused before writing


def test_lab_folder_and_page(stand_ins, tmp_path):
    res = run_lab("fake-ok", tmp_path / "ok", quick=True, seed=0)
    out = tmp_path / "ok"
    record = json.loads((out / "numbers.json").read_text())
    assert record["numbers"] == {"x": 1.5, "nested": {"y": [1, 2]}} and record["figures"] == ["line.png", "page.html"]
    assert record["insight"]["holds"] and record["insight"]["sentence"] == "x is big: x = 1.5 with seed 0."
    assert (out / "line.png").read_bytes()[:4] == b"\x89PNG" and (out / "page.html").read_text() == "<p>hi</p>"
    page = (out / "index.html").read_text()
    assert "Does it work?" in page and "a stand-in" in page and "a note" in page and "data:image/png;base64," in page
    assert "srcdoc=\"&lt;p&gt;hi&lt;/p&gt;\"" in page and "nested.y" in page
    assert res["insight"] == record["insight"]
    # the same lab with numbers that contradict its claim: the page says so
    run_lab("fake-ok", tmp_path / "bad", seed=1)
    bad = json.loads((tmp_path / "bad" / "numbers.json").read_text())["insight"]
    assert not bad["holds"] and bad["sentence"].startswith("The numbers do NOT support the expected insight")
    assert "insight bad" in (tmp_path / "bad" / "index.html").read_text()


def test_gallery_marks_missing_and_failed_labs(stand_ins, tmp_path):
    entries = run_all(tmp_path, quick=True, names=["fake-ok", "fake-boom", "fake-missing"])
    assert [e["status"] for e in entries] == ["ok", "failed", "missing"]
    assert "exploded on purpose" in entries[1]["message"] and "no_such_module_for_labs" in entries[2]["message"]
    gallery = (tmp_path / "index.html").read_text()
    assert "href='fake-ok/index.html'" in gallery and "src='fake-ok/line.png'" in gallery
    assert "Failed." in gallery and "missing dependency" in gallery and "a plot of nothing" in gallery
    assert json.loads((tmp_path / "summary.json").read_text())["labs"][1]["status"] == "failed"
    assert (tmp_path / "fake-ok" / "index.html").is_file()


def test_figure_and_flatten():
    with pytest.raises(ValueError, match="exactly one"):
        Figure("x", "caption")
    with pytest.raises(ValueError, match="exactly one"):
        Figure("x", "caption", png=b"1", html="2")
    assert flatten({"a": {"b": 1, "c": [0.5, 2]}, "d": "s"}) == [("a.b", "1"), ("a.c", "[0.5, 2]"), ("d", "s")]


def test_training_is_deterministic_from_the_seed(tmp_path):
    from lmstack.labs.base import LabContext
    from lmstack.labs.toy import TaskBatches, offset_copy, train
    from lmstack.model import ModelConfig
    cfg = ModelConfig(vocab_size=8, n_layer=1, n_head=2, n_embd=16, context_length=8)

    def losses(seed, name):
        ctx = LabContext(quick=True, seed=seed, work=tmp_path)
        r = train(ctx, name, cfg, steps=5, batches=TaskBatches(offset_copy(8, 8, 1), 4, seed), seq_len=8)
        return r.curve("train")[1]
    assert losses(0, "a") == losses(0, "b")
    assert losses(0, "c") != losses(1, "d")
