#!/usr/bin/env python3
"""The PyTorch side of bench/embed-cpu.sh's end-to-end figure: patches/s from a slide to features
as CLAM's feature extraction does it (OpenSlide's read_region at level 0, PIL resize to 224, ImageNet
normalisation, a DataLoader with worker processes feeding the model in eval/no_grad), on the
patches wsimil embedded (`wsimil bench-embed --coords-out`). Random weights; the network is
bench/py/embed.py's. Prints `embed-slide ARCH PATCHES PATCHES_PER_S`."""
import argparse
import importlib.util
import os
import time

import openslide
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def networks():
    # embed.py parses its own arguments at import; load only its network definitions.
    src = open(os.path.join(HERE, "embed.py")).read().split("def conv_macs")[0]
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader("embed_nets", loader=None))
    exec(compile(src, "embed.py", "exec"), mod.__dict__)
    return mod


class Patches(torch.utils.data.Dataset):
    MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

    def __init__(self, slide, coords):
        self.path, self.coords, self.slide = slide, coords, None

    def __len__(self):
        return len(self.coords)

    def __getitem__(self, i):
        if self.slide is None:  # one handle per worker process
            self.slide = openslide.OpenSlide(self.path)
        x, y, side = self.coords[i]
        img = self.slide.read_region((x, y), 0, (side, side)).convert("RGB").resize((224, 224), Image.BILINEAR)
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(224, 224, 3).permute(2, 0, 1)
        return (t.float() / 255 - self.MEAN) / self.STD


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", required=True, choices=["resnet50-trunc", "efficientnet-lite0"])
    ap.add_argument("--slide", required=True)
    ap.add_argument("--coords", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = ap.parse_args()
    coords = [tuple(int(v) for v in line.split(",")) for line in open(args.coords) if line.strip()]
    nets = networks()
    torch.manual_seed(0)
    model = (nets.resnet50_trunc if args.arch == "resnet50-trunc" else nets.efficientnet_lite0)().eval()
    loader = torch.utils.data.DataLoader(Patches(args.slide, coords), batch_size=args.batch, num_workers=args.workers)
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
        t = time.perf_counter()
        n = 0
        for batch in loader:
            feats = model(batch)
            n += feats.shape[0]
        secs = time.perf_counter() - t
    print(f"embed-slide {args.arch} {n} {n / secs:.2f}")
