//! Vision Transformers (Dosovitskiy et al., ICLR 2021) as the pathology foundation models ship them:
//! timm's `VisionTransformer` with its DINOv2-style options (LayerScale, register tokens, SwiGLU,
//! position embeddings with or without the prefix tokens) for UNI, UNI2-h, Virchow2, H-optimus and
//! Prov-GigaPath; Hugging Face's `Dinov2Model` for Phikon-v2; CONCH's vision tower (a timm ViT-B/16
//! trunk and an attentional pooler). The presets are in [`super::zoo`]; this file is the network.
//!
//! Weights load under the names their publishers use ([`Naming`]), checked tensor by tensor against
//! what the configuration needs ([`tensor_specs`]) before anything is built. The position
//! embedding is resampled once, at load, when the stored grid differs from the input's (bicubic, as
//! timm or Hugging Face do it: [`resample_matrix`]).
//!
//! Two forward passes: the generic one in candle's ops (any device and dtype, differentiable: ICMIL
//! fine-tunes the last blocks), and, for a frozen network on the CPU in f32, [`super::vit_cpu`]'s
//! fused kernels over OpenBLAS. Tests hold them to each other and to the publishers' code.

use super::blas::blas;
use super::embedder::{Embedder, Tune};
use super::ops::{self, matmul};
use super::vit_cpu as cpu;
use crate::features::Preprocessing;
use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// The MLP of each block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MlpKind {
    /// `fc2(gelu(fc1(x)))`, GELU with the exact error function.
    Gelu,
    /// `fc2(silu(a) · b)` with `[a, b] = fc1(x)` (timm's `SwiGLUPacked`, DINOv2's SwiGLU FFN).
    SwiGlu,
}

/// What the embedder returns for each patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Output {
    /// The class token after the final LayerNorm (`dim` wide).
    ClassToken,
    /// The class token ⊕ the mean of the patch tokens (registers left out), after the final
    /// LayerNorm (`2·dim` wide): Virchow's embedding.
    ClassTokenMeanPatches,
    /// CONCH's `encode_image(proj_contrast=False, normalize=False)`: the contrastive attentional
    /// pooler's one query over every token, then its LayerNorm (the pooler's width).
    AttentionPool,
}

impl Output {
    pub fn describe(self) -> &'static str {
        match self {
            Output::ClassToken => "class token",
            Output::ClassTokenMeanPatches => "class token + mean patch token",
            Output::AttentionPool => "attentional pooler (contrastive query), before projection",
        }
    }
}

/// How the publisher names the tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Naming {
    /// timm's `VisionTransformer` state dict (`blocks.N.attn.qkv.weight`, ...).
    Timm,
    /// Hugging Face transformers' `Dinov2Model` (`encoder.layer.N.attention.attention.query.weight`, ...).
    HfDinov2,
    /// CONCH's CoCa checkpoint: the timm trunk under `visual.trunk.`, the pooler under `visual.`.
    Conch,
    /// Hugging Face transformers' `ViTModel` (`encoder.layer.N.layernorm_before.weight`,
    /// `intermediate.dense`, ...): Phikon.
    HfVit,
    /// facebookresearch/dinov2's own `DinoVisionTransformer` (`register_tokens`, `blocks.N.mlp.w12`
    /// and `w3` for its fused SwiGLU, `ls1.gamma`): OpenMidnight.
    Dinov2Hub,
    /// CONCH v1.5's vision tower as TRIDENT ships its code: the timm-style trunk under `trunk.`,
    /// its own attentional pooler (`attn_pool_contrast.to_q`, `to_kv`, `to_out`, no biases) and
    /// `ln_contrast`.
    Conch15,
}

/// How a stored position grid is resampled to another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PosResample {
    /// timm's `resample_abs_pos_embed`: bicubic with antialiasing (PIL's kernel, a = −0.5).
    TimmBicubicAntialias,
    /// Hugging Face's Dinov2 `interpolate_pos_encoding`: bicubic, a = −0.75, no antialiasing.
    Bicubic,
    /// CONCH v1.5's code: the stored grid resized at load to the grid the trunk is built at
    /// (`build_grid`, 224 px over the patch) by timm's bilinear without antialiasing, then at run
    /// time DINO's `interpolate_pos_encoding`: bicubic (a = −0.75) at the scale factor
    /// (g + 0.1)/`build_grid`, not at the size.
    Conch15 { build_grid: usize },
}

/// CONCH's attentional pooler: `queries` learned queries of width `dim` attend over the trunk's
/// tokens with `heads` heads (`nn.MultiheadAttention` with key and value width the trunk's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolerConfig {
    pub dim: usize,
    pub heads: usize,
    pub queries: usize,
}

/// A Vision Transformer's hyper-parameters and how its weights are stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    pub patch: usize,
    /// Side of the (square) input in pixels.
    pub input_px: usize,
    /// Side of the position grid as stored in the weights (resampled to `input_px / patch`).
    pub pos_grid: usize,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp: MlpKind,
    /// `fc1`'s output features (both halves for SwiGLU).
    pub hidden: usize,
    pub layer_scale: bool,
    pub reg_tokens: usize,
    /// The position embedding covers the class and register tokens too (timm's default), or only
    /// the patches (`no_embed_class`: timm's DINOv2 with registers, UNI2-h). DINOv2's own code and
    /// Hugging Face's (`Dinov2Hub`, `HfDinov2`) add it to the class token and the patches, then
    /// insert the registers: there `true` means the class token only ([`VitConfig::pos_prefix_len`]).
    pub pos_prefix: bool,
    pub qkv_bias: bool,
    /// The trunk's LayerNorm epsilon (1e-6 in timm and DINOv2).
    pub eps: f64,
    pub output: Output,
    pub naming: Naming,
    pub resample: PosResample,
    pub pooler: Option<PoolerConfig>,
}

impl VitConfig {
    /// The width of the features.
    pub fn feature_dim(&self) -> usize {
        match self.output {
            Output::ClassToken => self.dim,
            Output::ClassTokenMeanPatches => 2 * self.dim,
            Output::AttentionPool => self.pooler.map_or(self.dim, |p| p.dim),
        }
    }

    /// The input's patch grid side.
    pub fn grid(&self) -> usize {
        self.input_px / self.patch
    }

    /// Width of the MLP's inner activation (`fc2`'s input).
    pub fn mlp_inner(&self) -> usize {
        match self.mlp {
            MlpKind::Gelu => self.hidden,
            MlpKind::SwiGlu => self.hidden / 2,
        }
    }

    /// Tokens before the patches: the class token and the registers.
    pub fn prefix_tokens(&self) -> usize {
        1 + self.reg_tokens
    }

    /// Rows of the stored position embedding before the patches' grid.
    pub fn pos_prefix_len(&self) -> usize {
        match (self.pos_prefix, self.naming) {
            (false, _) => 0,
            (true, Naming::HfDinov2 | Naming::Dinov2Hub) => 1,
            (true, _) => self.prefix_tokens(),
        }
    }

    /// The problems that make the configuration unbuildable, if any.
    pub fn check(&self) -> std::result::Result<(), String> {
        let mut bad = Vec::new();
        if self.patch == 0 || !self.input_px.is_multiple_of(self.patch.max(1)) {
            bad.push(format!("input {} px is not a multiple of the patch size {}", self.input_px, self.patch));
        }
        if self.heads == 0 || !self.dim.is_multiple_of(self.heads.max(1)) {
            bad.push(format!("width {} is not a multiple of {} heads", self.dim, self.heads));
        }
        if self.mlp == MlpKind::SwiGlu && !self.hidden.is_multiple_of(2) {
            bad.push(format!("a SwiGLU MLP needs an even fc1 width, not {}", self.hidden));
        }
        if let Some(p) = self.pooler {
            if p.heads == 0 || !p.dim.is_multiple_of(p.heads.max(1)) {
                bad.push(format!("pooler width {} is not a multiple of {} heads", p.dim, p.heads));
            }
        }
        if (self.output == Output::AttentionPool) != self.pooler.is_some() {
            bad.push("an attentional-pool output needs a pooler, and only it".into());
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad.join("; "))
        }
    }
}

/// One tensor a configuration reads: its name in the publisher's file and its shape.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// Names of every tensor, for one naming.
struct Names(Naming);

impl Names {
    fn trunk(&self) -> &'static str {
        match self.0 {
            Naming::Timm | Naming::HfDinov2 | Naming::HfVit | Naming::Dinov2Hub => "",
            Naming::Conch => "visual.trunk.",
            Naming::Conch15 => "trunk.",
        }
    }

    fn cls(&self) -> String {
        match self.0 {
            Naming::HfDinov2 | Naming::HfVit => "embeddings.cls_token".into(),
            _ => format!("{}cls_token", self.trunk()),
        }
    }

    fn reg(&self) -> String {
        match self.0 {
            Naming::HfDinov2 => "embeddings.register_tokens".into(),
            Naming::Dinov2Hub => "register_tokens".into(),
            _ => format!("{}reg_token", self.trunk()),
        }
    }

    fn pos(&self) -> String {
        match self.0 {
            Naming::HfDinov2 | Naming::HfVit => "embeddings.position_embeddings".into(),
            _ => format!("{}pos_embed", self.trunk()),
        }
    }

    fn patch(&self) -> String {
        match self.0 {
            Naming::HfDinov2 | Naming::HfVit => "embeddings.patch_embeddings.projection".into(),
            _ => format!("{}patch_embed.proj", self.trunk()),
        }
    }

    fn norm(&self) -> String {
        match self.0 {
            Naming::HfDinov2 | Naming::HfVit => "layernorm".into(),
            _ => format!("{}norm", self.trunk()),
        }
    }

    fn block(&self, i: usize) -> String {
        match self.0 {
            Naming::HfDinov2 | Naming::HfVit => format!("encoder.layer.{i}."),
            _ => format!("{}blocks.{i}.", self.trunk()),
        }
    }

    /// Block-relative names: (norm1, norm2, proj, fc1, fc2, layer scale 1, layer scale 2).
    fn block_parts(&self, mlp: MlpKind) -> [&'static str; 7] {
        match self.0 {
            Naming::HfDinov2 => [
                "norm1",
                "norm2",
                "attention.output.dense",
                if mlp == MlpKind::SwiGlu { "mlp.weights_in" } else { "mlp.fc1" },
                if mlp == MlpKind::SwiGlu { "mlp.weights_out" } else { "mlp.fc2" },
                "layer_scale1.lambda1",
                "layer_scale2.lambda1",
            ],
            // No LayerScale in a ViTModel.
            Naming::HfVit => [
                "layernorm_before",
                "layernorm_after",
                "attention.output.dense",
                "intermediate.dense",
                "output.dense",
                "",
                "",
            ],
            Naming::Dinov2Hub => [
                "norm1",
                "norm2",
                "attn.proj",
                if mlp == MlpKind::SwiGlu { "mlp.w12" } else { "mlp.fc1" },
                if mlp == MlpKind::SwiGlu { "mlp.w3" } else { "mlp.fc2" },
                "ls1.gamma",
                "ls2.gamma",
            ],
            _ => ["norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2", "ls1.gamma", "ls2.gamma"],
        }
    }

    /// The attention's input projection: one fused `qkv` (timm), or `query`, `key`, `value` (HF).
    fn qkv(&self) -> Vec<&'static str> {
        match self.0 {
            Naming::HfDinov2 | Naming::HfVit => {
                vec!["attention.attention.query", "attention.attention.key", "attention.attention.value"]
            }
            _ => vec!["attn.qkv"],
        }
    }

    fn pooler(&self) -> &'static str {
        match self.0 {
            Naming::Conch15 => "attn_pool_contrast.",
            _ => "visual.attn_pool_contrast.",
        }
    }

    fn pooler_norm(&self) -> &'static str {
        match self.0 {
            Naming::Conch15 => "ln_contrast",
            _ => "visual.ln_contrast",
        }
    }
}

/// Every tensor `cfg` reads from a checkpoint, in the publisher's names, with its shape.
pub fn tensor_specs(cfg: &VitConfig) -> Vec<TensorSpec> {
    let n = Names(cfg.naming);
    let d = cfg.dim;
    let mut out = Vec::new();
    let mut add = |name: String, shape: Vec<usize>| out.push(TensorSpec { name, shape });
    add(n.cls(), vec![1, 1, d]);
    if cfg.reg_tokens > 0 {
        add(n.reg(), vec![1, cfg.reg_tokens, d]);
    }
    let pos_len = cfg.pos_grid * cfg.pos_grid + cfg.pos_prefix_len();
    add(n.pos(), vec![1, pos_len, d]);
    add(format!("{}.weight", n.patch()), vec![d, 3, cfg.patch, cfg.patch]);
    add(format!("{}.bias", n.patch()), vec![d]);
    let [norm1, norm2, proj, fc1, fc2, ls1, ls2] = n.block_parts(cfg.mlp);
    for i in 0..cfg.depth {
        let b = n.block(i);
        for norm in [norm1, norm2] {
            add(format!("{b}{norm}.weight"), vec![d]);
            add(format!("{b}{norm}.bias"), vec![d]);
        }
        let parts = n.qkv();
        let width = 3 * d / parts.len();
        for part in parts {
            add(format!("{b}{part}.weight"), vec![width, d]);
            if cfg.qkv_bias {
                add(format!("{b}{part}.bias"), vec![width]);
            }
        }
        add(format!("{b}{proj}.weight"), vec![d, d]);
        add(format!("{b}{proj}.bias"), vec![d]);
        add(format!("{b}{fc1}.weight"), vec![cfg.hidden, d]);
        add(format!("{b}{fc1}.bias"), vec![cfg.hidden]);
        add(format!("{b}{fc2}.weight"), vec![d, cfg.mlp_inner()]);
        add(format!("{b}{fc2}.bias"), vec![d]);
        if cfg.layer_scale {
            add(format!("{b}{ls1}"), vec![d]);
            add(format!("{b}{ls2}"), vec![d]);
        }
    }
    add(format!("{}.weight", n.norm()), vec![d]);
    add(format!("{}.bias", n.norm()), vec![d]);
    if let Some(p) = cfg.pooler {
        let pre = n.pooler();
        add(format!("{pre}query"), vec![p.queries, p.dim]);
        add(format!("{pre}ln_q.weight"), vec![p.dim]);
        add(format!("{pre}ln_q.bias"), vec![p.dim]);
        add(format!("{pre}ln_k.weight"), vec![d]);
        add(format!("{pre}ln_k.bias"), vec![d]);
        if cfg.naming == Naming::Conch15 {
            add(format!("{pre}to_q.weight"), vec![p.dim, p.dim]);
            add(format!("{pre}to_kv.weight"), vec![2 * p.dim, d]);
            add(format!("{pre}to_out.weight"), vec![p.dim, p.dim]);
        } else if p.dim == d {
            add(format!("{pre}attn.in_proj_weight"), vec![3 * p.dim, d]);
        } else {
            add(format!("{pre}attn.q_proj_weight"), vec![p.dim, p.dim]);
            add(format!("{pre}attn.k_proj_weight"), vec![p.dim, d]);
            add(format!("{pre}attn.v_proj_weight"), vec![p.dim, d]);
        }
        if cfg.naming != Naming::Conch15 {
            add(format!("{pre}attn.in_proj_bias"), vec![3 * p.dim]);
            add(format!("{pre}attn.out_proj.weight"), vec![p.dim, p.dim]);
            add(format!("{pre}attn.out_proj.bias"), vec![p.dim]);
        }
        add(format!("{}.weight", n.pooler_norm()), vec![p.dim]);
        add(format!("{}.bias", n.pooler_norm()), vec![p.dim]);
    }
    out
}

/// Tensors a publisher's file may hold that the features do not use, which are not errors: the
/// mask token of Hugging Face's DINOv2, everything of CONCH's that is not the vision tower's
/// trunk or contrastive pooler (the text tower, the captioning pooler, the projection).
pub fn ignorable(naming: Naming, name: &str) -> bool {
    match naming {
        Naming::Timm => false,
        Naming::HfDinov2 => name == "embeddings.mask_token",
        // The pooler a ViTModel saves unless built without it (TRIDENT: add_pooling_layer=False).
        Naming::HfVit => name.starts_with("pooler.dense."),
        Naming::Dinov2Hub => name == "mask_token",
        Naming::Conch15 => false,
        Naming::Conch => {
            !(name.starts_with("visual.trunk.")
                || name.starts_with("visual.attn_pool_contrast.")
                || name.starts_with("visual.ln_contrast."))
        }
    }
}

/// The 1-D resampling of `n_in` samples to `n_out` as a matrix `[n_out, n_in]` (rows sum to one),
/// exactly as PyTorch's `F.interpolate(mode="bicubic", align_corners=False)` computes it, with or
/// without `antialias`. The 2-D resampling of a grid is this on each axis.
pub fn resample_matrix(n_in: usize, n_out: usize, how: PosResample) -> Vec<f32> {
    match how {
        PosResample::Bicubic => bicubic_matrix(n_in, n_out, n_out as f64 / n_in as f64),
        PosResample::TimmBicubicAntialias => bicubic_aa_matrix(n_in, n_out),
        PosResample::Conch15 { build_grid } => {
            // Two linear maps composed: [n_out, b] · [b, n_in].
            let load = if n_in == build_grid { identity(n_in) } else { bilinear_matrix(n_in, build_grid) };
            let run = if n_out == build_grid {
                identity(build_grid)
            } else {
                bicubic_matrix(build_grid, n_out, (n_out as f64 + 0.1) / build_grid as f64)
            };
            let mut m = vec![0f32; n_out * n_in];
            for i in 0..n_out {
                for k in 0..build_grid {
                    let w = run[i * build_grid + k];
                    for j in 0..n_in {
                        m[i * n_in + j] += w * load[k * n_in + j];
                    }
                }
            }
            m
        }
    }
}

fn identity(n: usize) -> Vec<f32> {
    (0..n * n).map(|i| if i / n == i % n { 1.0 } else { 0.0 }).collect()
}

/// PyTorch's `upsample_bicubic2d` (align_corners=False) at `scale_factor` (the output side
/// n_out; source = (i + ½)/scale_factor − ½): Keys' cubic with A = −0.75 over the four
/// neighbours, indices clamped to the edge.
fn bicubic_matrix(n_in: usize, n_out: usize, scale_factor: f64) -> Vec<f32> {
    let mut m = vec![0f64; n_out * n_in];
    let scale = 1.0 / scale_factor;
    let a = -0.75;
    let near = |x: f64| ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
    for i in 0..n_out {
        let src = scale * (i as f64 + 0.5) - 0.5;
        let f = src.floor();
        let t = src - f;
        let w = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
        for (k, wk) in w.iter().enumerate() {
            let j = (f as i64 - 1 + k as i64).clamp(0, n_in as i64 - 1) as usize;
            m[i * n_in + j] += wk;
        }
    }
    m.into_iter().map(|v| v as f32).collect()
}

/// PyTorch's `upsample_bilinear2d` (align_corners=False, no antialiasing) to `n_out`: source =
/// scale·(i + ½) − ½ clamped at 0, the two neighbours weighted linearly.
fn bilinear_matrix(n_in: usize, n_out: usize) -> Vec<f32> {
    let mut m = vec![0f64; n_out * n_in];
    let scale = n_in as f64 / n_out as f64;
    for i in 0..n_out {
        let src = (scale * (i as f64 + 0.5) - 0.5).max(0.0);
        let j0 = (src.floor() as usize).min(n_in - 1);
        let j1 = (j0 + 1).min(n_in - 1);
        let t = src - j0 as f64;
        m[i * n_in + j0] += 1.0 - t;
        m[i * n_in + j1] += t;
    }
    m.into_iter().map(|v| v as f32).collect()
}

/// timm's `resample_abs_pos_embed` (`_upsample_bicubic2d_aa`, PIL's resampling): the cubic with
/// a = −0.5, widened by the scale when shrinking, over the inputs within its support, weights
/// normalised.
fn bicubic_aa_matrix(n_in: usize, n_out: usize) -> Vec<f32> {
    let mut m = vec![0f64; n_out * n_in];
    let scale = n_in as f64 / n_out as f64;
    let a = -0.5;
    let cubic = |x: f64| {
        let x = x.abs();
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * a
        } else {
            0.0
        }
    };
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let inv = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    for i in 0..n_out {
        let center = scale * (i as f64 + 0.5);
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(n_in as i64) as usize;
        let w: Vec<f64> = (lo..hi).map(|j| cubic((j as f64 - center + 0.5) * inv)).collect();
        let total: f64 = w.iter().sum();
        for (j, wj) in (lo..hi).zip(w) {
            m[i * n_in + j] = if total != 0.0 { wj / total } else { wj };
        }
    }
    m.into_iter().map(|v| v as f32).collect()
}

/// The position embedding's patch part `[g_in², D]` resampled to `[g_out², D]`: one matrix product
/// with the two axes' resampling (so a fine-tuned position embedding gets its gradient through it).
fn resample_grid(pos: &Tensor, g_in: usize, g_out: usize, how: PosResample) -> Result<Tensor> {
    // (CONCH v1.5's code resizes a grid it was not built at even when it comes back to it.)
    let round_trip = matches!(how, PosResample::Conch15 { build_grid } if build_grid != g_in);
    if g_in == g_out && !round_trip {
        return Ok(pos.clone());
    }
    let r = resample_matrix(g_in, g_out, how);
    let mut k = vec![0f32; g_out * g_out * g_in * g_in];
    for (oy, ox) in (0..g_out).flat_map(|y| (0..g_out).map(move |x| (y, x))) {
        let row = &mut k[(oy * g_out + ox) * g_in * g_in..][..g_in * g_in];
        for iy in 0..g_in {
            let wy = r[oy * g_in + iy];
            if wy == 0.0 {
                continue;
            }
            for ix in 0..g_in {
                row[iy * g_in + ix] = wy * r[ox * g_in + ix];
            }
        }
    }
    // In f32 whatever the model's dtype, as timm and Hugging Face resample.
    let k = Tensor::from_vec(k, (g_out * g_out, g_in * g_in), pos.device())?;
    matmul(&k, &pos.to_dtype(DType::F32)?)?.to_dtype(pos.dtype())
}

/// LayerNorm's parameters with its epsilon.
#[derive(Debug, Clone)]
struct Norm {
    w: Tensor,
    b: Tensor,
    eps: f64,
}

impl Norm {
    fn load(vb: &VarBuilder, name: &str, dim: usize, eps: f64, frozen: bool) -> Result<Self> {
        Ok(Norm {
            w: get(vb, &format!("{name}.weight"), &[dim], frozen)?,
            b: get(vb, &format!("{name}.bias"), &[dim], frozen)?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train && x.device().is_cpu() && x.dtype() == DType::F32 {
            ops::layer_norm(x, &self.w, &self.b, self.eps as f32)
        } else if train {
            // Composed (differentiable) off the CPU.
            let mean = x.mean_keepdim(D::Minus1)?;
            let xc = x.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
            xc.broadcast_div(&(var + self.eps)?.sqrt()?)?.broadcast_mul(&self.w)?.broadcast_add(&self.b)
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.w, &self.b, self.eps as f32)
        }
    }
}

/// A tensor from the checkpoint, detached when its layer is frozen. (A backend that creates
/// missing tensors, as `--random-weights` does, gets timm's initialisation: weights and tokens
/// N(0, 0.02), biases 0, LayerNorm scales 1, LayerScale 0.1.)
fn get(vb: &VarBuilder, name: &str, shape: &[usize], frozen: bool) -> Result<Tensor> {
    let init = if name.ends_with("bias") {
        candle_nn::Init::Const(0.0)
    } else if name.ends_with(".gamma") || name.ends_with(".lambda1") {
        candle_nn::Init::Const(0.1)
    } else if shape.len() == 1 {
        candle_nn::Init::Const(1.0) // LayerNorm scales
    } else {
        candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 }
    };
    let t = vb.get_with_hints(shape, name, init)?;
    Ok(if frozen { t.detach() } else { t })
}

/// `x · wᵀ + b` over the last dimension (any leading ones).
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = dims[dims.len() - 1];
    let rows = x.elem_count() / k;
    let y = matmul(&x.reshape((rows, k))?, &w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().expect("rank ≥ 1") = w.dim(0)?;
    y.reshape(out)
}

/// One pre-norm transformer block: `x + γ₁·attn(norm₁(x))`, then `x + γ₂·mlp(norm₂(x))`.
struct Block {
    norm1: Norm,
    qkv_w: Tensor,
    qkv_b: Option<Tensor>,
    proj_w: Tensor,
    proj_b: Tensor,
    ls1: Option<Tensor>,
    norm2: Norm,
    fc1_w: Tensor,
    fc1_b: Tensor,
    fc2_w: Tensor,
    fc2_b: Tensor,
    ls2: Option<Tensor>,
    trains: bool,
}

impl Block {
    fn load(cfg: &VitConfig, vb: &VarBuilder, i: usize, trains: bool) -> Result<Self> {
        let n = Names(cfg.naming);
        let (b, d, frozen) = (n.block(i), cfg.dim, !trains);
        let [norm1, norm2, proj, fc1, fc2, ls1, ls2] = n.block_parts(cfg.mlp);
        let parts = n.qkv();
        let width = 3 * d / parts.len();
        let mut ws = Vec::new();
        let mut bs = Vec::new();
        for part in &parts {
            ws.push(get(vb, &format!("{b}{part}.weight"), &[width, d], frozen)?);
            if cfg.qkv_bias {
                bs.push(get(vb, &format!("{b}{part}.bias"), &[width], frozen)?);
            }
        }
        let cat =
            |v: Vec<Tensor>| if v.len() == 1 { Ok(v.into_iter().next().expect("one")) } else { Tensor::cat(&v, 0) };
        let ls = |name: &str| cfg.layer_scale.then(|| get(vb, &format!("{b}{name}"), &[d], frozen)).transpose();
        Ok(Block {
            norm1: Norm::load(vb, &format!("{b}{norm1}"), d, cfg.eps, frozen)?,
            qkv_w: cat(ws)?,
            qkv_b: if cfg.qkv_bias { Some(cat(bs)?) } else { None },
            proj_w: get(vb, &format!("{b}{proj}.weight"), &[d, d], frozen)?,
            proj_b: get(vb, &format!("{b}{proj}.bias"), &[d], frozen)?,
            ls1: ls(ls1)?,
            norm2: Norm::load(vb, &format!("{b}{norm2}"), d, cfg.eps, frozen)?,
            fc1_w: get(vb, &format!("{b}{fc1}.weight"), &[cfg.hidden, d], frozen)?,
            fc1_b: get(vb, &format!("{b}{fc1}.bias"), &[cfg.hidden], frozen)?,
            fc2_w: get(vb, &format!("{b}{fc2}.weight"), &[d, cfg.mlp_inner()], frozen)?,
            fc2_b: get(vb, &format!("{b}{fc2}.bias"), &[d], frozen)?,
            ls2: ls(ls2)?,
            trains,
        })
    }

    /// The block on tokens `[B, T, D]` in candle's ops.
    fn forward(&self, x: &Tensor, cfg: &VitConfig) -> Result<Tensor> {
        let train = self.trains;
        let (b, t, d) = x.dims3()?;
        let (h, hd) = (cfg.heads, cfg.dim / cfg.heads);
        let qkv = linear(&self.norm1.forward(x, train)?, &self.qkv_w, self.qkv_b.as_ref())?;
        let qkv = qkv.reshape((b, t, 3, h, hd))?.permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (qkv.get(0)?.contiguous()?, qkv.get(1)?.contiguous()?, qkv.get(2)?.contiguous()?);
        let scores = (matmul(&q, &k.t()?)? * (hd as f64).powf(-0.5))?;
        let att = super::softmax(&scores, train)?;
        let o = matmul(&att, &v)?.transpose(1, 2)?.reshape((b, t, d))?;
        let y = linear(&o, &self.proj_w, Some(&self.proj_b))?;
        let x = (x + scaled(&y, self.ls1.as_ref())?)?;
        let u = linear(&self.norm2.forward(&x, train)?, &self.fc1_w, Some(&self.fc1_b))?;
        let a = match cfg.mlp {
            MlpKind::Gelu => u.gelu_erf()?,
            MlpKind::SwiGlu => {
                let half = cfg.hidden / 2;
                (u.narrow(D::Minus1, 0, half)?.silu()? * u.narrow(D::Minus1, half, half)?)?
            }
        };
        let y = linear(&a, &self.fc2_w, Some(&self.fc2_b))?;
        x + scaled(&y, self.ls2.as_ref())?
    }

    /// The block on token rows `[B·T, D]` through the fused CPU kernels (frozen, f32).
    fn forward_cpu(&self, x: &mut [f32], batch: usize, cfg: &VitConfig) -> Result<()> {
        let blas = blas().ok_or_else(|| candle_core::Error::Msg("the CPU ViT path needs OpenBLAS".into()))?;
        let d = cfg.dim;
        let t = x.len() / d / batch;
        let mut ts = vec![&self.norm1.w, &self.norm1.b, &self.qkv_w, &self.proj_w, &self.proj_b];
        ts.extend([&self.norm2.w, &self.norm2.b, &self.fc1_w, &self.fc1_b, &self.fc2_w, &self.fc2_b]);
        ts.extend(self.qkv_b.iter().chain(&self.ls1).chain(&self.ls2));
        with_f32(&ts, |w| {
            let mut rest = w[11..].iter().copied();
            let qkv_b = self.qkv_b.as_ref().map(|_| rest.next().expect("bias"));
            let ls1 = self.ls1.as_ref().map(|_| rest.next().expect("ls1"));
            let ls2 = self.ls2.as_ref().map(|_| rest.next().expect("ls2"));
            let ln1 = cpu::layer_norm(x, d, w[0], w[1], self.norm1.eps as f32);
            let qkv = cpu::linear(blas, &ln1, d, w[2], qkv_b, 3 * d);
            drop(ln1);
            let o = cpu::attention(blas, &qkv, batch, t, d, cfg.heads);
            drop(qkv);
            let y = cpu::linear(blas, &o, d, w[3], Some(w[4]), d);
            cpu::add_scaled(x, &y, ls1, d);
            let ln2 = cpu::layer_norm(x, d, w[5], w[6], self.norm2.eps as f32);
            let mut u = cpu::linear(blas, &ln2, d, w[7], Some(w[8]), cfg.hidden);
            drop(ln2);
            let a = match cfg.mlp {
                MlpKind::Gelu => {
                    cpu::gelu(&mut u);
                    u
                }
                MlpKind::SwiGlu => cpu::swiglu(&u, cfg.hidden / 2),
            };
            let y = cpu::linear(blas, &a, cfg.mlp_inner(), w[9], Some(w[10]), d);
            cpu::add_scaled(x, &y, ls2, d);
        })
    }
}

fn scaled(y: &Tensor, gamma: Option<&Tensor>) -> Result<Tensor> {
    match gamma {
        Some(g) => y.broadcast_mul(g),
        None => Ok(y.clone()),
    }
}

/// `f` over f32 views of contiguous CPU tensors (the fused kernels' operands), read in place.
fn with_f32<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| (t.storage_and_layout(), t.elem_count(), t.is_contiguous())).collect();
    let mut views = Vec::with_capacity(ts.len());
    for ((storage, layout), n, contiguous) in &guards {
        match &**storage {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) if *contiguous => {
                views.push(&v[layout.start_offset()..layout.start_offset() + n])
            }
            _ => candle_core::bail!("the CPU ViT path needs contiguous f32 CPU weights"),
        }
    }
    Ok(f(&views))
}

/// CONCH's attentional pooler and its LayerNorm.
struct Pooler {
    cfg: PoolerConfig,
    query: Tensor,
    ln_q: Norm,
    ln_k: Norm,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    bias: Tensor,
    out_w: Tensor,
    out_b: Tensor,
    ln_out: Norm,
}

impl Pooler {
    fn load(cfg: PoolerConfig, naming: Naming, d: usize, vb: &VarBuilder, frozen: bool) -> Result<Self> {
        let n = Names(naming);
        let pre = n.pooler();
        let p = cfg.dim;
        if naming == Naming::Conch15 {
            // CONCH v1.5's own pooler: bias-free projections, keys and values from one matrix.
            let kv = get(vb, &format!("{pre}to_kv.weight"), &[2 * p, d], frozen)?;
            let zeros = |n: usize| Tensor::zeros(n, kv.dtype(), kv.device());
            return Ok(Pooler {
                cfg,
                query: get(vb, &format!("{pre}query"), &[cfg.queries, p], frozen)?,
                ln_q: Norm::load(vb, &format!("{pre}ln_q"), p, 1e-5, frozen)?,
                ln_k: Norm::load(vb, &format!("{pre}ln_k"), d, 1e-5, frozen)?,
                wq: get(vb, &format!("{pre}to_q.weight"), &[p, p], frozen)?,
                wk: kv.narrow(0, 0, p)?,
                wv: kv.narrow(0, p, p)?,
                bias: zeros(3 * p)?,
                out_w: get(vb, &format!("{pre}to_out.weight"), &[p, p], frozen)?,
                out_b: zeros(p)?,
                ln_out: Norm::load(vb, n.pooler_norm(), p, 1e-5, frozen)?,
            });
        }
        let (wq, wk, wv) = if p == d {
            let w = get(vb, &format!("{pre}attn.in_proj_weight"), &[3 * p, d], frozen)?;
            (w.narrow(0, 0, p)?, w.narrow(0, p, p)?, w.narrow(0, 2 * p, p)?)
        } else {
            (
                get(vb, &format!("{pre}attn.q_proj_weight"), &[p, p], frozen)?,
                get(vb, &format!("{pre}attn.k_proj_weight"), &[p, d], frozen)?,
                get(vb, &format!("{pre}attn.v_proj_weight"), &[p, d], frozen)?,
            )
        };
        Ok(Pooler {
            cfg,
            query: get(vb, &format!("{pre}query"), &[cfg.queries, p], frozen)?,
            // CONCH's LayerNorms keep PyTorch's default epsilon.
            ln_q: Norm::load(vb, &format!("{pre}ln_q"), p, 1e-5, frozen)?,
            ln_k: Norm::load(vb, &format!("{pre}ln_k"), d, 1e-5, frozen)?,
            wq,
            wk,
            wv,
            bias: get(vb, &format!("{pre}attn.in_proj_bias"), &[3 * p], frozen)?,
            out_w: get(vb, &format!("{pre}attn.out_proj.weight"), &[p, p], frozen)?,
            out_b: get(vb, &format!("{pre}attn.out_proj.bias"), &[p], frozen)?,
            ln_out: Norm::load(vb, n.pooler_norm(), p, 1e-5, frozen)?,
        })
    }

    /// Tokens `[B, T, D]` → the first query's pooled, normalised output `[B, P]`.
    fn forward(&self, tokens: &Tensor, train: bool) -> Result<Tensor> {
        let (b, t, _) = tokens.dims3()?;
        let (p, h) = (self.cfg.dim, self.cfg.heads);
        let hd = p / h;
        let kv = self.ln_k.forward(tokens, train)?;
        let q = self.ln_q.forward(&self.query, train)?;
        let bq = self.bias.narrow(0, 0, p)?;
        let bk = self.bias.narrow(0, p, p)?;
        let bv = self.bias.narrow(0, 2 * p, p)?;
        let nq = self.cfg.queries;
        let q = linear(&q, &self.wq, Some(&bq))?.reshape((1, nq, h, hd))?.transpose(1, 2)?; // [1,H,Q,hd]
        let k = linear(&kv, &self.wk, Some(&bk))?.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?;
        let v = linear(&kv, &self.wv, Some(&bv))?.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?;
        let q = q.broadcast_as((b, h, nq, hd))?.contiguous()?;
        let scores = (matmul(&q, &k.t()?)? * (hd as f64).powf(-0.5))?;
        let att = super::softmax(&scores, train)?;
        let o = matmul(&att, &v)?.transpose(1, 2)?.reshape((b, nq, p))?;
        let o = linear(&o, &self.out_w, Some(&self.out_b))?;
        self.ln_out.forward(&o.narrow(1, 0, 1)?.squeeze(1)?, train)
    }
}

/// A Vision Transformer patch embedder.
pub struct Vit {
    cfg: VitConfig,
    name: String,
    pre: Preprocessing,
    /// Patch embedding as a matrix `[D, 3·p·p]`.
    patch_w: Tensor,
    patch_b: Tensor,
    /// `[1 + R, D]`: the class token, then the registers.
    prefix: Tensor,
    /// At the input's grid: `[1 + R + g², D]` (prefix included) or `[g², D]`.
    pos: Tensor,
    /// `pos` covers the prefix tokens too.
    pos_with_prefix: bool,
    blocks: Vec<Block>,
    norm: Norm,
    pooler: Option<Pooler>,
    /// Blocks before this one are frozen.
    first_trained: usize,
    /// The final LayerNorm and the pooler train (any block does).
    head_trains: bool,
}

impl Vit {
    /// Build from `vb` (the publisher's tensor names), the layers `tune` names trainable.
    pub fn new(cfg: &VitConfig, name: &str, pre: Preprocessing, vb: VarBuilder, tune: Tune) -> Result<Self> {
        cfg.check().map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?;
        let n = Names(cfg.naming);
        let d = cfg.dim;
        let whole = tune == Tune::LastBlocks(usize::MAX);
        let first_trained = (0..cfg.depth).find(|&i| tune.trains(i, cfg.depth)).unwrap_or(cfg.depth);
        let stem_frozen = !whole;
        let patch_w = get(&vb, &format!("{}.weight", n.patch()), &[d, 3, cfg.patch, cfg.patch], stem_frozen)?
            .reshape((d, 3 * cfg.patch * cfg.patch))?;
        let patch_b = get(&vb, &format!("{}.bias", n.patch()), &[d], stem_frozen)?;
        let mut prefix = vec![get(&vb, &n.cls(), &[1, 1, d], stem_frozen)?.reshape((1, d))?];
        if cfg.reg_tokens > 0 {
            prefix.push(get(&vb, &n.reg(), &[1, cfg.reg_tokens, d], stem_frozen)?.reshape((cfg.reg_tokens, d))?);
        }
        let mut prefix = Tensor::cat(&prefix, 0)?;
        let (g_in, g) = (cfg.pos_grid, cfg.grid());
        let pre_len = cfg.pos_prefix_len();
        let pos =
            get(&vb, &n.pos(), &[1, pre_len + g_in * g_in, d], stem_frozen)?.reshape((pre_len + g_in * g_in, d))?;
        let grid = resample_grid(&pos.narrow(0, pre_len, g_in * g_in)?, g_in, g, cfg.resample)?;
        // The class token's position only (DINOv2's registers have none): folded into the class
        // token, so the tokens take positions as when they cover the patches only.
        let pos_with_prefix = pre_len > 0 && pre_len == cfg.prefix_tokens();
        if pre_len > 0 && !pos_with_prefix {
            let cls = (prefix.narrow(0, 0, 1)? + pos.narrow(0, 0, 1)?)?;
            let rest = prefix.narrow(0, 1, cfg.reg_tokens)?;
            prefix = Tensor::cat(&[&cls, &rest], 0)?;
        }
        let pos = if pos_with_prefix { Tensor::cat(&[&pos.narrow(0, 0, pre_len)?, &grid], 0)? } else { grid };
        let pos = if stem_frozen { pos.detach() } else { pos };
        let blocks =
            (0..cfg.depth).map(|i| Block::load(cfg, &vb, i, tune.trains(i, cfg.depth))).collect::<Result<Vec<_>>>()?;
        let head_frozen = !tune.any();
        let norm = Norm::load(&vb, &n.norm(), d, cfg.eps, head_frozen)?;
        let pooler = cfg.pooler.map(|p| Pooler::load(p, cfg.naming, d, &vb, head_frozen)).transpose()?;
        Ok(Vit {
            cfg: cfg.clone(),
            name: name.to_string(),
            pre,
            patch_w: patch_w.contiguous()?,
            patch_b,
            prefix,
            pos: pos.contiguous()?,
            pos_with_prefix,
            blocks,
            norm,
            pooler,
            first_trained,
            head_trains: !head_frozen,
        })
    }

    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// Patches and prefix tokens with their positions: `[B, T, D]`.
    fn embed(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, s, _) = x.dims4()?;
        let (p, d) = (self.cfg.patch, self.cfg.dim);
        let g = s / p;
        let patches = x.reshape((b, 3, g, p, g, p))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, g * g, 3 * p * p))?;
        let emb = linear(&patches, &self.patch_w, Some(&self.patch_b))?;
        let prefix = self.prefix.to_dtype(emb.dtype())?.unsqueeze(0)?.broadcast_as((b, self.cfg.prefix_tokens(), d))?;
        let pos = self.pos.to_dtype(emb.dtype())?.unsqueeze(0)?;
        if self.pos_with_prefix {
            Tensor::cat(&[&prefix, &emb], 1)?.broadcast_add(&pos)
        } else {
            Tensor::cat(&[&prefix, &emb.broadcast_add(&pos)?], 1)
        }
    }

    /// The generic forward pass from the blocks on (candle's ops; differentiable from the first
    /// trained block on): tokens `[B, T, D]` after block `from − 1` → features.
    fn forward_from(&self, mut t: Tensor, from: usize) -> Result<Tensor> {
        for blk in &self.blocks[from..] {
            t = blk.forward(&t, &self.cfg)?;
        }
        self.head(&t, self.head_trains)
    }

    /// Final LayerNorm and the output the configuration names, from tokens `[B, T, D]`.
    fn head(&self, t: &Tensor, train: bool) -> Result<Tensor> {
        let t = self.norm.forward(t, train)?;
        match self.cfg.output {
            Output::ClassToken => t.narrow(1, 0, 1)?.squeeze(1),
            Output::ClassTokenMeanPatches => {
                let pre = self.cfg.prefix_tokens();
                let patches = t.narrow(1, pre, t.dim(1)? - pre)?.mean(1)?;
                Tensor::cat(&[&t.narrow(1, 0, 1)?.squeeze(1)?, &patches], 1)
            }
            Output::AttentionPool => self.pooler.as_ref().expect("checked").forward(&t, train),
        }
    }

    /// The generic forward pass whatever the device (the reference the fused CPU path is held to:
    /// tests and `check-device`).
    pub fn forward_reference(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_from(self.embed(x)?, 0)
    }

    /// Whether the fused CPU path runs the frozen part: on the CPU in f32, with OpenBLAS, the stem
    /// frozen (`WSIMIL_VIT_PATH=generic` turns it off, for comparisons).
    fn cpu_path(&self, x: &Tensor) -> bool {
        x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.patch_w.is_contiguous()
            && !self.patch_w.track_op()
            && !x.track_op()
            && blas().is_some()
            && std::env::var("WSIMIL_VIT_PATH").map_or(true, |v| v != "generic")
    }

    /// Patch embedding and the frozen blocks through [`super::vit_cpu`] → tokens `[B, T, D]`.
    fn frozen_cpu(&self, x: &Tensor) -> Result<Tensor> {
        let blas = blas().expect("checked by cpu_path");
        let (b, _, s, _) = x.dims4()?;
        let (p, d, g) = (self.cfg.patch, self.cfg.dim, self.cfg.grid());
        let pre = self.cfg.prefix_tokens();
        let t = pre + g * g;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let patches = cpu::unfold_patches(&xs, b, s, p);
        drop(xs);
        let mut tokens = with_f32(&[&self.patch_w, &self.patch_b, &self.prefix, &self.pos], |w| {
            let emb = cpu::linear(blas, &patches, 3 * p * p, w[0], Some(w[1]), d);
            let mut tokens = vec![0f32; b * t * d];
            for (img, out) in tokens.chunks_mut(t * d).enumerate() {
                out[..pre * d].copy_from_slice(w[2]);
                out[pre * d..].copy_from_slice(&emb[img * g * g * d..(img + 1) * g * g * d]);
                let from = if self.pos_with_prefix { 0 } else { pre * d };
                out[from..].iter_mut().zip(w[3]).for_each(|(v, p)| *v += p);
            }
            tokens
        })?;
        drop(patches);
        for blk in &self.blocks[..self.first_trained] {
            blk.forward_cpu(&mut tokens, b, &self.cfg)?;
        }
        Tensor::from_vec(tokens, (b, t, d), x.device())
    }
}

impl Embedder for Vit {
    fn architecture(&self) -> String {
        self.name.clone()
    }

    fn feature_dim(&self) -> usize {
        self.cfg.feature_dim()
    }

    fn preprocessing(&self) -> Preprocessing {
        self.pre.clone()
    }

    fn output(&self) -> String {
        self.cfg.output.describe().into()
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, s, s2) = x.dims4()?;
        if c != 3 || s != self.cfg.input_px || s2 != s {
            candle_core::bail!("{}: input {c}×{s}×{s2}, the network takes 3×{}²", self.name, self.cfg.input_px)
        }
        if self.cpu_path(x) {
            self.forward_from(self.frozen_cpu(x)?, self.first_trained)
        } else {
            self.forward_from(self.embed(x)?, 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::params::Params;
    use candle_core::{Device, Var};
    use std::collections::BTreeMap;

    /// A small ViT with every optional part: registers, LayerScale, SwiGLU, patches-only positions
    /// stored at another grid than the input's.
    fn small(naming: Naming) -> VitConfig {
        VitConfig {
            patch: 8,
            input_px: 32,
            pos_grid: 3,
            dim: 24,
            depth: 3,
            heads: 4,
            mlp: MlpKind::SwiGlu,
            hidden: 64,
            layer_scale: true,
            reg_tokens: 2,
            pos_prefix: false,
            qkv_bias: true,
            eps: 1e-6,
            output: Output::ClassTokenMeanPatches,
            naming,
            resample: PosResample::TimmBicubicAntialias,
            pooler: None,
        }
    }

    fn pre(px: u32) -> Preprocessing {
        Preprocessing { input_px: px, resize: "x".into(), mean: [0.5; 3], std: [0.25; 3], resize_px: None }
    }

    #[test]
    fn the_builder_reads_exactly_the_tensors_the_specs_list() {
        for naming in [Naming::Timm, Naming::HfDinov2] {
            for cfg in [
                small(naming),
                VitConfig {
                    mlp: MlpKind::Gelu,
                    reg_tokens: 0,
                    pos_prefix: true,
                    layer_scale: false,
                    qkv_bias: false,
                    ..small(naming)
                },
            ] {
                let p = Params::new(1);
                Vit::new(&cfg, "t", pre(32), p.var_builder(&Device::Cpu), Tune::Frozen).unwrap();
                let built: BTreeMap<String, Vec<usize>> =
                    p.named_vars().into_iter().map(|(n, v)| (n, v.dims().to_vec())).collect();
                let specs: BTreeMap<String, Vec<usize>> =
                    tensor_specs(&cfg).into_iter().map(|s| (s.name, s.shape)).collect();
                assert_eq!(built, specs, "{naming:?}");
            }
        }
        let conch = VitConfig {
            naming: Naming::Conch,
            output: Output::AttentionPool,
            pooler: Some(PoolerConfig { dim: 16, heads: 4, queries: 1 }),
            ..small(Naming::Conch)
        };
        let p = Params::new(1);
        Vit::new(&conch, "t", pre(32), p.var_builder(&Device::Cpu), Tune::Frozen).unwrap();
        let built: Vec<String> = p.named_vars().into_iter().map(|(n, _)| n).collect();
        let specs: Vec<String> = {
            let mut v: Vec<String> = tensor_specs(&conch).into_iter().map(|s| s.name).collect();
            v.sort();
            v
        };
        assert_eq!(built, specs);
    }

    fn random_input(b: usize, px: usize) -> Tensor {
        Tensor::randn(0f32, 1.0, (b, 3, px, px), &Device::Cpu).unwrap()
    }

    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap();
        let b = b.to_dtype(DType::F32).unwrap();
        let d = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
        d / b.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn the_fused_cpu_path_gives_the_generic_paths_features() {
        crate::models::blas::for_test();
        let cfg = small(Naming::Timm);
        let p = Params::new(2);
        let m = Vit::new(&cfg, "t", pre(32), p.var_builder(&Device::Cpu), Tune::Frozen).unwrap();
        let x = random_input(3, 32);
        let (fast, reference) = (m.forward(&x).unwrap(), m.forward_reference(&x).unwrap());
        assert_eq!(fast.dims(), &[3, 48]);
        assert!(rel(&fast, &reference) < 1e-5, "{}", rel(&fast, &reference));
        // Each image's features are its own, whatever the batch.
        let one = m.forward(&x.narrow(0, 1, 1).unwrap()).unwrap();
        assert!(rel(&one, &fast.narrow(0, 1, 1).unwrap()) < 1e-5);
    }

    /// candle's CPU matmul has f16 but not bf16: f16 stands in for the GPU's half precision.
    #[test]
    /// The tolerances a GPU worker's half-precision features are held to (relative L2 against f32):
    /// f16 within 1%, bf16 (8 bits of mantissa against f16's 11) within 5%; `check-device` uses the
    /// same bounds with a margin on real devices.
    fn half_precision_features_are_within_their_tolerance_of_f32() {
        let cfg = small(Naming::Timm);
        let p = Params::new(3);
        let full = Vit::new(&cfg, "t", pre(32), p.var_builder(&Device::Cpu), Tune::Frozen).unwrap();
        let x = random_input(2, 32);
        let a = full.forward(&x).unwrap();
        for (dtype, tolerance) in [(DType::F16, 1e-2), (DType::BF16, 5e-2)] {
            let half = Vit::new(&cfg, "t", pre(32), p.var_builder_as(&Device::Cpu, dtype), Tune::Frozen).unwrap();
            let b = half.forward(&x.to_dtype(dtype).unwrap()).unwrap();
            assert_eq!(b.dtype(), dtype);
            let e = rel(&b, &a);
            assert!(e > 0.0 && e < tolerance, "{dtype:?} vs f32: {e}");
            eprintln!("{dtype:?} vs f32: relative L2 {e:.1e}");
        }
    }

    #[test]
    fn only_the_last_blocks_and_the_head_train() {
        let cfg = VitConfig { output: Output::ClassToken, ..small(Naming::Timm) };
        let p = Params::new(4);
        let m = Vit::new(&cfg, "t", pre(32), p.var_builder(&Device::Cpu), Tune::LastBlocks(1)).unwrap();
        let loss = m.forward(&random_input(2, 32)).unwrap().sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let vars: BTreeMap<String, Var> = p.named_vars().into_iter().collect();
        for name in ["blocks.2.attn.qkv.weight", "blocks.2.mlp.fc1.weight", "blocks.2.ls2.gamma", "norm.weight"] {
            assert!(grads.get(&vars[name]).is_some(), "{name} should train");
        }
        for name in
            ["blocks.1.attn.qkv.weight", "blocks.0.mlp.fc2.weight", "patch_embed.proj.weight", "pos_embed", "cls_token"]
        {
            assert!(grads.get(&vars[name]).is_none(), "{name} should be frozen");
        }
        // The whole network, stem and position embedding included (through their resampling).
        let p = Params::new(4);
        let m = Vit::new(&cfg, "t", pre(32), p.var_builder(&Device::Cpu), Tune::LastBlocks(usize::MAX)).unwrap();
        let grads = m.forward(&random_input(2, 32)).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let vars: BTreeMap<String, Var> = p.named_vars().into_iter().collect();
        for name in ["patch_embed.proj.weight", "pos_embed", "reg_token", "blocks.0.attn.qkv.weight"] {
            assert!(grads.get(&vars[name]).is_some(), "{name} should train");
        }
    }

    #[test]
    fn the_generic_paths_gradients_are_those_finite_differences_give() {
        let cfg = VitConfig { depth: 1, output: Output::ClassToken, ..small(Naming::Timm) };
        let p = Params::new(5);
        let m = Vit::new(&cfg, "t", pre(32), p.var_builder(&Device::Cpu), Tune::LastBlocks(1)).unwrap();
        let x = random_input(2, 32);
        let probe = Tensor::randn(0f32, 1.0, (2, 24), &Device::Cpu).unwrap();
        let loss = || (m.forward(&x).unwrap() * &probe).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let vars: BTreeMap<String, Var> = p.named_vars().into_iter().collect();
        let grads = (m.forward(&x).unwrap() * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for name in ["blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.bias", "blocks.0.norm2.weight", "blocks.0.ls1.gamma"]
        {
            let var = &vars[name];
            let g = grads.get(var).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for i in [0, base.len() / 2, base.len() - 1] {
                let h = 1e-2f32;
                let at = |d: f32| {
                    let mut v = base.clone();
                    v[i] += d;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                    loss()
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                assert!((fd - g[i]).abs() < 2e-2 * (1.0 + fd.abs()), "{name}[{i}]: {} vs {fd}", g[i]);
            }
        }
    }

    #[test]
    fn a_resampling_matrix_keeps_a_constant_grid_constant() {
        for how in [PosResample::TimmBicubicAntialias, PosResample::Bicubic] {
            for (a, b) in [(7, 16), (16, 5), (37, 16), (14, 14)] {
                let m = resample_matrix(a, b, how);
                for row in m.chunks(a) {
                    assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{how:?} {a}→{b}");
                }
            }
        }
        // The same grid is the identity.
        let m = resample_matrix(4, 4, PosResample::Bicubic);
        assert!((0..4).all(|i| (m[i * 4 + i] - 1.0).abs() < 1e-6));
    }
}
