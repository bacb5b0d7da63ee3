#!/usr/bin/env python3
"""Fixtures for `wsimil import-model`, made with the authors' own code (not run in CI):

    scripts/dev/import_fixtures.py --transmil TRANSMIL_CHECKOUT --clam CLAM_CHECKOUT \
        [--dsmil DSMIL_CHECKOUT] [--dtfd DTFD_CHECKOUT] [--out coordinator/tests/fixtures/import]
    scripts/dev/import_fixtures.py [--dsmil DSMIL_CHECKOUT] [--dtfd DTFD_CHECKOUT]
        (adds dsmil.pth, dtfd.pth to the fixtures there)

- transmil.ckpt: the official TransMIL (github.com/szc19990412/TransMIL, models/TransMIL.py, at its
  full width: 1024-d features, 512 wide, n_classes 2) with random weights, saved as its PyTorch
  Lightning training saves it: {"state_dict": {"model.<name>": ...}, "epoch", "global_step"}.
- clam_sb.pt: CLAM's CLAM_SB (github.com/mahmoodlab/CLAM, models/model_clam.py, size "small":
  1024 -> 512, gated attention 256, n_classes 2) as its training saves it (torch.save of the
  state_dict: s_<fold>_checkpoint.pt).
- dsmil.pth: DSMIL's MILNet (github.com/binli123/dsmil-wsi, dsmil.py, at commit 80465ed: FCLayer
  and BClassifier on 1024-d features, one score stream as for Camelyon16, nonlinear 128-wide
  queries) as its training saves it (torch.save of the state_dict, zip format); its bag stream's
  logits and max instance score on the bag are dsmil_bag and dsmil_max.
- dtfd.pth: DTFD-MIL's best_model.pth (github.com/hrzhang1123/DTFD-MIL, at commit 10964f4: the
  four modules of Main_DTFD_MIL.py on 1024-d features, mDim 128, two classes), as its training saves
  it (torch.save of {"classifier", "dim_reduction", "attention", "att_classifier"}: each a
  state_dict); the bag split into 4 pseudo-bags by the order dtfd_order (np.array_split of it, as
  its test does), tier 2's logits with AFS distillation are dtfd_logits.
- import.safetensors: a bag of 300 instances of 1024-d features and each model's eval-mode logits
  (with --dsmil or --dtfd alone, the existing file's bag is used and their entries are added to it).

Weights and features are multiples of 1/256 (so the fixture compresses in git); the models run as
given. Needs PyTorch and nystrom-attention==0.0.9 (scripts/dev/pypi-torch-env.sh).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from dev.reference_transmil import load  # noqa: E402


def quantise(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            p.copy_(torch.round(p * 256) / 256)


def dsmil(checkout, bag, out_dir, out):
    sys.path.insert(0, checkout)
    import dsmil as authors

    torch.manual_seed(80465)
    m = authors.MILNet(authors.FCLayer(1024, 1), authors.BClassifier(1024, 1, dropout_v=0.0, nonlinear=True)).eval()
    quantise(m)
    with torch.no_grad():
        classes, bag_logits, _, _ = m(bag[0])
        out["dsmil_bag"] = bag_logits
        out["dsmil_max"] = classes.max(0)[0].reshape(1, -1)
    torch.save(m.state_dict(), os.path.join(out_dir, "dsmil.pth"))


def dtfd(checkout, bag, out_dir, out):
    import numpy as np

    sys.path.insert(0, checkout)
    from Model.Attention import Attention_Gated, Attention_with_Classifier
    from Model.network import Classifier_1fc, DimReduction

    torch.manual_seed(2022)
    L = 128
    modules = {
        "classifier": Classifier_1fc(L, 2, 0.0),
        "dim_reduction": DimReduction(1024, L),
        "attention": Attention_Gated(L),
        "att_classifier": Attention_with_Classifier(L=L, num_cls=2, droprate=0.0),
    }
    for m in modules.values():
        m.eval()
        quantise(m)
    order = np.random.default_rng(10964).permutation(bag.shape[1])
    with torch.no_grad():
        mid = modules["dim_reduction"](bag[0])
        logits = modules["attention"](mid, isNorm=False).squeeze(0)
        pooled = []
        for idx in np.array_split(order, 4):
            idx = torch.LongTensor(idx.tolist())
            a = torch.softmax(logits.index_select(0, idx), dim=0)
            pooled.append(torch.einsum("ns,n->ns", mid.index_select(0, idx), a).sum(0, keepdim=True))
        out["dtfd_logits"] = modules["att_classifier"](torch.cat(pooled, 0))
    out["dtfd_order"] = torch.tensor(order, dtype=torch.float32)
    torch.save({k: m.state_dict() for k, m in modules.items()}, os.path.join(out_dir, "dtfd.pth"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--transmil")
    ap.add_argument("--clam")
    ap.add_argument("--dsmil")
    ap.add_argument("--dtfd")
    ap.add_argument("--out", default="coordinator/tests/fixtures/import")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    from safetensors.torch import load_file, save_file

    if (a.dsmil or a.dtfd) and not (a.transmil or a.clam):
        path = os.path.join(a.out, "import.safetensors")
        out = load_file(path)
        if a.dsmil:
            dsmil(a.dsmil, out["bag"], a.out, out)
        if a.dtfd:
            dtfd(a.dtfd, out["bag"], a.out, out)
        save_file({k: v.contiguous() for k, v in out.items()}, path)
        return
    if not (a.transmil and a.clam):
        ap.error("--transmil and --clam (or --dsmil, --dtfd alone)")

    torch.manual_seed(14)
    bag = torch.round(torch.randn(1, 300, 1024) * 256) / 256
    out = {"bag": bag}

    ref, _ = load(a.transmil)
    tm = ref.TransMIL(n_classes=2).eval()
    quantise(tm)
    with torch.no_grad():
        out["transmil_logits"] = tm(data=bag)["logits"]
    torch.save({"state_dict": {f"model.{k}": v for k, v in tm.state_dict().items()}, "epoch": 12, "global_step": 3456},
               os.path.join(a.out, "transmil.ckpt"))

    sys.path.insert(0, a.clam)
    from models.model_clam import CLAM_SB
    clam = CLAM_SB(gate=True, size_arg="small", dropout=0.25, n_classes=2, embed_dim=1024).eval()
    quantise(clam)
    with torch.no_grad():
        logits, _, _, _, _ = clam(bag[0])
        out["clam_logits"] = logits
    torch.save(clam.state_dict(), os.path.join(a.out, "clam_sb.pt"))
    if a.dsmil:
        dsmil(a.dsmil, bag, a.out, out)
    if a.dtfd:
        dtfd(a.dtfd, bag, a.out, out)

    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(a.out, "import.safetensors"))
    for f in sorted(os.listdir(a.out)):
        print(f, os.path.getsize(os.path.join(a.out, f)), file=sys.stderr)


if __name__ == "__main__":
    main()
