#!/usr/bin/env bash
# docs/report.png: the demo's report.html as headless Chromium draws it (the top 2,300 px at 1,280
# wide). Run scripts/demo.sh first; DEMO_DIR as there.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEMO_DIR=${DEMO_DIR:-$PWD/.demo}
page=$(ls -t "$DEMO_DIR"/store/runs/*/report.html | head -1)
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,2300 \
  --virtual-time-budget=8000 --screenshot="$PWD/docs/report.png" "file://$page" 2>/dev/null
echo "docs/report.png from $page"
