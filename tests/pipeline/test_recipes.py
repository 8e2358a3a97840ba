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
