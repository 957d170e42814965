//! Seal an overlay upper to a device file, read it back, unpack it, check everything.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use common::*;
use udos_layer::format::SealedHeader;
use udos_layer::{
    read_output, seal_output, unpack, write_layer_tar, ActResult, ActStep, LayerStats, ReadLimits,
    ReadSet, RecordStatus, SealLimits, StepRecord, UnpackLimits, MAX_READ_BYTES, MAX_READ_ENTRIES,
    RECORD_VERSION,
};

const LONG_DIR: &str = "this-is-a-rather-long-directory-name-that-goes-on-and-on-and-on-and-on-xxxxxxxxxxxxxxxxxxxxxxx";

fn long_path() -> String {
    // > 255 bytes: needs a pax `path` record.
    format!("{LONG_DIR}/{LONG_DIR}/{LONG_DIR}/file-with-a-long-name.txt")
}

fn long_link_target() -> String {
    format!("../../{LONG_DIR}/{LONG_DIR}/target")
}

/// Builds an upper directory exercising every kind of entry.
fn make_upper(upper: &Path) {
    let p = |rel: &str| upper.join(rel);
    std::fs::create_dir_all(p("workspace/sub/deeper")).unwrap();
    std::fs::write(p("workspace/out.txt"), b"hello layer\n").unwrap();
    chmod(&p("workspace/out.txt"), 0o640);
    lchown(&p("workspace/out.txt"), 1234, 5678);
    set_mtime(&p("workspace/out.txt"), 1_700_000_001);

    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(p("workspace/sub/deeper/big.bin"), &big).unwrap();
    chmod(&p("workspace/sub/deeper/big.bin"), 0o755);
    std::fs::write(p("workspace/empty"), b"").unwrap();
    std::fs::write(p("workspace/setuid"), b"#!/bin/sh\n").unwrap();
    lchown(&p("workspace/setuid"), 0, 0);
    chmod(&p("workspace/setuid"), 0o4755);

    // Symlinks are stored verbatim, whatever they point at.
    std::os::unix::fs::symlink("../etc/motd", p("workspace/link")).unwrap();
    std::os::unix::fs::symlink("/absolute/elsewhere", p("workspace/abslink")).unwrap();
    lchown(&p("workspace/link"), 42, 43);
    set_mtime(&p("workspace/link"), 1_600_000_123);
    std::os::unix::fs::symlink(long_link_target(), p("workspace/longlink")).unwrap();

    // Hardlink: two names, one inode.
    std::fs::hard_link(p("workspace/out.txt"), p("workspace/sub/hardlink")).unwrap();

    // Whiteouts: a deleted file and a deleted directory.
    std::fs::create_dir_all(p("etc")).unwrap();
    mknod_whiteout(&p("etc/gone"));
    mknod_whiteout(&p("deleted-dir"));
    std::fs::write(p("etc/motd"), b"motd\n").unwrap();

    // Opaque directory with content.
    std::fs::create_dir_all(p("opaque/inner")).unwrap();
    set_opaque(&p("opaque"));
    std::fs::write(p("opaque/inner/kept"), b"kept").unwrap();
    chmod(&p("opaque"), 0o750);

    // Skipped: fifo, socket-like device, non-whiteout char device.
    mkfifo(&p("workspace/fifo"));
    mknod_char(&p("workspace/null"), 1, 3);

    // Long path.
    let lp = p(&long_path());
    std::fs::create_dir_all(lp.parent().unwrap()).unwrap();
    std::fs::write(&lp, b"long").unwrap();

    // Directory metadata last (creating entries changes dir mtimes).
    chmod(&p("workspace/sub"), 0o711);
    lchown(&p("workspace/sub"), 7, 8);
    set_mtime(&p("workspace/sub"), 1_500_000_000);
    set_mtime(&p("workspace"), 1_500_000_001);
}

fn sample_record() -> StepRecord {
    let mut outputs = BTreeMap::new();
    outputs.insert("name".to_string(), "value".to_string());
    StepRecord {
        version: RECORD_VERSION,
        status: RecordStatus::Success,
        error: None,
        act_exit_code: Some(0),
        steps: vec![ActStep {
            id: "udos-step".to_string(),
            result: ActResult::Success,
            exit_code: Some(0),
            outputs,
            env: BTreeMap::new(),
            path: vec!["/opt/bin".to_string()],
            summary: Some("# Built\n".to_string()),
            masks: vec!["registered-mask".to_string()],
        }],
        timings_ms: BTreeMap::from([("act".to_string(), 1500)]),
        layer: LayerStats::default(),
        reads: Some(ReadSet {
            files: vec!["a.txt".to_string(), "src/main.rs".to_string()],
            dirs: vec![".".to_string(), "src".to_string()],
            truncated: false,
        }),
    }
}

fn zero_device(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// Compares one path's metadata in `a` (the upper) and `b` (the unpacked layer).
fn assert_same_meta(a: &Path, b: &Path, rel: &str, check_mtime: bool) {
    let ma = std::fs::symlink_metadata(a.join(rel)).unwrap();
    let mb = std::fs::symlink_metadata(b.join(rel)).unwrap();
    assert_eq!(ma.file_type(), mb.file_type(), "{rel}: type");
    if !ma.file_type().is_symlink() {
        assert_eq!(ma.mode(), mb.mode(), "{rel}: mode");
    }
    assert_eq!(ma.uid(), mb.uid(), "{rel}: uid");
    assert_eq!(ma.gid(), mb.gid(), "{rel}: gid");
    if check_mtime {
        assert_eq!(ma.mtime(), mb.mtime(), "{rel}: mtime");
    }
    if ma.is_file() {
        assert_eq!(
            std::fs::read(a.join(rel)).unwrap(),
            std::fs::read(b.join(rel)).unwrap(),
            "{rel}: content"
        );
    }
    if ma.file_type().is_symlink() {
        assert_eq!(
            std::fs::read_link(a.join(rel)).unwrap(),
            std::fs::read_link(b.join(rel)).unwrap(),
            "{rel}: symlink target"
        );
    }
}

#[test]
fn seal_read_unpack_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    std::fs::create_dir(&upper).unwrap();
    make_upper(&upper);
    let device = tmp.path().join("out.img");
    zero_device(&device, 8 << 20);

    let mut record = sample_record();
    let summary = seal_output(&device, Some(&upper), &mut record, &SealLimits::default()).unwrap();
    assert_eq!(summary.layer_error, None);
    assert_eq!(record.status, RecordStatus::Success);
    assert!(
        record.timings_ms.contains_key("seal"),
        "seal timing recorded"
    );
    // fifo and the 1:3 char device are skipped.
    assert_eq!(summary.stats.skipped, 2);
    assert_eq!(record.layer, summary.stats);
    assert!(summary.layer_len > 300_000);
    assert_eq!(summary.layer_len % 512, 0);

    // The header on the device, byte for byte.
    let raw = std::fs::read(&device).unwrap();
    assert_eq!(&raw[..8], b"UDOSOUT1");
    assert_eq!(u32::from_le_bytes(raw[8..12].try_into().unwrap()), 1);
    let h = SealedHeader::decode(&raw[..4096]).unwrap();
    assert_eq!(h.layer_offset, 4096);
    assert_eq!(h.layer_len, summary.layer_len);
    assert_eq!(h.record_offset % 4096, 0);
    assert!(h.record_offset >= 4096 + h.layer_len && h.record_offset < 4096 + h.layer_len + 4096);
    let layer_bytes = &raw[4096..4096 + h.layer_len as usize];
    assert_eq!(sha256_hex(layer_bytes), summary.layer_id);
    let record_bytes = &raw[h.record_offset as usize..(h.record_offset + h.record_len) as usize];
    assert_eq!(sha256_hex(record_bytes), hex::encode(h.record_sha256));

    // The layer is the tar write_layer_tar gives, deterministic.
    let mut again = Vec::new();
    let stats = write_layer_tar(&upper, &mut again, &SealLimits::default()).unwrap();
    assert_eq!(again.as_slice(), layer_bytes);
    assert_eq!(stats, summary.stats);

    // The tar content in OCI form, as a standard reader sees it.
    let mut names = Vec::new();
    let mut archive = tar::Archive::new(layer_bytes);
    for e in archive.entries().unwrap() {
        let e = e.unwrap();
        names.push((
            String::from_utf8(e.path_bytes().into_owned()).unwrap(),
            e.header().entry_type(),
        ));
    }
    let has = |n: &str, t: tar::EntryType| names.iter().any(|(p, k)| p == n && *k == t);
    assert!(has("etc/.wh.gone", tar::EntryType::Regular), "{names:?}");
    assert!(has(".wh.deleted-dir", tar::EntryType::Regular));
    assert!(has("opaque/", tar::EntryType::Directory));
    assert!(has("opaque/.wh..wh..opq", tar::EntryType::Regular));
    assert!(has("workspace/sub/hardlink", tar::EntryType::Link));
    assert!(has(&long_path(), tar::EntryType::Regular));
    assert!(!names
        .iter()
        .any(|(p, _)| p.starts_with('/') || p.contains("fifo") || p.contains("null")));
    // Sorted order: a directory comes before its content, the opq marker right after
    // its directory.
    let pos = |n: &str| names.iter().position(|(p, _)| p == n).unwrap();
    assert!(pos("workspace/") < pos("workspace/out.txt"));
    assert_eq!(pos("opaque/") + 1, pos("opaque/.wh..wh..opq"));
    assert_eq!(names.len() as u64, summary.stats.entries);

    // Host side.
    let out = read_output(&device, &ReadLimits::default()).unwrap();
    assert_eq!(out.record, record);
    assert_eq!(
        out.record.step("udos-step").unwrap().outputs["name"],
        "value"
    );
    assert_eq!(out.record.reads, sample_record().reads);
    assert_eq!(out.layer_id, summary.layer_id);
    assert_eq!(out.layer_offset, 4096);
    assert_eq!(out.layer_len, summary.layer_len);
    out.verify_layer(&device).unwrap();

    let target = tmp.path().join("unpacked");
    std::fs::create_dir(&target).unwrap();
    let us = unpack(
        out.layer_reader(&device).unwrap(),
        &target,
        &UnpackLimits::default(),
    )
    .unwrap();
    assert_eq!(us.layer_id, out.layer_id);
    assert_eq!(us.bytes, out.layer_len);
    assert_eq!(us.whiteouts, 2);
    assert_eq!(us.opaque_dirs, 1);
    assert_eq!(us.hardlinks, 1);
    assert_eq!(us.entries, summary.stats.entries);

    // Every property.
    for rel in [
        "workspace/out.txt",
        "workspace/sub/deeper/big.bin",
        "workspace/empty",
        "workspace/setuid",
        "workspace/link",
        "workspace/abslink",
        "workspace/longlink",
        "etc/motd",
        "opaque/inner/kept",
        &long_path(),
    ] {
        assert_same_meta(&upper, &target, rel, true);
    }
    for rel in [
        "workspace",
        "workspace/sub",
        "opaque",
        "opaque/inner",
        "etc",
    ] {
        assert_same_meta(&upper, &target, rel, true);
    }
    let md = std::fs::metadata(target.join("workspace/setuid")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o4755, "setuid bit kept");
    let sub = std::fs::metadata(target.join("workspace/sub")).unwrap();
    assert_eq!(
        (sub.mode() & 0o7777, sub.uid(), sub.gid(), sub.mtime()),
        (0o711, 7, 8, 1_500_000_000)
    );
    assert_eq!(
        std::fs::read_link(target.join("workspace/longlink"))
            .unwrap()
            .to_str()
            .unwrap(),
        long_link_target()
    );
    assert_eq!(
        std::fs::read_link(target.join("workspace/abslink"))
            .unwrap()
            .to_str()
            .unwrap(),
        "/absolute/elsewhere"
    );

    // Hardlink: one inode again.
    let a = std::fs::metadata(target.join("workspace/out.txt")).unwrap();
    let b = std::fs::metadata(target.join("workspace/sub/hardlink")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);

    // Whiteouts are 0/0 char devices again, no `.wh.` files left.
    for rel in ["etc/gone", "deleted-dir"] {
        let m = std::fs::symlink_metadata(target.join(rel)).unwrap();
        assert!(m.file_type().is_char_device(), "{rel} is a char device");
        assert_eq!(m.rdev(), 0, "{rel} is 0/0");
    }
    assert!(!target.join("etc/.wh.gone").exists());
    assert!(std::fs::symlink_metadata(target.join(".wh.deleted-dir")).is_err());

    // Opaque: the xattr on the directory, no marker file.
    assert_eq!(
        xattr(&target.join("opaque"), "user.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert!(std::fs::symlink_metadata(target.join("opaque/.wh..wh..opq")).is_err());
    assert_eq!(
        xattr(&target.join("workspace"), "user.overlay.opaque"),
        None
    );

    // Skipped entries are absent.
    assert!(std::fs::symlink_metadata(target.join("workspace/fifo")).is_err());
    assert!(std::fs::symlink_metadata(target.join("workspace/null")).is_err());

    // Same set of paths (minus skipped).
    let list = |root: &Path| {
        let mut v = Vec::new();
        let mut todo = vec![root.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                    todo.push(p.clone());
                }
                v.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
        v.sort();
        v
    };
    let mut expected = list(&upper);
    expected.retain(|p| p != "workspace/fifo" && p != "workspace/null");
    assert_eq!(list(&target), expected);
}

#[test]
fn trusted_opaque_xattr_is_sealed_too() {
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    std::fs::create_dir_all(upper.join("d")).unwrap();
    rustix::fs::lsetxattr(
        upper.join("d"),
        "trusted.overlay.opaque",
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let mut tar = Vec::new();
    write_layer_tar(&upper, &mut tar, &SealLimits::default()).unwrap();
    let mut archive = tar::Archive::new(tar.as_slice());
    let names: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(names, ["d/", "d/.wh..wh..opq"]);
}

#[test]
fn no_upper_seals_an_empty_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let device = tmp.path().join("out.img");
    zero_device(&device, 1 << 20);
    let mut record = StepRecord::error("act missing");
    let s = seal_output(&device, None, &mut record, &SealLimits::default()).unwrap();
    assert_eq!(s.layer_len, 0);
    assert_eq!(s.record_offset, 4096);
    assert_eq!(s.layer_id, sha256_hex(b""));
    let out = read_output(&device, &ReadLimits::default()).unwrap();
    assert_eq!(out.layer_len, 0);
    assert_eq!(out.record.status, RecordStatus::Error);
    assert_eq!(out.record.error.as_deref(), Some("act missing"));
    // No read set is written as `null`, and reads back as none.
    assert_eq!(out.record.reads, None);
    let raw = std::fs::read(&device).unwrap();
    let json = &raw[4096..4096 + out_record_len(&raw)];
    let value: serde_json::Value = serde_json::from_slice(json).unwrap();
    assert_eq!(value["reads"], serde_json::Value::Null);
    let target = tmp.path().join("t");
    std::fs::create_dir(&target).unwrap();
    let us = out
        .unpack_layer(&device, &target, &UnpackLimits::default())
        .unwrap();
    assert_eq!(us.entries, 0);
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
}

#[test]
fn reseal_overwrites_a_previous_seal() {
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    std::fs::create_dir(&upper).unwrap();
    std::fs::write(upper.join("f"), vec![b'x'; 100_000]).unwrap();
    let device = tmp.path().join("out.img");
    zero_device(&device, 1 << 20);
    seal_output(
        &device,
        Some(&upper),
        &mut sample_record(),
        &SealLimits::default(),
    )
    .unwrap();
    let mut rec = StepRecord::error("second");
    seal_output(&device, None, &mut rec, &SealLimits::default()).unwrap();
    let out = read_output(&device, &ReadLimits::default()).unwrap();
    assert_eq!(out.layer_len, 0);
    assert_eq!(out.record.error.as_deref(), Some("second"));
}

#[test]
fn large_ids_round_trip_through_pax() {
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    std::fs::create_dir(&upper).unwrap();
    std::fs::write(upper.join("f"), b"x").unwrap();
    lchown(&upper.join("f"), 3_000_000_000, 2_500_000);
    let mut tar = Vec::new();
    write_layer_tar(&upper, &mut tar, &SealLimits::default()).unwrap();
    // A pax header carries them.
    let mut archive = tar::Archive::new(tar.as_slice());
    let mut e = archive.entries().unwrap().next().unwrap().unwrap();
    let pax: Vec<(String, String)> = e
        .pax_extensions()
        .unwrap()
        .unwrap()
        .map(|x| {
            let x = x.unwrap();
            (x.key().unwrap().to_string(), x.value().unwrap().to_string())
        })
        .collect();
    assert!(
        pax.contains(&("uid".to_string(), "3000000000".to_string())),
        "{pax:?}"
    );
    assert!(
        pax.contains(&("gid".to_string(), "2500000".to_string())),
        "{pax:?}"
    );
    let target = tmp.path().join("t");
    std::fs::create_dir(&target).unwrap();
    unpack(tar.as_slice(), &target, &UnpackLimits::default()).unwrap();
    let md = std::fs::metadata(target.join("f")).unwrap();
    assert_eq!((md.uid(), md.gid()), (3_000_000_000, 2_500_000));
}

fn out_record_len(raw: &[u8]) -> usize {
    SealedHeader::decode(&raw[..4096]).unwrap().record_len as usize
}

/// PID 1 stops adding to a read set at its bounds; a set at both of them still seals
/// into a record the host accepts under its default limits, and reads back whole.
#[test]
fn a_full_read_set_stays_within_the_record_limit() {
    let per_path = MAX_READ_BYTES / MAX_READ_ENTRIES;
    let path = |i: usize| format!("{i:0>width$}", width = per_path);
    let files: Vec<String> = (0..MAX_READ_ENTRIES / 2).map(path).collect();
    let dirs: Vec<String> = (MAX_READ_ENTRIES / 2..MAX_READ_ENTRIES).map(path).collect();
    let mut record = sample_record();
    record.reads = Some(ReadSet {
        files,
        dirs,
        truncated: true,
    });
    let tmp = tempfile::tempdir().unwrap();
    let device = tmp.path().join("out.img");
    zero_device(&device, 32 << 20);
    let s = seal_output(&device, None, &mut record, &SealLimits::default()).unwrap();
    let limits = ReadLimits::default();
    assert!(
        s.record_len < limits.max_record_len,
        "{} >= {}",
        s.record_len,
        limits.max_record_len
    );
    let out = read_output(&device, &limits).unwrap();
    assert_eq!(out.record.reads, record.reads);
}

/// The host exports a stored layer by writing its overlay form back as a tar: that
/// gives the sealed stream again, byte for byte (so its SHA-256 is the layer id), and
/// names skipped at the top (a snapshot's description) leave no trace.
#[test]
fn an_unpacked_layer_writes_back_the_sealed_tar() {
    let dir = tempfile::tempdir().unwrap();
    let upper = dir.path().join("upper");
    std::fs::create_dir(&upper).unwrap();
    make_upper(&upper);
    let mut sealed = Vec::new();
    write_layer_tar(&upper, &mut sealed, &SealLimits::default()).unwrap();

    let stored = dir.path().join("stored");
    std::fs::create_dir(&stored).unwrap();
    unpack(sealed.as_slice(), &stored, &UnpackLimits::default()).unwrap();
    let mut again = Vec::new();
    write_layer_tar(&stored, &mut again, &SealLimits::default()).unwrap();
    assert_eq!(sha256_hex(&again), sha256_hex(&sealed));

    std::fs::write(stored.join(".udos-layer.json"), b"{}").unwrap();
    std::fs::create_dir(stored.join("extra")).unwrap();
    std::fs::write(stored.join("extra/inside"), b"x").unwrap();
    let mut skipped = Vec::new();
    udos_layer::write_layer_tar_skipping(
        &stored,
        &mut skipped,
        &SealLimits::default(),
        &[".udos-layer.json", "extra"],
    )
    .unwrap();
    assert_eq!(sha256_hex(&skipped), sha256_hex(&sealed));
    // Without the skip list the extra names are written.
    let mut all = Vec::new();
    write_layer_tar(&stored, &mut all, &SealLimits::default()).unwrap();
    assert_ne!(sha256_hex(&all), sha256_hex(&sealed));
}
