"""The part contract (strategy/base.py): every part declares its key, config and hooks in the file
named by its key; the recipe's sections come from the one list of parts; a part that changes the
loss is one file (tests/head_l2.py) registered with `strategy.register`, and trains with no edit of
the engine, the trunk cache or the recipe."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel
from transformers import Trainer

from hybridtune import api, strategy
from hybridtune.errors import UserError
from hybridtune.model.anatomy import unwrap
from hybridtune.recipe import Recipe, load_recipe, schema
from hybridtune.strategy.base import Part
from hybridtune.train import engine, trunk_cache
from hybridtune.train.engine import make_trainer, training_arguments

from . import head_l2

ALPHA = 0.5


@pytest.fixture
def registered():
    strategy.register(head_l2.PART)
    try:
        yield head_l2.PART
    finally:
        strategy.unregister(head_l2.PART.key)


def _recipe_file(tmp_path: Path, model: str, data: str, *, alpha: float | None = ALPHA) -> Path:
    """The toy part's recipe, as a user writes it."""
    section = f"head_l2: {{alpha: {alpha}}}\n" if alpha is not None else ""
    path = tmp_path / "head_l2.yaml"
    path.write_text(
        f"name: head-l2\nmodel: {model}\ndata: {data}\n{section}"
        "train: {max_steps: 2, batch_size: 16, lr: 0.005, precision: fp32, logging_steps: 1}\n"
        f"output: {{dir: {tmp_path / 'runs'}}}\n",
        encoding="utf-8",
    )
    return path


# --------------------------------------------------------------------------------------------------
# the toy loss part


def test_a_registered_loss_part_trains_and_its_term_is_logged(registered, tiny_bert, sentiment_csv, tmp_path):
    recipe = load_recipe(_recipe_file(tmp_path, tiny_bert, sentiment_csv))
    assert recipe.head_l2.alpha == ALPHA and isinstance(recipe, Recipe)
    run = Path(api.train(recipe)["run_dir"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2
    for r in steps:  # Trainer's loss is the task loss plus alpha times the part's term
        assert r["loss_head_l2"] > 0.1
        assert r["loss"] == pytest.approx(r["loss_task"] + ALPHA * r["loss_head_l2"], abs=2e-3)
    assert all("loss_head_l2" not in r for r in rows if "eval_loss" in r)  # evaluation: the task alone
    assert "head_l2:\n  alpha: 0.5" in (run / "recipe.yaml").read_text()
    assert len(api.predict(str(run), ["a fine film"])) == 1  # the run loads back (the part is registered)


def test_without_the_section_nothing_is_added(registered, tiny_bert, sentiment_csv, tmp_path):
    run = Path(
        api.train(load_recipe(_recipe_file(tmp_path, tiny_bert, sentiment_csv, alpha=None)))["run_dir"]
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows) and not any("loss_task" in r or "loss_head_l2" in r for r in rows)


def test_the_term_changes_the_gradient_by_its_own_derivative(registered, still_bert, sentiment_csv, tmp_path):
    """d/dW of alpha·ΣW² is 2·alpha·W: the head's gradient with the part minus the plain task
    loss's gradient on the same batch (a model without dropout: both forwards compute the same)."""
    recipe = load_recipe(_recipe_file(tmp_path, still_bert, sentiment_csv))
    prep = api.prepare(recipe)
    args = training_arguments(recipe.train, recipe.output, tmp_path / "ck")
    trainer = make_trainer(prep.model, prep.tokenizer, prep.datasets, recipe, args, tmp_path, None, prep.plan)
    model = trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    weight = dict(model.named_parameters())["classifier.weight"]

    def loss_and_grad(compute) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        loss = compute(trainer, model, dict(batch))
        loss.backward()
        return loss.detach(), weight.grad.clone()

    with_part, grad = loss_and_grad(type(trainer).compute_loss)
    plain, plain_grad = loss_and_grad(Trainer.compute_loss)  # transformers' own: the task loss alone
    head = getattr(unwrap(model), head_l2.ATTR)  # what the part penalises: the head's weight matrices
    assert any(p is weight for p in head)
    penalty = sum((p.detach() ** 2).sum() for p in head)
    torch.testing.assert_close(with_part - plain, ALPHA * penalty)
    torch.testing.assert_close(grad - plain_grad, 2 * ALPHA * weight.detach())
    assert not torch.allclose(grad, plain_grad)


def test_the_part_refuses_a_task_by_name_before_anything_is_written(registered, tmp_path):
    with pytest.raises(UserError, match="head_l2: found it with task causal_lm; expected a task with a"):
        load_recipe(None, ["task=causal_lm", f"head_l2.alpha={ALPHA}", f"output.dir={tmp_path}"])
    assert not any(tmp_path.iterdir())


def test_an_unregistered_part_is_an_unknown_key():
    with pytest.raises(UserError, match="unknown key 'head_l2'"):
        load_recipe(None, [f"head_l2.alpha={ALPHA}"])


def test_register_refuses_a_taken_key(registered):
    with pytest.raises(ValueError, match="head_l2"):
        strategy.register(head_l2.PART)
    train = Part(key="train", config=head_l2.HeadL2Config, apply=head_l2.apply, summary="clashes")
    strategy.register(train)
    try:
        with pytest.raises(ValueError, match="'train'"):
            load_recipe()
    finally:
        strategy.unregister("train")


# --------------------------------------------------------------------------------------------------
# the contract of the built-in parts


def test_every_part_declares_itself_in_the_file_named_by_its_key():
    for key, part in strategy.PARTS.items():
        assert isinstance(part, Part) and part.key == key
        assert Path(inspect.getfile(part.apply)).name == f"{key}.py", key
        assert issubclass(part.config, BaseModel), key
        assert part.summary, key


def test_the_recipe_sections_of_the_parts_come_from_the_parts_list():
    fields = Recipe.model_fields
    keys = [k for k in fields if k in strategy.PARTS]
    assert keys == list(strategy.PARTS)  # every part, in the order of application
    for key, part in strategy.PARTS.items():
        assert fields[key].annotation == (part.config | None), key
        assert fields[key].default is None


def test_the_editor_only_annotations_of_the_recipe_match_the_parts():
    """schema.Recipe repeats the parts' sections under TYPE_CHECKING for editors; they must not drift."""
    tree = ast.parse(Path(schema.__file__).read_text(encoding="utf-8"))
    recipe = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Recipe")
    block = next(n for n in recipe.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    hinted = {n.target.id: ast.unparse(n.annotation) for n in block.body if isinstance(n, ast.AnnAssign)}
    assert hinted == {key: f"{part.config.__name__} | None" for key, part in strategy.PARTS.items()}
    assert list(hinted) == list(strategy.PARTS)


def _strategy_imports(module) -> set[str]:
    """The hybridtune.strategy submodules a module imports (function-level imports too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hybridtune.strategy."):
            out.add(node.module.split(".")[2])
        elif isinstance(node, ast.ImportFrom) and node.module == "hybridtune.strategy":
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("hybridtune.strategy.")}
    return out


def test_capabilities_are_declared_and_the_engine_names_no_part():
    assert "hasattr" not in inspect.getsource(strategy)  # hooks are Part fields, asked by name
    assert _strategy_imports(engine) == {"lr", "stages"}  # the training plan's, no part
    for module in (engine, trunk_cache):
        assert not _strategy_imports(module) & set(strategy.PARTS), module.__name__
