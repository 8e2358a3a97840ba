"""Plain text is cut into documents, so a single file can be split into train/val/test and
deduplicated: at blank lines, else line ends, else spaces, else exactly at the limit."""
import json

from lmstack.cli.main import main
from lmstack.data.corpora import load_path, split_documents


def test_paragraphs_are_packed_up_to_the_limit():
    text = "aaaa\n\nbb\n\ncc\n  \ndddddd"
    # "aaaa" + "\n\n" + "bb" = 8 chars fits 8; "cc" would make 12; a blank line may hold spaces
    assert split_documents(text, 8) == ["aaaa\n\nbb", "cc", "dddddd"]
    assert split_documents(text, 0) == [text] and split_documents("short", 100) == ["short"]


def test_text_without_blank_lines_is_cut_at_line_ends_then_spaces_then_anywhere():
    assert split_documents("one two\nthree\nfour five six", 9) == ["one two", "three", "four five", "six"]
    assert split_documents("abcdefghij", 4) == ["abcd", "efgh", "ij"]
    pieces = split_documents("word " * 1000, 100)
    assert all(len(p) <= 100 for p in pieces) and " ".join(pieces).split() == ["word"] * 1000


def test_load_path_splits_text_files_but_not_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 30 + "\n\n" + "y" * 30)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "z" * 50}) + "\n")
    assert load_path(tmp_path, doc_chars=40) == ["x" * 30, "y" * 30, "z" * 50]
    assert load_path(tmp_path) == ["x" * 30 + "\n\n" + "y" * 30, "z" * 50]     # 0: one document per file


def test_run_on_one_plain_text_file(tmp_path, capsys):
    # ~300 KB of text in one file with no blank lines: once "corpus has 1 distinct document(s)"
    book = tmp_path / "book.txt"
    book.write_text("".join(f"Line {i}: the river ran past the mill and the miller counted {i} sacks.\n"
                            for i in range(4000)))
    assert main(["run", "--corpus", str(book), "--out-dir", str(tmp_path), "--name", "b", "--stages", "corpus",
                 "--val-frac", "0.1", "--test-frac", "0"]) == 0
    meta = json.loads((tmp_path / "b" / "data" / "meta.json").read_text())
    s = meta["splits"]
    assert s["train"]["documents"] > 100 and s["val"]["documents"] > 10 and s["test"]["documents"] == 0
    share = s["val"]["bytes"] / (s["train"]["bytes"] + s["val"]["bytes"])
    assert 0.08 < share < 0.12
