#!/usr/bin/env bash
# Coordinator scale: a synthetic cohort of N slides (default 10,000) through one NATS JetStream
# server with two workers that do no real work (`worker --noop`: they take, record and acknowledge
# each job). Measures jobs/s published by the coordinator and completed through the pool, checks
# that every job is accounted for, and compares the coordinator's peak memory with a cohort ten
# times smaller. Goal: >= 2,000 jobs/s, memory flat in the cohort size beyond the manifest.
# Last line: `coordinator-scale: N jobs, published P jobs/s, completed C jobs/s, ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-10000}
SMALL=$((N / 10))
./scripts/setup.sh >/dev/null
DATA=$(./scripts/fetch-data.sh)
TOOLS=$(./scripts/fetch-tools.sh)
source bench/lib.sh
wsimil_bins
work=$(mktemp -d "${TMPDIR:-/tmp}/wsimil-bench-scale.XXXXXX")
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$TOOLS/nats-server" -js -a 127.0.0.1 -p "$port" -sd "$work/js" 2>"$work/nats.log" & pids+=($!)
until python3 -c "import socket; socket.create_connection(('127.0.0.1',$port),1)" 2>/dev/null; do sleep 0.1; done
export WSIMIL_NATS_URL="nats://127.0.0.1:$port" WSIMIL_LOG=info

# Cohorts: hard links to one small real slide, one manifest row each.
make_cohort() { # name count
  mkdir -p "$work/$1"
  python3 - "$work/$1" "$2" "$DATA/small.svs" <<'PY'
import os, sys
d, n, src = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(os.path.join(d, "manifest.csv"), "w") as m:
    m.write("slide_id,path,label\n")
    for i in range(n):
        p = os.path.join(d, f"s{i:06d}.svs")
        os.link(src, p)
        m.write(f"{os.path.basename(d)}-{i:06d},{p},{'tumor' if i % 2 else 'normal'}\n")
PY
}
make_cohort small "$SMALL"
make_cohort large "$N"

for w in 1 2; do
  "$WSIMIL" worker --noop --name "noop-$w" --concurrency 64 --store "$work/store" 2>"$work/worker-$w.log" & pids+=($!)
done

run_cohort() { # name -> prints "published_secs stage_secs max_rss_kb"
  /usr/bin/time -f "%M" -o "$work/$1.rss" "$WSIMIL" run --manifest "$work/$1/manifest.csv" --store "$work/store" \
    --random-weights 1 --until tile >"$work/$1.out" 2>"$work/$1.log"
  python3 - "$work/$1.log" "$work/$1.out" "$work/$1.rss" <<'PY'
import re, sys
log, out, rss = (open(p).read() for p in sys.argv[1:4])
published = float(re.search(r"stage published.*?secs=([0-9.]+)", log).group(1))
stage = re.search(r"tile\s+(\d+) planned,\s+(\d+) computed.*?\s([0-9.]+) s", out)
print(published, stage.group(3), rss.strip().splitlines()[-1], stage.group(1), stage.group(2))
PY
}
read -r s_pub s_stage s_rss s_planned s_done <<<"$(run_cohort small)"
read -r pub stage rss planned done <<<"$(run_cohort large)"
"$WSIMIL" status > "$work/status.txt"
echo "status after both cohorts:" >&2; cat "$work/status.txt" >&2
total_done=$(awk '$1 == "tile" { print $4 }' "$work/status.txt")
python3 - "$N" "$pub" "$stage" "$rss" "$SMALL" "$s_rss" "$planned" "$done" "$total_done" "$((N + SMALL))" <<'PY'
import sys
n, pub, stage, rss, small, s_rss, planned, done, total_done, expected = sys.argv[1:]
n, pub, stage = int(n), float(pub), float(stage)
lost = int(expected) - int(total_done)
print(f"coordinator-scale: {n} jobs, published {n / pub:.0f} jobs/s, completed {n / stage:.0f} jobs/s "
      f"(goal 2000), coordinator max RSS {int(rss) / 1024:.0f} MiB vs {int(s_rss) / 1024:.0f} MiB at {small} slides, "
      f"{done}/{planned} done, {lost} lost")
PY
