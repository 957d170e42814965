//! Block devices by virtio serial: the host sets `serial=` on each virtio-blk device,
//! because probe order (`vda`, `vdb`, ...) differs between hypervisors.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use udos_layer::boot::DeviceRef;

use crate::error::Error;

const POLL: Duration = Duration::from_millis(10);

/// The `/dev/vdX` whose `/sys/block/vdX/serial` is `serial`, if present right now.
fn lookup(sys_block: &Path, dev: &Path, serial: &str) -> Option<PathBuf> {
    let entries = fs::read_dir(sys_block).ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("vd") {
            continue;
        }
        let Ok(found) = fs::read_to_string(entry.path().join("serial")) else {
            continue;
        };
        if found.trim() == serial {
            let node = dev.join(name);
            // devtmpfs creates the node right after the disk appears; wait for both.
            return node.exists().then_some(node);
        }
    }
    None
}

/// Resolves each target to a device path, waiting up to `timeout` for serials to appear.
/// `role` names the device in the error (`layer device udos-l2 not found`).
pub fn resolve(
    targets: &[DeviceRef],
    role: &'static str,
    timeout: Duration,
) -> Result<Vec<PathBuf>, Error> {
    let deadline = Instant::now() + timeout;
    let mut found: Vec<Option<PathBuf>> = targets
        .iter()
        .map(|t| match t {
            DeviceRef::Path(p) => Some(p.clone()),
            DeviceRef::Serial(_) => None,
        })
        .collect();
    loop {
        for (slot, target) in found.iter_mut().zip(targets) {
            if let (None, DeviceRef::Serial(serial)) = (&slot, target) {
                *slot = lookup(Path::new("/sys/block"), Path::new("/dev"), serial);
            }
        }
        if let Some(missing) = found.iter().position(Option::is_none) {
            if Instant::now() >= deadline {
                let serial = match &targets[missing] {
                    DeviceRef::Serial(s) => s.clone(),
                    DeviceRef::Path(p) => p.display().to_string(),
                };
                return Err(Error::DeviceNotFound { role, serial });
            }
            sleep(POLL);
            continue;
        }
        return Ok(found.into_iter().flatten().collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_disk_by_serial_not_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let dev = dir.path().join("dev");
        for (name, serial) in [("vda", "udos-l0"), ("vdb", "udos-out\n"), ("sda", "udos-x")] {
            fs::create_dir_all(sys.join(name)).unwrap();
            fs::write(sys.join(name).join("serial"), serial).unwrap();
        }
        fs::create_dir_all(&dev).unwrap();
        fs::write(dev.join("vdb"), "").unwrap();
        assert_eq!(lookup(&sys, &dev, "udos-out"), Some(dev.join("vdb")));
        // No node yet: not found (yet).
        assert_eq!(lookup(&sys, &dev, "udos-l0"), None);
        // Only vd* disks are virtio-blk.
        fs::write(dev.join("sda"), "").unwrap();
        assert_eq!(lookup(&sys, &dev, "udos-x"), None);
    }

    #[test]
    fn missing_serial_times_out_with_its_name() {
        let targets = [DeviceRef::Serial("udos-test-never-there".into())];
        let err = resolve(&targets, "layer", Duration::from_millis(30)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "layer device udos-test-never-there not found"
        );
        let paths = resolve(
            &[DeviceRef::Path("/dev/null".into())],
            "output",
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(paths, [PathBuf::from("/dev/null")]);
    }
}
