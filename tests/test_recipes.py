"""Every example recipe trains a few steps on a tiny 6-block BERT, and exactly the intended
parameters change: every other one stays bit-identical."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from hybridtune import api
from hybridtune.recipe import load_recipe
from hybridtune.train.engine import make_trainer, training_arguments

# classification recipes (the sentiment data fits them); other tasks' recipes are tested with their
# task, ensemble recipes (members = one of the recipes below) in test_ensemble.py / test_compare.py,
# self-training recipes in test_self_training.py
RECIPES = sorted(
    p
    for p in (Path(__file__).parent.parent / "recipes").glob("*.yaml")
    if (raw := yaml.safe_load(p.read_text())).get("task", "classification") == "classification"
    and "ensemble" not in raw
    and "self_training" not in raw  # rounds of runs: tests/test_self_training.py
)
HEAD = r"^(bert\.pooler\.|classifier\.)"
# what each recipe must change, stated independently of the code (regex on parameter names);
# recipes not listed must change exactly the parameters their optimizer holds
EXPECTED = {
    "full": r".",
    "llrd": r".",
    "ahf": r".",
    "ulmfit": r".",
    "head_only": HEAD,
    "freeze_top2": HEAD + r"|^bert\.encoder\.layer\.[45]\.",
    "freeze_bottom4": HEAD + r"|^bert\.encoder\.layer\.[45]\.",
    "bitfit": HEAD + r"|bias$",
    "lora": r"lora_[AB]\.|classifier\.modules_to_save\.",
}
NEVER = r"classifier\.original_module\."  # peft keeps the original head untouched


def teacher_of(path: Path, request) -> list[str]:
    """A recipe with `distill` learns from a finished run: conftest's `teacher_run` (same labels)."""
    if "distill" not in yaml.safe_load(path.read_text()):
        return []
    return [f"distill.teacher={request.getfixturevalue('teacher_run')}"]


def _run(recipe, tmp_path):
    prep = api.prepare(recipe)
    before = {n: p.detach().clone() for n, p in prep.model.named_parameters()}
    held = prep.plan.optimizer_names(prep.model)
    args = training_arguments(recipe.train, recipe.output, tmp_path / "ck")
    args.save_strategy = args.eval_strategy = "no"
    args.load_best_model_at_end = False
    trainer = make_trainer(
        prep.model, prep.tokenizer, prep.datasets, recipe, args, tmp_path, None, plan=prep.plan, callbacks=[]
    )
    trainer.train()
    changed = {n for n, p in prep.model.named_parameters() if not torch.equal(before[n], p.detach())}
    return prep, changed, held


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_changes_exactly_the_intended_parameters(path, tiny_bert6, sentiment_csv, tmp_path, request):
    overrides = [
        f"model={tiny_bert6}",
        f"data.source={sentiment_csv}",
        "train.max_steps=14",
        "train.batch_size=32",
        "train.precision=fp32",
        "train.early_stopping.patience=null",
        f"output.dir={tmp_path}",
        "train.lr=0.01",
        *teacher_of(path, request),
    ]  # large enough that every held parameter visibly moves in 14 steps
    recipe = load_recipe(path, overrides)
    prep, changed, held = _run(recipe, tmp_path)
    names = [n for n, _ in prep.model.named_parameters()]
    assert changed, "nothing trained"
    assert not any(re.search(NEVER, n) for n in changed)
    assert changed == held - {n for n in held if re.search(NEVER, n)}, (
        sorted(held - changed)[:5],
        sorted(changed - held)[:5],
    )
    if path.stem in EXPECTED:
        canonical = {n.removeprefix("base_model.model."): n for n in names}
        intended = {full for short, full in canonical.items() if re.search(EXPECTED[path.stem], short)}
        assert changed == intended, (sorted(intended - changed)[:5], sorted(changed - intended)[:5])
