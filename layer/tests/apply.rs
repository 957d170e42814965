//! Merging an overlay-form layer onto a directory (restore).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use udos_layer::{
    apply, read_output, seal_output, unpack, ReadLimits, SealLimits, StepRecord, UnpackLimits,
};

fn write(p: &Path, data: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

#[test]
fn whiteouts_opaques_files_and_symlinks() {
    let sb = Sandbox::new();
    let target = &sb.target;
    let layer = sb.dir.path().join("layer");
    std::fs::create_dir(&layer).unwrap();

    // The target before: files, a tree, a dir to be made opaque, a symlink in the way.
    write(&target.join("keep.txt"), b"keep");
    write(&target.join("gone.txt"), b"gone");
    write(&target.join("tree/a/b/c.txt"), b"deep");
    std::os::unix::fs::symlink("/etc", target.join("tree/a/link-in-tree")).unwrap();
    write(&target.join("opq/old1"), b"old");
    write(&target.join("opq/sub/old2"), b"old");
    write(&target.join("merge/old"), b"old");
    write(&target.join("replace.txt"), b"old content");
    write(&target.join("file-becomes-dir"), b"file");
    write(&target.join("dir-becomes-file/x"), b"x");
    // A symlink where the layer has a directory: must be replaced, not followed.
    std::os::unix::fs::symlink(&sb.outside, target.join("via")).unwrap();
    // A symlink where the layer has a file: replaced, the outside file untouched.
    std::os::unix::fs::symlink(sb.outside.join("sentinel"), target.join("filelink")).unwrap();

    // The layer in overlay form.
    mknod_whiteout(&layer.join("gone.txt"));
    mknod_whiteout(&layer.join("tree"));
    mknod_whiteout(&layer.join("never-existed"));
    std::fs::create_dir(layer.join("opq")).unwrap();
    set_opaque(&layer.join("opq"));
    write(&layer.join("opq/new"), b"new");
    write(&layer.join("merge/new"), b"new");
    write(&layer.join("h1"), b"linked");
    std::fs::hard_link(layer.join("h1"), layer.join("merge/h2")).unwrap();
    chmod(&layer.join("merge"), 0o710);
    lchown(&layer.join("merge"), 11, 12);
    set_mtime(&layer.join("merge"), 1_400_000_000);
    write(&layer.join("replace.txt"), b"new content");
    chmod(&layer.join("replace.txt"), 0o600);
    lchown(&layer.join("replace.txt"), 21, 22);
    set_mtime(&layer.join("replace.txt"), 1_400_000_001);
    write(&layer.join("file-becomes-dir/inner"), b"inner");
    write(&layer.join("dir-becomes-file"), b"now a file");
    write(&layer.join("via/pwned"), b"pwned");
    write(&layer.join("filelink"), b"plain file now");
    std::os::unix::fs::symlink("../somewhere", layer.join("newlink")).unwrap();
    lchown(&layer.join("newlink"), 31, 32);
    mkfifo(&layer.join("fifo"));

    let before = sb.snapshot();
    // The layer dir itself is in the sandbox and must not change either: compare the
    // rest only.
    let stats = apply(&layer, target).unwrap();
    let after = sb.snapshot();
    assert_eq!(after, before, "outside of the target changed");

    assert_eq!(stats.whiteouts, 3);
    assert_eq!(stats.opaque_dirs, 1);
    assert_eq!(stats.skipped, 1);
    assert_eq!(stats.hardlinks, 1);
    assert_eq!(stats.symlinks, 1);

    // Whiteouts delete a file and a whole tree (without following the symlink in it).
    assert!(std::fs::symlink_metadata(target.join("gone.txt")).is_err());
    assert!(std::fs::symlink_metadata(target.join("tree")).is_err());
    assert!(std::fs::symlink_metadata(target.join("never-existed")).is_err());
    assert!(Path::new("/etc/passwd").exists());
    assert_eq!(std::fs::read(target.join("keep.txt")).unwrap(), b"keep");

    // Opaque replaces the directory's content; the xattr is not copied.
    let mut opq: Vec<_> = std::fs::read_dir(target.join("opq"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    opq.sort();
    assert_eq!(opq, ["new"]);
    assert_eq!(xattr(&target.join("opq"), "user.overlay.opaque"), None);

    // A plain directory merges, with the layer's metadata.
    assert_eq!(std::fs::read(target.join("merge/old")).unwrap(), b"old");
    assert_eq!(std::fs::read(target.join("merge/new")).unwrap(), b"new");
    let md = std::fs::metadata(target.join("merge")).unwrap();
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.gid(), md.mtime()),
        (0o710, 11, 12, 1_400_000_000)
    );

    // Files replace files with their metadata.
    assert_eq!(
        std::fs::read(target.join("replace.txt")).unwrap(),
        b"new content"
    );
    let md = std::fs::metadata(target.join("replace.txt")).unwrap();
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.gid(), md.mtime()),
        (0o600, 21, 22, 1_400_000_001)
    );

    // Type changes both ways.
    assert_eq!(
        std::fs::read(target.join("file-becomes-dir/inner")).unwrap(),
        b"inner"
    );
    assert_eq!(
        std::fs::read(target.join("dir-becomes-file")).unwrap(),
        b"now a file"
    );

    // The symlink `via` was replaced by a directory, not followed.
    let via = std::fs::symlink_metadata(target.join("via")).unwrap();
    assert!(via.is_dir(), "symlink replaced by a directory");
    assert_eq!(std::fs::read(target.join("via/pwned")).unwrap(), b"pwned");
    assert!(!sb.outside.join("pwned").exists());
    // `filelink` replaced by a file; the outside sentinel intact.
    assert!(std::fs::symlink_metadata(target.join("filelink"))
        .unwrap()
        .is_file());
    assert_eq!(
        std::fs::read(sb.outside.join("sentinel")).unwrap(),
        b"untouched"
    );

    // Symlinks are copied as symlinks, owner kept.
    let l = std::fs::symlink_metadata(target.join("newlink")).unwrap();
    assert!(l.file_type().is_symlink());
    assert_eq!((l.uid(), l.gid()), (31, 32));
    assert_eq!(
        std::fs::read_link(target.join("newlink")).unwrap(),
        Path::new("../somewhere")
    );

    // Hardlinks stay hardlinks.
    let a = std::fs::metadata(target.join("h1")).unwrap();
    let b = std::fs::metadata(target.join("merge/h2")).unwrap();
    assert_eq!(a.ino(), b.ino());

    // Skipped fifo.
    assert!(std::fs::symlink_metadata(target.join("fifo")).is_err());
}

#[test]
fn symlinked_parent_deep_in_the_path_is_replaced() {
    let sb = Sandbox::new();
    let layer = sb.dir.path().join("layer");
    write(&layer.join("a/b/c/file"), b"data");
    std::fs::create_dir_all(sb.target.join("a")).unwrap();
    std::os::unix::fs::symlink(&sb.outside, sb.target.join("a/b")).unwrap();
    let before = sb.snapshot();
    apply(&layer, &sb.target).unwrap();
    // The layer was written before the snapshot: nothing outside the target changed.
    assert_eq!(sb.snapshot(), before);
    assert!(std::fs::symlink_metadata(sb.target.join("a/b"))
        .unwrap()
        .is_dir());
    assert_eq!(
        std::fs::read(sb.target.join("a/b/c/file")).unwrap(),
        b"data"
    );
    assert!(!sb.outside.join("c").exists());
}

#[test]
fn whiteout_of_a_symlink_to_a_directory_removes_only_the_link() {
    let sb = Sandbox::new();
    let layer = sb.dir.path().join("layer");
    std::fs::create_dir(&layer).unwrap();
    mknod_whiteout(&layer.join("link"));
    std::os::unix::fs::symlink(&sb.outside, sb.target.join("link")).unwrap();
    let before = sb.snapshot();
    apply(&layer, &sb.target).unwrap();
    assert_eq!(sb.snapshot(), before);
    assert!(std::fs::symlink_metadata(sb.target.join("link")).is_err());
    assert!(sb.outside.join("sentinel").exists());
}

#[test]
fn opaque_layer_root_empties_the_target() {
    let sb = Sandbox::new();
    let layer = sb.dir.path().join("layer");
    std::fs::create_dir(&layer).unwrap();
    set_opaque(&layer);
    write(&layer.join("only"), b"1");
    write(&sb.target.join("old/x"), b"x");
    let s = apply(&layer, &sb.target).unwrap();
    assert_eq!(s.opaque_dirs, 1);
    assert_eq!(sb.target_listing(), ["only"]);
}

/// Seal an upper, read it back, unpack it, apply it onto a lower: the overlay view.
#[test]
fn seal_unpack_apply_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let lower = tmp.path().join("lower");
    write(&lower.join("etc/motd"), b"old motd");
    write(&lower.join("etc/removed"), b"x");
    write(&lower.join("var/cache/a"), b"a");
    write(&lower.join("var/cache/b"), b"b");

    let upper = tmp.path().join("upper");
    write(&upper.join("etc/motd"), b"new motd");
    mknod_whiteout(&upper.join("etc/removed"));
    std::fs::create_dir_all(upper.join("var/cache")).unwrap();
    set_opaque(&upper.join("var/cache"));
    write(&upper.join("var/cache/c"), b"c");
    write(&upper.join("workspace/out.txt"), b"result");

    let device = tmp.path().join("out.img");
    std::fs::File::create(&device)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut rec = StepRecord::error("x");
    seal_output(&device, Some(&upper), &mut rec, &SealLimits::default()).unwrap();
    let out = read_output(&device, &ReadLimits::default()).unwrap();
    let layer = tmp.path().join("layer");
    std::fs::create_dir(&layer).unwrap();
    let us = unpack(
        out.layer_reader(&device).unwrap(),
        &layer,
        &UnpackLimits::default(),
    )
    .unwrap();
    out.check_layer_id(&us.layer_id).unwrap();
    apply(&layer, &lower).unwrap();

    assert_eq!(std::fs::read(lower.join("etc/motd")).unwrap(), b"new motd");
    assert!(!lower.join("etc/removed").exists());
    let mut cache: Vec<_> = std::fs::read_dir(lower.join("var/cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    cache.sort();
    assert_eq!(cache, ["c"]);
    assert_eq!(
        std::fs::read(lower.join("workspace/out.txt")).unwrap(),
        b"result"
    );
}

#[test]
fn missing_dirs_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let err = apply(&tmp.path().join("nope"), tmp.path()).unwrap_err();
    assert!(
        matches!(err, udos_layer::ApplyError::OpenLayer { .. }),
        "{err:?}"
    );
    let err = apply(tmp.path(), &tmp.path().join("nope")).unwrap_err();
    assert!(
        matches!(err, udos_layer::ApplyError::OpenTarget { .. }),
        "{err:?}"
    );
}
