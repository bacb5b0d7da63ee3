//! The patch embedders wsimil knows, by name: [`Architecture`] is what `--embedder` takes, what a
//! run's plan records and what an embedder id starts with; it builds the network and says how its
//! patches are prepared.
//!
//! Besides the two CNNs, the pathology foundation models (Vision Transformers, [`super::vit`]) as
//! [`VitPreset`]s, one row each of [`VitPreset::spec`]: architecture, input, normalisation, the
//! resolution they were trained at, output, and where the publisher distributes the weights (which
//! wsimil reads as published). `vit:<timm-name>` builds any timm ViT by its timm name
//! ([`timm_config`]); the optional parts (LayerScale, registers, SwiGLU, the position grid) are
//! read off the weights file.
//!
//! A timm name's patches are prepared as timm prepares them for that name's pretrained weights
//! ([`timm_preprocessing`]): `vit:<name>.<tag>`, or `vit:<name>` for timm's default tag, takes the
//! input side, mean and std and crop of timm's pretrained config, from `timm_pretrained.json`
//! (generated from timm by `scripts/dev/timm_pretrained.py` and committed). Weights trained
//! elsewhere on a timm architecture say their normalisation: `vit:<name>@imagenet`, `@uniform`
//! (mean = std = 0.5), `@openai-clip` or `@R,G,B/R,G,B`, fed at the name's own size. A name timm
//! has no pretrained config for, without `@`, is refused: never a silent ImageNet.

use super::embedder::{Embedder, Tune};
use super::vit::{MlpKind, Naming, Output, PoolerConfig, PosResample, Vit, VitConfig};
use crate::features::Preprocessing;
use candle_core::Result;
use candle_nn::VarBuilder;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// ImageNet's normalisation (torchvision's and timm's default).
pub const IMAGENET: ([f32; 3], [f32; 3]) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
/// OpenAI CLIP's (CONCH's).
pub const OPENAI_CLIP: ([f32; 3], [f32; 3]) =
    ([0.481_454_66, 0.457_827_5, 0.408_210_73], [0.268_629_54, 0.261_302_6, 0.275_777_1]);
/// Bioptimus's (H-optimus-0 and -1).
pub const H_OPTIMUS: ([f32; 3], [f32; 3]) = ([0.707_223, 0.578_729, 0.703_617], [0.211_883, 0.230_117, 0.177_517]);
/// HistAI's (Hibou: TRIDENT's `hibou` constants).
pub const HIBOU: ([f32; 3], [f32; 3]) = ([0.7068, 0.5755, 0.722], [0.195, 0.2316, 0.1816]);

/// Mean = std = 0.5 (Kaiko's models and Midnight: TRIDENT's `kaiko` constants).
pub const UNIFORM: ([f32; 3], [f32; 3]) = ([0.5; 3], [0.5; 3]);
/// The pathology foundation models wsimil has presets for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VitPreset {
    Uni,
    Uni2H,
    Virchow2,
    HOptimus0,
    HOptimus1,
    GigapathTile,
    PhikonV2,
    ConchVision,
    Virchow,
    H0Mini,
    Gpfm,
    KaikoVitS8,
    KaikoVitS16,
    KaikoVitB8,
    KaikoVitB16,
    KaikoVitL14,
    LunitVitS8,
    Phikon,
    Midnight12k,
    OpenMidnight,
    HibouL,
    ConchV15,
}

/// One preset's row of the table: everything wsimil needs to run the encoder as published.
#[derive(Debug, Clone)]
pub struct PresetSpec {
    pub name: &'static str,
    /// The publisher's model, as its model card names it.
    pub model: &'static str,
    pub config: VitConfig,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Resize the patch to this first, then crop the centre (the publisher's transform).
    pub resize_px: Option<u32>,
    /// The patch side (pixels) and resolution (µm per pixel) the encoder is used at: TRIDENT's
    /// patch size at 20× (0.5 µm/px), what `wsimil run` tiles at unless told otherwise.
    pub patch_px: u32,
    pub mpp: f64,
    /// Where the publisher distributes the weights, and the file wsimil reads.
    pub weights: &'static str,
}

impl VitPreset {
    pub const ALL: [VitPreset; 22] = [
        VitPreset::Uni,
        VitPreset::Uni2H,
        VitPreset::Virchow2,
        VitPreset::HOptimus0,
        VitPreset::HOptimus1,
        VitPreset::GigapathTile,
        VitPreset::PhikonV2,
        VitPreset::ConchVision,
        VitPreset::Virchow,
        VitPreset::H0Mini,
        VitPreset::Gpfm,
        VitPreset::KaikoVitS8,
        VitPreset::KaikoVitS16,
        VitPreset::KaikoVitB8,
        VitPreset::KaikoVitB16,
        VitPreset::KaikoVitL14,
        VitPreset::LunitVitS8,
        VitPreset::Phikon,
        VitPreset::Midnight12k,
        VitPreset::OpenMidnight,
        VitPreset::HibouL,
        VitPreset::ConchV15,
    ];

    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// TRIDENT's name for the same encoder (`trident.patch_encoder_models`), which `--embedder`
    /// takes too: the same network, weights file, transform and output as TRIDENT's.
    pub fn trident_name(self) -> &'static str {
        match self {
            VitPreset::Uni => "uni_v1",
            VitPreset::Uni2H => "uni_v2",
            VitPreset::Virchow2 => "virchow2",
            VitPreset::HOptimus0 => "hoptimus0",
            VitPreset::HOptimus1 => "hoptimus1",
            VitPreset::GigapathTile => "gigapath",
            VitPreset::PhikonV2 => "phikon_v2",
            VitPreset::ConchVision => "conch_v1",
            VitPreset::Virchow => "virchow",
            VitPreset::H0Mini => "h0-mini",
            VitPreset::Gpfm => "gpfm",
            VitPreset::KaikoVitS8 => "kaiko-vits8",
            VitPreset::KaikoVitS16 => "kaiko-vits16",
            VitPreset::KaikoVitB8 => "kaiko-vitb8",
            VitPreset::KaikoVitB16 => "kaiko-vitb16",
            VitPreset::KaikoVitL14 => "kaiko-vitl14",
            VitPreset::LunitVitS8 => "lunit-vits8",
            VitPreset::Phikon => "phikon",
            VitPreset::Midnight12k => "midnight12k",
            VitPreset::OpenMidnight => "openmidnight",
            VitPreset::HibouL => "hibou_l",
            VitPreset::ConchV15 => "conch_v15",
        }
    }

    /// The preset's row. Sources: each publisher's model card and loading code, timm's
    /// `vision_transformer.py`, TRIDENT's encoder registry (docs/encoders.md lists them).
    pub fn spec(self) -> PresetSpec {
        let timm = |patch, pos_grid, dim, depth, heads, mlp, hidden, reg, pos_prefix| VitConfig {
            patch,
            input_px: 224,
            pos_grid,
            dim,
            depth,
            heads,
            mlp,
            hidden,
            layer_scale: true,
            reg_tokens: reg,
            pos_prefix,
            qkv_bias: true,
            eps: 1e-6,
            output: Output::ClassToken,
            naming: Naming::Timm,
            resample: PosResample::TimmBicubicAntialias,
            pooler: None,
        };
        let row = |name, model, config, (mean, std): ([f32; 3], [f32; 3]), patch_px, weights| PresetSpec {
            name,
            model,
            config,
            mean,
            std,
            resize_px: None,
            patch_px,
            mpp: 0.5,
            weights,
        };
        match self {
            VitPreset::Uni => row(
                "uni",
                "UNI (MahmoodLab), ViT-L/16",
                timm(16, 14, 1024, 24, 16, MlpKind::Gelu, 4096, 0, true),
                IMAGENET,
                256,
                "https://huggingface.co/MahmoodLab/UNI (pytorch_model.bin; gated: accept the terms there)",
            ),
            VitPreset::Uni2H => row(
                "uni2-h",
                "UNI2-h (MahmoodLab), ViT-H/14, SwiGLU, 8 registers",
                timm(14, 16, 1536, 24, 24, MlpKind::SwiGlu, 8192, 8, false),
                IMAGENET,
                256,
                "https://huggingface.co/MahmoodLab/UNI2-h (pytorch_model.bin; gated)",
            ),
            VitPreset::Virchow2 => row(
                "virchow2",
                "Virchow2 (Paige), ViT-H/14, SwiGLU, 4 registers",
                VitConfig {
                    output: Output::ClassTokenMeanPatches,
                    ..timm(14, 16, 1280, 32, 16, MlpKind::SwiGlu, 6832, 4, true)
                },
                IMAGENET,
                224,
                "https://huggingface.co/paige-ai/Virchow2 (pytorch_model.bin; gated)",
            ),
            VitPreset::HOptimus0 => row(
                "h-optimus-0",
                "H-optimus-0 (Bioptimus), ViT-g/14, 4 registers",
                timm(14, 16, 1536, 40, 24, MlpKind::SwiGlu, 8192, 4, false),
                H_OPTIMUS,
                224,
                "https://huggingface.co/bioptimus/H-optimus-0 (pytorch_model.bin)",
            ),
            VitPreset::HOptimus1 => row(
                "h-optimus-1",
                "H-optimus-1 (Bioptimus), ViT-g/14, 4 registers",
                timm(14, 16, 1536, 40, 24, MlpKind::SwiGlu, 8192, 4, false),
                H_OPTIMUS,
                224,
                "https://huggingface.co/bioptimus/H-optimus-1 (pytorch_model.bin; gated)",
            ),
            VitPreset::GigapathTile => PresetSpec {
                resize_px: Some(256),
                ..row(
                    "gigapath-tile",
                    "Prov-GigaPath tile encoder, ViT-g/16 (DINOv2 style)",
                    timm(16, 14, 1536, 40, 24, MlpKind::SwiGlu, 8192, 0, true),
                    IMAGENET,
                    256,
                    "https://huggingface.co/prov-gigapath/prov-gigapath (pytorch_model.bin; gated)",
                )
            },
            VitPreset::PhikonV2 => row(
                "phikon-v2",
                "Phikon-v2 (Owkin), DINOv2 ViT-L/16 (Hugging Face transformers)",
                VitConfig {
                    naming: Naming::HfDinov2,
                    resample: PosResample::Bicubic,
                    ..timm(16, 14, 1024, 24, 16, MlpKind::Gelu, 4096, 0, true)
                },
                IMAGENET,
                224,
                "https://huggingface.co/owkin/phikon-v2 (model.safetensors)",
            ),
            VitPreset::ConchVision => PresetSpec {
                mpp: 0.5,
                ..row(
                    "conch-vision",
                    "CONCH v1 (MahmoodLab) vision tower: ViT-B/16 at 448 + attentional pooler",
                    VitConfig {
                        input_px: 448,
                        layer_scale: false,
                        output: Output::AttentionPool,
                        naming: Naming::Conch,
                        pooler: Some(PoolerConfig { dim: 512, heads: 8, queries: 1 }),
                        ..timm(16, 28, 768, 12, 12, MlpKind::Gelu, 3072, 0, true)
                    },
                    OPENAI_CLIP,
                    512,
                    "https://huggingface.co/MahmoodLab/CONCH (pytorch_model.bin; gated)",
                )
            },
            VitPreset::Virchow => row(
                "virchow",
                "Virchow (Paige), ViT-H/14, SwiGLU",
                VitConfig {
                    output: Output::ClassTokenMeanPatches,
                    ..timm(14, 16, 1280, 32, 16, MlpKind::SwiGlu, 6832, 0, true)
                },
                IMAGENET,
                224,
                "https://huggingface.co/paige-ai/Virchow (pytorch_model.bin; gated)",
            ),
            VitPreset::H0Mini => row(
                "h0-mini",
                "H0-mini (Bioptimus), ViT-B/14 distilled from H-optimus-1, SwiGLU, 4 registers",
                VitConfig {
                    output: Output::ClassTokenMeanPatches,
                    ..timm(14, 16, 768, 12, 12, MlpKind::SwiGlu, 4096, 4, false)
                },
                H_OPTIMUS,
                224,
                "https://huggingface.co/bioptimus/H0-mini (model.safetensors; gated)",
            ),
            VitPreset::Gpfm => row(
                "gpfm",
                "GPFM (majiabo), DINOv2 ViT-L/14",
                timm(14, 16, 1024, 24, 16, MlpKind::Gelu, 4096, 0, true),
                IMAGENET,
                224,
                "https://huggingface.co/majiabo/GPFM (GPFM.pth)",
            ),
            VitPreset::KaikoVitS8 | VitPreset::KaikoVitS16 | VitPreset::KaikoVitB8 | VitPreset::KaikoVitB16 => {
                let (name, model, patch, dim, heads, file) = match self {
                    VitPreset::KaikoVitS8 => ("kaiko-vits8", "Kaiko ViT-S/8", 8, 384, 6, "vit_small_patch8_224"),
                    VitPreset::KaikoVitS16 => ("kaiko-vits16", "Kaiko ViT-S/16", 16, 384, 6, "vit_small_patch16_224"),
                    VitPreset::KaikoVitB8 => ("kaiko-vitb8", "Kaiko ViT-B/8", 8, 768, 12, "vit_base_patch8_224"),
                    _ => ("kaiko-vitb16", "Kaiko ViT-B/16", 16, 768, 12, "vit_base_patch16_224"),
                };
                let weights = match file {
                    "vit_small_patch8_224" => "https://huggingface.co/1aurent/vit_small_patch8_224.kaiko_ai_towards_large_pathology_fms (model.safetensors)",
                    "vit_small_patch16_224" => "https://huggingface.co/1aurent/vit_small_patch16_224.kaiko_ai_towards_large_pathology_fms (model.safetensors)",
                    "vit_base_patch8_224" => "https://huggingface.co/1aurent/vit_base_patch8_224.kaiko_ai_towards_large_pathology_fms (model.safetensors)",
                    _ => "https://huggingface.co/1aurent/vit_base_patch16_224.kaiko_ai_towards_large_pathology_fms (model.safetensors)",
                };
                row(
                    name,
                    model,
                    VitConfig {
                        layer_scale: false,
                        ..timm(patch, 224 / patch, dim, 12, heads, MlpKind::Gelu, 4 * dim, 0, true)
                    },
                    UNIFORM,
                    256,
                    weights,
                )
            }
            VitPreset::KaikoVitL14 => row(
                "kaiko-vitl14",
                "Kaiko ViT-L/14, DINOv2 with 4 registers (built at 518 px, fed 224)",
                timm(14, 37, 1024, 24, 16, MlpKind::Gelu, 4096, 4, false),
                UNIFORM,
                256,
                "https://huggingface.co/1aurent/vit_large_patch14_reg4_dinov2.kaiko_ai_towards_large_pathology_fms (model.safetensors)",
            ),
            // TRIDENT prepares it by the hub file's timm data config: timm's `dino` tag's (ImageNet
            // statistics, bicubic resize to 248, centre crop 224), not Lunit's training statistics.
            VitPreset::LunitVitS8 => PresetSpec {
                resize_px: Some(248),
                ..row(
                    "lunit-vits8",
                    "Lunit DINO ViT-S/8",
                    VitConfig { layer_scale: false, ..timm(8, 28, 384, 12, 6, MlpKind::Gelu, 1536, 0, true) },
                    IMAGENET,
                    224,
                    "https://huggingface.co/1aurent/vit_small_patch8_224.lunit_dino (model.safetensors)",
                )
            },
            VitPreset::Phikon => row(
                "phikon",
                "Phikon (Owkin), iBOT ViT-B/16 (Hugging Face transformers ViTModel)",
                VitConfig {
                    layer_scale: false,
                    eps: 1e-12,
                    naming: Naming::HfVit,
                    resample: PosResample::Bicubic,
                    ..timm(16, 14, 768, 12, 12, MlpKind::Gelu, 3072, 0, true)
                },
                IMAGENET,
                224,
                "https://huggingface.co/owkin/phikon (pytorch_model.bin)",
            ),
            VitPreset::Midnight12k => row(
                "midnight-12k",
                "Midnight-12k (Kaiko), DINOv2 ViT-g/14, SwiGLU (Hugging Face transformers Dinov2Model)",
                VitConfig {
                    naming: Naming::HfDinov2,
                    resample: PosResample::Bicubic,
                    output: Output::ClassTokenMeanPatches,
                    ..timm(14, 16, 1536, 40, 24, MlpKind::SwiGlu, 8192, 0, true)
                },
                UNIFORM,
                224,
                "https://huggingface.co/kaiko-ai/midnight (model.safetensors)",
            ),
            VitPreset::OpenMidnight => row(
                "openmidnight",
                "OpenMidnight (Sophont), DINOv2 ViT-g/14 with 4 registers (facebookresearch/dinov2's code)",
                VitConfig {
                    naming: Naming::Dinov2Hub,
                    ..timm(14, 16, 1536, 40, 24, MlpKind::SwiGlu, 8192, 4, true)
                },
                IMAGENET,
                224,
                "https://huggingface.co/SophontAI/OpenMidnight (teacher_checkpoint_load.pt; gated)",
            ),
            VitPreset::HibouL => row(
                "hibou-l",
                "Hibou-L (HistAI), DINOv2 ViT-L/14 with 4 registers, SwiGLU (Hugging Face names)",
                VitConfig {
                    naming: Naming::HfDinov2,
                    ..timm(14, 16, 1024, 24, 16, MlpKind::SwiGlu, 5472, 4, true)
                },
                HIBOU,
                224,
                "https://huggingface.co/histai/hibou-L (model.safetensors)",
            ),
            VitPreset::ConchV15 => row(
                "conch-v1.5",
                "CONCH v1.5 (MahmoodLab) vision tower: ViT-L/16 at 448 + attentional pooler (TRIDENT's code)",
                VitConfig {
                    input_px: 448,
                    output: Output::AttentionPool,
                    naming: Naming::Conch15,
                    resample: PosResample::Conch15 { build_grid: 14 },
                    pooler: Some(PoolerConfig { dim: 768, heads: 8, queries: 1 }),
                    ..timm(16, 14, 1024, 24, 16, MlpKind::Gelu, 4096, 0, true)
                },
                IMAGENET,
                512,
                "https://huggingface.co/MahmoodLab/conchv1_5 (pytorch_model_vision.bin; gated)",
            ),
        }
    }

    /// How the preset wants its patches.
    pub fn preprocessing(self) -> Preprocessing {
        let s = self.spec();
        Preprocessing {
            input_px: s.config.input_px as u32,
            resize: "area-average then bilinear".into(),
            mean: s.mean,
            std: s.std,
            resize_px: s.resize_px,
        }
    }
}

/// A ViT fixture's reduced sizes, as `scripts/dev/vit_fixtures.py` records them.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct FixtureSizes {
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub hidden: usize,
    pub pos_grid: usize,
    #[serde(default)]
    pub input_px: Option<usize>,
    #[serde(default)]
    pub pooler_dim: Option<usize>,
    #[serde(default)]
    pub pooler_heads: Option<usize>,
    #[serde(default)]
    pub pooler_queries: Option<usize>,
}

/// How patches are normalised for weights trained outside timm on a timm architecture.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Normalisation {
    /// ImageNet's mean and std (torchvision's, DINOv2's).
    Imagenet,
    /// Mean = std = 0.5 (timm's `augreg` weights, Kaiko, Midnight).
    Uniform,
    /// OpenAI CLIP's (CONCH's).
    OpenaiClip,
    /// Given as `R,G,B/R,G,B` (mean/std on [0, 1] RGB).
    Custom([f32; 3], [f32; 3]),
}

impl Normalisation {
    pub fn mean_std(self) -> ([f32; 3], [f32; 3]) {
        match self {
            Normalisation::Imagenet => IMAGENET,
            Normalisation::Uniform => ([0.5; 3], [0.5; 3]),
            Normalisation::OpenaiClip => OPENAI_CLIP,
            Normalisation::Custom(m, s) => (m, s),
        }
    }

    /// The token an embedder id holds for it (a custom one by a short hash of its text).
    fn id_token(text: &str) -> String {
        match text {
            "imagenet" | "uniform" | "openai-clip" => text.to_string(),
            _ => format!("norm{}", &crate::ids::content_hash([text.as_bytes()])[..8]),
        }
    }
}

impl fmt::Display for Normalisation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Normalisation::Imagenet => f.write_str("imagenet"),
            Normalisation::Uniform => f.write_str("uniform"),
            Normalisation::OpenaiClip => f.write_str("openai-clip"),
            Normalisation::Custom(m, s) => write!(f, "{},{},{}/{},{},{}", m[0], m[1], m[2], s[0], s[1], s[2]),
        }
    }
}

impl FromStr for Normalisation {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad =
            || format!("normalisation {s:?}: imagenet, uniform, openai-clip or R,G,B/R,G,B (mean/std of [0, 1] RGB)");
        match s {
            "imagenet" => Ok(Normalisation::Imagenet),
            "uniform" => Ok(Normalisation::Uniform),
            "openai-clip" => Ok(Normalisation::OpenaiClip),
            _ => {
                let (m, sd) = s.split_once('/').ok_or_else(bad)?;
                let three = |t: &str| -> Option<[f32; 3]> {
                    let v: Vec<f32> = t.split(',').map(|x| x.trim().parse().ok()).collect::<Option<_>>()?;
                    <[f32; 3]>::try_from(v).ok()
                };
                let (m, sd) = (three(m).ok_or_else(bad)?, three(sd).ok_or_else(bad)?);
                if sd.iter().any(|v| *v <= 0.0 || !v.is_finite()) || m.iter().any(|v| !v.is_finite()) {
                    return Err(bad());
                }
                Ok(Normalisation::Custom(m, sd))
            }
        }
    }
}

/// One pretrained tag's eval preprocessing in timm (`timm_pretrained.json`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct TimmPretrained {
    pub input_px: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// timm's eval transform resizes the shorter side to floor(input / crop_pct), then crops the
    /// centre (`center`; `squash` resizes both sides, the same on square patches).
    pub crop_pct: f64,
    pub crop_mode: String,
    pub interpolation: String,
}

/// The committed table: every timm `vit_*` pretrained tag's eval preprocessing, and each name's
/// default tag.
#[derive(Debug, serde::Deserialize)]
pub struct TimmTable {
    pub timm: String,
    pub default_tag: BTreeMap<String, String>,
    pub pretrained: BTreeMap<String, TimmPretrained>,
}

pub fn timm_table() -> &'static TimmTable {
    static T: std::sync::OnceLock<TimmTable> = std::sync::OnceLock::new();
    T.get_or_init(|| serde_json::from_str(include_str!("timm_pretrained.json")).expect("timm_pretrained.json parses"))
}

/// `<name>[.<tag>]` or `<name>@<normalisation>` in its canonical form (a bare name gets timm's
/// default tag), or why it is not one.
pub fn canonical_timm(spec: &str) -> std::result::Result<String, String> {
    let (left, norm) = match spec.split_once('@') {
        Some((l, n)) => (l, Some(n)),
        None => (spec, None),
    };
    let (name, tag) = match left.split_once('.') {
        Some((n, t)) => (n, Some(t)),
        None => (left, None),
    };
    timm_config(name)?;
    let table = timm_table();
    match (tag, norm) {
        (Some(_), Some(_)) => Err(format!(
            "vit:{spec}: a tag names timm's weights and their preprocessing; weights from elsewhere take @<normalisation> without one (vit:{name}@...)"
        )),
        (None, Some(n)) => Ok(format!("{name}@{}", n.parse::<Normalisation>().map_err(|e| format!("vit:{spec}: {e}"))?)),
        (Some(t), None) => {
            if table.pretrained.contains_key(left) {
                Ok(left.to_string())
            } else {
                let known: Vec<&str> = table
                    .pretrained
                    .keys()
                    .filter_map(|k| k.strip_prefix(name).and_then(|r| r.strip_prefix('.')))
                    .collect();
                Err(format!(
                    "vit:{spec}: timm {} has no pretrained tag {t:?} for {name} ({}); for weights trained elsewhere say how their patches are normalised: vit:{name}@imagenet|uniform|openai-clip|R,G,B/R,G,B",
                    table.timm,
                    if known.is_empty() { "it has none".to_string() } else { format!("its tags: {}", known.join(", ")) }
                ))
            }
        }
        (None, None) => match table.default_tag.get(name) {
            Some(t) => Ok(format!("{name}.{t}")),
            None => Err(format!(
                "vit:{spec}: timm {} has no pretrained weights for {name}, so nothing says how its patches are normalised: name it, vit:{name}@imagenet|uniform|openai-clip|R,G,B/R,G,B",
                table.timm
            )),
        },
    }
}

/// How a timm spec's patches are prepared: its pretrained tag's eval transform, or its explicit
/// normalisation at the name's own input size.
pub fn timm_preprocessing(spec: &str) -> std::result::Result<Preprocessing, String> {
    let canonical = canonical_timm(spec)?;
    let resize = "area-average then bilinear".to_string();
    match canonical.split_once('@') {
        Some((name, norm)) => {
            let (mean, std) = norm.parse::<Normalisation>()?.mean_std();
            Ok(Preprocessing { input_px: timm_config(name)?.input_px as u32, resize, mean, std, resize_px: None })
        }
        None => {
            let p = &timm_table().pretrained[&canonical];
            // timm's `transforms_imagenet_eval`: scale_size = floor(input / crop_pct).
            let resize_px = (p.crop_pct < 1.0).then(|| (p.input_px as f64 / p.crop_pct).floor() as u32);
            Ok(Preprocessing { input_px: p.input_px, resize, mean: p.mean, std: p.std, resize_px })
        }
    }
}

/// A timm spec's architecture, at the input side its preprocessing feeds it.
pub fn timm_vit_config(spec: &str) -> std::result::Result<VitConfig, String> {
    let name = spec.split(['.', '@']).next().unwrap_or(spec);
    let mut cfg = timm_config(name)?;
    cfg.input_px = timm_preprocessing(spec)?.input_px as usize;
    Ok(cfg)
}

/// A timm ViT's architecture from its timm name (`vit_base_patch16_224`, `vit_large_patch14_dinov2`,
/// `vit_small_patch14_reg4_dinov2`, ...), as timm's model registry defines it. The input is the
/// name's size (224 when the name has none, as pathology users feed DINOv2 models); what a
/// publisher may have changed with keyword arguments (LayerScale, registers, the position grid) is
/// read from the weights file by [`fit_to_tensors`].
pub fn timm_config(name: &str) -> std::result::Result<VitConfig, String> {
    let bad = |why: &str| format!("vit:{name}: {why} (a timm ViT name such as vit_base_patch16_224)");
    let rest = name.strip_prefix("vit_").ok_or_else(|| bad("not a timm ViT name"))?;
    let mut parts = rest.split('.').next().unwrap_or("").split('_');
    let size = parts.next().ok_or_else(|| bad("no size"))?;
    let patch: usize = parts
        .next()
        .and_then(|p| p.strip_prefix("patch"))
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| bad("no patch size"))?;
    let tail: Vec<&str> = parts.collect();
    let dinov2 = tail.contains(&"dinov2");
    let reg = tail.iter().find_map(|t| t.strip_prefix("reg").and_then(|n| n.parse::<usize>().ok())).unwrap_or(0);
    let input = tail.iter().find_map(|t| t.parse::<usize>().ok()).unwrap_or(224);
    let (dim, depth, heads, mlp, hidden) = match (size, dinov2) {
        ("tiny", _) => (192, 12, 3, MlpKind::Gelu, 768),
        ("small", _) => (384, 12, 6, MlpKind::Gelu, 1536),
        ("base", _) => (768, 12, 12, MlpKind::Gelu, 3072),
        ("large", _) => (1024, 24, 16, MlpKind::Gelu, 4096),
        ("huge", _) => (1280, 32, 16, MlpKind::Gelu, 5120),
        ("giant", false) => (1408, 40, 16, MlpKind::Gelu, 6144),
        ("giant", true) => (1536, 40, 24, MlpKind::SwiGlu, 8192),
        _ => return Err(bad(&format!("unknown size {size:?} (tiny, small, base, large, huge, giant)"))),
    };
    let grid = if dinov2 { 518 / patch } else { input / patch };
    Ok(VitConfig {
        patch,
        input_px: input,
        pos_grid: grid,
        dim,
        depth,
        heads,
        mlp,
        hidden,
        layer_scale: dinov2,
        reg_tokens: reg,
        pos_prefix: reg == 0,
        qkv_bias: true,
        eps: 1e-6,
        output: Output::ClassToken,
        naming: Naming::Timm,
        resample: PosResample::TimmBicubicAntialias,
        pooler: None,
    })
}

/// A timm configuration made to fit a weights file's tensors (`shape_of` gives a tensor's shape by
/// name): LayerScale when `ls1.gamma` is there, the registers `reg_token` holds, the MLP's width and
/// kind from `fc1`/`fc2`, whether the position embedding covers the prefix, and its grid.
pub fn fit_to_tensors(mut cfg: VitConfig, shape_of: &dyn Fn(&str) -> Option<Vec<usize>>) -> VitConfig {
    cfg.layer_scale = shape_of("blocks.0.ls1.gamma").is_some();
    cfg.reg_tokens = shape_of("reg_token").map_or(0, |s| s.get(1).copied().unwrap_or(0));
    cfg.qkv_bias = shape_of("blocks.0.attn.qkv.bias").is_some();
    if let (Some(f1), Some(f2)) = (shape_of("blocks.0.mlp.fc1.weight"), shape_of("blocks.0.mlp.fc2.weight")) {
        cfg.hidden = f1[0];
        cfg.mlp = if f2.get(1) == Some(&(f1[0] / 2)) && f1[0] % 2 == 0 { MlpKind::SwiGlu } else { MlpKind::Gelu };
    }
    if let Some(pos) = shape_of("pos_embed") {
        let len = pos.get(1).copied().unwrap_or(0);
        let prefix = 1 + cfg.reg_tokens;
        let square = |n: usize| (n as f64).sqrt().round() as usize;
        if square(len).pow(2) == len {
            (cfg.pos_prefix, cfg.pos_grid) = (false, square(len));
        } else if len >= prefix && square(len - prefix).pow(2) == len - prefix {
            (cfg.pos_prefix, cfg.pos_grid) = (true, square(len - prefix));
        }
    }
    cfg
}

/// A patch embedder by name. Serialised as its name (`efficientnet-lite0`, ...), the strings plans
/// have always held.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// EfficientNet-Lite0, ImageNet (1280-d): the CPU default.
    EfficientNetLite0,
    /// ResNet50 truncated after layer3 + average pool (1024-d): CLAM's default.
    ResNet50Trunc,
    /// A pathology foundation model (a Vision Transformer), by preset.
    Vit(VitPreset),
    /// Any timm Vision Transformer, by its timm name and how its patches are normalised: a
    /// pretrained tag (`vit:vit_base_patch16_224.augreg2_in21k_ft_in1k`; parsing a bare name adds
    /// timm's default tag) or an explicit normalisation (`vit:vit_large_patch14_dinov2@imagenet`).
    Timm(String),
    /// Features imported from elsewhere (`wsimil import-bags`, `import-clam`): nothing to build.
    Imported,
}

impl Architecture {
    /// Every name `--embedder` takes (`vit:<timm-name>` as such).
    pub fn names() -> Vec<String> {
        let mut names: Vec<String> = ["efficientnet-lite0", "resnet50-trunc"].into_iter().map(String::from).collect();
        names.extend(VitPreset::ALL.iter().map(|p| p.name().to_string()));
        names.push("vit:<timm-name>[.<tag>|@<normalisation>]".into());
        names
    }

    pub fn name(&self) -> String {
        match self {
            Architecture::EfficientNetLite0 => "efficientnet-lite0".into(),
            Architecture::ResNet50Trunc => "resnet50-trunc".into(),
            Architecture::Vit(p) => p.name().into(),
            Architecture::Timm(n) => format!("vit:{n}"),
            Architecture::Imported => "imported".into(),
        }
    }

    /// The name as it may start an id or a key (`vit:NAME` as `vit-NAME`).
    pub fn id_stem(&self) -> String {
        match self {
            Architecture::Timm(n) => match n.split_once('@') {
                Some((name, norm)) => format!("vit-{name}-{}", Normalisation::id_token(norm)),
                None => format!("vit-{n}"),
            },
            _ => self.name().replace(':', "-"),
        }
    }

    /// How the network wants its patches.
    pub fn preprocessing(&self) -> Option<Preprocessing> {
        match self {
            Architecture::EfficientNetLite0 => Some(super::efficientnet::preprocessing()),
            Architecture::ResNet50Trunc => Some(super::resnet::preprocessing()),
            Architecture::Vit(p) => Some(p.preprocessing()),
            Architecture::Timm(n) => timm_preprocessing(n).ok(),
            Architecture::Imported => None,
        }
    }

    /// The Vision Transformer's configuration as the preset or timm name gives it (before a weights
    /// file adjusts it); none for the CNNs.
    pub fn vit_config(&self) -> Option<VitConfig> {
        match self {
            Architecture::Vit(p) => Some(p.spec().config),
            Architecture::Timm(n) => timm_vit_config(n).ok(),
            _ => None,
        }
    }

    /// The Vision Transformer at a fixture's reduced sizes (`scripts/dev/vit_fixtures.py`): the
    /// structure (LayerScale, registers, MLP, position embedding, naming, output) stays this
    /// architecture's, only the widths and the depth are the fixture's; a timm name's optional
    /// parts come from the file (`shape_of`), as for users.
    pub fn fixture_config(&self, s: &FixtureSizes, shape_of: &dyn Fn(&str) -> Option<Vec<usize>>) -> Option<VitConfig> {
        let base = self.vit_config()?;
        let pooler = match base.pooler {
            Some(_) => Some(PoolerConfig { dim: s.pooler_dim?, heads: s.pooler_heads?, queries: s.pooler_queries? }),
            None => None,
        };
        let cfg = VitConfig {
            dim: s.dim,
            depth: s.depth,
            heads: s.heads,
            hidden: s.hidden,
            pos_grid: s.pos_grid,
            input_px: s.input_px.unwrap_or(base.input_px),
            pooler,
            ..base
        };
        Some(if matches!(self, Architecture::Timm(_)) { fit_to_tensors(cfg, shape_of) } else { cfg })
    }

    /// The width of the features (known without building the network).
    pub fn feature_dim(&self) -> Option<usize> {
        match self {
            Architecture::EfficientNetLite0 => Some(1280),
            Architecture::ResNet50Trunc => Some(1024),
            Architecture::Vit(_) | Architecture::Timm(_) => self.vit_config().map(|c| c.feature_dim()),
            Architecture::Imported => None,
        }
    }

    /// The patch side and resolution the encoder is used at, when it says (the ViT presets).
    pub fn tiling_hint(&self) -> Option<(u32, f64)> {
        match self {
            Architecture::Vit(p) => Some((p.spec().patch_px, p.spec().mpp)),
            _ => None,
        }
    }

    /// The configuration a weights file (given by `shape_of`) makes of this architecture: for a
    /// preset only the position grid may differ from the table (it is resampled, as the publishers'
    /// code does at run time), for a timm name every optional part is read off the file.
    pub fn fit_vit(&self, shape_of: &dyn Fn(&str) -> Option<Vec<usize>>) -> Option<VitConfig> {
        match self {
            Architecture::Vit(p) => {
                let mut cfg = p.spec().config;
                let pos_name = match cfg.naming {
                    Naming::HfDinov2 | Naming::HfVit => "embeddings.position_embeddings",
                    Naming::Conch => "visual.trunk.pos_embed",
                    Naming::Conch15 => "trunk.pos_embed",
                    Naming::Timm | Naming::Dinov2Hub => "pos_embed",
                };
                // H0-mini's, Midnight's and Hibou-L's MLP widths are not in a configuration
                // wsimil could read: taken from the file, as a timm name's is.
                let fc1 = match p {
                    VitPreset::H0Mini => Some("blocks.0.mlp.fc1.weight"),
                    VitPreset::Midnight12k | VitPreset::HibouL => Some("encoder.layer.0.mlp.weights_in.weight"),
                    _ => None,
                };
                if let Some(f1) = fc1.and_then(shape_of).and_then(|s| s.first().copied()) {
                    cfg.hidden = f1;
                }
                if let Some(len) = shape_of(pos_name).and_then(|s| s.get(1).copied()) {
                    let n = len.saturating_sub(cfg.pos_prefix_len());
                    let g = (n as f64).sqrt().round() as usize;
                    if g * g == n && g > 0 {
                        cfg.pos_grid = g;
                    }
                }
                Some(cfg)
            }
            Architecture::Timm(n) => timm_vit_config(n).ok().map(|c| fit_to_tensors(c, shape_of)),
            _ => None,
        }
    }

    /// Build the network from `vb` (a checkpoint's tensors, or seeded random ones) for inference.
    pub fn build(&self, vb: VarBuilder) -> Result<Box<dyn Embedder>> {
        self.build_tuned(vb, Tune::Frozen)
    }

    /// Build the network with the layers `tune` names trainable (ICMIL's student).
    pub fn build_tuned(&self, vb: VarBuilder, tune: Tune) -> Result<Box<dyn Embedder>> {
        match self {
            Architecture::EfficientNetLite0 => {
                Ok(Box::new(super::efficientnet::EfficientNetLite::lite0_tuned(vb, tune)?))
            }
            Architecture::ResNet50Trunc => Ok(Box::new(super::resnet::ResNetTrunc::resnet50_tuned(vb, tune)?)),
            Architecture::Vit(_) | Architecture::Timm(_) => {
                let shape_of = |n: &str| -> Option<Vec<usize>> {
                    vb.contains_tensor(n).then(|| vb.get_unchecked(n).ok().map(|t| t.dims().to_vec())).flatten()
                };
                let cfg = self.fit_vit(&shape_of).ok_or_else(|| candle_core::Error::Msg(self.unknown_timm()))?;
                let pre = self.preprocessing().expect("a ViT has its preprocessing");
                Ok(Box::new(Vit::new(&cfg, &self.name(), pre, vb, tune)?))
            }
            Architecture::Imported => candle_core::bail!("imported features have no embedder to build"),
        }
    }

    /// The tensors of a publisher's weights file that this architecture uses, checked against it
    /// first: for a Vision Transformer every tensor by name and shape (what is missing, unexpected
    /// or misshaped is named at once, before anything is read); for the CNNs the whole file (the
    /// build that follows checks it).
    pub fn read_weights(
        &self,
        file: &super::weights::WeightsFile,
    ) -> std::result::Result<BTreeMap<String, candle_core::Tensor>, super::weights::WeightsError> {
        match self.fit_vit(&|n| file.shape(n)) {
            Some(cfg) => {
                let needed = super::vit::tensor_specs(&cfg);
                super::weights::check(file, &self.name(), &needed, &|n| super::vit::ignorable(cfg.naming, n))?;
                let names: Vec<String> = needed.into_iter().map(|s| s.name).collect();
                file.read(Some(&names))
            }
            None => file.read(None),
        }
    }

    fn unknown_timm(&self) -> String {
        match self {
            Architecture::Timm(n) => timm_vit_config(n).err().unwrap_or_default(),
            other => format!("{other}: not a Vision Transformer"),
        }
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Why a name is not an embedder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown embedder {name:?}{} (known: {}; TRIDENT's names {} too)", why.as_ref().map(|w| format!(": {w}")).unwrap_or_default(), Architecture::names().join(", "), VitPreset::ALL.map(|p| p.trident_name()).join(", "))]
pub struct UnknownArchitecture {
    pub name: String,
    pub why: Option<String>,
}

impl FromStr for Architecture {
    type Err = UnknownArchitecture;

    fn from_str(s: &str) -> std::result::Result<Self, UnknownArchitecture> {
        match s {
            "efficientnet-lite0" => Ok(Architecture::EfficientNetLite0),
            "resnet50-trunc" => Ok(Architecture::ResNet50Trunc),
            "imported" => Ok(Architecture::Imported),
            _ => {
                if let Some(p) = VitPreset::ALL.into_iter().find(|p| p.name() == s || p.trident_name() == s) {
                    return Ok(Architecture::Vit(p));
                }
                match s.strip_prefix("vit:") {
                    Some(n) => match canonical_timm(n) {
                        Ok(c) => Ok(Architecture::Timm(c)),
                        Err(why) => Err(UnknownArchitecture { name: s.to_string(), why: Some(why) }),
                    },
                    None => Err(UnknownArchitecture { name: s.to_string(), why: None }),
                }
            }
        }
    }
}

impl serde::Serialize for Architecture {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Architecture {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::params::Params;
    use candle_core::{DType, Device, Tensor, Var};
    use std::collections::BTreeMap;

    /// Every pretrained tag of the committed table (timm's own eval config, generated from timm)
    /// resolves to exactly its input side, mean, std and crop, and a bare name to its default tag:
    /// a change of the table or of the rule fails here.
    #[test]
    fn every_timm_tag_prepares_patches_as_timms_table_says() {
        let table = timm_table();
        let mut checked = 0;
        for (full, want) in &table.pretrained {
            let (name, _) = full.split_once('.').unwrap();
            if timm_config(name).is_err() {
                continue; // an architecture wsimil's generic path does not build (refused by name)
            }
            let arch: Architecture = format!("vit:{full}").parse().unwrap_or_else(|e| panic!("{full}: {e}"));
            let got = arch.preprocessing().unwrap();
            assert_eq!((got.input_px, got.mean, got.std), (want.input_px, want.mean, want.std), "{full}");
            let crop = (want.crop_pct < 1.0).then(|| (want.input_px as f64 / want.crop_pct).floor() as u32);
            assert_eq!(got.resize_px, crop, "{full}: crop_pct {}", want.crop_pct);
            assert!(["center", "squash"].contains(&want.crop_mode.as_str()), "{full}: {}", want.crop_mode);
            assert_eq!(arch.vit_config().unwrap().input_px, want.input_px as usize, "{full}: the network's input");
            checked += 1;
        }
        assert!(checked > 150, "{checked} tags checked");
        for (name, tag) in &table.default_tag {
            if timm_config(name).is_ok() {
                assert_eq!(format!("vit:{name}").parse::<Architecture>().unwrap().name(), format!("vit:{name}.{tag}"));
            }
        }
    }

    /// The case the table was made for: timm's `vit_base_patch16_224` (default tag augreg2) is
    /// trained with mean = std = 0.5 and a 0.9 crop, not ImageNet's statistics; DINOv2's default tag
    /// takes 518 px.
    #[test]
    fn a_timm_name_is_prepared_as_timm_prepares_its_weights() {
        let p = "vit:vit_base_patch16_224".parse::<Architecture>().unwrap();
        assert_eq!(p.name(), "vit:vit_base_patch16_224.augreg2_in21k_ft_in1k");
        let pre = p.preprocessing().unwrap();
        assert_eq!((pre.mean, pre.std, pre.input_px, pre.resize_px), ([0.5; 3], [0.5; 3], 224, Some(248)));
        let d = "vit:vit_small_patch14_reg4_dinov2".parse::<Architecture>().unwrap().preprocessing().unwrap();
        assert_eq!((d.input_px, d.mean, d.resize_px), (518, IMAGENET.0, None));
        let clip = "vit:vit_base_patch16_clip_224.openai".parse::<Architecture>().unwrap().preprocessing().unwrap();
        assert_eq!(clip.mean, OPENAI_CLIP.0);
    }

    #[test]
    fn weights_from_elsewhere_name_their_normalisation_and_get_their_own_id() {
        let a: Architecture = "vit:vit_large_patch14_dinov2@imagenet".parse().unwrap();
        let pre = a.preprocessing().unwrap();
        assert_eq!((pre.input_px, pre.mean, pre.std, pre.resize_px), (224, IMAGENET.0, IMAGENET.1, None));
        assert_eq!(a.id_stem(), "vit-vit_large_patch14_dinov2-imagenet");
        let u: Architecture = "vit:vit_large_patch14_dinov2@uniform".parse().unwrap();
        assert_eq!(u.preprocessing().unwrap().mean, [0.5; 3]);
        let c: Architecture = "vit:vit_large_patch14_dinov2@0.7,0.6,0.7/0.2,0.2,0.2".parse().unwrap();
        let pre = c.preprocessing().unwrap();
        assert_eq!((pre.mean, pre.std), ([0.7, 0.6, 0.7], [0.2; 3]));
        let ids = [
            a.id_stem(),
            u.id_stem(),
            c.id_stem(),
            "vit:vit_large_patch14_dinov2".parse::<Architecture>().unwrap().id_stem(),
        ];
        for (i, x) in ids.iter().enumerate() {
            crate::ids::EmbedderId::new(format!("{x}-random-1")).unwrap_or_else(|e| panic!("{x}: {e}"));
            assert!(ids[i + 1..].iter().all(|y| y != x), "features prepared differently share an id: {ids:?}");
        }
        // Round trips through a plan's JSON.
        for arch in [&a, &u, &c] {
            let back: Architecture = serde_json::from_str(&serde_json::to_string(arch).unwrap()).unwrap();
            assert_eq!(&back, arch);
        }
    }

    #[test]
    fn tridents_names_are_the_presets() {
        for p in VitPreset::ALL {
            let a: Architecture = p.trident_name().parse().unwrap();
            assert_eq!(a, Architecture::Vit(p), "{}", p.trident_name());
            assert_eq!(a.name(), p.name(), "recorded under wsimil's name: one id for one encoder");
        }
        let err = "uni_v3".parse::<Architecture>().unwrap_err().to_string();
        assert!(err.contains("uni_v1, uni_v2") && err.contains("conch_v1"), "{err}");
    }

    #[test]
    fn a_timm_name_without_a_known_preprocessing_is_refused_saying_what_to_do() {
        let err = "vit:vit_base_patch16_224.lunit_dino".parse::<Architecture>().unwrap_err().to_string();
        assert!(err.contains("no pretrained tag \"lunit_dino\"") && err.contains("augreg2_in21k_ft_in1k"), "{err}");
        assert!(err.contains("vit:vit_base_patch16_224@imagenet|uniform"), "{err}");
        let err =
            "vit:vit_base_patch16_224.augreg2_in21k_ft_in1k@imagenet".parse::<Architecture>().unwrap_err().to_string();
        assert!(err.contains("without one"), "{err}");
        let err = "vit:vit_base_patch16_224@imagenet2".parse::<Architecture>().unwrap_err().to_string();
        assert!(err.contains("imagenet, uniform, openai-clip or R,G,B/R,G,B"), "{err}");
        let err = "vit:vit_base_patch16_224@0.5,0.5/0.5,0.5,0.5".parse::<Architecture>().unwrap_err().to_string();
        assert!(err.contains("R,G,B/R,G,B"), "{err}");
    }

    #[test]
    fn names_round_trip_and_unknown_ones_list_the_known() {
        for name in Architecture::names().into_iter().filter(|n| !n.contains('<')) {
            let a: Architecture = name.parse().unwrap();
            assert_eq!(a.to_string(), name);
            assert_eq!(serde_json::to_string(&a).unwrap(), format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<Architecture>(&format!("\"{name}\"")).unwrap(), a);
        }
        let err = "resnet51".parse::<Architecture>().unwrap_err().to_string();
        assert!(err.contains("resnet51") && err.contains("efficientnet-lite0"), "{err}");
        assert!(serde_json::from_str::<Architecture>("\"resnet51\"").is_err());
    }

    /// The half-precision path is the one a GPU runs (broadcast bias and activation instead of the
    /// fused CPU op). candle's CPU matmul has f16 but not bf16, so f16 stands in for it here: the
    /// features must match f32's to half precision. (EfficientNet-Lite0 with random weights has
    /// features near 1e-9, below f16's range: it is checked with its real weights on real patches
    /// in the worker's slide tests.)
    #[test]
    fn half_precision_embedders_fold_in_f32_and_match_the_f32_features() {
        let arch = Architecture::ResNet50Trunc;
        let p = Params::new(3);
        let full = arch.build(p.var_builder(&Device::Cpu)).unwrap();
        let half = arch.build(p.var_builder_as(&Device::Cpu, DType::F16)).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 48, 48), &Device::Cpu).unwrap();
        let a = full.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let hb = half.forward(&x.to_dtype(DType::F16).unwrap()).unwrap();
        assert_eq!(hb.dtype(), DType::F16, "{arch}");
        let b = hb.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let diff: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
        let rel = norm(&diff) / norm(&a);
        assert!(norm(&a) > 0.0 && rel < 0.02, "{arch}: f16 features differ from f32 by {rel}");
    }

    #[test]
    fn only_the_named_blocks_of_an_embedder_receive_gradients() {
        for (arch, last, trained, frozen, stem) in [
            (
                Architecture::EfficientNetLite0,
                1,
                ["_blocks.15._project_conv.weight", "_conv_head.weight"],
                "_blocks.14._project_conv.weight",
                "_conv_stem.weight",
            ),
            (
                Architecture::ResNet50Trunc,
                2,
                ["layer3.4.conv1.weight", "layer3.5.bn3.weight"],
                "layer3.3.conv3.weight",
                "conv1.weight",
            ),
        ] {
            let p = Params::new(0);
            let m = arch.build_tuned(p.var_builder(&Device::Cpu), Tune::LastBlocks(last)).unwrap();
            let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &Device::Cpu).unwrap();
            let grads = m.forward(&x).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let vars: BTreeMap<String, Var> = p.named_vars().into_iter().collect();
            for name in trained {
                assert!(grads.get(&vars[name]).is_some(), "{arch}: {name} should train");
            }
            assert!(grads.get(&vars[frozen]).is_none(), "{arch}: {frozen} should be frozen");
            assert!(grads.get(&vars[stem]).is_none(), "{arch}: the stem should be frozen");
        }
    }
}
