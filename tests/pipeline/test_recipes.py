"""The shipped recipes: tinyworld.yaml IS the built-in default; every recipe is valid."""
from pathlib import Path

import pytest
import yaml

from lmstack.cli.options import from_dict
from lmstack.pipeline import RunOptions
from lmstack.pipeline.options import check_nested

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_tinyworld_recipe_equals_builtin_default():
    data = yaml.safe_load((RECIPES / "tinyworld.yaml").read_text())
    assert from_dict(RunOptions, data) == RunOptions()
    # every default is spelled out in the file, so reading it tells the whole recipe
    assert set(data) == set(RunOptions().to_recipe())


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_is_valid(path):
    opts = from_dict(RunOptions, yaml.safe_load(path.read_text()))
    check_nested(opts)


def test_special_tokens_are_the_tokenizers_defaults():
    from lmstack.pipeline.options import SPECIAL_TOKENS
    from lmstack.tokenizer import DEFAULT_SPECIAL_TOKENS
    assert SPECIAL_TOKENS == DEFAULT_SPECIAL_TOKENS


def test_the_data_keys_mean_what_corpus_options_mean():
    # every data key but the tokenizer's is a CorpusOptions field, passed through unchanged
    import dataclasses

    from lmstack.data import CorpusOptions
    from lmstack.pipeline.options import DATA_KEYS, corpus_options_for
    corpus_keys = set(DATA_KEYS) - {"vocab_size", "tokenizer_pattern"}
    assert corpus_keys <= {f.name for f in dataclasses.fields(CorpusOptions)}
    opts = RunOptions(corpus="x.txt", size_mb=3.5, seed=4, dedupe=False, near_threshold=0.8, noise=0.1,
                      val_frac=0.2, test_frac=0.1, doc_chars=500, field="body", errors="replace")
    made = corpus_options_for(opts, "out")
    assert made.out == "out" and all(getattr(made, k) == getattr(opts, k) for k in corpus_keys)
