"""Ensembles, soups and adapter merging on tiny models: what is combined is what the members give."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from hybridtune import api, ensemble
from hybridtune.cli import app
from hybridtune.errors import UserError
from hybridtune.recipe import load_recipe
from tests.conftest import TEXTS, sentiment_rows, write_csv


def _quick(tiny_bert, data, out: Path, *extra: str) -> list[str]:
    return [
        f"model.name={tiny_bert}",
        f"data.source={data}",
        "train.epochs=2",
        "train.batch_size=16",
        "train.lr=0.005",
        "train.precision=fp32",
        f"output.dir={out}",
        *extra,
    ]


@pytest.fixture(scope="module")
def members(tmp_path_factory, tiny_bert):
    """Four finished runs of one tiny base: two full fine-tunings and two LoRA runs, different seeds."""
    root = tmp_path_factory.mktemp("members")
    data = write_csv(root / "sentiment.csv", sentiment_rows(240))
    runs = {}
    for name, extra in {
        "full-a": ["train.seed=1"],
        "full-b": ["train.seed=2"],
        "lora-a": ["peft.method=lora", "peft.r=4", "train.seed=3"],
        "lora-b": ["peft.method=lora", "peft.r=4", "train.seed=4"],
    }.items():
        recipe = load_recipe(None, _quick(tiny_bert, data, root / "runs", f"output.name={name}", *extra))
        runs[name] = api.train(recipe)["run_dir"]
    return runs


def _probs(run: str, texts=TEXTS) -> np.ndarray:
    return np.array([list(r["probs"].values()) for r in api.predict(run, texts)])


# ---------------------------------------------------------------------------------------------
# combining outputs


def test_combine_rules_by_hand():
    a = np.array([[2.0, 0.0], [0.0, 1.0]])
    b = np.array([[0.0, 1.0], [0.0, 3.0]])
    c = np.array([[1.0, 0.0], [2.0, 0.0]])
    sm = ensemble.softmax
    np.testing.assert_allclose(ensemble.combine([a, b], "mean_logits"), sm((a + b) / 2))
    np.testing.assert_allclose(ensemble.combine([a, b], "mean_probs"), (sm(a) + sm(b)) / 2)
    np.testing.assert_allclose(ensemble.combine([a, b], "weighted", [3, 1]), 0.75 * sm(a) + 0.25 * sm(b))
    vote = ensemble.combine([a, b, c], "vote")
    # row 0: a and c vote class 0, b votes 1; row 1: a and b vote 1, c votes 0
    np.testing.assert_allclose(vote, [[2 / 3, 1 / 3], [1 / 3, 2 / 3]], atol=1e-5)
    # a tie (one vote each) goes to the class with the higher mean probability
    tie = ensemble.combine([a, b], "vote")
    assert tie[0].argmax() == int(((sm(a) + sm(b)) / 2)[0].argmax())
    for p in (vote, tie):
        np.testing.assert_allclose(p.sum(-1), 1.0)


def test_output_ensemble_saves_reloads_and_predicts_the_mean_of_its_members(members, tmp_path):
    paths = [members["full-a"], members["full-b"], members["lora-a"]]
    out = tmp_path / "ens"
    result = ensemble.build(paths, str(out), "mean_probs")
    manifest = json.loads((out / "ensemble.json").read_text())
    assert manifest["members"] == ["members/0", "members/1", "members/2"]
    assert (out / "members/2/final/adapter_config.json").is_file()
    # each member's own predictions, averaged independently, are the ensemble's
    expected = np.mean([_probs(p) for p in paths], axis=0)
    np.testing.assert_allclose(_probs(str(out)), expected, atol=1e-6)
    # the saved dir is self-contained: moved elsewhere it re-loads and scores the same as at build time
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    again = api.evaluate(str(moved))
    assert again["accuracy"] == result["ensemble"]["test"]["accuracy"]
    assert again["confusion_matrix"] == json.loads((moved / "eval.json").read_text())["confusion_matrix"]
    member_tests = [m["test"]["accuracy"] for m in result["members"]]
    assert result["gain_over_mean_member"] == pytest.approx(again["accuracy"] - np.mean(member_tests))


def test_ensemble_cli_prints_members_and_gain_and_eval_predict_accept_the_dir(members, tmp_path):
    out = tmp_path / "ens"
    res = CliRunner().invoke(
        app, ["ensemble", members["full-a"], members["lora-a"], "--combine", "weighted", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "gain over the best member" in res.output and "ensemble" in res.output
    weights = json.loads((out / "ensemble.json").read_text())["weights"]
    member_vals = [
        m["validation"]["accuracy"] for m in json.loads((out / "ensemble_report.json").read_text())["members"]
    ]
    assert weights == member_vals  # weighted without --weights: validation accuracy
    res = CliRunner().invoke(app, ["eval", str(out), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["n"] > 0
    res = CliRunner().invoke(app, ["predict", str(out), "a great film", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["label"] in ("negative", "positive")


@pytest.mark.parametrize(
    "args, where",
    [
        (["only-one"], "ensemble"),
        (["a", "b", "--combine", "median"], "--combine"),
        (["a", "b", "--weights", "1,x"], "--weights"),
    ],
)
def test_ensemble_bad_arguments_exit_2(args, where, tmp_path):
    res = CliRunner().invoke(app, ["ensemble", *args, "--out", str(tmp_path / "e")])
    assert res.exit_code == 2 and where in res.output and "Traceback" not in res.output
    assert not (tmp_path / "e").exists()


def test_members_with_other_labels_are_refused(members, tmp_path, tiny_bert):
    data = write_csv(tmp_path / "three.csv", sentiment_rows(60, labels=("bad", "good")))
    other = api.train(
        load_recipe(None, _quick(tiny_bert, data, tmp_path / "runs", "train.epochs=1", "output.name=o"))
    )["run_dir"]
    with pytest.raises(UserError, match="labels"):
        ensemble.build([members["full-a"], other], str(tmp_path / "e"))
    assert not (tmp_path / "e").exists()


def test_runs_without_a_validation_split_are_refused_by_name(tmp_path, tiny_bert):
    """Few-shot runs with `data.validation_shots: 0` (setfit.yaml's default): an ensemble, a soup and a
    merge are weighed and reported on validation, so each says which run lacks it (exit 2, one line,
    nothing written) instead of failing inside numpy."""
    data = write_csv(tmp_path / "sentiment.csv", sentiment_rows(120))
    few = ["data.shots=8", "data.validation_shots=0", "train.epochs=1"]
    runs = [
        api.train(
            load_recipe(
                None, _quick(tiny_bert, data, tmp_path / "runs", *few, f"train.seed={s}", f"output.name=s{s}")
            )
        )
        for s in (1, 2)
    ]
    paths = [r["run_dir"] for r in runs]
    for command in (["ensemble", *paths], ["soup", *paths]):
        res = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "e")])
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert paths[0] in res.output.replace("\n", "") and "no validation split" in res.output
        assert not (tmp_path / "e").exists()


# ---------------------------------------------------------------------------------------------
# soups and merging


def _state(run: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run) / "final" / "model.safetensors"))


def test_uniform_soup_is_the_mean_of_the_members_weights_and_loads_with_plain_transformers(members, tmp_path):
    out = tmp_path / "soup"
    result = ensemble.soup([members["full-a"], members["full-b"]], str(out))
    a, b, s = _state(members["full-a"]), _state(members["full-b"]), _state(str(out))
    for key in s:
        if torch.is_floating_point(s[key]):
            torch.testing.assert_close(s[key], (a[key] + b[key]) / 2)
    assert result["ingredients"] == [members["full-a"], members["full-b"]]
    model = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    tok = AutoTokenizer.from_pretrained(out / "final")
    with torch.no_grad():
        plain = torch.softmax(model(**tok(TEXTS, padding=True, return_tensors="pt")).logits, -1).numpy()
    np.testing.assert_allclose(plain, _probs(str(out)), atol=1e-5)


def test_greedy_soup_never_below_its_best_member_on_validation_and_merges_lora_first(members, tmp_path):
    paths = [members[k] for k in ("full-a", "full-b", "lora-a", "lora-b")]
    result = ensemble.soup(paths, str(tmp_path / "greedy"), greedy=True)
    best = max(m["validation"]["accuracy"] for m in result["members"])
    assert result["soup"]["validation"]["accuracy"] >= best
    assert result["ingredients"][0] == result["best_member"]
    # one plain model, the size of one member: single-model cost
    soup_state = _state(str(tmp_path / "greedy"))
    assert soup_state.keys() == _state(members["full-a"]).keys()
    assert json.loads((tmp_path / "greedy" / "run.json").read_text())["format"] == "model"


def test_merge_adapters_cat_is_the_exact_mean_update_and_loads_with_plain_peft(members, tmp_path):
    from peft import PeftModel

    out = tmp_path / "merged"
    ensemble.merge_adapters([members["lora-a"], members["lora-b"]], str(out), "cat")

    def delta(run: Path, scaling: float) -> dict[str, torch.Tensor]:
        w = load_file(str(run / "final" / "adapter_model.safetensors"))
        return {
            k.removesuffix(".lora_A.weight"): scaling * w[k.replace("lora_A", "lora_B")] @ w[k]
            for k in w
            if k.endswith("lora_A.weight")
        }

    cfg = json.loads((Path(members["lora-a"]) / "final" / "adapter_config.json").read_text())
    merged_cfg = json.loads((out / "final" / "adapter_config.json").read_text())
    da, db = (
        delta(Path(members["lora-a"]), cfg["lora_alpha"] / cfg["r"]),
        delta(Path(members["lora-b"]), cfg["lora_alpha"] / cfg["r"]),
    )
    dm = delta(out, merged_cfg["lora_alpha"] / merged_cfg["r"])
    assert dm.keys() == da.keys() and merged_cfg["r"] == 2 * cfg["r"]
    for key in dm:
        torch.testing.assert_close(dm[key], (da[key] + db[key]) / 2, atol=1e-6, rtol=1e-4)
    # the head (modules_to_save) is the mean of the members' heads
    heads = [
        load_file(str(Path(members[k]) / "final" / "adapter_model.safetensors")) for k in ("lora-a", "lora-b")
    ]
    merged = load_file(str(out / "final" / "adapter_model.safetensors"))
    head_keys = [k for k in merged if "classifier" in k]
    assert head_keys
    for key in head_keys:
        torch.testing.assert_close(merged[key], (heads[0][key] + heads[1][key]) / 2)
    # plain peft loads it and predicts what hybridtune predicts
    base = AutoModelForSequenceClassification.from_pretrained(
        json.loads((out / "run.json").read_text())["base_model"], num_labels=2
    )
    model = PeftModel.from_pretrained(base, out / "final").eval()
    tok = AutoTokenizer.from_pretrained(out / "final")
    with torch.no_grad():
        plain = torch.softmax(model(**tok(TEXTS, padding=True, return_tensors="pt")).logits, -1).numpy()
    np.testing.assert_allclose(plain, _probs(str(out)), atol=1e-5)


def test_soup_and_merge_refuse_what_cannot_be_averaged(members, tmp_path):
    with pytest.raises(UserError, match="LoRA runs"):
        ensemble.merge_adapters([members["full-a"], members["lora-a"]], str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------
# `ensemble:` in a recipe


def test_recipe_ensemble_trains_members_and_combines_them(tmp_path, tiny_bert, sentiment_csv):
    overrides = _quick(
        tiny_bert,
        sentiment_csv,
        tmp_path / "runs",
        "output.name=ens",
        "ensemble.vary=[[train.seed=1], [peft.method=lora, peft.r=4]]",
    )
    summary = api.train(load_recipe(None, overrides))
    run = Path(summary["run_dir"])
    manifest = json.loads((run / "ensemble.json").read_text())
    assert manifest["members"] == ["members/0", "members/1"]
    member_reports = [json.loads((run / m / "report.json").read_text()) for m in manifest["members"]]
    assert json.loads((run / "members/1/run.json").read_text())["format"] == "peft"
    assert summary["trainable"] == sum(r["trainable"] for r in member_reports)
    assert summary["train_seconds"] == pytest.approx(
        sum(r["train_seconds"] for r in member_reports), abs=0.05
    )
    assert api.evaluate(str(run))["accuracy"] == summary["test"]["accuracy"]
    log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["eval_accuracy"] == summary["best_validation"]


def test_recipe_ensemble_errors_before_anything_is_written(tmp_path, tiny_bert, sentiment_csv):
    base = _quick(tiny_bert, sentiment_csv, tmp_path / "runs", "output.name=ens")
    res = CliRunner().invoke(app, ["train", *base, "ensemble.vary=[[train.seed=1], [train.epohcs=2]]"])
    assert res.exit_code == 2 and "ensemble.vary[1]" in res.output and "epochs" in res.output
    res = CliRunner().invoke(app, ["train", *base, "ensemble.combine=merge_adapters"])
    assert res.exit_code == 2 and "LoRA" in res.output
    res = CliRunner().invoke(app, ["train", *base, "ensemble.members=3", "ensemble.vary=[[a=1], [b=2]]"])
    assert res.exit_code == 2 and "ensemble.members" in res.output
    assert not (tmp_path / "runs" / "ens").exists()


# ---------------------------------------------------------------------------------------------
# shared trunk (tests/test_ensemble_trunk.py: inference and training over one trunk)


def test_trunk_depth_stops_at_the_first_block_that_differs(members, tiny_bert):
    full = [ensemble.load_member(members[k]).loaded.model for k in ("full-a", "full-b")]
    lora = [ensemble.load_member(members[k]).loaded.model for k in ("lora-a", "lora-b")]
    assert ensemble.trunk_depth(full) == 0  # embeddings trained in each
    assert ensemble.trunk_depth(lora) == 0  # LoRA on every block, different in each member
