"""Property-based fuzzing (hypothesis) of what the guard refuses: numeric recipe fields (inf, nan,
negative, huge), and the metadata files of run / export / ensemble / checkpoint dirs (random,
truncated or ill-typed JSON) given to eval, predict, serve and resume: a valid result, or exit 2
with one line — never a traceback, never another exit code."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridtune.errors import UserError
from hybridtune.recipe import SEED_MAX, Recipe, validate_recipe

from .refusal import refused

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**80), 2**80),
    st.sampled_from([0, -1, 1e300, -1e300, 2**32, 2**32 - 1, 10_000, 10_001, 1e-320]),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "NaN"]),
)
FIELDS = [
    ("train", "epochs"), ("train", "lr"), ("train", "weight_decay"), ("train", "max_grad_norm"),
    ("train", "seed"), ("train", "max_steps"), ("train", "batch_size"), ("train", "grad_accum"),
    ("schedule", "warmup"), ("schedule", "ratio"), ("schedule", "cut_frac"), ("data", "max_length"),
    ("output", "keep_checkpoints"), ("lr", "layer_decay"), ("lr", "head"),
]  # fmt: skip


def _finite_everywhere(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_everywhere(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_everywhere(v) for v in value)
    return True


@FUZZ
@given(st.sampled_from(FIELDS), NUMBERS, st.booleans())
def test_numeric_recipe_fields(field, value, split_seed):
    section, key = field
    raw = {section: {key: value}}
    if split_seed:
        raw["data"] = {"split": {"seed": value}}
    try:
        recipe = validate_recipe(raw, "r.yaml")
    except UserError as e:
        message = str(e)
        assert "\n" not in message and ": found " in message and "; expected " in message
        assert len(message) < 600
        return
    assert isinstance(recipe, Recipe) and _finite_everywhere(recipe.model_dump())
    t = recipe.train
    assert 0 < t.epochs <= 10_000 and 0 <= t.seed <= SEED_MAX and 0 <= recipe.data.split.seed <= SEED_MAX
    assert math.isfinite(t.weight_decay) and math.isfinite(t.max_grad_norm)


@FUZZ
@given(st.lists(NUMBERS, min_size=1, max_size=4))
def test_ensemble_weights(weights):
    try:
        recipe = validate_recipe(
            {"ensemble": {"members": len(weights) if len(weights) > 1 else 2, "weights": weights}}
        )
    except UserError as e:
        assert "\n" not in str(e)
        return
    assert all(math.isfinite(w) for w in recipe.ensemble.weights)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
KEYS = ["task", "format", "labels", "label_values", "data", "combine", "members", "weights", "epoch",
        "global_step", "log_history", "base_model"]  # fmt: skip
# objects with the keys the readers look for, holding values of any type
OBJECTS = st.dictionaries(
    st.sampled_from(KEYS),
    JSON | st.sampled_from(["classification", "causal_lm", "merged", "peft", "vote", "weighted"]),
    max_size=8,
)
TEXTS = st.one_of(
    OBJECTS.map(lambda o: json.dumps(o)),
    JSON.map(lambda v: json.dumps(v)),
    OBJECTS.map(lambda o: json.dumps(o)[: max(1, len(json.dumps(o)) // 2)]),  # truncated
    st.text(max_size=60),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)
COMMANDS = {
    "run.json": lambda d: ["eval", str(d)],
    "export.json": lambda d: ["serve", str(d), "--no-auth"],
    "ensemble.json": lambda d: ["predict", str(d), "a film"],
    "trainer_state.json": lambda d: ["train", "--resume", str(d)],
}


@FUZZ
@given(st.sampled_from(sorted(COMMANDS)), TEXTS)
def test_run_dir_metadata_files(meta, text):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "d"
        (d / "final").mkdir(parents=True)
        # a recipe that is refused: were the file accepted, what follows stops with exit 2 too
        (d / "recipe.yaml").write_text("name: ../refused\n")
        if meta == "trainer_state.json":
            (d / "run.json").write_text('{"task": "classification"}')
            (d / "checkpoints" / "checkpoint-2").mkdir(parents=True)
            (d / "checkpoints" / "checkpoint-2" / meta).write_bytes(text.encode("utf-8", "surrogatepass"))
        else:
            (d / meta).write_bytes(text.encode("utf-8", "surrogatepass"))
        refused(COMMANDS[meta](d), None)
