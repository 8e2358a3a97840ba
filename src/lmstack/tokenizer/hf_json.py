"""On-disk format: Hugging Face `tokenizer.json` for a byte-level BPE.

What we write (and what `tokenizers.Tokenizer.from_file` and transformers'
`PreTrainedTokenizerFast(tokenizer_file=...)` read, giving the same ids):

    model:          {"type": "BPE", "vocab": {bytelevel_str: id}, "merges": [[a, b], ...]}
    pre_tokenizer:  Sequence[Split(Regex(pattern), "Isolated"),
                             ByteLevel(add_prefix_space=false, use_regex=false)]
                    (just the ByteLevel step for pattern "none")
    decoder:        ByteLevel
    added_tokens:   the special tokens, special=true (also listed in model.vocab, as HF does)

Token bytes are written with GPT-2's byte-level alphabet (base.BYTE_TO_UNICODE).

What we read: the above, and byte-level BPE files written by HF tooling: merges as
"a b" strings or [a, b] lists, ids in any order, pre_tokenizer ByteLevel(use_regex=true)
(= the gpt2 pattern) or Split+ByteLevel. Features that would change the ids and that we do
not implement (a normalizer, add_prefix_space, dropout, word prefixes/suffixes, other
pre-tokenizers) are refused with an error naming them. The post_processor (e.g. a BOS
template) is ignored: lmstack never adds special tokens on its own. Every added token
becomes one of our special tokens (split out of text only when allowed, as in tiktoken);
its lstrip/rstrip/single_word flags are not applied. Ids are checked before anything is
sized by them (base.check_ids): unique, and 0..n-1 for the n tokens present.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmstack.tokenizer.base import PATTERNS, TokenizerError, bytelevel_to_bytes, bytes_to_bytelevel
from lmstack.utils.io import atomic_write_json

if TYPE_CHECKING:
    from lmstack.tokenizer.tokenizer import Tokenizer


def _bytelevel_step(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def to_dict(tok: "Tokenizer") -> dict[str, Any]:
    vocab = {bytes_to_bytelevel(b): i for i, b in sorted(tok.vocab.items())}
    for s, i in tok.special_tokens.items():
        vocab[s] = i
    merges = [[bytes_to_bytelevel(tok.vocab[a]), bytes_to_bytelevel(tok.vocab[b])] for a, b in tok.merges]
    if tok.pat_str is None:
        pre = _bytelevel_step(False)
    else:
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pat_str}, "behavior": "Isolated", "invert": False},
            _bytelevel_step(False)]}
    by_id = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s, i in by_id]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": pre, "post_processor": None,
        "decoder": _bytelevel_step(True),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": tok.ignore_merges, "vocab": vocab, "merges": merges},
    }


def save(tok: "Tokenizer", path: str | os.PathLike) -> None:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    atomic_write_json(path, to_dict(tok), indent=None)


def _pattern_from_pre_tokenizer(pre: Any, bad) -> str:
    """Map the pre_tokenizer onto one of our patterns (or a raw regex)."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise bad(f"pre_tokenizer {pre!r:.80} is not supported (expected ByteLevel or Split+ByteLevel)")
    kinds = [s.get("type") for s in steps]
    if not kinds or kinds[-1] != "ByteLevel" or kinds.count("ByteLevel") != 1:
        raise bad(f"pre_tokenizer steps {kinds} are not byte-level BPE (expected [Split,] ByteLevel)")
    byte_level = steps[-1]
    if byte_level.get("add_prefix_space"):
        raise bad("ByteLevel add_prefix_space=true is not supported; re-save it with add_prefix_space=false")
    splits = steps[:-1]
    if byte_level.get("use_regex", True):
        if splits:
            raise bad("Split followed by ByteLevel(use_regex=true) is not supported")
        return "gpt2"   # HF's ByteLevel regex is GPT-2's pattern
    if not splits:
        return "none"
    if len(splits) != 1 or splits[0].get("type") != "Split":
        raise bad(f"pre_tokenizer steps {kinds} are not supported (expected one Split before ByteLevel)")
    split = splits[0]
    pattern = split.get("pattern") or {}
    if split.get("behavior") != "Isolated" or split.get("invert") or "Regex" not in pattern:
        raise bad("only Split(Regex(...), behavior='Isolated', invert=false) is supported")
    return pattern["Regex"]


def _parse_merges(raw: Any, bad) -> list[tuple[str, str]]:
    if not isinstance(raw, list):
        raise bad("model.merges must be a list")
    out = []
    for k, m in enumerate(raw):
        if isinstance(m, str):
            parts = m.split(" ")
        elif isinstance(m, list):
            parts = m
        else:
            parts = []
        if len(parts) != 2 or not all(isinstance(p, str) for p in parts):
            raise bad(f"merge #{k} {m!r:.40} is neither 'a b' nor [a, b]")
        out.append((parts[0], parts[1]))
    return out


def from_dict(data: Any, source: str = "tokenizer.json") -> dict[str, Any]:
    """Parse a tokenizer.json dict into `Tokenizer(**kwargs)` arguments."""
    def bad(problem: str) -> TokenizerError:
        return TokenizerError(f"{source}: {problem}")

    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise bad("not a Hugging Face tokenizer.json (no 'model' object)")
    model = data["model"]
    if model.get("type", "BPE") != "BPE" or "merges" not in model:
        raise bad(f"model type {model.get('type')!r} is not supported; lmstack reads byte-level BPE only")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise bad(f"BPE option {key}={model[key]!r} is not supported")
    if data.get("normalizer"):
        raise bad(f"normalizer {data['normalizer'].get('type', data['normalizer'])!r} is not supported "
                  f"(lmstack byte-level BPE has none)")
    if not data.get("pre_tokenizer"):
        raise bad("no pre_tokenizer: not a byte-level BPE tokenizer")
    pattern = _pattern_from_pre_tokenizer(data["pre_tokenizer"], bad)

    added = data.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(a, dict) and isinstance(a.get("content"), str)
                                              and isinstance(a.get("id"), int) for a in added):
        raise bad("added_tokens must be a list of {'id': int, 'content': str} objects")
    specials: dict[str, int] = {}
    for a in added:
        if specials.setdefault(a["content"], a["id"]) != a["id"]:
            raise bad(f"added token {a['content']!r} is listed with two ids, {specials[a['content']]} and {a['id']}")
    special_ids = set(specials.values())

    raw_vocab = model.get("vocab")
    if not isinstance(raw_vocab, dict):
        raise bad("model.vocab must be an object {token: id}")
    vocab: dict[int, bytes] = {}
    text_of: dict[int, str] = {}
    for text, i in raw_vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise bad(f"token {text!r} has id {i!r}, not a non-negative integer")
        if text_of.setdefault(i, text) != text:   # a dict {id: bytes} would silently keep one
            raise bad(f"tokens {text_of[i]!r} and {text!r} both have id {i}; ids must be unique")
        if text in specials and specials[text] != i:
            raise bad(f"token {text!r} has id {i} in the vocab but id {specials[text]} in added_tokens")
        if i in special_ids:   # HF lists added tokens in the vocab too, under their own content
            if text not in specials:
                owner = next(c for c, j in specials.items() if j == i)
                raise bad(f"token {text!r} and added token {owner!r} both have id {i}; ids must be unique")
            continue
        try:
            vocab[i] = bytelevel_to_bytes(text)
        except KeyError:
            raise bad(f"token {text!r} is not written in the byte-level alphabet: not a byte-level "
                      f"BPE tokenizer (SentencePiece/WordPiece files are not supported)") from None
    if len(vocab) != len(set(vocab.values())):
        raise bad("two vocab entries decode to the same bytes")
    by_text = {bytes_to_bytelevel(b): i for i, b in vocab.items()}
    merges = []
    for k, (a, b) in enumerate(_parse_merges(model["merges"], bad)):
        if a not in by_text or b not in by_text or a + b not in by_text:
            missing = next(t for t in (a, b, a + b) if t not in by_text)
            raise bad(f"merge #{k} ({a!r}, {b!r}) refers to {missing!r}, which is not in the vocab")
        merges.append((by_text[a], by_text[b]))
    for name, pat in PATTERNS.items():
        if pat == pattern:
            pattern = name
    return {"vocab": vocab, "merges": merges, "special_tokens": specials, "pattern": pattern,
            "ignore_merges": bool(model.get("ignore_merges", False))}


def load(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file {path} not found; train one with `lmstack tokenizer train`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: corrupted tokenizer file, not valid JSON ({e}); re-create it") from None
    try:
        return from_dict(data, source=str(path))
    except TokenizerError:
        raise
    except (TypeError, AttributeError, ValueError) as e:
        raise TokenizerError(f"{path}: malformed tokenizer.json ({e})") from None
