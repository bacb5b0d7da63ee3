#!/usr/bin/env python3
"""The PyTorch side of bench/embed-cpu.sh and bench/embed-gpu.sh: images/s of a patch embedder,
model alone, in inference mode (eval, no_grad, BatchNorm as modules as PyTorch users run them),
random weights, on a batch of BATCH random 224x224 images, best of ITERS batches after warm-up,
each batch ending with its features in host memory as float32.
On a GPU (--device cuda) the model runs as a tuned PyTorch user would run it: weights and input in
--dtype (bf16 by default), channels-last, cudnn.benchmark on.
Prints `embed ARCH IMAGES_PER_S MACS_PER_IMAGE`. The networks are written here (torchvision is not
needed): ResNet50 truncated after layer3 + global average pool (1024-d, CLAM's), EfficientNet-Lite0
(1280-d)."""
import argparse
import time

import torch
import torch.nn as nn


def conv_bn(cin, cout, k, s, groups=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(conv_bn(cin, width, 1, 1), conv_bn(width, width, 3, stride), conv_bn(width, cout, 1, 1, act=None))
        self.down = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        return self.relu(self.body(x) + idt)


def resnet50_trunc():
    layers = [conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2)]:
        for b in range(blocks):
            layers.append(Bottleneck(cin, width, stride if b == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


class MbConv(nn.Module):
    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        mid = cin * expand
        layers = [conv_bn(cin, mid, 1, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(mid, mid, k, stride, groups=mid, act=nn.ReLU6), conv_bn(mid, cout, 1, 1, act=None)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return y + x if self.residual else y


def efficientnet_lite0():
    stages = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
              (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
    layers = [conv_bn(3, 32, 3, 2, act=nn.ReLU6)]
    for repeats, k, stride, expand, cin, cout in stages:
        for r in range(repeats):
            layers.append(MbConv(cin if r == 0 else cout, cout, k, stride if r == 0 else 1, expand))
    layers += [conv_bn(320, 1280, 1, 1, act=nn.ReLU6), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def conv_macs(model, x):
    """Multiply-accumulates per image of every convolution, from the shapes one pass produces."""
    total = []

    def hook(m, _inp, out):
        cin_per_group = m.in_channels // m.groups
        total.append(out.numel() // out.shape[0] * cin_per_group * m.kernel_size[0] * m.kernel_size[1])

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    model(x[:1])
    for h in hooks:
        h.remove()
    return sum(total)


ap = argparse.ArgumentParser()
ap.add_argument("--arch", required=True, choices=["resnet50-trunc", "efficientnet-lite0"])
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--iters", type=int, default=3)
ap.add_argument("--device", default="cpu")
ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"], help="on a GPU")
args = ap.parse_args()
torch.manual_seed(0)
model = (resnet50_trunc if args.arch == "resnet50-trunc" else efficientnet_lite0)().eval()
x = torch.randn(args.batch, 3, 224, 224)
dev = torch.device(args.device)
if dev.type == "cuda":
    torch.backends.cudnn.benchmark = True
    dt = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    model = model.to(dev, dtype=dt, memory_format=torch.channels_last)
    x = x.to(dev, dtype=dt).contiguous(memory_format=torch.channels_last)
with torch.no_grad():
    macs = conv_macs(model, x)
    out = model(x).float().cpu()
    assert out.shape == (args.batch, 1024 if args.arch == "resnet50-trunc" else 1280), out.shape
    for _ in range(2 if dev.type == "cuda" else 0):
        model(x).float().cpu()
    best = float("inf")
    for _ in range(args.iters):
        t = time.perf_counter()
        model(x).float().cpu()
        best = min(best, time.perf_counter() - t)
print(f"embed {args.arch} {args.batch / best:.2f} {macs}")
