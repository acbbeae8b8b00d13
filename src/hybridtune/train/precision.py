"""Precision: `auto` resolves by measuring the machine, not by trusting a library flag.

bf16 is chosen only where it is native *and* measured faster than fp32:
- CUDA: the GPU supports bf16 (`torch.cuda.is_bf16_supported()`); no probe needed.
- CPU: the CPU flags name AVX512-BF16 or AMX-BF16, and a short probe (a bf16 vs fp32 matmul, under
  0.2 s, cached per machine) shows bf16 faster. torch's `mkldnn._is_mkldnn_bf16_supported()` is no
  guide: it is true on any AVX512BW CPU, where oneDNN *emulates* bf16 — measured on such an Intel
  Xeon (AVX512F, no AVX512-BF16 / AMX): a 1024² matmul ran 65 GFLOP/s fp32 vs 26 bf16 and a MiniLM
  training step 2-4x slower under bf16 autocast.

The choice and its reason go to the start of a run's output and to report.json. The same autocast
covers the passes Trainer does not run (test report, eval, predict). Light on imports (torch only):
the CLI's commands that do not train import it too.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

NATIVE_FLAGS = ("avx512_bf16", "amx_bf16")
PROBE_SIZE = 384  # a 384² matmul: 0.11 GFLOP, about a millisecond on a current CPU core
PROBE_REPEATS = 8


@dataclass(frozen=True)
class Choice:
    precision: str  # "bf16" | "fp32"
    reason: str


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags from /proc/cpuinfo (Linux); elsewhere what Python knows."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model or platform.machine(), flags


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "hybridtune" / "precision.json"


def probe(threads: int | None = None) -> dict:
    """GFLOP/s of a PROBE_SIZE² matmul in fp32 and in bf16: the best of PROBE_REPEATS each, the two
    kinds alternating, so that a busy machine slows both alike instead of deciding the comparison."""
    size, flop = PROBE_SIZE, 2 * PROBE_SIZE**3
    generator = torch.Generator().manual_seed(0)
    operands = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
        for _ in range(2):  # warm-up: kernel selection, thread pool, first touch of memory
            torch.mm(a, b)
        operands[name] = (a, b)
    best = dict.fromkeys(operands, float("inf"))
    for _ in range(PROBE_REPEATS):
        for name, (a, b) in operands.items():
            started = time.perf_counter()
            torch.mm(a, b)
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: round(flop / seconds / 1e9, 1) for name, seconds in best.items()}


def measured_speeds(model: str, flags: set[str]) -> dict:
    """The probe's result for this machine: read from the per-machine cache, else measured and cached."""
    threads = torch.get_num_threads()
    key = hashlib.sha256(
        f"{model}|{' '.join(sorted(flags))}|{torch.__version__}|{threads}".encode()
    ).hexdigest()[:16]
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and isinstance(cached.get(key), dict):
        return cached[key]
    speeds = probe(threads)
    if not isinstance(cached, dict):
        cached = {}
    cached[key] = speeds
    with contextlib.suppress(OSError):  # an unwritable home only costs the next run another probe
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        os.replace(tmp, path)
    return speeds


@functools.cache
def auto_choice() -> Choice:
    """What `precision: auto` means on this machine, and why (measured once per process)."""
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return Choice("bf16", f"CUDA device {torch.cuda.get_device_name()} supports bf16")
        return Choice("fp32", f"CUDA device {torch.cuda.get_device_name()} has no bf16")
    model, flags = cpu_model_and_flags()
    native = [f for f in NATIVE_FLAGS if f in flags]
    if not native:
        return Choice("fp32", f"CPU {model} has no native bf16 (no {' / '.join(NATIVE_FLAGS)} flag)")
    speeds = measured_speeds(model, flags)
    ratio = speeds["bf16"] / max(speeds["fp32"], 1e-9)
    measured = f"probe: bf16 {speeds['bf16']} vs fp32 {speeds['fp32']} GFLOP/s"
    if ratio > 1.0:
        return Choice("bf16", f"CPU {model} has native bf16 ({', '.join(native)}); {measured}")
    return Choice("fp32", f"CPU {model} has {', '.join(native)} but bf16 was not faster ({measured})")


def choose(precision: str) -> Choice:
    if precision == "auto":
        return auto_choice()
    return Choice(precision, "set by the recipe (train.precision)")


def native_bf16() -> bool:
    """True where `auto` picks bf16: a native bf16 device measured faster than fp32."""
    return auto_choice().precision == "bf16"


def resolve_precision(precision: str) -> str:
    return choose(precision).precision


def autocast(precision: str):
    """The recipe's precision outside Trainer (test report, eval, predict): bf16 autocast where it
    resolves to bf16, as Trainer's own training and validation passes run; a no-op for fp32."""
    if resolve_precision(precision) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
