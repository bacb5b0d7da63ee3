//! ICMIL's merge: after a round's fine-tuning shards of a fold are done, the fold's new embedder is
//! their patch-count-weighted average ([`wsimil_common::models::icmil::average`]), stored under its
//! content address (`embedders/<architecture>-<sha256 prefix>/`) with a card naming its parent
//! embedder, run, round, fold and shards, and recorded as the fold's embedder of the round. Merging
//! is cheap (one pass over the weights), so the coordinator does it between the finetune and embed
//! stages; it is idempotent like every job: a merged fold is not merged again.

use anyhow::{bail, Context};
use wsimil_common::layout;
use wsimil_common::models::{icmil, params};
use wsimil_common::plan::{EmbedderSpec, RunPlan, WeightsRef};
use wsimil_common::records::{EmbedderCard, Lineage, ShardReport, WSIMIL_VERSION};
use wsimil_common::store::Store;

/// Merge fold `fold`'s fine-tuning shards of ICMIL round `round` (≥ 1) into its embedder.
pub async fn merge(store: &Store, plan: &RunPlan, round: u32, fold: u32) -> anyhow::Result<EmbedderSpec> {
    let key = layout::fold_embedder(&plan.run, round, fold);
    if store.exists(&key).await? {
        return Ok(store.get_json(&key).await?);
    }
    let cfg = plan.icmil.as_ref().context("the run has no ICMIL rounds")?;
    let parent = plan.fold_embedder(store, round - 1, fold).await?;
    let mut shards = Vec::new();
    let mut reports = Vec::new();
    for s in 0..cfg.shards {
        let report_key = layout::finetune_shard_report(&plan.run, round, fold, s);
        if !store.exists(&report_key).await? {
            continue; // failed: its reason is among the run's failures
        }
        let report: ShardReport = store.get_json(&report_key).await?;
        if report.patches > 0 {
            let bytes = store.get(&layout::finetune_shard_weights(&plan.run, round, fold, s)).await?;
            let tensors = params::load_safetensors(&bytes, &candle_core::Device::Cpu)
                .with_context(|| format!("ICMIL round {round}, fold {fold}, shard {s}: unreadable weights"))?;
            shards.push((tensors, report.patches as f64));
        }
        reports.push(report);
    }
    if shards.is_empty() {
        bail!(
            "ICMIL round {round}, fold {fold}: no fine-tuning shard produced weights ({} of {} shards finished, none \
             with a confident patch); see the failed finetune jobs",
            reports.len(),
            cfg.shards
        );
    }
    let bytes = tokio::task::spawn_blocking(move || -> candle_core::Result<Vec<u8>> {
        params::safetensors_bytes(&icmil::average(&shards)?)
    })
    .await??;
    let sha = wsimil_common::ids::sha256_hex(&bytes);
    let spec = EmbedderSpec { weights: WeightsRef::Sha256(sha.clone()), ..parent.clone() };
    let id = spec.id();
    if !store.exists(&layout::embedder_weights(&id)).await? {
        store.put(&layout::embedder_weights(&id), bytes).await?;
    }
    let parent_card: Option<EmbedderCard> = store.get_json(&layout::embedder_card(&parent.id())).await.ok();
    let card = EmbedderCard {
        id: id.clone(),
        architecture: spec.architecture.to_string(),
        weights_sha256: sha,
        source: None,
        parent: Some(parent.id()),
        lineage: Some(Lineage {
            run: plan.run.clone(),
            round,
            fold,
            method: "icmil".into(),
            settings: cfg.clone(),
            shards: reports,
        }),
        output: parent_card.as_ref().and_then(|c| c.output.clone()),
        feature_dim: parent_card.as_ref().and_then(|c| c.feature_dim),
        wsimil_version: Some(WSIMIL_VERSION.into()),
    };
    store.put_json(&layout::embedder_card(&id), &card).await?;
    store.put_json(&key, &spec).await?;
    tracing::info!(round, fold, embedder = %id, parent = %parent.id(), "ICMIL embedder merged");
    Ok(spec)
}
