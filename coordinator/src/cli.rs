//! The `wsimil` command line: flags are parsed by clap into raw structs, then turned once into
//! checked settings ([`RunArgs::settings`]) that the library runs with.

use crate::dispatch::LocalDispatcher;
use crate::planner::FoldSettings;
use crate::run::{self, EmbedderChoice, RunSettings, Weights};
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use wsimil_common::grid::{TissueParams, TissuePreset};
use wsimil_common::ids::{EmbedderId, RunId};
use wsimil_common::job::JobKind;
use wsimil_common::models::optim::OptimizerKind;
use wsimil_common::models::zoo::Architecture;
use wsimil_common::models::BagModelKind;
use wsimil_common::nats::{NatsOptions, Queue, QueueSettings};
use wsimil_common::plan::{
    CorruptTiles, IcmilConfig, IcmilMethod, SurvivalConfig, SurvivalLoss, Task, TilingSpec, TrainConfig,
};
use wsimil_common::store::{S3Options, Store};
use wsimil_worker::bags::{BagBudget, BagPrecision};
use wsimil_worker::device::{BatchChoice, Compute, DeviceChoice, Precision};
use wsimil_worker::error::RetryPolicy;
use wsimil_worker::jobs::WorkerContext;
use wsimil_worker::slide::remote::{Scratch, SlideSources};

#[derive(Debug, Parser)]
#[command(
    name = "wsimil",
    version,
    about = "Whole-slide images to slide-level diagnoses by weakly supervised multiple-instance learning"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a cohort through tile → embed → train → predict: in this process (embedded mode), or,
    /// with --nats, as the coordinator of a worker pool.
    Run(Box<RunArgs>),
    /// The coordinator of a distributed run (`run` with --nats required).
    Coordinator(Box<RunArgs>),
    /// A worker: pull jobs from NATS JetStream and execute them until SIGTERM, then drain.
    Worker(Box<WorkerArgs>),
    /// Job states in NATS: per-stage counts, running jobs with worker and age, failures.
    Status(StatusArgs),
    /// Queue every failed job again.
    RetryFailed(StatusArgs),
    /// Check a device: its kernels and models against the CPU's, op by op, in a few seconds. Run it
    /// on every new GPU machine before it embeds a cohort.
    CheckDevice(CheckDeviceArgs),
    /// Build the semi-synthetic demo cohort from the real slide and tumour image.
    DemoCohort(DemoCohortArgs),
    /// Import bags of features from a table (label, bag id, features per row; e.g. Musk1) into the
    /// store, with a manifest; then `wsimil run --features NAME --manifest MANIFEST`.
    ImportBags(ImportBagsArgs),
    /// Import CLAM feature files (h5_files/<slide>.h5 or pt_files/<slide>.pt) for the slides of a
    /// CLAM dataset CSV, with a manifest; then `wsimil run --features NAME --manifest MANIFEST`.
    ImportClam(ImportClamArgs),
    /// Apply a trained model to new slides: tile and embed them as the model was trained, score
    /// them (probabilities, attention, heatmaps) and, when the manifest has labels, report metrics
    /// with bootstrap 95% confidence intervals. In this process, or with --nats on the workers.
    Predict(Box<PredictArgs>),
    /// Write a model (a run's, or a model in the store) as a self-contained folder: its classifiers,
    /// its embedders' weights, and a card (classes, architecture, tiling, training, version).
    ExportModel(ExportModelArgs),
    /// Write features as HDF5 files the other MIL codebases read (CLAM, TRIDENT, STAMP, MIL-Lab):
    /// `features` and `coords` per slide with TRIDENT's attributes, in CLAM's `h5_files/` with its
    /// dataset CSV or TRIDENT's `features_<encoder>/`.
    ExportFeatures(ExportFeaturesArgs),
    /// Make a run's (or a `predict` application's) report.html again from what the store holds
    /// (both write it as they end): figures per round, curves, confusion matrix, calibration,
    /// slides ranked worst error first with their heatmaps, and failures.
    Report(ReportArgs),
    /// Make a model folder from a checkpoint trained elsewhere: the official TransMIL code's
    /// (`.pth`/`.ckpt`), CLAM's (CLAM_SB, CLAM_MB) or DSMIL's, with the classes and the embedder its
    /// features came from.
    ImportModel(Box<ImportModelArgs>),
}

#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Where outputs go: a local folder, s3://bucket/prefix, or memory://.
    #[arg(long, env = "WSIMIL_STORE", default_value = "./wsimil-data")]
    pub store: String,
    /// S3 endpoint (MinIO, SeaweedFS); AWS_ENDPOINT otherwise. Credentials come from AWS_* variables.
    #[arg(long, env = "WSIMIL_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region; AWS_REGION otherwise.
    #[arg(long, env = "WSIMIL_S3_REGION")]
    pub s3_region: Option<String>,
    /// Path-style S3 requests (needed by MinIO and most self-hosted servers).
    #[arg(long, env = "WSIMIL_S3_PATH_STYLE")]
    pub s3_path_style: bool,
    /// Retries of a failed S3 request inside the client before the job sees the error (default 10).
    #[arg(long, env = "WSIMIL_S3_MAX_RETRIES")]
    pub s3_max_retries: Option<usize>,
}

impl StoreArgs {
    pub fn open(&self) -> anyhow::Result<Store> {
        Ok(Store::open(&self.store, &self.s3())?)
    }

    /// The S3 settings: the store's, and those slides in buckets are read with.
    pub fn s3(&self) -> S3Options {
        S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            path_style: self.s3_path_style,
            max_retries: self.s3_max_retries,
            credentials: None,
        }
    }
}

/// Where slides in buckets (`s3://` paths in a manifest) are read: tiled-JPEG TIFF/SVS in place by
/// ranged reads; other formats downloaded into a bounded scratch folder for OpenSlide.
#[derive(Debug, Args, Clone)]
pub struct SlideArgs {
    /// Folder for slides that must be downloaded before they are read (OpenSlide formats); this
    /// process keeps its copies in a folder of its own inside it.
    #[arg(long, env = "WSIMIL_SCRATCH")]
    pub scratch: Option<PathBuf>,
    /// Most gigabytes of downloaded slides kept in the scratch folder (least recently used go first).
    #[arg(long, default_value_t = 50.0, env = "WSIMIL_SCRATCH_MAX_GB")]
    pub scratch_max_gb: f64,
}

impl SlideArgs {
    pub fn sources(&self, store: &StoreArgs) -> anyhow::Result<SlideSources> {
        if !(self.scratch_max_gb.is_finite() && self.scratch_max_gb > 0.0) {
            bail!("--scratch-max-gb must be a positive number of gigabytes, not {}", self.scratch_max_gb);
        }
        let dir = self.scratch.clone().unwrap_or_else(std::env::temp_dir);
        if dir.exists() && !dir.is_dir() {
            bail!("--scratch {}: not a folder", dir.display());
        }
        let reader = wsimil_worker::slide::ReaderChoice::from_env()?;
        Ok(SlideSources::new(store.s3(), Scratch::new(dir, (self.scratch_max_gb * 1e9) as u64)).with_reader(reader))
    }
}

#[derive(Args, Clone)]
pub struct NatsArgs {
    /// NATS server URL (distributed mode), e.g. nats://localhost:4222.
    #[arg(long = "nats", env = "WSIMIL_NATS_URL")]
    pub url: Option<String>,
    #[arg(long, env = "WSIMIL_NATS_USER")]
    pub nats_user: Option<String>,
    /// Password (prefer the environment variable: command lines are visible to other users).
    #[arg(long, env = "WSIMIL_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    #[arg(long, env = "WSIMIL_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// NATS credentials file (JWT + NKey).
    #[arg(long, env = "WSIMIL_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// Require TLS.
    #[arg(long, env = "WSIMIL_NATS_TLS")]
    pub nats_tls: bool,
    /// CA certificate (PEM) to trust for the server's TLS certificate.
    #[arg(long, env = "WSIMIL_NATS_CA")]
    pub nats_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for TLS client authentication.
    #[arg(long, env = "WSIMIL_NATS_CERT")]
    pub nats_cert: Option<PathBuf>,
    #[arg(long, env = "WSIMIL_NATS_KEY")]
    pub nats_key: Option<PathBuf>,
    /// Seconds a job may go without a heartbeat before it is redelivered.
    #[arg(long, default_value_t = 60)]
    pub ack_wait: u64,
    /// Deliveries of a job, the first included, before it counts as failed.
    #[arg(long, default_value_t = 5)]
    pub max_deliver: u32,
}

/// Secrets masked.
impl std::fmt::Debug for NatsArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mask = |o: &Option<String>| o.as_ref().map(|_| "***");
        f.debug_struct("NatsArgs")
            .field("url", &self.url)
            .field("nats_user", &self.nats_user)
            .field("nats_password", &mask(&self.nats_password))
            .field("nats_token", &mask(&self.nats_token))
            .field("nats_creds", &self.nats_creds)
            .field("nats_tls", &self.nats_tls)
            .finish_non_exhaustive()
    }
}

impl NatsArgs {
    pub fn options(&self, name: &str) -> anyhow::Result<NatsOptions> {
        let url = self.url.clone().context("--nats URL is needed (or WSIMIL_NATS_URL)")?;
        Ok(NatsOptions {
            url,
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            token: self.nats_token.clone(),
            creds_file: self.nats_creds.clone(),
            tls: self.nats_tls,
            tls_ca: self.nats_ca.clone(),
            tls_cert: self.nats_cert.clone(),
            tls_key: self.nats_key.clone(),
            name: name.to_string(),
        })
    }

    pub fn settings(&self) -> QueueSettings {
        QueueSettings { ack_wait: Duration::from_secs(self.ack_wait.max(1)), max_deliver: self.max_deliver.max(1) }
    }

    /// Connect and open the job queue.
    pub async fn open(&self, name: &str) -> anyhow::Result<(async_nats::Client, Arc<Queue>)> {
        let client = wsimil_common::nats::connect(&self.options(name)?).await?;
        let queue = Queue::open(client.clone(), self.settings()).await?;
        Ok((client, Arc::new(queue)))
    }
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Job kinds this worker serves (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "tile,embed,train,predict,finetune,score",
        env = "WSIMIL_KINDS"
    )]
    pub kinds: Vec<JobKind>,
    /// Jobs run at once.
    #[arg(long, default_value_t = 1, env = "WSIMIL_CONCURRENCY")]
    pub concurrency: usize,
    /// Name shown by `status` (default: host name and process id).
    #[arg(long, env = "WSIMIL_WORKER_NAME")]
    pub name: Option<String>,
    /// Seconds before the first retry of a transient failure (doubles each time).
    #[arg(long, default_value_t = 2)]
    pub backoff: u64,
    /// Acknowledge jobs without doing them (for benchmarking the queue only).
    #[arg(long, hide = true)]
    pub noop: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub slides: SlideArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// This process's live counts for Prometheus (`wsimil_common::telemetry`).
#[derive(Debug, Args, Clone, Default)]
pub struct TelemetryArgs {
    /// Serve jobs started, done and failed, patches and seconds per stage on
    /// http://HOST:PORT/metrics in Prometheus' text format (off unless given).
    #[arg(long, env = "WSIMIL_METRICS_ADDR", value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
}

impl TelemetryArgs {
    /// Start the endpoint if asked; an address that cannot be bound is an error before any work.
    pub async fn start(&self) -> anyhow::Result<()> {
        if let Some(addr) = &self.metrics_addr {
            let bound = wsimil_common::telemetry::serve(addr)
                .await
                .with_context(|| format!("--metrics-addr {addr}: cannot listen there"))?;
            eprintln!("metrics: http://{bound}/metrics");
        }
        Ok(())
    }
}

/// Where this process's networks run (a worker's, or the embedded run's).
#[derive(Debug, Args, Clone)]
pub struct ComputeArgs {
    /// auto (the first GPU of a CUDA build if one opens, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", env = "WSIMIL_DEVICE")]
    pub device: DeviceChoice,
    /// The embedders' precision: auto is bf16 on a GPU, f32 on the CPU.
    #[arg(long, value_enum, default_value_t = Precision::Auto, env = "WSIMIL_PRECISION")]
    pub precision: Precision,
    /// Patches per embedding pass here: plan (the run's --batch-size), a number, or auto (the
    /// fastest that fits, measured on the GPU; the plan's on the CPU).
    #[arg(long, default_value = "plan", env = "WSIMIL_EMBED_BATCH")]
    pub embed_batch: BatchChoice,
    /// Memory for feature bags, in GB, all jobs of this process together (training, scoring,
    /// ICMIL teachers): bags beyond it are read from the store again as the steps need them,
    /// read ahead; what fits stays in memory across epochs. Results do not depend on it.
    /// Default: half of this machine's memory (or of its container's limit).
    #[arg(long, env = "WSIMIL_BAG_CACHE_GB", value_parser = positive_gb)]
    pub bag_cache_gb: Option<f64>,
    /// How bags are held in memory: f32 as stored, or f16 (half the memory; the model reads the
    /// features rounded to f16, so figures may move in their last digits).
    #[arg(long, value_enum, default_value_t = BagPrecision::F32, env = "WSIMIL_BAG_PRECISION")]
    pub bag_precision: BagPrecision,
}

fn positive_gb(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of gigabytes")),
    }
}

impl ComputeArgs {
    pub fn open(&self) -> anyhow::Result<Compute> {
        let c = Compute::open(self.device, self.precision, self.embed_batch).map_err(anyhow::Error::msg)?;
        eprintln!("wsimil: computing on {}", c.describe());
        Ok(c)
    }

    /// The bag budget these settings give (the machine's default where none is set).
    pub fn bag_budget(&self) -> BagBudget {
        match self.bag_cache_gb {
            Some(gb) => BagBudget::gb(gb, self.bag_precision),
            None => BagBudget { precision: self.bag_precision, ..BagBudget::machine_default() },
        }
    }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Only jobs whose id mentions this run (train and predict jobs).
    #[arg(long)]
    pub run: Option<String>,
}

/// How slides are tiled: `run`, and `import-model` (how the checkpoint's features were made).
#[derive(Debug, Args, Clone)]
pub struct TilingArgs {
    /// Patch side in pixels at the target resolution [default: 256, or the embedder's (the ViT
    /// presets': docs/encoders.md)].
    #[arg(long)]
    pub patch_px: Option<u32>,
    /// Target resolution in µm per pixel (0.5 ≈ 20x, 0.25 ≈ 40x) [default: 0.5, or the embedder's].
    #[arg(long)]
    pub target_mpp: Option<f64>,
    /// Tissue detection preset (CLAM's).
    #[arg(long, value_enum, default_value_t = TissuePreset::Tcga)]
    pub tissue_preset: TissuePreset,
    /// Saturation threshold: otsu, or a number 0-255 (the presets' own is 8).
    #[arg(long, default_value = "otsu")]
    pub tissue_threshold: Threshold,
    /// Minimum tissue fraction of a kept patch.
    #[arg(long, default_value_t = 0.25)]
    pub min_tissue: f32,
}

impl TilingArgs {
    /// The tiling for `embedder`: the flags, else the embedder's own patch size and resolution
    /// (CLAM's 256 px at 0.5 µm/px for the CNNs).
    pub fn spec(&self, embedder: &Architecture) -> anyhow::Result<TilingSpec> {
        let (hint_px, hint_mpp) = embedder.tiling_hint().unwrap_or((256, 0.5));
        let (patch_px, target_mpp) = (self.patch_px.unwrap_or(hint_px), self.target_mpp.unwrap_or(hint_mpp));
        if patch_px == 0 || !(target_mpp > 0.0 && target_mpp.is_finite()) {
            bail!("--patch-px and --target-mpp must be positive");
        }
        if !(0.0..=1.0).contains(&self.min_tissue) {
            bail!("--min-tissue {} is not a fraction between 0 and 1", self.min_tissue);
        }
        Ok(TilingSpec {
            patch_px,
            target_mpp,
            step_fraction: 1.0,
            min_tissue_fraction: self.min_tissue,
            tissue: TissueParams { threshold: self.tissue_threshold.0, ..TissueParams::preset(self.tissue_preset) },
        })
    }
}

/// The patch embedder and its weights: `run`, and `import-model` (the checkpoint's embedder).
#[derive(Debug, Args, Clone)]
pub struct EmbedderArgs {
    /// Patch embedder: efficientnet-lite0 (the CPU default), resnet50-trunc, a pathology foundation
    /// model (uni, uni2-h, virchow, virchow2, h-optimus-0, h-optimus-1, h0-mini, gigapath-tile,
    /// gpfm, phikon, phikon-v2, conch-vision, kaiko-vits8, kaiko-vits16, kaiko-vitb8,
    /// kaiko-vitb16, kaiko-vitl14, lunit-vits8, midnight-12k, openmidnight, hibou-l, conch-v1.5;
    /// or by TRIDENT's names uni_v1, uni_v2, hoptimus0, hoptimus1, gigapath, phikon_v2, conch_v1,
    /// conch_v15, midnight12k, hibou_l), or
    /// vit:<timm-name>[.<tag>] (prepared as timm prepares that tag) or
    /// vit:<timm-name>@imagenet|uniform|openai-clip|R,G,B/R,G,B for weights from elsewhere
    /// (docs/encoders.md).
    #[arg(long, default_value = "efficientnet-lite0")]
    pub embedder: Architecture,
    /// Embedder weights as the publisher ships them: safetensors, or PyTorch's zip `.bin`/`.pth`
    /// state dict. Default for efficientnet-lite0: the fetched ImageNet weights.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Use seeded random embedder weights instead (smoke tests).
    #[arg(long, conflicts_with = "weights")]
    pub random_weights: Option<u64>,
    /// Patches per embedder forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// A corrupt tile inside a readable slide: skip the patches on it (counted in the features'
    /// provenance) or fail the slide.
    #[arg(long, value_enum, default_value_t = CorruptTiles::Skip)]
    pub on_corrupt_tile: CorruptTiles,
}

impl EmbedderArgs {
    /// The embedder with its weights: the file, the seed, or (EfficientNet-Lite0) the fetched
    /// ImageNet weights; a missing file is said with what to pass.
    pub fn choice(&self) -> anyhow::Result<EmbedderChoice> {
        let weights = match (&self.weights, self.random_weights) {
            (_, Some(seed)) => Weights::Random(seed),
            (Some(p), None) => Weights::File(p.clone()),
            (None, None) if self.embedder == Architecture::EfficientNetLite0 => {
                let p = wsimil_common::data_dir().join("efficientnet-lite0.safetensors");
                if !p.is_file() {
                    bail!(
                        "no EfficientNet-Lite0 weights at {}: run scripts/fetch-data.sh, or pass --weights",
                        p.display()
                    );
                }
                Weights::File(p)
            }
            (None, None) => match &self.embedder {
                Architecture::Vit(p) => bail!(
                    "--embedder {} needs --weights FILE, the file its publisher ships: {} (or --random-weights SEED)",
                    self.embedder,
                    p.spec().weights
                ),
                _ => bail!(
                    "--embedder {} needs --weights FILE (safetensors, or PyTorch's .bin/.pth; or --random-weights SEED)",
                    self.embedder
                ),
            },
        };
        Ok(EmbedderChoice {
            architecture: self.embedder.clone(),
            weights,
            batch_size: self.batch_size.max(1),
            corrupt_tiles: self.on_corrupt_tile,
        })
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// Where the embedded run computes (ignored with --nats: the workers choose).
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub slides: SlideArgs,
    /// Cohort CSV: slide_id,path,label[,fold|split][,mpp]. Relative paths are relative to it;
    /// paths may be s3://bucket/key (read with the store's S3 settings).
    #[arg(long)]
    pub manifest: PathBuf,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Name of the run (default: derived from the cohort and settings, so re-running resumes).
    #[arg(long)]
    pub run: Option<String>,
    /// Class names in order (comma-separated); other labels are errors. Default: sorted labels.
    #[arg(long, value_delimiter = ',')]
    pub classes: Option<Vec<String>>,
    /// Cross-validation folds when the manifest gives no fold or split column.
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
    /// Folds from CLAM's split files: a folder of splits_<k>.csv (train,val,test columns of ids).
    #[arg(long)]
    pub clam_splits: Option<PathBuf>,
    /// Seed of fold assignment, initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seed of the classifier's initialisation and shuffling alone (default: --seed), to see how
    /// much results move with training noise on the same folds.
    #[arg(long)]
    pub train_seed: Option<u64>,

    #[command(flatten)]
    pub tiling: TilingArgs,
    #[command(flatten)]
    pub embedder: EmbedderArgs,

    /// Train on features imported under this name (`wsimil import-bags`): no tiling or embedding.
    #[arg(long)]
    pub features: Option<String>,

    /// Bag classifier.
    #[arg(long, value_enum, default_value_t = BagModelKind::Transmil)]
    pub model: BagModelKind,
    /// Optimizer (lookahead-radam is the TransMIL paper's).
    #[arg(long, value_enum, default_value_t = OptimizerKind::LookaheadRadam)]
    pub optimizer: OptimizerKind,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-5)]
    pub weight_decay: f64,
    /// Most epochs per fold.
    #[arg(long, default_value_t = 50)]
    pub epochs: usize,
    /// Early stopping: epochs without a better validation loss.
    #[arg(long, default_value_t = 10)]
    pub patience: usize,
    /// TransMIL's Nyström landmarks (the paper's 256; fewer are much faster on a CPU).
    #[arg(long, default_value_t = 256)]
    pub landmarks: usize,
    /// Bags per optimizer step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    pub grad_accumulation: usize,
    /// Training bags larger than this are randomly subsampled (0 = never).
    #[arg(long, default_value_t = 0)]
    pub max_train_instances: usize,
    /// CLAM's subtyping mode (`--model clam-sb|clam-mb`, classes that are all tumour subtypes):
    /// every other class's most attended patches are taught "not this class" too.
    #[arg(long)]
    pub clam_subtyping: bool,
    /// What DTFD-MIL's pseudo-bags hand its second tier (`--model dtfd`): afs, their attention-pooled
    /// features (the authors' default); maxs, their highest-scoring patches; maxmins, their highest
    /// and lowest.
    #[arg(long, value_enum)]
    pub dtfd_distill: Option<wsimil_common::models::dtfd::Distill>,
    /// TransMIL's instance head (`--model transmil`): instance (the default for classification), a
    /// gated-attention head on `_fc1` trained beside the cls token, whose per-patch predictions
    /// are ICMIL's teacher and the run's instance figures; none, the authors' network alone
    /// (survival runs, or to compare). docs/icmil.md says why.
    #[arg(long, value_enum)]
    pub transmil_head: Option<TransmilHead>,
    /// After the cross-validation, train one more model on every slide for the epochs the folds
    /// chose (their median best epoch): the model `wsimil predict --model RUN:final` applies.
    #[arg(long)]
    pub final_model: bool,
    /// Stop after this stage: e.g. tile a cohort and look at the tissue masks before embedding it.
    #[arg(long, value_enum, default_value_t = Until::Predict)]
    pub until: Until,

    /// ICMIL rounds after round 0: each fold's classifier teaches its embedder at the patch level,
    /// every slide is re-embedded and the classifier retrained (0 = none).
    #[arg(long, default_value_t = 0)]
    pub icmil_rounds: u32,
    /// ICMIL: fine-tuning jobs per fold, each on a shard of the fold's training slides; the fold's
    /// new embedder is their patch-weighted average.
    #[arg(long, default_value_t = 2)]
    pub icmil_shards: u32,
    /// ICMIL: passes over a shard's patches.
    #[arg(long, default_value_t = 1)]
    pub icmil_epochs: usize,
    /// ICMIL: Adam learning rate (the paper's 1e-5).
    #[arg(long, default_value_t = 1e-5)]
    pub icmil_lr: f64,
    /// ICMIL: patches per fine-tuning step [default: the method's: paper 100, first 16].
    #[arg(long)]
    pub icmil_batch_size: Option<usize>,
    /// ICMIL: at most this many patches per training slide, drawn at random (0 = all). Pixels are
    /// read batch by batch, so this bounds time, not memory [default: paper 0, first 256].
    #[arg(long)]
    pub icmil_patches_per_slide: Option<usize>,
    /// ICMIL: confidence exponent β of |2·minmax(attention) − 1|^β [default: paper 6, first 1].
    #[arg(long)]
    pub icmil_beta: Option<f64>,
    /// ICMIL: the recipe. paper: the authors' code (confidence min-maxed over each batch of raw
    /// attention scores, only the student's view distilled into the embedder, Adam with weight
    /// decay, the next classifier from the same initialisation); first: wsimil's first recipe, kept
    /// to compare (docs/icmil.md).
    #[arg(long, value_enum, default_value_t = IcmilMethod::Paper)]
    pub icmil_method: IcmilMethod,
    /// ICMIL: fine-tune only the embedder's last N blocks (0 = the whole network, as the paper).
    #[arg(long, default_value_t = 0)]
    pub icmil_trainable_blocks: usize,
    /// ICMIL: a class whose slides hold no lesion (e.g. normal in tumour-vs-normal): the patches of
    /// its training slides are taught that class outright instead of the teacher's soft guess
    /// (docs/icmil.md). Not for subtyping, where every class has its own tissue.
    #[arg(long, value_name = "CLASS")]
    pub icmil_negative_class: Option<String>,
    /// ICMIL: scale each colour channel of every student view by its own factor in [1-S, 1+S]
    /// (0, the authors', for none): stain and scanner differences between sites, which the embedder
    /// should not learn as a lesion (docs/icmil.md).
    #[arg(long, value_name = "S", default_value_t = 0.0)]
    pub icmil_stain_jitter: f64,
    /// ICMIL: on each training slide not of the negative class, the K patches the teacher finds
    /// most likely of the slide's class are always drawn and taught that class outright, as CLAM's
    /// top-k (0 for none): its ranking of patches rather than its flat probabilities (docs/icmil.md).
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub icmil_top_k: usize,

    /// What to learn: the manifest's classes, or survival from its follow-up columns (time,event;
    /// or TCGA's vital_status,days_to_death,days_to_last_follow_up; docs/survival.md).
    #[arg(long, value_enum, default_value_t = TaskKind::Classification)]
    pub task: TaskKind,
    /// Survival: the discrete-time NLL over time bins (MCAT, PORPOISE; one bag a step) or the Cox
    /// partial likelihood over batches of bags.
    #[arg(long, value_enum, default_value_t = SurvivalLoss::Nll)]
    pub survival_loss: SurvivalLoss,
    /// Survival, nll: time bins (quantiles of the training slides' event times).
    #[arg(long, default_value_t = 4)]
    pub survival_bins: usize,
    /// Survival, nll: extra weight on the uncensored slides' term (MCAT's alpha_surv).
    #[arg(long, default_value_t = 0.0)]
    pub survival_alpha: f64,
    /// Survival, cox: bags per step (the partial likelihood's risk sets are taken within it).
    #[arg(long, default_value_t = 32)]
    pub cox_batch: usize,
}

/// `--task`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TaskKind {
    Classification,
    Survival,
}

/// `--transmil-head`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransmilHead {
    /// wsimil's gated-attention instance head beside the authors' network.
    Instance,
    /// The authors' network alone.
    None,
}

/// `--until`: the stages of round 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Until {
    Tile,
    Embed,
    Train,
    Predict,
}

impl Until {
    pub fn stage(self) -> JobKind {
        match self {
            Until::Tile => JobKind::Tile,
            Until::Embed => JobKind::Embed,
            Until::Train => JobKind::Train,
            Until::Predict => JobKind::Predict,
        }
    }
}

/// `--tissue-threshold`: Otsu's, or a fixed saturation threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold(pub Option<u8>);

impl std::str::FromStr for Threshold {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "otsu" => Ok(Threshold(None)),
            n => n.parse::<u8>().map(|v| Threshold(Some(v))).map_err(|_| format!("{n:?}: otsu or 0-255")),
        }
    }
}

impl RunArgs {
    /// Check the flags and turn them into run settings.
    pub fn settings(&self) -> anyhow::Result<RunSettings> {
        let tiling = self.tiling.spec(&self.embedder.embedder)?;
        if self.final_model && self.until != Until::Predict {
            bail!(
                "--final-model is trained after the cross-validation's predictions: it cannot be made by a run that \
                 stops at --until {}",
                self.until.stage().as_str()
            );
        }
        let embedder = self.embedder.choice()?;
        Ok(RunSettings {
            s3: self.store.s3(),
            manifest: self.manifest.clone(),
            classes: self.classes.clone(),
            run: self.run.as_deref().map(RunId::new).transpose().context("--run")?,
            tiling,
            embedder,
            train: TrainConfig {
                model: self.model,
                optimizer: self.optimizer,
                lr: self.lr,
                weight_decay: self.weight_decay,
                max_epochs: self.epochs,
                patience: self.patience,
                grad_accumulation: self.grad_accumulation.max(1),
                max_train_instances: self.max_train_instances,
                landmarks: self.landmarks.max(1),
                seed: self.train_seed.unwrap_or(self.seed),
                clam_subtyping: self.clam_subtyping,
                dtfd_distill: self.dtfd_distill,
                transmil_instance_head: self.model == BagModelKind::Transmil
                    && self.task == TaskKind::Classification
                    && self.transmil_head != Some(TransmilHead::None),
                ..TrainConfig::default()
            },
            folds: FoldSettings { k: self.folds.max(1), seed: self.seed },
            imported: self.features.as_deref().map(EmbedderId::new).transpose().context("--features")?,
            clam_splits: self.clam_splits.clone(),
            icmil: self.icmil()?,
            task: self.task()?,
        })
    }

    fn task(&self) -> anyhow::Result<Task> {
        if self.clam_subtyping && !matches!(self.model, BagModelKind::ClamSb | BagModelKind::ClamMb) {
            bail!("--clam-subtyping is CLAM's (--model clam-sb or clam-mb), not {}'s", self.model);
        }
        if self.dtfd_distill.is_some() && self.model != BagModelKind::Dtfd {
            bail!("--dtfd-distill is DTFD-MIL's (--model dtfd), not {}'s", self.model);
        }
        if self.transmil_head.is_some() && self.model != BagModelKind::Transmil {
            bail!("--transmil-head is TransMIL's (--model transmil), not {}'s", self.model);
        }
        if self.task == TaskKind::Classification {
            if self.icmil_rounds > 0 && self.transmil_head == Some(TransmilHead::None) {
                bail!(
                    "ICMIL rounds distil the classifier's patch predictions, and TransMIL without its instance head \
                     (--transmil-head none) has none worth distilling (docs/icmil.md): drop --transmil-head none"
                );
            }
            return Ok(Task::Classification);
        }
        if self.transmil_head == Some(TransmilHead::Instance) {
            bail!("--transmil-head instance learns the slides' classes from their patches; a survival run has none");
        }
        if self.clam_subtyping {
            bail!("--clam-subtyping teaches patches classes; a survival run has none");
        }
        if self.survival_loss == SurvivalLoss::Nll && self.survival_bins < 2 {
            bail!("--survival-bins must be at least 2");
        }
        if !(0.0..=1.0).contains(&self.survival_alpha) {
            bail!("--survival-alpha must lie in [0, 1]");
        }
        if self.survival_loss == SurvivalLoss::Cox && self.cox_batch < 2 {
            bail!("--cox-batch must be at least 2 (a risk set of one bag compares nothing)");
        }
        if self.classes.is_some() {
            bail!("--classes names classes; a survival run has none (its slides' follow-up is what it learns)");
        }
        if self.icmil_rounds > 0 {
            bail!("ICMIL rounds distil a classifier's patch pseudo-labels; a survival model has no classes to teach");
        }
        if self.model == BagModelKind::Dsmil {
            bail!(
                "--model dsmil scores classes (its max-pooling stream looks for a positive instance); \
                 a survival run takes transmil, abmil, clam-sb or clam-mb"
            );
        }
        if self.model == BagModelKind::Dtfd {
            bail!(
                "--model dtfd scores classes (each pseudo-bag is taught the slide's class, and what it \
                 distils is ranked by the last class); a survival run takes transmil, abmil, clam-sb or clam-mb"
            );
        }
        Ok(Task::Survival(SurvivalConfig {
            loss: self.survival_loss,
            bins: self.survival_bins,
            alpha: self.survival_alpha,
            batch: self.cox_batch,
        }))
    }

    fn icmil(&self) -> anyhow::Result<Option<IcmilConfig>> {
        if self.icmil_rounds == 0 {
            if self.icmil_negative_class.is_some() || self.icmil_stain_jitter != 0.0 || self.icmil_top_k != 0 {
                bail!(
                    "--icmil-negative-class, --icmil-stain-jitter and --icmil-top-k are for ICMIL rounds (--icmil-rounds N)"
                );
            }
            return Ok(None);
        }
        let (batch_size, patches_per_slide, beta) = self.icmil_method.defaults();
        let (batch_size, patches_per_slide, beta) = (
            self.icmil_batch_size.unwrap_or(batch_size),
            self.icmil_patches_per_slide.unwrap_or(patches_per_slide),
            self.icmil_beta.unwrap_or(beta),
        );
        if self.icmil_shards == 0 || self.icmil_epochs == 0 || self.icmil_lr <= 0.0 || beta <= 0.0 {
            bail!("--icmil-shards, --icmil-epochs, --icmil-lr and --icmil-beta must be positive");
        }
        if batch_size < 2 {
            bail!("--icmil-batch-size must be at least 2 (BatchNorm trains on batch statistics)");
        }
        if !(0.0..1.0).contains(&self.icmil_stain_jitter) {
            bail!("--icmil-stain-jitter must lie in [0, 1), not {}", self.icmil_stain_jitter);
        }
        if self.until != Until::Predict {
            bail!("--until {:?} stops round 0 early; it cannot be combined with --icmil-rounds", self.until);
        }
        Ok(Some(IcmilConfig {
            rounds: self.icmil_rounds,
            shards: self.icmil_shards,
            epochs: self.icmil_epochs,
            lr: self.icmil_lr,
            batch_size,
            patches_per_slide,
            beta,
            trainable_blocks: self.icmil_trainable_blocks,
            method: self.icmil_method,
            negative_class: self.icmil_negative_class.clone(),
            stain_jitter: self.icmil_stain_jitter,
            top_k: self.icmil_top_k,
        }))
    }
}

/// Where imported features go, under which name, and where their manifest is written.
#[derive(Debug, Args)]
pub struct ImportTarget {
    /// Name of the imported feature set (what `run --features` takes).
    #[arg(long)]
    pub name: String,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Where to write the manifest (slide_id,path,label).
    #[arg(long)]
    pub manifest_out: PathBuf,
}

impl ImportTarget {
    fn open(&self) -> anyhow::Result<(EmbedderId, Store)> {
        Ok((EmbedderId::new(self.name.clone()).context("--name")?, self.store.open()?))
    }

    fn finish(&self, manifest: &str, what: &str, store: &Store) -> anyhow::Result<()> {
        std::fs::write(&self.manifest_out, manifest).with_context(|| format!("{}", self.manifest_out.display()))?;
        println!(
            "imported {what} as {} into {}; manifest {}",
            self.name,
            store.location(),
            self.manifest_out.display()
        );
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct ImportBagsArgs {
    /// The table: one row per instance.
    #[arg(long)]
    pub table: PathBuf,
    #[command(flatten)]
    pub target: ImportTarget,
    /// Column of the label (0-based).
    #[arg(long, default_value_t = 0)]
    pub label_col: usize,
    /// Column of the bag id (0-based).
    #[arg(long, default_value_t = 1)]
    pub bag_col: usize,
    /// The first row is a header.
    #[arg(long)]
    pub header: bool,
    /// Z-score every feature column over all instances (raw benchmark units, e.g. Musk1's).
    #[arg(long)]
    pub standardise: bool,
}

#[derive(Debug, Args)]
pub struct ImportClamArgs {
    /// CLAM's feature directory (with h5_files/ and/or pt_files/).
    #[arg(long)]
    pub features_dir: PathBuf,
    /// CLAM's dataset CSV: slide_id and label columns.
    #[arg(long)]
    pub csv: PathBuf,
    #[command(flatten)]
    pub target: ImportTarget,
}

#[derive(Debug, Args)]
pub struct PredictArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// Where the embedded run computes (ignored with --nats: the workers choose).
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub slides: SlideArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    /// The model: a run of the store (RUN: its folds' models averaged; RUN:fold-K; RUN:final), a
    /// model id of the store, or a folder written by `wsimil export-model` or `import-model`.
    #[arg(long)]
    pub model: String,
    /// The round of a run with ICMIL rounds (default: its last).
    #[arg(long)]
    pub round: Option<u32>,
    /// The new cohort: slide_id,path[,label][,mpp]. Labels, when given, must be the model's classes.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Name of the application (default: derived from the model and the cohort, so re-running resumes).
    #[arg(long)]
    pub name: Option<String>,
    /// Score features imported under this name instead of slides (for a model trained on them).
    #[arg(long)]
    pub features: Option<String>,
}

impl PredictArgs {
    /// Check the flags and turn them into settings, before the store is opened.
    pub fn settings(&self) -> anyhow::Result<crate::apply::ApplySettings> {
        wsimil_worker::slide::ReaderChoice::from_env()?;
        if self.model.trim().is_empty() {
            bail!("--model: empty (a run, RUN:fold-K, RUN:final, a model id, or a model folder)");
        }
        Ok(crate::apply::ApplySettings {
            s3: self.store.s3(),
            manifest: self.manifest.clone(),
            name: self.name.as_deref().map(RunId::new).transpose().context("--name")?,
            features: self.features.as_deref().map(EmbedderId::new).transpose().context("--features")?,
        })
    }
}

/// `wsimil predict`.
pub async fn predict(args: PredictArgs) -> anyhow::Result<()> {
    let settings = args.settings()?;
    args.telemetry.start().await?;
    let store = args.store.open()?;
    let started = std::time::Instant::now();
    let card = crate::apply::resolve(&store, &args.model, args.round).await?;
    let plan = crate::apply::prepare(&store, &card, &settings).await?;
    eprintln!(
        "wsimil: applying model {} ({}) to {} slides as {}, store {}",
        card.id,
        card.ensemble,
        plan.slides.len(),
        plan.name,
        store.location()
    );
    let dispatcher = dispatcher(&args.nats, &args.compute, &store, || args.slides.sources(&args.store)).await?;
    let summary = crate::apply::apply(&store, dispatcher.as_ref(), &plan, &card).await?;
    print!("{}", crate::apply::render(&summary, &store));
    println!("wall time: {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The embedded pool, or the NATS dispatcher when a URL is given.
async fn dispatcher(
    nats: &NatsArgs,
    compute: &ComputeArgs,
    store: &Store,
    sources: impl FnOnce() -> anyhow::Result<SlideSources>,
) -> anyhow::Result<Box<dyn crate::dispatch::Dispatcher>> {
    Ok(if nats.url.is_some() {
        let (client, queue) = nats.open("wsimil-coordinator").await?;
        Box::new(crate::jetstream::NatsDispatcher::new(client, queue))
    } else {
        let ctx = Arc::new(
            WorkerContext::new(store.clone(), compute.open()?, "embedded")
                .with_sources(sources()?)
                .with_bag_budget(compute.bag_budget()),
        );
        Box::new(LocalDispatcher::new(ctx, RetryPolicy::default()))
    })
}

#[derive(Debug, Args)]
pub struct ExportModelArgs {
    /// The model, as `predict --model` takes it (RUN, RUN:fold-K, RUN:final, a model id).
    pub model: String,
    #[arg(long)]
    pub round: Option<u32>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// The folder to write (model.json, the classifiers, embedders/).
    #[arg(long)]
    pub out: PathBuf,
}

/// `wsimil export-model`.
pub async fn export_model(args: ExportModelArgs) -> anyhow::Result<()> {
    let store = args.store.open()?;
    let card = crate::apply::resolve(&store, &args.model, args.round).await?;
    crate::apply::export(&store, &card, &args.out).await?;
    println!("model {} ({}) written to {}", card.id, card.ensemble, args.out.display());
    Ok(())
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The run, or the name of a `predict` application.
    pub run: String,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `wsimil report`.
pub async fn report(args: ReportArgs) -> anyhow::Result<()> {
    let store = args.store.open()?;
    let run = RunId::new(args.run.as_str()).map_err(|e| anyhow::anyhow!("{:?}: {e}", args.run))?;
    let key = if store.exists(&wsimil_common::layout::run_plan(&run)).await? {
        crate::report::write_run_report(&store, &run).await?
    } else if store.exists(&wsimil_common::layout::applied_plan(&run)).await? {
        crate::report::write_applied_report(&store, &run).await?
    } else {
        bail!("{run}: neither a run nor an application (wsimil predict) in {}", store.location());
    };
    match store.local_path(&key) {
        Some(p) => println!("{}", p.display()),
        None => println!("{}/{key}", store.location()),
    }
    Ok(())
}

/// File formats `export-features` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FeatureFormat {
    /// HDF5: `features` [N, D] f32, `coords` [N, 2] i64, one file per slide.
    H5,
}

#[derive(Debug, Args)]
pub struct ExportFeaturesArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The features of this run's slides (with their labels): round 0's, or with --round R and
    /// --fold K those fold K's ICMIL embedder made in round R.
    #[arg(long, conflicts_with = "features", required_unless_present = "features")]
    pub run: Option<String>,
    #[arg(long, requires = "run")]
    pub round: Option<u32>,
    #[arg(long, requires = "run")]
    pub fold: Option<u32>,
    /// Every bag imported under this name (`import-bags`, `import-clam`).
    #[arg(long)]
    pub features: Option<String>,
    #[arg(long, value_enum, default_value_t = FeatureFormat::H5)]
    pub format: FeatureFormat,
    /// `clam`: TO/h5_files/<slide>.h5 and TO/dataset.csv; `trident`: TO/features_<encoder>/<slide>.h5.
    #[arg(long, value_enum, default_value_t = crate::export::H5Layout::Clam)]
    pub layout: crate::export::H5Layout,
    /// The folder to write into.
    #[arg(long)]
    pub to: PathBuf,
}

/// `wsimil export-features`.
pub async fn export_features(args: ExportFeaturesArgs) -> anyhow::Result<()> {
    use crate::export::{export_h5, ExportSlide};
    use wsimil_common::ids::{SlideId, TilingId};
    let store = args.store.open()?;
    let FeatureFormat::H5 = args.format;
    let (embedder, tiling, slides) = match (&args.run, &args.features) {
        (Some(run), _) => {
            let run = RunId::new(run.as_str()).map_err(|e| anyhow::anyhow!("--run {run:?}: {e}"))?;
            let plan: wsimil_common::plan::RunPlan = store
                .get_json(&wsimil_common::layout::run_plan(&run))
                .await
                .with_context(|| format!("--run {run}: no such run in {}", store.location()))?;
            let round = args.round.unwrap_or(0);
            if round > plan.icmil_rounds() {
                bail!("--round {round}: run {run} has {} ICMIL round(s) after round 0", plan.icmil_rounds());
            }
            let fold = match (round, args.fold) {
                (0, f) => f.unwrap_or(0),
                (_, Some(f)) if (f as usize) < plan.folds.len() => f,
                (_, Some(f)) => bail!("--fold {f}: run {run} has {} fold(s)", plan.folds.len()),
                (_, None) => bail!(
                    "--round {round}: each fold has its own embedder in an ICMIL round; say which with --fold (0 to {})",
                    plan.folds.len().saturating_sub(1)
                ),
            };
            let (e, t) = plan.round_feature_ids(&store, round, fold).await?;
            let slides = plan
                .slides
                .iter()
                .map(|s| ExportSlide { id: s.id.clone(), label: plan.classes.get(s.label).cloned() })
                .collect::<Vec<_>>();
            (e, t, slides)
        }
        (None, Some(name)) => {
            let name = EmbedderId::new(name.as_str()).map_err(|e| anyhow::anyhow!("--features {name:?}: {e}"))?;
            let tiling = TilingId::new(wsimil_common::plan::IMPORTED_TILING).expect("safe");
            let mut slides = Vec::new();
            for key in store.list(&wsimil_common::layout::features_prefix(&name, &tiling)).await? {
                if let Some(stem) = key.filename().and_then(|f| f.strip_suffix(".parquet")) {
                    slides.push(ExportSlide { id: SlideId::new(stem)?, label: None });
                }
            }
            if slides.is_empty() {
                bail!("--features {name}: nothing imported under that name in {}", store.location());
            }
            (name, tiling, slides)
        }
        (None, None) => bail!("say which features: --run RUN or --features NAME"),
    };
    let out = export_h5(&store, &embedder, &tiling, &slides, &args.to, args.layout).await?;
    println!("{} slides ({} patches, {}-d) written to {}", out.slides, out.patches, out.dim, out.dir.display());
    if !out.missing.is_empty() {
        let names: Vec<String> = out.missing.iter().take(10).map(|s| s.to_string()).collect();
        println!(
            "{} slide(s) have no features in the store and were left out (failed or not yet embedded): {}{}",
            out.missing.len(),
            names.join(", "),
            if out.missing.len() > 10 { ", ..." } else { "" }
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("checkpoint").required(true).multiple(false)))]
pub struct ImportModelArgs {
    /// A state dict saved by the official TransMIL code (github.com/szc19990412/TransMIL): its
    /// `.pth`, or a PyTorch Lightning `.ckpt` of its ModelInterface.
    #[arg(long, group = "checkpoint")]
    pub transmil: Option<PathBuf>,
    /// A CLAM_SB or CLAM_MB checkpoint (github.com/mahmoodlab/CLAM, `s_<fold>_checkpoint.pt`):
    /// wsimil's CLAM reads it as it is.
    #[arg(long, group = "checkpoint")]
    pub clam: Option<PathBuf>,
    /// A DSMIL checkpoint (github.com/binli123/dsmil-wsi: MILNet's state dict on features, one
    /// score stream for two classes or one per class): wsimil's DSMIL reads it as it is.
    #[arg(long, group = "checkpoint")]
    pub dsmil: Option<PathBuf>,
    /// A DTFD-MIL checkpoint (github.com/hrzhang1123/DTFD-MIL: `best_model.pth`, its four modules'
    /// state dicts): wsimil's DTFD-MIL reads it as it is.
    #[arg(long, group = "checkpoint")]
    pub dtfd: Option<PathBuf>,
    /// How the DTFD-MIL checkpoint's pseudo-bags distil (`--dtfd`; the file does not say): afs,
    /// the authors' default, maxs or maxmins.
    #[arg(long, value_enum, requires = "dtfd")]
    pub dtfd_distill: Option<wsimil_common::models::dtfd::Distill>,
    /// The classes the checkpoint predicts, in its output order.
    #[arg(long, value_delimiter = ',', required = true)]
    pub classes: Vec<String>,
    /// The embedder its features came from, with its weights as for `run`.
    #[arg(long)]
    pub embedder: Architecture,
    #[arg(long)]
    pub weights: Option<PathBuf>,
    #[arg(long, conflicts_with = "weights")]
    pub random_weights: Option<u64>,
    /// How its slides were tiled (as for `run`: the embedder's patch size and resolution unless
    /// given).
    #[command(flatten)]
    pub tiling: TilingArgs,
    /// The folder to write (as `export-model` does).
    #[arg(long)]
    pub out: PathBuf,
}

/// What `import-model` does, checked.
pub struct ImportModelSettings {
    pub format: crate::apply::Checkpoint,
    pub file: PathBuf,
    pub embedder: EmbedderChoice,
    pub tiling: TilingSpec,
}

impl ImportModelArgs {
    /// Check the flags and turn them into settings, before any file is read.
    pub fn settings(&self) -> anyhow::Result<ImportModelSettings> {
        use crate::apply::Checkpoint;
        let (format, file) = match (&self.transmil, &self.clam, &self.dsmil, &self.dtfd) {
            (Some(f), ..) => (Checkpoint::OfficialTransmil, f.clone()),
            (None, Some(f), ..) => (Checkpoint::Clam, f.clone()),
            (None, None, Some(f), _) => (Checkpoint::Dsmil, f.clone()),
            (None, None, None, Some(f)) => {
                (Checkpoint::Dtfd(self.dtfd_distill.unwrap_or(wsimil_common::models::dtfd::Distill::Afs)), f.clone())
            }
            (None, None, None, None) => unreachable!("clap requires one"),
        };
        if self.classes.len() < 2 {
            bail!("--classes: a classifier needs two classes at least, not {:?}", self.classes);
        }
        let embedder = EmbedderArgs {
            embedder: self.embedder.clone(),
            weights: self.weights.clone(),
            random_weights: self.random_weights,
            ..clap_defaults::<EmbedderArgs>()
        };
        Ok(ImportModelSettings {
            format,
            file,
            tiling: self.tiling.spec(&self.embedder)?,
            embedder: embedder.choice()?,
        })
    }
}

/// A flag group's values when none of its flags is given: clap's own defaults, for commands that
/// take some of a group's flags and not the others (so no default is written twice).
fn clap_defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults"));
    T::from_arg_matches(&cmd.get_matches_from(["defaults"])).expect("every flag of the group has a default")
}

/// `wsimil import-model`.
pub async fn import_model(args: ImportModelArgs) -> anyhow::Result<()> {
    let ImportModelSettings { format, file, embedder, tiling } = args.settings()?;
    let card = crate::apply::import_checkpoint(format, &file, &args.classes, &embedder, tiling, &args.out).await?;
    println!(
        "model {} ({} from {}, classes {}) written to {}",
        card.id,
        format.describe(),
        file.display(),
        card.classes.join("/"),
        args.out.display()
    );
    Ok(())
}

/// `wsimil import-clam`.
pub async fn import_clam(args: ImportClamArgs) -> anyhow::Result<()> {
    let (name, store) = args.target.open()?;
    let manifest = crate::import::import_clam(&store, &name, &args.features_dir, &args.csv).await?;
    args.target.finish(&manifest, &format!("{} slides", manifest.lines().count() - 1), &store)
}

/// `wsimil import-bags`.
pub async fn import_bags(args: ImportBagsArgs) -> anyhow::Result<()> {
    use crate::import::{read_table, standardise, write_bags, TableLayout};
    let (name, store) = args.target.open()?;
    let layout = TableLayout { label_col: args.label_col, bag_col: args.bag_col, header: args.header };
    let mut bags = read_table(&args.table, layout)?;
    if args.standardise {
        standardise(&mut bags);
    }
    let instances: usize = bags.iter().map(|b| b.len()).sum();
    let what = format!("{} bags ({instances} instances, {} features)", bags.len(), bags[0].dim);
    let manifest = write_bags(&store, &name, bags, &args.table).await?;
    args.target.finish(&manifest, &what, &store)
}

#[derive(Debug, Args)]
pub struct DemoCohortArgs {
    /// Folder with cmu_small_region.svs and target_image.png (scripts/fetch-data.sh).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Where to write slides/, truth/, manifest.csv.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 32)]
    pub slides: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Radii of the planted tumour regions, level-0 px (MIN,MAX): smaller regions make a harder
    /// task (fewer, partly covered positive patches).
    #[arg(long, value_delimiter = ',', default_values_t = [140.0, 300.0])]
    pub radius: Vec<f64>,
    /// Most tumour regions in a positive slide.
    #[arg(long, default_value_t = 3)]
    pub max_regions: usize,
    /// Slide ids are this and a number: another prefix for a second (external) cohort in the same
    /// store, whose slides must not reuse the first one's ids.
    #[arg(long, default_value = "demo-")]
    pub id_prefix: String,
    /// Opacity of the planted tumour (0-1]: lower blends it into the tissue beneath (fainter
    /// lesions, harder to see for an embedder not trained on pathology). The default, 0.7, with
    /// three sites, keeps the demo from saturating: its slide AUC is 0.938 (1.000 with opaque
    /// lesions from one site, where no figure can tell a better model from a worse one).
    #[arg(long, default_value_t = 0.7)]
    pub opacity: f64,
    /// Staining sites: slides are dealt to this many sites, each shifting its slides' stain by its
    /// own per-channel gain (up to ±25%): a batch effect the classifier must see past.
    #[arg(long, default_value_t = 3)]
    pub sites: usize,
    /// Write each slide's site to the manifest (a `site` column), so that `wsimil run` stratifies
    /// its folds by site as well as by label. Off by default: the demo's folds, and its figures,
    /// stay as they were.
    #[arg(long)]
    pub site_column: bool,
}

/// `wsimil run`: the whole pipeline, in this process or (with --nats) on a worker pool.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let settings = args.settings()?;
    args.telemetry.start().await?;
    wsimil_worker::slide::ReaderChoice::from_env()?;
    let store = args.store.open()?;
    let started = std::time::Instant::now();
    let (_, plan) = run::prepare(&store, &settings).await?;
    let mode = if args.nats.url.is_some() { "distributed" } else { "embedded" };
    eprintln!(
        "wsimil: run {} ({mode}) — {} slides, {} fold(s), embedder {}, model {}, store {}",
        plan.run,
        plan.slides.len(),
        plan.folds.len(),
        plan.embedder.id(),
        plan.train.model,
        store.location()
    );
    let dispatcher = dispatcher(&args.nats, &args.compute, &store, || args.slides.sources(&args.store)).await?;
    let summary = run::run(&store, dispatcher.as_ref(), &plan, args.until.stage(), args.final_model).await?;
    print!("{}", run::render_summary(&summary, &store));
    println!("wall time: {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `wsimil demo-cohort`.
pub fn demo_cohort(args: DemoCohortArgs) -> anyhow::Result<()> {
    use wsimil_worker::synth::{build_cohort, read_level0, SynthOptions};
    let data = args.data.unwrap_or_else(wsimil_common::data_dir);
    let cmu = data.join("cmu_small_region.svs");
    let tumour = data.join("target_image.png");
    let slide = wsimil_worker::slide::open(&cmu)?;
    let source = read_level0(slide.as_ref())?;
    let tumour =
        image::open(&tumour).with_context(|| format!("{}: cannot read tumour image", tumour.display()))?.to_rgb8();
    let [lo, hi] = args.radius[..] else { bail!("--radius takes MIN,MAX") };
    if !(lo > 0.0 && lo <= hi) || args.max_regions == 0 {
        bail!("--radius needs 0 < MIN <= MAX and --max-regions at least 1");
    }
    if !(args.opacity > 0.0 && args.opacity <= 1.0) || args.sites == 0 {
        bail!("--opacity takes a value in (0, 1] and --sites at least 1");
    }
    let opt = SynthOptions {
        slides: args.slides,
        seed: args.seed,
        radius: (lo, hi),
        max_regions: args.max_regions,
        id_prefix: args.id_prefix.clone(),
        opacity: args.opacity,
        sites: args.sites,
        site_column: args.site_column,
        ..SynthOptions::default()
    };
    let slides = build_cohort(&source, &tumour, &args.out, &opt)?;
    let positives = slides.iter().filter(|s| s.label == "tumor").count();
    eprintln!(
        "demo cohort: {} slides ({positives} tumor, {} normal) in {}",
        slides.len(),
        slides.len() - positives,
        args.out.display()
    );
    println!("{}", args.out.join("manifest.csv").display());
    Ok(())
}

/// `wsimil worker`.
pub async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    wsimil_worker::slide::ReaderChoice::from_env()?;
    let name = args.name.clone().unwrap_or_else(wsimil_worker::service::default_name);
    args.telemetry.start().await?;
    let store = args.store.open()?;
    let (_client, queue) = args.nats.open(&format!("wsimil-worker-{name}")).await?;
    let ctx = WorkerContext::new(store, args.compute.open()?, name)
        .with_sources(args.slides.sources(&args.store)?)
        .with_bag_budget(args.compute.bag_budget());
    let settings = wsimil_worker::service::ServiceSettings {
        kinds: args.kinds.clone(),
        concurrency: args.concurrency.max(1),
        backoff: Duration::from_secs(args.backoff),
        noop: args.noop,
    };
    wsimil_worker::service::run_until_signalled(Arc::new(ctx), queue, settings).await?;
    Ok(())
}

fn run_filter(run: &Option<String>) -> impl Fn(&wsimil_common::nats::JobStatus) -> bool + '_ {
    move |s| run.as_ref().is_none_or(|r| s.job.as_str().contains(&format!(".{r}.")))
}

/// `wsimil status`.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let (_c, queue) = args.nats.open("wsimil-status").await?;
    let keep = run_filter(&args.run);
    let states: Vec<_> = crate::jetstream::all_states(&queue).await?.into_iter().filter(|s| keep(s)).collect();
    let runs: Vec<_> = crate::jetstream::all_progress(&queue)
        .await?
        .into_iter()
        .filter(|p| args.run.as_ref().is_none_or(|r| p.run.as_str() == r))
        .collect();
    print!("{}", crate::jetstream::render_progress(&runs));
    print!("{}", crate::jetstream::render_status(&states, wsimil_common::nats::now_ms()));
    Ok(())
}

/// `wsimil retry-failed`.
pub async fn retry_failed(args: StatusArgs) -> anyhow::Result<()> {
    let (_c, queue) = args.nats.open("wsimil-retry").await?;
    let n = crate::jetstream::retry_failed(&queue, run_filter(&args.run)).await?;
    println!("{n} failed job(s) queued again; re-run the coordinator to follow them");
    Ok(())
}

#[derive(Debug, Args)]
pub struct CheckDeviceArgs {
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// `wsimil check-device`: one line per check; fails when any check does.
pub fn check_device(args: CheckDeviceArgs) -> anyhow::Result<()> {
    let compute = args.compute.open()?;
    let report = wsimil_worker::device_check::check_device(&compute)?;
    let checks = report.checks;
    for c in &checks {
        println!("{c}");
    }
    for s in &report.skipped {
        println!("skip {s}");
    }
    let failed = checks.iter().filter(|c| !c.passed()).count();
    if failed > 0 {
        anyhow::bail!("{failed} of {} checks failed on {}", checks.len(), compute.describe());
    }
    println!("check-device: all {} checks passed on {}", checks.len(), compute.describe());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn run_args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["wsimil", "run", "--manifest", "m.csv", "--random-weights", "1", "--seed", "7"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(a) => *a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn icmil_flags_become_the_plans_icmil_settings_and_bad_ones_are_refused() {
        assert_eq!(run_args(&[]).settings().unwrap().icmil, None, "no rounds unless asked");
        let s = run_args(&["--icmil-rounds", "2", "--icmil-shards", "3", "--icmil-trainable-blocks", "4"]).settings();
        let c = s.unwrap().icmil.unwrap();
        assert_eq!((c.rounds, c.shards, c.trainable_blocks, c.lr), (2, 3, 4, 1e-5));
        // The authors' recipe unless told otherwise: their batch, every patch, β = 6.
        assert_eq!((c.method, c.batch_size, c.patches_per_slide, c.beta), (IcmilMethod::Paper, 100, 0, 6.0));
        assert_eq!(c, IcmilConfig { rounds: 2, shards: 3, trainable_blocks: 4, ..IcmilConfig::default() });
        let first = run_args(&["--icmil-rounds", "1", "--icmil-method", "first"]).settings().unwrap().icmil.unwrap();
        assert_eq!(first.method, IcmilMethod::First);
        // The first recipe with its own settings, as it ran: its batch, its cap, its β.
        assert_eq!((first.batch_size, first.patches_per_slide, first.beta), (16, 256, 1.0));
        let set = run_args(&["--icmil-rounds", "1", "--icmil-method", "first", "--icmil-beta", "2"]).settings();
        assert_eq!(set.unwrap().icmil.unwrap().beta, 2.0, "given values win");
        let neg = run_args(&["--icmil-rounds", "1", "--icmil-negative-class", "normal"]).settings().unwrap().icmil;
        assert_eq!(neg.unwrap().negative_class.as_deref(), Some("normal"));
        let jit = run_args(&["--icmil-rounds", "1", "--icmil-stain-jitter", "0.25"]).settings().unwrap().icmil;
        assert_eq!(jit.unwrap().stain_jitter, 0.25);
        let top = run_args(&["--icmil-rounds", "1", "--icmil-top-k", "4"]).settings().unwrap().icmil;
        assert_eq!(top.unwrap().top_k, 4);
        let plain = serde_json::to_string(&c).unwrap();
        assert!(
            !plain.contains("negative_class") && !plain.contains("stain_jitter") && !plain.contains("top_k"),
            "old plans keep their ids: {plain}"
        );
        for (bad, why) in [
            (&["--icmil-rounds", "1", "--icmil-batch-size", "1"][..], "at least 2"),
            (&["--icmil-rounds", "1", "--icmil-shards", "0"][..], "must be positive"),
            (&["--icmil-rounds", "1", "--until", "embed"][..], "cannot be combined"),
            (&["--icmil-negative-class", "normal"][..], "are for ICMIL rounds"),
            (&["--icmil-stain-jitter", "0.2"][..], "are for ICMIL rounds"),
            (&["--icmil-top-k", "8"][..], "are for ICMIL rounds"),
            (&["--icmil-rounds", "1", "--icmil-stain-jitter", "1.5"][..], "must lie in [0, 1)"),
        ] {
            let err = run_args(bad).settings().unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn clam_subtyping_reaches_the_bag_model_and_only_clams() {
        use wsimil_common::models::BagModelConfig;
        for model in ["clam-sb", "clam-mb"] {
            let train = run_args(&["--model", model, "--clam-subtyping"]).settings().unwrap().train;
            let BagModelConfig::Clam(c) = train.bag_model(24, 3) else { panic!("{model}") };
            assert!(c.subtyping, "{model}");
            let plain = run_args(&["--model", model]).settings().unwrap().train;
            let BagModelConfig::Clam(c) = plain.bag_model(24, 3) else { panic!("{model}") };
            assert!(!c.subtyping, "{model}: CLAM's default");
        }
        let err = run_args(&["--model", "abmil", "--clam-subtyping"]).settings().expect_err("not CLAM").to_string();
        assert!(err.contains("--clam-subtyping is CLAM's"), "{err}");
        let survival = run_args(&["--model", "clam-sb", "--clam-subtyping", "--task", "survival"]).settings();
        assert!(survival.expect_err("no classes").to_string().contains("a survival run has none"));
    }

    #[test]
    fn a_survival_run_refuses_a_model_that_only_scores_classes() {
        let survival = |model: &str| run_args(&["--task", "survival", "--model", model]).settings();
        for model in ["transmil", "abmil", "clam-sb", "clam-mb"] {
            assert!(matches!(survival(model).unwrap().task, Task::Survival(_)), "{model}");
        }
        let err = survival("dsmil").expect_err("dsmil has no risk head").to_string();
        assert!(err.contains("--model dsmil scores classes") && err.contains("transmil, abmil"), "{err}");
        let err = survival("dtfd").expect_err("dtfd has no risk head").to_string();
        assert!(err.contains("--model dtfd scores classes") && err.contains("transmil, abmil"), "{err}");
        assert_eq!(run_args(&["--model", "dsmil"]).settings().unwrap().task, Task::Classification);
    }

    #[test]
    fn dtfd_distill_reaches_the_bag_model_and_only_dtfds() {
        use wsimil_common::models::{dtfd::Distill, BagModelConfig};
        let distill = |args: &[&str]| run_args(args).settings().map(|s| s.train.bag_model(24, 2));
        let Ok(BagModelConfig::Dtfd(c)) = distill(&["--model", "dtfd", "--dtfd-distill", "maxmins"]) else { panic!() };
        assert_eq!(c.distill, Distill::Maxmins);
        let Ok(BagModelConfig::Dtfd(c)) = distill(&["--model", "dtfd"]) else { panic!() };
        assert_eq!(c.distill, Distill::Afs, "the authors' default");
        let err = distill(&["--model", "abmil", "--dtfd-distill", "maxs"]).expect_err("not DTFD").to_string();
        assert!(err.contains("--dtfd-distill is DTFD-MIL's"), "{err}");
    }

    #[test]
    fn transmil_head_is_on_for_classification_off_for_survival_and_refused_where_it_cannot_be() {
        use wsimil_common::models::BagModelConfig;
        let head = |args: &[&str]| {
            run_args(args).settings().map(|s| match s.train.bag_model(24, 2) {
                BagModelConfig::Transmil(c) => Some(c.instance_head),
                _ => None,
            })
        };
        assert_eq!(head(&[]).unwrap(), Some(true), "classification: on by default");
        assert_eq!(head(&["--transmil-head", "none"]).unwrap(), Some(false));
        assert_eq!(head(&["--task", "survival"]).unwrap(), Some(false), "survival: no classes to learn");
        let err = head(&["--task", "survival", "--transmil-head", "instance"]).expect_err("survival").to_string();
        assert!(err.contains("a survival run has none"), "{err}");
        let err = head(&["--model", "abmil", "--transmil-head", "none"]).expect_err("not TransMIL").to_string();
        assert!(err.contains("--transmil-head is TransMIL's"), "{err}");
        let err = head(&["--icmil-rounds", "1", "--transmil-head", "none"]).expect_err("no teacher").to_string();
        assert!(err.contains("drop --transmil-head none"), "{err}");
        assert_eq!(head(&["--icmil-rounds", "1"]).unwrap(), Some(true));
        // Plans of runs without the head read and write as before (the same run ids).
        let plain = run_args(&["--transmil-head", "none"]).settings().unwrap().train;
        assert!(!serde_json::to_string(&plain).unwrap().contains("transmil_instance_head"));
    }

    fn import_args(extra: &[&str]) -> ImportModelArgs {
        import_args_with_classes("a,b", extra)
    }

    fn import_args_with_classes(classes: &str, extra: &[&str]) -> ImportModelArgs {
        let mut argv = vec!["wsimil", "import-model", "--transmil", "m.pth", "--classes", classes, "--out", "o"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::ImportModel(a) => *a,
            _ => unreachable!(),
        }
    }

    /// `import-model` takes `run`'s rules for the embedder and its tiling: the same defaults and
    /// the same refusals, from the one place both are written.
    #[test]
    fn import_model_settles_its_embedder_and_tiling_as_run_does() {
        for emb in [&["--embedder", "virchow2"][..], &["--embedder", "resnet50-trunc", "--patch-px", "512"][..]] {
            let imported = import_args(&[emb, &["--random-weights", "3"][..]].concat()).settings().unwrap();
            let run = run_args(emb).settings().unwrap();
            assert_eq!(imported.tiling, run.tiling, "{emb:?}");
            let (i, r) = (&imported.embedder, &run.embedder);
            assert_eq!(
                (&i.architecture, i.batch_size, i.corrupt_tiles),
                (&r.architecture, r.batch_size, r.corrupt_tiles),
                "{emb:?}"
            );
            assert!(matches!(i.weights, Weights::Random(3)), "{emb:?}");
        }
        let err = import_args(&["--embedder", "uni"]).settings().err().unwrap().to_string();
        let run_err = run_args(&["--embedder", "uni"]);
        let run_err =
            RunArgs { embedder: EmbedderArgs { random_weights: None, ..run_err.embedder.clone() }, ..run_err };
        assert_eq!(err, run_err.settings().err().unwrap().to_string());
        assert!(err.contains("needs --weights FILE"), "{err}");
        let err = import_args(&["--embedder", "uni", "--random-weights", "1", "--target-mpp", "0"]).settings();
        assert!(err.err().unwrap().to_string().contains("must be positive"));
        let one_class = import_args_with_classes("a", &["--embedder", "uni", "--random-weights", "1"]);
        let err = one_class.settings().err().expect("one class is refused").to_string();
        assert!(err.contains("two classes at least"), "{err}");
    }

    #[test]
    fn predict_checks_its_names_before_the_store_is_opened() {
        let args = |extra: &[&str]| {
            let mut argv =
                vec!["wsimil", "predict", "--model", "r", "--manifest", "m.csv", "--store", "/nonexistent/x"];
            argv.extend_from_slice(extra);
            match Cli::try_parse_from(argv).unwrap().command {
                Command::Predict(a) => *a,
                _ => unreachable!(),
            }
        };
        let s = args(&["--name", "ext-1"]).settings().unwrap();
        assert_eq!(s.name.unwrap().as_str(), "ext-1");
        let err = args(&["--name", "a/b"]).settings().err().unwrap();
        assert!(format!("{err:#}").starts_with("--name"), "{err:#}");
        assert!(!std::path::Path::new("/nonexistent/x").exists(), "nothing created");
    }

    #[test]
    fn a_foundation_model_tiles_at_its_own_patch_size_unless_told_otherwise() {
        let tiling = |extra: &[&str]| {
            let t = run_args(extra).settings().unwrap().tiling;
            (t.patch_px, t.target_mpp)
        };
        assert_eq!(tiling(&[]), (256, 0.5), "the CNNs: CLAM's 256 px at 20x");
        assert_eq!(tiling(&["--embedder", "virchow2"]), (224, 0.5));
        assert_eq!(tiling(&["--embedder", "conch-vision"]), (512, 0.5));
        assert_eq!(tiling(&["--embedder", "conch-vision", "--patch-px", "448", "--target-mpp", "0.25"]), (448, 0.25));
    }

    #[test]
    fn the_bag_budget_is_the_flag_or_half_the_machine_and_a_bad_one_is_refused() {
        let set = run_args(&["--bag-cache-gb", "2.5", "--bag-precision", "f16"]).compute.bag_budget();
        assert_eq!(set, BagBudget { bytes: 2_500_000_000, precision: BagPrecision::F16 });
        let default = run_args(&[]).compute.bag_budget();
        assert_eq!(default.bytes, wsimil_worker::bags::machine_memory() / 2);
        assert_eq!(default.precision, BagPrecision::F32);
        // The budget never changes the run (results do not depend on it): the same settings.
        let settings = |extra: &[&str]| format!("{:?}", run_args(extra).settings().unwrap());
        assert_eq!(settings(&["--bag-cache-gb", "1"]), settings(&[]));
        for bad in ["0", "-1", "lots", "inf"] {
            let flag = format!("--bag-cache-gb={bad}");
            let argv = ["wsimil", "run", "--manifest", "m.csv", flag.as_str()];
            let err = Cli::try_parse_from(argv).err().unwrap().to_string();
            assert!(err.contains("not a positive number of gigabytes"), "{bad}: {err}");
        }
    }

    #[test]
    fn train_seed_changes_initialisation_but_not_the_folds() {
        let base = run_args(&[]).settings().unwrap();
        let other = run_args(&["--train-seed", "9"]).settings().unwrap();
        assert_eq!((base.train.seed, other.train.seed), (7, 9));
        assert_eq!(base.folds.seed, other.folds.seed);
    }
}
