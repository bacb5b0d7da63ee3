"""The peer of bench/train-scale.sh: a training loop as CLAM's (`core_utils.train_loop` over
`Generic_MIL_Dataset` with `use_h5`): one bag per step, read from its slide's h5 file through a
DataLoader with worker processes, the same gated-attention MIL model as wsimil's ABMIL (fc
1024->512 + ReLU + dropout 0.25, attention 512->128 tanh * sigmoid -> 1, classifier 512->2),
cross-entropy, RAdam (lr 2e-4, weight decay 1e-5) under Lookahead (k 6, alpha 0.5) as wsimil
trains it. Each epoch: a training pass over the training bags (shuffled) and an evaluation pass
over the validation bags, as wsimil's fold 0 of the same run (its plan.json gives the split).

Prints one line per epoch: `epoch E SECONDS TRAIN_LOSS VAL_LOSS`.
"""

import argparse
import json
import os
import sys
import time

import h5py
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_mil import GatedAttention, Lookahead  # noqa: E402


class Bags(torch.utils.data.Dataset):
    def __init__(self, h5_dir, slides, labels):
        self.paths = [os.path.join(h5_dir, "h5_files", f"{s}.h5") for s in slides]
        self.labels = labels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with h5py.File(self.paths[i], "r") as f:
            features = torch.from_numpy(f["features"][:])
        return features, self.labels[i]


def collate(batch):
    # CLAM's collate_MIL with batch size 1: the bag itself and its label.
    features, label = batch[0]
    return features, torch.tensor([label])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--h5-dir", required=True)
    ap.add_argument("--plan", required=True, help="wsimil's runs/<run>/plan.json: fold 0's split")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    plan = json.load(open(a.plan))
    label = {s["id"]: s["label"] for s in plan["slides"]}
    fold = plan["folds"][0]
    train = Bags(a.h5_dir, fold["train"], [label[s] for s in fold["train"]])
    val = Bags(a.h5_dir, fold["val"], [label[s] for s in fold["val"]])
    loader = lambda ds, shuffle: torch.utils.data.DataLoader(
        ds, batch_size=1, shuffle=shuffle, num_workers=a.workers, collate_fn=collate, persistent_workers=False
    )
    with h5py.File(train.paths[0], "r") as f:
        dim = f["features"].shape[1]
    model = GatedAttention(dim, 2)
    opt = Lookahead(torch.optim.RAdam(model.parameters(), lr=2e-4, weight_decay=1e-5))
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(a.epochs):
        t = time.perf_counter()
        model.train()
        total = 0.0
        for x, y in loader(train, True):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            total += loss.item()
        model.eval()
        val_total = 0.0
        with torch.no_grad():
            for x, y in loader(val, False):
                val_total += loss_fn(model(x), y).item()
        secs = time.perf_counter() - t
        print(f"epoch {epoch} {secs:.3f} {total / len(train):.4f} {val_total / max(len(val), 1):.4f}", flush=True)


if __name__ == "__main__":
    main()
