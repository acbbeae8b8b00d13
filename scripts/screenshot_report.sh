#!/usr/bin/env bash
# Screenshot a compare's report.html in headless Chromium, for the README:
#   bash scripts/screenshot_report.sh runs/compare-default/report.html docs/img/compare_report.png
set -euo pipefail
report="$(realpath "$1")"; out="$2"
profile="$(mktemp -d)"
chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
  --no-first-run --hide-scrollbars --user-data-dir="$profile" --window-size=1300,1500 \
  --screenshot="$(realpath -m "$out")" "file://$report" 2>/dev/null
rm -rf "$profile"
echo "$out"
