#!/usr/bin/env python3
"""Parity fixture for wsimil's ABMIL, made with Ilse et al.'s own GatedAttention (not run in CI).

    scripts/dev/abmil_parity.py --attention-mil PATH [--out common/tests/fixtures/abmil_parity.safetensors]

PATH is a checkout of https://github.com/AMLab-Amsterdam/AttentionDeepMIL (model.py). The reference
embeds MNIST digits with a small CNN before its MIL part; the CNN is replaced by the identity, so
bags are [1, K, 800] instance features (what its view(-1, 50*4*4) expects), and the MIL part is
built at small widths (M = 16, L = 8) from the reference's own layer layout. Records, in one
safetensors file: the state dict (param.<name>), a bag of 9 instances, the reference's Y_prob and
attention A, and the gradients of its Bernoulli negative log-likelihood for label 1 (grad.<name>).
Needs PyTorch (scripts/dev/torch-env.sh)."""
import argparse
import importlib.util
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pth_to_safetensors import write_safetensors  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--attention-mil", required=True)
ap.add_argument("--out", default="common/tests/fixtures/abmil_parity.safetensors")
args = ap.parse_args()
spec = importlib.util.spec_from_file_location("ref_abmil", f"{args.attention_mil}/model.py")
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)

torch.manual_seed(2018)
m, l = 16, 8
model = ref.GatedAttention()
model.feature_extractor_part1 = nn.Identity()
model.feature_extractor_part2 = nn.Sequential(nn.Linear(50 * 4 * 4, m), nn.ReLU())
model.attention_V = nn.Sequential(nn.Linear(m, l), nn.Tanh())
model.attention_U = nn.Sequential(nn.Linear(m, l), nn.Sigmoid())
model.attention_w = nn.Linear(l, 1)
model.classifier = nn.Sequential(nn.Linear(m, 1), nn.Sigmoid())
model.M, model.L = m, l
bag = torch.randn(1, 9, 50 * 4 * 4)
out = {f"param.{k}": v.clone() for k, v in model.state_dict().items()}
y_prob, _, a = model(bag)
out.update({"bag": bag, "y_prob": y_prob.detach(), "attention": a.detach()})
# The reference's loss (main.py): Bernoulli negative log-likelihood of the bag label.
y = torch.tensor(1.0)
p = torch.clamp(y_prob, min=1e-5, max=1.0 - 1e-5)
loss = -1.0 * (y * torch.log(p) + (1.0 - y) * torch.log(1.0 - p))
loss.sum().backward()
for k, v in model.named_parameters():
    out[f"grad.{k}"] = v.grad.clone()
entries = [(k, "F32", list(v.shape), v.detach().float().contiguous().numpy().tobytes()) for k, v in out.items()]
write_safetensors(args.out, entries, {"torch": torch.__version__, "label": "1"})
print(f"wrote {args.out}: {len(entries)} tensors, y_prob {y_prob.item():.5f}")
