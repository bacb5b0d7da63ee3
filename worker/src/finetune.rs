//! ICMIL fine-tuning of the patch embedder: one shard of one fold's training slides.
//!
//! The teacher is the fold's round-r classifier read at the instance level on the round-r features
//! already in the store (see [`wsimil_common::models::icmil`] for the targets, the confidence
//! weights and the losses), so the only network that runs per step is the student: a trainable copy
//! of the round-r embedder (BatchNorm on batch statistics in its trainable layers) followed by
//! trainable copies of the classifier's instance-level heads, on random views of the patches
//! (random resized crop, horizontal and vertical flips).
//!
//! Patches are read from their slides batch by batch ([`TeacherData`] holds where each patch is
//! and its confidence, not its pixels), and the teacher's rows (instance logits, reduced features,
//! its own features) from the slides' bags the same way ([`StreamedRows`], within the worker's bag
//! budget), so a shard of whole slides never sits in memory; an epoch mixes the patches of a few
//! slides at a time ([`epoch_order`]), so few are open, and few bags held, at once.
//! With the authors' recipe (`IcmilMethod::Paper`): every patch of the shard, shuffled across
//! slides, confidence min-maxed per batch, Adam with weight decay 1e-4 as an L2 term, the heads'
//! gradient norm clipped at 5. With the first one: zero-confidence patches left out, AdamW without
//! decay. The shard's result is the full set of the embedder's tensors (the trained ones updated,
//! the rest as the teacher's), to be averaged with the fold's other shards by the coordinator.

use crate::embed::to_input;
use crate::resample::resize_rgb;
use candle_core::{DType, Device, Result, Tensor};
use image::RgbImage;
use rayon::prelude::*;
use std::collections::BTreeMap;
use wsimil_common::features::Preprocessing;
use wsimil_common::models::embedder::Tune;
use wsimil_common::models::icmil::{self, HeadsOnTeacher, StudentOut, Targets};
use wsimil_common::models::optim::{clip_grad_norm, Adam, AdamW, Optimizer};
use wsimil_common::models::params::Params;
use wsimil_common::models::zoo::Architecture;
use wsimil_common::models::{BagModel, BagModelConfig, Mode};
use wsimil_common::plan::{IcmilConfig, IcmilMethod};
use wsimil_common::rng::Rng;

/// Where a patch is: an index into the shard's slides, its row in that slide's bag, and its
/// level-0 top-left corner.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PatchRef {
    pub slide: usize,
    pub row: usize,
    pub x: i64,
    pub y: i64,
}

/// The patches a shard learns from, with what the teacher says of each that fits in a number (its
/// instance logits, reduced features and own features are the [`TeacherRows`]' to give, batch by
/// batch), row-aligned.
#[derive(Default)]
pub struct TeacherData {
    pub patches: Vec<PatchRef>,
    /// Raw attention scores, min-maxed per batch (the authors' confidence).
    pub scores: Vec<f32>,
    /// Confidence weights fixed per slide (the first recipe's).
    pub weights: Vec<f32>,
}

/// The teacher's view of one slide, per patch: the raw attention scores and the first recipe's
/// per-slide confidence weights of its `feats` [N, D] (round-r features).
pub struct SlideTargets {
    pub scores: Vec<f32>,
    pub weights: Vec<f32>,
}

pub fn slide_targets(classifier: &BagModel, feats: &Tensor, beta: f64) -> Result<SlideTargets> {
    let scores = classifier.attention_scores(feats)?.to_dtype(DType::F32)?;
    let attention = match classifier {
        // A TransMIL with its instance head: the head's attention, the one its pseudo-labels go with.
        BagModel::Transmil(m) if m.has_instance_head() => candle_nn::ops::softmax_last_dim(&scores)?,
        _ => classifier.forward(&feats.unsqueeze(0)?, &mut Mode::Eval, true)?.attention.expect("asked for attention"),
    };
    let attention = attention.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(SlideTargets { scores: scores.to_vec1::<f32>()?, weights: icmil::confidence_weights(&attention, beta) })
}

impl TeacherData {
    /// Add patch `at.row` of a slide with the slide's targets.
    pub fn push(&mut self, t: &SlideTargets, at: PatchRef) {
        self.scores.push(t.scores[at.row]);
        self.weights.push(t.weights[at.row]);
        self.patches.push(at);
    }

    pub fn len(&self) -> usize {
        self.patches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.patches.is_empty()
    }
}

/// What the teacher gives a batch of patches: instance logits `[b, C]`, reduced features `[b, R]`
/// (its instance path on its own features) and those features `[b, D]`, f32 on the device.
pub struct TeacherBatch {
    pub logits: Tensor,
    pub reduced: Tensor,
    pub features: Tensor,
}

/// The teacher's rows of patches (indices into [`TeacherData::patches`]).
pub type TeacherRows<'a> = dyn Fn(&[usize]) -> Result<TeacherBatch> + 'a;

/// One slide's teacher rows, computed from its bag.
struct SlideRows {
    /// The bag, holding its share of the worker's budget while these rows are kept.
    _bag: crate::bags::Loaded,
    features: Tensor,
    reduced: Tensor,
    logits: Tensor,
}

/// The teacher's rows read from the shard's bags as batches need them: a slide's bag comes from
/// the worker's memory or the store ([`crate::bags`]), its instance path runs once on the whole
/// bag (the same numbers as a pass over the shard would give), and the slide is kept while among
/// the last 2·[`SLIDES_MIXED`] a batch needed (a batch mixes at most that many: [`epoch_order`]).
/// So a shard never holds its slides' features all at once.
pub struct StreamedRows<'a> {
    loader: &'a crate::bags::BagLoader,
    classifier: &'a BagModel,
    patches: &'a [PatchRef],
    device: Device,
    held: std::sync::Mutex<Vec<(usize, std::sync::Arc<SlideRows>)>>,
    /// The negative class: the patches of its slides (by their entries' labels) are taught it
    /// outright ([`IcmilConfig::negative_class`]).
    negative_class: Option<usize>,
    /// The other slides' [`top_rows`] are taught their slide's class outright
    /// ([`IcmilConfig::top_k`]).
    top_k: usize,
}

/// The rows of a slide's teacher `logits` [n, C] most likely of `class` (by the softmax), at most
/// `k` of them, most likely first, ties to the lower row: the patches CLAM's top-k takes as the
/// slide's own class.
pub fn top_rows(logits: &Tensor, class: usize, k: usize) -> Result<Vec<usize>> {
    if k == 0 {
        return Ok(Vec::new());
    }
    let p = candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?.to_vec2::<f32>()?;
    let mut rows: Vec<usize> = (0..p.len()).collect();
    rows.sort_by(|&a, &b| p[b][class].total_cmp(&p[a][class]).then(a.cmp(&b)));
    rows.truncate(k);
    Ok(rows)
}

/// The rows a slide gives its shard: `candidates` (the rows its recipe may learn from) in a random
/// order, those of them in `first` (its [`top_rows`]) put ahead, cut to `cap` (0 = all), in row
/// order.
pub fn draw_rows(mut candidates: Vec<usize>, first: &[usize], cap: usize, rng: &mut Rng) -> Vec<usize> {
    rng.shuffle(&mut candidates);
    // A stable sort keeps the shuffled order within each side.
    candidates.sort_by_key(|r| !first.contains(r));
    if cap > 0 {
        candidates.truncate(cap);
    }
    candidates.sort_unstable();
    candidates
}

/// Logits whose softmax is, to f32's precision, the one-hot of `class`: what a known-negative
/// slide's patches are taught.
const ONE_HOT_MARGIN: f32 = 40.0;

/// Slides a fine-tuning job keeps the rows of, at most.
pub const SLIDES_HELD: usize = 2 * SLIDES_MIXED;

impl<'a> StreamedRows<'a> {
    /// Rows of `patches`, whose `slide` indexes `loader`'s entries.
    pub fn new(
        loader: &'a crate::bags::BagLoader,
        classifier: &'a BagModel,
        patches: &'a [PatchRef],
        device: &Device,
    ) -> Self {
        StreamedRows {
            loader,
            classifier,
            patches,
            device: device.clone(),
            held: Default::default(),
            negative_class: None,
            top_k: 0,
        }
    }

    /// Teach each other slide's `k` [`top_rows`] its own class outright.
    pub fn with_top_k(mut self, k: usize) -> Self {
        self.top_k = k;
        self
    }

    /// Teach the patches of the loader's slides labelled `class` that class outright, whatever
    /// the teacher says of them.
    pub fn with_negative_class(mut self, class: Option<usize>) -> Self {
        self.negative_class = class;
        self
    }

    /// Slides whose rows are kept now (for tests).
    pub fn held(&self) -> Vec<usize> {
        self.held.lock().unwrap().iter().map(|(s, _)| *s).collect()
    }

    fn slide(&self, s: usize, needed: &std::collections::BTreeSet<usize>) -> Result<std::sync::Arc<SlideRows>> {
        let mut held = self.held.lock().unwrap();
        if let Some(at) = held.iter().position(|(k, _)| *k == s) {
            let e = held.remove(at);
            held.push(e.clone());
            return Ok(e.1);
        }
        // Room first: the least recently used slides this batch does not need go.
        while held.len() >= SLIDES_HELD {
            let Some(at) = held.iter().position(|(k, _)| !needed.contains(k)) else { break };
            held.remove(at);
        }
        let mut pass = self.loader.pass(&[s]);
        let Some(bag) = pass.next_bag() else {
            let why = self.loader.failure_text().unwrap_or_else(|| "the bag reader stopped".into());
            return Err(candle_core::Error::Msg(why));
        };
        let features = crate::bags::on_device(&bag.features, &self.device)?.squeeze(0)?;
        let (reduced, logits) = self.classifier.instance_path(&features)?;
        let label = self.loader.entries()[s].label;
        let (n, c) = logits.dims2()?;
        let one_hot = |class: usize| (0..c).map(move |k| if k == class { 0.0 } else { -ONE_HOT_MARGIN });
        let logits = if self.negative_class == Some(label) {
            let row: Vec<f32> = one_hot(label).collect();
            Tensor::new(row, &self.device)?.unsqueeze(0)?.broadcast_as((n, c))?.contiguous()?
        } else if self.top_k > 0 {
            let top = top_rows(&logits, label, self.top_k)?;
            let mut rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for r in top {
                rows[r] = one_hot(label).collect();
            }
            Tensor::from_vec(rows.concat(), (n, c), &self.device)?
        } else {
            logits
        };
        let rows = std::sync::Arc::new(SlideRows {
            _bag: bag,
            features,
            reduced: reduced.detach().to_dtype(DType::F32)?,
            logits: logits.detach().to_dtype(DType::F32)?,
        });
        held.push((s, rows.clone()));
        Ok(rows)
    }

    pub fn batch(&self, idx: &[usize]) -> Result<TeacherBatch> {
        let needed: std::collections::BTreeSet<usize> = idx.iter().map(|&i| self.patches[i].slide).collect();
        let (mut logits, mut reduced, mut features) = (Vec::new(), Vec::new(), Vec::new());
        for &i in idx {
            let p = self.patches[i];
            let rows = self.slide(p.slide, &needed)?;
            logits.push(rows.logits.narrow(0, p.row, 1)?);
            reduced.push(rows.reduced.narrow(0, p.row, 1)?);
            features.push(rows.features.narrow(0, p.row, 1)?);
        }
        Ok(TeacherBatch {
            logits: Tensor::cat(&logits, 0)?,
            reduced: Tensor::cat(&reduced, 0)?,
            features: Tensor::cat(&features, 0)?,
        })
    }
}

/// Reads the pixels of patches (indices into [`TeacherData::patches`]) at the embedder's input size.
pub type PatchReader<'a> = dyn Fn(&[usize]) -> Result<Vec<RgbImage>> + Sync + 'a;

/// A random view of a patch: a crop of 50–100 % of its area with aspect ratio 3/4–4/3
/// (log-uniform), resized back to the patch's size, then flipped horizontally and vertically with
/// probability ½ each.
pub fn augment(img: &RgbImage, rng: &mut Rng) -> RgbImage {
    let (w, h) = img.dimensions();
    let area = (w * h) as f64 * rng.range(0.5, 1.0);
    let aspect = rng.range((3f64 / 4.0).ln(), (4f64 / 3.0).ln()).exp();
    let cw = ((area * aspect).sqrt().round() as u32).clamp(1, w);
    let ch = ((area / aspect).sqrt().round() as u32).clamp(1, h);
    let x0 = rng.below((w - cw + 1) as usize) as u32;
    let y0 = rng.below((h - ch + 1) as usize) as u32;
    let crop = image::imageops::crop_imm(img, x0, y0, cw, ch).to_image();
    let mut out = if (cw, ch) == (w, h) { crop } else { resize_rgb(&crop, w, h) };
    if rng.uniform() < 0.5 {
        image::imageops::flip_horizontal_in_place(&mut out);
    }
    if rng.uniform() < 0.5 {
        image::imageops::flip_vertical_in_place(&mut out);
    }
    out
}

/// A view's red, green and blue scaled by factors of their own, each uniform in `[1 − s, 1 + s]`
/// (`--icmil-stain-jitter`): how stains, labs and scanners differ, which the student should not
/// learn to read as a lesion (the teacher labels the clean patch). `s` = 0 leaves the view as is.
pub fn stain_jitter(mut img: RgbImage, s: f64, rng: &mut Rng) -> RgbImage {
    if s <= 0.0 {
        return img;
    }
    let gains = [0; 3].map(|_| rng.range(1.0 - s, 1.0 + s) as f32);
    for px in img.pixels_mut() {
        for (v, g) in px.0.iter_mut().zip(gains) {
            *v = (*v as f32 * g).round().clamp(0.0, 255.0) as u8;
        }
    }
    img
}

/// The classifier of a fold as a model over `tensors` (its own parameters, not shared).
pub fn classifier(cfg: &BagModelConfig, tensors: &BTreeMap<String, Tensor>, device: &Device) -> Result<BagModel> {
    let p = Params::new(0);
    p.preload(tensors.iter().map(|(k, v)| (k.clone(), v.clone())))?;
    BagModel::new(cfg, p.var_builder(device))
}

/// What fine-tuning produced.
pub struct Finetuned {
    /// Every tensor of the teacher's checkpoint, the trained ones updated.
    pub tensors: BTreeMap<String, Tensor>,
    pub steps: usize,
    pub epoch_losses: Vec<f64>,
}

/// The layers a config trains.
pub fn tune_of(cfg: &IcmilConfig) -> Tune {
    match cfg.trainable_blocks {
        0 => Tune::LastBlocks(usize::MAX),
        n => Tune::LastBlocks(n),
    }
}

/// The authors' confidence of a batch's patches: `|2·minmax(a) − 1|^β` of their raw attention scores,
/// min and max taken over this batch (patches of many slides).
pub fn batch_confidence(data: &TeacherData, idx: &[usize], beta: f64) -> Vec<f32> {
    let scores: Vec<f32> = idx.iter().map(|&i| data.scores[i]).collect();
    icmil::confidence_weights(&scores, beta)
}

/// Slides whose patches an epoch mixes at a time (see [`epoch_order`]).
pub const SLIDES_MIXED: usize = 8;

/// One epoch's order of `patches`: the slides dealt at random into groups of [`SLIDES_MIXED`],
/// each group's patches shuffled together, the groups one after the other. A batch then mixes the
/// patches of up to 8 slides (two groups where it straddles), so its min-max confidence is taken
/// across slides as the authors' is, while a job keeps at most 16 slides open (a remote slide's
/// read cache, an OpenSlide slide's scratch copy) instead of every slide of its shard.
pub fn epoch_order(data: &TeacherData, patches: &[usize], rng: &mut Rng) -> Vec<usize> {
    let mut slides: Vec<usize> = patches.iter().map(|&i| data.patches[i].slide).collect();
    slides.sort_unstable();
    slides.dedup();
    rng.shuffle(&mut slides);
    let group: std::collections::HashMap<usize, usize> =
        slides.iter().enumerate().map(|(k, &s)| (s, k / SLIDES_MIXED)).collect();
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); slides.len().div_ceil(SLIDES_MIXED)];
    for &i in patches {
        groups[group[&data.patches[i].slide]].push(i);
    }
    groups
        .into_iter()
        .flat_map(|mut g| {
            rng.shuffle(&mut g);
            g
        })
        .collect()
}

/// The authors' optimizer settings: Adam's weight decay (an L2 term) and the heads' gradient-norm bound.
const PAPER_WEIGHT_DECAY: f64 = 1e-4;
const PAPER_HEAD_CLIP: f64 = 5.0;

/// Fine-tune `architecture` starting from `teacher`'s tensors on `data` (pixels from `read`), with
/// copies of the classifier's heads (`heads`) as the student's and the originals frozen as the
/// teacher's.
#[allow(clippy::too_many_arguments)]
pub fn finetune(
    architecture: &Architecture,
    teacher: &BTreeMap<String, Tensor>,
    heads: (&BagModelConfig, &BTreeMap<String, Tensor>),
    data: &TeacherData,
    read: &PatchReader,
    rows: &TeacherRows,
    cfg: &IcmilConfig,
    seed: u64,
    device: &Device,
) -> Result<Finetuned> {
    let paper = cfg.method == IcmilMethod::Paper;
    let student_params = Params::new(seed);
    student_params
        .preload(teacher.iter().filter(|(_, t)| t.dtype().is_float()).map(|(k, v)| (k.clone(), v.clone())))?;
    let student = architecture.build_tuned(student_params.var_builder(device), tune_of(cfg))?;
    let pre: Preprocessing = student.preprocessing();
    let head_params = Params::new(seed ^ 1);
    head_params.preload(heads.1.iter().map(|(k, v)| (k.clone(), v.clone())))?;
    let student_heads = BagModel::new(heads.0, head_params.var_builder(device))?;
    let teacher_heads = classifier(heads.0, heads.1, device)?;
    let mut vars: Vec<_> = student_params
        .named_vars()
        .into_iter()
        .filter(|(n, _)| !n.ends_with(".running_mean") && !n.ends_with(".running_var"))
        .map(|(_, v)| v)
        .collect();
    let head_vars = head_params.vars();
    vars.extend(head_vars.iter().cloned());
    let mut opt: Box<dyn Optimizer> = if paper {
        Box::new(Adam::new(vars, cfg.lr, PAPER_WEIGHT_DECAY)?)
    } else {
        Box::new(AdamW::new(vars, cfg.lr, 0.0)?)
    };

    let s = pre.input_px as usize;
    let mut rng = Rng::new(seed);
    // The first recipe learns from confident patches only; the authors' from every one.
    let order: Vec<usize> = (0..data.len()).filter(|&i| paper || data.weights[i] > 0.0).collect();
    let (mut steps, mut epoch_losses) = (0, Vec::new());
    for _ in 0..cfg.epochs {
        let order = epoch_order(data, &order, &mut rng);
        let (mut total, mut batches) = (0.0, 0);
        // BatchNorm needs two patches: a last batch of one is dropped.
        for idx in order.chunks(cfg.batch_size.max(2)).filter(|b| b.len() >= 2) {
            let seeds: Vec<u64> = idx.iter().map(|_| rng.next_u64()).collect();
            let images = read(idx)?;
            let pixels: Vec<u8> = images
                .par_iter()
                .zip(seeds)
                .flat_map_iter(|(img, sd)| {
                    let mut rng = Rng::new(sd);
                    let view = augment(img, &mut rng);
                    stain_jitter(view, cfg.stain_jitter, &mut rng).into_raw()
                })
                .collect();
            drop(images);
            let x = to_input(pixels, idx.len(), s, &pre, device, DType::F32)?;
            let feats = student.forward(&x)?;
            let (reduced, logits) = student_heads.instance_path(&feats)?;
            let teacher = rows(idx)?;
            let (tl, tr) = (&teacher.logits, &teacher.reduced);
            let loss = if paper {
                let w = Tensor::from_vec(batch_confidence(data, idx, cfg.beta), idx.len(), device)?;
                let (on_reduced, on_logits) = student_heads.instance_path(&teacher.features)?;
                icmil::paper_loss(
                    &Targets { logits: tl, reduced: tr, weights: &w },
                    &logits,
                    &HeadsOnTeacher { logits: &on_logits, reduced: &on_reduced },
                )?
            } else {
                let (_, teacher_head_logits) = teacher_heads.instance_path(&feats)?;
                let w: Vec<f32> = idx.iter().map(|&i| data.weights[i]).collect();
                let w = Tensor::from_vec(w, idx.len(), device)?;
                icmil::weighted_loss(
                    &Targets { logits: tl, reduced: tr, weights: &w },
                    &StudentOut { logits: &logits, teacher_head_logits: &teacher_head_logits, reduced: &reduced },
                )?
            };
            let mut grads = loss.backward()?;
            if paper {
                clip_grad_norm(&mut grads, &head_vars, PAPER_HEAD_CLIP)?;
            }
            opt.step(&grads)?;
            total += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            batches += 1;
            steps += 1;
        }
        epoch_losses.push(if batches == 0 { f64::NAN } else { total / batches as f64 });
    }
    let mut tensors = teacher.clone();
    for (name, t) in student_params.snapshot()? {
        if let Some(orig) = teacher.get(&name) {
            tensors.insert(name, t.to_dtype(orig.dtype())?);
        }
    }
    Ok(Finetuned { tensors, steps, epoch_losses })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Teacher rows held in memory, patch by patch (what the bags would give).
    #[derive(Default)]
    struct Held {
        logits: Vec<Vec<f32>>,
        reduced: Vec<Vec<f32>>,
        features: Vec<Vec<f32>>,
    }

    impl Held {
        fn push(&mut self, logits: Vec<f32>, reduced: Vec<f32>, features: Vec<f32>) {
            self.logits.push(logits);
            self.reduced.push(reduced);
            self.features.push(features);
        }

        fn batch(&self, idx: &[usize], d: &Device) -> Result<TeacherBatch> {
            let rows = |v: &[Vec<f32>]| {
                let w = v[0].len();
                Tensor::from_vec(idx.iter().flat_map(|&i| v[i].clone()).collect::<Vec<f32>>(), (idx.len(), w), d)
            };
            Ok(TeacherBatch {
                logits: rows(&self.logits)?,
                reduced: rows(&self.reduced)?,
                features: rows(&self.features)?,
            })
        }
    }

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 77]))
    }

    #[test]
    fn augmented_views_keep_the_size_and_vary_crop_and_orientation() {
        let img = gradient(32, 32);
        let mut rng = Rng::new(3);
        let mut flipped_x = 0;
        let mut cropped = 0;
        for _ in 0..200 {
            let v = augment(&img, &mut rng);
            assert_eq!(v.dimensions(), (32, 32));
            // The red ramp runs left→right unless flipped horizontally.
            if v.get_pixel(0, 16)[0] > v.get_pixel(31, 16)[0] {
                flipped_x += 1;
            }
            // A crop stretches the ramp: its ends move inwards from 0 and ~247.
            let (lo, hi) =
                (v.get_pixel(0, 16)[0].min(v.get_pixel(31, 16)[0]), v.get_pixel(0, 16)[0].max(v.get_pixel(31, 16)[0]));
            if lo > 8 || hi < 239 {
                cropped += 1;
            }
            assert_eq!(v.get_pixel(5, 5)[2], 77, "colour untouched");
        }
        assert!((70..130).contains(&flipped_x), "horizontal flips: {flipped_x} of 200");
        assert!(cropped > 100, "most views are crops: {cropped} of 200");
    }

    /// Stain jitter scales each colour channel of a view by its own factor within the bound, a
    /// different one per view; none at 0.
    #[test]
    fn stain_jitter_scales_each_channel_within_its_bound() {
        let img = RgbImage::from_fn(8, 8, |x, y| image::Rgb([100 + x as u8, 120 + y as u8, 140]));
        let mut rng = Rng::new(4);
        assert_eq!(stain_jitter(img.clone(), 0.0, &mut rng), img);
        let mut blues = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let v = stain_jitter(img.clone(), 0.25, &mut rng);
            let g = [0, 1, 2].map(|c| v.get_pixel(0, 0)[c] as f64 / img.get_pixel(0, 0)[c] as f64);
            for (c, g) in g.into_iter().enumerate() {
                assert!((0.74..=1.26).contains(&g), "channel {c} gain {g}");
                // One factor per channel over the whole view.
                let far = v.get_pixel(7, 7)[c] as f64 / img.get_pixel(7, 7)[c] as f64;
                assert!((far - g).abs() < 0.02, "channel {c}: {far} vs {g}");
            }
            blues.insert(v.get_pixel(0, 0)[2]);
        }
        assert!(blues.len() > 20, "views differ: {blues:?}");
    }

    #[test]
    fn fine_tuning_lowers_the_loss_and_changes_only_the_trainable_layers() {
        let d = Device::Cpu;
        let tp = Params::new(9);
        Architecture::EfficientNetLite0.build(tp.var_builder(&d)).unwrap();
        let teacher = tp.snapshot().unwrap();
        let hcfg = BagModelConfig::new(wsimil_common::models::BagModelKind::Abmil, 1280, 2);
        let hp = Params::new(10);
        BagModel::new(&hcfg, hp.var_builder(&d)).unwrap();
        let heads = hp.snapshot().unwrap();
        // Eight patches of two looks, each with a confident target for its class.
        let mut data = TeacherData::default();
        let mut held = Held::default();
        let mut images = Vec::new();
        let mut rng = Rng::new(1);
        for i in 0..8 {
            let img = RgbImage::from_fn(224, 224, |x, y| {
                let v = if i % 2 == 0 { ((x / 16 + y / 16) % 2 * 200) as u8 } else { 120 };
                image::Rgb([v, (rng.below(50) + 100) as u8, 150])
            });
            let cls = i % 2;
            let t = SlideTargets { scores: vec![if cls == 0 { -2.0 } else { 2.0 }], weights: vec![1.0] };
            data.push(&t, PatchRef { slide: 0, row: 0, x: i as i64, y: 0 });
            held.push(
                if cls == 0 { vec![3.0, -3.0] } else { vec![-3.0, 3.0] },
                (0..512).map(|j| ((j + i) % 7) as f32 * 0.3).collect(),
                (0..1280).map(|j| ((j * 7 + i) % 11) as f32 * 0.1).collect(),
            );
            images.push(img);
        }
        let read = |idx: &[usize]| Ok(idx.iter().map(|&i| images[i].clone()).collect());
        let rows = |idx: &[usize]| held.batch(idx, &d);
        let changed = |out: &Finetuned, name: &str| {
            let diff = (&out.tensors[name] - &teacher[name]).unwrap().abs().unwrap().max_all().unwrap();
            diff.to_scalar::<f32>().unwrap() > 0.0
        };
        // The whole network (a random one needs its BatchNorms to train to separate anything),
        // with either recipe.
        for method in [IcmilMethod::Paper, IcmilMethod::First] {
            let cfg = IcmilConfig {
                epochs: 4,
                lr: 1e-3,
                batch_size: 4,
                trainable_blocks: 0,
                method,
                ..IcmilConfig::default()
            };
            let out =
                finetune(&Architecture::EfficientNetLite0, &teacher, (&hcfg, &heads), &data, &read, &rows, &cfg, 0, &d)
                    .unwrap();
            assert_eq!(out.steps, 8);
            // Two batches an epoch at a high rate: the last two epochs' mean against the first.
            let l = &out.epoch_losses;
            assert!((l[2] + l[3]) / 2.0 < l[0] * 0.8, "{method:?}: loss {l:?}");
            assert!(changed(&out, "_conv_stem.weight") && changed(&out, "_bn0.running_var"));
            assert_eq!(out.tensors.len(), teacher.len());
            // The result is an ordinary checkpoint: it builds the inference embedder.
            let vb = candle_nn::VarBuilder::from_tensors(out.tensors.into_iter().collect(), DType::F32, &d);
            assert!(Architecture::EfficientNetLite0.build(vb).is_ok());
        }

        // The last block only: one step changes it and the head, nothing before it.
        let cfg = IcmilConfig { epochs: 1, lr: 3e-3, batch_size: 8, trainable_blocks: 1, ..IcmilConfig::default() };
        let out =
            finetune(&Architecture::EfficientNetLite0, &teacher, (&hcfg, &heads), &data, &read, &rows, &cfg, 0, &d)
                .unwrap();
        for name in ["_blocks.15._project_conv.weight", "_conv_head.weight", "_bn1.running_mean", "_bn1.weight"] {
            assert!(changed(&out, name), "{name} should have trained");
        }
        for name in ["_blocks.14._project_conv.weight", "_blocks.0._bn1.running_var", "_conv_stem.weight"] {
            assert!(!changed(&out, name), "{name} should be frozen");
        }
    }

    /// ICMIL's student can be a Vision Transformer: its last blocks train, the rest stay the
    /// teacher's, and the result is an ordinary checkpoint of the same architecture.
    #[test]
    fn a_vit_embedder_fine_tunes_its_last_block_only() {
        let d = Device::Cpu;
        let arch: Architecture = "vit:vit_tiny_patch16_224".parse().unwrap();
        let tp = Params::new(21);
        arch.build(tp.var_builder(&d)).unwrap();
        let teacher = tp.snapshot().unwrap();
        let hcfg = BagModelConfig::new(wsimil_common::models::BagModelKind::Abmil, 192, 2);
        let hp = Params::new(22);
        BagModel::new(&hcfg, hp.var_builder(&d)).unwrap();
        let heads = hp.snapshot().unwrap();
        let mut data = TeacherData::default();
        let mut held = Held::default();
        let mut images = Vec::new();
        for i in 0..6 {
            let img = RgbImage::from_fn(224, 224, |x, y| {
                let v = if i % 2 == 0 { ((x / 16 + y / 16) % 2 * 200) as u8 } else { 90 };
                image::Rgb([v, 120, 150])
            });
            let cls = i % 2;
            let t = SlideTargets { scores: vec![i as f32], weights: vec![1.0] };
            data.push(&t, PatchRef { slide: 0, row: 0, x: 0, y: i as i64 });
            held.push(
                if cls == 0 { vec![3.0, -3.0] } else { vec![-3.0, 3.0] },
                (0..512).map(|j| ((j + i) % 5) as f32 * 0.2).collect(),
                (0..192).map(|j| ((j + 3 * i) % 5) as f32 * 0.2).collect(),
            );
            images.push(img);
        }
        let read = |idx: &[usize]| Ok(idx.iter().map(|&i| images[i].clone()).collect());
        let rows = |idx: &[usize]| held.batch(idx, &d);
        let cfg = IcmilConfig {
            epochs: 3,
            lr: 1e-3,
            batch_size: 3,
            trainable_blocks: 1,
            beta: 1.0,
            ..IcmilConfig::default()
        };
        let out = finetune(&arch, &teacher, (&hcfg, &heads), &data, &read, &rows, &cfg, 0, &d).unwrap();
        assert_eq!(out.steps, 6);
        let (first, last) = (out.epoch_losses[0], *out.epoch_losses.last().unwrap());
        assert!(last < first, "loss {:?}", out.epoch_losses);
        let changed = |name: &str| {
            let diff = (&out.tensors[name] - &teacher[name]).unwrap().abs().unwrap().max_all().unwrap();
            diff.to_scalar::<f32>().unwrap() > 0.0
        };
        for name in ["blocks.11.attn.qkv.weight", "blocks.11.mlp.fc2.weight", "norm.weight"] {
            assert!(changed(name), "{name} should have trained");
        }
        for name in ["blocks.10.attn.qkv.weight", "patch_embed.proj.weight", "pos_embed", "cls_token"] {
            assert!(!changed(name), "{name} should be frozen");
        }
        let vb = candle_nn::VarBuilder::from_tensors(out.tensors.into_iter().collect(), DType::F32, &d);
        assert_eq!(arch.build(vb).unwrap().feature_dim(), 192);
    }

    #[test]
    fn teacher_targets_are_the_instance_path_and_weights_follow_attention() {
        let d = Device::Cpu;
        let cfg = BagModelConfig::new(wsimil_common::models::BagModelKind::Abmil, 5, 2);
        let p = Params::new(4);
        let model = BagModel::new(&cfg, p.var_builder(&d)).unwrap();
        let feats = Tensor::randn(0f32, 1.0, (6, 5), &d).unwrap();
        let t = slide_targets(&model, &feats, 1.0).unwrap();
        let att = model.forward(&feats.unsqueeze(0).unwrap(), &mut Mode::Eval, true).unwrap().attention.unwrap();
        assert_eq!(t.weights, icmil::confidence_weights(&att.to_vec1::<f32>().unwrap(), 1.0));
        assert_eq!(t.weights.iter().filter(|w| **w == 1.0).count(), 2, "the most and least attended patches");
        assert_eq!(t.scores, model.attention_scores(&feats).unwrap().to_vec1::<f32>().unwrap());
        // The authors' TransMIL (no head): ln(N·a), its attention relative to uniform.
        let cfg = BagModelConfig::new(wsimil_common::models::BagModelKind::Transmil, 5, 2).with_landmarks(4);
        let p = Params::new(5);
        let model = BagModel::new(&cfg, p.var_builder(&d)).unwrap();
        let t = slide_targets(&model, &feats, 1.0).unwrap();
        let want = model.attention_scores(&feats).unwrap().to_vec1::<f32>().unwrap();
        assert!(t.scores.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5), "{:?} vs {want:?}", t.scores);
        // A TransMIL with its instance head: the head's raw attention logits, weights from their softmax.
        let cfg = cfg.with_transmil_instance_head(true);
        let model = BagModel::new(&cfg, Params::new(5).var_builder(&d)).unwrap();
        let BagModel::Transmil(m) = &model else { unreachable!() };
        let logits = m.head_attention_logits(&feats).unwrap().expect("has a head").to_vec1::<f32>().unwrap();
        let t = slide_targets(&model, &feats, 1.0).unwrap();
        assert_eq!(t.scores, logits);
        let z = logits.iter().map(|v| v.exp()).sum::<f32>();
        let softmax: Vec<f32> = logits.iter().map(|v| v.exp() / z).collect();
        let want = icmil::confidence_weights(&softmax, 1.0);
        assert!(t.weights.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5), "{:?} vs {want:?}", t.weights);
        // DTFD-MIL: tier 1's attention over the whole bag, its raw logits the scores.
        let cfg = BagModelConfig::new(wsimil_common::models::BagModelKind::Dtfd, 5, 2);
        let p = Params::new(6);
        let model = BagModel::new(&cfg, p.var_builder(&d)).unwrap();
        let t = slide_targets(&model, &feats, 1.0).unwrap();
        let att = model.forward(&feats.unsqueeze(0).unwrap(), &mut Mode::Eval, true).unwrap().attention.unwrap();
        assert_eq!(t.weights, icmil::confidence_weights(&att.to_vec1::<f32>().unwrap(), 1.0));
        let scores = model.attention_scores(&feats).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(t.scores, scores);
        let (z, a) = (scores.iter().map(|v| v.exp()).sum::<f32>(), att.to_vec1::<f32>().unwrap());
        assert!(scores.iter().zip(&a).all(|(s, a)| (s.exp() / z - a).abs() < 1e-6), "softmax(scores) is the attention");
        // CLAM (both forms): its attention branch's raw logits the scores, the weights from its
        // attention. DSMIL: its max-pooling stream's instance scores, the weights from its bag
        // stream's attention.
        use wsimil_common::models::BagModelKind::{ClamMb, ClamSb, Dsmil};
        for (kind, seed) in [(ClamSb, 7), (ClamMb, 8), (Dsmil, 9)] {
            let model = BagModel::new(&BagModelConfig::new(kind, 5, 2), Params::new(seed).var_builder(&d)).unwrap();
            let t = slide_targets(&model, &feats, 1.0).unwrap();
            let att = model.forward(&feats.unsqueeze(0).unwrap(), &mut Mode::Eval, true).unwrap().attention.unwrap();
            let att = att.to_vec1::<f32>().unwrap();
            assert_eq!(t.weights, icmil::confidence_weights(&att, 1.0), "{kind:?}");
            let scores = model.attention_scores(&feats).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(t.scores, scores, "{kind:?}");
            let order = |v: &[f32]| {
                let mut o: Vec<usize> = (0..v.len()).collect();
                o.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
                o
            };
            // CLAM-SB's one branch gives both (CLAM-MB's scores and attention may come from
            // different class branches, DSMIL's from different streams).
            if kind == ClamSb {
                assert_eq!(order(&scores), order(&att), "{kind:?}: the attention is the scores' softmax");
            }
        }
    }

    /// The teacher's rows from the bags are its instance path on the patch's own features, a
    /// batch's slides read as needed and at most [`SLIDES_HELD`] kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streamed_teacher_rows_are_the_instance_path_of_each_patch_from_few_bags_at_once() {
        use crate::bags::{index, BagBudget, BagLoader, BagMemory, BagPrecision};
        use wsimil_common::features::{EmbeddingProvenance, FeatureBag};
        use wsimil_common::ids::{EmbedderId, SlideId, TilingId};
        let store = wsimil_common::store::Store::memory();
        let ids = (EmbedderId::new("e").unwrap(), TilingId::new("t").unwrap());
        let mut slides = Vec::new();
        let mut all: Vec<Vec<f32>> = Vec::new();
        let mut r = Rng::new(5);
        for s in 0..40 {
            let slide = SlideId::new(format!("s{s}")).unwrap();
            let n = 3 + s % 5;
            let features: Vec<f32> = (0..n * 8).map(|_| r.normal() as f32).collect();
            let bag = FeatureBag {
                xs: (0..n as i64).collect(),
                ys: vec![s as i64; n],
                dim: 8,
                features: features.clone(),
                provenance: EmbeddingProvenance::new(slide.as_str(), "e", "test", 8),
            };
            let key = wsimil_common::layout::features(&ids.0, &ids.1, &slide);
            store.put(&key, bag.to_parquet().unwrap()).await.unwrap();
            // Every third slide of class 1 (the known negative class below).
            slides.push((slide, usize::from(s % 3 == 0)));
            all.push(features);
        }
        let (entries, _) = index(&store, &ids, &slides).await.unwrap();
        let need: u64 = entries.iter().map(|e| e.need(BagPrecision::F32)).max().unwrap();
        // A budget for 10 bags cannot feed batches of 16 slides: said before any work.
        let small = BagMemory::new(BagBudget { bytes: 10 * need, precision: BagPrecision::F32 });
        let handle = tokio::runtime::Handle::current();
        let err = BagLoader::holding(small, store.clone(), entries.clone(), handle.clone(), SLIDES_HELD, "ICMIL test")
            .err()
            .unwrap();
        assert!(err.to_string().contains("ICMIL test: 16 of these bags at once"), "{err}");
        // Room for 20: batches go through, 16 slides kept at most, nothing kept across passes.
        let memory = BagMemory::new(BagBudget { bytes: 20 * need, precision: BagPrecision::F32 });
        let loader = BagLoader::holding(memory, store, entries, handle, SLIDES_HELD, "ICMIL test").unwrap();
        let d = Device::Cpu;
        let cfg = BagModelConfig::new(wsimil_common::models::BagModelKind::Abmil, 8, 2);
        let p = Params::new(3);
        let model = BagModel::new(&cfg, p.var_builder(&d)).unwrap();
        let patches: Vec<PatchRef> = (0..40)
            .flat_map(|s| (0..all[s].len() / 8).map(move |row| PatchRef { slide: s, row, x: row as i64, y: s as i64 }))
            .collect();
        tokio::task::spawn_blocking(move || {
            let rows = StreamedRows::new(&loader, &model, &patches, &d);
            let mut order: Vec<usize> = (0..patches.len()).collect();
            Rng::new(1).shuffle(&mut order);
            let data = TeacherData {
                patches: patches.clone(),
                scores: vec![0.0; patches.len()],
                weights: vec![1.0; patches.len()],
            };
            let order = epoch_order(&data, &order, &mut Rng::new(2));
            for idx in order.chunks(9) {
                let b = rows.batch(idx).unwrap();
                let feats: Vec<f32> = idx
                    .iter()
                    .flat_map(|&i| all[patches[i].slide][patches[i].row * 8..(patches[i].row + 1) * 8].to_vec())
                    .collect();
                let feats = Tensor::from_vec(feats, (idx.len(), 8), &d).unwrap();
                assert_eq!(b.features.to_vec2::<f32>().unwrap(), feats.to_vec2::<f32>().unwrap());
                let (reduced, logits) = model.instance_path(&feats).unwrap();
                let close = |a: &Tensor, b: &Tensor| {
                    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(diff < 1e-5, "{diff}");
                };
                close(&b.logits, &logits);
                close(&b.reduced, &reduced);
                assert!(rows.held().len() <= SLIDES_HELD, "{:?}", rows.held());
            }
            // The epoch goes group by group, so each slide's bag is read once.
            let stats = loader.stats();
            assert_eq!(stats.reads + stats.hits, 40, "{stats:?}");
            // A known negative class: every patch of its slides is taught it outright, the other
            // slides' patches what the teacher says.
            let negative: Vec<bool> = (0..40).map(|s| s % 3 == 0).collect();
            let rows = StreamedRows::new(&loader, &model, &patches, &d).with_negative_class(Some(1));
            let idx: Vec<usize> = (0..patches.len()).filter(|&i| patches[i].slide < 8).collect();
            let b = rows.batch(&idx).unwrap();
            let probs = candle_nn::ops::softmax_last_dim(&b.logits).unwrap().to_vec2::<f32>().unwrap();
            let teacher = model.instance_path(&b.features).unwrap().1;
            let teacher = candle_nn::ops::softmax_last_dim(&teacher).unwrap().to_vec2::<f32>().unwrap();
            for (k, &i) in idx.iter().enumerate() {
                if negative[patches[i].slide] {
                    assert!(probs[k][1] > 1.0 - 1e-6, "patch {i} of a negative slide: {:?}", probs[k]);
                } else {
                    assert!(
                        (probs[k][1] - teacher[k][1]).abs() < 1e-5,
                        "patch {i}: {:?} vs {:?}",
                        probs[k],
                        teacher[k]
                    );
                }
            }
            assert!(
                teacher.iter().zip(&idx).any(|(t, &i)| negative[patches[i].slide] && t[1] < 0.9),
                "the override must matter"
            );
            // And the top-k: on the other slides (class 0 here), the teacher's 2 patches most
            // likely of class 0 are taught it outright, the rest what the teacher says.
            let rows = StreamedRows::new(&loader, &model, &patches, &d).with_negative_class(Some(1)).with_top_k(2);
            let b = rows.batch(&idx).unwrap();
            let probs = candle_nn::ops::softmax_last_dim(&b.logits).unwrap().to_vec2::<f32>().unwrap();
            let mut taught = 0;
            for s in (0..8).filter(|&s| !negative[s]) {
                let mine: Vec<usize> = (0..idx.len()).filter(|&k| patches[idx[k]].slide == s).collect();
                // The slide's patches are its rows 0.., in order: rank them by the teacher.
                let mut by_teacher = mine.clone();
                by_teacher.sort_by(|&a, &b| teacher[b][0].total_cmp(&teacher[a][0]).then(a.cmp(&b)));
                for &k in &mine {
                    if by_teacher[..2].contains(&k) {
                        assert!(probs[k][0] > 1.0 - 1e-6, "slide {s}, patch {}: {:?}", idx[k], probs[k]);
                        taught += usize::from(teacher[k][0] < 0.9);
                    } else {
                        assert!((probs[k][0] - teacher[k][0]).abs() < 1e-5, "{:?} vs {:?}", probs[k], teacher[k]);
                    }
                }
            }
            assert!(taught > 0, "the top-k must change what some patch is taught");
            for (k, &i) in idx.iter().enumerate() {
                if negative[patches[i].slide] {
                    assert!(probs[k][1] > 1.0 - 1e-6, "patch {i} of a negative slide: {:?}", probs[k]);
                }
            }
        })
        .await
        .unwrap();
    }

    #[test]
    fn top_rows_are_the_k_patches_most_likely_of_the_class_best_first() {
        let d = Device::Cpu;
        // p(class 1) rises with the logit gap: rows 3 and 1 tie at the top, then 4, 0, 2.
        let gaps = [0.5f32, 2.0, -1.0, 2.0, 1.0];
        let logits: Vec<f32> = gaps.iter().flat_map(|g| [0.3, 0.3 + g]).collect();
        let logits = Tensor::from_vec(logits, (5, 2), &d).unwrap();
        assert_eq!(top_rows(&logits, 1, 3).unwrap(), vec![1, 3, 4], "ties to the lower row");
        assert_eq!(top_rows(&logits, 0, 2).unwrap(), vec![2, 0], "most likely of class 0");
        assert_eq!(top_rows(&logits, 1, 9).unwrap().len(), 5, "k past the slide's patches: all");
        assert!(top_rows(&logits, 1, 0).unwrap().is_empty());
    }

    #[test]
    fn a_slides_top_rows_are_always_drawn_and_the_rest_at_random() {
        let candidates: Vec<usize> = (0..200).filter(|r| r % 10 != 7).collect();
        // Without top rows, the draw is the plain one: shuffled, cut, in row order.
        let mut plain = candidates.clone();
        Rng::new(3).shuffle(&mut plain);
        plain.truncate(20);
        plain.sort_unstable();
        assert_eq!(draw_rows(candidates.clone(), &[], 20, &mut Rng::new(3)), plain);
        let first = [150, 3, 77, 199];
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..20 {
            let drawn = draw_rows(candidates.clone(), &first, 20, &mut Rng::new(seed));
            assert_eq!(drawn.len(), 20);
            assert!(drawn.windows(2).all(|w| w[0] < w[1]), "row order, no repeats: {drawn:?}");
            assert!(drawn.iter().all(|r| candidates.contains(r)), "only candidates: {drawn:?}");
            for r in [150, 3, 199] {
                assert!(drawn.contains(&r), "seed {seed}: top row {r} not drawn: {drawn:?}");
            }
            assert!(!drawn.contains(&77), "a top row the recipe leaves out stays out");
            seen.extend(drawn);
        }
        assert!(seen.len() > 100, "the rest vary with the seed: {}", seen.len());
        assert_eq!(draw_rows(candidates.clone(), &first, 0, &mut Rng::new(1)).len(), candidates.len(), "0 = all");
        assert_eq!(draw_rows(candidates, &first, 2, &mut Rng::new(1)).len(), 2, "the cap wins");
    }

    #[test]
    fn an_epoch_mixes_a_few_slides_at_a_time_and_visits_every_patch_once() {
        let mut data = TeacherData::default();
        let t = SlideTargets { scores: vec![0.0], weights: vec![1.0] };
        for slide in 0..30 {
            for k in 0..(5 + slide % 4) {
                data.push(&t, PatchRef { slide, row: 0, x: k as i64, y: 0 });
            }
        }
        let all: Vec<usize> = (0..data.len()).collect();
        let mut rng = Rng::new(7);
        let order = epoch_order(&data, &all, &mut rng);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, all, "every patch once");
        for batch in order.chunks(20) {
            let slides: std::collections::BTreeSet<usize> = batch.iter().map(|&i| data.patches[i].slide).collect();
            assert!(slides.len() > 2 && slides.len() <= 2 * SLIDES_MIXED, "{slides:?}");
        }
        assert_ne!(order, epoch_order(&data, &all, &mut rng), "another order each epoch");
    }

    /// The authors' confidence is relative to the batch: the same patch weighs fully in a batch
    /// where its score is the highest and little in one where others score higher.
    #[test]
    fn the_papers_confidence_is_min_maxed_over_the_batch() {
        let mut data = TeacherData::default();
        for (i, score) in [0.0f32, 1.0, 2.0, 4.0].into_iter().enumerate() {
            let t = SlideTargets { scores: vec![score], weights: vec![0.0] };
            data.push(&t, PatchRef { slide: i, row: 0, x: 0, y: 0 });
        }
        // Patch 2 (score 2) between 0 and 4: the middle, no confidence; between 0 and 2: the top.
        let w = batch_confidence(&data, &[0, 2, 3], 1.0);
        assert_eq!(w, vec![1.0, 0.0, 1.0]);
        let w = batch_confidence(&data, &[0, 1, 2], 1.0);
        assert_eq!(w, vec![1.0, 0.0, 1.0]);
        let w = batch_confidence(&data, &[1, 2, 3], 2.0);
        assert!((w[1] - (1.0f32 / 3.0).powi(2)).abs() < 1e-6, "{w:?}");
    }
}
