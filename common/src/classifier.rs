//! A trained model, ready to apply to new slides: one bag classifier or several (an ensemble whose
//! class probabilities are averaged), the classes they predict, and where their features must come
//! from (the embedder and the tiling each was trained on). Its card, [`ModelCard`], is what
//! `wsimil predict` reads, what `wsimil export-model` writes beside the weights into a
//! self-contained folder, and what `wsimil import-model` writes for a checkpoint trained elsewhere.
//!
//! An application of a model to a cohort, [`ApplyPlan`], lives under `applied/<name>/`: its
//! predictions, attention maps and heatmaps, and its metrics when the cohort has labels.

pub use crate::ids::ModelId;
use crate::ids::{content_hash, EmbedderId, RunId, SlideId, TilingId};
use crate::models::BagModelConfig;
use crate::plan::{EmbedderSpec, Head, TilingSpec, IMPORTED_TILING};
use crate::records::WSIMIL_VERSION;
use serde::{Deserialize, Serialize};

/// The card's format; a card of another format is refused.
pub const MODEL_FORMAT: &str = "wsimil-model";
/// The card's layout version: a wsimil reads cards up to its own version.
pub const MODEL_FORMAT_VERSION: u32 = 1;

/// One classifier of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// Its name, and the stem of its weights file (`fold-0`, `final`, `imported`).
    pub name: String,
    pub config: BagModelConfig,
    /// SHA-256 of its safetensors file.
    pub weights_sha256: String,
    /// The embedder its features come from (ICMIL rounds give each fold its own).
    pub embedder: EmbedderSpec,
}

/// Where a model came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ModelSource {
    /// The fold models (or the final model) of a wsimil run's round.
    Run { run: RunId, round: u32, members: String },
    /// A checkpoint trained elsewhere, imported by `wsimil import-model`.
    Imported { file: String, sha256: String, format: String },
}

/// What a model was trained on and how well it did, for the card's reader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    pub slides: usize,
    /// Slides per class, in the order of the classes.
    pub per_class: Vec<usize>,
    /// Cross-validation AUC over folds (mean, sd) and pooled out-of-fold, when known.
    pub cv_auc_mean: Option<f64>,
    pub cv_auc_sd: Option<f64>,
    pub cv_auc_pooled: Option<f64>,
    /// Epochs of the final model, chosen from the folds' best epochs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
}

/// `models/<id>/model.json`, and `model.json` of an exported folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    pub format: String,
    pub format_version: u32,
    pub wsimil_version: String,
    pub id: ModelId,
    pub classes: Vec<String>,
    /// How the members combine: their class probabilities are averaged.
    pub ensemble: String,
    pub members: Vec<Member>,
    /// How the slides were tiled (patch size, resolution, tissue detection).
    pub tiling: TilingSpec,
    pub source: ModelSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingSummary>,
    /// How the members' logits are read: class probabilities (absent), or a survival model's
    /// curve over time bins or risk; members' outputs are averaged either way.
    #[serde(default, skip_serializing_if = "Head::is_classes")]
    pub head: Head,
}

impl ModelCard {
    /// A card for `members` with an id derived from what it holds (members' weights, classes,
    /// tiling), so the same model gets the same id wherever it is registered.
    pub fn new(
        name_hint: &str,
        classes: Vec<String>,
        members: Vec<Member>,
        tiling: TilingSpec,
        source: ModelSource,
        training: Option<TrainingSummary>,
    ) -> Self {
        let parts = serde_json::to_vec(&(&classes, &members, &tiling)).expect("json");
        let hint: String = name_hint
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' })
            .take(80)
            .collect();
        let id = ModelId::new(format!("{}-{}", hint.trim_start_matches(['-', '.']), content_hash([parts.as_slice()])))
            .expect("sanitised");
        ModelCard {
            format: MODEL_FORMAT.into(),
            format_version: MODEL_FORMAT_VERSION,
            wsimil_version: WSIMIL_VERSION.into(),
            id,
            classes,
            ensemble: if members.len() == 1 {
                "one classifier".into()
            } else {
                format!("the mean of {} classifiers' class probabilities", members.len())
            },
            members,
            tiling,
            source,
            training,
            head: Head::Classes,
        }
    }

    /// The card of a survival model (`head` other than classes).
    pub fn with_head(mut self, head: Head) -> Self {
        self.head = head;
        self
    }

    /// Read a card, refusing one this wsimil cannot read by what differs: its format and version
    /// are looked at first, so that a card from a later wsimil whose fields have changed is told
    /// apart from a file that is not a card at all.
    pub fn parse(bytes: &[u8]) -> Result<ModelCard, String> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let field = |name: &str| value.get(name).cloned().unwrap_or(serde_json::Value::Null);
        let (format, version) = (field("format"), field("format_version"));
        if format.as_str() != Some(MODEL_FORMAT) {
            return Err(format!("not a wsimil model (format {format}, expected {MODEL_FORMAT:?})"));
        }
        if version.as_u64().is_some_and(|v| v > u64::from(MODEL_FORMAT_VERSION)) {
            return Err(format!(
                "written by wsimil {} in model format {version}; this wsimil {WSIMIL_VERSION} reads format {MODEL_FORMAT_VERSION} at most",
                field("wsimil_version").as_str().unwrap_or("(unknown)")
            ));
        }
        let card: ModelCard = serde_json::from_value(value).map_err(|e| format!("not a wsimil model card: {e}"))?;
        card.check_compatible()?;
        Ok(card)
    }

    /// Refuse a card this wsimil cannot read, saying what differs.
    pub fn check_compatible(&self) -> Result<(), String> {
        if self.format != MODEL_FORMAT {
            return Err(format!("not a wsimil model (format {:?}, expected {MODEL_FORMAT:?})", self.format));
        }
        if self.format_version > MODEL_FORMAT_VERSION {
            return Err(format!(
                "written by wsimil {} in model format {}; this wsimil {WSIMIL_VERSION} reads format {MODEL_FORMAT_VERSION} at most",
                self.wsimil_version, self.format_version
            ));
        }
        if self.members.is_empty() {
            return Err("the model has no classifier".into());
        }
        Ok(())
    }

    /// The distinct embedders of the members, in order.
    pub fn embedders(&self) -> Vec<EmbedderSpec> {
        let mut out: Vec<EmbedderSpec> = Vec::new();
        for m in &self.members {
            if !out.iter().any(|e| e.id() == m.embedder.id()) {
                out.push(m.embedder.clone());
            }
        }
        out
    }
}

/// A slide of a cohort a model is applied to; its label is optional.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppliedSlide {
    pub id: SlideId,
    pub path: String,
    /// Index into the model's classes, when the manifest gives one.
    pub label: Option<usize>,
    pub mpp: Option<f64>,
    /// Its follow-up, when the manifest gives one (a survival model is then judged by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub survival: Option<crate::plan::SurvivalTarget>,
    /// The patient it is from, when the manifest names one (its slides are then pooled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
}

/// `applied/<name>/plan.json`: a model applied to a cohort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplyPlan {
    pub name: RunId,
    pub model: ModelId,
    pub classes: Vec<String>,
    pub slides: Vec<AppliedSlide>,
    pub tiling: TilingSpec,
    pub embedders: Vec<EmbedderSpec>,
    /// Features imported under this name are scored (no tile or embed stage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported: Option<EmbedderId>,
    /// How the model's logits are read (the card's).
    #[serde(default, skip_serializing_if = "Head::is_classes")]
    pub head: Head,
}

impl ApplyPlan {
    pub fn slide(&self, id: &SlideId) -> Option<&AppliedSlide> {
        self.slides.iter().find(|s| &s.id == id)
    }

    /// Whether the manifest named the slides' patients.
    pub fn has_patients(&self) -> bool {
        self.slides.iter().any(|s| s.patient.is_some())
    }

    /// `slides` (ids of this application's slides) grouped by patient, as
    /// [`crate::plan::RunPlan::patient_groups`] groups a run's.
    pub fn patient_groups(&self, slides: &[&str]) -> Vec<Vec<usize>> {
        let patient: std::collections::HashMap<&str, &str> =
            self.slides.iter().filter_map(|s| Some((s.id.as_str(), s.patient.as_deref()?))).collect();
        crate::plan::group_by_patient(slides, |s| patient.get(s).copied())
    }

    /// The patient of a slide, by id.
    pub fn patient_of(&self, slide: &str) -> Option<&str> {
        self.slides.iter().find(|s| s.id.as_str() == slide).and_then(|s| s.patient.as_deref())
    }

    /// Where the features of an embedder of the model are: `features/<embedder>/<tiling>/`.
    pub fn features_of(&self, embedder: &EmbedderSpec) -> (EmbedderId, TilingId) {
        match &self.imported {
            Some(name) => (name.clone(), TilingId::new(IMPORTED_TILING).expect("safe")),
            None => (embedder.id(), self.tiling.id()),
        }
    }

    /// Every embedder's feature location, once each.
    pub fn feature_ids(&self) -> Vec<(EmbedderId, TilingId)> {
        self.embedders.iter().map(|e| self.features_of(e)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::TissueParams;
    use crate::models::zoo::Architecture;
    use crate::models::{BagModelConfig, BagModelKind};

    fn card(weights: &str) -> ModelCard {
        let tiling = TilingSpec {
            patch_px: 256,
            target_mpp: 0.5,
            step_fraction: 1.0,
            min_tissue_fraction: 0.25,
            tissue: TissueParams::tcga(),
        };
        let embedder = EmbedderSpec {
            architecture: Architecture::ResNet50Trunc,
            weights: crate::plan::WeightsRef::Sha256("ab".repeat(32)),
            batch_size: 16,
            corrupt_tiles: Default::default(),
        };
        let members = vec![Member {
            name: "fold-0".into(),
            config: BagModelConfig::new(BagModelKind::Abmil, 1024, 2),
            weights_sha256: weights.into(),
            embedder,
        }];
        let source = ModelSource::Run { run: RunId::new("r").unwrap(), round: 0, members: "folds".into() };
        ModelCard::new("run r/round 0", vec!["a".into(), "b".into()], members, tiling, source, None)
    }

    #[test]
    fn ids_follow_the_content_and_cards_round_trip() {
        let (a, b, c) = (card("w1"), card("w1"), card("w2"));
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert!(a.id.as_str().starts_with("run-r-round-0-"), "{}", a.id);
        let back: ModelCard = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back, a);
        assert!(a.check_compatible().is_ok());
    }

    #[test]
    fn a_card_from_a_newer_format_or_another_tool_is_refused_saying_why() {
        let mut newer = card("w");
        newer.format_version = MODEL_FORMAT_VERSION + 1;
        newer.wsimil_version = "9.0.0".into();
        let e = newer.check_compatible().unwrap_err();
        assert!(e.contains("wsimil 9.0.0") && e.contains("reads format 1 at most"), "{e}");
        let mut other = card("w");
        other.format = "sklearn".into();
        assert!(other.check_compatible().unwrap_err().contains("not a wsimil model"));
    }

    #[test]
    fn a_card_is_read_by_its_version_before_its_fields() {
        let ok = card("w");
        assert_eq!(ModelCard::parse(&serde_json::to_vec(&ok).unwrap()).unwrap(), ok);
        // A later format whose fields changed: named by its version, not as an unreadable file.
        let mut later = serde_json::to_value(&ok).unwrap();
        later["format_version"] = serde_json::json!(MODEL_FORMAT_VERSION + 1);
        later["wsimil_version"] = serde_json::json!("9.0.0");
        later["members"] = serde_json::json!({"moved": "elsewhere"});
        let e = ModelCard::parse(&serde_json::to_vec(&later).unwrap()).unwrap_err();
        assert!(e.contains("written by wsimil 9.0.0 in model format 2"), "{e}");
        let e = ModelCard::parse(br#"{"format": "sklearn"}"#).unwrap_err();
        assert!(e.contains("not a wsimil model (format \"sklearn\""), "{e}");
        let mut broken = serde_json::to_value(&ok).unwrap();
        broken["members"] = serde_json::json!(3);
        assert!(ModelCard::parse(&serde_json::to_vec(&broken).unwrap())
            .unwrap_err()
            .contains("not a wsimil model card"));
        assert!(ModelCard::parse(b"<html>").unwrap_err().starts_with("not JSON"));
    }
}
