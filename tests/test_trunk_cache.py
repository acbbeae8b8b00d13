"""The frozen-trunk activation cache (train/trunk_cache.py): without dropout, a cached run ends with
the weights and metrics of an uncached one; the cached blocks run only to build it; stages rebuild
it at the new depth; the shared dir is reused and written whole; `on` where it cannot is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hybridtune import api
from hybridtune.cli import app
from hybridtune.errors import UserError
from hybridtune.recipe import load_recipe
from hybridtune.train import trunk_store
from hybridtune.train.trunk_store import CACHE_DIR_ENV, Layout, Store

TOL = 1e-5


@pytest.fixture
def run(tmp_path, sentiment_csv):
    """Train a few steps of a tiny model (fp32) on the synthetic data; returns the run dir."""

    def train(model: str, *extra: str) -> Path:
        recipe = load_recipe(
            None,
            [
                f"model.name={model}",
                f"data.source={sentiment_csv}",
                "train.epochs=2",
                "train.batch_size=16",
                "train.eval_batch_size=64",
                "train.lr=0.01",
                "train.precision=fp32",
                "train.logging_steps=4",
                f"output.dir={tmp_path / 'runs'}",
                *extra,
            ],
        )
        return Path(api.train(recipe)["run_dir"])

    return train


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def _evals(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in lines if "eval_loss" in r]


def _assert_same_run(cached: Path, plain: Path) -> None:
    assert _max_diff(cached, plain) <= TOL
    ours, theirs = _evals(cached), _evals(plain)
    assert len(ours) == len(theirs) and all(
        math.isclose(a, b, abs_tol=TOL) for a, b in zip(ours, theirs, strict=True)
    )
    assert ours[0] != ours[-1], "nothing trained: the comparison would prove nothing"
    eval_a, eval_b = (json.loads((r / "eval.json").read_text()) for r in (cached, plain))
    assert eval_a["confusion_matrix"] == eval_b["confusion_matrix"]


# --------------------------------------------------------------------------------------------------
# exact, and used


@pytest.mark.parametrize(
    ("kind", "trainable", "depth"),
    [("bert", "[head]", 3), ("bert", "[head, {top_k: 1}]", 2), ("gpt2", "[head, {top_k: 1}]", 1)],
    ids=["bert-head", "bert-top1", "gpt2-top1"],
)
def test_cached_run_ends_like_an_uncached_one(run, still_bert, still_gpt2, kind, trainable, depth):
    model = still_bert if kind == "bert" else still_gpt2
    cached = run(model, f"freeze.trainable={trainable}", "train.trunk_cache=on", "output.name=cached")
    plain = run(model, f"freeze.trainable={trainable}", "train.trunk_cache=off", "output.name=plain")
    _assert_same_run(cached, plain)
    used = _report(cached)["trunk_cache"]
    assert used["used"] and used["depth"] == depth and used["build_seconds"] >= 0
    assert {b["split"] for b in used["builds"]} == {"train", "validation", "test"}
    assert _report(plain)["trunk_cache"] == {"used": False, "depth": 0}
    info = json.loads((cached / "run.json").read_text())["trunk_cache"]
    assert info == {"used": True, "depth": depth}
    assert not list(cached.glob(".trunk-cache-*")), "a temp file was left in the run dir"


def test_frozen_blocks_run_only_to_build_the_cache(run, still_bert, monkeypatch):
    """Counted at the blocks' own forward: with the cache, frozen block 0 runs once per build batch
    (3 splits, one batch each) and never while training or evaluating; without it, on every step."""
    from transformers.models.bert.modeling_bert import BertLayer

    calls: dict[int, int] = {}
    real = BertLayer.forward

    def counted(self, *args, **kwargs):
        index = self.attention.self.layer_idx
        calls[index] = calls.get(index, 0) + 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(BertLayer, "forward", counted)
    run(still_bert, "freeze.trainable=[head, {top_k: 1}]", "train.trunk_cache=on", "output.name=cached")
    on = dict(calls)
    calls.clear()
    run(still_bert, "freeze.trainable=[head, {top_k: 1}]", "train.trunk_cache=off", "output.name=plain")
    # 240 rows: 192 train (3 build batches of 64), 24 validation (1), 24 test (1)
    build_batches = math.ceil(192 / 64) + 1 + 1
    assert on[0] == on[1] == build_batches, on
    steps = 2 * 192 // 16
    assert calls[0] >= steps + 2 + 1, calls  # the same test fails if the cache is not installed
    assert on[2] == calls[2], (on, calls)  # the trained top block runs as often either way


def test_stages_rebuild_the_cache_where_a_stage_unfreezes_a_cached_block(run, still_bert):
    stages = "stages=[{epochs: 1, train: [head]}, {epochs: 1, train: [{top_k: 1}]}, {train: [all]}]"
    cached = run(still_bert, stages, "train.epochs=3", "output.name=cached")
    plain = run(still_bert, stages, "train.epochs=3", "train.trunk_cache=off", "output.name=plain")
    _assert_same_run(cached, plain)
    depths = _report(cached)["trunk_cache"]["depths"]
    assert depths == [{"step": 0, "depth": 3}, {"step": 12, "depth": 2}, {"step": 24, "depth": 0}]
    built = [(b["split"], b["depth"]) for b in _report(cached)["trunk_cache"]["builds"]]
    assert ("train", 3) in built and ("train", 2) in built and ("test", 3) not in built


# --------------------------------------------------------------------------------------------------
# where the states live


def test_shared_dir_serves_other_seeds_and_is_written_whole(run, still_bert, tmp_path, monkeypatch):
    shared = tmp_path / "cache"
    monkeypatch.setenv(CACHE_DIR_ENV, str(shared))
    first = run(still_bert, "freeze.trainable=[head]", "output.name=s1")
    second = run(still_bert, "freeze.trainable=[head]", "train.seed=7", "output.name=s2")
    builds = [_report(r)["trunk_cache"]["builds"] for r in (first, second)]
    assert not any(b["loaded"] for b in builds[0]) and all(b["loaded"] for b in builds[1])
    assert {b["storage"] for b in builds[0] + builds[1]} == {"shared"}
    entries = sorted(p.name for p in shared.iterdir())
    assert len(entries) == 3 and not [e for e in entries if e.endswith(".tmp")]
    assert all(
        sorted(p.name for p in (shared / e).iterdir()) == ["meta.json", "offsets.npy", "states.bin"]
        for e in entries
    )
    top1 = run(still_bert, "freeze.trainable=[head, {top_k: 1}]", "output.name=top1")  # another depth
    assert not any(b["loaded"] for b in _report(top1)["trunk_cache"]["builds"])
    assert len(list(shared.iterdir())) == 6
    monkeypatch.delenv(CACHE_DIR_ENV)
    alone = run(still_bert, "freeze.trainable=[head]", "output.name=alone")
    assert _max_diff(first, alone) <= TOL  # states read back from disk are the ones computed


def test_a_big_cache_is_memmapped_and_leaves_nothing_behind(run, still_bert, monkeypatch):
    monkeypatch.setattr(trunk_store, "RAM_LIMIT", 0)
    mapped = run(still_bert, "freeze.trainable=[head]", "output.name=mapped")
    monkeypatch.undo()
    in_ram = run(still_bert, "freeze.trainable=[head]", "output.name=ram")
    assert {b["storage"] for b in _report(mapped)["trunk_cache"]["builds"]} == {"memmap"}
    assert {b["storage"] for b in _report(in_ram)["trunk_cache"]["builds"]} == {"ram"}
    assert _max_diff(mapped, in_ram) == 0
    assert not [p for p in mapped.rglob("*") if "trunk" in p.name]


def test_bf16_states_are_stored_in_bf16_and_token_classification_uses_them(tmp_path, tiny_bert):
    people, filler = ["alice", "bob", "carol"], ["went", "to", "see", "the", "and", "was", "nice"]
    lines = []
    for i in range(60):  # "<filler> <filler> <person> <filler> <i>", the person tagged
        words = [filler[i % 7], filler[(i + 3) % 7], people[i % 3], filler[(i + 5) % 7], str(i)]
        lines += [f"{w}\t{'B-person' if w in people else 'O'}" for w in words] + [""]
    data = tmp_path / "ner.conll"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    recipe = load_recipe(
        None,
        [
            "task=token_classification",
            f"model.name={tiny_bert}",
            f"data.source={data}",
            "freeze.trainable=[head]",
            "train.epochs=1",
            "train.precision=bf16",
            f"output.dir={tmp_path / 'runs'}",
        ],
    )
    report = api.train(recipe)
    used = report["trunk_cache"]
    assert used["used"] and used["depth"] == 2
    prep = api.prepare(recipe)
    tokens = sum(len(ids) for ids in prep.datasets["train"]["input_ids"])
    train = next(b for b in used["builds"] if b["split"] == "train")
    assert train["mib"] == round(tokens * 32 * 2 / 2**20, 2)  # 2 bytes a value
    assert report["test"]["n"] > 0


def test_padded_places_each_row_at_its_tokens_on_either_side():
    flat = torch.arange(10, dtype=torch.float32).reshape(5, 2)  # rows: 2 tokens, then 3
    store = Store(flat, __import__("numpy").array([0, 2, 5]), Layout(0, torch.float32), "ram")
    right = store.padded([1, 0], torch.tensor([[1, 1, 1], [1, 1, 0]]))
    left = store.padded([1, 0], torch.tensor([[1, 1, 1], [0, 1, 1]]))
    assert right[1, 2].tolist() == [0, 0] and right[1, :2].tolist() == flat[:2].tolist()
    assert left[1, 0].tolist() == [0, 0] and left[1, 1:].tolist() == flat[:2].tolist()
    assert right[0].tolist() == left[0].tolist() == flat[2:].tolist()
    with pytest.raises(RuntimeError, match="row 0 holds 2 tokens"):
        store.padded([0], torch.tensor([[1, 1, 1]]))


# --------------------------------------------------------------------------------------------------
# eligibility


@pytest.mark.parametrize(
    ("extra", "found"),
    [
        (["freeze.trainable=[bias, head]"], "trainable parameter"),
        ([], "trainable parameter"),  # full fine-tuning
        (["peft.method=lora", "peft.target_modules=auto"], "added parameter"),
        (["soft_prompt.num_virtual_tokens=4", "data.max_length=64"], "outside the blocks"),
        (["freeze.trainable=[head]", "task=prompt_classification"], "task prompt_classification"),
    ],
    ids=["bitfit", "full", "lora", "soft-prompt", "prompt-task"],
)
def test_on_where_the_run_cannot_cache_is_a_user_error(tiny_bert_mlm, sentiment_csv, extra, found):
    overrides = [f"model.name={tiny_bert_mlm}", f"data.source={sentiment_csv}", *extra]
    with pytest.raises(UserError) as e:
        api.prepare(load_recipe(None, [*overrides, "train.trunk_cache=on"]))
    assert "train.trunk_cache" in str(e.value) and found in str(e.value), str(e.value)
    assert api.prepare(load_recipe(None, overrides)).trunk_depth == 0  # auto: quietly off


def test_on_is_refused_by_the_cli_with_exit_2(tiny_bert, sentiment_csv, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "train",
            f"model.name={tiny_bert}",
            f"data.source={sentiment_csv}",
            "train.trunk_cache=on",
            "freeze.trainable=[bias, head]",
            f"output.dir={tmp_path}",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "train.trunk_cache" in result.output and "expected" in result.output
    assert not list(tmp_path.iterdir()), "a refused run wrote something"


def test_lora_above_the_frozen_blocks_still_caches_below_it(tiny_bert, sentiment_csv):
    prep = api.prepare(
        load_recipe(
            None,
            [
                f"model.name={tiny_bert}",
                f"data.source={sentiment_csv}",
                "peft.method=lora",
                "peft.target_modules=[query, value]",
                "peft.layers_to_transform=[1]",
                "peft.layers_pattern=layer",
            ],
        )
    )
    assert prep.trunk_depth == 1
    assert (
        api.prepare(
            load_recipe(
                None,
                [
                    f"model.name={tiny_bert}",
                    f"data.source={sentiment_csv}",
                    "freeze.trainable=[head]",
                    "train.trunk_cache=off",
                ],
            )
        ).trunk_depth
        == 0
    )


def test_compare_gives_its_runs_one_cache_dir(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from hybridtune import compare

    seen: dict = {}

    class Process:
        pid = 0

        def __init__(self, cmd, env, stdout, **kwargs):  # kwargs: process_group, preexec_fn
            seen.update(env)

    monkeypatch.setattr(compare.subprocess, "Popen", Process)
    monkeypatch.setattr(compare.os, "wait4", lambda pid, options: (pid, 0, SimpleNamespace(ru_maxrss=1024)))
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    entry = {"strategy": "s", "seed": 1, "recipe": "r.yaml", "run": "s-s1", "overrides": []}
    compare._run_one(entry, tmp_path / "c" / "runs")
    assert seen[CACHE_DIR_ENV] == str(tmp_path / "c" / "cache")


@pytest.mark.parametrize(
    ("extra", "found"),
    [
        (["ensemble.shared_trunk=true", "freeze.trainable=[head]"], "ensemble.shared_trunk"),
        (["fusion.frozen=runs/some-run", "freeze.trainable=[head]"], "fusion"),
        (["task=causal_lm"], "task causal_lm"),
    ],
    ids=["shared-trunk-ensemble", "fusion", "causal-lm"],
)
def test_on_with_a_part_that_rules_it_out_fails_when_the_recipe_loads(extra, found):
    with pytest.raises(UserError) as e:
        load_recipe(None, [*extra, "train.trunk_cache=on"])
    assert e.value.where.endswith("train.trunk_cache") and found in e.value.found, str(e.value)
    load_recipe(None, extra)  # auto: no complaint
