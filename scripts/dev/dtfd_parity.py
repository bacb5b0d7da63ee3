#!/usr/bin/env python3
"""Parity fixture for wsimil's DTFD-MIL, made with the authors' own modules (not run in CI).

    scripts/dev/dtfd_parity.py --dtfd DTFD_CHECKOUT [--out common/tests/fixtures/dtfd_parity.safetensors]

DTFD_CHECKOUT is a checkout of https://github.com/hrzhang1123/DTFD-MIL (made with commit
10964f4dcc27c65ce110a0e9a3b9240bff58da8a). Each case builds the four modules of its
Main_DTFD_MIL.py from the authors' classes (DimReduction, Attention_Gated, Classifier_1fc,
Attention_with_Classifier) at small widths: 24-d features, mDim 16, attention D 8, with PyTorch's
default init. One 13-instance bag is split into numGroup = 4 pseudo-bags by a recorded random order
(np.array_split of the shuffled indices, as train_attention_preFeature_DTFD does), and the steps of
that function are run on it:

- afs: 2 classes, distill AFS (the authors' default), total_instance 4;
- maxmins: 3 classes, distill MaxMinS, total_instance 8 (two a side per pseudo-bag), one residual
  block (numLayer_Res 1);
- maxs: 2 classes, distill MaxS, total_instance 4.

Records per case: the parameters under the names best_model.pth gives them (its four state dicts'
keys, then the module's names: <c>.param.dim_reduction.fc1.weight, ...), the order <c>.order (as
float), the label, each pseudo-bag's tier-1 logits <c>.pseudo [4, C], the distilled features
<c>.distilled, tier 2's logits <c>.logits [1, C], the tier-1 loss <c>.loss0 and the tier-2 loss
<c>.loss1, and the gradients each optimizer steps with: tier 1's parameters from loss0 (before
clipping), tier 2's from loss1 (<c>.grad.<name>). No optimizer steps are taken (the authors' order,
optimizer0.step() before loss1.backward(), fails for AFS on current PyTorch; the gradients are
those their code steps with where it runs). Needs PyTorch (scripts/dev/pypi-torch-env.sh).
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pth_to_safetensors import write_safetensors  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--dtfd", required=True)
ap.add_argument("--out", default="common/tests/fixtures/dtfd_parity.safetensors")
args = ap.parse_args()
sys.path.insert(0, args.dtfd)
from Model.Attention import Attention_Gated, Attention_with_Classifier  # noqa: E402
from Model.network import Classifier_1fc, DimReduction  # noqa: E402


def cam(classifier, features):
    """utils.get_cam_1d (utils.py imports scikit-learn, which nothing here needs): the class
    activations of features [1, n, L] by the classifier's weight, [1, C, n]."""
    weight = list(classifier.parameters())[-2]
    return torch.einsum("bgf,cf->bcg", [features, weight])


torch.manual_seed(2022)
D, L, A, N, G = 24, 16, 8, 13, 4
bag = torch.randn(N, D)
out = {"bag": bag}
rng = np.random.default_rng(7)
for name, n_classes, distill, total, res, label in [
    ("afs", 2, "AFS", 4, 0, 1),
    ("maxmins", 3, "MaxMinS", 8, 1, 2),
    ("maxs", 2, "MaxS", 4, 0, 0),
]:
    modules = {
        "classifier": Classifier_1fc(L, n_classes, 0.0),
        "attention": Attention_Gated(L, A),
        "dim_reduction": DimReduction(D, L, numLayer_Res=res),
        "att_classifier": Attention_with_Classifier(L=L, D=A, num_cls=n_classes, droprate=0.0),
    }
    classifier, attention, dim_reduction, att_cls = (modules[k] for k in modules)
    for key, m in modules.items():
        m.train()
        for k, v in m.state_dict().items():
            out[f"{name}.param.{key}.{k}"] = v.clone()
    order = rng.permutation(N)
    chunks = [c.tolist() for c in np.array_split(order, G)]
    per_group = total // G
    y = torch.LongTensor([label])
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    distilled, pseudo = [], []
    for idx in chunks:
        sub = torch.index_select(bag, 0, torch.LongTensor(idx))
        mid = dim_reduction(sub)
        a = attention(mid).squeeze(0)
        att_feats = torch.einsum("ns,n->ns", mid, a)
        feat = torch.sum(att_feats, dim=0).unsqueeze(0)
        pseudo.append(classifier(feat))
        logits = torch.transpose(cam(classifier, att_feats.unsqueeze(0)).squeeze(0), 0, 1)
        _, sort_idx = torch.sort(torch.softmax(logits, dim=1)[:, -1], descending=True)
        top, bottom = sort_idx[:per_group].long(), sort_idx[-per_group:].long()
        if distill == "MaxMinS":
            distilled.append(mid.index_select(0, torch.cat([top, bottom])))
        elif distill == "MaxS":
            distilled.append(mid.index_select(0, top))
        else:
            distilled.append(feat)
    distilled = torch.cat(distilled, 0)
    pseudo = torch.cat(pseudo, 0)
    loss0 = ce(pseudo, y.repeat(len(chunks))).mean()
    tier1 = [(k, m) for k, m in modules.items() if k != "att_classifier"]
    loss0.backward(retain_graph=True)
    for key, m in tier1:
        for k, p in m.named_parameters():
            out[f"{name}.grad.{key}.{k}"] = p.grad.clone()
    logits = att_cls(distilled)
    loss1 = ce(logits, y).mean()
    loss1.backward()
    for k, p in att_cls.named_parameters():
        out[f"{name}.grad.att_classifier.{k}"] = p.grad.clone()
    out[f"{name}.order"] = torch.tensor(order, dtype=torch.float32)
    out[f"{name}.label"] = torch.tensor([float(label)])
    out[f"{name}.pseudo"] = pseudo.detach()
    out[f"{name}.distilled"] = distilled.detach()
    out[f"{name}.logits"] = logits.detach()
    out[f"{name}.loss0"] = loss0.detach().reshape(1)
    out[f"{name}.loss1"] = loss1.detach().reshape(1)
entries = [(k, "F32", list(v.shape), v.detach().float().contiguous().numpy().tobytes()) for k, v in out.items()]
write_safetensors(args.out, entries, {"torch": torch.__version__})
print(f"wrote {args.out}: {len(entries)} tensors")
