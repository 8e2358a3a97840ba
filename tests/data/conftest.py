"""Shared fixtures for the data tests: a byte-level stand-in tokenizer and a small tinyworld build."""
from __future__ import annotations

import pytest

from lmstack.data import CorpusOptions, build_corpus


class ByteTokenizer:
    """Minimal tokenizer protocol for shards: ids 0..255 are bytes, 256 is <|endoftext|>."""
    eot_token = 256
    n_vocab = 257

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@pytest.fixture
def byte_tok():
    return ByteTokenizer()


@pytest.fixture(scope="session")
def tw_dir(tmp_path_factory):
    """A 0.3 MB tinyworld data dir (no dedupe), built once for the session."""
    out = tmp_path_factory.mktemp("tw") / "data"
    build_corpus(CorpusOptions(corpus="tinyworld", out=str(out), size_mb=0.3, seed=0))
    return out
