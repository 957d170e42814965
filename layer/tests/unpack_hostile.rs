//! Untrusted layer tars: every hostile archive is refused with the right error, and
//! nothing is ever written outside the target.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use common::*;
use tar::EntryType;
use udos_layer::{unpack, UnpackError, UnpackLimits};

/// Unpacks `tar` into a fresh sandbox's target with `limits`; asserts that nothing
/// outside the target changed; returns the result and the sandbox.
fn run(
    tar: &[u8],
    limits: &UnpackLimits,
) -> (Result<udos_layer::UnpackSummary, UnpackError>, Sandbox) {
    let sb = Sandbox::new();
    let before = sb.snapshot();
    let res = unpack(tar, &sb.target, limits);
    assert_eq!(
        sb.snapshot(),
        before,
        "something outside the target changed"
    );
    (res, sb)
}

fn run_default(tar: &[u8]) -> (Result<udos_layer::UnpackSummary, UnpackError>, Sandbox) {
    run(tar, &UnpackLimits::default())
}

fn invalid_path(res: Result<udos_layer::UnpackSummary, UnpackError>, want_reason: &str) {
    match res {
        Err(UnpackError::InvalidPath { reason, .. }) => {
            assert!(
                reason.contains(want_reason),
                "reason {reason:?}, wanted {want_reason:?}"
            )
        }
        other => panic!("expected InvalidPath({want_reason}), got {other:?}"),
    }
}

#[test]
fn parent_dir_escape_is_refused() {
    let tar = RawTar::new().file("../evil", b"pwned").finish();
    let (res, sb) = run_default(&tar);
    invalid_path(res, "`..`");
    assert!(!sb.dir.path().join("evil").exists());
}

#[test]
fn absolute_path_is_refused() {
    let tar = RawTar::new().file("/abs/path", b"pwned").finish();
    let (res, _sb) = run_default(&tar);
    invalid_path(res, "absolute");
    assert!(!std::path::Path::new("/abs/path").exists());
}

#[test]
fn dotdot_in_the_middle_is_refused() {
    let tar = RawTar::new().dir("a/").file("a/../../x", b"pwned").finish();
    let (res, sb) = run_default(&tar);
    invalid_path(res, "`..`");
    assert!(!sb.dir.path().join("x").exists());
}

#[test]
fn empty_and_nul_names_are_refused() {
    let tar = RawTar::new().file("", b"x").finish();
    // An empty name in a header is indistinguishable from... a header with a name of
    // zero length: refused as an empty path.
    let (res, _sb) = run_default(&tar);
    invalid_path(res, "empty");

    let tar = RawTar::new().file("./", b"").finish();
    let (res, _sb) = run_default(&tar);
    invalid_path(res, "target directory itself");

    // NUL inside a pax path.
    let tar = RawTar::new()
        .pax(&[("path", b"ok\0/../../evil")])
        .file("placeholder", b"x")
        .finish();
    let (res, _sb) = run_default(&tar);
    invalid_path(res, "NUL");
}

#[test]
fn escapes_through_pax_and_gnu_long_names_are_refused() {
    let tar = RawTar::new()
        .pax(&[("path", b"../../pax-evil")])
        .file("innocent", b"pwned")
        .finish();
    let (res, sb) = run_default(&tar);
    invalid_path(res, "`..`");
    assert!(!sb.dir.path().join("pax-evil").exists());
    assert!(!sb.target.join("innocent").exists());

    let tar = RawTar::new()
        .gnu_long_name(b"/tmp/gnu-evil")
        .file("innocent", b"pwned")
        .finish();
    let (res, _sb) = run_default(&tar);
    invalid_path(res, "absolute");
    assert!(!std::path::Path::new("/tmp/gnu-evil").exists());
}

#[test]
fn symlink_then_file_through_it_is_refused() {
    let sb = Sandbox::new();
    let before = sb.snapshot();
    let outside = sb.outside.display().to_string();
    let tar = RawTar::new()
        .symlink("link", &outside)
        .file("link/pwned", b"pwned")
        .finish();
    let res = unpack(tar.as_slice(), &sb.target, &UnpackLimits::default());
    match res {
        Err(UnpackError::NotADirectory { path, component }) => {
            assert_eq!(path, "link/pwned");
            assert_eq!(component, "link");
        }
        other => panic!("expected NotADirectory, got {other:?}"),
    }
    assert_eq!(sb.snapshot(), before, "outside changed");
    assert!(!sb.outside.join("pwned").exists());
    // The symlink itself was created verbatim (harmless when never followed).
    assert_eq!(
        std::fs::read_link(sb.target.join("link"))
            .unwrap()
            .display()
            .to_string(),
        outside
    );
}

#[test]
fn symlink_then_dir_or_whiteout_or_hardlink_through_it_is_refused() {
    for second in ["dir", "whiteout", "opaque", "hardlink", "symlink"] {
        let sb = Sandbox::new();
        let before = sb.snapshot();
        let outside = sb.outside.display().to_string();
        let mut t = RawTar::new();
        t.file("real", b"data").symlink("link", &outside);
        match second {
            "dir" => t.dir("link/sub/"),
            "whiteout" => t.file("link/.wh.sentinel", b""),
            "opaque" => t.file("link/.wh..wh..opq", b""),
            "hardlink" => t.hardlink("link/pwned", "real"),
            _ => t.symlink("link/pwned", "/etc/passwd"),
        };
        let res = unpack(t.finish().as_slice(), &sb.target, &UnpackLimits::default());
        assert!(
            matches!(res, Err(UnpackError::NotADirectory { .. })),
            "{second}: {res:?}"
        );
        assert_eq!(sb.snapshot(), before, "{second}: outside changed");
        assert!(sb.outside.join("sentinel").exists(), "{second}");
        assert_eq!(super_xattr(&sb.outside), None, "{second}");
    }
}

fn super_xattr(p: &std::path::Path) -> Option<Vec<u8>> {
    xattr(p, "user.overlay.opaque")
}

#[test]
fn file_replacing_a_symlink_does_not_follow_it() {
    let sb = Sandbox::new();
    let before = sb.snapshot();
    let target_file = sb.outside.join("sentinel").display().to_string();
    let tar = RawTar::new()
        .symlink("l", &target_file)
        .file("l", b"overwrite?")
        .finish();
    let s = unpack(tar.as_slice(), &sb.target, &UnpackLimits::default()).unwrap();
    assert_eq!(s.files, 1);
    assert_eq!(sb.snapshot(), before, "outside changed");
    assert_eq!(
        std::fs::read(sb.outside.join("sentinel")).unwrap(),
        b"untouched"
    );
    let md = std::fs::symlink_metadata(sb.target.join("l")).unwrap();
    assert!(md.is_file());
    assert_eq!(std::fs::read(sb.target.join("l")).unwrap(), b"overwrite?");
}

#[test]
fn hardlinks_outside_or_to_unknown_targets_are_refused() {
    for (link, reason) in [
        ("/etc/passwd", "absolute"),
        ("../x", "`..`"),
        ("a/../../x", "`..`"),
        ("not-yet", "extracted earlier"),
        ("dir", "extracted earlier"),
        ("sym", "extracted earlier"),
        ("h", "itself"),
    ] {
        let tar = RawTar::new()
            .dir("dir/")
            .symlink("sym", "/etc/passwd")
            .hardlink("h", link)
            .file("not-yet", b"x")
            .finish();
        let (res, sb) = run_default(&tar);
        match res {
            Err(UnpackError::InvalidHardlink { reason: r, .. }) => {
                assert!(r.contains(reason), "{link}: {r}")
            }
            other => panic!("{link}: expected InvalidHardlink, got {other:?}"),
        }
        assert!(!sb.target.join("h").exists(), "{link}");
    }
    // /etc/passwd's link count did not change.
    let md = std::fs::metadata("/etc/passwd").unwrap();
    assert_eq!(md.nlink(), 1);
}

#[test]
fn valid_hardlink_works() {
    let tar = RawTar::new()
        .dir("d/")
        .file("d/f", b"shared")
        .hardlink("g", "d/f")
        .hardlink("d/h", "./d/f")
        .finish();
    let (res, sb) = run_default(&tar);
    let s = res.unwrap();
    assert_eq!(s.hardlinks, 2);
    let a = std::fs::metadata(sb.target.join("d/f")).unwrap();
    let b = std::fs::metadata(sb.target.join("g")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 3);
}

#[test]
fn device_nodes_and_fifos_are_refused() {
    for (kind, maj, min, what) in [
        (EntryType::Char, 1, 3, "character device 1:3"),
        (EntryType::Char, 0, 1, "character device 0:1"),
        (EntryType::Block, 8, 0, "block device"),
        (EntryType::Fifo, 0, 0, "fifo"),
    ] {
        let tar = RawTar::new().device("dev", kind, maj, min).finish();
        let (res, sb) = run_default(&tar);
        match res {
            Err(UnpackError::ForbiddenEntry { kind, .. }) => assert_eq!(kind, what),
            other => panic!("{what}: expected ForbiddenEntry, got {other:?}"),
        }
        assert!(
            std::fs::symlink_metadata(sb.target.join("dev")).is_err(),
            "{what}"
        );
    }
    // A 0/0 character device is a whiteout already in overlay form: accepted.
    let tar = RawTar::new().device("wh", EntryType::Char, 0, 0).finish();
    let (res, sb) = run_default(&tar);
    assert_eq!(res.unwrap().whiteouts, 1);
    let md = std::fs::symlink_metadata(sb.target.join("wh")).unwrap();
    assert!(md.file_type().is_char_device() && md.rdev() == 0);
}

#[test]
fn unsupported_entry_types_are_refused() {
    let tar = RawTar::new()
        .entry(b"sparse", EntryType::GNUSparse, b"", b"", 0o644)
        .finish();
    let (res, _sb) = run_default(&tar);
    assert!(
        matches!(
            res,
            Err(UnpackError::UnsupportedEntry {
                type_byte: b'S',
                ..
            })
        ),
        "{res:?}"
    );
}

#[test]
fn file_over_max_file_bytes_is_refused_before_writing() {
    let tar = RawTar::new().file("big", &[7u8; 5000]).finish();
    let limits = UnpackLimits {
        max_file_bytes: 4999,
        ..UnpackLimits::default()
    };
    let (res, sb) = run(&tar, &limits);
    match res {
        Err(UnpackError::Limit { limit, value, max }) => {
            assert_eq!((limit, value, max), ("max_file_bytes", 5000, 4999))
        }
        other => panic!("expected Limit, got {other:?}"),
    }
    assert!(!sb.target.join("big").exists());
    // At the limit is fine.
    let limits = UnpackLimits {
        max_file_bytes: 5000,
        ..UnpackLimits::default()
    };
    let (res, _sb) = run(&tar, &limits);
    assert_eq!(res.unwrap().files, 1);
}

#[test]
fn too_many_entries_are_refused() {
    let mut t = RawTar::new();
    for i in 0..11 {
        t.file(&format!("f{i}"), b"");
    }
    let tar = t.finish();
    let limits = UnpackLimits {
        max_entries: 10,
        ..UnpackLimits::default()
    };
    let (res, sb) = run(&tar, &limits);
    match res {
        Err(UnpackError::Limit { limit, value, max }) => {
            assert_eq!((limit, value, max), ("max_entries", 11, 10))
        }
        other => panic!("expected Limit, got {other:?}"),
    }
    assert!(!sb.target.join("f10").exists());
    assert!(sb.target.join("f9").exists());
    let (res, _sb) = run(
        &tar,
        &UnpackLimits {
            max_entries: 11,
            ..UnpackLimits::default()
        },
    );
    assert_eq!(res.unwrap().entries, 11);
}

#[test]
fn total_bytes_over_limit_are_refused() {
    // Five files of 1000 bytes: each 512 header + 1024 data.
    let mut t = RawTar::new();
    for i in 0..5 {
        t.file(&format!("f{i}"), &[1u8; 1000]);
    }
    let tar = t.finish();
    assert_eq!(tar.len(), 5 * 1536 + 1024);
    let limits = UnpackLimits {
        max_total_bytes: 4000,
        ..UnpackLimits::default()
    };
    let (res, sb) = run(&tar, &limits);
    match res {
        Err(UnpackError::Limit { limit, value, max }) => {
            assert_eq!(limit, "max_total_bytes");
            assert_eq!(max, 4000);
            assert!(value > 4000, "{value}");
        }
        other => panic!("expected Limit, got {other:?}"),
    }
    assert!(
        !sb.target.join("f2").exists(),
        "the entry crossing the limit is not written"
    );
    // The trailing blocks count too.
    let limits = UnpackLimits {
        max_total_bytes: tar.len() as u64 - 1,
        ..UnpackLimits::default()
    };
    let (res, _sb) = run(&tar, &limits);
    assert!(
        matches!(
            res,
            Err(UnpackError::Limit {
                limit: "max_total_bytes",
                ..
            })
        ),
        "{res:?}"
    );
    let limits = UnpackLimits {
        max_total_bytes: tar.len() as u64,
        ..UnpackLimits::default()
    };
    let (res, _sb) = run(&tar, &limits);
    assert_eq!(res.unwrap().bytes, tar.len() as u64);
}

#[test]
fn long_paths_over_limit_are_refused() {
    let long = "d/".repeat(40) + "file";
    let tar = RawTar::new()
        .pax(&[("path", long.as_bytes())])
        .file("x", b"")
        .finish();
    let limits = UnpackLimits {
        max_path_len: 50,
        ..UnpackLimits::default()
    };
    let (res, sb) = run(&tar, &limits);
    match res {
        Err(UnpackError::Limit { limit, value, max }) => {
            assert_eq!((limit, value, max), ("max_path_len", long.len() as u64, 50))
        }
        other => panic!("expected Limit, got {other:?}"),
    }
    assert!(sb.target_listing().is_empty());
    // Symlink targets too.
    let tar = RawTar::new()
        .pax(&[("linkpath", "t".repeat(60).as_bytes())])
        .symlink("s", "x")
        .finish();
    let (res, _sb) = run(&tar, &limits);
    assert!(
        matches!(
            res,
            Err(UnpackError::Limit {
                limit: "max_path_len",
                ..
            })
        ),
        "{res:?}"
    );
    // And a huge pax header is refused before being read into memory.
    let tar = RawTar::new()
        .pax(&[("comment", &vec![b'c'; 10_000])])
        .file("x", b"")
        .finish();
    let (res, _sb) = run(&tar, &limits);
    assert!(
        matches!(res, Err(UnpackError::BadExtension { .. })),
        "{res:?}"
    );
}

#[test]
fn pax_size_disagreeing_with_header_is_refused() {
    let tar = RawTar::new()
        .pax(&[("size", b"0")])
        .file("x", &[1u8; 600])
        .finish();
    let (res, _sb) = run_default(&tar);
    assert!(
        matches!(res, Err(UnpackError::BadExtension { .. })),
        "{res:?}"
    );
}

#[test]
fn whiteout_marker_rules() {
    for (name, reason) in [
        (".wh.", "whiteout of an empty"),
        ("d/.wh..", "whiteout of an empty"),
        (".wh..wh.foo", "reserved"),
    ] {
        let tar = RawTar::new().file(name, b"").finish();
        let (res, _sb) = run_default(&tar);
        invalid_path(res, reason);
    }
    // `.wh..` (name `.`) and `.wh...` (name `..`) never reach mknod.
    let tar = RawTar::new().file(".wh...", b"").finish();
    let (res, sb) = run_default(&tar);
    invalid_path(res, "whiteout of an empty");
    assert!(sb.target_listing().is_empty());
    // A whiteout marker must be a regular file.
    let tar = RawTar::new().dir(".wh.x/").finish();
    let (res, _sb) = run_default(&tar);
    invalid_path(res, "regular file");
}

#[test]
fn duplicates_later_wins_for_files_and_dirs_update_metadata() {
    let mut t = RawTar::new();
    t.file("f", b"first").file("f", b"second");
    t.entry(b"d/", EntryType::Directory, b"", b"", 0o700);
    t.file("d/inner", b"x");
    t.entry(b"d/", EntryType::Directory, b"", b"", 0o751);
    let tar = t.finish();
    let (res, sb) = run_default(&tar);
    res.unwrap();
    assert_eq!(std::fs::read(sb.target.join("f")).unwrap(), b"second");
    let md = std::fs::metadata(sb.target.join("d")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o751);
    assert!(
        sb.target.join("d/inner").exists(),
        "dir over dir keeps its content"
    );
    assert_eq!(md.mtime(), 1_600_000_000);

    // A file over a directory is a conflict.
    let tar = RawTar::new()
        .dir("d/")
        .file("d/x", b"")
        .file("d", b"")
        .finish();
    let (res, sb) = run_default(&tar);
    assert!(matches!(res, Err(UnpackError::Conflict { .. })), "{res:?}");
    assert!(sb.target.join("d/x").exists());
}

#[test]
fn missing_parents_are_created_and_whiteouts_opaques_land_in_overlay_form() {
    let tar = RawTar::new()
        .file("a/b/c.txt", b"c")
        .file("a/.wh.gone", b"")
        .file("a/b/.wh..wh..opq", b"")
        .finish();
    let (res, sb) = run_default(&tar);
    let s = res.unwrap();
    assert_eq!((s.files, s.whiteouts, s.opaque_dirs), (1, 1, 1));
    assert_eq!(std::fs::read(sb.target.join("a/b/c.txt")).unwrap(), b"c");
    let wh = std::fs::symlink_metadata(sb.target.join("a/gone")).unwrap();
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    assert_eq!(
        xattr(&sb.target.join("a/b"), "user.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(xattr(&sb.target.join("a"), "user.overlay.opaque"), None);
    assert_eq!(sb.target_listing(), ["a", "a/b", "a/b/c.txt", "a/gone"]);
}

#[test]
fn layer_id_is_the_sha256_of_the_whole_stream_including_padding() {
    let mut tar = RawTar::new().file("x", b"hello").finish();
    tar.extend_from_slice(&[0u8; 8192]); // extra zero padding after the end blocks
    let (res, _sb) = run_default(&tar);
    let s = res.unwrap();
    assert_eq!(s.bytes, tar.len() as u64);
    assert_eq!(s.layer_id, sha256_hex(&tar));
}

#[test]
fn truncated_and_malformed_tars_are_errors() {
    let tar = RawTar::new().file("x", &[1u8; 2000]).finish();
    let cut = &tar[..512 + 700];
    let (res, sb) = run_default(cut);
    assert!(
        matches!(
            res,
            Err(UnpackError::Truncated {
                expected: 2000,
                got: 700,
                ..
            })
        ),
        "{res:?}"
    );
    drop(sb);
    let mut bad = tar.clone();
    bad[10] ^= 0x55; // breaks the header checksum
    let (res, _sb) = run_default(&bad);
    assert!(matches!(res, Err(UnpackError::Read { .. })), "{res:?}");
    // A lone header block cut in half.
    let (res, _sb) = run_default(&tar[..300]);
    assert!(matches!(res, Err(UnpackError::Read { .. })), "{res:?}");
    // An extension header with no member after it.
    let mut t = RawTar::new();
    t.pax(&[("path", b"x")]);
    let (res, _sb) = run_default(&t.finish());
    assert!(
        matches!(res, Err(UnpackError::BadExtension { .. })),
        "{res:?}"
    );
}

#[test]
fn target_must_be_empty() {
    let sb = Sandbox::new();
    std::fs::write(sb.target.join("existing"), b"").unwrap();
    let tar = RawTar::new().file("x", b"").finish();
    let res = unpack(tar.as_slice(), &sb.target, &UnpackLimits::default());
    assert!(
        matches!(res, Err(UnpackError::TargetNotEmpty { .. })),
        "{res:?}"
    );
    assert!(!sb.target.join("x").exists());
}

#[test]
fn errors_name_what_is_wrong() {
    let tar = RawTar::new().file("../evil", b"").finish();
    let (res, _sb) = run_default(&tar);
    let msg = res.unwrap_err().to_string();
    assert!(msg.contains("../evil") && msg.contains(".."), "{msg}");
    let tar = RawTar::new().file("big", &[0u8; 10]).finish();
    let (res, _sb) = run(
        &tar,
        &UnpackLimits {
            max_file_bytes: 5,
            ..UnpackLimits::default()
        },
    );
    let msg = res.unwrap_err().to_string();
    assert!(
        msg.contains("max_file_bytes") && msg.contains("10") && msg.contains('5'),
        "{msg}"
    );
}
