#!/usr/bin/env python3
"""Parity fixture for wsimil's TransMIL, made with the authors' own code (not run in CI).

    scripts/dev/transmil_parity.py --transmil PATH/TO/TransMIL [--out common/tests/fixtures/transmil_parity.safetensors]

PATH is a checkout of https://github.com/szc19990412/TransMIL (models/TransMIL.py, MyOptimizer/).
Needs PyTorch and nystrom-attention==0.0.9 (what the reference pins), e.g. from
`scripts/dev/torch-env.sh`. The reference model hard-codes 1024 -> 512 features; this script builds
it and then swaps in the reference's own TransLayer / PPEG classes at a small width (48 -> 32, so
8 heads of 4, 16 landmarks), with random LayerNorm affines and dropout off, so the fixture stays
small. It records, in one safetensors file:

    param.<name>   the initial state dict (official names)
    bag_a, bag_b   two bags, [1, 200, 48] and [1, 50, 48] (square padding and landmark padding both
                   exercised); labels: their classes
    logits_a/_b    eval-mode outputs
    grad.<name>    gradients of the cross-entropy of bag a at the initial weights
    loss           the losses of 7 training steps (bags a, b, a, ...), Lookahead(RAdam) at the
                   paper's lr 2e-4 and weight decay 1e-5 from the reference's create_optimizer
    after.<name>   the weights after those 7 steps (the 6th step is Lookahead's first sync)
"""
import argparse
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from dev.reference_transmil import load, paper_optimizer  # noqa: E402
from pth_to_safetensors import write_safetensors  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--transmil", required=True, help="checkout of the official TransMIL repository")
    ap.add_argument("--out", default="common/tests/fixtures/transmil_parity.safetensors")
    args = ap.parse_args()
    ref, create_optimizer = load(args.transmil)

    torch.manual_seed(20211206)
    d_in, dim, n_classes = 48, 32, 3
    model = ref.TransMIL(n_classes=n_classes)
    model._fc1 = nn.Sequential(nn.Linear(d_in, dim), nn.ReLU())
    model.cls_token = nn.Parameter(torch.randn(1, 1, dim))
    model.layer1 = ref.TransLayer(dim=dim)
    model.pos_layer = ref.PPEG(dim=dim)
    model.layer2 = ref.TransLayer(dim=dim)
    model.norm = nn.LayerNorm(dim)
    model._fc2 = nn.Linear(dim, n_classes)
    for name, p in model.named_parameters():
        if "norm" in name:  # LayerNorm starts at (1, 0): make the affine part visible
            with torch.no_grad():
                p.add_(0.1 * torch.randn_like(p))
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    bags = {"a": (torch.randn(1, 200, d_in), 2), "b": (torch.randn(1, 50, d_in), 0)}

    out = {f"param.{k}": v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        for k, (x, _) in bags.items():
            out[f"bag_{k}"] = x
            out[f"logits_{k}"] = model(data=x)["logits"]

    model.train()
    ce = nn.CrossEntropyLoss()
    optimizer = paper_optimizer(create_optimizer, model)
    losses = []
    for step in range(7):
        x, y = bags["a" if step % 2 == 0 else "b"]
        model.zero_grad()
        loss = ce(model(data=x)["logits"], torch.tensor([y]))
        loss.backward()
        if step == 0:
            for k, p in model.named_parameters():
                out[f"grad.{k}"] = p.grad.clone()
        optimizer.step()
        losses.append(loss.item())
    out["loss"] = torch.tensor(losses)
    out["labels"] = torch.tensor([float(bags["a"][1]), float(bags["b"][1])])
    for k, v in model.state_dict().items():
        out[f"after.{k}"] = v.clone()
    meta = {
        "in_dim": d_in, "dim": dim, "n_classes": n_classes, "label_a": bags["a"][1], "label_b": bags["b"][1],
        "lr": 2e-4, "weight_decay": 1e-5, "steps": 7, "torch": torch.__version__,
    }
    entries = [(k, "F32", list(v.shape), v.detach().float().contiguous().numpy().tobytes()) for k, v in out.items()]
    write_safetensors(args.out, entries, {k: str(v) for k, v in meta.items()})
    print(f"wrote {args.out}: {len(out)} tensors, losses {['%.5f' % v for v in losses]}")


if __name__ == "__main__":
    main()
