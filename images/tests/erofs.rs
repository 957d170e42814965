//! mkfs_erofs keeps overlay's markers (0/0 whiteout device, `user.overlay.opaque`), and
//! make_upper_disk is cheap per VM.

mod common;

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use udos_images::{make_upper_disk, mkfs_erofs, upper_template_path};

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn mknod_whiteout(p: &Path) {
    let c = cstr(p);
    // SAFETY: c is a valid NUL-terminated path; mknod has no memory-safety preconditions.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, 0) };
    assert_eq!(r, 0, "mknod whiteout: {}", std::io::Error::last_os_error());
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let c = cstr(p);
    let n = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated path and name; value points to value.len() bytes.
    let r = unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr {name}: {}", std::io::Error::last_os_error());
}

fn get_xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let c = cstr(p);
    let n = CString::new(name).unwrap();
    let mut buf = [0u8; 64];
    // SAFETY: valid NUL-terminated path and name; buf is writable for buf.len() bytes.
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

#[test]
fn mkfs_erofs_keeps_whiteouts_and_opaque_xattr() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir_all(tree.join("opaque/sub")).unwrap();
    fs::write(tree.join("opaque/sub/file"), "x").unwrap();
    fs::write(tree.join("kept"), "kept\n").unwrap();
    mknod_whiteout(&tree.join("deleted"));
    set_xattr(&tree.join("opaque"), "user.overlay.opaque", b"y");

    let out = dir.path().join("out/layer.erofs");
    mkfs_erofs(&tree, &out).unwrap();
    assert!(out.is_file());
    // Nothing temporary left next to it.
    let leftovers: Vec<_> = fs::read_dir(out.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != "layer.erofs")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // dump.erofs: the whiteout is a char device and the opaque dir carries an xattr.
    let dump = |p: &str| {
        let o = Command::new("dump.erofs")
            .arg(format!("--path={p}"))
            .arg(&out)
            .output()
            .expect("dump.erofs");
        assert!(o.status.success());
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let d = dump("/deleted");
    assert!(d.contains("char dev"), "{d}");
    let o = dump("/opaque");
    assert!(!o.contains("Xattr size: 0"), "{o}");

    // The precise check: mount it (needs root and a kernel with erofs + loop).
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mounted = common::is_root()
        && Command::new("mount")
            .args(["-t", "erofs", "-o", "loop,ro"])
            .arg(&out)
            .arg(&mnt)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if mounted {
        let wh = fs::symlink_metadata(mnt.join("deleted")).unwrap();
        let checks = (
            wh.file_type().is_char_device(),
            wh.rdev(),
            get_xattr(&mnt.join("opaque"), "user.overlay.opaque"),
            fs::read_to_string(mnt.join("kept")).ok(),
        );
        let _ = Command::new("umount").arg(&mnt).status();
        assert_eq!(
            checks,
            (true, 0, Some(b"y".to_vec()), Some("kept\n".to_string()))
        );
        eprintln!("checked by loop-mounting the erofs image");
    } else {
        eprintln!("cannot loop-mount here: checked with dump.erofs only");
    }
}

#[test]
fn upper_disk_is_sparse_ext4_and_cheap_per_vm() {
    let dir = tempfile::tempdir().unwrap();
    let templates = dir.path().join("templates");
    let size: u64 = 8 << 30;
    let t = Instant::now();
    make_upper_disk(&templates, &dir.path().join("first.img"), size).unwrap();
    let first = t.elapsed();
    let n = 10;
    let t = Instant::now();
    for i in 0..n {
        make_upper_disk(&templates, &dir.path().join(format!("vm{i}.img")), size).unwrap();
    }
    let per_vm = t.elapsed() / n;
    let img = dir.path().join("vm0.img");
    let m = fs::metadata(&img).unwrap();
    assert_eq!(m.len(), size);
    let allocated = m.blocks() * 512;
    let tmpl = fs::metadata(upper_template_path(&templates, size)).unwrap();
    eprintln!(
        "FIGURES upper disk {} GiB: template (mkfs) + first copy {:.1} ms, per VM {:.2} ms, {} KiB allocated per VM (template {} KiB)",
        size >> 30,
        first.as_secs_f64() * 1e3,
        per_vm.as_secs_f64() * 1e3,
        allocated / 1024,
        tmpl.blocks() * 512 / 1024
    );
    assert!(
        allocated < 64 << 20,
        "the copy is not sparse: {allocated} bytes"
    );
    let fsck = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&img)
        .output()
        .or_else(|_| {
            Command::new("/sbin/e2fsck")
                .args(["-f", "-n"])
                .arg(&img)
                .output()
        })
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let dumpe2fs = Command::new("dumpe2fs")
        .arg("-h")
        .arg(&img)
        .output()
        .expect("dumpe2fs");
    let h = String::from_utf8_lossy(&dumpe2fs.stdout);
    assert!(!h.contains("has_journal"), "{h}");
    assert!(h.contains("Reserved block count:     0"), "{h}");
    assert!(make_upper_disk(&templates, &dir.path().join("bad.img"), 1000).is_err());
}
