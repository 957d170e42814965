//! The step's outcome: the step record, sealed onto the output device, and the
//! `UDOS-RESULT` console line.

use std::path::Path;
use std::time::Duration;

use udos_layer::boot::DeviceRef;
use udos_layer::seal::{seal_output, SealLimits};
use udos_layer::{RecordStatus, StepRecord};

use crate::console::{error, info};
use crate::devices;

/// The status word of `UDOS-RESULT` (and of the record's JSON).
pub fn status_word(status: RecordStatus) -> &'static str {
    match status {
        RecordStatus::Success => "success",
        RecordStatus::Failure => "failure",
        RecordStatus::Error => "error",
    }
}

/// Seals `record` (and the layer of `upper`) onto the output device. Returns false when
/// an output device was configured but could not be sealed: the host will then see
/// "the guest did not seal".
pub fn seal(
    output: Option<&DeviceRef>,
    upper: Option<&Path>,
    record: &mut StepRecord,
    device_timeout: Duration,
) -> bool {
    let Some(target) = output else {
        info!("no udos.output: nothing to seal");
        return true;
    };
    let device = match devices::resolve(&[(target, "output")], device_timeout) {
        Ok(found) => found.into_iter().next(),
        Err(e) => {
            error!("{e}");
            return false;
        }
    };
    let Some(device) = device else {
        return false;
    };
    match seal_output(&device, upper, record, &SealLimits::default()) {
        Ok(summary) => {
            if let Some(why) = &summary.layer_error {
                error!("{why}");
            }
            info!(
                "sealed layer {} ({} entries, {} bytes) and the record on {}",
                summary.layer_id,
                summary.stats.entries,
                summary.layer_len,
                device.display()
            );
            true
        }
        Err(e) => {
            error!("seal {}: {e}", device.display());
            false
        }
    }
}
