//! The patch embedders wsimil knows, by name: [`Architecture`] is what `--embedder` takes, what a
//! run's plan records and what an embedder id starts with; it builds the network and says how its
//! patches are prepared.

use super::embedder::{Embedder, Tune};
use crate::features::Preprocessing;
use candle_core::Result;
use candle_nn::VarBuilder;
use std::fmt;
use std::str::FromStr;

/// A patch embedder by name. Serialised as its name (`efficientnet-lite0`, ...), the strings plans
/// have always held.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// EfficientNet-Lite0, ImageNet (1280-d): the CPU default.
    EfficientNetLite0,
    /// ResNet50 truncated after layer3 + average pool (1024-d): CLAM's default.
    ResNet50Trunc,
    /// Features imported from elsewhere (`wsimil import-bags`, `import-clam`): nothing to build.
    Imported,
}

impl Architecture {
    /// Every name `--embedder` takes.
    pub fn names() -> Vec<String> {
        ["efficientnet-lite0", "resnet50-trunc"].into_iter().map(String::from).collect()
    }

    pub fn name(&self) -> String {
        match self {
            Architecture::EfficientNetLite0 => "efficientnet-lite0".into(),
            Architecture::ResNet50Trunc => "resnet50-trunc".into(),
            Architecture::Imported => "imported".into(),
        }
    }

    /// How the network wants its patches.
    pub fn preprocessing(&self) -> Option<Preprocessing> {
        match self {
            Architecture::EfficientNetLite0 => Some(super::efficientnet::preprocessing()),
            Architecture::ResNet50Trunc => Some(super::resnet::preprocessing()),
            Architecture::Imported => None,
        }
    }

    /// Build the network from `vb` (a checkpoint's tensors, or seeded random ones) for inference.
    pub fn build(&self, vb: VarBuilder) -> Result<Box<dyn Embedder>> {
        self.build_tuned(vb, Tune::Frozen)
    }

    /// Build the network with the layers `tune` names trainable (ICMIL's student).
    pub fn build_tuned(&self, vb: VarBuilder, tune: Tune) -> Result<Box<dyn Embedder>> {
        match self {
            Architecture::EfficientNetLite0 => {
                Ok(Box::new(super::efficientnet::EfficientNetLite::lite0_tuned(vb, tune)?))
            }
            Architecture::ResNet50Trunc => Ok(Box::new(super::resnet::ResNetTrunc::resnet50_tuned(vb, tune)?)),
            Architecture::Imported => candle_core::bail!("imported features have no embedder to build"),
        }
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Why a name is not an embedder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown embedder {name:?} (known: {})", Architecture::names().join(", "))]
pub struct UnknownArchitecture {
    pub name: String,
}

impl FromStr for Architecture {
    type Err = UnknownArchitecture;

    fn from_str(s: &str) -> std::result::Result<Self, UnknownArchitecture> {
        match s {
            "efficientnet-lite0" => Ok(Architecture::EfficientNetLite0),
            "resnet50-trunc" => Ok(Architecture::ResNet50Trunc),
            "imported" => Ok(Architecture::Imported),
            _ => Err(UnknownArchitecture { name: s.to_string() }),
        }
    }
}

impl serde::Serialize for Architecture {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Architecture {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::params::Params;
    use candle_core::{DType, Device, Tensor, Var};
    use std::collections::BTreeMap;

    #[test]
    fn names_round_trip_and_unknown_ones_list_the_known() {
        for name in Architecture::names() {
            let a: Architecture = name.parse().unwrap();
            assert_eq!(a.to_string(), name);
            assert_eq!(serde_json::to_string(&a).unwrap(), format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<Architecture>(&format!("\"{name}\"")).unwrap(), a);
        }
        let err = "resnet51".parse::<Architecture>().unwrap_err().to_string();
        assert!(err.contains("resnet51") && err.contains("efficientnet-lite0"), "{err}");
        assert!(serde_json::from_str::<Architecture>("\"resnet51\"").is_err());
    }

    /// The half-precision path is the one a GPU runs (broadcast bias and activation instead of the
    /// fused CPU op). candle's CPU matmul has f16 but not bf16, so f16 stands in for it here: the
    /// features must match f32's to half precision. (EfficientNet-Lite0 with random weights has
    /// features near 1e-9, below f16's range: it is checked with its real weights on real patches
    /// in the worker's slide tests.)
    #[test]
    fn half_precision_embedders_fold_in_f32_and_match_the_f32_features() {
        let arch = Architecture::ResNet50Trunc;
        let p = Params::new(3);
        let full = arch.build(p.var_builder(&Device::Cpu)).unwrap();
        let half = arch.build(p.var_builder_as(&Device::Cpu, DType::F16)).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 48, 48), &Device::Cpu).unwrap();
        let a = full.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let hb = half.forward(&x.to_dtype(DType::F16).unwrap()).unwrap();
        assert_eq!(hb.dtype(), DType::F16, "{arch}");
        let b = hb.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let diff: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
        let rel = norm(&diff) / norm(&a);
        assert!(norm(&a) > 0.0 && rel < 0.02, "{arch}: f16 features differ from f32 by {rel}");
    }

    #[test]
    fn only_the_named_blocks_of_an_embedder_receive_gradients() {
        for (arch, last, trained, frozen, stem) in [
            (
                Architecture::EfficientNetLite0,
                1,
                ["_blocks.15._project_conv.weight", "_conv_head.weight"],
                "_blocks.14._project_conv.weight",
                "_conv_stem.weight",
            ),
            (
                Architecture::ResNet50Trunc,
                2,
                ["layer3.4.conv1.weight", "layer3.5.bn3.weight"],
                "layer3.3.conv3.weight",
                "conv1.weight",
            ),
        ] {
            let p = Params::new(0);
            let m = arch.build_tuned(p.var_builder(&Device::Cpu), Tune::LastBlocks(last)).unwrap();
            let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &Device::Cpu).unwrap();
            let grads = m.forward(&x).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let vars: BTreeMap<String, Var> = p.named_vars().into_iter().collect();
            for name in trained {
                assert!(grads.get(&vars[name]).is_some(), "{arch}: {name} should train");
            }
            assert!(grads.get(&vars[frozen]).is_none(), "{arch}: {frozen} should be frozen");
            assert!(grads.get(&vars[stem]).is_none(), "{arch}: the stem should be frozen");
        }
    }
}
