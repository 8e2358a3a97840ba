"""Shared fixtures: the mixed corpus and a tokenizer trained on it once per session."""
import pytest

from lmstack.tokenizer import Tokenizer

from tokenizer_corpus import mixed_texts


@pytest.fixture(scope="session")
def mixed_corpus() -> list[str]:
    return mixed_texts()


@pytest.fixture(scope="session")
def tok(mixed_corpus) -> Tokenizer:
    return Tokenizer.train(mixed_corpus, vocab_size=700, pattern="gpt4", min_frequency=2)
