"""precision: auto = bf16 only where it is native and measured faster; both CPU kinds faked."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hybridtune.cli import app
from hybridtune.train import precision

INTEL = ("Intel(R) Xeon(R) Platinum 8375C", {"avx512f", "avx512bw", "avx512_vnni"})  # bf16 emulated
AMD = ("AMD EPYC 9R14", {"avx512f", "avx512bw", "avx512_bf16"})


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """Fake a CPU (model, flags) and the probe's result; count the probes; a cache dir of our own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)
    probes = []

    def fake(cpu, speeds):
        monkeypatch.setattr(precision, "cpu_model_and_flags", lambda: cpu)
        monkeypatch.setattr(precision, "probe", lambda threads=None: probes.append(1) or dict(speeds))
        precision.auto_choice.cache_clear()

    yield fake, probes
    precision.auto_choice.cache_clear()


def test_a_cpu_without_native_bf16_gets_fp32_without_a_probe(machine):
    fake, probes = machine
    fake(INTEL, {"fp32": 65.0, "bf16": 26.0})
    choice = precision.choose("auto")
    assert choice.precision == "fp32"
    assert "no native bf16" in choice.reason and "Xeon" in choice.reason
    assert probes == []  # the flags decide; torch's mkldnn flag (true on any AVX512BW CPU) is not asked
    assert precision.autocast("auto").__class__.__name__ == "nullcontext"


def test_a_cpu_with_native_bf16_measured_faster_gets_bf16(machine):
    fake, probes = machine
    fake(AMD, {"fp32": 140.0, "bf16": 395.0})
    choice = precision.choose("auto")
    assert choice.precision == "bf16"
    assert "avx512_bf16" in choice.reason and "395.0" in choice.reason and "140.0" in choice.reason


def test_native_flags_but_a_slower_probe_keep_fp32(machine):
    fake, _ = machine
    fake(AMD, {"fp32": 140.0, "bf16": 90.0})
    choice = precision.choose("auto")
    assert choice.precision == "fp32" and "not faster" in choice.reason


def test_the_probe_runs_once_per_machine_then_comes_from_the_cache(machine, tmp_path):
    fake, probes = machine
    fake(AMD, {"fp32": 140.0, "bf16": 395.0})
    precision.choose("auto")
    precision.auto_choice.cache_clear()  # a new process
    assert precision.choose("auto").precision == "bf16"
    assert len(probes) == 1
    cached = json.loads((tmp_path / "cache" / "hybridtune" / "precision.json").read_text())
    assert list(cached.values()) == [{"fp32": 140.0, "bf16": 395.0}]
    fake((AMD[0], AMD[1] | {"amx_bf16"}), {"fp32": 1.0, "bf16": 2.0})  # another machine: measured anew
    precision.choose("auto")
    assert len(probes) == 2


def test_the_real_probe_measures_both_kinds():
    speeds = precision.probe()
    assert set(speeds) == {"fp32", "bf16"} and speeds["fp32"] > 0 and speeds["bf16"] > 0


def test_an_explicit_precision_is_kept_and_said_so(machine):
    fake, probes = machine
    fake(INTEL, {"fp32": 65.0, "bf16": 26.0})
    assert precision.choose("bf16") == precision.Choice("bf16", "set by the recipe (train.precision)")
    assert probes == []


def test_a_run_prints_the_choice_and_records_it_in_report_json(machine, quick, tmp_path):
    fake, _ = machine
    fake(INTEL, {"fp32": 65.0, "bf16": 26.0})
    args = [a for a in quick(None, "train.max_steps=2") if not a.startswith("train.precision")]
    result = CliRunner().invoke(app, ["train", *args, "output.name=p"])
    assert result.exit_code == 0, result.output
    assert "precision fp32: CPU Intel(R) Xeon(R) Platinum 8375C has no native bf16" in result.output
    report = json.loads((tmp_path / "runs" / "p" / "report.json").read_text())
    assert report["precision"] == "fp32" and "no native bf16" in report["precision_reason"]
