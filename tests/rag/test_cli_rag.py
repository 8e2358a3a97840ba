"""`lmstack rag index` / `lmstack rag ask` end to end on a toy run directory; the printed
answer must be the library's answer for the same inputs."""
from __future__ import annotations

import json

import pytest

from lmstack.cli.main import main
from lmstack.cli.rag import RagAskOptions, make_retriever
from lmstack.infer import LLM
from lmstack.rag import ABSTAIN, Index, answer
from lmstack.tokenizer import Tokenizer
from tests.infer.conftest import tiny_model

TEXTS = {"bolo.txt": "Bolo lives in Tinar. Bolo's favourite colour is red. Bolo is a baker.",
         "sub/sami.md": "Sami lives in Porak. Sami's pet is called Nuno. Nuno is a fox."}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rag")
    docs = root / "docs"
    for name, text in TEXTS.items():
        (docs / name).parent.mkdir(parents=True, exist_ok=True)
        (docs / name).write_text(text)
    tok = Tokenizer.train(" ".join(TEXTS.values()) * 20, vocab_size=300, special_tokens=["<|endoftext|>"])
    run = root / "run"
    tiny_model(5, vocab_size=tok.n_vocab, context_length=128).save_pretrained(run)
    tok.save(run / "tokenizer.json")
    return root, docs, run


def test_index_then_ask_prints_the_library_answer(setup, capsys):
    root, docs, run = setup
    idx = root / "idx"
    assert main(["rag", "index", str(docs), "--out", str(idx), "--run", str(run), "--chunk-tokens", "8",
                 "--overlap", "2", "--layer", "1"]) == 0
    assert "indexed 2 documents" in capsys.readouterr().out
    index = Index.load(idx)
    assert {c.doc_id for c in index.chunks} == {"bolo.txt", "sub/sami.md"} and index.encoder["layer"] == 1
    question = "where does Bolo live?"
    assert main(["rag", "ask", str(run), str(idx), question, "--k", "2", "--max-tokens", "6", "--mode", "hybrid"]) == 0
    out = capsys.readouterr().out.splitlines()
    llm = LLM(str(run), max_num_seqs=1)
    opts = RagAskOptions(k=2, max_tokens=6)
    want = answer(llm, make_retriever("hybrid", index, llm, opts), question, k=2, max_tokens=6)
    assert out[0] == want.text
    assert len(out) == 1 + len([n for n in want.citations if 1 <= n <= len(want.hits)])
    assert main(["rag", "ask", str(run), str(idx), question, "--bm25-min-score", "1e9"]) == 0   # auto = bm25
    assert capsys.readouterr().out.strip() == ABSTAIN


def test_jsonl_and_tinyworld_sources_bm25_only(setup, capsys):
    root, _, _ = setup
    src = root / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate(TEXTS.values())) + "\n")
    assert main(["rag", "index", str(src), "--out", str(root / "j")]) == 0
    assert [c.doc_id for c in Index.load(root / "j").chunks] == ["0", "1"]
    assert main(["rag", "index", "tinyworld", "--out", str(root / "tw"), "--chunk-tokens", "4096"]) == 0
    tw = Index.load(root / "tw")
    assert len(tw) == 8 + 24 and tw.embeddings is None           # one chunk per KB document


@pytest.mark.parametrize("args, message", [
    (["rag", "index", "{empty}", "--out", "{root}/e"], "holds no .txt/.md files"),
    (["rag", "index", "{root}/missing", "--out", "{root}/m"], "does not exist"),
    (["rag", "index", "{bad}", "--out", "{root}/b"], ":2: not valid JSON"),
    (["rag", "ask", "{run}", "{root}/missing-idx", "q"], "not an index folder"),
    (["rag", "index", "{root}/docs", "--out", "{root}/o", "--overlap", "200"], "overlap must be"),
])
def test_errors_are_one_line(setup, capsys, args, message):
    root, docs, run = setup
    (root / "empty").mkdir(exist_ok=True)
    (root / "bad.jsonl").write_text('{"id": "a", "text": "x"}\n{oops\n')
    args = [a.format(root=root, run=run, empty=root / "empty", bad=root / "bad.jsonl") for a in args]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_dense_mode_needs_embeddings(setup, capsys):
    root, docs, run = setup
    main(["rag", "index", str(docs), "--out", str(root / "bm"), "--chunk-tokens", "64"])
    capsys.readouterr()
    assert main(["rag", "ask", str(run), str(root / "bm"), "q", "--mode", "dense"]) == 1
    assert "no embeddings" in capsys.readouterr().err


def test_index_with_a_trained_encoder_and_ask_with_it(setup, capsys):
    """--encoder-steps: the index is embedded by the trained encoder kept in IDX/encoder, and
    `ask` embeds the question with that encoder (the library's answer, dense mode)."""
    from lmstack.rag import ContrastiveEncoder, DenseRetriever

    root, docs, run = setup
    idx = root / "idx-enc"
    assert main(["rag", "index", str(docs), "--out", str(idx), "--run", str(run), "--chunk-tokens", "8",
                 "--overlap", "2", "--encoder-steps", "3"]) == 0
    assert "encoder trained 3 steps" in capsys.readouterr().out
    index = Index.load(idx)
    tok = Tokenizer.load(run / "tokenizer.json")
    enc = ContrastiveEncoder.load(idx / "encoder", tok)
    assert index.encoder["kind"] == "contrastive" and index.encoder["fingerprint"] == enc.fingerprint
    assert sorted(p.name for p in (idx / "encoder").iterdir()) == ["config.json", "model.safetensors"]
    question = "where does Bolo live?"
    assert main(["rag", "ask", str(run), str(idx), question, "--k", "2", "--max-tokens", "6", "--mode", "dense"]) == 0
    llm = LLM(str(run), max_num_seqs=1)
    want = answer(llm, DenseRetriever(index, enc), question, k=2, max_tokens=6)
    assert capsys.readouterr().out.splitlines()[0] == want.text
    assert main(["rag", "index", str(docs), "--out", str(root / "x"), "--encoder-steps", "3"]) == 1
    assert "--encoder-steps needs --run" in capsys.readouterr().err
