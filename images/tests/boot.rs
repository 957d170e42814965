//! End-to-end: build the real guest image (Debian cloud kernel from apt, act from PyPI,
//! modules, a static init) and boot it under QEMU microvm with TCG.
//!
//! The init is tests/fixtures/test_init.c, unless `UDOS_INIT` names a built static
//! udos-init: then the probe boots use it with `udos.mode=probe`.

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{boot_microvm, progress_printer, store, test_init, Drive};
use udos_images::{base_cmdline, BaseLayer, Image, ImageOptions};

const TIMEOUT: Duration = Duration::from_secs(60);

/// The test image, built once per test binary (tests run in parallel threads).
fn image() -> &'static Image {
    static IMG: OnceLock<Image> = OnceLock::new();
    IMG.get_or_init(|| {
        let s = store();
        let opts = ImageOptions::new(test_init());
        let p = progress_printer();
        let t = Instant::now();
        let img = s.ensure_image(&opts, &p).expect("build the image");
        let first = t.elapsed();
        let t = Instant::now();
        let again = s.ensure_image(&opts, &p).expect("ensure the image again");
        let warm = t.elapsed();
        assert_eq!(img, again, "a second ensure_image must return the same image");
        let size = std::fs::metadata(&img.initramfs).unwrap().len();
        eprintln!(
            "FIGURES image {}: first ensure_image {:.2}s (cold only on an empty cache), warm {:.3}s, initramfs {} KiB, vmlinux {} KiB, kernel {}, modules: {}",
            &img.id[..12],
            first.as_secs_f64(),
            warm.as_secs_f64(),
            size / 1024,
            std::fs::metadata(&img.vmlinux).unwrap().len() / 1024,
            img.kernel_release,
            img.modules.join(" ")
        );
        assert!(img.pvh, "Debian's cloud kernel has CONFIG_PVH=y: the vmlinux must carry the PVH note");
        assert!(img.kernel_bzimage.is_some());
        assert_eq!(store().current().unwrap().as_ref(), Some(&img));
        img
    })
}

fn base() -> &'static BaseLayer {
    static B: OnceLock<BaseLayer> = OnceLock::new();
    B.get_or_init(|| {
        store()
            .ensure_base_layer(&progress_printer())
            .expect("base layer")
    })
}

/// The image to probe-boot with: the test init's, or one with the real udos-init.
fn probe_image_and_cmdline() -> (Image, String) {
    match std::env::var_os("UDOS_INIT") {
        Some(init) => {
            let opts = ImageOptions::new(init);
            let img = store()
                .ensure_image(&opts, &progress_printer())
                .expect("build the image with UDOS_INIT");
            (img, format!("{} udos.mode=probe", base_cmdline(true)))
        }
        None => (image().clone(), base_cmdline(true)),
    }
}

fn assert_booted(what: &str, b: &common::Boot, marker: &str) {
    eprintln!("---- console ({what}) ----\n{}---- end ----", b.console);
    assert!(
        b.to_marker.is_some(),
        "{what}: no {marker} on the console within {TIMEOUT:?}"
    );
    assert!(
        !b.console.contains("UDOS-TEST-FAIL"),
        "{what}: the test init reported a failure"
    );
    assert!(
        b.exited,
        "{what}: QEMU did not exit by itself (killed after {TIMEOUT:?})"
    );
    eprintln!(
        "FIGURES boot {what}: marker after {:.2}s, QEMU exited after {:.2}s (TCG)",
        b.to_marker.unwrap().as_secs_f64(),
        b.total.as_secs_f64()
    );
}

#[test]
fn probe_boots_vmlinux_under_microvm() {
    let (img, cmdline) = probe_image_and_cmdline();
    let b = boot_microvm(
        &img.vmlinux,
        &img.initramfs,
        &cmdline,
        &[],
        "UDOS-PROBE-OK",
        TIMEOUT,
    );
    assert_booted("vmlinux (PVH)", &b, "UDOS-PROBE-OK");
}

#[test]
fn probe_boots_bzimage_under_microvm() {
    let (img, cmdline) = probe_image_and_cmdline();
    let bz = img
        .kernel_bzimage
        .as_ref()
        .expect("Debian kernel comes as a bzImage");
    let b = boot_microvm(bz, &img.initramfs, &cmdline, &[], "UDOS-PROBE-OK", TIMEOUT);
    assert_booted("bzImage", &b, "UDOS-PROBE-OK");
}

/// Modules load in /udos/modules order, the disk is found by its virtio serial, the base
/// layer mounts as erofs and under overlay, and its sh/bash run.
#[test]
fn base_layer_boots_as_virtio_blk_with_serial() {
    let img = image();
    let layer = base();
    let cmdline = format!("{} udostest.layer=udos-l0", base_cmdline(true));
    let b = boot_microvm(
        &img.vmlinux,
        &img.initramfs,
        &cmdline,
        &[Drive {
            file: &layer.erofs,
            serial: "udos-l0",
            readonly: true,
        }],
        "UDOS-LAYER-OK",
        TIMEOUT,
    );
    assert_booted("vmlinux + base layer on virtio-blk", &b, "UDOS-LAYER-OK");
    for m in [
        "UDOS-MODULES-OK",
        "UDOS-SERIAL-OK vda=udos-l0",
        "UDOS-EROFS-OK",
        "UDOS-OVERLAY-OK",
        "UDOS-SH-OK",
        "UDOS-BASH-OK",
        "UDOS-ENV-OK",
        "UDOS-VSOCK-OK",
    ] {
        assert!(b.console.contains(m), "console lacks {m}");
    }
}

/// A user-named ELF vmlinux plus a module directory: the release is read from the ELF
/// banner, the module tree is found, no bzImage is recorded, the inputs differ from the
/// default image's, and `current` keeps pointing at the default image.
#[test]
fn user_kernel_elf_with_modules_dir() {
    let img = image();
    let s = store();
    let extract = s.cache_dir().join("extract");
    let pkg_dir = std::fs::read_dir(&extract)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.join("lib/modules").join(&img.kernel_release).is_dir())
        .expect("the extracted Debian kernel package");
    let mut opts = ImageOptions::new(test_init());
    opts.kernel = Some(img.vmlinux.clone());
    opts.modules_dir = Some(pkg_dir.clone()); // a root holding lib/modules/<release>
                                              // Same vmlinux, modules and init as the default image: the same bytes, so the same id.
    let same = s.ensure_image(&opts, &progress_printer()).unwrap();
    assert_eq!(same.id, img.id, "the build must be reproducible");
    // A different init (one trailing byte) makes a new image, this one without bzImage.
    let dir = tempfile::tempdir().unwrap();
    let init2 = dir.path().join("init");
    let mut bytes = std::fs::read(test_init()).unwrap();
    bytes.push(0);
    std::fs::write(&init2, bytes).unwrap();
    opts.init_binary = init2;
    let user = s.ensure_image(&opts, &progress_printer()).unwrap();
    assert_ne!(user.id, img.id);
    assert_eq!(user.kernel_release, img.kernel_release);
    assert!(user.kernel_bzimage.is_none());
    assert!(user.pvh);
    assert_eq!(user.modules, img.modules);
    assert_eq!(
        std::fs::read(&user.vmlinux).unwrap(),
        std::fs::read(&img.vmlinux).unwrap()
    );
    // Other tests share this store and may move `current` between default builds; what
    // must hold is that a user-kernel build never becomes `current`.
    let current = s.current().unwrap().map(|i| i.id);
    assert!(current.is_some(), "a default image was built");
    assert_ne!(
        current,
        Some(user.id.clone()),
        "a user kernel became current"
    );
    // A kernel whose modules are for another release is refused.
    let bad = tempfile::tempdir().unwrap();
    let other = bad.path().join("lib/modules/6.0.0-other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("modules.dep"), "").unwrap();
    opts.modules_dir = Some(other);
    let err = s.ensure_image(&opts, &|_| {}).unwrap_err();
    assert!(format!("{err:#}").contains("not for kernel"), "{err:#}");
}

/// The initramfs carries what docs/pid1.md lists, with a consistent modules.dep.
#[test]
fn initramfs_contents() {
    let img = image();
    // Uncompressed: GNU cpio reads it as it is.
    let out = std::process::Command::new("cpio")
        .args(["-tv", "--quiet", "-F"])
        .arg(&img.initramfs)
        .output()
        .expect("cpio");
    assert!(out.status.success());
    let list = String::from_utf8(out.stdout).unwrap();
    let rel = &img.kernel_release;
    for want in [
        " init\n".to_string(),
        " udos/bin/act\n".into(),
        " udos/modules\n".into(),
        format!(" lib/modules/{rel}/modules.dep\n"),
        format!(" lib/modules/{rel}/modules.builtin\n"),
        format!(" lib/modules/{rel}/kernel/fs/erofs/erofs.ko\n"),
        " newroot\n".into(),
    ] {
        assert!(list.contains(&want), "initramfs lacks{want}");
    }
    let console = list.lines().find(|l| l.ends_with(" dev/console")).unwrap();
    assert!(console.starts_with("crw-------"), "{console}");
    assert!(
        console.contains("5,   1") || console.contains("5, 1"),
        "{console}"
    );
    for m in [
        "virtio_mmio",
        "virtio_pci",
        "virtio_pci_legacy_dev",
        "virtio_pci_modern_dev",
        "virtio_blk",
        "overlay",
        "erofs",
        "libcrc32c",
        "vsock",
        "vmw_vsock_virtio_transport",
        "vmw_vsock_virtio_transport_common",
        "virtio",
        "virtio_ring",
    ] {
        assert!(img.modules.iter().any(|x| x == m), "module {m} missing");
    }
    let pos = |m: &str| img.modules.iter().position(|x| x == m).unwrap();
    assert!(pos("virtio_ring") < pos("virtio"));
    assert!(pos("virtio") < pos("virtio_blk"));
    assert!(pos("virtio_pci_modern_dev") < pos("virtio_pci"));
    assert!(pos("libcrc32c") < pos("erofs"));
    assert!(pos("vsock") < pos("vmw_vsock_virtio_transport_common"));
    assert!(pos("vmw_vsock_virtio_transport_common") < pos("vmw_vsock_virtio_transport"));
}
