#!/usr/bin/env python3
"""Parity fixture for wsimil's DSMIL, made with the authors' own MILNet (not run in CI).

    scripts/dev/dsmil_parity.py --dsmil DSMIL_CHECKOUT [--out common/tests/fixtures/dsmil_parity.safetensors]

DSMIL_CHECKOUT is a checkout of https://github.com/binli123/dsmil-wsi (dsmil.py; made with commit
80465ed534ac49b5e550833da56c27936f0b9440). Each model is the authors' MILNet(FCLayer(D, C),
BClassifier(D, C, dropout_v=0.0, nonlinear=True, passing_v=...)) on 24-d features, as their
train_tcga.py builds it; only the query network, 128 wide in their constructor, is rebuilt 16 wide
from the same layers (Linear, ReLU, Linear, Tanh) so that the fixture stays small (their forward
takes the width, and so the sqrt scaling, from Q). PyTorch's default init (not their orthogonal
init, whose zero biases would test less). A bag of 13 instances.

- bin: C = 1, label [1] (Camelyon16's binary setting, --num_classes=1).
- multi: C = 3, one-hot label for class 2 (their TCGA setting, --num_classes=3).
- passv: C = 1, label [0], passing_v=True (the value network Dropout, Linear(D, D), ReLU).

Records for each, in eval mode (no dropout): the state dict (<c>.param.<name>), the instance scores
<c>.classes [N, C], the bag logits <c>.bag [1, C], the attention <c>.A [N, C], the bag
representation <c>.B [1, C, D], the label <c>.label [C], the critical instance of each class
<c>.critical [C] (its index, as float), the max instance score <c>.max [C], the training loss of
their train_tcga.py <c>.loss [1] (0.5 * BCEWithLogits(bag) + 0.5 * BCEWithLogits(max over
instances), each a mean over the C classes) and its gradients (<c>.grad.<name>), and the test
scores [C]: <c>.score = sigmoid(bag) (train_tcga.py's test() by default) and <c>.score_avg =
(sigmoid(max) + sigmoid(bag)) / 2 (testing_tcga.py --average, and train_tcga.py before 2024).
Needs PyTorch (scripts/dev/pypi-torch-env.sh).
"""
import argparse
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pth_to_safetensors import write_safetensors  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--dsmil", required=True)
ap.add_argument("--out", default="common/tests/fixtures/dsmil_parity.safetensors")
args = ap.parse_args()
sys.path.insert(0, args.dsmil)
import dsmil as mil  # noqa: E402

torch.manual_seed(2021)
D, Q, N = 24, 16, 13
bag = torch.randn(N, D)
out = {"bag": bag}
for name, n_classes, passing_v, label in [
    ("bin", 1, False, [1.0]),
    ("multi", 3, False, [0.0, 0.0, 1.0]),
    ("passv", 1, True, [0.0]),
]:
    m = mil.MILNet(
        mil.FCLayer(D, n_classes),
        mil.BClassifier(D, n_classes, dropout_v=0.0, nonlinear=True, passing_v=passing_v),
    )
    m.b_classifier.q = nn.Sequential(nn.Linear(D, Q), nn.ReLU(), nn.Linear(Q, Q), nn.Tanh())
    m.eval()
    for k, v in m.state_dict().items():
        out[f"{name}.param.{k}"] = v.clone()
    bag_label = torch.tensor([label])
    criterion = nn.BCEWithLogitsLoss()
    ins_prediction, bag_prediction, A, B = m(bag)
    max_prediction, _ = torch.max(ins_prediction, 0)
    bag_loss = criterion(bag_prediction.view(1, -1), bag_label.view(1, -1))
    max_loss = criterion(max_prediction.view(1, -1), bag_label.view(1, -1))
    loss = 0.5 * bag_loss + 0.5 * max_loss
    loss.backward()
    _, m_indices = torch.sort(ins_prediction.detach(), 0, descending=True)
    critical = m_indices[0, :]
    assert torch.equal(critical, ins_prediction.detach().argmax(0)), "tied instance scores"
    out[f"{name}.classes"] = ins_prediction.detach()
    out[f"{name}.bag"] = bag_prediction.detach()
    out[f"{name}.A"] = A.detach()
    out[f"{name}.B"] = B.detach()
    out[f"{name}.label"] = bag_label.view(-1)
    out[f"{name}.critical"] = critical.float()
    out[f"{name}.max"] = max_prediction.detach()
    out[f"{name}.loss"] = loss.detach().reshape(1)
    with torch.no_grad():
        out[f"{name}.score"] = torch.sigmoid(bag_prediction).reshape(-1)
        out[f"{name}.score_avg"] = (0.5 * torch.sigmoid(max_prediction) + 0.5 * torch.sigmoid(bag_prediction)).reshape(-1)
    for k, v in m.named_parameters():
        assert v.grad is not None, k
        out[f"{name}.grad.{k}"] = v.grad.clone()
entries = [(k, "F32", list(v.shape), v.detach().float().contiguous().numpy().tobytes()) for k, v in out.items()]
write_safetensors(args.out, entries, {"torch": torch.__version__})
print(f"wrote {args.out}: {len(entries)} tensors")
