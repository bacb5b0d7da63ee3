//! Job messages between the coordinator and workers, and their outcomes.
//!
//! A job's id is a function of its content ([`Job::id`]), so planning the same work twice yields
//! the same id: the queue deduplicates it and its output lands on the same key.
//!
//! ```text
//!   queued ──► running ──► done
//!                 │  ▲
//!                 ▼  │ transient error: redelivered after a delay (up to max attempts)
//!               failed (permanent error, or attempts exhausted): recorded with the reason
//! ```

use crate::ids::{EmbedderId, JobId, RunId, SlideId, TilingId};
use crate::plan::{EmbedderSpec, TilingSpec};
use serde::{Deserialize, Serialize};

/// The kinds of work, one queue subject each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Tile,
    Embed,
    Train,
    Predict,
    Finetune,
    /// Apply a trained model to a slide of a new cohort (`wsimil predict`).
    Score,
}

impl JobKind {
    pub const ALL: [JobKind; 6] =
        [JobKind::Tile, JobKind::Embed, JobKind::Train, JobKind::Predict, JobKind::Finetune, JobKind::Score];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Tile => "tile",
            JobKind::Embed => "embed",
            JobKind::Train => "train",
            JobKind::Predict => "predict",
            JobKind::Finetune => "finetune",
            JobKind::Score => "score",
        }
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Find tissue and lay the patch grid of one slide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TileJob {
    pub slide: SlideId,
    pub path: String,
    pub mpp: Option<f64>,
    pub tiling: TilingSpec,
}

/// Embed the patches of one slide with one embedder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedJob {
    pub slide: SlideId,
    pub path: String,
    pub tiling: TilingId,
    pub embedder: EmbedderSpec,
    /// The last job the run (or application) reads this slide in: a worker's scratch copy of it
    /// goes when the job is done. Absent (false) from jobs that are not, and from older messages.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub release_slide: bool,
}

/// Train the bag classifier of one fold of a run's round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainJob {
    pub run: RunId,
    pub round: u32,
    pub fold: u32,
}

/// Predict one slide with the model of its test fold: probabilities, attention, heatmap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictJob {
    pub run: RunId,
    pub round: u32,
    pub slide: SlideId,
}

/// ICMIL: fine-tune fold `fold`'s round `round − 1` embedder on shard `shard` of `shards` of the
/// fold's training slides, taught by the fold's round `round − 1` classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneJob {
    pub run: RunId,
    /// The round whose embedder this produces (≥ 1).
    pub round: u32,
    pub fold: u32,
    pub shard: u32,
    pub shards: u32,
}

/// Train a run's final model, on every slide of the cohort, for the epochs its folds chose
/// (`wsimil run --final-model`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalJob {
    pub run: RunId,
    pub round: u32,
}

/// Apply a trained model to one slide of an application (`applied/<app>/`): each member's class
/// probabilities and attention from the slide's features, averaged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreJob {
    pub app: RunId,
    pub slide: SlideId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Job {
    Tile(TileJob),
    Embed(EmbedJob),
    Train(TrainJob),
    Predict(PredictJob),
    Finetune(FinetuneJob),
    /// Served by the train workers.
    #[serde(rename = "train-final")]
    TrainFinal(FinalJob),
    Score(ScoreJob),
}

impl Job {
    pub fn kind(&self) -> JobKind {
        match self {
            Job::Tile(_) => JobKind::Tile,
            Job::Embed(_) => JobKind::Embed,
            Job::Train(_) => JobKind::Train,
            Job::Predict(_) => JobKind::Predict,
            Job::Finetune(_) => JobKind::Finetune,
            Job::TrainFinal(_) => JobKind::Train,
            Job::Score(_) => JobKind::Score,
        }
    }

    /// Deterministic id: same work, same id.
    pub fn id(&self) -> JobId {
        let s = match self {
            Job::Tile(j) => format!("tile.{}.{}", j.tiling.id(), j.slide),
            Job::Embed(j) => format!("embed.{}.{}.{}", j.embedder.id(), j.tiling, j.slide),
            Job::Train(j) => format!("train.{}.r{}.f{}", j.run, j.round, j.fold),
            Job::Predict(j) => format!("predict.{}.r{}.{}", j.run, j.round, j.slide),
            Job::Finetune(j) => format!("finetune.{}.r{}.f{}.s{}of{}", j.run, j.round, j.fold, j.shard, j.shards),
            Job::TrainFinal(j) => format!("train.{}.r{}.final", j.run, j.round),
            Job::Score(j) => format!("score.{}.{}", j.app, j.slide),
        };
        JobId::new(s).expect("job ids are built from safe ids")
    }

    /// The slide this job is about, if any (for reports).
    pub fn slide(&self) -> Option<&SlideId> {
        match self {
            Job::Tile(j) => Some(&j.slide),
            Job::Embed(j) => Some(&j.slide),
            Job::Predict(j) => Some(&j.slide),
            Job::Score(j) => Some(&j.slide),
            Job::Train(_) | Job::Finetune(_) | Job::TrainFinal(_) => None,
        }
    }

    /// The embedder this job's features belong to (embed jobs).
    pub fn embedder_id(&self) -> Option<EmbedderId> {
        match self {
            Job::Embed(j) => Some(j.embedder.id()),
            _ => None,
        }
    }
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Outcome {
    Done,
    /// Will not succeed by retrying (corrupt input), or ran out of attempts.
    Failed {
        reason: String,
    },
}

/// Where a run is: its round and the stage running (or `done`), for `wsimil status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunProgress {
    pub run: RunId,
    pub round: u32,
    /// ICMIL rounds after round 0 in the plan.
    pub rounds: u32,
    pub stage: String,
    pub updated_ms: u64,
}

impl RunProgress {
    pub fn new(run: &RunId, round: u32, rounds: u32, stage: &str) -> Self {
        let updated_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        RunProgress { run: run.clone(), round, rounds, stage: stage.to_string(), updated_ms }
    }
}

/// The record of a failed job, as written to the store for `status` and the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureRecord {
    pub job: JobId,
    pub kind: JobKind,
    pub slide: Option<SlideId>,
    pub reason: String,
    pub attempts: u32,
    pub worker: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::TissueParams;

    fn tiling() -> TilingSpec {
        TilingSpec {
            patch_px: 256,
            target_mpp: 0.5,
            step_fraction: 1.0,
            min_tissue_fraction: 0.25,
            tissue: TissueParams::biopsy(),
        }
    }

    #[test]
    fn job_ids_are_deterministic_and_depend_on_the_work() {
        let s = SlideId::new("s1").unwrap();
        let a = Job::Tile(TileJob { slide: s.clone(), path: "/a".into(), mpp: None, tiling: tiling() });
        assert_eq!(a.id(), a.clone().id());
        let mut t2 = tiling();
        t2.patch_px = 512;
        let b = Job::Tile(TileJob { slide: s, path: "/a".into(), mpp: None, tiling: t2 });
        assert_ne!(a.id(), b.id());
        assert!(a.id().as_str().starts_with("tile."));
    }

    #[test]
    fn jobs_round_trip_as_tagged_json() {
        let j = Job::Train(TrainJob { run: RunId::new("r").unwrap(), round: 1, fold: 2 });
        let s = serde_json::to_string(&j).unwrap();
        assert!(s.contains("\"kind\":\"train\""), "{s}");
        assert_eq!(serde_json::from_str::<Job>(&s).unwrap(), j);
    }
}
