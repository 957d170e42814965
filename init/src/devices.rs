//! Block devices by virtio serial: the host sets `serial=` on each virtio-blk device,
//! because probe order (`vda`, `vdb`, ...) differs between hypervisors.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use udos_layer::boot::DeviceRef;

use crate::error::Error;

/// The longest wait between two scans; the first waits are shorter (disks usually
/// appear within a few ms of PID 1's start, and a step VM waits for every one of them).
const POLL: Duration = Duration::from_millis(10);

/// Every virtio disk under `sys_block` by its serial: the node in `dev` of each that has
/// one. Each serial is read once per scan: reading it asks the device (a round trip
/// to the hypervisor), so looking disks up one by one would ask every disk again for
/// each of them.
fn scan(sys_block: &Path, dev: &Path) -> BTreeMap<String, PathBuf> {
    let Ok(entries) = fs::read_dir(sys_block) else {
        return BTreeMap::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_str()?.to_string();
            if !name.starts_with("vd") {
                return None;
            }
            let serial = fs::read_to_string(entry.path().join("serial")).ok()?;
            let node = dev.join(&name);
            node.exists().then(|| (serial.trim().to_string(), node))
        })
        .collect()
}

/// Resolves each target to a device path, waiting up to `timeout` for serials to appear.
/// Each target comes with its role, which names it in the error (`layer device udos-l2
/// not found`): disks of several roles are found by the same scans.
pub fn resolve(
    targets: &[(&DeviceRef, &'static str)],
    timeout: Duration,
) -> Result<Vec<PathBuf>, Error> {
    let deadline = Instant::now() + timeout;
    let mut found: Vec<Option<PathBuf>> = targets
        .iter()
        .map(|(t, _)| match t {
            DeviceRef::Path(p) => Some(p.clone()),
            DeviceRef::Serial(_) => None,
        })
        .collect();
    let mut nap = Duration::from_millis(1);
    loop {
        if found.iter().any(Option::is_none) {
            let disks = scan(Path::new("/sys/block"), Path::new("/dev"));
            for (slot, (target, _)) in found.iter_mut().zip(targets) {
                if let (None, DeviceRef::Serial(serial)) = (&slot, target) {
                    *slot = disks.get(serial).cloned();
                }
            }
        }
        if let Some(missing) = found.iter().position(Option::is_none) {
            if Instant::now() >= deadline {
                let (target, role) = targets[missing];
                return Err(Error::DeviceNotFound {
                    role,
                    serial: target.to_string(),
                });
            }
            sleep(nap);
            nap = (nap * 2).min(POLL);
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
        let disks = scan(&sys, &dev);
        assert_eq!(disks.get("udos-out"), Some(&dev.join("vdb")));
        // No node yet: not found (yet).
        assert_eq!(disks.get("udos-l0"), None);
        // Only vd* disks are virtio-blk.
        fs::write(dev.join("sda"), "").unwrap();
        assert_eq!(scan(&sys, &dev).get("udos-x"), None);
        fs::write(dev.join("vda"), "").unwrap();
        assert_eq!(
            scan(&sys, &dev).into_iter().collect::<Vec<_>>(),
            [
                ("udos-l0".to_string(), dev.join("vda")),
                ("udos-out".to_string(), dev.join("vdb"))
            ]
        );
    }

    #[test]
    fn missing_serial_times_out_with_its_name_and_role() {
        let (never, null) = (
            DeviceRef::Serial("udos-test-never-there".into()),
            DeviceRef::Path("/dev/null".into()),
        );
        let err = resolve(&[(&never, "layer")], Duration::from_millis(30)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "layer device udos-test-never-there not found"
        );
        // Found ones do not hide a missing one, which is named by its own role.
        let err = resolve(
            &[(&null, "layer"), (&never, "upper")],
            Duration::from_millis(30),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "upper device udos-test-never-there not found"
        );
        let paths = resolve(&[(&null, "output")], Duration::ZERO).unwrap();
        assert_eq!(paths, [PathBuf::from("/dev/null")]);
    }
}
