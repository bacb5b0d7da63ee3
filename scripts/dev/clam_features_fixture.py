#!/usr/bin/env python3
"""Small CLAM-format feature files for wsimil's import tests (not run in CI).

    scripts/dev/clam_features_fixture.py [--out coordinator/tests/fixtures]

Writes what CLAM's extract_features_fp.py writes for a slide: `clam_slide.h5` with a chunked,
resizable `features` [N, D] float32 dataset and `coords` [N, 2] int64 (as CLAM's save_hdf5 creates
them, maxshape (None, ...)), and `clam_slide.pt`, the same features saved with torch.save. N = 5,
D = 8, values i + j / 8 so a test can check every element. Needs h5py and PyTorch."""
import argparse
import os

import h5py
import numpy as np
import torch

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="coordinator/tests/fixtures")
args = ap.parse_args()
n, d = 5, 8
feats = np.array([[i + j / 8 for j in range(d)] for i in range(n)], dtype=np.float32)
coords = np.array([[256 * i, 512 * i + 7] for i in range(n)], dtype=np.int64)
with h5py.File(os.path.join(args.out, "clam_slide.h5"), "w") as f:
    for key, val in [("features", feats), ("coords", coords)]:
        ds = f.create_dataset(key, shape=val.shape, maxshape=(None,) + val.shape[1:], chunks=(1,) + val.shape[1:],
                              dtype=val.dtype)
        ds[:] = val
    f["coords"].attrs["patch_size"] = 256
    f["coords"].attrs["patch_level"] = 0
torch.save(torch.from_numpy(feats), os.path.join(args.out, "clam_slide.pt"))
print("wrote clam_slide.h5 and clam_slide.pt")
