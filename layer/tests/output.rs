//! The host reading sealed outputs that are missing, damaged, truncated or forged, and
//! PID 1 sealing when the layer does not fit.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use sha2::{Digest, Sha256};
use udos_layer::format::SealedHeader;
use udos_layer::{
    read_output, seal_output, OutputError, ReadLimits, RecordStatus, SealLimits, StepRecord,
    UnpackLimits,
};

fn zero_device(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// A sealed device with a small layer; returns (tempdir, device path).
fn sealed() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    std::fs::create_dir(&upper).unwrap();
    std::fs::write(upper.join("a.txt"), vec![b'a'; 5000]).unwrap();
    let device = tmp.path().join("out.img");
    zero_device(&device, 1 << 20);
    let mut record = StepRecord::error("x");
    record.status = RecordStatus::Success;
    record.error = None;
    seal_output(&device, Some(&upper), &mut record, &SealLimits::default()).unwrap();
    (tmp, device)
}

fn header(device: &Path) -> SealedHeader {
    let raw = std::fs::read(device).unwrap();
    SealedHeader::decode(&raw[..4096]).unwrap()
}

fn write_header(device: &Path, h: &SealedHeader) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(device)
        .unwrap();
    f.write_all_at(&h.encode(), 0).unwrap();
}

#[test]
fn all_zero_device_is_not_sealed() {
    let tmp = tempfile::tempdir().unwrap();
    let device = tmp.path().join("out.img");
    zero_device(&device, 1 << 20);
    let err = read_output(&device, &ReadLimits::default()).unwrap_err();
    assert!(matches!(err, OutputError::NotSealed { .. }), "{err:?}");
    assert!(err.means_not_sealed());
    assert!(err.to_string().contains("guest did not seal"), "{err}");
}

#[test]
fn tiny_or_garbage_device_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let device = tmp.path().join("out.img");
    zero_device(&device, 100);
    let err = read_output(&device, &ReadLimits::default()).unwrap_err();
    assert!(
        matches!(err, OutputError::TooSmall { size: 100, .. }),
        "{err:?}"
    );

    std::fs::write(&device, vec![0xabu8; 8192]).unwrap();
    let err = read_output(&device, &ReadLimits::default()).unwrap_err();
    assert!(matches!(err, OutputError::BadMagic { .. }), "{err:?}");
    assert!(err.means_not_sealed());
}

#[test]
fn corrupted_record_byte_fails_the_checksum() {
    let (_tmp, device) = sealed();
    let h = header(&device);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&device)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, h.record_offset + 3).unwrap();
    b[0] ^= 0x01;
    f.write_all_at(&b, h.record_offset + 3).unwrap();
    let err = read_output(&device, &ReadLimits::default()).unwrap_err();
    assert!(matches!(err, OutputError::RecordChecksum { .. }), "{err:?}");
    assert!(!err.means_not_sealed());
}

#[test]
fn corrupted_header_byte_fails_the_header_checksum() {
    let (_tmp, device) = sealed();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&device)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 25).unwrap();
    b[0] ^= 0x80;
    f.write_all_at(&b, 25).unwrap();
    let err = read_output(&device, &ReadLimits::default()).unwrap_err();
    assert!(matches!(err, OutputError::HeaderChecksum { .. }), "{err:?}");
    assert!(err.means_not_sealed());
}

#[test]
fn truncated_device_is_out_of_bounds() {
    let (_tmp, device) = sealed();
    let h = header(&device);
    // Cut inside the record.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&device)
        .unwrap()
        .set_len(h.record_offset + h.record_len - 1)
        .unwrap();
    let err = read_output(&device, &ReadLimits::default()).unwrap_err();
    assert!(
        matches!(err, OutputError::OutOfBounds { what: "record", .. }),
        "{err:?}"
    );
    // Cut inside the layer.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&device)
        .unwrap()
        .set_len(4096 + h.layer_len / 2)
        .unwrap();
    let err = read_output(&device, &ReadLimits::default()).unwrap_err();
    assert!(
        matches!(err, OutputError::OutOfBounds { what: "layer", .. }),
        "{err:?}"
    );
}

#[test]
fn limits_are_enforced() {
    let (_tmp, device) = sealed();
    let h = header(&device);
    let err = read_output(
        &device,
        &ReadLimits {
            max_layer_len: h.layer_len - 1,
            ..ReadLimits::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, OutputError::LayerTooLarge { .. }), "{err:?}");
    let err = read_output(
        &device,
        &ReadLimits {
            max_record_len: h.record_len - 1,
            ..ReadLimits::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, OutputError::RecordTooLarge { .. }), "{err:?}");
}

#[test]
fn forged_headers_with_valid_checksums_are_refused() {
    let (_tmp, device) = sealed();
    let good = header(&device);

    let mut h = good.clone();
    h.record_offset += 4096;
    write_header(&device, &h);
    let err = read_output(&device, &ReadLimits::default()).unwrap_err();
    assert!(matches!(err, OutputError::BadLayout { .. }), "{err:?}");

    let mut h = good.clone();
    h.layer_offset = 0;
    write_header(&device, &h);
    let err = read_output(&device, &ReadLimits::default()).unwrap_err();
    assert!(matches!(err, OutputError::BadLayout { .. }), "{err:?}");

    let mut h = good.clone();
    h.layer_len = u64::MAX - 100;
    write_header(&device, &h);
    let err = read_output(
        &device,
        &ReadLimits {
            max_layer_len: u64::MAX,
            ..ReadLimits::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, OutputError::OutOfBounds { what: "layer", .. }),
        "{err:?}"
    );

    let mut h = good.clone();
    h.version = 2;
    write_header(&device, &h);
    let err = read_output(&device, &ReadLimits::default()).unwrap_err();
    assert!(
        matches!(err, OutputError::UnsupportedVersion { version: 2 }),
        "{err:?}"
    );

    let mut h = good.clone();
    h.flags = 1;
    write_header(&device, &h);
    let err = read_output(&device, &ReadLimits::default()).unwrap_err();
    assert!(
        matches!(err, OutputError::UnsupportedFlags { flags: 1 }),
        "{err:?}"
    );

    let mut h = good.clone();
    h.record_len = 0;
    write_header(&device, &h);
    let err = read_output(&device, &ReadLimits::default()).unwrap_err();
    assert!(matches!(err, OutputError::BadLayout { .. }), "{err:?}");

    // A record that is valid JSON but not a step record / wrong version.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&device)
        .unwrap();
    let json = br#"{"version":2,"status":"success","error":null,"act_exit_code":0}"#;
    f.write_all_at(json, good.record_offset).unwrap();
    let mut h = good.clone();
    h.record_len = json.len() as u64;
    h.record_sha256 = Sha256::digest(json).into();
    write_header(&device, &h);
    let err = read_output(&device, &ReadLimits::default()).unwrap_err();
    assert!(
        matches!(err, OutputError::RecordVersion { version: 2 }),
        "{err:?}"
    );

    let junk = b"not json";
    f.write_all_at(junk, good.record_offset).unwrap();
    h.record_len = junk.len() as u64;
    h.record_sha256 = Sha256::digest(junk).into();
    write_header(&device, &h);
    let err = read_output(&device, &ReadLimits::default()).unwrap_err();
    assert!(matches!(err, OutputError::RecordJson { .. }), "{err:?}");
}

#[test]
fn corrupted_layer_fails_the_layer_checksum() {
    let (tmp, device) = sealed();
    let out = read_output(&device, &ReadLimits::default()).unwrap();
    out.verify_layer(&device).unwrap();
    // Flip a byte of file content inside the layer (after the first 512-byte header).
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&device)
        .unwrap();
    let off = 4096 + 512 * 3 + 10;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x20;
    f.write_all_at(&b, off).unwrap();
    // The header and record still verify: the layer is checked when read.
    let out = read_output(&device, &ReadLimits::default()).unwrap();
    let err = out.verify_layer(&device).unwrap_err();
    assert!(matches!(err, OutputError::LayerChecksum { .. }), "{err:?}");
    let target = tmp.path().join("t");
    std::fs::create_dir(&target).unwrap();
    let err = out
        .unpack_layer(&device, &target, &UnpackLimits::default())
        .unwrap_err();
    assert!(matches!(err, OutputError::LayerChecksum { .. }), "{err:?}");
}

#[test]
fn layer_over_max_bytes_seals_an_error_record() {
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    std::fs::create_dir(&upper).unwrap();
    std::fs::write(upper.join("big"), vec![1u8; 200_000]).unwrap();
    let device = tmp.path().join("out.img");
    zero_device(&device, 4 << 20);
    let mut record = StepRecord::error("placeholder");
    record.status = RecordStatus::Success;
    record.error = None;
    let s = seal_output(
        &device,
        Some(&upper),
        &mut record,
        &SealLimits { max_bytes: 100_000 },
    )
    .unwrap();
    assert_eq!(s.layer_len, 0);
    let why = s.layer_error.clone().unwrap();
    assert!(why.contains("100000"), "{why}");
    let out = read_output(&device, &ReadLimits::default()).unwrap();
    assert_eq!(out.layer_len, 0);
    assert_eq!(out.record_offset, 4096);
    assert_eq!(out.record.status, RecordStatus::Error);
    assert_eq!(out.record.error.as_deref(), Some(why.as_str()));
    assert_eq!(out.record.layer.entries, 0);
}

#[test]
fn layer_larger_than_device_seals_an_error_record() {
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    std::fs::create_dir(&upper).unwrap();
    std::fs::write(upper.join("big"), vec![1u8; 300_000]).unwrap();
    let device = tmp.path().join("out.img");
    zero_device(&device, 64 * 1024);
    let mut record = StepRecord::error("act failed to start");
    let s = seal_output(&device, Some(&upper), &mut record, &SealLimits::default()).unwrap();
    assert_eq!(s.layer_len, 0);
    let out = read_output(&device, &ReadLimits::default()).unwrap();
    assert_eq!(out.record.status, RecordStatus::Error);
    let err = out.record.error.unwrap();
    assert!(err.starts_with("act failed to start; seal: "), "{err}");
    assert!(err.contains("does not fit the output device"), "{err}");
    // The device was not grown.
    assert_eq!(std::fs::metadata(&device).unwrap().len(), 64 * 1024);
}

#[test]
fn layer_fits_but_record_does_not() {
    // The layer alone fits; the record after it does not: error record at 4096.
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    std::fs::create_dir(&upper).unwrap();
    // 512 header + 8192 data + 1024 end = 9728 bytes of layer -> record at 16384.
    std::fs::write(upper.join("f"), vec![1u8; 8192]).unwrap();
    let device = tmp.path().join("out.img");
    zero_device(&device, 16384 + 10);
    let mut record = StepRecord::error("x");
    record.status = RecordStatus::Success;
    record.error = None;
    let s = seal_output(&device, Some(&upper), &mut record, &SealLimits::default()).unwrap();
    assert_eq!(s.layer_len, 0);
    assert!(s.layer_error.unwrap().contains("do not fit"));
    let out = read_output(&device, &ReadLimits::default()).unwrap();
    assert_eq!(out.record.status, RecordStatus::Error);
}

#[test]
fn unreadable_upper_seals_an_error_record() {
    let tmp = tempfile::tempdir().unwrap();
    let device = tmp.path().join("out.img");
    zero_device(&device, 1 << 20);
    let mut record = StepRecord::error("x");
    record.status = RecordStatus::Failure;
    record.error = None;
    let s = seal_output(
        &device,
        Some(&tmp.path().join("no-such-upper")),
        &mut record,
        &SealLimits::default(),
    )
    .unwrap();
    assert_eq!(s.layer_len, 0);
    let out = read_output(&device, &ReadLimits::default()).unwrap();
    assert_eq!(out.record.status, RecordStatus::Error);
    let err = out.record.error.unwrap();
    assert!(
        err.starts_with("seal: cannot open upper directory"),
        "{err}"
    );
    assert!(err.contains("no-such-upper"), "{err}");
}

#[test]
fn device_too_small_for_anything_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let device = tmp.path().join("out.img");
    zero_device(&device, 4096);
    let mut record = StepRecord::error("x");
    let err = seal_output(&device, None, &mut record, &SealLimits::default()).unwrap_err();
    assert!(
        matches!(err, udos_layer::SealError::DeviceTooSmall { .. }),
        "{err:?}"
    );
    zero_device(&device, 4096 + 20);
    let err = seal_output(&device, None, &mut record, &SealLimits::default()).unwrap_err();
    assert!(
        matches!(err, udos_layer::SealError::DeviceTooSmall { .. }),
        "{err:?}"
    );
    // And the host sees an unsealed device.
    let err = read_output(&device, &ReadLimits::default()).unwrap_err();
    assert!(err.means_not_sealed(), "{err:?}");
}

#[test]
fn missing_device_is_an_open_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = seal_output(
        &tmp.path().join("nope"),
        None,
        &mut StepRecord::error("x"),
        &SealLimits::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, udos_layer::SealError::OpenDevice { .. }),
        "{err:?}"
    );
    let err = read_output(&tmp.path().join("nope"), &ReadLimits::default()).unwrap_err();
    assert!(matches!(err, OutputError::Open { .. }), "{err:?}");
    let _ = sha256_hex(b"");
}
