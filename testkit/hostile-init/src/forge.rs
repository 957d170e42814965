//! Crafted sealed output in the real format: the header is `udos_layer`'s
//! [`SealedHeader`], honest layers come from `udos_layer`'s own tar writer, and only
//! what a scenario forges differs from what `udos-init` would write.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::{chown, FileExt, PermissionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};
use udos_layer::format::{align_up, FORMAT_VERSION, HEADER_SIZE, LAYER_OFFSET};
use udos_layer::{
    write_layer_tar, ActStep, LayerStats, RecordStatus, SealLimits, SealedHeader, StepRecord,
    RECORD_VERSION,
};

/// What the header says about the layer, where a scenario lies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Claims {
    /// A layer id other than the SHA-256 of the bytes written.
    pub layer_sha256: Option<[u8; 32]>,
    /// A `layer_len` other than the bytes written.
    pub layer_len: Option<u64>,
}

/// Why the output could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} the output device {path}: {source}")]
pub struct ForgeError {
    op: &'static str,
    path: String,
    source: io::Error,
}

fn on(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> ForgeError {
    let path = path.display().to_string();
    move |source| ForgeError { op, path, source }
}

/// A record that says the user's step (act id `_udos_step`) succeeded, so the host
/// takes the layer as that step's result.
pub fn success_record() -> StepRecord {
    StepRecord {
        version: RECORD_VERSION,
        status: RecordStatus::Success,
        error: None,
        act_exit_code: Some(0),
        steps: vec![ActStep {
            id: "_udos_step".into(),
            result: udos_layer::ActResult::Success,
            ..ActStep::default()
        }],
        timings_ms: Default::default(),
        layer: LayerStats::default(),
        reads: None,
    }
}

/// Hashes and counts what goes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(buf.get(..n).unwrap_or_default());
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a sealed output to `device` in the order PID 1 does (header zeroed, layer,
/// record, fsync, header, fsync). `layer` writes the layer bytes and returns how many
/// entries it wrote. The header carries `claims` where given, else the truth; the
/// record is written where the claimed layout puts it when that is inside the device.
pub fn write_output(
    device: &Path,
    record: &mut StepRecord,
    claims: Claims,
    layer: impl FnOnce(&mut dyn Write) -> io::Result<u64>,
) -> Result<(), ForgeError> {
    let mut file = OpenOptions::new()
        .write(true)
        .open(device)
        .map_err(on(device, "open"))?;
    let size = file.seek(SeekFrom::End(0)).map_err(on(device, "seek"))?;
    file.write_all_at(&[0u8; HEADER_SIZE as usize], 0)
        .map_err(on(device, "clear the header of"))?;
    file.seek(SeekFrom::Start(LAYER_OFFSET))
        .map_err(on(device, "seek"))?;
    let mut out = Hashing {
        inner: BufWriter::with_capacity(1 << 20, &file),
        hasher: Sha256::new(),
        count: 0,
    };
    let entries = layer(&mut out).map_err(on(device, "write the layer to"))?;
    out.flush().map_err(on(device, "write the layer to"))?;
    let (bytes, sha) = (out.count, <[u8; 32]>::from(out.hasher.finalize()));

    record.layer = LayerStats {
        entries,
        bytes,
        skipped: 0,
    };
    let json =
        serde_json::to_vec(record).map_err(|e| on(device, "encode the record for")(e.into()))?;
    let layer_len = claims.layer_len.unwrap_or(bytes);
    let record_offset = LAYER_OFFSET
        .checked_add(layer_len)
        .and_then(align_up)
        .unwrap_or(u64::MAX);
    if record_offset.saturating_add(json.len() as u64) <= size {
        file.write_all_at(&json, record_offset)
            .map_err(on(device, "write the record to"))?;
    }
    file.sync_all().map_err(on(device, "fsync"))?;
    let header = SealedHeader {
        version: FORMAT_VERSION,
        flags: 0,
        layer_offset: LAYER_OFFSET,
        layer_len,
        layer_sha256: claims.layer_sha256.unwrap_or(sha),
        record_offset,
        record_len: json.len() as u64,
        record_sha256: Sha256::digest(&json).into(),
    };
    file.write_all_at(&header.encode(), 0)
        .map_err(on(device, "write the header of"))?;
    file.sync_all().map_err(on(device, "fsync"))
}

/// The layer tar of the directory `upper`, written by `udos_layer` itself (an honest
/// stream). Returns the entry count.
pub fn honest_layer(upper: &Path, out: &mut dyn Write) -> io::Result<u64> {
    write_layer_tar(upper, out, &SealLimits::default())
        .map(|stats| stats.entries)
        .map_err(io::Error::other)
}

/// One tar header block with the raw `path` (no checks: that is the point), for a
/// member with no data. Sizes beyond ustar's octal field use GNU's base-256.
pub fn member(
    path: &[u8],
    kind: EntryType,
    mode: u32,
    size: u64,
    link: Option<&[u8]>,
) -> [u8; 512] {
    let mut h = if size >= 1 << 33 {
        Header::new_gnu()
    } else {
        Header::new_ustar()
    };
    let name = &mut h.as_old_mut().name;
    let n = path.len().min(name.len());
    name[..n].copy_from_slice(&path[..n]);
    if let Some(link) = link {
        let field = &mut h.as_old_mut().linkname;
        let n = link.len().min(field.len());
        field[..n].copy_from_slice(&link[..n]);
    }
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h.set_cksum();
    *h.as_bytes()
}

/// Writes `blocks`, then the end-of-archive blocks. Returns the member count.
pub fn crafted_layer(blocks: &[[u8; 512]], out: &mut dyn Write) -> io::Result<u64> {
    for b in blocks {
        out.write_all(b)?;
    }
    out.write_all(&[0u8; 1024])?;
    Ok(blocks.len() as u64)
}

/// `count` members that are each valid and cheap to extract (an opaque marker on the
/// layer's root): only their number is hostile.
pub fn many_entries(count: u64, out: &mut dyn Write) -> io::Result<u64> {
    let block = member(b".wh..wh..opq", EntryType::Regular, 0o644, 0, None);
    for _ in 0..count {
        out.write_all(&block)?;
    }
    out.write_all(&[0u8; 1024])?;
    Ok(count)
}

/// The members of an escape scenario that would create `name` in `/tmp`.
pub fn escape_dotdot(name: &str) -> Vec<[u8; 512]> {
    let path = format!("{}tmp/{name}", "../".repeat(12));
    vec![member(path.as_bytes(), EntryType::Regular, 0o644, 0, None)]
}

/// An absolute member `/tmp/<name>`.
pub fn escape_absolute(name: &str) -> Vec<[u8; 512]> {
    let path = format!("/tmp/{name}");
    vec![member(path.as_bytes(), EntryType::Regular, 0o644, 0, None)]
}

/// A symlink to `/tmp`, then a member through it.
pub fn escape_symlink(name: &str) -> Vec<[u8; 512]> {
    let path = format!("hostile-link/{name}");
    vec![
        member(b"hostile-link", EntryType::Symlink, 0o777, 0, Some(b"/tmp")),
        member(path.as_bytes(), EntryType::Regular, 0o644, 0, None),
    ]
}

/// A member claiming a 1 TiB file, with no data behind the claim.
pub fn oversized_file() -> Vec<[u8; 512]> {
    vec![member(b"huge", EntryType::Regular, 0o644, 1 << 40, None)]
}

/// Where the setuid scenario puts its files, relative to the layer root.
pub const SETUID_PATH: &str = "usr/local/bin/udos-hostile-suid";
/// Where the setgid copy goes.
pub const SETGID_PATH: &str = "usr/local/bin/udos-hostile-sgid";

/// Fills `upper` with root-owned setuid (04755) and setgid (02755) copies of `binary`.
pub fn setuid_tree(upper: &Path, binary: &Path) -> io::Result<()> {
    for (rel, mode) in [(SETUID_PATH, 0o4755), (SETGID_PATH, 0o2755)] {
        let path = upper.join(rel);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::copy(binary, &path)?;
        chown(&path, Some(0), Some(0))?;
        // After chown: changing the owner clears the setuid bit.
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// The size of a device or file.
pub fn device_size(path: &Path) -> io::Result<u64> {
    File::open(path)?.seek(SeekFrom::End(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use udos_layer::{read_output, unpack, OutputError, ReadLimits, UnpackError, UnpackLimits};

    fn device(dir: &Path) -> std::path::PathBuf {
        let p = dir.join("out.img");
        File::create(&p).unwrap().set_len(4 << 20).unwrap();
        p
    }

    fn unpack_blocks(
        blocks: &[[u8; 512]],
        limits: &UnpackLimits,
    ) -> (tempfile::TempDir, UnpackError) {
        let mut tar = Vec::new();
        crafted_layer(blocks, &mut tar).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a/b/target");
        fs::create_dir_all(&target).unwrap();
        let err = unpack(&tar[..], &target, limits).unwrap_err();
        (dir, err)
    }

    /// Everything under `dir` except the target itself.
    fn names_under(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
                if p.is_dir() && !p.is_symlink() {
                    stack.push(p);
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn an_adopting_header_verifies_but_its_layer_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device(dir.path());
        let upper = dir.path().join("upper");
        fs::create_dir_all(&upper).unwrap();
        fs::write(upper.join("mine.txt"), "not the victim's").unwrap();
        let claims = Claims {
            layer_sha256: Some([7; 32]),
            layer_len: None,
        };
        write_output(&dev, &mut success_record(), claims, |out| {
            honest_layer(&upper, out)
        })
        .unwrap();
        let sealed = read_output(&dev, &ReadLimits::default()).unwrap();
        assert_eq!(sealed.layer_id, hex::encode([7u8; 32]));
        assert_eq!(sealed.record.steps[0].id, "_udos_step");
        assert!(matches!(
            sealed.verify_layer(&dev),
            Err(OutputError::LayerChecksum { .. })
        ));
    }

    #[test]
    fn an_honest_output_reads_back_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device(dir.path());
        let upper = dir.path().join("upper");
        fs::create_dir_all(&upper).unwrap();
        fs::write(upper.join("x"), "x").unwrap();
        write_output(&dev, &mut success_record(), Claims::default(), |out| {
            honest_layer(&upper, out)
        })
        .unwrap();
        let sealed = read_output(&dev, &ReadLimits::default()).unwrap();
        sealed.verify_layer(&dev).unwrap();
        assert_eq!(sealed.record.layer.entries, 1);
    }

    #[test]
    fn a_layer_len_past_the_device_is_refused_by_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device(dir.path());
        let size = device_size(&dev).unwrap();
        let claims = Claims {
            layer_sha256: None,
            layer_len: Some(size),
        };
        write_output(&dev, &mut success_record(), claims, |out| {
            crafted_layer(&[], out)
        })
        .unwrap();
        let err = read_output(&dev, &ReadLimits::default()).unwrap_err();
        assert!(
            matches!(err, OutputError::OutOfBounds { what: "layer", .. }),
            "{err}"
        );
    }

    #[test]
    fn escapes_are_refused_and_nothing_lands_outside_the_target() {
        let limits = UnpackLimits::default();
        for (blocks, want) in [
            (escape_dotdot("e1"), "`..` component"),
            (escape_absolute("e2"), "absolute path"),
            (escape_symlink("e3"), "is a symlink or not a directory"),
        ] {
            let (dir, err) = unpack_blocks(&blocks, &limits);
            assert!(err.to_string().contains(want), "{err}");
            let names = names_under(dir.path());
            assert!(
                names
                    .iter()
                    .all(|n| !n.contains("e1") && !n.contains("e2") && !n.contains("e3")),
                "{names:?}"
            );
        }
    }

    #[test]
    fn oversized_members_and_counts_hit_the_unpack_limits() {
        let (_d, err) = unpack_blocks(&oversized_file(), &UnpackLimits::default());
        assert!(
            matches!(err, UnpackError::Limit { limit: "max_file_bytes", value, .. } if value == 1 << 40),
            "{err}"
        );
        let mut tar = Vec::new();
        many_entries(11, &mut tar).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let limits = UnpackLimits {
            max_entries: 10,
            ..UnpackLimits::default()
        };
        let err = unpack(&tar[..], dir.path(), &limits).unwrap_err();
        assert!(
            matches!(
                err,
                UnpackError::Limit {
                    limit: "max_entries",
                    value: 11,
                    ..
                }
            ),
            "{err}"
        );
        // One fewer is a valid layer: only the count is hostile.
        let mut tar = Vec::new();
        many_entries(10, &mut tar).unwrap();
        let dir = tempfile::tempdir().unwrap();
        unpack(&tar[..], dir.path(), &limits).unwrap();
    }

    #[test]
    fn the_setuid_tree_keeps_its_bits_through_the_real_tar_writer() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("upper");
        let exe = std::env::current_exe().unwrap();
        if let Err(e) = setuid_tree(&upper, &exe) {
            // chown to root needs root; the VM's PID 1 always is.
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
            return;
        }
        let mut tar = Vec::new();
        assert_eq!(honest_layer(&upper, &mut tar).unwrap(), 5);
        let target = dir.path().join("target");
        fs::create_dir(&target).unwrap();
        unpack(&tar[..], &target, &UnpackLimits::default()).unwrap();
        let suid = fs::metadata(target.join(SETUID_PATH)).unwrap();
        assert_eq!(suid.mode() & 0o7777, 0o4755);
        assert_eq!(suid.uid(), 0);
        let sgid = fs::metadata(target.join(SETGID_PATH)).unwrap();
        assert_eq!(sgid.mode() & 0o7777, 0o2755);
    }
}
