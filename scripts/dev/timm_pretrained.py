"""The eval preprocessing timm gives every pretrained ViT (`vit_*`), for `--embedder vit:<name>[.<tag>]`.

    python timm_pretrained.py common/src/models/timm_pretrained.json

For each `name.tag` timm lists (`timm.list_pretrained("vit_*")`) with a square input, what
`resolve_data_config` (which `resolve_model_data_config` calls) and `create_transform` use at
evaluation: input side, mean and std, crop_pct (Resize to floor(side / crop_pct), then
CenterCrop(side)), crop mode and interpolation; and for each name the tag timm loads when none is
given. (Non-square inputs, e.g. Sapiens' 1024x768, are left out: wsimil's patches are square.) Run with PyPI's timm (scripts/dev/pypi-torch-env.sh); the JSON is
committed and a test checks that wsimil resolves every entry to exactly these values.
"""

import json
import sys

import timm
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg


def main(out):
    entries, defaults = {}, {}
    for full in timm.list_pretrained("vit_*"):
        name, tag = full.split(".", 1)
        cfg = get_pretrained_cfg(full)
        # What timm's own pipeline resolves for a model built with this config (no overrides).
        data = resolve_data_config(pretrained_cfg=cfg.to_dict())
        c, h, w = data["input_size"]
        if h != w:
            continue
        entries[full] = {
            "input_px": h,
            "mean": [float(v) for v in data["mean"]],
            "std": [float(v) for v in data["std"]],
            "crop_pct": float(data["crop_pct"]),
            "crop_mode": data["crop_mode"],
            "interpolation": data["interpolation"],
        }
        if name not in defaults:
            defaults[name] = get_pretrained_cfg(name).tag
    with open(out, "w") as f:
        json.dump({"timm": timm.__version__, "default_tag": defaults, "pretrained": entries}, f, indent=0,
                  sort_keys=True)
    print(f"{len(entries)} tags of {len(defaults)} names from timm {timm.__version__}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
