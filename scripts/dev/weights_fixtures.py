#!/usr/bin/env python3
"""Weights files as training scripts save them, for common::models::weights' tests (not run in CI).

    scripts/dev/weights_fixtures.py [--out common/tests/fixtures/weights]

- model_key.pth: torch.save({"model": state_dict, "epoch": 7}), the layout of checkpoints that keep
  the network under "model" beside other entries (no "state_dict" key): a [2, 3] tensor "a" of
  0..5 and a [4] tensor "b.c" of 10..13.
Needs PyTorch (scripts/dev/pypi-torch-env.sh).
"""
import argparse
import os

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="common/tests/fixtures/weights")
args = ap.parse_args()
os.makedirs(args.out, exist_ok=True)
state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b.c": torch.arange(10, 14, dtype=torch.float32)}
torch.save({"model": state, "epoch": 7}, os.path.join(args.out, "model_key.pth"))
print("wrote", os.path.join(args.out, "model_key.pth"))
