#!/usr/bin/env python3
"""Fixtures for wsimil's Vision Transformer presets, made with each publisher's own library.

For every preset, the architecture is built the way its users build it (timm.create_model with
the publisher's keyword arguments; transformers' Dinov2Model for Phikon-v2; CONCH's own CoCa code
for its vision tower), at reduced width and depth, from random weights; its state dict is saved
as the publisher ships it (torch.save of the state dict as `pytorch_model.bin`, or
`model.safetensors` from save_pretrained); and its features for two real H&E patches are saved
beside the inputs. common/tests/vit_parity.rs loads those files through wsimil's own loader.

    CHECKOUTS="--conch CONCH --dinov2 DINOV2 --trident TRIDENT"   # checkouts of the publishers' code
    scripts/dev/vit_fixtures.py --out common/tests/fixtures/vit $CHECKOUTS
    scripts/dev/vit_fixtures.py --full uni --out DIR      # one preset at full size (not committed)
    scripts/dev/vit_fixtures.py --shapes common/tests/fixtures/vit/full_size.json $CHECKOUTS
    scripts/dev/vit_fixtures.py --pixels common/tests/fixtures/vit $CHECKOUTS

`--shapes` builds every preset at full size on PyTorch's meta device (no memory, no numbers) and
records, as small JSON, every tensor of the state dict its publisher ships (name and shape), the
width of the features its own code returns (a forward pass on meta tensors) and the preprocessing
its model card gives: what vit_parity.rs holds each of wsimil's presets to, without gigabytes.

`--pixels` checks what happens before the network: from uint8 RGB patches (real H&E, at the
network's input size and at the 256 px the presets tile at) through each publisher's own eval
transform as TRIDENT builds it (torchvision's Resize/CenterCrop/ToTensor/Normalize on PIL images),
or timm's `create_transform` for a timm tag, into the small models whose weights are committed
above; worker/tests/pixels.rs runs the same bytes through wsimil's patch preparation and network.

Needs PyPI's torch, timm and transformers (scripts/dev/pypi-torch-env.sh) and checkouts of the
publishers' own code for three presets (imported from there, never copied):
https://github.com/mahmoodlab/CONCH (conch-vision), https://github.com/facebookresearch/dinov2
(openmidnight) and https://github.com/mahmoodlab/TRIDENT (conch-v1.5, whose code ships there).
The real tissue is tiatoolbox's target_image.png from the data folder (scripts/fetch-data.sh).
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
OPENAI = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
HOPTIMUS = ([0.707223, 0.578729, 0.703617], [0.211883, 0.230117, 0.177517])
UNIFORM = ([0.5] * 3, [0.5] * 3)
HIBOU = ([0.7068, 0.5755, 0.722], [0.195, 0.2316, 0.1816])

# Reduced sizes: width 32 in 4 heads, 2 blocks. SwiGLU widths follow from the publishers' ratios
# (int(32 · 5.33334) = 170 and int(32 · 5.3375) = 170, both even as timm's packed GLU needs).
SMALL = dict(embed_dim=32, depth=2, num_heads=4)


def timm_presets(full):
    import timm
    from timm.layers import SwiGLUPacked

    size = {} if full else SMALL

    def make(arch, **kw):
        return lambda: timm.create_model(arch, pretrained=False, **{**kw, **size})

    return {
        # MahmoodLab/UNI's README and get_encoder.py.
        "uni": (make("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                     dynamic_img_size=True), IMAGENET, "class", 224),
        # MahmoodLab/UNI2-h's model card.
        "uni2-h": (make("vit_giant_patch14_224", img_size=224, patch_size=14, depth=24, num_heads=24,
                        init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0,
                        no_embed_class=True, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, reg_tokens=8,
                        dynamic_img_size=True), IMAGENET, "class", 224),
        # paige-ai/Virchow2's config.json model_args, with the MLP layer and activation its card asks for.
        "virchow2": (make("vit_huge_patch14_224", img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4,
                          mlp_ratio=5.3375, global_pool="", dynamic_img_size=True, mlp_layer=SwiGLUPacked,
                          act_layer=torch.nn.SiLU), IMAGENET, "class+mean", 224),
        # bioptimus/H-optimus-0's card (TRIDENT builds H-optimus-1 the same way: one fixture for both).
        "h-optimus-0": (make("vit_giant_patch14_reg4_dinov2", img_size=224, init_values=1e-5, num_classes=0,
                             dynamic_img_size=False), HOPTIMUS, "class", 224),
        # prov-gigapath's config.json model_args.
        "gigapath-tile": (make("vit_giant_patch14_dinov2", img_size=224, in_chans=3, patch_size=16,
                               embed_dim=1536, depth=40, num_heads=24, init_values=1e-5, mlp_ratio=5.33334,
                               num_classes=0), IMAGENET, "class", 224),
        # TRIDENT's VirchowInferenceEncoder (paige-ai/Virchow's card): Virchow2 without registers.
        "virchow": (make("vit_huge_patch14_224", img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375,
                         global_pool="", dynamic_img_size=True, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU),
                    IMAGENET, "class+mean", 224),
        # TRIDENT's GPFMInferenceEncoder: timm's DINOv2 ViT-L/14 at 224 px with LayerScale.
        "gpfm": (make("vit_large_patch14_dinov2.lvd142m", img_size=224, init_values=1e-5, dynamic_img_size=True),
                 IMAGENET, "class", 224),
        # TRIDENT's KaikoInferenceEncoder: timm.create_model(<name>, num_classes=0, img_size, dynamic_img_size)
        # with the checkpoint 1aurent's hub repositories ship (ViT-L/14: DINOv2 with registers built at 518 px).
        "kaiko-vits8": (make("vit_small_patch8_224", num_classes=0, img_size=224, dynamic_img_size=True),
                        UNIFORM, "class", 224),
        "kaiko-vits16": (make("vit_small_patch16_224", num_classes=0, img_size=224, dynamic_img_size=True),
                         UNIFORM, "class", 224),
        "kaiko-vitb8": (make("vit_base_patch8_224", num_classes=0, img_size=224, dynamic_img_size=True),
                        UNIFORM, "class", 224),
        "kaiko-vitb16": (make("vit_base_patch16_224", num_classes=0, img_size=224, dynamic_img_size=True),
                         UNIFORM, "class", 224),
        "kaiko-vitl14": (make("vit_large_patch14_reg4_dinov2", num_classes=0, img_size=518, dynamic_img_size=True),
                         UNIFORM, "class", 224),
        # TRIDENT's LunitS8InferenceEncoder (hub: 1aurent/vit_small_patch8_224.lunit_dino, num_classes 0;
        # its data config is timm's `dino` tag's, ImageNet statistics).
        "lunit-vits8": (make("vit_small_patch8_224", num_classes=0, img_size=224, dynamic_img_size=True),
                        IMAGENET, "class", 224),
        # TRIDENT's H0MiniInferenceEncoder: hf-hub:bioptimus/H0-mini with SwiGLUPacked and SiLU; its config
        # (a ViT-B/14 with 4 registers, no_embed_class, LayerScale, unpooled output) as the card's forward
        # shows it (1 + 4 + 256 tokens at 224 px); the MLP ratio is H-optimus's. The card's embedding:
        # the class token ⊕ the mean patch token.
        "h0-mini": (make("vit_base_patch14_reg4_dinov2", img_size=224, init_values=1e-5, num_classes=0,
                         mlp_ratio=5.33334, global_pool="", no_embed_class=True, dynamic_img_size=True,
                         mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU), HOPTIMUS, "class+mean", 224),
        # A generic timm architecture with weights from elsewhere (hence its normalisation named):
        # DINOv2 with registers stored at a 7×7 grid (98 px) and fed 224 px, so the position
        # embedding is resampled as timm does at run time.
        "vit:vit_small_patch14_reg4_dinov2@imagenet": (make("vit_small_patch14_reg4_dinov2", img_size=98, num_classes=0,
                                                   dynamic_img_size=True), IMAGENET, "class", 224),
    }


def patches(data):
    """Two real H&E patches, 224 px, as uint8 [2, 224, 224, 3]."""
    img = np.asarray(Image.open(os.path.join(data, "target_image.png")).convert("RGB"))
    return np.stack([img[0:224, 0:224], img[400:624, 300:524]])


def normalise(u8, mean_std):
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in mean_std)
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0
    return ((x - mean) / std).contiguous()


def timm_features(model, x, output):
    with torch.no_grad():
        if output == "fn":  # a model given as the function its publisher's code calls
            return model(x)
        out = model(x)
        if output == "class+mean":  # Virchow2's embedding: class token ⊕ mean of the patch tokens
            return torch.cat([out[:, 0], out[:, 1 + model.num_reg_tokens:].mean(1)], dim=-1)
        return out


def save(out, name, weights_file, features, sizes):
    stem = name.split("@")[0].replace(":", "-")
    save_file({"features": features.contiguous()}, os.path.join(out, f"{stem}.features.safetensors"))
    meta = {"preset": name, "weights": os.path.basename(weights_file), "sizes": sizes,
            "features": list(features.shape)}
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{name}: {os.path.getsize(weights_file)} bytes of weights, features {tuple(features.shape)}",
          file=sys.stderr)


def torch_save(state, path):
    """torch.save as a Hugging Face repository's file is written: to `pytorch_model.bin`, so the
    archive's inner folder is `pytorch_model/` whatever the fixture's file is called."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, os.path.join(d, "pytorch_model.bin"))
        os.replace(os.path.join(d, "pytorch_model.bin"), path)


def timm_sizes(model):
    blk = model.blocks[0]
    return {"dim": model.embed_dim, "depth": len(model.blocks), "heads": blk.attn.num_heads,
            "hidden": blk.mlp.fc1.out_features, "pos_grid": model.patch_embed.grid_size[0]}


def make_timm(out, name, build, mean_std, output, u8):
    torch.manual_seed(sum(map(ord, name)))
    model = build().eval()
    # timm's LayerScale starts at 1e-5, which would hide the blocks' part of the numbers: random
    # scales of order one, and LayerNorm affines that are not the identity.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith((".gamma", "norm1.weight", "norm2.weight", "norm.weight")):
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
            elif n.endswith(("norm1.bias", "norm2.bias", "norm.bias")):
                p.copy_(torch.randn_like(p) * 0.1)
    stem = name.split("@")[0].replace(":", "-")
    weights = os.path.join(out, f"{stem}.pytorch_model.bin")
    torch_save(model.state_dict(), weights)
    x = normalise(u8, mean_std)
    save(out, name, weights, timm_features(model, x, output), timm_sizes(model))


def phikon_v2_config(full):
    from transformers import Dinov2Config
    return Dinov2Config(hidden_size=1024 if full else 32, num_hidden_layers=24 if full else 2,
                        num_attention_heads=16 if full else 4, mlp_ratio=4, image_size=224 if full else 112,
                        patch_size=16, layerscale_value=1.0, use_swiglu_ffn=False)


def phikon_v2_model(full):
    """owkin/phikon-v2 as its users build it (seeded: the pixel fixtures rebuild the same model)."""
    from transformers import Dinov2Model
    torch.manual_seed(7)
    # owkin/phikon-v2 is a transformers Dinov2Model (ViT-L/16); here stored at a 7×7 grid (112 px)
    # and fed 224 px, so Hugging Face's bicubic interpolation of the position embedding runs.
    model = Dinov2Model(phikon_v2_config(full)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lambda1") or (("norm" in n) and n.endswith("weight")):
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
    return model


def make_phikon(out, u8, full):
    model = phikon_v2_model(full)
    cfg = model.config
    d = os.path.join(out, "phikon-v2.hf")
    model.save_pretrained(d, safe_serialization=True)
    weights = os.path.join(out, "phikon-v2.model.safetensors")
    os.replace(os.path.join(d, "model.safetensors"), weights)
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    os.rmdir(d)
    with torch.no_grad():
        feats = model(pixel_values=normalise(u8, IMAGENET)).last_hidden_state[:, 0]
    sizes = {"dim": cfg.hidden_size, "depth": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
             "hidden": int(cfg.hidden_size * cfg.mlp_ratio), "pos_grid": cfg.image_size // cfg.patch_size}
    save(out, "phikon-v2", weights, feats, sizes)


def make_conch(out, u8, conch, full):
    torch.manual_seed(11)
    model, vision = conch_model(conch, full)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ("ln" in n or "norm" in n) and n.endswith("weight"):
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
    weights = os.path.join(out, "conch-vision.pytorch_model.bin")
    torch.save(model.state_dict(), weights)
    side = vision["image_size"]
    x = normalise(u8 if side == 224 else np.stack([np.asarray(Image.fromarray(p).resize((side, side))) for p in u8]),
                  OPENAI)
    with torch.no_grad():
        feats = model.encode_image(x, proj_contrast=False, normalize=False)
    trunk = model.visual.trunk
    sizes = {"dim": trunk.embed_dim, "depth": len(trunk.blocks), "heads": vision["num_heads"],
             "hidden": trunk.blocks[0].mlp.fc1.out_features, "pos_grid": trunk.patch_embed.grid_size[0],
             "input_px": side, "pooler_dim": model.visual.attn_pool_contrast.query.shape[1],
             "pooler_heads": 8, "pooler_queries": 1}
    save(out, "conch-vision", weights, feats, sizes)


def conch_model(conch, full):
    """CONCH's CoCa at full or reduced size, and its vision config."""
    sys.path.insert(0, conch)
    from conch.open_clip_custom.coca_model import CoCa
    # CONCH's conch_ViT-B-16.json at reduced size: the vision tower (a timm ViT-B/16 trunk and the
    # attentional poolers), a small text tower, no decoder (the public checkpoint has none).
    vision = dict(layers=12 if full else 2, width=768 if full else 32, num_heads=12 if full else 4, mlp_ratio=4,
                  patch_size=16, image_size=448 if full else 224, attentional_pool_contrast=True,
                  attentional_pool_caption=True, attn_pooler_heads=8, n_queries_contrast=1,
                  n_queries_caption=256 if full else 4, output_tokens=True)
    text = dict(context_length=16, vocab_size=64, width=32, heads=4, layers=1, embed_cls=True, output_tokens=True)
    multimodal = dict(context_length=16, vocab_size=64, width=32, heads=4, layers=0)
    model = CoCa(embed_dim=512 if full else 16, embed_dim_caption=768 if full else 32, multimodal_cfg=multimodal,
                 text_cfg=text, vision_cfg=vision).eval()
    return model, vision


def phikon_config(full):
    from transformers import ViTConfig
    # owkin/phikon's config.json (a ViTModel, ViT-B/16 at 224 px, LayerNorm epsilon 1e-12).
    return ViTConfig(hidden_size=768 if full else 32, num_hidden_layers=12 if full else 2,
                     num_attention_heads=12 if full else 4, intermediate_size=3072 if full else 128,
                     image_size=224, patch_size=16, layer_norm_eps=1e-12, qkv_bias=True)


def phikon_v1_model(full):
    """owkin/phikon as its users build it (seeded, so the pixel fixtures rebuild the same model)."""
    from transformers import ViTModel
    torch.manual_seed(13)
    # owkin/phikon ships a ViTModel's pytorch_model.bin with its pooler; TRIDENT builds it without
    # the pooler (add_pooling_layer=False; the file's pooler is left unused) and takes
    # last_hidden_state[:, 0].
    model = ViTModel(phikon_config(full), add_pooling_layer=True).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layernorm" in n and n.endswith("weight"):
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
    return model


def make_phikon_v1(out, u8, full):
    from transformers.core_model_loading import revert_weight_conversion
    model = phikon_v1_model(full)
    weights = os.path.join(out, "phikon.pytorch_model.bin")
    # The names a ViTModel's checkpoint holds (save_pretrained's, not transformers 5's in-memory ones).
    torch_save(revert_weight_conversion(model, model.state_dict()), weights)
    with torch.no_grad():
        feats = model(pixel_values=normalise(u8, IMAGENET)).last_hidden_state[:, 0]
    c = model.config
    sizes = {"dim": c.hidden_size, "depth": c.num_hidden_layers, "heads": c.num_attention_heads,
             "hidden": c.intermediate_size, "pos_grid": c.image_size // c.patch_size}
    save(out, "phikon", weights, feats, sizes)


def midnight_model(full):
    """kaiko-ai/midnight as its users load it (AutoModel: a transformers Dinov2Model, ViT-g/14 with
    SwiGLU), seeded so the pixel fixtures rebuild the same model."""
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(17)
    cfg = Dinov2Config(hidden_size=1536 if full else 32, num_hidden_layers=40 if full else 2,
                       num_attention_heads=24 if full else 4, mlp_ratio=4, image_size=224, patch_size=14,
                       layerscale_value=1.0, use_swiglu_ffn=True)
    model = Dinov2Model(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lambda1") or (("norm" in n) and n.endswith("weight")):
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
    return model


def midnight_features(model, x):
    """Midnight's card: the class token ⊕ the mean of the patch tokens."""
    with torch.no_grad():
        out = model(pixel_values=x).last_hidden_state
        return torch.cat([out[:, 0], out[:, 1:].mean(1)], dim=-1)


def make_hf_dinov2(out, stem, model, features, mean_std, u8):
    """A Hugging Face DINOv2's fixture: model.safetensors under the names save_pretrained writes."""
    from transformers.core_model_loading import revert_weight_conversion
    weights = os.path.join(out, f"{stem}.model.safetensors")
    state = revert_weight_conversion(model, model.state_dict())
    save_file({k: v.contiguous() for k, v in state.items()}, weights)
    c = model.config
    sizes = {"dim": c.hidden_size, "depth": c.num_hidden_layers, "heads": c.num_attention_heads,
             "hidden": state["encoder.layer.0.mlp.weights_in.weight"].shape[0], "pos_grid": c.image_size // c.patch_size}
    save(out, stem, weights, features(model, normalise(u8, mean_std)), sizes)


def committed_hf(out, stem, model):
    """`model` (rebuilt from its seed), checked to hold the committed fixture's weights."""
    from safetensors.torch import load_file
    from transformers.core_model_loading import revert_weight_conversion
    state = load_file(os.path.join(out, f"{stem}.model.safetensors"))
    mine = revert_weight_conversion(model, model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in mine.items()), f"{stem}: not the committed weights"
    return model


def hibou_model(full):
    """histai/hibou-L as transformers builds a DINOv2 with registers (Dinov2WithRegistersModel: the
    names and the position handling of the customised DINOv2 its hub code adds registers to),
    seeded. The fixture stores a 7×7 grid (98 px) and is fed 224 px, so the grid is resampled."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    torch.manual_seed(19)
    cfg = Dinov2WithRegistersConfig(hidden_size=1024 if full else 32, num_hidden_layers=24 if full else 2,
                                    num_attention_heads=16 if full else 4, mlp_ratio=4,
                                    image_size=224 if full else 98, patch_size=14, num_register_tokens=4,
                                    use_swiglu_ffn=True, layerscale_value=1.0)
    model = Dinov2WithRegistersModel(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lambda1") or (("norm" in n) and n.endswith("weight")):
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
            elif n.endswith(("register_tokens", "cls_token")):
                p.copy_(torch.randn_like(p))
    return model


def hibou_features(model, x):
    """TRIDENT's hibou_l: the model's pooler_output (the class token after the final LayerNorm)."""
    with torch.no_grad():
        return model(pixel_values=x).pooler_output


def openmidnight_model(dinov2, full):
    """SophontAI/OpenMidnight as TRIDENT builds it: facebookresearch/dinov2's dinov2_vitg14_reg
    (DinoVisionTransformer with the hub's arguments), seeded. The fixture stores a 7×7 grid and is
    fed 224 px, so the grid is resampled (bicubic with antialiasing, by size, as the hub sets it)."""
    sys.path.insert(0, dinov2)
    from dinov2.models.vision_transformer import DinoVisionTransformer
    torch.manual_seed(23)
    model = DinoVisionTransformer(img_size=518 if full else 98, patch_size=14, embed_dim=1536 if full else 32,
                                  depth=40 if full else 2, num_heads=24 if full else 4, mlp_ratio=4,
                                  init_values=1.0, ffn_layer="swiglufused", block_chunks=0, num_register_tokens=4,
                                  interpolate_antialias=True, interpolate_offset=0.0).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".gamma") or (("norm" in n) and n.endswith("weight")):
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
            elif n.endswith(("register_tokens", "cls_token", "pos_embed")):
                p.copy_(torch.randn_like(p))
    return model


def make_openmidnight(out, u8, dinov2, full):
    model = openmidnight_model(dinov2, full)
    weights = os.path.join(out, "openmidnight.pytorch_model.bin")
    torch_save(model.state_dict(), weights)
    with torch.no_grad():
        feats = model(normalise(u8, IMAGENET))
    blk = model.blocks[0]
    sizes = {"dim": model.embed_dim, "depth": len(model.blocks), "heads": blk.attn.num_heads,
             "hidden": blk.mlp.w12.out_features, "pos_grid": model.patch_embed.patches_resolution[0]}
    save(out, "openmidnight", weights, feats, sizes)


def conch15_module(trident):
    """CONCH v1.5's vision tower code as TRIDENT ships it (imported from a checkout, never copied)."""
    import importlib.util
    path = os.path.join(trident, "trident", "patch_encoder_models", "model_zoo", "conchv1_5", "conchv1_5.py")
    spec = importlib.util.spec_from_file_location("conchv1_5", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def conch15_model(m, full, img_size):
    """TRIDENT's CONCHVisionTower, its trunk built at img_size (its code builds it at 224 and resizes
    the checkpoint's position grid to that at load): at full size as its code builds it, reduced
    with its own classes (VisionTransformer, AttentionalPooler) otherwise."""
    torch.manual_seed(29)
    if full and img_size == 224:
        tower = m.CONCHVisionTower()
    else:
        tower = m.CONCHVisionTower.__new__(m.CONCHVisionTower)
        torch.nn.Module.__init__(tower)
        if full:
            tower.trunk = m.vit_large(init_values=1.0, img_size=img_size)
        else:
            tower.trunk = m.VisionTransformer(img_size=img_size, patch_size=16, embed_dim=32, depth=2, num_heads=4,
                                              mlp_ratio=4, qkv_bias=True, init_values=1.0)
        d_model = 768 if full else 16
        tower.attn_pool_contrast = m.AttentionalPooler(d_model=d_model, context_dim=tower.trunk.embed_dim,
                                                       n_head=8 if full else 4, n_queries=1)
        tower.ln_contrast = torch.nn.LayerNorm(d_model)
    with torch.no_grad():
        for n, p in tower.named_parameters():
            if n.endswith(".gamma") or (("norm" in n or "ln_" in n) and n.endswith("weight")):
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
    return tower.eval()


def conch15_load(m, weights):
    """What TRIDENT's create_model_from_pretrained does with the file: the trunk built at 224, the
    checkpoint's position grid resized to it (timm's bilinear), a strict load."""
    model = conch15_model(m, False, 224)
    state = torch.load(weights)
    state["trunk.pos_embed"] = m.resize_pos_embed(model.trunk, state["trunk.pos_embed"], verbose=False)
    model.load_state_dict(state, strict=True)
    return model


def make_conch15(out, u8, trident):
    m = conch15_module(trident)
    # The file as trained: the trunk at 448 px (a 28x28 position grid).
    shipped = conch15_model(m, False, 448)
    weights = os.path.join(out, "conch-v1.5.pytorch_model.bin")
    torch_save(shipped.state_dict(), weights)
    model = conch15_load(m, weights)
    with torch.no_grad():
        feats = model(normalise(u8, IMAGENET))
    trunk = shipped.trunk
    sizes = {"dim": trunk.embed_dim, "depth": len(trunk.blocks), "heads": trunk.blocks[0].attn.num_heads,
             "hidden": trunk.blocks[0].mlp.fc1.out_features, "pos_grid": trunk.patch_embed.grid_size[0],
             "input_px": 224, "pooler_dim": shipped.attn_pool_contrast.query.shape[1],
             "pooler_heads": shipped.attn_pool_contrast.heads, "pooler_queries": 1}
    save(out, "conch-v1.5", weights, feats, sizes)


def resample_fixture(out):
    """Position grids resampled by timm (bicubic, antialias), by Hugging Face (bicubic) and by CONCH
    v1.5's code (bilinear at load, bicubic at a scale factor at run time)."""
    from timm.layers import resample_abs_pos_embed
    torch.manual_seed(3)
    grid = torch.randn(1, 7 * 7, 8)
    t = {"grid": grid[0]}
    for g in (16, 5):
        t[f"timm_{g}"] = resample_abs_pos_embed(grid, new_size=(g, g), old_size=(7, 7), num_prefix_tokens=0)[0]
        x = grid.reshape(1, 7, 7, 8).permute(0, 3, 1, 2)
        y = torch.nn.functional.interpolate(x, size=(g, g), mode="bicubic", align_corners=False)
        t[f"hf_{g}"] = y.permute(0, 2, 3, 1).reshape(g * g, 8)
    # CONCH v1.5's two steps (TRIDENT's conchv1_5.py): at load timm's bilinear without antialiasing to
    # the grid the trunk is built at (5 here), at run time bicubic at the scale factor (g + 0.1)/5.
    built = resample_abs_pos_embed(grid, new_size=(5, 5), old_size=(7, 7), num_prefix_tokens=0,
                                   interpolation="bilinear", antialias=False)
    for g in (9, 7):
        x = built.reshape(1, 5, 5, 8).permute(0, 3, 1, 2)
        y = torch.nn.functional.interpolate(x, scale_factor=((g + 0.1) / 5, (g + 0.1) / 5), mode="bicubic")
        assert y.shape[-1] == g
        t[f"conch15_{g}"] = y.permute(0, 2, 3, 1).reshape(g * g, 8)
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(out, "resample.safetensors"))


def shapes(path, conch, dinov2, trident):
    """Every preset at full size, on the meta device: its shipped tensors and its features' width."""
    record = {}

    def add(name, model, state, mean_std, output, side, features):
        record[name] = {
            "tensors": {k: list(v.shape) for k, v in state.items()},
            "feature_dim": int(features.shape[-1]),
            "output": output,
            "input_px": side,
            "mean": mean_std[0],
            "std": mean_std[1],
        }
        print(f"{name}: {len(state)} tensors, {sum(v.numel() for v in state.values()) / 1e6:.0f}M numbers, "
              f"{int(features.shape[-1])}-d features", file=sys.stderr)

    with torch.device("meta"):
        presets = timm_presets(True)
        # H-optimus-1 is built as H-optimus-0 (its card and TRIDENT): its own entry all the same.
        presets["h-optimus-1"] = presets["h-optimus-0"]
        for name, (build, mean_std, output, side) in presets.items():
            model = build().eval()
            x = torch.empty(1, 3, side, side)
            add(name, model, model.state_dict(), mean_std, output, side, timm_features(model, x, output))
        from transformers import Dinov2Config, Dinov2Model
        # owkin/phikon-v2's config.json.
        cfg = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                           image_size=224, patch_size=16, layerscale_value=1e-5, use_swiglu_ffn=False)
        model = Dinov2Model(cfg).eval()
        feats = model(pixel_values=torch.empty(1, 3, 224, 224)).last_hidden_state[:, 0]
        # The names as save_pretrained writes them (the shipped checkpoint's), not transformers 5's
        # in-memory renames.
        from transformers.core_model_loading import revert_weight_conversion
        add("phikon-v2", model, revert_weight_conversion(model, model.state_dict()), IMAGENET, "class", 224, feats)
        from transformers import ViTModel
        model = ViTModel(phikon_config(True), add_pooling_layer=True).eval()
        feats = model(pixel_values=torch.empty(1, 3, 224, 224)).last_hidden_state[:, 0]
        add("phikon", model, revert_weight_conversion(model, model.state_dict()), IMAGENET, "class", 224, feats)
        model = midnight_model(True)
        feats = midnight_features(model, torch.empty(1, 3, 224, 224))
        add("midnight-12k", model, revert_weight_conversion(model, model.state_dict()), UNIFORM, "class+mean", 224,
            feats)
        model = hibou_model(True)
        add("hibou-l", model, revert_weight_conversion(model, model.state_dict()), HIBOU, "class", 224,
            hibou_features(model, torch.empty(1, 3, 224, 224)))
        if trident:
            m = conch15_module(trident)
            with torch.device("cpu"), torch.no_grad():  # its constructor reads a value (.item()): not on meta
                model = conch15_model(m, True, 224)
                add("conch-v1.5", model, model.state_dict(), IMAGENET, "class", 448,
                    model(torch.zeros(1, 3, 448, 448)))
        else:
            print("conch-v1.5: skipped (no --trident checkout)", file=sys.stderr)
        if dinov2:
            model = openmidnight_model(dinov2, True)
            # The checkpoint's position embedding is TRIDENT's to load as it is (its own parameter).
            add("openmidnight", model, model.state_dict(), IMAGENET, "class", 224, model(torch.empty(1, 3, 224, 224)))
        else:
            print("openmidnight: skipped (no --dinov2 checkout)", file=sys.stderr)
        if conch:
            sys.path.insert(0, conch)
            from conch.open_clip_custom.coca_model import CoCa
            from conch.open_clip_custom.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
            # As conch.open_clip_custom.create_model builds it: the config CoCa(**cfg).
            cfg_path = os.path.join(conch, "conch", "open_clip_custom", "model_configs", "conch_ViT-B-16.json")
            with open(cfg_path) as f:
                c = json.load(f)
            c.pop("custom_text", None)
            model = CoCa(**c).eval()
            side = c["vision_cfg"]["image_size"]
            feats = model.encode_image(torch.empty(1, 3, side, side), proj_contrast=False, normalize=False)
            mean_std = (list(OPENAI_DATASET_MEAN), list(OPENAI_DATASET_STD))
            add("conch-vision", model, model.state_dict(), mean_std, "class", side, feats)
        else:
            print("conch-vision: skipped (no --conch checkout)", file=sys.stderr)
    # Each publisher's eval transform (pixel_cases, TRIDENT's; CONCH's at its own 448 px): the side
    # it resizes to and the side it crops, what wsimil's preparation is held to.
    from torchvision import transforms as T
    cases = pixel_cases()
    cases["conch-vision"] = ("conch-vision", T.Compose([T.Resize(448, interpolation=T.InterpolationMode.BICUBIC),
                                                        T.CenterCrop(448)]))
    cases["h-optimus-1"] = cases["h-optimus-0"]
    for name, (_, transform) in cases.items():
        if name in record:
            steps = transform.transforms
            resize = next(t for t in steps if isinstance(t, T.Resize))
            crop = next((t for t in steps if isinstance(t, T.CenterCrop)), None)
            side = lambda v: v if isinstance(v, int) else v[0]
            record[name]["transform"] = {"resize": side(resize.size), "crop": side(crop.size) if crop else None,
                                         "interpolation": resize.interpolation.value}
    if os.path.exists(path):  # entries this run could not make (conch-vision without --conch) are kept
        with open(path) as f:
            record = {**json.load(f), **record}
    with open(path, "w") as f:
        json.dump(record, f, indent=0, sort_keys=True)
        f.write("\n")
    print(f"{len(record)} presets' full-size tensors (timm {__import__('timm').__version__}, "
          f"transformers {__import__('transformers').__version__}) in {path}", file=sys.stderr)


def timm_transform(data_config):
    from timm.data import create_transform
    return create_transform(**data_config, is_training=False)


def pixel_cases():
    """Each case: (name, wsimil's --embedder, the publisher's eval transform at 224 px input)."""
    from torchvision import transforms as T
    I = T.InterpolationMode

    def tv(resize, crop, mean_std, interp=I.BILINEAR):
        steps = [T.Resize(resize, interpolation=interp)] + ([T.CenterCrop(crop)] if crop else [])
        return T.Compose(steps + [T.ToTensor(), T.Normalize(*mean_std)])

    # TRIDENT's trident/patch_encoder_models/load.py, encoder by encoder.
    return {
        "uni": ("uni", tv(224, 224, IMAGENET)),  # uni_v1: Resize(224), CenterCrop(224)
        "virchow2": ("virchow2", tv(224, None, IMAGENET, I.BICUBIC)),  # Resize(224, bicubic)
        "h-optimus-0": ("h-optimus-0", tv(224, None, HOPTIMUS)),  # hoptimus0: Resize(224)
        "gigapath-tile": ("gigapath-tile", tv(256, 224, IMAGENET, I.BICUBIC)),  # Resize(256, bicubic), CenterCrop(224)
        "uni2-h": ("uni2-h", tv(224, 224, IMAGENET)),  # uni_v2: Resize(224), CenterCrop(224)
        "phikon-v2": ("phikon-v2", tv(224, 224, IMAGENET)),  # phikon_v2: Resize(224), CenterCrop(224)
        # conch_v1: CONCH's own image_transform (Resize bicubic, CenterCrop, OpenAI's statistics), at the
        # fixture's 224 px input (the preset's is 448).
        "conch-vision": ("conch-vision", tv(224, 224, OPENAI, I.BICUBIC)),
        "phikon": ("phikon", tv(224, None, IMAGENET)),  # get_eval_transforms(224, bilinear)
        "midnight-12k": ("midnight-12k", tv(224, 224, UNIFORM)),  # Resize(224), CenterCrop(224), kaiko constants
        "hibou-l": ("hibou-l", tv(224, None, HIBOU, I.BICUBIC)),  # get_eval_transforms(224, bicubic), hibou constants
        "openmidnight": ("openmidnight", T.Compose([T.Resize((224, 224)), T.ToTensor(), T.Normalize(*IMAGENET)])),
        # conch_v15: Resize(448, bilinear), CenterCrop(448), ImageNet's statistics; the network fed 448 px,
        # so its code resamples the position grid at run time too.
        "conch-v1.5": ("conch-v1.5", tv(448, 448, IMAGENET)),
        "virchow": ("virchow", tv(224, None, IMAGENET, I.BICUBIC)),  # Resize(224, bicubic)
        "gpfm": ("gpfm", tv(224, None, IMAGENET, I.BICUBIC)),  # get_eval_transforms(224, bicubic)
        # lunit-vits8 and h0-mini: timm's create_transform of the hub file's data config.
        "lunit-vits8": ("lunit-vits8", timm_transform(dict(input_size=(3, 224, 224), interpolation="bicubic",
                                                           mean=IMAGENET[0], std=IMAGENET[1], crop_pct=0.9,
                                                           crop_mode="center"))),
        "h0-mini": ("h0-mini", timm_transform(dict(input_size=(3, 224, 224), interpolation="bicubic",
                                                   mean=HOPTIMUS[0], std=HOPTIMUS[1], crop_pct=1.0,
                                                   crop_mode="center"))),
        # kaiko-*: get_eval_transforms(224, center_crop=True, bilinear) with the kaiko constants.
        **{k: (k, tv(224, 224, UNIFORM)) for k in
           ("kaiko-vits8", "kaiko-vits16", "kaiko-vitb8", "kaiko-vitb16", "kaiko-vitl14")},
    }


def pixels(out, data, conch, dinov2, trident):
    """Features of uint8 patches through each publisher's transform (see the module's doc)."""
    import timm
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg
    img = np.asarray(Image.open(os.path.join(data, "target_image.png")).convert("RGB"))
    sides = {224: np.stack([img[0:224, 0:224], img[400:624, 300:524]]),
             256: np.stack([img[0:256, 0:256], img[400:656, 300:556]])}
    assert np.array_equal(sides[224], patches(data)), "the 224 px patches are patches.safetensors's"
    tensors = {"patches_256": torch.from_numpy(np.ascontiguousarray(sides[256]))}
    record = {}
    presets = timm_presets(False)

    def run(name, embedder, model, transform, output):
        for side, u8 in sides.items():
            x = torch.stack([transform(Image.fromarray(p)) for p in u8])
            tensors[f"{name}_{side}"] = timm_features(model, x, output).contiguous()
        record[name] = {"embedder": embedder, "sides": sorted(sides)}

    for name, (embedder, transform) in pixel_cases().items():
        if name in presets:
            build, _, output, _ = presets[name]
            model = build().eval()
            model.load_state_dict(torch.load(os.path.join(out, f"{name}.pytorch_model.bin")))
            run(name, embedder, model, transform, output)
        elif name == "phikon-v2":
            model = committed_hf(out, name, phikon_v2_model(False))
            run(name, embedder, lambda x: model(pixel_values=x).last_hidden_state[:, 0], transform, "fn")
        elif name == "phikon":
            from transformers.core_model_loading import revert_weight_conversion
            model = phikon_v1_model(False)
            state = torch.load(os.path.join(out, "phikon.pytorch_model.bin"))
            mine = revert_weight_conversion(model, model.state_dict())
            assert all(torch.equal(state[k], v) for k, v in mine.items()), "phikon: not the committed weights"
            run(name, embedder, lambda x: model(pixel_values=x).last_hidden_state[:, 0], transform, "fn")
        elif name == "midnight-12k":
            model = committed_hf(out, name, midnight_model(False))
            run(name, embedder, lambda x, m=model: midnight_features(m, x), transform, "fn")
        elif name == "hibou-l":
            model = committed_hf(out, name, hibou_model(False))
            run(name, embedder, lambda x, m=model: hibou_features(m, x), transform, "fn")
        elif name == "openmidnight":
            if not dinov2:
                sys.exit("openmidnight's pixel case needs --dinov2 DINOV2_CHECKOUT")
            model = openmidnight_model(dinov2, False)
            model.load_state_dict(torch.load(os.path.join(out, "openmidnight.pytorch_model.bin")))
            run(name, embedder, model, transform, "fn")
        elif name == "conch-v1.5":
            if not trident:
                sys.exit("conch-v1.5's pixel case needs --trident TRIDENT_CHECKOUT")
            model = conch15_load(conch15_module(trident), os.path.join(out, "conch-v1.5.pytorch_model.bin"))
            run(name, embedder, model, transform, "fn")
            record[name]["input_px"] = 448
        elif name == "conch-vision":
            if not conch:
                sys.exit("conch-vision's pixel case needs --conch CONCH_CHECKOUT")
            model, vision = conch_model(conch, False)
            model.load_state_dict(torch.load(os.path.join(out, "conch-vision.pytorch_model.bin")))
            model.eval()
            run(name, embedder, lambda x: model.encode_image(x, proj_contrast=False, normalize=False), transform,
                "fn")
    # A timm name with timm's own weights: timm's eval transform for the tag (resize to 248, crop 224,
    # mean = std = 0.5), on a small model of that architecture saved here.
    tag = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    torch.manual_seed(5)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **SMALL).eval()
    weights = os.path.join(out, "pixels-vit_tiny.pytorch_model.bin")
    torch.save(model.state_dict(), weights)
    transform = create_transform(**resolve_data_config(pretrained_cfg=get_pretrained_cfg(tag).to_dict()))
    run("timm-tag", f"vit:{tag}", model, transform, "class")
    record["timm-tag"].update(weights=os.path.basename(weights), sizes=timm_sizes(model), transform=str(transform))
    save_file(tensors, os.path.join(out, "pixels.safetensors"))
    with open(os.path.join(out, "pixels.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"pixel fixtures for {', '.join(record)} (timm {timm.__version__}, torch {torch.__version__})",
          file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--shapes", help="write every preset's full-size tensors and features' width to this JSON")
    ap.add_argument("--data", default=os.environ.get("WSIMIL_DATA", os.path.expanduser("~/.cache/wsimil/data")))
    ap.add_argument("--conch", help="a checkout of mahmoodlab/CONCH (for conch-vision)")
    ap.add_argument("--dinov2", help="a checkout of facebookresearch/dinov2 (for openmidnight)")
    ap.add_argument("--trident", help="a checkout of mahmoodlab/TRIDENT (for conch-v1.5's code)")
    ap.add_argument("--full", help="build this one preset at full size instead")
    ap.add_argument("--pixels", help="write the pixel-to-feature fixtures into this fixtures folder")
    a = ap.parse_args()
    if a.pixels:
        pixels(a.pixels, a.data, a.conch, a.dinov2, a.trident)
        return
    if a.shapes:
        shapes(a.shapes, a.conch, a.dinov2, a.trident)
        return
    if not a.out:
        ap.error("--out DIR (or --shapes FILE)")
    os.makedirs(a.out, exist_ok=True)
    u8 = patches(a.data)
    save_file({"patches": torch.from_numpy(np.ascontiguousarray(u8))}, os.path.join(a.out, "patches.safetensors"))
    full = a.full is not None
    for name, (build, mean_std, output, _) in timm_presets(full).items():
        if a.full in (None, name):
            make_timm(a.out, name, build, mean_std, output, u8)
    if a.full in (None, "phikon-v2"):
        make_phikon(a.out, u8, full)
    if a.full in (None, "phikon"):
        make_phikon_v1(a.out, u8, full)
    if a.full in (None, "midnight-12k"):
        make_hf_dinov2(a.out, "midnight-12k", midnight_model(full), midnight_features, UNIFORM, u8)
    if a.full in (None, "hibou-l"):
        make_hf_dinov2(a.out, "hibou-l", hibou_model(full), hibou_features, HIBOU, u8)
    if a.full in (None, "openmidnight"):
        if a.dinov2:
            make_openmidnight(a.out, u8, a.dinov2, full)
        else:
            print("openmidnight: skipped (no --dinov2 checkout)", file=sys.stderr)
    if a.full in (None, "conch-v1.5"):
        if a.trident:
            make_conch15(a.out, u8, a.trident)
        else:
            print("conch-v1.5: skipped (no --trident checkout)", file=sys.stderr)
    if a.full in (None, "conch-vision"):
        if a.conch:
            make_conch(a.out, u8, a.conch, full)
        else:
            print("conch-vision: skipped (no --conch checkout)", file=sys.stderr)
    if not full:
        resample_fixture(a.out)
    print(f"vit fixtures (timm {__import__('timm').__version__}, torch {torch.__version__}) in {a.out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
