//! The default base layer: built from Debian's busybox-static and bash-static, idempotent,
//! and its shells run (chroot, when root).

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::Instant;

use common::{progress_printer, store};

#[test]
fn base_layer_builds_once_and_runs() {
    let s = store();
    let t = Instant::now();
    let a = s.ensure_base_layer(&progress_printer()).unwrap();
    let first = t.elapsed();
    let t = Instant::now();
    let b = s.ensure_base_layer(&progress_printer()).unwrap();
    let warm = t.elapsed();
    assert_eq!(a, b);
    assert_eq!(a.id.len(), 64);
    let erofs_kib = fs::metadata(&a.erofs).unwrap().len() / 1024;
    eprintln!(
        "FIGURES base layer {}: first ensure {:.2}s, warm {:.3}s, erofs {erofs_kib} KiB",
        &a.id[..12],
        first.as_secs_f64(),
        warm.as_secs_f64()
    );

    let tree = &a.tree;
    let mode = |p: &str| {
        fs::symlink_metadata(tree.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("tmp"), 0o1777);
    assert_eq!(mode("var/tmp"), 0o1777);
    assert_eq!(mode("root"), 0o700);
    for d in [
        "proc",
        "sys",
        "dev",
        "run",
        "home",
        "workspace",
        "mnt",
        "usr/local/bin",
    ] {
        assert!(tree.join(d).is_dir(), "{d}");
    }
    assert_eq!(
        fs::read_link(tree.join("bin/sh")).unwrap().to_str(),
        Some("/bin/busybox")
    );
    assert_eq!(
        fs::read_link(tree.join("usr/bin/env")).unwrap().to_str(),
        Some("/bin/busybox")
    );
    let bash = fs::symlink_metadata(tree.join("bin/bash")).unwrap();
    assert!(
        bash.is_file() && bash.size() > 1_000_000,
        "bin/bash is bash-static"
    );
    assert!(fs::read_to_string(tree.join("etc/passwd"))
        .unwrap()
        .starts_with("root:x:0:0:"));
    assert!(fs::read_to_string(tree.join("etc/passwd"))
        .unwrap()
        .contains("nobody:x:65534"));
    assert!(tree.join("etc/group").is_file());
    assert_eq!(
        fs::read_to_string(tree.join("etc/hostname")).unwrap(),
        "udos\n"
    );
    assert!(fs::read_to_string(tree.join("etc/hosts"))
        .unwrap()
        .contains("localhost"));
    assert!(fs::symlink_metadata(tree.join("bin/ls")).is_ok());

    // dump.erofs sees the same root.
    let o = Command::new("dump.erofs")
        .args(["--path=/bin/bash"])
        .arg(&a.erofs)
        .output()
        .unwrap();
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Uid: 0"));

    if common::is_root() {
        let out = Command::new("chroot")
            .arg(tree)
            .args(["/bin/sh", "-c", "echo ok"])
            .env_clear()
            .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
        let out = Command::new("chroot")
            .arg(tree)
            .args([
                "/usr/bin/env",
                "bash",
                "-c",
                "echo \"$((6*7)) ${BASH_VERSINFO[0]}\"",
            ])
            .env_clear()
            .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "42 5\n");
    } else {
        eprintln!("not root: skipped the chroot run");
        let out = Command::new(tree.join("bin/busybox"))
            .args(["sh", "-c", "echo ok"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    }
}
