//! What a run is: its cohort (labels, folds), how slides are tiled and embedded, and how the bag
//! classifier is trained. The coordinator writes the plan to the store once; every job names the
//! run and reads what it needs from there, so job messages stay small.

use crate::grid::TissueParams;
use crate::ids::{content_hash, EmbedderId, RunId, SlideId, TilingId};
use crate::layout;
use crate::models::optim::OptimizerKind;
use crate::models::zoo::Architecture;
use crate::models::BagModelKind;
use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};

/// How slides are cut into patches. Its content hash is the [`TilingId`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TilingSpec {
    /// Patch side in pixels at the target resolution.
    pub patch_px: u32,
    /// Target resolution in microns per pixel (0.5 ≈ 20x, 0.25 ≈ 40x).
    pub target_mpp: f64,
    /// Grid step as a fraction of the patch side (1.0 = no overlap).
    pub step_fraction: f64,
    /// Minimum fraction of a patch covered by tissue for it to be kept.
    pub min_tissue_fraction: f32,
    pub tissue: TissueParams,
}

impl TilingSpec {
    pub fn id(&self) -> TilingId {
        let json = serde_json::to_vec(self).expect("spec serialises");
        TilingId::new(format!("{}px-{:.3}mpp-{}", self.patch_px, self.target_mpp, content_hash([json.as_slice()])))
            .expect("tiling ids are safe")
    }
}

/// Which patch embedder, with which weights. The weights' SHA-256 pins the exact file, so an
/// [`EmbedderId`] names one set of numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedderSpec {
    /// The network (its name, as `--embedder` takes it).
    pub architecture: Architecture,
    /// Its weights: a file's SHA-256, a seed, or the name features were imported under.
    pub weights: WeightsRef,
    /// Patches per forward pass.
    pub batch_size: usize,
    /// What a corrupt tile inside an otherwise readable slide does to the patches on it.
    #[serde(default)]
    pub corrupt_tiles: CorruptTiles,
}

/// Policy for corrupt tiles (a JPEG that does not decode) inside a readable slide.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CorruptTiles {
    /// Leave the patches on it out of the bag and count them in the features' provenance.
    #[default]
    Skip,
    /// Fail the slide's embed job.
    Fail,
}

/// An embedder's weights, as a plan names them. Written as one string, as plans have always held
/// it (so ids and stored plans are unchanged): the SHA-256 in hex, `random-<seed>`, or the name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum WeightsRef {
    /// SHA-256 (64 hex digits) of the safetensors weights the store keeps under the embedder's id.
    Sha256(String),
    /// Initialised from this seed (tests, smoke runs): nothing is stored.
    Random(u64),
    /// Features imported under this name (`wsimil import-clam`): no network, no weights.
    Imported(String),
}

impl WeightsRef {
    /// The SHA-256 of the weights file, where there is one.
    pub fn sha256(&self) -> Option<&str> {
        match self {
            WeightsRef::Sha256(h) => Some(h),
            _ => None,
        }
    }

    /// The seed of random weights.
    pub fn seed(&self) -> Option<u64> {
        match self {
            WeightsRef::Random(s) => Some(*s),
            _ => None,
        }
    }

    /// Whether the store keeps weights for it (a file's, or an ICMIL merge's).
    pub fn stored(&self) -> bool {
        matches!(self, WeightsRef::Sha256(_))
    }
}

impl std::fmt::Display for WeightsRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WeightsRef::Sha256(h) => f.write_str(h),
            WeightsRef::Random(s) => write!(f, "random-{s}"),
            WeightsRef::Imported(name) => f.write_str(name),
        }
    }
}

impl From<WeightsRef> for String {
    fn from(w: WeightsRef) -> String {
        w.to_string()
    }
}

impl From<String> for WeightsRef {
    /// `random-<seed>`, 64 hex digits, or else a name (every string reads back as it was written).
    fn from(s: String) -> WeightsRef {
        if let Some(seed) = s.strip_prefix("random-").and_then(|n| n.parse::<u64>().ok()) {
            if format!("random-{seed}") == s {
                return WeightsRef::Random(seed);
            }
        }
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return WeightsRef::Sha256(s);
        }
        WeightsRef::Imported(s)
    }
}

impl EmbedderSpec {
    pub fn id(&self) -> EmbedderId {
        let weights = self.weights.to_string();
        let short = &weights[..weights.len().min(12)];
        EmbedderId::new(format!("{}-{}", self.architecture.id_stem(), short)).expect("embedder ids are safe")
    }
}

/// Bag classifier training, as in the TransMIL paper unless changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: BagModelKind,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub weight_decay: f64,
    pub max_epochs: usize,
    /// Stop when validation loss has not improved for this many epochs.
    pub patience: usize,
    /// Bags whose gradients are accumulated per optimizer step.
    pub grad_accumulation: usize,
    /// Dropout inside attention blocks during training.
    pub dropout: f32,
    /// TransMIL's Nyström landmarks (the paper: 256). The pseudo-inverse costs O(landmarks³) per
    /// layer whatever the bag size, which dominates on a CPU; fewer landmarks trade exactness of
    /// the attention approximation for speed.
    pub landmarks: usize,
    /// Bags larger than this are randomly subsampled during training (memory bound); 0 = never.
    pub max_train_instances: usize,
    pub seed: u64,
    /// CLAM's subtyping mode: every other class's most attended patches are taught "not this
    /// class" too (`--clam-subtyping`). Absent from plans without it (same run ids).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clam_subtyping: bool,
    /// What DTFD-MIL's pseudo-bags hand its second tier (`--dtfd-distill`; the authors' AFS when
    /// absent, and absent from plans without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtfd_distill: Option<crate::models::dtfd::Distill>,
    /// TransMIL carries wsimil's instance head (ICMIL's teacher; `--transmil-head`, on by default
    /// for classification runs): see [`crate::models::transmil`]. Absent from plans without it,
    /// which train the authors' network.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transmil_instance_head: bool,
}

impl TrainConfig {
    /// The bag model these settings train, on `in_dim`-wide features with `outputs` outputs.
    pub fn bag_model(&self, in_dim: usize, outputs: usize) -> crate::models::BagModelConfig {
        crate::models::BagModelConfig::new(self.model, in_dim, outputs)
            .with_dropout(self.dropout)
            .with_landmarks(self.landmarks)
            .with_clam_subtyping(self.clam_subtyping)
            .with_dtfd_distill(self.dtfd_distill)
            .with_transmil_instance_head(self.transmil_instance_head)
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: BagModelKind::Transmil,
            optimizer: OptimizerKind::LookaheadRadam,
            lr: 2e-4,
            weight_decay: 1e-5,
            max_epochs: 50,
            patience: 10,
            grad_accumulation: 1,
            dropout: 0.1,
            landmarks: 256,
            max_train_instances: 0,
            seed: 0,
            clam_subtyping: false,
            dtfd_distill: None,
            transmil_instance_head: true,
        }
    }
}

/// What a run learns from its slides' features.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Task {
    /// The manifest's labels (`label` column): class probabilities, AUC.
    #[default]
    Classification,
    /// Time to an event from right-censored `time`/`event` columns: a risk per slide, C-index.
    Survival(SurvivalConfig),
}

impl Task {
    pub fn is_classification(&self) -> bool {
        matches!(self, Task::Classification)
    }

    pub fn survival(&self) -> Option<&SurvivalConfig> {
        match self {
            Task::Survival(c) => Some(c),
            Task::Classification => None,
        }
    }

    /// The bag model's outputs: a logit per class, a hazard logit per time bin, or one risk.
    pub fn outputs(&self, n_classes: usize) -> usize {
        match self {
            Task::Classification => n_classes,
            Task::Survival(c) => match c.loss {
                SurvivalLoss::Nll => c.bins,
                SurvivalLoss::Cox => 1,
            },
        }
    }

    /// How the model's logits are read.
    pub fn head(&self) -> Head {
        match self {
            Task::Classification => Head::Classes,
            Task::Survival(c) => match c.loss {
                SurvivalLoss::Nll => Head::Hazards,
                SurvivalLoss::Cox => Head::Risk,
            },
        }
    }
}

/// How a survival model is trained (`docs/survival.md`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SurvivalConfig {
    pub loss: SurvivalLoss,
    /// Time bins of the discrete-time model: quantiles of the training slides' event times.
    pub bins: usize,
    /// The discrete-time NLL's extra weight on uncensored slides (MCAT's `alpha_surv`).
    pub alpha: f64,
    /// Bags per step of the Cox loss (its risk sets are taken within a batch).
    pub batch: usize,
}

impl Default for SurvivalConfig {
    /// MCAT's and PORPOISE's defaults: the discrete-time NLL on 4 bins, α = 0.
    fn default() -> Self {
        SurvivalConfig { loss: SurvivalLoss::Nll, bins: 4, alpha: 0.0, batch: 32 }
    }
}

/// The survival loss (`--survival-loss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SurvivalLoss {
    /// The discrete-time negative log-likelihood (Zadeh & Schmid 2020, as MCAT and PORPOISE
    /// train): one hazard per time bin, one bag a step.
    Nll,
    /// The Cox partial likelihood over a batch of bags (risk sets within the batch).
    Cox,
}

/// How a bag model's logits are read: class probabilities, a survival curve over time bins (from
/// per-bin hazards), or a risk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Head {
    /// Softmax over classes.
    #[default]
    Classes,
    /// Per-bin hazards `sigmoid(logit)`; the outputs are the survival curve `S_k = Π_{j≤k}(1 − h_j)`
    /// and the risk is `−Σ S_k` (MCAT's).
    Hazards,
    /// One logit, the log relative hazard (Cox): the risk itself.
    Risk,
}

impl Head {
    pub fn is_classes(&self) -> bool {
        *self == Head::Classes
    }

    /// The outputs of `logits` [1, K]: class probabilities, the survival curve, or `[risk]`.
    pub fn outputs(self, logits: &[f64]) -> Vec<f64> {
        match self {
            Head::Classes => {
                let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = logits.iter().map(|z| (z - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.iter().map(|v| v / s).collect()
            }
            Head::Hazards => {
                let mut s = 1.0;
                logits
                    .iter()
                    .map(|z| {
                        s *= 1.0 - 1.0 / (1.0 + (-z).exp());
                        s
                    })
                    .collect()
            }
            Head::Risk => logits.to_vec(),
        }
    }

    /// The risk (higher: an earlier event) that `outputs` say; none for classes.
    pub fn risk(self, outputs: &[f64]) -> Option<f64> {
        match self {
            Head::Classes => None,
            Head::Hazards => Some(-outputs.iter().sum::<f64>()),
            Head::Risk => outputs.first().copied(),
        }
    }
}

/// A slide's (its patient's) follow-up: the time to the event or to the last follow-up, and
/// whether the event was observed (false: censored then).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SurvivalTarget {
    pub time: f64,
    pub event: bool,
}

/// The discrete-time model's time bins, as MCAT and PORPOISE cut them: the `bins`-quantiles of the
/// event times (censored slides left out), linearly interpolated as pandas' `qcut`; the inner cut
/// points are returned (`bins − 1` of them, fewer where quantiles coincide).
pub fn time_bins(targets: &[SurvivalTarget], bins: usize) -> Vec<f64> {
    let mut t: Vec<f64> = targets.iter().filter(|s| s.event).map(|s| s.time).collect();
    t.sort_by(f64::total_cmp);
    if t.is_empty() || bins < 2 {
        return Vec::new();
    }
    let q = |p: f64| {
        let x = p * (t.len() - 1) as f64;
        let (lo, frac) = (x.floor() as usize, x - x.floor());
        if lo + 1 < t.len() {
            t[lo] + frac * (t[lo + 1] - t[lo])
        } else {
            t[lo]
        }
    };
    let mut edges: Vec<f64> = (1..bins).map(|k| q(k as f64 / bins as f64)).collect();
    edges.dedup();
    edges
}

/// The bin of `time` among `edges` (left-closed bins, as pandas' `cut(right=False)`).
pub fn time_bin(edges: &[f64], time: f64) -> usize {
    edges.iter().filter(|e| **e <= time).count()
}

/// A slide of the cohort as the run sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedSlide {
    pub id: SlideId,
    pub path: String,
    /// Index into [`RunPlan::classes`].
    pub label: usize,
    /// Microns per pixel from the manifest, overriding the slide's own.
    pub mpp: Option<f64>,
    /// The slide's lesion mask or GeoJSON annotation (path or URL, [`crate::truth`]): the
    /// instance-level figures of its predictions. Absent from plans without it (same run ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truth: Option<String>,
    /// Its follow-up, in a survival run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub survival: Option<SurvivalTarget>,
    /// Its patient (the manifest's `patient` or `case_id`): a patient's slides share a fold, and
    /// their predictions are pooled into the patient's. Absent from plans without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
}

/// One cross-validation fold: which slides train, validate (early stopping) and test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fold {
    pub train: Vec<SlideId>,
    pub val: Vec<SlideId>,
    pub test: Vec<SlideId>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunPlan {
    pub run: RunId,
    pub classes: Vec<String>,
    pub slides: Vec<PlannedSlide>,
    pub folds: Vec<Fold>,
    pub tiling: TilingSpec,
    pub embedder: EmbedderSpec,
    pub train: TrainConfig,
    /// Features imported with `wsimil import-bags` under this name: the run trains on them and
    /// has no tile or embed stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported: Option<EmbedderId>,
    /// ICMIL rounds after round 0 (none: the run ends after round 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmil: Option<IcmilConfig>,
    /// Classification (absent from its plans, which keep their ids) or survival.
    #[serde(default, skip_serializing_if = "Task::is_classification")]
    pub task: Task,
}

/// ICMIL fine-tuning rounds (Wang et al., MICCAI 2023): after round r's bag classifier is trained,
/// it teaches a copy of round r's embedder at the patch level; the result re-embeds every slide and
/// the classifier is retrained as round r+1. Each fold is its own lineage (its classifier teaches
/// its embedder from its own training slides only), so no test slide's label ever reaches an
/// embedder that is evaluated on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IcmilConfig {
    /// Rounds after round 0.
    pub rounds: u32,
    /// Fine-tuning shards per fold (one job each, on any worker); the fold's new embedder is the
    /// patch-count-weighted average of the shards' results.
    pub shards: u32,
    /// Passes over a shard's patches.
    pub epochs: usize,
    /// Adam's learning rate (the paper: 1e-5).
    pub lr: f64,
    /// Patches per fine-tuning step (BatchNorm needs at least 2).
    pub batch_size: usize,
    /// At most this many patches per training slide, drawn at random (0 = all, as the paper). Patch
    /// pixels are read from the slide batch by batch, never held for the whole shard.
    pub patches_per_slide: usize,
    /// Confidence exponent β in |2·minmax(attention) − 1|^β.
    pub beta: f64,
    /// Fine-tune the last this many blocks of the embedder (0 = the whole network, as the paper).
    pub trainable_blocks: usize,
    /// The recipe (docs/icmil.md): the authors' code, or wsimil's first one. Plans written before
    /// this field existed ran the first one, and keep their run ids.
    #[serde(default = "IcmilMethod::first", skip_serializing_if = "IcmilMethod::is_first")]
    pub method: IcmilMethod,
    /// A class whose slides hold no lesion (`--icmil-negative-class`, e.g. CAMELYON16's normal):
    /// every patch of a training slide of that class is taught that class outright, not the
    /// teacher's soft guess (docs/icmil.md). Absent from plans without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_class: Option<String>,
    /// Each student view's colour channels scaled by their own factor in `[1 − s, 1 + s]`
    /// (`--icmil-stain-jitter`; 0, the authors' and the default, for none). Absent from plans
    /// without it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stain_jitter: f64,
    /// On every training slide not of the negative class, the teacher's `top_k` patches most
    /// likely of the slide's own class are always among those drawn and are taught that class
    /// outright (`--icmil-top-k`; CLAM's in-class top-k): the teacher's ranking of patches, not its
    /// nearly flat probabilities (docs/icmil.md). 0, the authors' and the default, for none; absent
    /// from plans without it.
    #[serde(default, skip_serializing_if = "is_zero_usize")]
    pub top_k: usize,
}

fn is_zero_usize(x: &usize) -> bool {
    *x == 0
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// How a fine-tuning round weighs patches and what its loss pulls on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum IcmilMethod {
    /// As the authors' code (Dootmaan/ICMIL, its confidence-based branch): a patch's confidence is
    /// `|2·minmax(a) − 1|^β` over the raw attention scores of the batch it is drawn in (patches of
    /// every training slide, shuffled), weighting only the distillation of the student embedder's
    /// view into the pseudo-label; the student's heads are kept consistent with the teacher's on the
    /// teacher's own features (which does not reach the embedder); the next round's classifier is
    /// trained from the same initialisation.
    Paper,
    /// wsimil's first recipe, kept to compare: confidence from the softmax attention min-maxed per
    /// slide, zero-confidence patches left out, and all three loss terms on the student's features.
    First,
}

impl IcmilMethod {
    /// The recipe's own batch size, patches per slide (0 = all) and confidence exponent β: the
    /// authors' 100, every patch, 6; the first recipe's 16, 256, 1.
    pub fn defaults(self) -> (usize, usize, f64) {
        match self {
            IcmilMethod::Paper => (100, 0, 6.0),
            IcmilMethod::First => (16, 256, 1.0),
        }
    }

    pub fn first() -> Self {
        IcmilMethod::First
    }
    pub fn is_first(&self) -> bool {
        *self == IcmilMethod::First
    }
}

impl Default for IcmilConfig {
    /// The authors' settings (Adam at 1e-5, batches of 100, every patch of the training slides,
    /// β = 6, the whole network), one round.
    fn default() -> Self {
        let (batch_size, patches_per_slide, beta) = IcmilMethod::Paper.defaults();
        IcmilConfig {
            rounds: 1,
            shards: 2,
            epochs: 1,
            lr: 1e-5,
            batch_size,
            patches_per_slide,
            beta,
            trainable_blocks: 0,
            method: IcmilMethod::Paper,
            negative_class: None,
            stain_jitter: 0.0,
            top_k: 0,
        }
    }
}

/// The tiling id under which imported features are stored.
pub const IMPORTED_TILING: &str = "imported";

impl RunPlan {
    /// Where the run's features are: `features/<embedder>/<tiling>/`.
    pub fn feature_ids(&self) -> (EmbedderId, TilingId) {
        match &self.imported {
            Some(name) => (name.clone(), TilingId::new(IMPORTED_TILING).expect("safe")),
            None => (self.embedder.id(), self.tiling.id()),
        }
    }

    pub fn slide(&self, id: &SlideId) -> Option<&PlannedSlide> {
        self.slides.iter().find(|s| &s.id == id)
    }

    /// Where fold `fold`'s features of `round` are: round 0's are the run's own (or imported);
    /// an ICMIL round's come from the fold's fine-tuned embedder (see [`RunPlan::fold_embedder`]).
    pub async fn round_feature_ids(
        &self,
        store: &Store,
        round: u32,
        fold: u32,
    ) -> Result<(EmbedderId, TilingId), StoreError> {
        if round == 0 {
            return Ok(self.feature_ids());
        }
        Ok((self.fold_embedder(store, round, fold).await?.id(), self.tiling.id()))
    }

    /// The embedder of fold `fold` in `round`: the run's in round 0, else the one ICMIL's merge
    /// recorded (an error naming the key while that round's fine-tuning is not merged).
    pub async fn fold_embedder(&self, store: &Store, round: u32, fold: u32) -> Result<EmbedderSpec, StoreError> {
        if round == 0 {
            return Ok(self.embedder.clone());
        }
        store.get_json(&layout::fold_embedder(&self.run, round, fold)).await
    }

    /// The bag model's outputs (see [`Task::outputs`]).
    /// Whether any slide names its patient.
    pub fn has_patients(&self) -> bool {
        self.slides.iter().any(|s| s.patient.is_some())
    }

    /// `slides` (ids of this plan's slides) grouped by patient, in the order patients first appear:
    /// each group's positions in `slides`. A slide without a patient, or not in the plan, is a
    /// patient of its own.
    pub fn patient_groups(&self, slides: &[&str]) -> Vec<Vec<usize>> {
        let patient: std::collections::HashMap<&str, &str> =
            self.slides.iter().filter_map(|s| Some((s.id.as_str(), s.patient.as_deref()?))).collect();
        group_by_patient(slides, |s| patient.get(s).copied())
    }

    pub fn outputs(&self) -> usize {
        self.task.outputs(self.classes.len())
    }

    /// The bag model this run trains on `in_dim`-wide features: its settings' model with the
    /// task's outputs (TransMIL's instance head only where there are classes to learn).
    pub fn bag_model(&self, in_dim: usize) -> crate::models::BagModelConfig {
        let head = self.train.transmil_instance_head && self.task == Task::Classification;
        self.train.bag_model(in_dim, self.outputs()).with_transmil_instance_head(head)
    }

    /// The follow-up of each slide, by id (empty outside survival runs).
    pub fn survival_targets(&self) -> std::collections::HashMap<String, SurvivalTarget> {
        self.slides.iter().filter_map(|s| Some((s.id.to_string(), s.survival?))).collect()
    }

    /// ICMIL rounds after round 0.
    pub fn icmil_rounds(&self) -> u32 {
        self.icmil.as_ref().map_or(0, |c| c.rounds)
    }

    /// The training slides fine-tuning shard `shard` of `shards` of fold `fold` learns from: every
    /// `shards`-th slide of the fold's training set.
    pub fn shard_slides(&self, fold: usize, shard: u32, shards: u32) -> Vec<SlideId> {
        let Some(f) = self.folds.get(fold) else { return Vec::new() };
        f.train.iter().skip(shard as usize).step_by(shards.max(1) as usize).cloned().collect()
    }

    /// The fold whose test set holds `id`.
    pub fn test_fold_of(&self, id: &SlideId) -> Option<u32> {
        self.folds.iter().position(|f| f.test.contains(id)).map(|k| k as u32)
    }
}

/// `slides` grouped by `patient_of` (none: a patient of its own), in the order patients first
/// appear: each group's positions in `slides`.
pub fn group_by_patient<'p>(slides: &[&str], patient_of: impl Fn(&str) -> Option<&'p str>) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, slide) in slides.iter().enumerate() {
        match patient_of(slide) {
            Some(p) => match index.get(p) {
                Some(&g) => groups[g].push(i),
                None => {
                    index.insert(p, groups.len());
                    groups.push(vec![i]);
                }
            },
            None => groups.push(vec![i]),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slides_group_by_patient_in_order_and_a_slide_without_one_stands_alone() {
        let patient = |s: &str| match s {
            "a1" | "a2" => Some("A"),
            "b1" => Some("B"),
            _ => None,
        };
        let groups = group_by_patient(&["a1", "x", "b1", "a2", "y"], patient);
        assert_eq!(groups, vec![vec![0, 3], vec![1], vec![2], vec![4]]);
        assert!(group_by_patient(&[], patient).is_empty());
    }

    /// The bins as pandas' `qcut` of the event times cuts them (numpy's linear quantiles), censored
    /// slides left out; times on an edge go to the upper bin (`cut(right=False)`).
    #[test]
    fn time_bins_are_the_quantiles_of_the_event_times() {
        let t = |time: f64, event: bool| SurvivalTarget { time, event };
        // pandas.qcut([1, 2, ..., 8], 4, retbins=True)[1][1:-1] == [2.75, 4.5, 6.25]
        let mut cohort: Vec<SurvivalTarget> = (1..=8).map(|v| t(v as f64, true)).collect();
        cohort.push(t(0.5, false));
        cohort.push(t(100.0, false));
        let edges = time_bins(&cohort, 4);
        assert_eq!(edges, vec![2.75, 4.5, 6.25]);
        let bins: Vec<usize> = [0.5, 2.75, 3.0, 4.5, 6.24, 6.25, 100.0].iter().map(|&x| time_bin(&edges, x)).collect();
        assert_eq!(bins, vec![0, 1, 1, 2, 2, 3, 3]);
        assert!(time_bins(&[t(3.0, false)], 4).is_empty(), "no events, no edges");
    }

    #[test]
    fn heads_read_logits_as_probabilities_a_survival_curve_or_a_risk() {
        let p = Head::Classes.outputs(&[0.0, (3f64).ln()]);
        assert!((p[0] - 0.25).abs() < 1e-12 && (p[1] - 0.75).abs() < 1e-12, "{p:?}");
        assert_eq!(Head::Classes.risk(&p), None);
        // Hazards 1/2 and 1/4: survival 1/2, then 3/8; the risk is minus their sum.
        let s = Head::Hazards.outputs(&[0.0, -(3f64).ln()]);
        assert!((s[0] - 0.5).abs() < 1e-12 && (s[1] - 0.375).abs() < 1e-12, "{s:?}");
        assert!((Head::Hazards.risk(&s).unwrap() + 0.875).abs() < 1e-12);
        assert_eq!(Head::Risk.risk(&Head::Risk.outputs(&[1.5])), Some(1.5));
    }

    #[test]
    fn a_task_says_its_outputs_and_head_and_reads_back() {
        assert_eq!(Task::Classification.outputs(3), 3);
        let nll = Task::Survival(SurvivalConfig::default());
        assert_eq!((nll.outputs(2), nll.head()), (4, Head::Hazards));
        let cox = Task::Survival(SurvivalConfig { loss: SurvivalLoss::Cox, ..SurvivalConfig::default() });
        assert_eq!((cox.outputs(2), cox.head()), (1, Head::Risk));
        let json = serde_json::to_value(cox).unwrap();
        assert_eq!(json["kind"], "survival");
        assert_eq!(json["loss"], "cox");
        assert_eq!(serde_json::from_value::<Task>(json).unwrap(), cox);
    }

    /// Each kind of weights is written as the one string plans have always held (so embedder ids
    /// and stored plans are unchanged) and reads back as the same kind.
    #[test]
    fn weights_are_written_as_plans_always_held_them_and_read_back_typed() {
        let sha = "0123456789abcdef".repeat(4);
        let cases = [
            (WeightsRef::Random(7), "random-7".to_string()),
            (WeightsRef::Sha256(sha.clone()), sha.clone()),
            (WeightsRef::Imported("tcga-uni".into()), "tcga-uni".to_string()),
            // Not a seed, not a SHA-256: names.
            (WeightsRef::Imported("random-x".into()), "random-x".to_string()),
            (WeightsRef::Imported("random-07".into()), "random-07".to_string()),
            (WeightsRef::Imported(sha.to_uppercase()), sha.to_uppercase()),
        ];
        for (w, text) in cases {
            let json = serde_json::to_string(&w).unwrap();
            assert_eq!(json, format!("{text:?}"));
            assert_eq!(serde_json::from_str::<WeightsRef>(&json).unwrap(), w, "{text}");
        }
        assert_eq!((WeightsRef::Random(7).seed(), WeightsRef::Random(7).sha256()), (Some(7), None));
        assert_eq!(WeightsRef::Sha256(sha.clone()).sha256(), Some(sha.as_str()));
        assert!(WeightsRef::Sha256(sha).stored() && !WeightsRef::Random(1).stored());
        let spec = EmbedderSpec {
            architecture: Architecture::EfficientNetLite0,
            weights: WeightsRef::Random(3),
            batch_size: 8,
            corrupt_tiles: CorruptTiles::Skip,
        };
        assert!(spec.id().as_str().ends_with("-random-3"), "{}", spec.id());
    }
}
