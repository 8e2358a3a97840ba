"""Save/load in HF tokenizer.json format: round trip, HF-written files, bad files."""
import json
import os

import pytest

from lmstack.tokenizer import Tokenizer, TokenizerError

from tokenizer_corpus import MIXED


def test_save_load_round_trip(tmp_path, tok):
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    back = Tokenizer.load(path)
    assert back.vocab == tok.vocab and back.merges == tok.merges
    assert back.special_tokens == tok.special_tokens and back.pattern == tok.pattern == "gpt4"
    assert back.encode(MIXED, allowed_special="all") == tok.encode(MIXED, allowed_special="all")
    assert Tokenizer.load(tmp_path / "sub").n_vocab == tok.n_vocab  # a folder means folder/tokenizer.json
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]


def _hf_bytelevel_tokenizer(corpus, path, merges_as_strings):
    from tokenizers import ByteLevelBPETokenizer
    hf = ByteLevelBPETokenizer()
    hf.train_from_iterator(corpus, vocab_size=500, min_frequency=2, special_tokens=["<|endoftext|>", "<pad>"],
                           show_progress=False)
    data = json.loads(hf._tokenizer.to_str())
    if merges_as_strings:  # older tokenizers versions wrote "a b"
        data["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    path.write_text(json.dumps(data), encoding="utf-8")
    return hf


@pytest.mark.parametrize("merges_as_strings", [False, True])
def test_loads_file_written_by_hf_bytelevel_trainer(tmp_path, mixed_corpus, merges_as_strings):
    from tokenizers import Tokenizer as HFTokenizer

    path = tmp_path / "hf.json"
    _hf_bytelevel_tokenizer(mixed_corpus, path, merges_as_strings)
    hf = HFTokenizer.from_file(str(path))
    tok = Tokenizer.load(path)
    assert tok.pattern == "gpt2"  # ByteLevel(use_regex=true) is GPT-2's split
    assert tok.special_tokens == {"<|endoftext|>": 0, "<pad>": 1}   # HF puts specials first
    for text in [*mixed_corpus, "a<|endoftext|>b<pad>"]:
        assert tok.encode(text, allowed_special="all") == hf.encode(text).ids
        assert tok.decode(tok.encode(text, allowed_special="all")) == text
    # re-saved in our layout, HF still agrees
    tok.save(tmp_path / "ours.json")
    again = HFTokenizer.from_file(str(tmp_path / "ours.json"))
    assert again.encode(MIXED).ids == hf.encode(MIXED).ids


def test_backend_falls_back_when_ids_do_not_follow_merge_order(tmp_path, mixed_corpus):
    tok = Tokenizer.train(mixed_corpus, vocab_size=400)
    perm = {i: (i if i < 256 else 256 + (i - 256 + 7) % (len(tok.merges))) for i in tok.vocab}
    shuffled = Tokenizer({perm[i]: b for i, b in tok.vocab.items()}, [(perm[a], perm[b]) for a, b in tok.merges],
                         tok.special_tokens, tok.pattern)
    assert shuffled.backend == "python"
    with pytest.raises(TokenizerError, match="cannot be expressed as tiktoken ranks"):
        shuffled.to_tiktoken()
    ids = shuffled.encode(MIXED)
    assert [perm.get(i, i) for i in tok.encode(MIXED)] == ids
    assert shuffled.decode(ids) == MIXED


def _write(tmp_path, content):
    p = tmp_path / "tokenizer.json"
    p.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return p


def _good(tok):
    from lmstack.tokenizer import hf_json
    return hf_json.to_dict(tok)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: "{ not json", "corrupted tokenizer file, not valid JSON"),
    (lambda d: json.dumps(d)[: len(json.dumps(d)) // 2], "corrupted tokenizer file"),
    (lambda d: {"hello": 1}, "not a Hugging Face tokenizer.json"),
    (lambda d: {**d, "model": {**d["model"], "type": "WordPiece"}}, "model type 'WordPiece' is not supported"),
    (lambda d: {**d, "normalizer": {"type": "NFKC"}}, "normalizer 'NFKC' is not supported"),
    (lambda d: {**d, "pre_tokenizer": {"type": "Metaspace"}}, "not byte-level BPE"),
    (lambda d: {**d, "model": {**d["model"], "vocab": {**d["model"]["vocab"], "▁the": 9999}}},
     "not written in the byte-level alphabet"),
    (lambda d: {**d, "model": {**d["model"], "merges": [["q", "zz"]]}}, "merge #0"),
    (lambda d: {**d, "model": {**d["model"], "merges": [7]}}, "neither 'a b' nor"),
])
def test_corrupted_or_foreign_files_fail_in_one_line(tmp_path, tok, mutate, message):
    path = _write(tmp_path, mutate(_good(tok)))
    with pytest.raises(TokenizerError) as err:
        Tokenizer.load(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_file_and_unwritable_output(tmp_path, tok):
    from lmstack.utils import LmstackError
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.load(tmp_path / "missing.json")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(LmstackError, match="cannot create directory"):
        tok.save(blocker / "tokenizer.json")   # parent is a file: cannot be written, even as root


def test_unreachable_token_keeps_merge_semantics(tmp_path):
    """"abc" is a token made by (ab, c), but (b, c) ranks first, so BPE never reaches it:
    HF gives [a, bc]; tiktoken would look the whole chunk up and give [abc]. We must stay
    with HF (the file's semantics), so the tiktoken backend is refused."""
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {i: bytes([i]) for i in range(256)}
    vocab.update({256: b"bc", 257: b"ab", 258: b"abc"})
    tok = Tokenizer(vocab, [(98, 99), (97, 98), (257, 99)], {"<|endoftext|>": 259}, pattern="gpt2")
    assert tok.backend == "python"
    assert tok.encode("abc") == [97, 256]
    tok.save(tmp_path / "t.json")
    assert HFTokenizer.from_file(str(tmp_path / "t.json")).encode("abc abcd").ids == tok.encode("abc abcd")

    # HF's ignore_merges=true (Llama-3 style): a chunk that is a whole token skips BPE
    data = json.loads((tmp_path / "t.json").read_text())
    data["model"]["ignore_merges"] = True
    (tmp_path / "im.json").write_text(json.dumps(data))
    im = Tokenizer.load(tmp_path / "im.json")
    assert im.ignore_merges and im.backend == "python"   # tiktoken would merge (a, bc) in "abcd"
    text = "abc abcd xabc"
    assert im.encode(text) == HFTokenizer.from_file(str(tmp_path / "im.json")).encode(text).ids
    assert im.encode("abc") == [258] and im.encode("abcd") == [97, 256, 100]
