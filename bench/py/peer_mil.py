"""What the PyTorch peers of the training benchmarks share: the gated-attention MIL model as
wsimil's ABMIL (and CLAM's `Attn_Net_Gated` layout) builds it, and Lookahead over an inner
optimizer as wsimil trains (k 6, alpha 0.5: timm's Lookahead, whose slow weights are taken at the
first synchronisation)."""

import torch
import torch.nn as nn


class GatedAttention(nn.Module):
    """fc D->512 + ReLU + dropout 0.25, attention 512->128 tanh * sigmoid -> 1, softmax over the
    instances, a head 512->outputs on the attention-weighted mean."""

    def __init__(self, in_dim, outputs=2, hidden=512, attention=128, dropout=0.25):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_V = nn.Sequential(nn.Linear(hidden, attention), nn.Tanh())
        self.attention_U = nn.Sequential(nn.Linear(hidden, attention), nn.Sigmoid())
        self.attention_weights = nn.Linear(attention, 1)
        self.classifier = nn.Linear(hidden, outputs)

    def forward(self, x):
        h = self.fc(x)
        a = self.attention_weights(self.attention_V(h) * self.attention_U(h)).T
        a = torch.softmax(a, dim=1)
        return self.classifier(a @ h)


class Lookahead:
    def __init__(self, inner, k=6, alpha=0.5):
        self.inner, self.k, self.alpha, self.steps = inner, k, alpha, 0
        self.slow = [[p.detach().clone() for p in g["params"]] for g in inner.param_groups]

    def zero_grad(self):
        self.inner.zero_grad()

    def step(self):
        self.inner.step()
        self.steps += 1
        if self.steps % self.k == 0:
            for group, slow in zip(self.inner.param_groups, self.slow):
                for p, s in zip(group["params"], slow):
                    s.add_(p.detach() - s, alpha=self.alpha)
                    p.data.copy_(s)
