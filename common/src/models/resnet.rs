//! ResNet50 truncated after `layer3`, global-average-pooled to 1024-d (He et al., CVPR 2016; the
//! patch encoder of CLAM, Lu et al., Nature BME 2021). Parameter names are torchvision's (and timm's
//! `resnet50.tv_in1k`), so their safetensors load directly; `fc` and `layer4` are never read.

use super::convbn::{global_avg_pool, ConvBn, ConvKind};
use super::embedder::{Embedder, Tune};
use super::ops::Act;
use crate::features::Preprocessing;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

const BN_EPS: f64 = 1e-5;

struct Bottleneck {
    conv1: ConvBn,
    conv2: ConvBn,
    conv3: ConvBn,
    downsample: Option<ConvBn>,
}

impl Bottleneck {
    fn new(cin: usize, planes: usize, stride: usize, vb: VarBuilder, train: bool) -> Result<Self> {
        let out = planes * 4;
        let downsample = if stride != 1 || cin != out {
            let kind = if stride == 1 { ConvKind::Pointwise } else { ConvKind::Dense { stride, pad: 0 } };
            Some(ConvBn::load_as((out, cin, 1, 1), vb.pp("downsample.0"), vb.pp("downsample.1"), BN_EPS, kind, train)?)
        } else {
            None
        };
        Ok(Bottleneck {
            conv1: ConvBn::load_as(
                (planes, cin, 1, 1),
                vb.pp("conv1"),
                vb.pp("bn1"),
                BN_EPS,
                ConvKind::Pointwise,
                train,
            )?,
            conv2: ConvBn::load_as(
                (planes, planes, 3, 3),
                vb.pp("conv2"),
                vb.pp("bn2"),
                BN_EPS,
                ConvKind::Dense { stride, pad: 1 },
                train,
            )?,
            conv3: ConvBn::load_as(
                (out, planes, 1, 1),
                vb.pp("conv3"),
                vb.pp("bn3"),
                BN_EPS,
                ConvKind::Pointwise,
                train,
            )?,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward_act(x, Act::Relu)?;
        let h = self.conv2.forward_act(&h, Act::Relu)?;
        let skip = match &self.downsample {
            Some(d) => d.forward(x)?,
            None => x.clone(),
        };
        self.conv3.forward_residual_act(&h, &skip, Act::Relu)
    }
}

/// ImageNet normalisation at 224 px.
pub fn preprocessing() -> Preprocessing {
    Preprocessing {
        input_px: 224,
        resize: "area-average then bilinear".into(),
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
        resize_px: None,
    }
}

pub struct ResNetTrunc {
    stem: ConvBn,
    layers: Vec<Bottleneck>,
}

impl ResNetTrunc {
    /// ResNet50's stem and layers 1–3 (3, 4 and 6 bottlenecks).
    pub fn resnet50(vb: VarBuilder) -> Result<Self> {
        Self::resnet50_tuned(vb, Tune::Frozen)
    }

    /// The same network with the layers `tune` names trainable.
    pub fn resnet50_tuned(vb: VarBuilder, tune: Tune) -> Result<Self> {
        let stem = ConvBn::load_as(
            (64, 3, 7, 7),
            vb.pp("conv1"),
            vb.pp("bn1"),
            BN_EPS,
            ConvKind::Dense { stride: 2, pad: 3 },
            tune.trains_stem(),
        )?;
        let mut layers = Vec::new();
        let mut cin = 64;
        for (li, (blocks, planes, stride)) in [(3, 64, 1), (4, 128, 2), (6, 256, 2)].into_iter().enumerate() {
            for bi in 0..blocks {
                let s = if bi == 0 { stride } else { 1 };
                let train = tune.trains(layers.len(), 13);
                layers.push(Bottleneck::new(cin, planes, s, vb.pp(format!("layer{}.{bi}", li + 1)), train)?);
                cin = planes * 4;
            }
        }
        Ok(ResNetTrunc { stem, layers })
    }
}

impl Embedder for ResNetTrunc {
    fn architecture(&self) -> String {
        "resnet50-trunc".into()
    }

    fn feature_dim(&self) -> usize {
        1024
    }

    fn preprocessing(&self) -> Preprocessing {
        preprocessing()
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.stem.forward_act(x, Act::Relu)?;
        // Max pool 3×3, stride 2, padding 1: after ReLU every value is ≥ 0, so zero padding is
        // equivalent to PyTorch's -inf padding.
        let mut h = h.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?.max_pool2d_with_stride(3, 2)?;
        for l in &self.layers {
            h = l.forward(&h)?;
        }
        global_avg_pool(&h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::params::Params;
    use candle_core::{DType, Device};

    #[test]
    fn resnet50_trunc_reads_torchvision_names_and_gives_1024_d() {
        let p = Params::new(0);
        let m = ResNetTrunc::resnet50(p.var_builder(&Device::Cpu)).unwrap();
        let names: Vec<String> = p.named_vars().into_iter().map(|(k, _)| k).collect();
        for n in [
            "conv1.weight",
            "bn1.running_var",
            "layer1.0.downsample.0.weight",
            "layer3.5.bn3.bias",
            "layer2.0.downsample.1.weight",
        ] {
            assert!(names.iter().any(|x| x == n), "missing {n}");
        }
        assert!(!names.iter().any(|x| x.starts_with("layer4") || x.starts_with("fc")));
        let x = Tensor::zeros((1, 3, 224, 224), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.forward(&x).unwrap().dims(), &[1, 1024]);
    }
}
