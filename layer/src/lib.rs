//! The udos layer stream (docs/layer-format.md).
//!
//! - [`boot`]: the kernel command line, rendered by the host and parsed by PID 1.
//! - [`job`]: job mode's channel: frames and messages between the host and PID 1.
//! - [`secrets`]: the secrets device: what the host gives a step and PID 1 reads.
//! - [`mask`]: hiding secret values in text (PID 1's console, the host's logs).
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
pub mod boot;
pub mod format;
mod fsutil;
pub mod job;
pub mod mask;
pub mod output;
pub mod record;
pub mod seal;
pub mod secrets;
pub mod squash;
pub mod unpack;

pub use apply::{apply, ApplyError, ApplyStats};
pub use boot::{BootConfig, DeviceRef, Mode, NetConfig};
pub use format::SealedHeader;
pub use mask::Masker;
pub use output::{read_output, OutputError, ReadLimits, SealedOutput};
pub use record::{
    ActResult, ActStep, LayerStats, ReadSet, RecordStatus, StepRecord, MAX_READ_BYTES,
    MAX_READ_ENTRIES, RECORD_VERSION,
};
pub use seal::{
    seal_output, write_layer_tar, write_layer_tar_skipping, SealError, SealLimits, SealSummary,
};
pub use secrets::{SecretsError, StepSecrets};
pub use squash::{prune_whiteouts, squash, SquashError, SquashStats};
pub use unpack::{unpack, UnpackError, UnpackLimits, UnpackSummary};
