"""The recipe schema: defaults, overrides, and errors that name the key path."""

import pytest

from hybridtune.errors import UserError
from hybridtune.recipe import Recipe, apply_override, load_recipe


def test_default_recipe_is_minilm_full_finetuning_on_rotten_tomatoes():
    recipe = load_recipe()
    assert recipe.model.name == "bundled:minilm"
    assert recipe.data.source == "bundled:rotten_tomatoes"
    assert recipe.freeze is None and recipe.peft is None
    assert recipe == Recipe()


def test_overrides_are_parsed_as_yaml_and_nested():
    recipe = load_recipe(
        None, ["train.epochs=1", "train.lr=1e-4", "peft.method=lora", "peft.r=4", "model=some/dir/x"]
    )
    assert recipe.train.epochs == 1 and recipe.train.lr == 1e-4
    assert recipe.peft.method == "lora" and recipe.peft.kwargs()["r"] == 4
    assert recipe.model.name == "some/dir/x"


def test_override_into_string_shorthand():
    raw = {"data": "bundled:imdb"}
    apply_override(raw, "data.max_train_samples=10")
    assert raw == {"data": {"source": "bundled:imdb", "max_train_samples": 10}}


def test_yaml_file_with_shorthands(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: mine\nmodel: bundled:minilm\ndata: bundled:imdb\nfreeze:\n  trainable: [head, {top_k: 2}]\n"
    )
    recipe = load_recipe(path)
    assert recipe.data.source == "bundled:imdb"
    assert recipe.freeze.trainable == ["head", {"top_k": 2}]


@pytest.mark.parametrize(
    "overrides, where, words",
    [
        (["train.epoch=1"], "train.epoch", ["unknown key 'epoch'", "did you mean 'epochs'"]),
        (["train.epochs=three"], "train.epochs", ["'three'", "number"]),
        (["train.precision=fp16"], "train.precision", ["'fp16'", "'auto'"]),
        (["train.lr=0"], "train.lr", ["greater than 0"]),
        (["peft.method=lorra"], "peft", ["lorra", "did you mean 'lora'"]),
        (["peft.rr=4"], "peft", ["unknown key 'rr'", "did you mean 'r'"]),
        (["peft.r=many"], "peft", ["r: 'many'"]),
        (["freeze.trainable=[{top_k: -1}]"], "freeze.trainable", ["top_k", "-1"]),
        (["freeze.trainable=[heads]"], "freeze.trainable", ["'heads'", "selector"]),
        (["freeze.train_new_head=true"], "freeze", ["exactly one of `trainable`, `frozen` or `spectrum`"]),
        (["data.train=x.csv", "data.source=bundled:imdb"], "data", ["either `source`"]),
        (["train.learning_rate=0.1"], "train.learning_rate", ["did you mean 'lr'"]),
    ],
)
def test_bad_recipe_values_name_the_key_path(overrides, where, words):
    with pytest.raises(UserError) as info:
        load_recipe(None, overrides)
    message = str(info.value)
    assert f"default recipe: {where}" in message
    for word in words:
        assert word in message


def test_bad_override_syntax():
    with pytest.raises(UserError, match="key.path=value"):
        load_recipe(None, ["train.epochs"])


def test_recipe_file_problems(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: found invalid YAML"):
        load_recipe(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping of recipe keys"):
        load_recipe(listy)


def test_every_recipe_in_the_repo_validates():
    from pathlib import Path

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        load_recipe(path)


def test_train_file_override_replaces_the_recipe_source():
    recipe = load_recipe(None, ["data=bundled:imdb", "data.train=a.csv", "data.test=b.csv"])
    assert recipe.data.source is None and recipe.data.train == "a.csv"
    with pytest.raises(UserError, match="either `source`"):
        load_recipe(None, ["data.train=a.csv", "data.source=bundled:imdb"])
