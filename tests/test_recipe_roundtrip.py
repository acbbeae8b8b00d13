"""What a run dir saves as recipe.yaml (every key, defaults included: `recipe_to_yaml`) validates again
as is: `hybridtune train RUN/recipe.yaml`, a search trial's and a Pareto point's recipe run unchanged.
A part refusing a key "given" with the wrong method must not count a written default as given."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hybridtune.recipe import load_recipe, validate_recipe
from hybridtune.recipe.load import recipe_to_yaml

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_a_saved_recipe_validates_again_as_is(path, tmp_path):
    recipe = load_recipe(path)
    text = recipe_to_yaml(recipe)
    again = validate_recipe(yaml.safe_load(text), str(tmp_path / "recipe.yaml"))
    assert recipe_to_yaml(again) == text


def test_fgm_refuses_a_pgd_key_given_but_not_its_written_default():
    base = {"adversarial": {"method": "fgm"}}
    dumped = yaml.safe_load(recipe_to_yaml(validate_recipe(base, "r")))
    assert dumped["adversarial"]["alpha"] == 0.03  # the default is written out, and runs again
    validate_recipe(dumped, "r")
    with pytest.raises(Exception, match="adversarial.alpha: found it with method fgm"):
        validate_recipe({"adversarial": {"method": "fgm", "alpha": 0.5}}, "r")
