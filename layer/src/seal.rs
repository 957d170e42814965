//! PID 1's side: overlay upper directory -> OCI-style layer tar -> sealed output device.
//!
//! Synchronous, allocation-light, and panic-free: everything returns a [`SealError`].
//! See docs/layer-format.md for the format.
//!
//! - [`write_layer_tar`] walks an overlay upper directory (never following symlinks,
//!   names in bytewise order so the same tree always gives the same bytes) and writes
//!   the layer tar.
//! - [`seal_output`] writes layer, step record and header to the output device.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use rustix::fs::{self as rfs, FileType, Mode, OFlags, StatExt};
use rustix::io::Errno;
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use crate::format::{align_up, SealedHeader, FORMAT_VERSION, HEADER_SIZE, LAYER_OFFSET};
use crate::fsutil;
use crate::record::{LayerStats, RecordStatus, StepRecord};

/// Name of the marker file that makes its directory opaque (OCI).
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// Prefix of a whiteout file (OCI): `.wh.<name>` deletes `<name>`.
pub const WHITEOUT_PREFIX: &str = ".wh.";

/// Limits applied while sealing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealLimits {
    /// Largest layer tar to write, in bytes. The device size bounds it too.
    pub max_bytes: u64,
}

impl Default for SealLimits {
    /// No limit beyond the device's own size.
    fn default() -> Self {
        Self {
            max_bytes: u64::MAX,
        }
    }
}

/// What [`seal_output`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealSummary {
    /// The layer id: SHA-256 of the layer tar as 64 lowercase hex digits (the hash of
    /// nothing when there is no layer).
    pub layer_id: String,
    /// Counts of the sealed layer (all zero when there is no layer).
    pub stats: LayerStats,
    /// Bytes of layer tar on the device (`0` for no layer).
    pub layer_len: u64,
    /// Where the record JSON starts on the device.
    pub record_offset: u64,
    /// Length of the record JSON.
    pub record_len: u64,
    /// `Some(why)` when the layer could not be sealed (too large, unreadable upper...)
    /// and an error record with `layer_len = 0` was sealed instead. The same text is in
    /// the record's `error`.
    pub layer_error: Option<String>,
}

/// Why sealing failed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The upper directory could not be opened.
    #[error("cannot open upper directory {path}: {source}")]
    OpenUpper {
        /// The upper directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Reading something in the upper directory failed.
    #[error("cannot {op} {path:?} in the upper directory: {source}")]
    Upper {
        /// Path relative to the upper directory.
        path: String,
        /// What was being done (`stat`, `open`, `read`, `readlink`, `list`).
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Writing the tar stream failed.
    #[error("cannot write the layer tar: {source}")]
    Write {
        /// The I/O error.
        source: io::Error,
    },
    /// The layer tar grew beyond its limit.
    #[error("the layer exceeds its limit of {max} bytes")]
    TooLarge {
        /// The limit in bytes.
        max: u64,
    },
    /// The output device could not be opened for writing.
    #[error("cannot open output device {path}: {source}")]
    OpenDevice {
        /// The device path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// An I/O operation on the output device failed.
    #[error("output device {path}: cannot {op}: {source}")]
    Device {
        /// The device path.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The I/O error.
        source: io::Error,
    },
    /// The device cannot hold even a header and an (error) record.
    #[error("output device {path} has {size} bytes; sealing needs at least {needed}")]
    DeviceTooSmall {
        /// The device path.
        path: PathBuf,
        /// The device size in bytes.
        size: u64,
        /// Bytes needed.
        needed: u64,
    },
    /// The record could not be serialized.
    #[error("cannot serialize the step record: {source}")]
    RecordJson {
        /// The serde error.
        source: serde_json::Error,
    },
}

/// A writer that counts bytes and refuses to go beyond a limit.
struct Counting<W> {
    inner: W,
    count: u64,
    max: u64,
    exceeded: bool,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.max.saturating_sub(self.count);
        if buf.len() as u64 > room {
            self.exceeded = true;
            return Err(io::Error::other("layer size limit exceeded"));
        }
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A writer that hashes what goes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(buf.get(..n).unwrap_or_default());
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Exactly `remaining` bytes of a file: short files are padded with zeros (the file
/// changed while sealing), read errors are kept aside so they can be reported.
struct ExactFile {
    file: File,
    remaining: u64,
    eof: bool,
    error: Option<io::Error>,
}

impl Read for ExactFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let Some(dst) = buf.get_mut(..want) else {
            return Ok(0);
        };
        let n = if self.eof {
            dst.fill(0);
            want
        } else {
            match self.file.read(dst) {
                Ok(0) => {
                    self.eof = true;
                    dst.fill(0);
                    want
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
                Err(e) => {
                    let kind = e.kind();
                    self.error = Some(e);
                    return Err(io::Error::new(kind, "reading a file of the upper failed"));
                }
            }
        };
        self.remaining = self.remaining.saturating_sub(n as u64);
        Ok(n)
    }
}

/// Metadata written into a tar header.
#[derive(Clone, Copy)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
}

impl Meta {
    fn of(st: &rfs::Stat) -> Self {
        Self {
            mode: fsutil::perm_bits(st),
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: u64::try_from(st.mtime()).unwrap_or(0),
        }
    }
}

/// Writes `path` into a ustar header's `name`/`prefix`; `false` when it does not fit.
fn set_ustar_path(h: &mut Header, path: &[u8]) -> bool {
    let Some(ustar) = h.as_ustar_mut() else {
        return false;
    };
    let (prefix, name): (&[u8], &[u8]) = if path.len() <= ustar.name.len() {
        (&[], path)
    } else {
        let split = path.iter().enumerate().position(|(i, b)| {
            *b == b'/'
                && i <= ustar.prefix.len()
                && path.len() - i - 1 <= ustar.name.len()
                && i > 0
                && path.len() - i - 1 > 0
        });
        match split {
            Some(i) => match (path.get(..i), path.get(i + 1..)) {
                (Some(p), Some(n)) => (p, n),
                _ => return false,
            },
            None => return false,
        }
    };
    match (
        ustar.name.get_mut(..name.len()),
        ustar.prefix.get_mut(..prefix.len()),
    ) {
        (Some(n), Some(p)) => {
            n.copy_from_slice(name);
            p.copy_from_slice(prefix);
            true
        }
        _ => false,
    }
}

/// One pax record: `"<len> <key>=<value>\n"` where `<len>` counts the whole record.
fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

struct TarWriter<W: Write> {
    builder: tar::Builder<W>,
    stats: LayerStats,
}

impl<W: Write> TarWriter<W> {
    /// Appends one member (with a pax header first if the path or link name does not
    /// fit ustar). `data` must yield exactly `size` bytes.
    fn member(
        &mut self,
        kind: EntryType,
        path: &[u8],
        link: Option<&[u8]>,
        meta: Meta,
        size: u64,
        data: &mut dyn Read,
    ) -> io::Result<()> {
        let mut h = Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(meta.mode);
        h.set_uid(u64::from(meta.uid));
        h.set_gid(u64::from(meta.gid));
        h.set_mtime(meta.mtime);
        h.set_size(size);
        if let Some(ustar) = h.as_ustar_mut() {
            ustar.set_device_major(0);
            ustar.set_device_minor(0);
        }
        let mut pax = Vec::new();
        if !set_ustar_path(&mut h, path) {
            pax_record(&mut pax, "path", path);
            if let Some(ustar) = h.as_ustar_mut() {
                let n = path.len().min(ustar.name.len());
                if let (Some(dst), Some(src)) = (ustar.name.get_mut(..n), path.get(..n)) {
                    dst.copy_from_slice(src);
                }
            }
        }
        // Values too large for ustar's octal fields also go into pax records (the
        // header carries them in GNU base-256 form too).
        const MAX_ID: u32 = 0o7_777_777;
        const MAX_SIZE: u64 = 0o77_777_777_777;
        if size > MAX_SIZE {
            pax_record(&mut pax, "size", size.to_string().as_bytes());
        }
        if meta.uid > MAX_ID {
            pax_record(&mut pax, "uid", meta.uid.to_string().as_bytes());
        }
        if meta.gid > MAX_ID {
            pax_record(&mut pax, "gid", meta.gid.to_string().as_bytes());
        }
        if let Some(link) = link {
            let old = h.as_old_mut();
            if link.len() <= old.linkname.len() {
                if let Some(dst) = old.linkname.get_mut(..link.len()) {
                    dst.copy_from_slice(link);
                }
            } else {
                pax_record(&mut pax, "linkpath", link);
            }
        }
        if !pax.is_empty() {
            let mut ph = Header::new_ustar();
            ph.set_entry_type(EntryType::XHeader);
            ph.set_mode(0o644);
            ph.set_mtime(meta.mtime);
            ph.set_size(pax.len() as u64);
            set_ustar_path(&mut ph, b"././@PaxHeader");
            ph.set_cksum();
            self.builder.append(&ph, pax.as_slice())?;
        }
        h.set_cksum();
        self.builder.append(&h, data)?;
        self.stats.entries += 1;
        Ok(())
    }
}

/// A pending item of the walk: `name` inside the directory `parent`, at `rel`.
struct Item {
    parent: Rc<OwnedFd>,
    name: CString,
    rel: Vec<u8>,
}

fn upper_err(rel: &[u8], op: &'static str, e: impl Into<io::Error>) -> SealError {
    SealError::Upper {
        path: String::from_utf8_lossy(rel).into_owned(),
        op,
        source: e.into(),
    }
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parent.len() + name.len() + 1);
    if !parent.is_empty() {
        out.extend_from_slice(parent);
        out.push(b'/');
    }
    out.extend_from_slice(name);
    out
}

fn push_children(stack: &mut Vec<Item>, dir: OwnedFd, rel: &[u8]) -> Result<(), SealError> {
    let names = fsutil::sorted_names(dir.as_fd()).map_err(|e| upper_err(rel, "list", e))?;
    let dir = Rc::new(dir);
    for name in names.into_iter().rev() {
        let child = join(rel, name.as_bytes());
        stack.push(Item {
            parent: Rc::clone(&dir),
            name,
            rel: child,
        });
    }
    Ok(())
}

/// Walks the overlay `upper` directory and writes its layer tar to `out`.
///
/// Never follows symlinks; visits names in bytewise order (same tree, same bytes).
/// Regular files, directories, symlinks and hardlinks (a regular file whose inode was
/// already written becomes a hardlink to that first path) keep mode, uid, gid and mtime.
/// A whiteout (0/0 character device) becomes an empty `.wh.<name>`; a directory with
/// `user.overlay.opaque=y` or `trusted.overlay.opaque=y` is followed by an empty
/// `<dir>/.wh..wh..opq`. Sockets, fifos and other device nodes are skipped and counted
/// in [`LayerStats::skipped`]. Paths are relative with no leading `/`; names that do
/// not fit ustar get a pax `path`/`linkpath` record.
///
/// Errors with [`SealError::TooLarge`] as soon as the tar would exceed
/// `limits.max_bytes`. `out` is written sequentially and not flushed.
pub fn write_layer_tar<W: Write>(
    upper: &Path,
    out: W,
    limits: &SealLimits,
) -> Result<LayerStats, SealError> {
    write_layer_tar_skipping(upper, out, limits, &[])
}

/// [`write_layer_tar`], leaving out the entries directly under `upper` whose names are
/// in `skip` (and what is below them): the host exports a stored layer without the
/// files it keeps beside the layer's own, such as a snapshot's description.
pub fn write_layer_tar_skipping<W: Write>(
    upper: &Path,
    out: W,
    limits: &SealLimits,
    skip: &[&str],
) -> Result<LayerStats, SealError> {
    let root = fsutil::open_dir_path(upper).map_err(|e| SealError::OpenUpper {
        path: upper.to_path_buf(),
        source: e.into(),
    })?;
    let mut counting = Counting {
        inner: out,
        count: 0,
        max: limits.max_bytes,
        exceeded: false,
    };
    let result = walk_into(root, &mut counting, skip);
    let stats = match result {
        Ok(stats) => stats,
        Err(SealError::Write { .. }) if counting.exceeded => {
            return Err(SealError::TooLarge {
                max: limits.max_bytes,
            })
        }
        Err(e) => return Err(e),
    };
    Ok(LayerStats {
        bytes: counting.count,
        ..stats
    })
}

fn walk_into<W: Write>(
    root: OwnedFd,
    out: &mut Counting<W>,
    skip: &[&str],
) -> Result<LayerStats, SealError> {
    let mut tw = TarWriter {
        builder: tar::Builder::new(out),
        stats: LayerStats::default(),
    };
    let write_err = |source: io::Error| SealError::Write { source };
    let mut stack: Vec<Item> = Vec::new();
    let mut inodes: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    push_children(&mut stack, root, b"")?;
    stack.retain(|item| !skip.iter().any(|n| n.as_bytes() == item.name.as_bytes()));

    while let Some(item) = stack.pop() {
        let parent = item.parent.as_fd();
        let rel = item.rel;
        let st = match rfs::statat(parent, &item.name, rfs::AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            // Vanished since listing (should not happen: nothing runs any more).
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(upper_err(&rel, "stat", e)),
        };
        let meta = Meta::of(&st);
        match fsutil::file_type(&st) {
            FileType::Directory => {
                let dir = fsutil::open_dir_nofollow(parent, &item.name)
                    .map_err(|e| upper_err(&rel, "open", e))?;
                let mut path = rel.clone();
                path.push(b'/');
                tw.member(EntryType::Directory, &path, None, meta, 0, &mut io::empty())
                    .map_err(write_err)?;
                if fsutil::is_opaque(dir.as_fd()) {
                    let marker = join(&rel, OPAQUE_MARKER.as_bytes());
                    let marker_meta = Meta {
                        mode: 0o644,
                        ..meta
                    };
                    tw.member(
                        EntryType::Regular,
                        &marker,
                        None,
                        marker_meta,
                        0,
                        &mut io::empty(),
                    )
                    .map_err(write_err)?;
                }
                push_children(&mut stack, dir, &rel)?;
            }
            FileType::RegularFile => {
                let key = (st.st_dev, st.st_ino);
                if st.st_nlink > 1 {
                    if let Some(first) = inodes.get(&key) {
                        tw.member(
                            EntryType::Link,
                            &rel,
                            Some(first),
                            meta,
                            0,
                            &mut io::empty(),
                        )
                        .map_err(write_err)?;
                        continue;
                    }
                    inodes.insert(key, rel.clone());
                }
                let fd = rfs::openat(
                    parent,
                    &item.name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY,
                    Mode::empty(),
                )
                .map_err(|e| upper_err(&rel, "open", e))?;
                let size = u64::try_from(st.st_size).unwrap_or(0);
                let mut data = ExactFile {
                    file: File::from(fd),
                    remaining: size,
                    eof: false,
                    error: None,
                };
                let res = tw.member(EntryType::Regular, &rel, None, meta, size, &mut data);
                if let Some(e) = data.error.take() {
                    return Err(upper_err(&rel, "read", e));
                }
                res.map_err(write_err)?;
            }
            FileType::Symlink => {
                let target = rfs::readlinkat(parent, &item.name, Vec::new())
                    .map_err(|e| upper_err(&rel, "readlink", e))?;
                tw.member(
                    EntryType::Symlink,
                    &rel,
                    Some(target.as_bytes()),
                    meta,
                    0,
                    &mut io::empty(),
                )
                .map_err(write_err)?;
            }
            _ if fsutil::is_whiteout(&st) => {
                let (dir, name) = match rel.iter().rposition(|b| *b == b'/') {
                    Some(i) => (rel.get(..i).unwrap_or_default(), item.name.as_bytes()),
                    None => (&[][..], item.name.as_bytes()),
                };
                let mut wh_name = WHITEOUT_PREFIX.as_bytes().to_vec();
                wh_name.extend_from_slice(name);
                let path = join(dir, &wh_name);
                tw.member(EntryType::Regular, &path, None, meta, 0, &mut io::empty())
                    .map_err(write_err)?;
            }
            _ => tw.stats.skipped += 1,
        }
    }
    tw.builder.finish().map_err(write_err)?;
    Ok(tw.stats)
}

fn dev_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> SealError + 'a {
    move |source| SealError::Device {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Size of the device or file: seeking to the end works for both block devices and
/// regular files.
fn device_size(file: &File, path: &Path) -> Result<u64, SealError> {
    let mut f = file;
    let size = f.seek(SeekFrom::End(0)).map_err(dev_err(path, "seek"))?;
    f.seek(SeekFrom::Start(0)).map_err(dev_err(path, "seek"))?;
    Ok(size)
}

fn is_enospc(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC)
        || matches!(
            e.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::WriteZero
        )
}

/// Writes the layer tar of `upper` at [`LAYER_OFFSET`]; returns its stats and sha256.
fn write_layer(
    file: &File,
    path: &Path,
    upper: &Path,
    cap: u64,
    device_bound: bool,
) -> Result<(LayerStats, [u8; 32]), String> {
    let mut f = file;
    f.seek(SeekFrom::Start(LAYER_OFFSET))
        .map_err(|e| format!("cannot seek output device {}: {e}", path.display()))?;
    let mut hashing = Hashing {
        inner: BufWriter::with_capacity(256 * 1024, f),
        hasher: Sha256::new(),
    };
    let stats = match write_layer_tar(upper, &mut hashing, &SealLimits { max_bytes: cap }) {
        Ok(stats) => stats,
        Err(SealError::TooLarge { max }) if device_bound => {
            return Err(format!(
                "layer does not fit the output device ({max} bytes available for it)"
            ))
        }
        Err(SealError::Write { source }) if is_enospc(&source) => {
            return Err(format!(
                "layer does not fit the output device ({}): {source}",
                path.display()
            ))
        }
        Err(e) => return Err(e.to_string()),
    };
    match hashing.flush() {
        Ok(()) => {}
        Err(e) if is_enospc(&e) => {
            return Err(format!(
                "layer does not fit the output device ({}): {e}",
                path.display()
            ))
        }
        Err(e) => return Err(format!("cannot write the layer tar: {e}")),
    }
    Ok((stats, hashing.hasher.finalize().into()))
}

fn mark_error(record: &mut StepRecord, why: &str) {
    record.status = RecordStatus::Error;
    record.error = Some(match record.error.take() {
        Some(prev) if !prev.is_empty() => format!("{prev}; {why}"),
        _ => why.to_string(),
    });
}

/// Seals a step's output onto `device` (a raw block device or a plain, pre-sized file).
///
/// Writes, in order: the layer tar of `upper` at offset 4096 (streamed and hashed,
/// never held in memory), the record JSON (with `record.layer` filled and
/// `timings_ms.seal` set) at the next 4096-aligned offset, `fsync`, then the
/// 4096-byte header, `fsync` (docs/layer-format.md). The header block is zeroed first,
/// so an interrupted seal reads back as "not sealed".
///
/// `upper: None` seals no layer (`layer_len = 0`). If the layer cannot be sealed (over
/// `limits.max_bytes`, larger than the device, an unreadable upper, a write error), the
/// record is turned into `status: error` naming why, a header with `layer_len = 0` is
/// still written, and the summary's `layer_error` says so. An `Err` means the device
/// could not be sealed at all (cannot open or write it, too small for an error record).
pub fn seal_output(
    device: &Path,
    upper: Option<&Path>,
    record: &mut StepRecord,
    limits: &SealLimits,
) -> Result<SealSummary, SealError> {
    let started = Instant::now();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(device)
        .map_err(|source| SealError::OpenDevice {
            path: device.to_path_buf(),
            source,
        })?;
    let size = device_size(&file, device)?;
    let min_needed = HEADER_SIZE + 1;
    if size < min_needed {
        return Err(SealError::DeviceTooSmall {
            path: device.to_path_buf(),
            size,
            needed: min_needed,
        });
    }
    // Invalidate any previous header before touching the rest.
    file.write_all_at(&[0u8; HEADER_SIZE as usize], 0)
        .map_err(dev_err(device, "clear the header"))?;

    let empty_sha: [u8; 32] = Sha256::digest([]).into();
    let mut layer_error: Option<String> = None;
    let (mut stats, mut layer_sha) = (LayerStats::default(), empty_sha);
    if let Some(upper) = upper {
        let room = size - LAYER_OFFSET;
        let cap = limits.max_bytes.min(room);
        match write_layer(&file, device, upper, cap, room < limits.max_bytes) {
            Ok((s, sha)) => (stats, layer_sha) = (s, sha),
            Err(why) => layer_error = Some(format!("seal: {why}")),
        }
    }

    loop {
        if let Some(why) = &layer_error {
            stats = LayerStats::default();
            layer_sha = empty_sha;
            mark_error(record, why);
        }
        let layer_len = stats.bytes;
        record.layer = stats.clone();
        let elapsed = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        record.timings_ms.insert("seal".to_string(), elapsed);
        let json = serde_json::to_vec(record).map_err(|source| SealError::RecordJson { source })?;
        let record_len = json.len() as u64;
        let record_offset = LAYER_OFFSET
            .checked_add(layer_len)
            .and_then(align_up)
            .unwrap_or(u64::MAX);
        let fits = record_offset
            .checked_add(record_len)
            .is_some_and(|end| end <= size);
        let written = if fits {
            file.write_all_at(&json, record_offset)
        } else {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        };
        match written {
            Ok(()) => {}
            Err(e) if layer_len > 0 && layer_error.is_none() => {
                layer_error = Some(if fits {
                    format!("seal: cannot write the record after the layer: {e}")
                } else {
                    format!(
                        "seal: layer ({layer_len} bytes) and record ({record_len} bytes) do not fit the output device ({size} bytes)"
                    )
                });
                continue;
            }
            Err(_) if !fits => {
                return Err(SealError::DeviceTooSmall {
                    path: device.to_path_buf(),
                    size,
                    needed: record_offset.saturating_add(record_len),
                })
            }
            Err(e) => return Err(dev_err(device, "write the record")(e)),
        }
        file.sync_all().map_err(dev_err(device, "fsync"))?;
        let header = SealedHeader {
            version: FORMAT_VERSION,
            flags: 0,
            layer_offset: LAYER_OFFSET,
            layer_len,
            layer_sha256: layer_sha,
            record_offset,
            record_len,
            record_sha256: Sha256::digest(&json).into(),
        };
        file.write_all_at(&header.encode(), 0)
            .map_err(dev_err(device, "write the header"))?;
        file.sync_all().map_err(dev_err(device, "fsync"))?;
        return Ok(SealSummary {
            layer_id: hex::encode(layer_sha),
            stats,
            layer_len,
            record_offset,
            record_len,
            layer_error,
        });
    }
}
