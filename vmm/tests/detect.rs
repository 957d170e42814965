//! The KVM probe and hypervisor selection on this machine.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use udos_vmm::{
    probe_kvm, select, Accel, Hypervisor, HypervisorChoice, ProbeInput, Qemu, VmExit, VmSpec,
    VmmError, CLOUD_HYPERVISOR_ENV, PROBE_MARKER, PROBE_TIMEOUT,
};

/// kvm-pvm (a VM without nested VT-x/SVM) runs no stock kernel.
fn host_is_kvm_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

fn probe_input(dir: &Path) -> ProbeInput {
    ProbeInput {
        kernel: kernel(),
        initramfs: initramfs(),
        cache: dir.join("state").join("kvm-probe.json"),
    }
}

#[test]
fn the_probe_initramfs_prints_the_marker_under_tcg() {
    // So a negative KVM verdict below means KVM, not a broken probe image.
    let dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(Mutex::new(false));
    let s2 = seen.clone();
    let mut spec = VmSpec::new("probe-tcg", kernel(), initramfs(), dir.path().join("vm"));
    spec.cmdline = "console=ttyS0 quiet panic=-1 udos.mode=probe".into();
    spec.memory_mib = 256;
    spec.timeout = BOOT_TIMEOUT;
    spec.console = Some(Box::new(move |l: &str| {
        if l.contains(PROBE_MARKER) {
            *s2.lock().unwrap() = true;
        }
    }));
    let o = Qemu::find(Accel::Tcg).unwrap().run(spec).unwrap();
    assert_eq!(o.exit, VmExit::PoweredOff);
    assert!(*seen.lock().unwrap());
}

#[test]
fn kvm_probe_answers_within_its_timeout_and_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    let mut input = probe_input(dir.path());
    // A private copy, so it can be touched below.
    let kernel_copy = dir.path().join("vmlinuz");
    std::fs::copy(&input.kernel, &kernel_copy).unwrap();
    input.kernel = kernel_copy.clone();
    let t0 = Instant::now();
    let v = probe_kvm(&input);
    let took = t0.elapsed();
    println!("KVM probe: {v:?} in {took:?}");
    assert!(!v.cached);
    assert!(
        took < PROBE_TIMEOUT + Duration::from_secs(10),
        "probe took {took:?}"
    );
    if host_is_kvm_pvm() || !Path::new("/dev/kvm").exists() {
        assert!(!v.works, "KVM cannot boot a stock kernel here: {v:?}");
    }
    if !Path::new("/dev/kvm").exists() {
        return; // nothing is cached without a /dev/kvm
    }
    assert!(input.cache.is_file());
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(v.boot_id, boot_id.trim());
    assert_eq!(v.kernel_sha256.len(), 64);

    let t1 = Instant::now();
    let again = probe_kvm(&input);
    assert!(again.cached, "{again:?}");
    assert_eq!(again.works, v.works);
    assert!(t1.elapsed() < Duration::from_secs(2));

    // Same content, new mtime: found again by its hash.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&kernel_copy, std::fs::read(&kernel_copy).unwrap()).unwrap();
    let touched = probe_kvm(&input);
    assert!(touched.cached && touched.works == v.works, "{touched:?}");

    // Another kernel (another hash) is probed anew.
    let other = dir.path().join("other-kernel");
    std::fs::write(&other, b"not a kernel").unwrap();
    let v3 = probe_kvm(&ProbeInput {
        kernel: other,
        ..input.clone()
    });
    assert!(!v3.cached && !v3.works, "{v3:?}");
}

#[test]
fn selection_on_this_host() {
    let dir = tempfile::tempdir().unwrap();
    let input = probe_input(dir.path());
    let kvm = probe_kvm(&input).works;

    let auto = select(HypervisorChoice::Auto, &input).unwrap();
    println!("auto -> {}", auto.describe());
    if kvm {
        assert_eq!(auto.accel(), Accel::Kvm);
    } else {
        assert_eq!((auto.name(), auto.accel()), ("qemu", Accel::Tcg));
    }

    let q = select(HypervisorChoice::Qemu, &input).unwrap();
    assert_eq!(q.name(), "qemu");
    assert_eq!(q.accel(), if kvm { Accel::Kvm } else { Accel::Tcg });

    let ch_installed = udos_vmm::CloudHypervisor::find().is_ok();
    match select(HypervisorChoice::CloudHypervisor, &input) {
        Ok(h) => {
            assert!(ch_installed && kvm);
            assert_eq!(h.name(), "cloud-hypervisor");
        }
        Err(VmmError::NotInstalled { hint, .. }) => {
            assert!(!ch_installed);
            assert!(hint.contains(CLOUD_HYPERVISOR_ENV), "{hint}");
        }
        Err(VmmError::KvmUnavailable { reason, .. }) => {
            assert!(ch_installed && !kvm);
            assert!(reason.contains("--hypervisor qemu"), "{reason}");
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}
