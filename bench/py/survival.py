"""The peer of bench/survival.sh: survival training as MCAT and PORPOISE run it (their
`train_loop_survival`: one bag per step from its slide's h5 file through a DataLoader), on the
folds of a wsimil run (its plan.json), with the same gated-attention MIL model as wsimil's ABMIL
(fc D->512 + ReLU + dropout 0.25, attention 512->128 tanh * sigmoid -> 1, a head 512->K) and
the authors' losses: MCAT's `NLLSurvLoss` (hazards = sigmoid(logits), S = cumprod(1 - hazards),
logs clamped at 1e-7, alpha 0) over K time bins cut at the quantiles of the training slides'
event times (pandas' qcut, numpy's linear quantiles), or PORPOISE's `CoxSurvLoss` over batches of
bags (risk sets within the batch, averaged over the batch). RAdam (lr, weight decay 1e-5) under
Lookahead (k 6, alpha 0.5) as wsimil trains; each epoch a training pass and a validation pass; the
weights of the epoch with the lowest validation loss score the test slides (wsimil's early stopping with
patience = epochs). The risk is -sum(S) (NLL) or the Cox head's output.

Prints one line per fold: `fold K SECONDS C_INDEX EPOCHS`, then `pooled C_INDEX`.
"""

import argparse
import json
import os
import sys
import time

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_mil import GatedAttention, Lookahead  # noqa: E402


class Bags(torch.utils.data.Dataset):
    def __init__(self, h5_dir, slides):
        self.slides = slides
        self.paths = [os.path.join(h5_dir, "h5_files", f"{s}.h5") for s in slides]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with h5py.File(self.paths[i], "r") as f:
            return torch.from_numpy(f["features"][:]), i


def collate(batch):
    return batch[0]


def nll_surv_loss(hazards, S, Y, c, alpha=0.0, eps=1e-7):
    # MCAT's utils.nll_loss, as written there.
    batch_size = len(Y)
    Y = Y.view(batch_size, 1)
    c = c.view(batch_size, 1).float()
    S_padded = torch.cat([torch.ones_like(c), S], 1)
    uncensored_loss = -(1 - c) * (
        torch.log(torch.gather(S_padded, 1, Y).clamp(min=eps)) + torch.log(torch.gather(hazards, 1, Y).clamp(min=eps))
    )
    censored_loss = -c * torch.log(torch.gather(S_padded, 1, Y + 1).clamp(min=eps))
    neg_l = censored_loss + uncensored_loss
    return ((1 - alpha) * neg_l + alpha * uncensored_loss).mean()


def cox_surv_loss(risk, time_, censored):
    # PORPOISE's CoxSurvLoss: risk sets within the batch, the mean over the batch.
    n = len(time_)
    R = (time_.view(1, n) >= time_.view(n, 1)).float()
    theta = risk.reshape(-1)
    return -torch.mean((theta - torch.log(torch.sum(torch.exp(theta) * R, dim=1))) * (1 - censored))


def c_index(risk, time_, event):
    # Harrell's, lifelines' pair rules (as wsimil_common::survival::concordance).
    pairs, score = 0, 0.0
    for i in range(len(time_)):
        if not event[i]:
            continue
        later = (time_ > time_[i]) | ((time_ == time_[i]) & ~event)
        later[i] = False
        pairs += later.sum()
        score += (risk[i] > risk[later]).sum() + 0.5 * (risk[i] == risk[later]).sum()
    return score / pairs if pairs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--h5-dir", required=True)
    ap.add_argument("--plan", required=True, help="wsimil's runs/<run>/plan.json: its folds and follow-up")
    ap.add_argument("--loss", choices=["nll", "cox"], default="nll")
    ap.add_argument("--bins", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    plan = json.load(open(a.plan))
    follow = {s["id"]: (s["survival"]["time"], s["survival"]["event"]) for s in plan["slides"]}
    pooled = ([], [], [])
    for k, fold in enumerate(plan["folds"]):
        t0 = time.perf_counter()
        sets = {name: Bags(a.h5_dir, fold[name]) for name in ("train", "val", "test")}
        times = {n: torch.tensor([follow[s][0] for s in ds.slides], dtype=torch.float64) for n, ds in sets.items()}
        censored = {n: torch.tensor([0.0 if follow[s][1] else 1.0 for s in ds.slides]) for n, ds in sets.items()}
        events_t = times["train"][censored["train"] == 0].numpy()
        edges = np.unique(np.quantile(events_t, np.arange(1, a.bins) / a.bins)) if a.loss == "nll" else np.array([])
        bins = {n: torch.tensor(np.searchsorted(edges, t.numpy(), side="right"), dtype=torch.long) for n, t in times.items()}
        loader = lambda ds, shuffle: torch.utils.data.DataLoader(
            ds, batch_size=1, shuffle=shuffle, num_workers=a.workers, collate_fn=collate
        )
        with h5py.File(sets["train"].paths[0], "r") as f:
            dim = f["features"].shape[1]
        model = GatedAttention(dim, a.bins if a.loss == "nll" else 1)
        opt = Lookahead(torch.optim.RAdam(model.parameters(), lr=a.lr, weight_decay=1e-5))

        def bag_loss(logits, name, i):
            hazards = torch.sigmoid(logits)
            S = torch.cumprod(1 - hazards, dim=1)
            return nll_surv_loss(hazards, S, bins[name][i : i + 1], censored[name][i : i + 1])

        def risk_of(logits):
            if a.loss == "cox":
                return logits.reshape(-1)[0].item()
            return -torch.cumprod(1 - torch.sigmoid(logits), dim=1).sum().item()

        def evaluate(name):
            model.eval()
            out, risks = [], np.zeros(len(sets[name]))
            with torch.no_grad():
                total = 0.0
                for x, i in loader(sets[name], False):
                    logits = model(x)
                    risks[i] = risk_of(logits)
                    out.append(logits.reshape(1, -1))
                    if a.loss == "nll":
                        total += bag_loss(logits, name, i).item()
            if a.loss == "cox":
                total = cox_surv_loss(torch.cat(out)[:, 0], times[name], censored[name]).item() * len(out)
            return total / max(len(out), 1), risks

        best = (float("inf"), None, 0)
        for epoch in range(a.epochs):
            model.train()
            batch = []
            for x, i in loader(sets["train"], True):
                logits = model(x)
                if a.loss == "nll":
                    opt.zero_grad()
                    bag_loss(logits, "train", i).backward()
                    opt.step()
                    continue
                batch.append((logits.reshape(-1), i))
                if len(batch) == a.batch:
                    idx = [j for _, j in batch]
                    opt.zero_grad()
                    cox_surv_loss(torch.cat([r for r, _ in batch]), times["train"][idx], censored["train"][idx]).backward()
                    opt.step()
                    batch = []
            if len(batch) >= 2:
                idx = [j for _, j in batch]
                opt.zero_grad()
                cox_surv_loss(torch.cat([r for r, _ in batch]), times["train"][idx], censored["train"][idx]).backward()
                opt.step()
            val_loss = evaluate("val")[0] if len(sets["val"]) else 0.0
            if val_loss < best[0] or not len(sets["val"]):
                best = (val_loss, {n: p.detach().clone() for n, p in model.state_dict().items()}, epoch)
        model.load_state_dict(best[1])
        risk = evaluate("test")[1]
        secs = time.perf_counter() - t0
        t, e = times["test"].numpy(), (censored["test"] == 0).numpy()
        print(f"fold {k} {secs:.3f} {c_index(risk, t, e):.4f} {a.epochs} best {best[2]}", flush=True)
        for acc, v in zip(pooled, (risk, t, e)):
            acc.extend(v.tolist())
    r, t, e = (np.array(v) for v in pooled)
    print(f"pooled {c_index(r, t, e.astype(bool)):.4f}", flush=True)


if __name__ == "__main__":
    main()
