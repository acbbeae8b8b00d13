"""`parts:` of a search space (search/parts.py): any part that declares `search` settings can be
added to a trial's family, on or off per trial, its settings checked by the part's own config
before anything runs. Shown with the toy loss part of tests/head_l2.py, given search settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import optuna
import pytest
import yaml

from hybridtune import api, strategy
from hybridtune.errors import UserError
from hybridtune.model.facts import facts_of
from hybridtune.recipe import load_recipe, validate_recipe
from hybridtune.search import ray_tune, run_search
from hybridtune.search.parts import default_parts, nest, parse_parts, sample_parts
from hybridtune.search.setup import finish, load_space, model_facts, resolve, sample_trial
from hybridtune.search.space import Space, recipe_dict

from . import head_l2
from .test_l2sp import _overrides  # the same tiny runs
from .test_token_classification import tagged_sentences, write_conll

SEARCH = {"alpha": {"low": 0.01, "high": 1.0, "log": True}}


@pytest.fixture
def registered():
    part = dataclasses.replace(head_l2.PART, search=SEARCH)
    strategy.register(part)
    try:
        yield part
    finally:
        strategy.unregister(part.key)


def test_the_default_space_has_every_part_that_declares_search(registered):
    assert default_parts()["head_l2"] == SEARCH
    assert set(default_parts()) == {k for k, p in strategy.PARTS.items() if p.search is not None}
    assert "head_l2" in Space().parts


def test_a_part_is_on_or_off_and_its_settings_exist_only_when_on(registered):
    parts = parse_parts({"head_l2": SEARCH})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        sections = sample_parts(parts, trial)
        on = trial.params["parts.head_l2.use"]
        seen.add(on)
        assert ("parts.head_l2.alpha" in trial.params) == on == ("head_l2" in sections)
        if on:
            assert sections["head_l2"] == {"alpha": trial.params["parts.head_l2.alpha"]}
            assert 0.01 <= sections["head_l2"]["alpha"] <= 1.0
        study.tell(trial, 0.5)
    assert seen == {True, False}
    always = parse_parts({"head_l2": {"use": True, "alpha": 0.5}})
    trial = optuna.create_study().ask()
    assert (
        sample_parts(always, trial) == {"head_l2": {"alpha": 0.5}} and "parts.head_l2.use" not in trial.params
    )
    assert parse_parts({"head_l2": None}) == {} and parse_parts({"head_l2": {"use": False}}) == {}


def test_search_as_a_parts_settings_is_what_the_part_declares(registered):
    parts = parse_parts({"head_l2": "search", "rdrop": {"alpha": 0.5}})
    assert parts["head_l2"] == parse_parts({"head_l2": SEARCH})["head_l2"] == Space().parts["head_l2"]
    assert parts["head_l2"]["alpha"].low == 0.01 and parts["head_l2"]["alpha"].high == 1.0
    assert parts["rdrop"]["alpha"].choices == (0.5,)  # the others as written


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"head_l3": {}},
            "parts.head_l3: found an unknown part; expected a part key (did you mean 'head_l2'?)",
        ),
        ({"head_l2": {"alpah": 0.1}}, "parts.head_l2.alpah: found setting 'alpah'"),
        (
            {"head_l2": {"alpha": {"low": -1.0, "high": 1.0}}},
            "parts.head_l2.alpha: found -1.0; Input should be",
        ),
        ({"head_l2": {"alpha": ["a", "b"]}}, "parts.head_l2.alpha: found 'a' (str); expected a float"),
        ({"head_l2": [1]}, "parts.head_l2: found [1]; expected a mapping"),
        (
            {"head_l2": "serach"},
            "parts.head_l2: found 'serach'; expected a mapping of its settings or 'search'",
        ),
        ({"rdrop": "search", "freeze": "search"}, "parts.freeze: found 'search', but the part declares no"),
    ],
)
def test_a_bad_part_setting_names_its_key_path(registered, raw, message):
    with pytest.raises(ValueError) as e:
        parse_parts(raw)
    assert message in str(e.value)


def _space(tmp_path: Path, tiny_bert: str, data: str, parts: dict, **base) -> Path:
    space = {
        "name": "parts",
        "base": {
            "model": tiny_bert,
            "data": {"source": data, "max_length": 48},
            "train": {"precision": "fp32", "logging_steps": 5, "early_stopping": {"patience": None}},
            **base,
        },
        "families": {"full": {"lr": 0.005}},
        "parts": parts,
        "train": {"epochs": 1.0, "batch_size": 16, "warmup": 0.0, "weight_decay": 0.0, "schedule": "linear"},
        "evaluations": 2,
        "pruner": "none",
        "enqueue": [{"parts.head_l2.use": True, "parts.head_l2.alpha": 0.5}, {"parts.head_l2.use": False}],
        "verdict": {"top": 0},
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def test_a_search_adds_the_part_to_the_trials_that_draw_it(registered, tiny_bert, sentiment_csv, tmp_path):
    space = _space(tmp_path, tiny_bert, sentiment_csv, {"head_l2": SEARCH})
    root = run_search(str(space), [], str(tmp_path / "out"), trials=2, threads=1, echo=lambda *_: None)
    trials = json.loads((root / "trials.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["complete", "complete"]
    on, off = (load_recipe(Path(t["run_dir"]) / "recipe.yaml") for t in trials)
    assert on.head_l2.alpha == 0.5 and off.head_l2 is None
    rows = [json.loads(x) for x in (Path(trials[0]["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_head_l2" in r for r in rows)  # the part trained in the trial that drew it


def test_a_part_in_the_base_and_the_space_is_a_contradiction(registered, tiny_bert, sentiment_csv, tmp_path):
    space = _space(tmp_path, tiny_bert, sentiment_csv, {"head_l2": SEARCH}, head_l2={"alpha": 0.1})
    with pytest.raises(UserError) as e:
        run_search(str(space), [], str(tmp_path / "out"), trials=1, threads=1, echo=lambda *_: None)
    assert "base.head_l2" in str(e.value)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# a part the trial's family or the model refuses is not drawn in that trial


def _context(tmp_path: Path, model: str, data: str, families: dict, parts: dict, **base):
    """The checked space (search/setup.py's `resolve`: the model's facts from its config)."""
    space = {
        "name": "compat",
        "base": {"model": model, "data": {"source": data, "max_length": 48}, **base},
        "families": families,
        "parts": parts,
        "train": {"epochs": 1.0, "batch_size": 16, "warmup": 0.0, "weight_decay": 0.0, "schedule": "linear"},
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return resolve(load_space(str(path)), str(path))


def _draw(ctx, n: int = 40) -> list[tuple[str, dict, dict, dict]]:
    """n trials drawn as Ray Tune's OptunaSearch draws them (ray_tune's define-by-run function: the
    local loop's `sample_trial`), each replayed from its parameters alone as a trial replays them
    (an Optuna FixedTrial, as in a Ray worker: a parameter off the drawn path is an error)."""
    define = ray_tune._define(ctx)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        define(trial)
        family, values, shared = sample_trial(ctx, optuna.trial.FixedTrial(trial.params))
        out.append((family, values, shared, trial.params))
        study.tell(trial, 0.5)
    return out


@pytest.mark.parametrize(
    ("model", "families", "part", "refused", "words"),
    [
        # refused by the recipe's validation (the part's `check`)
        ("tiny_bert6", {"staged": {}, "full": {}}, {"layer_sampling": {"method": "lisa", "gamma": [0.333, 0.5]}},
         "staged", "stages: found `stages` with `layer_sampling`"),
        ("tiny_bert6", {"lora": {}, "full": {}}, {"mixout": {"p": [0.1, 0.7]}},
         "lora", "mixout: found no Linear layer whose pretrained weight trains"),
        # refused by the part's `model_check`, on the model's facts: LISA's γ draws no block of the one
        # freeze_top trains (0.15 of 6); R-Drop on a model without dropout, unless LoRA adds its own
        ("tiny_bert6", {"freeze_top": {"share": 0.15}, "full": {}},
         {"layer_sampling": {"method": "lisa", "gamma": [0.333, 0.5]}},
         "freeze_top", "layer_sampling.gamma: found 0.333, which draws 0 of the 1 trainable blocks"),
        ("still_bert", {"full": {}, "lora": {"lora_dropout": 0.1}}, {"rdrop": {"alpha": 1.0}},
         "full", "rdrop: found model"),
    ],
    ids=["staged+layer_sampling", "lora+mixout", "freeze_top+lisa", "no-dropout+rdrop"],
)  # fmt: skip
def test_a_part_the_trial_s_recipe_refuses_is_never_drawn(
    request, sentiment_csv, tmp_path, model, families, part, refused, words
):
    ctx = _context(tmp_path, request.getfixturevalue(model), sentiment_csv, families, part)
    (key,) = part
    took, seen = set(), set()
    for family, values, shared, params in _draw(ctx):
        seen.add(family)
        raw = finish(ctx, recipe_dict(ctx.base, family, values, shared, ctx.blocks, ctx.linear))
        if family == refused:
            assert key not in shared["parts"] and f"parts.{key}.use" not in params
            # not drawn because the run would refuse it: the checks `hybridtune train` makes say so
            with pytest.raises(UserError) as e:
                at_first = {path: p.corners()[0] for path, p in ctx.space.parts[key].items() if path != "use"}
                strategy.model_check(validate_recipe({**raw, key: nest(at_first)}), ctx.facts)
            assert words in str(e.value)
        else:
            took.add(params[f"parts.{key}.use"])
        if key in shared["parts"]:
            assert family != refused and params[f"parts.{key}.use"]
            strategy.model_check(validate_recipe(raw), ctx.facts)  # the trial's recipe passes them all
    assert seen == set(families) and took == {True, False}  # the other family draws it, on or off


def test_a_part_no_family_takes_is_refused_by_name_or_left_out_of_the_default(
    still_bert, tiny_bert6, sentiment_csv, tmp_path
):
    with pytest.raises(UserError) as e:  # named in the space file: exit 2, found / expected
        _context(tmp_path, still_bert, sentiment_csv, {"full": {}}, {"rdrop": {"alpha": 1.0}})
    assert "parts.rdrop: found model" in str(e.value) and "dropout probabilities are all 0" in str(e.value)
    with pytest.raises(UserError) as e:  # in the base: no trial could run
        _context(tmp_path, still_bert, sentiment_csv, {"full": {}}, {}, rdrop={"alpha": 1.0})
    assert "families.full: rdrop: found model" in str(e.value)
    with pytest.raises(UserError) as e:  # a γ that no family's blocks can meet (0.05 of 6 rounds to 0)
        _context(
            tmp_path,
            tiny_bert6,
            sentiment_csv,
            {"full": {}},
            {"layer_sampling": {"method": "lisa", "gamma": [0.05, 0.5]}},
        )
    assert "parts.layer_sampling.gamma: found 0.05, which draws 0 of the 6" in str(e.value)
    path = tmp_path / "default.yaml"  # the default parts: left out, said when the search starts
    path.write_text(
        yaml.safe_dump(
            {"base": {"model": still_bert, "data": {"source": sentiment_csv}}, "families": ["full"]}
        )
    )
    ctx = resolve(load_space(str(path)), str(path))
    assert "rdrop" in ctx.left_out and "rdrop" not in ctx.space.parts and "mixout" in ctx.space.parts


@pytest.mark.parametrize("model", ["tiny_bert", "still_bert", "tiny_gpt2"])
def test_the_search_judges_the_model_on_the_facts_the_run_sees(request, model, sentiment_csv, tmp_path):
    """The facts read from the config on the meta device (the search) are those of the loaded model
    (run.prepare), so a part's `model_check` answers a trial as it answers the run."""
    path = request.getfixturevalue(model)
    prepared = api.prepare(load_recipe(None, _overrides(path, sentiment_csv, tmp_path)))
    assert model_facts(path) == facts_of(prepared.model, prepared.build.new_params)
    assert (model_facts(path).dropout > 0) == (model != "still_bert")
    # the head's pretrained Linear layers: BERT's pooler (the checkpoint has it); GPT-2's score is new
    assert model_facts(path).head_linear == (() if model == "tiny_gpt2" else ("bert.pooler.dense",))


def test_the_facts_are_the_task_s_model_s(tiny_bert, tiny_bert_mlm, tiny_gpt2, tmp_path):
    """Built as the task builds it: a token classifier has no pooler, a masked LM's prediction head
    has a pretrained transform and a decoder tied to the embeddings, a causal LM's lm_head is tied."""
    assert model_facts(tiny_bert, "token_classification").head_linear == ()
    assert model_facts(tiny_bert_mlm, "prompt_classification").head_linear == (
        "cls.predictions.transform.dense",
    )
    assert model_facts(tiny_gpt2, "causal_lm").head_linear == ()
    assert model_facts(tiny_bert, "token_classification").blocks == model_facts(tiny_bert).blocks == 2


def test_the_facts_of_a_damaged_checkpoint_come_from_its_config(tiny_bert, sentiment_csv, tmp_path):
    """A checkpoint transformers cannot read: the facts still come (from the config; no parameter known
    to be new, so no part is refused for it), and loading the model for the run is what reports it,
    by the recipe key."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    facts = model_facts(str(broken))
    good = model_facts(tiny_bert)
    assert (facts.blocks, facts.linear, facts.dropout) == (good.blocks, good.linear, good.dropout)
    assert facts.head_linear == ("bert.pooler.dense", "classifier")  # the classifier not known as new
    assert good.head_linear == ("bert.pooler.dense",)
    with pytest.raises(UserError, match="could not be loaded"):
        api.prepare(load_recipe(None, _overrides(str(broken), sentiment_csv, tmp_path)))


def test_bitfit_and_mixout_are_drawn_together_only_where_the_head_has_a_pretrained_linear(
    tiny_bert6, sentiment_csv, tmp_path
):
    """BitFit trains [bias, head]: with mixout, a sequence classifier mixes BERT's pooler; a token
    classifier's head is its new classifier, nothing to mix, so its BitFit trials never draw mixout
    (they once did, and failed as trials)."""
    conll = write_conll(tmp_path / "ner.conll", tagged_sentences(40))
    families, parts = {"bitfit": {}, "full": {}}, {"mixout": {"p": [0.1, 0.7]}}
    for data, task, bitfit_mixes in (
        (sentiment_csv, "classification", True),
        (str(conll), "token_classification", False),
    ):
        ctx = _context(tmp_path, tiny_bert6, data, families, parts, task=task)
        drawn = {(family, shared["parts"].get("mixout") is not None) for family, _, shared, _ in _draw(ctx)}
        assert (
            (("bitfit", True) in drawn) == bitfit_mixes
            and ("full", True) in drawn
            and ("bitfit", False) in drawn
        )
