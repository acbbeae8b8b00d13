"""Multi-process training through torchrun (DDP, gloo on CPU): the same result as one process with
the same global batch, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from hybridtune.cli import app
from tests.conftest import sentiment_rows, write_csv

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("ddp")
    model = Path(shutil.copytree(tiny_bert, root / "tiny"))
    config = json.loads((model / "config.json").read_text())
    # no dropout: the two runs then differ only by the order of floating-point sums
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    data = write_csv(root / "sentiment.csv", sentiment_rows(80))  # 64 train / 8 validation / 8 test
    return root, model, data


def _overrides(model, data, out: Path, name: str, batch: int) -> list[str]:
    return [
        f"model.name={model}",
        f"data.source={data}",
        "train.epochs=4",
        "schedule.name=constant",
        "schedule.warmup=0",
        "train.early_stopping.metric=loss",
        f"train.batch_size={batch}",
        "train.lr=0.005",
        "train.precision=fp32",
        "train.group_by_length=false",
        "train.logging_steps=1",
        f"output.dir={out}",
        f"output.name={name}",
    ]


def test_two_processes_match_one_process_with_the_same_global_batch(setup):
    root, model, data = setup
    runs = root / "runs"
    # the whole train split (64 rows) is one global batch: 64 in one process, 2 x 32 under DDP
    # the one process is this one (the CLI in-process); the two DDP ones are torchrun's
    single = CliRunner().invoke(app, ["train", *_overrides(model, data, runs, "single", 64)])
    assert single.exit_code == 0, (single.output[-3000:], single.exception)
    torchrun = Path(sys.executable).with_name("torchrun")
    ddp = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "-m",
            "hybridtune",
            "train",
            *_overrides(model, data, runs, "ddp", 32),
        ],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = runs / "single", runs / "ddp"
    # both took 4 optimizer steps of the full batch
    assert json.loads((one / "report.json").read_text())["steps"] == 4
    assert json.loads((two / "report.json").read_text())["steps"] == 4
    a, b = load_file(str(one / "final/model.safetensors")), load_file(str(two / "final/model.safetensors"))
    assert a.keys() == b.keys()
    moved = max((a[k] - b[k]).abs().max().item() for k in a)
    start = load_file(str(model / "model.safetensors"))
    assert moved <= 1e-5, moved
    # and training did move the weights (the comparison is not of two untouched models)
    assert max((a["bert." + k] - start[k]).abs().max().item() for k in start) > 1e-3
    # rank 0 alone wrote: the same files, one TensorBoard event file, no duplicated log lines
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert len(list((two / "tensorboard").iterdir())) == 1
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((one / "metrics.jsonl").read_text().splitlines())
    ev1, ev2 = (json.loads((r / "eval.json").read_text()) for r in (one, two))
    assert ev1["confusion_matrix"] == ev2["confusion_matrix"]
