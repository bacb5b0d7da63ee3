#!/usr/bin/env python3
"""The PyTorch side of bench/transmil-step.sh: seconds per training step of the official TransMIL
(models/TransMIL.py of the authors' repository, given by path; its Lookahead(RAdam) from
MyOptimizer at lr 2e-4, weight decay 1e-5; dropout on) on one random bag of N x 1024 features (on --device),
averaged over STEPS after one warm-up step. Prints `transmil N SECONDS`."""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../scripts"))
from dev.reference_transmil import load, paper_optimizer  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--transmil", required=True)
ap.add_argument("--n", type=int, required=True)
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--device", default="cpu")
args = ap.parse_args()
dev = torch.device(args.device)
ref, create_optimizer = load(args.transmil)
torch.manual_seed(0)
model = ref.TransMIL(n_classes=2).to(dev)
model.train()
opt = paper_optimizer(create_optimizer, model)
x = torch.randn(1, args.n, 1024, device=dev)
y = torch.tensor([1], device=dev)
ce = nn.CrossEntropyLoss()


def step():
    model.zero_grad()
    loss = ce(model(data=x)["logits"], y)
    loss.backward()
    opt.step()
    loss.item()  # waits for a GPU to finish the step


step()
t = time.perf_counter()
for _ in range(args.steps):
    step()
print(f"transmil {args.n} {(time.perf_counter() - t) / args.steps:.4f}")
