//! Every storage key wsimil reads or writes, spelled once.
//!
//! ```text
//! tiles/<tiling>/<slide>.parquet                     patch grid: x, y (level 0), tissue fraction
//! tiles/<tiling>/<slide>.thumb.png | .mask.png       for a person to check tissue detection
//! tiles/<tiling>/<slide>.tissue.geojson              tissue contours in level-0 pixels (QuPath import)
//! embedders/<embedder>/embedder.json                 the embedder's description (content-addressed)
//! embedders/<embedder>/model.safetensors             its weights
//! features/<embedder>/<tiling>/<slide>.parquet       one row per patch: x, y, feature
//! runs/<run>/plan.json                               the run's configuration and cohort
//! runs/<run>/report.html                             the page a person reads (heatmaps linked beside it)
//! runs/<run>/failures/<job>.json                     why a job failed (latest attempt)
//! runs/<run>/round-<r>/fold-<k>/model.safetensors    bag classifier of one fold
//! runs/<run>/round-<r>/fold-<k>/metrics.json         its test metrics and training curve
//! runs/<run>/round-<r>/predictions.parquet | .csv    out-of-fold slide probabilities
//! runs/<run>/round-<r>/attention/<slide>.parquet     per-patch attention of the slide's test fold
//! runs/<run>/round-<r>/heatmaps/<slide>.png          attention heatmap over the thumbnail
//! runs/<run>/round-<r>/metrics.json                  cohort metrics of the round
//! runs/<run>/round-<r>/fold-<k>/embedder.json        the fold's embedder of round r ≥ 1 (ICMIL)
//! runs/<run>/round-<r>/fold-<k>/finetune/shard-<s>.safetensors | .json
//!                                                    one fine-tuning shard's weights and report
//! runs/<run>/round-<r>/final/model.safetensors | metrics.json
//!                                                    the model trained on every slide (--final-model)
//! models/<model>/model.json                          a trained model's card: classes, members, embedders, tiling
//! models/<model>/<member>.safetensors                one member's bag classifier
//! applied/<name>/plan.json                           a model applied to a cohort (`wsimil predict`)
//! applied/<name>/predictions.parquet | .csv          its slide probabilities
//! applied/<name>/metrics.json                        with bootstrap 95% CIs, when the cohort has labels
//! applied/<name>/report.html                         the page a person reads (heatmaps linked beside it)
//! applied/<name>/attention/<slide>.parquet           per-patch attention (the members' mean)
//! applied/<name>/heatmaps/<slide>.png                attention heatmap over the thumbnail
//! applied/<name>/failures/<job>.json                 why a job failed
//! ```
//!
//! Each object is written whole under its final key, so the existence of a key means "done".

use crate::ids::{EmbedderId, JobId, ModelId, RunId, SlideId, TilingId};
use object_store::path::Path;

fn key(s: String) -> Path {
    // Every segment is a validated id or a fixed word, so parsing can't fail.
    Path::parse(s).expect("layout keys are built from safe segments")
}

pub fn patch_grid(tiling: &TilingId, slide: &SlideId) -> Path {
    key(format!("tiles/{tiling}/{slide}.parquet"))
}

pub fn thumbnail(tiling: &TilingId, slide: &SlideId) -> Path {
    key(format!("tiles/{tiling}/{slide}.thumb.png"))
}

pub fn tissue_mask(tiling: &TilingId, slide: &SlideId) -> Path {
    key(format!("tiles/{tiling}/{slide}.mask.png"))
}

pub fn tissue_contours(tiling: &TilingId, slide: &SlideId) -> Path {
    key(format!("tiles/{tiling}/{slide}.tissue.geojson"))
}

pub fn embedder_card(embedder: &EmbedderId) -> Path {
    key(format!("embedders/{embedder}/embedder.json"))
}

pub fn embedder_weights(embedder: &EmbedderId) -> Path {
    key(format!("embedders/{embedder}/model.safetensors"))
}

pub fn features(embedder: &EmbedderId, tiling: &TilingId, slide: &SlideId) -> Path {
    key(format!("{}/{slide}.parquet", features_prefix(embedder, tiling)))
}

/// Where every slide's features of one embedder and tiling are (a listing finds them all).
pub fn features_prefix(embedder: &EmbedderId, tiling: &TilingId) -> Path {
    key(format!("features/{embedder}/{tiling}"))
}

pub fn run_plan(run: &RunId) -> Path {
    key(format!("runs/{run}/plan.json"))
}

pub fn run_report(run: &RunId) -> Path {
    key(format!("runs/{run}/report.html"))
}

pub fn failures_prefix(run: &RunId) -> Path {
    key(format!("runs/{run}/failures"))
}

pub fn failure(run: &RunId, job: &JobId) -> Path {
    key(format!("runs/{run}/failures/{job}.json"))
}

pub fn round_dir(run: &RunId, round: u32) -> String {
    format!("runs/{run}/round-{round}")
}

pub fn fold_model(run: &RunId, round: u32, fold: u32) -> Path {
    key(format!("{}/fold-{fold}/model.safetensors", round_dir(run, round)))
}

pub fn fold_metrics(run: &RunId, round: u32, fold: u32) -> Path {
    key(format!("{}/fold-{fold}/metrics.json", round_dir(run, round)))
}

pub fn predictions_parquet(run: &RunId, round: u32) -> Path {
    key(format!("{}/predictions.parquet", round_dir(run, round)))
}

pub fn predictions_csv(run: &RunId, round: u32) -> Path {
    key(format!("{}/predictions.csv", round_dir(run, round)))
}

pub fn attention(run: &RunId, round: u32, slide: &SlideId) -> Path {
    key(format!("{}/attention/{slide}.parquet", round_dir(run, round)))
}

pub fn heatmap(run: &RunId, round: u32, slide: &SlideId) -> Path {
    key(format!("{}/heatmaps/{slide}.png", round_dir(run, round)))
}

/// The slide's patches and their attention as GeoJSON tiles QuPath imports.
pub fn attention_geojson(run: &RunId, round: u32, slide: &SlideId) -> Path {
    key(format!("{}/qupath/{slide}.geojson", round_dir(run, round)))
}

/// The [`crate::plan::EmbedderSpec`] of fold `fold`'s features in ICMIL round `round` ≥ 1.
pub fn fold_embedder(run: &RunId, round: u32, fold: u32) -> Path {
    key(format!("{}/fold-{fold}/embedder.json", round_dir(run, round)))
}

pub fn finetune_shard_weights(run: &RunId, round: u32, fold: u32, shard: u32) -> Path {
    key(format!("{}/fold-{fold}/finetune/shard-{shard}.safetensors", round_dir(run, round)))
}

/// Written after the shard's weights: its presence means the shard is done.
pub fn finetune_shard_report(run: &RunId, round: u32, fold: u32, shard: u32) -> Path {
    key(format!("{}/fold-{fold}/finetune/shard-{shard}.json", round_dir(run, round)))
}

pub fn round_metrics(run: &RunId, round: u32) -> Path {
    key(format!("{}/metrics.json", round_dir(run, round)))
}

pub fn final_model(run: &RunId, round: u32) -> Path {
    key(format!("{}/final/model.safetensors", round_dir(run, round)))
}

/// Written after the final model's weights: its presence means it is trained.
pub fn final_metrics(run: &RunId, round: u32) -> Path {
    key(format!("{}/final/metrics.json", round_dir(run, round)))
}

pub fn model_card(model: &ModelId) -> Path {
    key(format!("models/{model}/model.json"))
}

pub fn model_member(model: &ModelId, member: &str) -> Path {
    key(format!("models/{model}/{member}.safetensors"))
}

pub fn applied_plan(name: &RunId) -> Path {
    key(format!("applied/{name}/plan.json"))
}

pub fn applied_predictions_parquet(name: &RunId) -> Path {
    key(format!("applied/{name}/predictions.parquet"))
}

pub fn applied_predictions_csv(name: &RunId) -> Path {
    key(format!("applied/{name}/predictions.csv"))
}

/// An application's predictions pooled per patient (where the manifest names patients).
pub fn applied_patients_csv(name: &RunId) -> Path {
    key(format!("applied/{name}/patients.csv"))
}

pub fn applied_metrics(name: &RunId) -> Path {
    key(format!("applied/{name}/metrics.json"))
}

/// The application's "done" marker for a slide.
pub fn applied_attention(name: &RunId, slide: &SlideId) -> Path {
    key(format!("applied/{name}/attention/{slide}.parquet"))
}

pub fn applied_report(name: &RunId) -> Path {
    key(format!("applied/{name}/report.html"))
}

pub fn applied_heatmap(name: &RunId, slide: &SlideId) -> Path {
    key(format!("applied/{name}/heatmaps/{slide}.png"))
}

pub fn applied_attention_geojson(name: &RunId, slide: &SlideId) -> Path {
    key(format!("applied/{name}/qupath/{slide}.geojson"))
}

pub fn applied_failures_prefix(name: &RunId) -> Path {
    key(format!("applied/{name}/failures"))
}

pub fn applied_failure(name: &RunId, job: &JobId) -> Path {
    key(format!("applied/{name}/failures/{job}.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_nest_ids_as_documented() {
        let t = TilingId::new("t-1").unwrap();
        let e = EmbedderId::new("e-1").unwrap();
        let s = SlideId::new("s1").unwrap();
        let r = RunId::new("r").unwrap();
        assert_eq!(features(&e, &t, &s).as_ref(), "features/e-1/t-1/s1.parquet");
        assert_eq!(patch_grid(&t, &s).as_ref(), "tiles/t-1/s1.parquet");
        assert_eq!(fold_model(&r, 0, 3).as_ref(), "runs/r/round-0/fold-3/model.safetensors");
        assert_eq!(heatmap(&r, 1, &s).as_ref(), "runs/r/round-1/heatmaps/s1.png");
    }
}
