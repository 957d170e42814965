//! The step's secrets (`udos.secrets`): read from their device, by serial like the
//! other devices (a path in harness mode), and kept in memory only.

use std::fs::File;
use std::time::Duration;

use udos_layer::boot::DeviceRef;
use udos_layer::StepSecrets;

use crate::devices;
use crate::error::Error;

/// Finds the secrets device and decodes it (bounded: header and at most 1 MiB of JSON).
pub fn load(device: &DeviceRef, timeout: Duration) -> Result<StepSecrets, Error> {
    let found = devices::resolve(&[(device, "secrets")], timeout)?;
    let Some(path) = found.into_iter().next() else {
        return Err(Error::DeviceNotFound {
            role: "secrets",
            serial: device.to_string(),
        });
    };
    let file = File::open(&path).map_err(|e| Error::io("open", &path, e))?;
    StepSecrets::read_from(file).map_err(|error| Error::Secrets {
        device: path,
        error,
    })
}
