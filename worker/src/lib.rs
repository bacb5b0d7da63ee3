//! The wsimil worker: everything a job does.
//!
//! - [`slide`]: whole-slide image readers (OpenSlide through its C library).
//! - [`tissue`]: tissue detection (CLAM's recipe on a raster).
//! - [`contours`]: tissue contours as polygons and QuPath GeoJSON.
//! - [`tiling`]: the tile stage: overview, tissue mask, patch grid.
//! - [`resample`]: antialiased resizing.
//! - [`embed`]: the embed stage: patch reading, preprocessing, batched embedding.
//! - [`bags`]: feature bags streamed from the store within the worker's memory budget.
//! - [`train`]: the train stage: bag classifier training, early stopping, evaluation.
//! - [`heatmap`]: attention heatmaps over thumbnails.
//! - [`jobs`]: executing a job against the store.
//! - [`error`]: why a job failed, and the one decision whether to retry it.
//! - [`service`]: the worker process: pulling jobs from NATS JetStream, heartbeats, acks, drain.
//! - [`synth`], [`tiff`]: the semi-synthetic demo cohort, written as pyramidal TIFF slides.
//! - [`device`], [`device_check`]: device, precision and batch size; a device's kernels against the CPU's.

pub mod bags;
pub mod contours;
pub mod device;
pub mod device_check;
pub mod embed;
pub mod error;
pub mod finetune;
pub mod heatmap;
pub mod jobs;
pub mod resample;
pub mod service;
pub mod slide;
pub mod synth;
pub mod tiff;
pub mod tiling;
pub mod tissue;
pub mod train;
