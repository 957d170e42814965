//! The udos layer stream (docs/layer-format.md).
//!
//! - [`record`]: the step record PID 1 writes beside the layer.
//! - [`format`](mod@format): the sealed-output header (magic, offsets, checksums).
//! - [`seal`]: PID 1's side: overlay upper dir -> OCI-style tar -> sealed output device.
//!   Synchronous and panic-free, for the static PID 1.
//! - [`output`]: the host's side: verify and read a sealed output device (untrusted).
//! - [`unpack`](mod@unpack): the host's side: extract a layer tar into overlay form, bounded and
//!   confined to the target directory.
//! - [`apply`](mod@apply): merge an overlay-form layer onto a directory (restore).
//! - [`squash`](mod@squash): merge a stack of overlay-form layers into one layer.

#![warn(missing_docs)]

pub mod apply;
pub mod format;
mod fsutil;
pub mod output;
pub mod record;
pub mod seal;
pub mod squash;
pub mod unpack;

pub use apply::{apply, ApplyError, ApplyStats};
pub use format::SealedHeader;
pub use output::{read_output, OutputError, ReadLimits, SealedOutput};
pub use record::{ActStep, LayerStats, RecordStatus, StepRecord, RECORD_VERSION};
pub use seal::{seal_output, write_layer_tar, SealError, SealLimits, SealSummary};
pub use squash::{prune_whiteouts, squash, SquashError, SquashStats};
pub use unpack::{unpack, UnpackError, UnpackLimits, UnpackSummary};
