#!/usr/bin/env python3
"""Parity fixture for wsimil's CLAM, made with the authors' own CLAM_SB and CLAM_MB (not run in CI).

    scripts/dev/clam_parity.py --clam CLAM_CHECKOUT [--out common/tests/fixtures/clam_parity.safetensors]

CLAM_CHECKOUT is a checkout of https://github.com/mahmoodlab/CLAM (models/model_clam.py). Each
model is built by the authors' constructor (gated attention, dropout 0.25), then its layers are
rebuilt at small widths (24-d features, 16 wide, attention 8) from the authors' own layer classes
(Linear, ReLU, Dropout, Attn_Net_Gated), so the fixture stays small and the forward pass, the
instance evaluation and the loss are the authors' code. k_sample 4 on a bag of 13 instances.

- sb: CLAM_SB, 2 classes, not subtyping, label 1.
- mb: CLAM_MB, 3 classes, subtyping, label 2.

Records for each, in eval mode (no dropout): the state dict (<m>.param.<name>), the logits, the raw
attention A_raw, the instance loss (instance_eval=True), and the gradients of the authors' training
loss 0.7 * cross-entropy + 0.3 * instance loss (<m>.grad.<name>). Needs PyTorch
(scripts/dev/pypi-torch-env.sh).
"""
import argparse
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pth_to_safetensors import write_safetensors  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--clam", required=True)
ap.add_argument("--out", default="common/tests/fixtures/clam_parity.safetensors")
args = ap.parse_args()
sys.path.insert(0, args.clam)
from models.model_clam import CLAM_MB, CLAM_SB, Attn_Net_Gated  # noqa: E402

torch.manual_seed(2021)
D, L, A, N, K = 24, 16, 8, 13, 4
bag = torch.randn(N, D)
out = {"bag": bag.unsqueeze(0)}
for name, cls, n_classes, subtyping, label in [("sb", CLAM_SB, 2, False, 1), ("mb", CLAM_MB, 3, True, 2)]:
    m = cls(gate=True, size_arg="small", dropout=0.25, k_sample=K, n_classes=n_classes, subtyping=subtyping, embed_dim=D)
    branches = n_classes if cls is CLAM_MB else 1
    m.attention_net = nn.Sequential(
        nn.Linear(D, L), nn.ReLU(), nn.Dropout(0.25), Attn_Net_Gated(L=L, D=A, dropout=0.25, n_classes=branches)
    )
    if cls is CLAM_MB:
        m.classifiers = nn.ModuleList([nn.Linear(L, 1) for _ in range(n_classes)])
    else:
        m.classifiers = nn.Linear(L, n_classes)
    m.instance_classifiers = nn.ModuleList([nn.Linear(L, 2) for _ in range(n_classes)])
    m.eval()
    for k, v in m.state_dict().items():
        out[f"{name}.param.{k}"] = v.clone()
    y = torch.tensor([label])
    logits, _, _, a_raw, results = m(bag, label=y, instance_eval=True)
    loss = 0.7 * nn.CrossEntropyLoss()(logits, y) + 0.3 * results["instance_loss"]
    loss.backward()
    out[f"{name}.logits"] = logits.detach()
    out[f"{name}.raw_attention"] = a_raw.detach()
    out[f"{name}.instance_loss"] = results["instance_loss"].detach().reshape(1)
    for k, v in m.named_parameters():
        if v.grad is not None:
            out[f"{name}.grad.{k}"] = v.grad.clone()
entries = [(k, "F32", list(v.shape), v.detach().float().contiguous().numpy().tobytes()) for k, v in out.items()]
write_safetensors(args.out, entries, {"torch": torch.__version__})
print(f"wrote {args.out}: {len(entries)} tensors")
