//! The udos layer stream (docs/layer-format.md).
//!
//! - [`record`]: the step record PID 1 writes beside the layer.
//! - `seal`: PID 1's side: overlay upper dir -> OCI-style tar -> sealed output device.
//! - `output`: the host's side: verify and read a sealed output device (untrusted).
//! - `unpack`: the host's side: extract a layer tar into overlay form, bounded and
//!   confined to the target directory.
//! - `apply`: merge an overlay-form layer onto a directory (restore).

pub mod record;

pub use record::{ActStep, LayerStats, RecordStatus, StepRecord, RECORD_VERSION};
