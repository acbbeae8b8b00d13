#!/usr/bin/env bash
# The CUDA check, ready for the first machine with an NVIDIA GPU (under 10 minutes on one H100/H200):
#   bash scripts/gpu_check.sh [OUT_DIR]        # default: gpu-check/
# 1. the default recipe (MiniLM, full fine-tuning, 3 epochs of Rotten Tomatoes) with precision auto
#    (bf16 on a GPU that supports it), 2. recipes/lora.yaml, 3. predict with both, 4. one
#    /v1/classify request to `hybridtune serve` on 127.0.0.1, 5. a 2-process DDP run (torchrun) if
#    two or more GPUs are visible. Writes OUT_DIR/gpu_check.json (GPU, precision, test accuracy,
#    train seconds, samples/s per run) and the logs; docs/BENCHMARKS.md records its figures.
# It needs an environment with CUDA torch and hybridtune installed, e.g.
#   TORCH_SPEC="torch==2.13.0" bash scripts/setup.sh   (on a CUDA machine: PyPI's torch is the CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu-check}"
mkdir -p "$OUT"
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF' | tee "$OUT/device.txt"
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch (a CPU build, or no driver)"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name()}, bf16 {torch.cuda.is_bf16_supported()}")
PYEOF
ht() { "$PY" -m hybridtune "$@"; }
start=$SECONDS
ht train output.dir="$OUT/runs" output.name=full 2>&1 | tail -n 30 > "$OUT/full.log"
ht train recipes/lora.yaml output.dir="$OUT/runs" output.name=lora 2>&1 | tail -n 30 > "$OUT/lora.log"
for run in full lora; do
  ht predict "$OUT/runs/$run" "a gorgeous, witty, seductive movie" "a dull, lifeless mess" --json > "$OUT/predict_$run.jsonl"
done
# serve: one authenticated request on the loopback, then stop
export HYBRIDTUNE_TOKEN="gpu-check-$RANDOM$RANDOM"
ht serve "$OUT/runs/lora" --port 8765 > "$OUT/serve.log" 2>&1 &
server=$!
for _ in $(seq 60); do curl -fs http://127.0.0.1:8765/health >/dev/null 2>&1 && break; sleep 1; done
curl -fs -H "Authorization: Bearer $HYBRIDTUNE_TOKEN" -H "Content-Type: application/json" \
  -d '{"texts": ["a gorgeous, witty, seductive movie"]}' http://127.0.0.1:8765/v1/classify > "$OUT/serve_response.json"
kill "$server"; wait "$server" 2>/dev/null || true
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
  "$PY" -m torch.distributed.run --nproc_per_node 2 -m hybridtune train recipes/lora.yaml train.epochs=1 \
    output.dir="$OUT/runs" output.name=lora_ddp 2>&1 | tail -n 30 > "$OUT/ddp.log"
fi
"$PY" - "$OUT" "$((SECONDS - start))" <<'PYEOF'
import json, sys
from pathlib import Path
out, seconds = Path(sys.argv[1]), int(sys.argv[2])
runs = {}
for report in sorted((out / "runs").glob("*/report.json")):
    r = json.loads(report.read_text())
    runs[report.parent.name] = {k: r.get(k) for k in ("test", "precision", "precision_reason", "train_seconds",
                                                       "train_samples_per_second", "cuda_peak_mib", "steps")}
summary = {"device": (out / "device.txt").read_text().strip(), "wall_seconds": seconds, "runs": runs,
           "serve_response": json.loads((out / "serve_response.json").read_text())}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PYEOF
