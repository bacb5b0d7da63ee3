//! Where a worker's networks run and in what precision: `--device`, `--precision` and
//! `--embed-batch`, shared by `wsimil worker` and the embedded `wsimil run`.
//!
//! - `--device auto` (the default) takes the first CUDA device when this binary was built with the
//!   `cuda` feature and a device opens, else the CPU, and says which and why. `cuda:N` asks for one
//!   device and fails with the driver's reason if it cannot be opened; a binary built without the
//!   `cuda` feature says so instead of falling back silently.
//! - Embedding runs in bf16 on a GPU (`--precision auto`), f32 on the CPU. BatchNorm is folded in
//!   f32 before the weights are cast; the features come back as f32. Bag-classifier training and
//!   ICMIL fine-tuning always run in f32 on the same device.
//! - `--embed-batch auto` measures the embedder on the device at doubling batch sizes and keeps the
//!   fastest that fits in memory (see [`tune_batch`]); on the CPU it keeps the plan's batch size,
//!   since there throughput is flat past a few images.

use candle_core::{DType, Device, Tensor};
use std::fmt;
use std::str::FromStr;
use std::time::Instant;
use wsimil_common::models::embedder::Embedder;

/// `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(format!("unknown device {s:?} (auto, cpu, cuda, cuda:N)")),
            },
        }
    }
}

/// Was this binary built with the `cuda` feature?
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

impl DeviceChoice {
    /// Open the device; for `auto` also the reason a GPU was not taken (for the log).
    pub fn open(self) -> Result<(Device, Option<String>), String> {
        match self {
            DeviceChoice::Cpu => Ok((Device::Cpu, None)),
            DeviceChoice::Cuda(n) if !CUDA_BUILT => Err(format!(
                "--device cuda:{n}: this wsimil was built without CUDA support (scripts/build-cuda.sh builds one)"
            )),
            DeviceChoice::Cuda(n) => {
                Device::new_cuda(n).map(|d| (d, None)).map_err(|e| format!("--device cuda:{n}: {e}"))
            }
            DeviceChoice::Auto if !CUDA_BUILT => Ok((Device::Cpu, Some("built without CUDA support".into()))),
            DeviceChoice::Auto => match Device::new_cuda(0) {
                Ok(d) => Ok((d, None)),
                Err(e) => Ok((Device::Cpu, Some(format!("cuda:0 unavailable: {e}")))),
            },
        }
    }
}

/// `--precision`: the dtype embedders compute in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Precision {
    /// bf16 on a GPU, f32 on the CPU.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub fn dtype(self, device: &Device) -> DType {
        match self {
            Precision::Auto if device.is_cpu() => DType::F32,
            Precision::Auto | Precision::Bf16 => DType::BF16,
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
        }
    }
}

/// `--embed-batch`: the plan's batch size, a fixed one, or tuned on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchChoice {
    #[default]
    Plan,
    Fixed(usize),
    Auto,
}

impl FromStr for BatchChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "plan" => Ok(BatchChoice::Plan),
            "auto" => Ok(BatchChoice::Auto),
            _ => match s.parse() {
                Ok(n) if n > 0 => Ok(BatchChoice::Fixed(n)),
                _ => Err(format!("bad batch size {s:?} (plan, auto or a positive number)")),
            },
        }
    }
}

/// Where and how a worker computes.
#[derive(Clone)]
pub struct Compute {
    pub device: Device,
    /// The embedders' dtype.
    pub dtype: DType,
    pub batch: BatchChoice,
}

impl Compute {
    pub fn cpu() -> Self {
        Compute { device: Device::Cpu, dtype: DType::F32, batch: BatchChoice::Plan }
    }

    /// Open `device` and settle the precision; logs which device was taken.
    pub fn open(device: DeviceChoice, precision: Precision, batch: BatchChoice) -> Result<Self, String> {
        let (device, why_cpu) = device.open()?;
        if let Some(why) = why_cpu {
            tracing::info!("computing on the CPU: {why}");
        }
        let dtype = precision.dtype(&device);
        if device.is_cpu() && dtype != DType::F32 {
            // candle's CPU convolutions and matmuls in half precision are far slower than f32.
            return Err(format!("--precision {dtype:?} on the CPU: only f32 is supported there"));
        }
        Ok(Compute { device, dtype, batch })
    }

    /// `cpu f32`, `cuda:0 bf16`: recorded in every feature file's provenance.
    pub fn describe(&self) -> String {
        format!("{} {}", device_name(&self.device), self.dtype.as_str())
    }
}

impl fmt::Debug for Compute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Compute({}, batch {:?})", self.describe(), self.batch)
    }
}

/// `cpu`, `cuda:N`, `metal:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The batch sizes `--embed-batch auto` tries: from the first, doubling, up to the second.
pub const TUNED_BATCHES: (usize, usize) = (16, 1024);

/// One trial of [`tune_batch`].
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    pub batch: usize,
    /// Images per second, or why the batch did not run.
    pub rate: Result<f64, String>,
}

/// A device's allocation failed: what [`is_out_of_memory`] recognises besides CUDA's own errors
/// (code that runs out of memory itself, and the tests' stand-in for a full GPU).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("out of device memory")]
pub struct OutOfMemory;

impl From<OutOfMemory> for candle_core::Error {
    fn from(e: OutOfMemory) -> Self {
        candle_core::Error::Cuda(Box::new(e))
    }
}

/// The one test of whether an error means the device ran out of memory: the CUDA driver's
/// `CUDA_ERROR_OUT_OF_MEMORY`, cuBLAS's `CUBLAS_STATUS_ALLOC_FAILED`, or [`OutOfMemory`], looked
/// for by type through candle's wrappers (context, backtrace), never by message.
pub fn is_out_of_memory(e: &candle_core::Error) -> bool {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } | E::Context { inner, .. } | E::WithPath { inner, .. } => {
            is_out_of_memory(inner)
        }
        E::Cuda(b) => b.is::<OutOfMemory>() || cuda_out_of_memory(b.as_ref()),
        _ => false,
    }
}

#[cfg(feature = "cuda")]
fn cuda_out_of_memory(e: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    use candle_core::cuda_backend::{cudarc, CudaError};
    let driver = |d: &cudarc::driver::DriverError| d.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY;
    match e.downcast_ref::<CudaError>() {
        Some(CudaError::Cuda(d)) => driver(d),
        Some(CudaError::Cublas(c)) => c.0 == cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED,
        Some(_) => false,
        None => e.downcast_ref::<cudarc::driver::DriverError>().is_some_and(driver),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_out_of_memory(_: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    false
}

/// The batch size at which `embedder` runs fastest on `device` in `dtype`: batches of `start`,
/// 2·`start`, … up to `max` are each timed (best of two passes after a warm-up), stopping at the first
/// that runs out of memory or gains less than 5% over the best so far. Returns the fastest batch and
/// every trial. Errors other than running out of memory are returned as they are.
pub fn tune_batch(
    embedder: &dyn Embedder,
    device: &Device,
    dtype: DType,
    start: usize,
    max: usize,
) -> candle_core::Result<(usize, Vec<Trial>)> {
    let px = embedder.preprocessing().input_px as usize;
    let mut trials = Vec::new();
    let mut best: Option<(usize, f64)> = None;
    let mut batch = start.max(1);
    while batch <= max.max(1) {
        let rate = time_batch(embedder, device, dtype, batch, px);
        match rate {
            Ok(r) => {
                trials.push(Trial { batch, rate: Ok(r) });
                let gain = best.map(|(_, b)| r / b).unwrap_or(f64::INFINITY);
                if best.is_none_or(|(_, b)| r > b) {
                    best = Some((batch, r));
                }
                if gain < 1.05 {
                    break;
                }
            }
            Err(e) if is_out_of_memory(&e) => {
                trials.push(Trial { batch, rate: Err(e.to_string()) });
                break;
            }
            Err(e) => return Err(e),
        }
        batch *= 2;
    }
    match best {
        Some((b, _)) => Ok((b, trials)),
        None => candle_core::bail!("no batch size fits on {}: {:?}", device_name(device), trials),
    }
}

fn time_batch(
    embedder: &dyn Embedder,
    device: &Device,
    dtype: DType,
    batch: usize,
    px: usize,
) -> candle_core::Result<f64> {
    let x = Tensor::zeros((batch, 3, px, px), dtype, device)?;
    let run = || -> candle_core::Result<f64> {
        let t = Instant::now();
        let y = embedder.forward(&x)?;
        // Copying the result back waits for the device.
        y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(t.elapsed().as_secs_f64())
    };
    run()?;
    let secs = run()?.min(run()?);
    Ok(batch as f64 / secs.max(1e-9))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsimil_common::features::Preprocessing;

    #[test]
    fn device_precision_and_batch_flags_parse_and_reject_nonsense() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        assert!("cuda:x".parse::<DeviceChoice>().unwrap_err().contains("cuda:N"));
        assert!("tpu".parse::<DeviceChoice>().is_err());
        assert_eq!(<Precision as clap::ValueEnum>::from_str("bf16", false), Ok(Precision::Bf16));
        assert!(<Precision as clap::ValueEnum>::from_str("f8", false).is_err());
        assert_eq!("auto".parse(), Ok(BatchChoice::Auto));
        assert_eq!("64".parse(), Ok(BatchChoice::Fixed(64)));
        assert!("0".parse::<BatchChoice>().is_err());
    }

    #[test]
    fn auto_precision_is_f32_on_the_cpu_and_half_precision_there_is_refused() {
        assert_eq!(Precision::Auto.dtype(&Device::Cpu), DType::F32);
        assert_eq!(Precision::Bf16.dtype(&Device::Cpu), DType::BF16);
        let c = Compute::open(DeviceChoice::Cpu, Precision::Auto, BatchChoice::Plan).unwrap();
        assert_eq!(c.describe(), "cpu f32");
        let e = Compute::open(DeviceChoice::Cpu, Precision::Bf16, BatchChoice::Plan).unwrap_err();
        assert!(e.contains("only f32"), "{e}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_cuda_feature_cuda_is_refused_and_auto_takes_the_cpu() {
        let e = DeviceChoice::Cuda(0).open().unwrap_err();
        assert!(e.contains("built without CUDA"), "{e}");
        let (d, why) = DeviceChoice::Auto.open().unwrap();
        assert!(d.is_cpu());
        assert!(why.unwrap().contains("without CUDA"));
    }

    /// Runs at any batch up to `fits`, "out of memory" above; a pass takes `overhead + batch ·
    /// per_image`, so bigger batches are faster per image when there is an overhead.
    struct Sized {
        fits: usize,
        overhead_ms: u64,
        per_image_us: u64,
        /// Fails every pass with this instead.
        error: Option<&'static str>,
    }

    impl Embedder for Sized {
        fn architecture(&self) -> String {
            "sized".into()
        }
        fn feature_dim(&self) -> usize {
            2
        }
        fn preprocessing(&self) -> Preprocessing {
            Preprocessing { input_px: 4, resize: "x".into(), mean: [0.0; 3], std: [1.0; 3], resize_px: None }
        }
        fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            let b = x.dim(0)?;
            if let Some(e) = self.error {
                candle_core::bail!("{e}")
            }
            if b > self.fits {
                return Err(OutOfMemory.into());
            }
            let us = self.overhead_ms * 1000 + b as u64 * self.per_image_us;
            std::thread::sleep(std::time::Duration::from_micros(us));
            Tensor::zeros((b, 2), DType::F32, x.device())
        }
    }

    #[test]
    fn batch_tuning_doubles_until_memory_runs_out_and_keeps_the_fastest_that_fit() {
        let m = Sized { fits: 64, overhead_ms: 40, per_image_us: 250, error: None };
        let (b, trials) = tune_batch(&m, &Device::Cpu, DType::F32, 8, 1024).unwrap();
        assert_eq!(b, 64, "{trials:?}");
        let tried: Vec<usize> = trials.iter().map(|t| t.batch).collect();
        assert_eq!(tried, vec![8, 16, 32, 64, 128]);
        assert!(trials.last().unwrap().rate.as_ref().unwrap_err().contains("out of device memory"));
    }

    #[test]
    fn batch_tuning_stops_when_bigger_batches_stop_paying() {
        // No fixed overhead: every batch size runs at the same rate, so the first doubling gains < 5%.
        let m = Sized { fits: 1 << 20, overhead_ms: 0, per_image_us: 1000, error: None };
        let (b, trials) = tune_batch(&m, &Device::Cpu, DType::F32, 32, 4096).unwrap();
        assert!(trials.len() <= 3, "{trials:?}");
        assert!(b <= 128);
    }

    #[test]
    fn out_of_memory_is_recognised_by_type_through_candles_wrappers_and_not_by_message() {
        let oom: candle_core::Error = OutOfMemory.into();
        assert!(is_out_of_memory(&oom));
        assert!(is_out_of_memory(&candle_core::Error::from(OutOfMemory).bt()));
        assert!(is_out_of_memory(&candle_core::Error::from(OutOfMemory).context("batch of 256")));
        // A message that merely mentions it is not one.
        assert!(!is_out_of_memory(&candle_core::Error::Msg("out of memory".into())));
        assert!(!is_out_of_memory(&candle_core::Error::Msg("shape mismatch".into())));
    }

    #[test]
    fn batch_tuning_passes_other_errors_on() {
        let m = Sized { fits: 64, overhead_ms: 0, per_image_us: 0, error: Some("shape mismatch") };
        let e = tune_batch(&m, &Device::Cpu, DType::F32, 8, 64).unwrap_err();
        assert!(e.to_string().contains("shape mismatch"));
    }
}
