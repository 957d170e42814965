//! The KVM probe and hypervisor selection on this machine.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use udos_vmm::{
    cache_path, choose, probe_kvm, probe_kvm_with, select, Accel, CloudHypervisor, Hypervisor,
    HypervisorChoice, ProbeInput, Qemu, VmExit, VmSpec, VmmError, CLOUD_HYPERVISOR_ENV,
    PROBE_MARKER, PROBE_TIMEOUT,
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
    let ch = CloudHypervisor::find().ok();
    let ch_kvm = ch.as_ref().map(|c| probe_kvm_with(c, &input).works);

    let auto = choose(HypervisorChoice::Auto, &input).unwrap();
    println!("auto -> {} ({})", auto.hypervisor.describe(), auto.why);
    if ch_kvm == Some(true) {
        assert_eq!(auto.hypervisor.name(), "cloud-hypervisor");
    } else {
        // Whenever auto does not take cloud-hypervisor, it says why.
        let expected = if ch.is_some() {
            "cloud-hypervisor is installed but KVM cannot run the kernel under it"
        } else {
            "cloud-hypervisor is not installed"
        };
        assert!(auto.why.contains(expected), "{}", auto.why);
        assert_eq!(auto.hypervisor.name(), "qemu");
        assert_eq!(
            auto.hypervisor.accel(),
            if kvm { Accel::Kvm } else { Accel::Tcg }
        );
    }

    let q = select(HypervisorChoice::Qemu, &input).unwrap();
    assert_eq!(q.name(), "qemu");
    assert_eq!(q.accel(), if kvm { Accel::Kvm } else { Accel::Tcg });

    match select(HypervisorChoice::CloudHypervisor, &input) {
        Ok(h) => {
            assert_eq!(ch_kvm, Some(true));
            assert_eq!(h.name(), "cloud-hypervisor");
        }
        Err(VmmError::NotInstalled { hint, .. }) => {
            assert!(ch.is_none());
            assert!(hint.contains(CLOUD_HYPERVISOR_ENV), "{hint}");
        }
        Err(VmmError::KvmUnavailable { reason, .. }) => {
            assert_eq!(ch_kvm, Some(false));
            // The verdict is cloud-hypervisor's own, not QEMU's.
            assert!(reason.starts_with("cloud-hypervisor "), "{reason}");
            assert!(reason.contains("--hypervisor qemu"), "{reason}");
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn cloud_hypervisor_is_checked_by_cloud_hypervisor_itself() {
    let Ok(ch) = CloudHypervisor::find() else {
        println!("SKIP: cloud-hypervisor not found (set {CLOUD_HYPERVISOR_ENV})");
        return;
    };
    if !Path::new("/dev/kvm").exists() {
        println!("SKIP: no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = probe_input(dir.path());
    let q = probe_kvm(&input);
    let c = probe_kvm_with(&ch, &input);
    println!("qemu: {q:?}\ncloud-hypervisor: {c:?}");
    assert_eq!(q.hypervisor, "qemu");
    assert_eq!(c.hypervisor, "cloud-hypervisor");
    assert!(c.reason.starts_with("cloud-hypervisor "), "{}", c.reason);
    // Two verdicts, two cache files: neither overwrites the other.
    let (qf, cf) = (
        cache_path(&input, "qemu"),
        cache_path(&input, "cloud-hypervisor"),
    );
    assert_eq!(qf, input.cache);
    assert_eq!(cf.file_name().unwrap(), "kvm-probe.cloud-hypervisor.json");
    assert!(qf.is_file() && cf.is_file());
    assert!(probe_kvm_with(&ch, &input).cached);
    assert!(probe_kvm(&input).cached);
}
