"""Exact-match scoring on hand-made cases, and the scorer driven by a plain greedy loop."""
import json

import pytest
import torch

from lmstack.eval import Probe, exact_match, load_probes, majority_baseline, score_probes
from lmstack.utils import LmstackError


@pytest.mark.parametrize("completion,answer,ok", [
    ("5", "5", True),
    (" 5\nand more", "5", True),          # only the first line counts, stripped
    ("5 apples", "5", False),
    ("\n5", "5", False),                  # the first line is empty
    ("", "", True),
    ("Paris.", "Paris", False),
    ("  blue  \n", "blue", True),
    ("15", "5", False),
])
def test_exact_match(completion, answer, ok):
    assert exact_match(completion, answer) is ok


def test_load_probes_and_majority(tmp_path):
    rows = [{"task": "add", "prompt": "1+1=", "answer": "2"}, {"task": "add", "prompt": "0+2=", "answer": "2"},
            {"task": "add", "prompt": "2+1=", "answer": "3"}]
    (tmp_path / "add.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "color.jsonl").write_text(json.dumps({"prompt": "sky:", "answer": "blue"}) + "\n")
    probes = load_probes(tmp_path)
    assert sorted(probes) == ["add", "color"]        # task falls back to the file name
    assert [p.prompt for p in probes["add"]] == ["1+1=", "0+2=", "2+1="]
    assert majority_baseline(probes["add"]) == pytest.approx(2 / 3)
    assert majority_baseline(probes["color"]) == 1.0
    assert len(load_probes(tmp_path, limit=1)["add"]) == 1
    assert load_probes(tmp_path / "missing") == {}
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(LmstackError, match="bad.jsonl:1"):
        load_probes(tmp_path)


def test_score_probes_hand_made():
    probes = {"t": [Probe("t", "a", "x"), Probe("t", "b", "y"), Probe("t", "c", "x")],
              "u": [Probe("u", "d", "1")]}
    answers = {"a": "x\nzzz", "b": "x", "c": " x ", "d": "2"}
    res = score_probes(probes, lambda batch: [answers[p.prompt] for p in batch])
    assert (res["t"].n, res["t"].correct) == (3, 2)
    assert res["t"].accuracy == pytest.approx(2 / 3)
    assert res["t"].chance == pytest.approx(2 / 3)
    assert (res["u"].correct, res["u"].chance) == (0, 1.0)
    assert res["t"].examples[0] == {"prompt": "a", "completion": "x", "answer": "x", "correct": True}
    with pytest.raises(ValueError, match="completions"):
        score_probes(probes, lambda batch: [])
    # cut off by the token budget: the first line is incomplete, so not a match even if equal
    cut = score_probes({"t": [Probe("t", "a", "x"), Probe("t", "b", "x")]},
                       lambda batch: [("x", False), ("x\ny", False)])
    assert cut["t"].correct == 1


class CharBigram(torch.nn.Module):
    """A character 'LM' whose next char depends on the current one via a fixed table."""

    def __init__(self, vocab: str, nxt: dict[str, str]):
        super().__init__()
        self.vocab = vocab
        self.table = torch.full((len(vocab), len(vocab)), -5.0)
        for a, b in nxt.items():
            self.table[vocab.index(a), vocab.index(b)] = 5.0

    def forward(self, ids):          # (B, T) -> (B, T, V)
        return self.table[ids]


def greedy_completer(model: CharBigram, max_tokens: int):
    """The plain reference loop: argmax of the last position, append, repeat; stop at newline."""
    def complete(batch):
        outs = []
        for probe in batch:
            ids = torch.tensor([[model.vocab.index(c) for c in probe.prompt]])
            text = ""
            for _ in range(max_tokens):
                nxt = int(model(ids)[0, -1].argmax())
                ch = model.vocab[nxt]
                if ch == "\n":
                    break
                text += ch
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            outs.append(text)
        return outs
    return complete


def test_score_probes_with_greedy_loop():
    # After "=" the model says "4", then newline: right for 2+2, wrong for 1+2.
    model = CharBigram("0123456789+=\n", {"=": "4", "4": "\n"})
    probes = {"add": [Probe("add", "2+2=", "4"), Probe("add", "1+2=", "3")]}
    res = score_probes(probes, greedy_completer(model, max_tokens=5))
    assert res["add"].correct == 1
    assert [e["completion"] for e in res["add"].examples] == ["4", "4"]
