//! The newc writer round-trips through GNU cpio: entries, modes, symlinks, the
//! /dev/console node; output is deterministic; zstd output decodes to the same bytes.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::process::{Command, Stdio};

use udos_images::initramfs::Archive;

fn ensure_cpio() {
    if Command::new("cpio").arg("--version").output().is_ok() {
        return;
    }
    let st = Command::new("apt-get")
        .args(["install", "-y", "-q", "cpio"])
        .status()
        .expect("apt-get install cpio");
    assert!(st.success(), "cpio is missing and could not be installed");
}

fn sample(dir: &std::path::Path) -> Archive {
    let host = dir.join("host-file");
    fs::write(&host, vec![7u8; 100_003]).unwrap();
    let mut a = Archive::new();
    a.file_from("init", &host, 0o755).unwrap();
    a.file_bytes("udos/modules", "virtio\nerofs\n", 0o644)
        .unwrap();
    a.file_bytes("empty", Vec::new(), 0o600).unwrap();
    a.file_bytes("odd/len-1", b"x".to_vec(), 0o640).unwrap();
    a.symlink("bin/sh", "/udos/bin/busybox").unwrap();
    a.dir("tmp", 0o1777).unwrap();
    a.dir("newroot", 0o755).unwrap();
    a.char_dev("dev/console", 0o600, 5, 1).unwrap();
    a
}

#[test]
fn newc_round_trips_through_gnu_cpio() {
    ensure_cpio();
    let dir = tempfile::tempdir().unwrap();
    let a = sample(dir.path());
    let mut bytes = Vec::new();
    a.write_newc(&mut bytes).unwrap();
    let mut again = Vec::new();
    a.write_newc(&mut again).unwrap();
    assert_eq!(bytes, again, "the archive must be deterministic");
    let archive = dir.path().join("a.cpio");
    fs::write(&archive, &bytes).unwrap();

    // Listing: every entry, in sorted order, with modes and the device numbers.
    let out = Command::new("cpio")
        .args(["-tv", "--quiet", "-F"])
        .arg(&archive)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = String::from_utf8(out.stdout).unwrap();
    eprintln!("{list}");
    let names: Vec<&str> = list
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .map(|f| {
            let i = f.iter().position(|x| *x == "->").unwrap_or(f.len());
            f[i - 1]
        })
        .collect();
    let want: Vec<&str> = a.paths().collect();
    assert_eq!(names, want);
    let line = |p: &str| {
        list.lines()
            .find(|l| l.ends_with(&format!(" {p}")) || l.contains(&format!(" {p} -> ")))
            .unwrap_or_else(|| panic!("{p} not listed"))
            .to_string()
    };
    assert!(line("dev/console").starts_with("crw-------"));
    assert!(
        line("dev/console").contains("5,   1"),
        "{}",
        line("dev/console")
    );
    assert!(line("init").starts_with("-rwxr-xr-x"));
    assert!(line("tmp").starts_with("drwxrwxrwt"));
    assert!(line("bin/sh").starts_with("lrwxrwxrwx"));
    assert!(line("bin/sh").contains("-> /udos/bin/busybox"));
    assert!(line("init").contains(" root ") || line("init").contains(" 0 "));

    // Extraction (as root, so the device node and ownership come out too).
    let x = dir.path().join("x");
    fs::create_dir(&x).unwrap();
    let st = Command::new("cpio")
        .args(["-id", "--quiet", "--no-absolute-filenames", "-F"])
        .arg(&archive)
        .current_dir(&x)
        .stderr(Stdio::inherit())
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(fs::read(x.join("init")).unwrap(), vec![7u8; 100_003]);
    assert_eq!(
        fs::read(x.join("udos/modules")).unwrap(),
        b"virtio\nerofs\n"
    );
    assert_eq!(fs::read(x.join("odd/len-1")).unwrap(), b"x");
    assert_eq!(fs::read(x.join("empty")).unwrap(), b"");
    let mode = |p: &str| {
        fs::symlink_metadata(x.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("init"), 0o755);
    assert_eq!(mode("empty"), 0o600);
    assert_eq!(mode("odd/len-1"), 0o640);
    assert_eq!(
        fs::read_link(x.join("bin/sh")).unwrap().to_str(),
        Some("/udos/bin/busybox")
    );
    if common::is_root() {
        let m = fs::symlink_metadata(x.join("dev/console")).unwrap();
        assert!(m.file_type().is_char_device());
        assert_eq!(m.rdev(), (5 << 8) | 1);
        assert_eq!(m.permissions().mode() & 0o7777, 0o600);
        assert_eq!((m.uid(), m.gid()), (0, 0));
        assert_eq!(mode("tmp"), 0o1777);
    } else {
        eprintln!("not root: skipped the extracted device node check");
    }

    // The compressed form decodes to exactly the same archive.
    let z = dir.path().join("a.cpio.zst");
    a.write_zstd_file(&z, 3).unwrap();
    let raw = zstd::stream::decode_all(fs::File::open(&z).unwrap()).unwrap();
    assert_eq!(raw, bytes);
}
