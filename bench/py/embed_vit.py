#!/usr/bin/env python3
"""The PyTorch side of bench/embed-vit.sh (and the ViT part of embed-gpu.sh): a timm Vision
Transformer as pathology users run it (UNI: `vit_large_patch16_224`, init_values=1e-5; ViT-B/16:
`vit_base_patch16_224`), random weights, eval and inference_mode.

  model     images/s on a batch of BATCH random 224 px images, best of ITERS after warm-up, each
            batch ending with its features in host memory as float32; on a GPU in --dtype with
            `scaled_dot_product_attention` (timm's fused attention).
            Prints `embed-vit NAME IMAGES_PER_S GFLOP_PER_IMAGE PEAK_RSS_MIB`.
  slide     patches/s end to end from a slide as TRIDENT-style extraction does it: OpenSlide
            read_region, PIL resize to 224, normalisation, DataLoader workers feeding the model, on
            the patches wsimil embedded (`wsimil-dev bench-embed --coords-out`).
            Prints `embed-vit-slide NAME PATCHES PATCHES_PER_S PEAK_RSS_MIB`.
  --save-weights FILE --features-out FILE: the state dict as the publisher would ship it and the
            features of a fixed input (`--input FILE`, float32 NCHW), so that wsimil loads the same
            weights at full size and its features can be compared.
"""
import argparse
import os
import resource
import sys
import time

import numpy as np
import torch
from PIL import Image

try:
    import timm
except ImportError:  # a GPU machine without timm: the same network in plain PyTorch (below)
    timm = None

ARGS = {"vit_large_patch16_224": dict(init_values=1e-5, dynamic_img_size=True)}
SIZES = {"vit_base_patch16_224": (768, 12, 12), "vit_large_patch16_224": (1024, 24, 16)}


class Block(torch.nn.Module):
    """timm's pre-norm block with LayerScale, attention through scaled_dot_product_attention."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(d, eps=1e-6), torch.nn.LayerNorm(d, eps=1e-6)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
        self.ls1, self.ls2 = torch.nn.Parameter(torch.ones(d)), torch.nn.Parameter(torch.ones(d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.ls1 * self.proj(o)
        return x + self.ls2 * self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class PlainVit(torch.nn.Module):
    def __init__(self, name):
        super().__init__()
        d, depth, heads = SIZES[name]
        self.embed_dim = d
        self.patch_embed = torch.nn.Conv2d(3, d, 16, 16)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = torch.nn.Parameter(torch.randn(1, 197, d) * 0.02)
        self.blocks = torch.nn.ModuleList(Block(d, heads) for _ in range(depth))
        self.norm = torch.nn.LayerNorm(d, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


def build(name):
    torch.manual_seed(0)
    if timm is None:
        return PlainVit(name).eval()
    model = timm.create_model(name, pretrained=False, num_classes=0, **ARGS.get(name, {})).eval()
    with torch.no_grad():  # LayerScale at 1e-5 would leave the blocks out of the numbers
        for n, p in model.named_parameters():
            if n.endswith(".gamma"):
                p.fill_(0.1)
    return model


def gflop(model):
    """Multiply-adds ×2 per 224 px image of a patch-16 ViT with a class token and no registers."""
    d, patches = model.embed_dim, (224 // 16) ** 2
    n = patches + 1
    blk = model.blocks[0]
    fc1, fc2 = (blk.mlp.fc1, blk.mlp.fc2) if hasattr(blk, "mlp") else (blk.fc1, blk.fc2)
    per_block = 2 * n * d * (3 * d + d) + 2 * 2 * n * n * d + 2 * n * (d * fc1.out_features + fc2.in_features * d)
    stem = 2 * patches * d * 3 * 16 * 16
    return (stem + len(model.blocks) * per_block) / 1e9


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_rate(a):
    model = build(a.name)
    x = torch.randn(a.batch, 3, 224, 224)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        dt = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
        model = model.to(dev, dtype=dt)
        x = x.to(dev, dtype=dt)
    with torch.inference_mode():
        for _ in range(2):
            model(x).float().cpu()
        best = float("inf")
        for _ in range(a.iters):
            t = time.perf_counter()
            model(x).float().cpu()
            best = min(best, time.perf_counter() - t)
    print(f"embed-vit {a.name} {a.batch / best:.2f} {gflop(model):.2f} {peak_mib():.0f}")


def slide_rate(a):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from embed_slide import Patches  # the CNN peer's reader: the same patches, read the same way

    coords = [tuple(int(v) for v in line.split(",")) for line in open(a.coords) if line.strip()]
    model = build(a.name)
    loader = torch.utils.data.DataLoader(Patches(a.slide, coords), batch_size=a.batch, num_workers=a.workers)
    with torch.inference_mode():
        model(torch.zeros(1, 3, 224, 224))
        t = time.perf_counter()
        n = 0
        for batch in loader:
            n += model(batch).shape[0]
        secs = time.perf_counter() - t
    print(f"embed-vit-slide {a.name} {n} {n / secs:.2f} {peak_mib():.0f}")


def save(a):
    model = build(a.name)
    torch.save(model.state_dict(), a.save_weights)
    x = torch.from_numpy(np.fromfile(a.input, dtype=np.float32).reshape(-1, 3, 224, 224))
    with torch.inference_mode():
        model(x).float().numpy().tofile(a.features_out)
        if a.images:
            # From pixels: UNI's eval transform as TRIDENT builds it (uni_v1: Resize(224), CenterCrop(224),
            # ToTensor, ImageNet's Normalize) on the PNG patches.
            from torchvision import transforms as T
            t = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
            x = torch.stack([t(Image.open(p).convert("RGB")) for p in a.images])
            model(x).float().numpy().tofile(a.pixel_features_out)


ap = argparse.ArgumentParser()
ap.add_argument("mode", choices=["model", "slide", "save"])
ap.add_argument("--name", required=True, help="timm model name")
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--iters", type=int, default=3)
ap.add_argument("--device", default="cpu")
ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"], help="on a GPU")
ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
ap.add_argument("--slide")
ap.add_argument("--coords")
ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
ap.add_argument("--save-weights")
ap.add_argument("--input")
ap.add_argument("--features-out")
ap.add_argument("--images", nargs="*", help="save: RGB patches to embed through UNI's eval transform too")
ap.add_argument("--pixel-features-out")
a = ap.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
{"model": model_rate, "slide": slide_rate, "save": save}[a.mode](a)
