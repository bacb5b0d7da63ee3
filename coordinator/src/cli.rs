//! The `wsimil` command line: flags are parsed by clap into raw structs, then turned once into
//! checked settings ([`RunArgs::settings`]) that the library runs with.

use crate::dispatch::{LocalDispatcher, RetryPolicy};
use crate::planner::FoldSettings;
use crate::run::{self, EmbedderChoice, RunSettings, Weights};
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use wsimil_common::grid::TissueParams;
use wsimil_common::ids::RunId;
use wsimil_common::plan::{TilingSpec, TrainConfig};
use wsimil_common::store::{S3Options, Store};
use wsimil_worker::jobs::WorkerContext;

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
    /// Run a cohort through tile → embed → train → predict in one process (embedded mode).
    Run(Box<RunArgs>),
    /// Build the semi-synthetic demo cohort from the real slide and tumour image.
    DemoCohort(DemoCohortArgs),
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
}

impl StoreArgs {
    pub fn open(&self) -> anyhow::Result<Store> {
        let opts = S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            path_style: self.s3_path_style,
        };
        Ok(Store::open(&self.store, &opts)?)
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Cohort CSV: slide_id,path,label[,fold|split][,mpp]. Relative paths are relative to it.
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
    /// Seed of fold assignment, initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Patch side in pixels at the target resolution.
    #[arg(long, default_value_t = 256)]
    pub patch_px: u32,
    /// Target resolution in µm per pixel (0.5 ≈ 20x, 0.25 ≈ 40x).
    #[arg(long, default_value_t = 0.5)]
    pub target_mpp: f64,
    /// Tissue detection preset (CLAM's): tcga or biopsy.
    #[arg(long, default_value = "tcga")]
    pub tissue_preset: String,
    /// Saturation threshold: otsu, or a number 0-255 (the presets' own is 8).
    #[arg(long, default_value = "otsu")]
    pub tissue_threshold: String,
    /// Minimum tissue fraction of a kept patch.
    #[arg(long, default_value_t = 0.25)]
    pub min_tissue: f32,

    /// Patch embedder: efficientnet-lite0 (CPU default) or resnet50-trunc.
    #[arg(long, default_value = "efficientnet-lite0")]
    pub embedder: String,
    /// Embedder weights (safetensors). Default for efficientnet-lite0: the fetched ImageNet weights.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Use seeded random embedder weights instead (smoke tests).
    #[arg(long, conflicts_with = "weights")]
    pub random_weights: Option<u64>,
    /// Patches per embedder forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,

    /// Bag classifier: transmil or abmil.
    #[arg(long, default_value = "transmil")]
    pub model: String,
    /// Optimizer: lookahead-radam (the paper's), radam or adamw.
    #[arg(long, default_value = "lookahead-radam")]
    pub optimizer: String,
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
}

impl RunArgs {
    /// Check the flags and turn them into run settings.
    pub fn settings(&self) -> anyhow::Result<RunSettings> {
        let mut tissue = TissueParams::preset(&self.tissue_preset)
            .with_context(|| format!("unknown --tissue-preset {:?} (tcga, biopsy)", self.tissue_preset))?;
        tissue.threshold = match self.tissue_threshold.as_str() {
            "otsu" => None,
            n => Some(n.parse::<u8>().with_context(|| format!("--tissue-threshold {n:?}: otsu or 0-255"))?),
        };
        if self.patch_px == 0 || self.target_mpp <= 0.0 {
            bail!("--patch-px and --target-mpp must be positive");
        }
        let weights = match (&self.weights, self.random_weights) {
            (_, Some(seed)) => Weights::Random(seed),
            (Some(p), None) => Weights::File(p.clone()),
            (None, None) if self.embedder == "efficientnet-lite0" => {
                let p = wsimil_common::data_dir().join("efficientnet-lite0.safetensors");
                if !p.is_file() {
                    bail!(
                        "no EfficientNet-Lite0 weights at {}: run scripts/fetch-data.sh, or pass --weights",
                        p.display()
                    );
                }
                Weights::File(p)
            }
            (None, None) => {
                bail!("--embedder {} needs --weights FILE.safetensors (or --random-weights SEED)", self.embedder)
            }
        };
        if wsimil_common::models::BagModelConfig::named(&self.model, 1, 2).is_none() {
            bail!("unknown --model {:?} (transmil, abmil)", self.model);
        }
        Ok(RunSettings {
            manifest: self.manifest.clone(),
            classes: self.classes.clone(),
            run: self.run.as_deref().map(RunId::new).transpose().context("--run")?,
            tiling: TilingSpec {
                patch_px: self.patch_px,
                target_mpp: self.target_mpp,
                step_fraction: 1.0,
                min_tissue_fraction: self.min_tissue,
                tissue,
            },
            embedder: EmbedderChoice {
                architecture: self.embedder.clone(),
                weights,
                batch_size: self.batch_size.max(1),
            },
            train: TrainConfig {
                model: self.model.clone(),
                optimizer: self.optimizer.clone(),
                lr: self.lr,
                weight_decay: self.weight_decay,
                max_epochs: self.epochs,
                patience: self.patience,
                grad_accumulation: self.grad_accumulation.max(1),
                max_train_instances: self.max_train_instances,
                landmarks: self.landmarks.max(1),
                seed: self.seed,
                ..TrainConfig::default()
            },
            folds: FoldSettings { k: self.folds.max(1), seed: self.seed },
        })
    }
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
}

/// `wsimil run`: the whole pipeline in this process.
pub async fn run_embedded(args: RunArgs) -> anyhow::Result<()> {
    let settings = args.settings()?;
    let store = args.store.open()?;
    let started = std::time::Instant::now();
    let (_, plan) = run::prepare(&store, &settings).await?;
    eprintln!(
        "wsimil: run {} — {} slides, {} fold(s), embedder {}, model {}, store {}",
        plan.run,
        plan.slides.len(),
        plan.folds.len(),
        plan.embedder.id(),
        plan.train.model,
        store.location()
    );
    let ctx = Arc::new(WorkerContext::new(store.clone(), candle_core::Device::Cpu, "embedded"));
    let dispatcher = LocalDispatcher::new(ctx, RetryPolicy::default());
    let summary = run::run(&store, &dispatcher, &plan).await?;
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
    let opt = SynthOptions { slides: args.slides, seed: args.seed, ..SynthOptions::default() };
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
