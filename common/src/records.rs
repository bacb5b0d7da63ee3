//! Records that jobs leave in the store for others to read: a fold's training report, a fine-tuning
//! shard's report, an embedder's card. Workers write them and the coordinator (and a person) reads
//! them, so they are typed here, once, rather than written ad hoc in two crates.
//!
//! Every field that was added after a record was first stored has a serde default, so records
//! written by an earlier wsimil still read.

use crate::ids::{EmbedderId, RunId};
use crate::metrics::Metrics;
use crate::models::BagModelConfig;
use crate::plan::{IcmilConfig, TrainConfig};
use serde::{Deserialize, Serialize};

/// One epoch of a fold's training curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_loss: f64,
    /// Wall seconds of the epoch: its training pass and its validation pass, bags read included.
    #[serde(default)]
    pub seconds: f64,
}

/// A slide's prediction by the model of its test fold: class probabilities, or in a survival
/// run the model's outputs ([`crate::plan::Head::outputs`]) and the risk they give.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlidePrediction {
    pub slide: String,
    /// Index into the plan's classes (survival: whether the event was observed).
    pub label: usize,
    pub probs: Vec<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<f64>,
}

/// A survival fold's figures (`FoldReport::survival`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SurvivalFold {
    /// Harrell's C-index of the test slides' risks (none without a comparable pair).
    pub c_index: Option<f64>,
    /// Test slides whose event was observed.
    pub events: usize,
    /// The discrete-time model's inner bin edges, from the training slides' event times.
    pub bin_edges: Vec<f64>,
    /// The median risk of the fold's training slides: its test slides above it are its high-risk group.
    pub train_median_risk: f64,
}

/// Everything a fold's training leaves behind besides the weights (`runs/<run>/round-<r>/fold-<k>/
/// metrics.json`, written last: its presence means the fold is trained).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FoldReport {
    pub fold: u32,
    pub model: BagModelConfig,
    pub train: TrainConfig,
    pub n_train: usize,
    pub n_val: usize,
    pub n_test: usize,
    pub epochs_run: usize,
    pub best_epoch: usize,
    pub curve: Vec<EpochRecord>,
    pub test: Option<Metrics>,
    pub predictions: Vec<SlidePrediction>,
    pub seconds: f64,
    /// How its bags were read within the worker's memory budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bags: Option<BagReads>,
    /// A survival run's figures (`test` is none there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub survival: Option<SurvivalFold>,
}

/// How a job's feature bags were read (`--bag-cache-gb`): how many came from the store and how
/// many from memory, and how long the steps waited for them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BagReads {
    /// Bags read from the store (and decoded).
    pub reads: u64,
    /// Bags a pass found in memory.
    pub hits: u64,
    /// Bytes read from the store.
    pub bytes_read: u64,
    /// Seconds the job waited for a bag that was not there yet.
    pub waited_s: f64,
}

/// What training a run's final model (on every slide, `--final-model`) left besides its weights
/// (`runs/<run>/round-<r>/final/metrics.json`, written last).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinalReport {
    pub model: BagModelConfig,
    pub train: TrainConfig,
    pub n_train: usize,
    /// Epochs trained: the median of the folds' best epochs (counted from 1).
    pub epochs: usize,
    /// The folds' best epochs (0-based) it was chosen from.
    pub fold_best_epochs: Vec<usize>,
    pub curve: Vec<EpochRecord>,
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bags: Option<BagReads>,
}

/// What an ICMIL fine-tuning shard did; stored beside its weights and in the merged embedder's card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardReport {
    pub shard: u32,
    /// The round-r embedder it started from (the teacher's).
    pub teacher: String,
    pub slides: Vec<String>,
    /// Confident patches it trained on (its weight in the fold's average).
    pub patches: usize,
    pub steps: usize,
    /// Mean weighted loss per epoch.
    pub epoch_losses: Vec<f64>,
    pub seconds: f64,
}

/// How an ICMIL embedder came to be: which run, round and fold's classifier taught it, with which
/// settings, from which shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    pub run: RunId,
    pub round: u32,
    pub fold: u32,
    /// Always `icmil` today.
    pub method: String,
    pub settings: IcmilConfig,
    pub shards: Vec<ShardReport>,
}

/// `embedders/<id>/embedder.json`: what an embedder is, for a person and for provenance. Written
/// when its weights are registered (from a file) or minted (by an ICMIL merge).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedderCard {
    pub id: EmbedderId,
    pub architecture: String,
    /// SHA-256 of the weights file as its publisher ships it (or as an ICMIL merge wrote it).
    pub weights_sha256: String,
    /// The file the weights were registered from (absent for ICMIL embedders).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The embedder it was fine-tuned from (ICMIL), none for registered weights.
    pub parent: Option<EmbedderId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Lineage>,
    /// The output the features are (e.g. `class token`, `class token + mean patch token`) and its width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_dim: Option<usize>,
    /// The wsimil that wrote the card.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wsimil_version: Option<String>,
}

/// This build's version, as cards and bundles record it.
pub const WSIMIL_VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cards_written_before_these_types_still_read() {
        // As `register_embedder` wrote a card until this module existed.
        let old = r#"{"id": "efficientnet-lite0-0123456789ab", "architecture": "efficientnet-lite0",
            "weights_sha256": "0123456789abcdef", "source": "/data/w.safetensors", "parent": null}"#;
        let card: EmbedderCard = serde_json::from_str(old).unwrap();
        assert_eq!(card.id.as_str(), "efficientnet-lite0-0123456789ab");
        assert_eq!(card.source.as_deref(), Some("/data/w.safetensors"));
        assert!(card.parent.is_none() && card.lineage.is_none() && card.output.is_none());
        let back: EmbedderCard = serde_json::from_str(&serde_json::to_string(&card).unwrap()).unwrap();
        assert_eq!(back, card);
    }

    #[test]
    fn an_icmil_card_names_its_parent_and_lineage() {
        let shard = ShardReport {
            shard: 1,
            teacher: "e-1".into(),
            slides: vec!["s1".into()],
            patches: 12,
            steps: 3,
            epoch_losses: vec![0.5],
            seconds: 1.0,
        };
        let card = EmbedderCard {
            id: EmbedderId::new("e-2").unwrap(),
            architecture: "resnet50-trunc".into(),
            weights_sha256: "ab".into(),
            source: None,
            parent: Some(EmbedderId::new("e-1").unwrap()),
            lineage: Some(Lineage {
                run: RunId::new("r").unwrap(),
                round: 1,
                fold: 0,
                method: "icmil".into(),
                settings: IcmilConfig::default(),
                shards: vec![shard],
            }),
            output: None,
            feature_dim: None,
            wsimil_version: Some(WSIMIL_VERSION.into()),
        };
        let json = serde_json::to_value(&card).unwrap();
        assert_eq!(json["parent"], "e-1");
        assert_eq!(json["lineage"]["shards"][0]["patches"], 12);
        assert!(json.get("source").is_none(), "no source for a minted embedder");
        assert_eq!(serde_json::from_value::<EmbedderCard>(json).unwrap(), card);
    }
}
