#!/usr/bin/env bash
# Tiling: read + decode + resize to 224 of every tissue patch (256 px at 20x), on one core, with
# wsimil's native tiled-JPEG reader and with OpenSlide's read_region, in one run, on the real
# CMU-1-Small-Region slide and on a large multi-level synthetic 40x slide (16384 x 12288, real
# tissue). Also times tissue detection on a 100,000 x 80,000 slide. Goals: native >= 3x OpenSlide;
# detection under 2 s. Best of 3 runs per reader, each the best of 5 cold-cache passes.
# Remote: the 40x slide in a bucket (SeaweedFS on loopback: no network latency, so this is the
# cost of the requests themselves), read by ranged GETs vs from local disk vs downloaded whole then
# read by OpenSlide (what a user of OpenSlide must do), in the embed stage's batches, with the
# bytes transferred per patch; opening (and the download) inside the time.
# Last line: `tiling: native vs openslide = N.Nx (A vs B patches/s) ...; remote: ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null
DATA=$(./scripts/fetch-data.sh)
source bench/lib.sh
wsimil_bins
work=$(mktemp -d "${TMPDIR:-/tmp}/wsimil-bench-tiling.XXXXXX")
trap 'stop_s3; rm -rf "$work"' EXIT

echo "tiling: writing the synthetic slides" >&2
"$WSIMIL_DEV" make-slide --out "$work/large.svs" --width 16384 --height 12288 --mpp 0.25
"$WSIMIL_DEV" make-slide --out "$work/huge.svs" --width 100000 --height 80000 --mpp 0.25 --repeated

have_openslide=1
if ! "$WSIMIL_DEV" bench-read --slide "$DATA/cmu_small_region.svs" --reader openslide --tissue-only >/dev/null 2>&1; then
  have_openslide=0
  echo "tiling: OpenSlide is not installed (scripts/setup.sh installs it): peer skipped" >&2
fi

best() { # slide reader -> best patches/s of 3
  for _ in 1 2 3; do $ONE_CORE "$WSIMIL_DEV" bench-read --slide "$1" --reader "$2" | awk '{print $4}'; done | sort -g | tail -1
}
declare -A rate
for slide in cmu large; do
  path="$work/large.svs"; [[ $slide == cmu ]] && path="$DATA/cmu_small_region.svs"
  rate[$slide-native]=$(best "$path" native)
  echo "tiling: $slide native $(printf '%.0f' "${rate[$slide-native]}") patches/s" >&2
  if [[ $have_openslide == 1 ]]; then
    rate[$slide-openslide]=$(best "$path" openslide)
    echo "tiling: $slide openslide $(printf '%.0f' "${rate[$slide-openslide]}") patches/s" >&2
  fi
done
for reader in native openslide; do
  [[ $reader == openslide && $have_openslide == 0 ]] && continue
  echo "tiling: tissue detection, $($ONE_CORE "$WSIMIL_DEV" bench-read --slide "$work/huge.svs" --reader "$reader" --tissue-only)" >&2
done
remote=""
if start_s3; then
  out=$($ONE_CORE "$WSIMIL_DEV" bench-remote --slide "$work/large.svs" --url s3://wsimil-bench/large.svs \
    --s3-endpoint "$S3_ENDPOINT" --s3-path-style)
  read -r -a R <<<"$(echo $out)"
  # R: local n s rate bpp  ranged n s rate bpp  download n s rate bpp
  echo "tiling: remote, 16384x12288 slide of $(du -m "$work/large.svs" | cut -f1) MB: local ${R[3]} patches/s, ranged ${R[8]} patches/s (${R[9]} bytes/patch), download+openslide ${R[13]} patches/s (${R[14]} bytes/patch)" >&2
  remote=$(python3 - "${R[3]}" "${R[8]}" "${R[9]}" "${R[13]}" "${R[14]}" <<'PY'
import sys
local, ranged, rb, down, db = map(float, sys.argv[1:])
print(f"; remote: ranged vs download+openslide = {ranged / down:.1f}x ({ranged:.0f} vs {down:.0f} patches/s, "
      f"{rb / 1024:.1f} vs {db / 1024:.1f} KiB/patch; local disk {local:.0f} patches/s)")
PY
)
  stop_s3
else
  remote="; remote: not measured (weed mini unavailable)"
  echo "tiling: SeaweedFS (weed mini) unavailable: remote line skipped" >&2
fi
detect=$($ONE_CORE "$WSIMIL_DEV" bench-read --slide "$work/huge.svs" --reader native --tissue-only | sed -E 's/.*tissue\+grid ([0-9.]+) s.*/\1/')
if [[ $have_openslide == 1 ]]; then
  python3 - "${rate[cmu-native]}" "${rate[cmu-openslide]}" "${rate[large-native]}" "${rate[large-openslide]}" "$detect" <<'PY'
import sys
cn, co, ln, lo, d = map(float, sys.argv[1:])
print(f"tiling: native vs openslide = {cn / co:.1f}x ({cn:.0f} vs {co:.0f} patches/s, CMU-1-Small-Region), "
      f"{ln / lo:.1f}x on a 16384x12288 40x pyramid ({ln:.0f} vs {lo:.0f} patches/s); "
      f"tissue detection on 100000x80000: {d:.2f} s", end="")
PY
  echo "$remote"
else
  echo "tiling: native ${rate[cmu-native]} patches/s on CMU-1-Small-Region (OpenSlide not installed: no ratio); tissue detection on 100000x80000: ${detect} s$remote"
fi
