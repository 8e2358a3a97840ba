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


def _with_vocab(d, **entries):
    return {**d, "model": {**d["model"], "vocab": {**d["model"]["vocab"], **entries}}}


def _without_vocab(d, content):
    return {**d, "model": {**d["model"], "vocab": {k: v for k, v in d["model"]["vocab"].items() if k != content}}}


def _with_added_id(d, content, new_id, in_vocab=True):
    """Move an added token to `new_id` (and its vocab entry too, as HF lists it in both)."""
    d = _with_vocab(d, **{content: new_id}) if in_vocab else d
    return {**d, "added_tokens": [{**a, "id": new_id} if a["content"] == content else a for a in d["added_tokens"]]}


@pytest.mark.parametrize("mutate, message", [
    # one huge id in a 700-token file: refused, never sized (a list of 10**9 slots is 8 GB)
    (lambda d: _with_vocab(d, **{"ĠzzQ": 10**9}), "token b' zzQ' has id 1000000000, but there are only 701 tokens"),
    (lambda d: _with_added_id(d, "<|end|>", 10**9), "token '<|end|>' has id 1000000000, but there are only 700"),
    (lambda d: _with_vocab(d, **{"ĠzzQ": 701}), "token b' zzQ' has id 701, but there are only 701 tokens"),
    (lambda d: _with_vocab(d, **{"ĠzzQ": 700}), None),  # the next free id: loads
    (lambda d: _with_added_id(_without_vocab(d, "<|end|>"), "<|end|>", -3, in_vocab=False),
     "token '<|end|>' has id -3, not a non-negative integer"),
    (lambda d: _with_added_id(d, "<|end|>", 5), "token 'ą' and added token '<|end|>' both have id 5"),  # ą: byte 5
    (lambda d: _with_added_id(d, "<|end|>", 700, in_vocab=False), "'<|end|>' has id 699 in the vocab but id 700 in"),
    (lambda d: _with_vocab(d, **{"ĠzzQ": 300}), "both have id 300; ids must be unique"),
    (lambda d: {**d, "added_tokens": d["added_tokens"] + [{**d["added_tokens"][0], "id": 3}]},
     "added token '<|endoftext|>' is listed with two ids"),
])
def test_ids_are_checked_before_anything_is_allocated(tmp_path, tok, mutate, message):
    import tracemalloc

    assert tok.n_vocab == 700
    path = _write(tmp_path, mutate(_good(tok)))
    if message is None:
        assert Tokenizer.load(path).n_vocab == 701
        return
    tracemalloc.start()
    try:
        with pytest.raises(TokenizerError) as err:
            Tokenizer.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message in str(err.value) and str(path) in str(err.value), str(err.value)
    assert peak < 50e6   # the file is ~20 KB; building a table for id 10**9 would take 8 GB


def test_sparse_ids_only_when_allowed(tmp_path):
    import pickle

    vocab = {i: bytes([i]) for i in range(256)}
    with pytest.raises(TokenizerError, match=r"'<\|endoftext\|>' has id 300, but there are only 257 tokens"):
        Tokenizer(vocab, [], {"<|endoftext|>": 300})
    with pytest.raises(TokenizerError, match="plus 43 allowed unused id"):
        Tokenizer(vocab, [], {"<|endoftext|>": 300}, max_id_gaps=43)
    sparse = Tokenizer(vocab, [], {"<|endoftext|>": 300}, max_id_gaps=44)
    assert sparse.n_vocab == 301 and sparse.decode([104, 105, 300]) == "hi<|endoftext|>"
    with pytest.raises(TokenizerError, match="id 299 is not in this vocabulary"):
        sparse.decode([299])
    assert pickle.loads(pickle.dumps(sparse)).n_vocab == 301   # the allowance survives pickling
    sparse.save(tmp_path / "t.json")
    with pytest.raises(TokenizerError, match="pass max_id_gaps"):
        Tokenizer.load(tmp_path / "t.json")
    assert Tokenizer.load(tmp_path / "t.json", max_id_gaps=44).special_tokens == {"<|endoftext|>": 300}
    with pytest.raises(TokenizerError, match="max_id_gaps=-1 must be an integer >= 0"):
        Tokenizer(vocab, [], max_id_gaps=-1)
