"""`lmstack tokenizer train|viz` end to end on toy inputs; the viz script statistics."""
import json

import pytest

from lmstack.cli.main import main
from lmstack.tokenizer import Tokenizer
from lmstack.tokenizer import viz

from tokenizer_corpus import CJK, CODE, EMOJI, ENGLISH


def test_train_then_viz(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(ENGLISH * 3, encoding="utf-8")
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "b.md").write_text(CODE + CJK, encoding="utf-8")
    (folder / "c.jsonl").write_text(json.dumps({"text": EMOJI}) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "tokenizer.json"
    rc = main(["tokenizer", "train", "--input", str(tmp_path / "a.txt"), str(folder), "--vocab-size", "400",
               "--out", str(out), "--pattern", "gpt2", "--special-tokens", "<|endoftext|>,<|pad|>"])
    assert rc == 0
    tok = Tokenizer.load(out)
    assert tok.pattern == "gpt2" and set(tok.special_tokens) == {"<|endoftext|>", "<|pad|>"}
    assert f"wrote {out}: {tok.n_vocab} tokens" in capsys.readouterr().out

    html = tmp_path / "viz.html"
    assert main(["tokenizer", "viz", "the quick 東京 😀", "--tokenizer", str(out), "--html", str(html)]) == 0
    printed = capsys.readouterr().out
    ids = tok.encode("the quick 東京 😀")
    assert "ids: " in printed and str(ids[0]) in printed
    assert "latin" in printed and "cjk" in printed and "emoji" in printed
    page = html.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and "東" in page and f"id {ids[0]}" in page


def test_viz_demo_tokenizer_and_file(tmp_path, capsys):
    f = tmp_path / "code.py"
    f.write_text(CODE, encoding="utf-8")
    assert main(["tokenizer", "viz", "--file", str(f), "--color"]) == 0
    captured = capsys.readouterr()
    assert "no --tokenizer given: using a demo tokenizer" in captured.err
    assert "\x1b[" in captured.out and "code" in captured.out


@pytest.mark.parametrize("argv, message", [
    (["train", "--input", "{a}", "--vocab-size", "100"], "at least 256 bytes + 5 special tokens = 261"),
    (["train", "--input", "{a}", "--pattern", "bert"], "valid patterns: gpt2, gpt4, none"),
    (["train", "--input", "{a}", "--out", "{a}/x/tokenizer.json"], "cannot write"),
    (["train", "--input", "{missing}"], "does not exist"),
    (["train", "--input", "{empty}"], "training text is empty"),
    (["viz", "hi", "--tokenizer", "{a}"], "corrupted tokenizer file"),
    (["viz"], "either as TEXT or as --file"),
    (["viz", "hi", "--script", "klingon"], "unknown --script"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, argv, message):
    a = tmp_path / "a.txt"
    a.write_text("some text to train on", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    subs = {"a": a, "missing": tmp_path / "missing.txt", "empty": tmp_path / "empty.txt"}
    assert main(["tokenizer", *[x.format(**subs) for x in argv]]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0


def test_script_stats_counts_every_token_once(tok):
    from tokenizer_corpus import MIXED
    rows = {r["script"]: r for r in viz.script_stats(tok, MIXED)}
    ids = tok.encode(MIXED)
    assert rows["all"]["tokens"] == len(ids) and rows["all"]["bytes"] == len(MIXED.encode())
    assert sum(r["tokens"] for s, r in rows.items() if s != "all") == len(ids)
    assert {"latin", "cjk", "code", "emoji"} <= set(rows)
    # CJK characters are 3 UTF-8 bytes; code on its own lines is labelled code
    labels = viz.token_scripts(tok, CJK, tok.encode(CJK))
    assert labels.count("cjk") > 0.8 * len(labels)
    assert set(viz.token_scripts(tok, CODE, tok.encode(CODE))) == {"code"}
    forced = viz.script_stats(tok, ENGLISH, script="code")
    assert [r["script"] for r in forced] == ["code", "all"]


def test_token_spans_group_split_characters(tok):
    text = "日本語 🤖 text"
    spans = viz.token_spans(tok, tok.encode(text))
    assert "".join(t for t, _ in spans) == text
    assert [i for _, g in spans for i in g] == tok.encode(text)
