"""Read a feature file as CLAM and TRIDENT do (h5py), and print what they see as JSON.

    python read_h5_features.py SLIDE.h5

CLAM's `Generic_MIL_Dataset` (with `use_h5`) takes `features` and `coords` by name; TRIDENT's
readers (`IO.read_coords`, its slide encoders) take `coords.attrs` as a dict, `patch_size_level0`
among them. This prints the datasets' shapes and dtypes, sums that pin their contents, and every
attribute (bytes decoded, numpy scalars as Python numbers), for a test to compare with what wsimil
wrote.
"""

import json
import sys

import h5py
import numpy as np


def plain(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def main(path):
    with h5py.File(path, "r") as f:
        feats = f["features"][:]
        coords = f["coords"][:]
        out = {
            "features": {
                "shape": list(feats.shape),
                "dtype": str(feats.dtype),
                "sum": float(feats.astype(np.float64).sum()),
                "first_row": [float(x) for x in feats[0]] if len(feats) else [],
                "attrs": {k: plain(v) for k, v in f["features"].attrs.items()},
            },
            "coords": {
                "shape": list(coords.shape),
                "dtype": str(coords.dtype),
                "rows": coords.tolist(),
                "attrs": {k: plain(v) for k, v in f["coords"].attrs.items()},
            },
        }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
