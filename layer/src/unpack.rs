//! The host's side of a layer: extract an untrusted layer tar into **overlay form**.
//!
//! [`unpack`] turns OCI markers back into what overlayfs and erofs read: `.wh.<name>`
//! becomes a 0/0 character device `<name>`, `.wh..wh..opq` becomes the xattr
//! `user.overlay.opaque=y` on its directory.
//!
//! Confinement: every path is validated (relative, no `..`, no NUL, not empty) and
//! every parent component is opened with `openat(O_NOFOLLOW | O_DIRECTORY)` relative
//! to the target's descriptor; the final component is created with `*at` calls that
//! never follow it (`O_CREAT | O_EXCL | O_NOFOLLOW`, `mkdirat`, `symlinkat`, `linkat`
//! without `AT_SYMLINK_FOLLOW`, `mknodat`). So a symlink in the layer can never
//! redirect a later entry outside the target. Hardlinks may only point to a regular
//! file already extracted from this layer. Device nodes other than whiteouts and fifos
//! are refused. Sizes, entry count and path lengths are bounded by [`UnpackLimits`].
//!
//! Mode bits (setuid included) and owners are restored as the layer says: keep the
//! target inside a directory only root can enter.

use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};
use tar::EntryType;

use crate::fsutil;
use crate::seal::{OPAQUE_MARKER, WHITEOUT_PREFIX};

/// Bounds on an untrusted layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Largest tar stream, in bytes (headers, padding and contents).
    pub max_total_bytes: u64,
    /// Most tar members (files, directories, links, whiteouts, opaque markers).
    pub max_entries: u64,
    /// Largest single file.
    pub max_file_bytes: u64,
    /// Longest path or link target, in bytes.
    pub max_path_len: usize,
}

impl Default for UnpackLimits {
    /// 64 GiB total, 1 000 000 entries, 16 GiB per file, 4096-byte paths.
    fn default() -> Self {
        Self {
            max_total_bytes: 64 << 30,
            max_entries: 1_000_000,
            max_file_bytes: 16 << 30,
            max_path_len: 4096,
        }
    }
}

/// What [`unpack`] extracted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackSummary {
    /// SHA-256 of the whole tar stream as read (64 lowercase hex digits): compare it
    /// with the layer id from the header.
    pub layer_id: String,
    /// Bytes of the tar stream read (the whole stream, to its end).
    pub bytes: u64,
    /// Tar members processed.
    pub entries: u64,
    /// Regular files written.
    pub files: u64,
    /// Directories created or updated.
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Hardlinks created.
    pub hardlinks: u64,
    /// Whiteouts (0/0 character devices) created.
    pub whiteouts: u64,
    /// Directories marked opaque.
    pub opaque_dirs: u64,
}

/// Why an untrusted layer was refused. Nothing is ever written outside the target;
/// what was written inside it before the error is left for the caller to discard.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The target directory could not be opened.
    #[error("cannot open unpack target {path}: {source}")]
    OpenTarget {
        /// The target.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The target directory is not empty.
    #[error("unpack target {path} is not empty")]
    TargetNotEmpty {
        /// The target.
        path: PathBuf,
    },
    /// The tar stream is malformed or could not be read.
    #[error("cannot read the layer tar: {source}")]
    Read {
        /// The I/O or format error.
        source: io::Error,
    },
    /// A limit of [`UnpackLimits`] was exceeded.
    #[error("layer exceeds {limit}: {value} > {max}")]
    Limit {
        /// The limit's field name (`max_total_bytes`, `max_entries`, `max_file_bytes`,
        /// `max_path_len`).
        limit: &'static str,
        /// The value seen (at least).
        value: u64,
        /// The limit.
        max: u64,
    },
    /// A member's path is not acceptable.
    #[error("refusing layer entry {path:?}: {reason}")]
    InvalidPath {
        /// The path as in the tar (lossy UTF-8).
        path: String,
        /// What is wrong (absolute, `..`, empty, NUL...).
        reason: &'static str,
    },
    /// A symlink's target is not acceptable (empty, NUL, too long).
    #[error("refusing symlink {path:?} -> {target:?}: {reason}")]
    InvalidSymlink {
        /// The symlink's path.
        path: String,
        /// Its target.
        target: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A hardlink points outside the layer or to something not extracted before it.
    #[error("refusing hardlink {path:?} -> {target:?}: {reason}")]
    InvalidHardlink {
        /// The link's path.
        path: String,
        /// What it links to.
        target: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A parent component is a symlink or not a directory; it is never followed.
    #[error("refusing layer entry {path:?}: its parent component {component:?} is a symlink or not a directory (links are never followed)")]
    NotADirectory {
        /// The entry's path.
        path: String,
        /// The offending component.
        component: String,
    },
    /// The entry collides with an earlier one in a way that is not allowed.
    #[error("refusing layer entry {path:?}: {reason}")]
    Conflict {
        /// The entry's path.
        path: String,
        /// What collides.
        reason: &'static str,
    },
    /// Device nodes other than whiteouts, and fifos, are refused.
    #[error("refusing layer entry {path:?}: {kind} not allowed in a layer")]
    ForbiddenEntry {
        /// The entry's path.
        path: String,
        /// What it is (`character device 1:3`, `block device`, `fifo`).
        kind: String,
    },
    /// An entry type this crate does not extract (sparse files, volume labels...).
    #[error("refusing layer entry {path:?}: unsupported tar entry type {type_byte:#04x}")]
    UnsupportedEntry {
        /// The entry's path.
        path: String,
        /// The tar typeflag byte.
        type_byte: u8,
    },
    /// A header field could not be parsed.
    #[error("refusing layer entry {path:?}: bad {field} field: {source}")]
    BadHeader {
        /// The entry's path.
        path: String,
        /// The field.
        field: &'static str,
        /// The parse error.
        source: io::Error,
    },
    /// A pax extended header or GNU long name is malformed or too large.
    #[error("refusing layer: bad {kind}: {reason}")]
    BadExtension {
        /// `pax header`, `GNU long name`, ...
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The stream ended inside a file's contents.
    #[error("layer entry {path:?} is truncated: {got} of {expected} bytes")]
    Truncated {
        /// The entry's path.
        path: String,
        /// Bytes the header announced.
        expected: u64,
        /// Bytes read.
        got: u64,
    },
    /// A filesystem operation inside the target failed.
    #[error("cannot {op} {path:?} in the unpack target: {source}")]
    Io {
        /// The entry's path.
        path: String,
        /// The operation.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Reads, hashes and counts the tar stream; refuses to read beyond `max`.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    max: u64,
    exceeded: bool,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.count > self.max {
            self.exceeded = true;
            return Err(io::Error::other("max_total_bytes exceeded"));
        }
        // Read at most one byte past the limit, to notice it.
        let room = (self.max - self.count).saturating_add(1);
        let want = usize::try_from(room).unwrap_or(usize::MAX).min(buf.len());
        let Some(dst) = buf.get_mut(..want) else {
            return Ok(0);
        };
        let n = self.inner.read(dst)?;
        self.hasher.update(dst.get(..n).unwrap_or_default());
        self.count += n as u64;
        if self.count > self.max {
            self.exceeded = true;
            return Err(io::Error::other("max_total_bytes exceeded"));
        }
        Ok(n)
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Splits and validates an entry path into its normal components.
fn split_path(raw: &[u8]) -> Result<Vec<CString>, &'static str> {
    if raw.is_empty() {
        return Err("empty path");
    }
    if raw.contains(&0) {
        return Err("NUL byte in path");
    }
    if raw.first() == Some(&b'/') {
        return Err("absolute path");
    }
    let mut comps = Vec::new();
    for comp in raw.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => continue,
            b".." => return Err("`..` component"),
            _ => comps.push(CString::new(comp).map_err(|_| "NUL byte in path")?),
        }
    }
    if comps.is_empty() {
        return Err("path names the target directory itself");
    }
    Ok(comps)
}

fn join_key(comps: &[CString]) -> Vec<u8> {
    let mut key = Vec::new();
    for (i, c) in comps.iter().enumerate() {
        if i > 0 {
            key.push(b'/');
        }
        key.extend_from_slice(c.as_bytes());
    }
    key
}

/// Extension headers seen before the member they describe.
#[derive(Default)]
struct Pending {
    pax: Option<Vec<u8>>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.pax.is_none() && self.long_name.is_none() && self.long_link.is_none()
    }
}

/// What the pax header of a member overrides.
#[derive(Default)]
struct PaxFields {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<u64>,
}

fn parse_pax(data: &[u8]) -> Result<PaxFields, UnpackError> {
    let bad = |reason: String| UnpackError::BadExtension {
        kind: "pax header",
        reason,
    };
    let num = |key: &str, v: &[u8]| -> Result<u64, UnpackError> {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| bad(format!("{key} is not a number: {:?}", lossy(v))))
    };
    let mut out = PaxFields::default();
    for ext in tar::PaxExtensions::new(data) {
        let ext = ext.map_err(|e| bad(e.to_string()))?;
        let value = ext.value_bytes();
        match ext.key_bytes() {
            b"path" => out.path = Some(value.to_vec()),
            b"linkpath" => out.linkpath = Some(value.to_vec()),
            b"size" => out.size = Some(num("size", value)?),
            b"uid" => out.uid = Some(num("uid", value)?),
            b"gid" => out.gid = Some(num("gid", value)?),
            b"mtime" => {
                // Seconds, possibly with a fraction; before 1970 clamps to 0.
                let secs = value.split(|b| *b == b'.').next().unwrap_or_default();
                out.mtime = Some(if secs.first() == Some(&b'-') {
                    0
                } else {
                    num("mtime", secs)?
                });
            }
            _ => {}
        }
    }
    Ok(out)
}

/// One member, with its extension headers applied.
struct Member {
    path: Vec<u8>,
    link: Option<Vec<u8>>,
    kind: EntryType,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    size: u64,
}

/// The state of one extraction.
struct Extractor<'a> {
    root: OwnedFd,
    limits: &'a UnpackLimits,
    /// Regular files extracted so far (normalized paths): the only valid hardlink
    /// targets.
    files: HashSet<Vec<u8>>,
    /// Directories whose mode and mtime are set at the end (creating entries in them
    /// changes their mtime; a read-only mode could block the entries).
    deferred: Vec<(Vec<CString>, u32, i64)>,
    summary: UnpackSummary,
    buf: Vec<u8>,
}

fn io_err(path: &[u8], op: &'static str) -> impl FnOnce(Errno) -> UnpackError {
    let path = lossy(path);
    move |e| UnpackError::Io {
        path,
        op,
        source: e.into(),
    }
}

/// Extracts the layer tar `tar` into the existing, empty directory `target`, in
/// overlay form (see the module docs for the rules and the confinement).
///
/// The whole stream is consumed to its end and hashed: the summary's `layer_id` is the
/// SHA-256 of every byte read, to compare with the layer id the header announced (the
/// caller discards the target when they differ). Duplicate entries: a later
/// non-directory replaces an earlier non-directory; a directory over an existing
/// directory updates its metadata; a non-directory over a directory is refused.
/// Missing parent directories are created (mode 0755, root). Exceeding a limit is
/// [`UnpackError::Limit`] naming it.
pub fn unpack(
    tar: impl Read,
    target: &Path,
    limits: &UnpackLimits,
) -> Result<UnpackSummary, UnpackError> {
    let root = fsutil::open_dir_path(target).map_err(|e| UnpackError::OpenTarget {
        path: target.to_path_buf(),
        source: e.into(),
    })?;
    match fsutil::dir_is_empty(root.as_fd()) {
        Ok(true) => {}
        Ok(false) => {
            return Err(UnpackError::TargetNotEmpty {
                path: target.to_path_buf(),
            })
        }
        Err(e) => {
            return Err(UnpackError::OpenTarget {
                path: target.to_path_buf(),
                source: e.into(),
            })
        }
    }
    let reader = HashingReader {
        inner: BufReader::with_capacity(128 * 1024, tar),
        hasher: Sha256::new(),
        count: 0,
        max: limits.max_total_bytes,
        exceeded: false,
    };
    let mut archive = tar::Archive::new(reader);
    let mut ex = Extractor {
        root,
        limits,
        files: HashSet::new(),
        deferred: Vec::new(),
        summary: UnpackSummary::default(),
        buf: vec![0u8; 128 * 1024],
    };
    let result = ex.extract_all(&mut archive);
    let mut reader = archive.into_inner();
    let over_limit = |r: &HashingReader<_>| UnpackError::Limit {
        limit: "max_total_bytes",
        value: r.count,
        max: limits.max_total_bytes,
    };
    if reader.exceeded {
        return Err(over_limit(&reader));
    }
    result?;
    // Consume (and hash) the rest: end-of-archive blocks and padding.
    if let Err(e) = io::copy(&mut reader, &mut io::sink()) {
        return Err(if reader.exceeded {
            over_limit(&reader)
        } else {
            UnpackError::Read { source: e }
        });
    }
    ex.finish_dirs()?;
    let mut summary = ex.summary;
    summary.bytes = reader.count;
    summary.layer_id = hex::encode(reader.hasher.finalize());
    Ok(summary)
}

impl Extractor<'_> {
    fn extract_all<R: Read>(&mut self, archive: &mut tar::Archive<R>) -> Result<(), UnpackError> {
        let read_err = |source: io::Error| UnpackError::Read { source };
        let entries = archive.entries().map_err(read_err)?.raw(true);
        let mut pending = Pending::default();
        for entry in entries {
            let mut entry = entry.map_err(read_err)?;
            let kind = entry.header().entry_type();
            match kind {
                EntryType::XHeader => {
                    let data = self.read_extension(&mut entry, "pax header")?;
                    if pending.pax.replace(data).is_some() {
                        return Err(UnpackError::BadExtension {
                            kind: "pax header",
                            reason: "two pax headers for one entry".to_string(),
                        });
                    }
                    continue;
                }
                EntryType::XGlobalHeader => {
                    // Global pax headers (comments, e.g. from git archive) are ignored.
                    self.read_extension(&mut entry, "global pax header")?;
                    continue;
                }
                EntryType::GNULongName => {
                    let data = self.read_extension(&mut entry, "GNU long name")?;
                    if pending.long_name.replace(data).is_some() {
                        return Err(UnpackError::BadExtension {
                            kind: "GNU long name",
                            reason: "two long names for one entry".to_string(),
                        });
                    }
                    continue;
                }
                EntryType::GNULongLink => {
                    let data = self.read_extension(&mut entry, "GNU long link name")?;
                    if pending.long_link.replace(data).is_some() {
                        return Err(UnpackError::BadExtension {
                            kind: "GNU long link name",
                            reason: "two long link names for one entry".to_string(),
                        });
                    }
                    continue;
                }
                _ => {}
            }
            let ext = std::mem::take(&mut pending);
            self.summary.entries += 1;
            if self.summary.entries > self.limits.max_entries {
                return Err(UnpackError::Limit {
                    limit: "max_entries",
                    value: self.summary.entries,
                    max: self.limits.max_entries,
                });
            }
            let member = self.member(&entry, ext)?;
            self.extract(member, &mut entry)?;
        }
        if !pending.is_empty() {
            return Err(UnpackError::BadExtension {
                kind: "extension header",
                reason: "the archive ends after an extension header, with no entry".to_string(),
            });
        }
        Ok(())
    }

    /// Reads a (bounded) extension header body.
    fn read_extension<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        kind: &'static str,
    ) -> Result<Vec<u8>, UnpackError> {
        // Room for a path and a link name at their limit, plus other records.
        let max = (self.limits.max_path_len as u64)
            .saturating_mul(2)
            .saturating_add(4096);
        let size = entry.size();
        if size > max {
            return Err(UnpackError::BadExtension {
                kind,
                reason: format!("{size} bytes, more than the {max} allowed"),
            });
        }
        let mut data = Vec::new();
        entry
            .take(max)
            .read_to_end(&mut data)
            .map_err(|source| UnpackError::Read { source })?;
        if data.len() as u64 != size {
            return Err(UnpackError::Truncated {
                path: kind.to_string(),
                expected: size,
                got: data.len() as u64,
            });
        }
        Ok(data)
    }

    fn member<R: Read>(
        &self,
        entry: &tar::Entry<'_, R>,
        ext: Pending,
    ) -> Result<Member, UnpackError> {
        let header = entry.header();
        let pax = match &ext.pax {
            Some(data) => parse_pax(data)?,
            None => PaxFields::default(),
        };
        let strip_nul = |mut v: Vec<u8>| {
            if v.last() == Some(&0) {
                v.pop();
            }
            v
        };
        let path = ext
            .long_name
            .map(strip_nul)
            .or(pax.path)
            .unwrap_or_else(|| header.path_bytes().into_owned());
        let link = ext
            .long_link
            .map(strip_nul)
            .or(pax.linkpath)
            .or_else(|| header.link_name_bytes().map(|l| l.into_owned()));
        let shown = || lossy(&path);
        let bad = |field: &'static str| {
            let path = shown();
            move |source: io::Error| UnpackError::BadHeader {
                path,
                field,
                source,
            }
        };
        let size = entry.size();
        if let Some(pax_size) = pax.size {
            if pax_size != size {
                return Err(UnpackError::BadExtension {
                    kind: "pax header",
                    reason: format!(
                        "size {pax_size} disagrees with the tar header's {size} for {:?}",
                        shown()
                    ),
                });
            }
        }
        let id = |v: u64, field: &'static str| {
            u32::try_from(v).map_err(|_| UnpackError::BadHeader {
                path: shown(),
                field,
                source: io::Error::other(format!("{v} does not fit 32 bits")),
            })
        };
        let uid = match pax.uid {
            Some(v) => v,
            None => header.uid().map_err(bad("uid"))?,
        };
        let gid = match pax.gid {
            Some(v) => v,
            None => header.gid().map_err(bad("gid"))?,
        };
        let mtime = match pax.mtime {
            Some(v) => v,
            None => header.mtime().map_err(bad("mtime"))?,
        };
        Ok(Member {
            kind: header.entry_type(),
            mode: header.mode().map_err(bad("mode"))? & 0o7777,
            uid: id(uid, "uid")?,
            gid: id(gid, "gid")?,
            mtime: i64::try_from(mtime).unwrap_or(i64::MAX),
            size,
            path,
            link,
        })
    }

    fn check_len(&self, len: usize) -> Result<(), UnpackError> {
        if len > self.limits.max_path_len {
            return Err(UnpackError::Limit {
                limit: "max_path_len",
                value: len as u64,
                max: self.limits.max_path_len as u64,
            });
        }
        Ok(())
    }

    /// Opens the directory holding the last component of `comps`, walking from the
    /// root with `O_NOFOLLOW`; missing directories are created when `create` is set.
    fn open_parent(
        &self,
        comps: &[CString],
        path: &[u8],
        create: bool,
    ) -> Result<OwnedFd, UnpackError> {
        let parents = comps.split_last().map(|(_, p)| p).unwrap_or_default();
        self.open_dirs(parents, path, create)
    }

    fn open_dirs(
        &self,
        comps: &[CString],
        path: &[u8],
        create: bool,
    ) -> Result<OwnedFd, UnpackError> {
        let mut cur = fsutil::reopen_dir(self.root.as_fd()).map_err(io_err(path, "open"))?;
        for comp in comps {
            let next = match fsutil::open_dir_nofollow(cur.as_fd(), comp) {
                Ok(fd) => fd,
                Err(Errno::NOENT) if create => {
                    match rfs::mkdirat(cur.as_fd(), comp.as_c_str(), Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(io_err(path, "create parent directory of")(e)),
                    }
                    fsutil::open_dir_nofollow(cur.as_fd(), comp)
                        .map_err(|e| self.walk_err(e, path, comp))?
                }
                Err(e) => return Err(self.walk_err(e, path, comp)),
            };
            cur = next;
        }
        Ok(cur)
    }

    fn walk_err(&self, e: Errno, path: &[u8], comp: &CStr) -> UnpackError {
        match e {
            Errno::LOOP | Errno::NOTDIR => UnpackError::NotADirectory {
                path: lossy(path),
                component: lossy(comp.to_bytes()),
            },
            e => io_err(path, "open a parent directory of")(e),
        }
    }

    /// Makes room for a non-directory at `name`: an existing non-directory is removed
    /// (later wins), an existing directory is a conflict.
    fn clear_slot(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &CStr,
        key: &[u8],
    ) -> Result<(), UnpackError> {
        match fsutil::lstat_at(parent, name).map_err(io_err(key, "stat"))? {
            None => Ok(()),
            Some(st) if fsutil::file_type(&st) == FileType::Directory => {
                Err(UnpackError::Conflict {
                    path: lossy(key),
                    reason: "a non-directory entry would replace a directory extracted earlier",
                })
            }
            Some(_) => {
                rfs::unlinkat(parent, name, AtFlags::empty()).map_err(io_err(key, "replace"))?;
                self.files.remove(key);
                Ok(())
            }
        }
    }

    fn extract<R: Read>(
        &mut self,
        m: Member,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), UnpackError> {
        self.check_len(m.path.len())?;
        let comps = split_path(&m.path).map_err(|reason| UnpackError::InvalidPath {
            path: lossy(&m.path),
            reason,
        })?;
        let Some(last) = comps.last() else {
            return Err(UnpackError::InvalidPath {
                path: lossy(&m.path),
                reason: "empty path",
            });
        };
        let last = last.as_bytes();
        let is_regular = matches!(m.kind, EntryType::Regular | EntryType::Continuous);

        // OCI markers.
        if last == OPAQUE_MARKER.as_bytes() {
            if !is_regular {
                return Err(UnpackError::InvalidPath {
                    path: lossy(&m.path),
                    reason: "an opaque marker must be a regular file",
                });
            }
            let dir = self.open_parent(&comps, &m.path, true)?;
            fsutil::set_opaque(dir.as_fd()).map_err(io_err(&m.path, "set the opaque xattr for"))?;
            self.summary.opaque_dirs += 1;
            return Ok(());
        }
        if let Some(name) = last.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if !is_regular {
                return Err(UnpackError::InvalidPath {
                    path: lossy(&m.path),
                    reason: "a whiteout marker must be a regular file",
                });
            }
            if name.is_empty() || name == b"." || name == b".." {
                return Err(UnpackError::InvalidPath {
                    path: lossy(&m.path),
                    reason: "whiteout of an empty, `.` or `..` name",
                });
            }
            if name.starts_with(WHITEOUT_PREFIX.as_bytes()) {
                return Err(UnpackError::InvalidPath {
                    path: lossy(&m.path),
                    reason: "reserved `.wh..wh.` name",
                });
            }
            let mut wcomps = comps.clone();
            if let Some(slot) = wcomps.last_mut() {
                *slot = CString::new(name).map_err(|_| UnpackError::InvalidPath {
                    path: lossy(&m.path),
                    reason: "NUL byte in path",
                })?;
            }
            return self.whiteout(&wcomps, &m);
        }

        match m.kind {
            _ if is_regular => self.regular(&comps, &m, entry),
            EntryType::Directory => self.directory(comps, &m),
            EntryType::Symlink => self.symlink(&comps, &m),
            EntryType::Link => self.hardlink(&comps, &m),
            EntryType::Char => {
                let major = entry.header().device_major().ok().flatten();
                let minor = entry.header().device_minor().ok().flatten();
                if major == Some(0) && minor == Some(0) {
                    // Already in overlay form: a whiteout.
                    self.whiteout(&comps, &m)
                } else {
                    let dev = match (major, minor) {
                        (Some(a), Some(b)) => format!("{a}:{b}"),
                        _ => "(unknown number)".to_string(),
                    };
                    Err(UnpackError::ForbiddenEntry {
                        path: lossy(&m.path),
                        kind: format!("character device {dev}"),
                    })
                }
            }
            EntryType::Block => Err(UnpackError::ForbiddenEntry {
                path: lossy(&m.path),
                kind: "block device".to_string(),
            }),
            EntryType::Fifo => Err(UnpackError::ForbiddenEntry {
                path: lossy(&m.path),
                kind: "fifo".to_string(),
            }),
            other => Err(UnpackError::UnsupportedEntry {
                path: lossy(&m.path),
                type_byte: other.as_byte(),
            }),
        }
    }

    fn whiteout(&mut self, comps: &[CString], m: &Member) -> Result<(), UnpackError> {
        let key = join_key(comps);
        let Some(name) = comps.last() else {
            return Ok(());
        };
        let parent = self.open_parent(comps, &key, true)?;
        self.clear_slot(parent.as_fd(), name, &key)?;
        rfs::mknodat(
            parent.as_fd(),
            name.as_c_str(),
            FileType::CharacterDevice,
            Mode::from_raw_mode(m.mode),
            0,
        )
        .map_err(io_err(&key, "create whiteout"))?;
        rfs::chmodat(
            parent.as_fd(),
            name.as_c_str(),
            Mode::from_raw_mode(m.mode),
            AtFlags::empty(),
        )
        .map_err(io_err(&key, "chmod"))?;
        fsutil::set_link_meta(parent.as_fd(), name, m.uid, m.gid, (m.mtime, 0))
            .map_err(io_err(&key, "set owner and mtime of"))?;
        self.summary.whiteouts += 1;
        Ok(())
    }

    fn regular<R: Read>(
        &mut self,
        comps: &[CString],
        m: &Member,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), UnpackError> {
        if m.size > self.limits.max_file_bytes {
            return Err(UnpackError::Limit {
                limit: "max_file_bytes",
                value: m.size,
                max: self.limits.max_file_bytes,
            });
        }
        let end = entry.raw_file_position().saturating_add(m.size);
        if end > self.limits.max_total_bytes {
            return Err(UnpackError::Limit {
                limit: "max_total_bytes",
                value: end,
                max: self.limits.max_total_bytes,
            });
        }
        let key = join_key(comps);
        let Some(name) = comps.last() else {
            return Ok(());
        };
        let parent = self.open_parent(comps, &key, true)?;
        self.clear_slot(parent.as_fd(), name, &key)?;
        let fd = rfs::openat(
            parent.as_fd(),
            name.as_c_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(io_err(&key, "create"))?;
        let mut file = File::from(fd);
        let mut got = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(UnpackError::Read { source }),
            };
            file.write_all(self.buf.get(..n).unwrap_or_default())
                .map_err(|source| UnpackError::Io {
                    path: lossy(&key),
                    op: "write",
                    source,
                })?;
            got += n as u64;
        }
        if got != m.size {
            return Err(UnpackError::Truncated {
                path: lossy(&key),
                expected: m.size,
                got,
            });
        }
        fsutil::set_fd_meta(file.as_fd(), m.uid, m.gid, m.mode, Some((m.mtime, 0)))
            .map_err(io_err(&key, "set metadata of"))?;
        self.files.insert(key);
        self.summary.files += 1;
        Ok(())
    }

    fn directory(&mut self, comps: Vec<CString>, m: &Member) -> Result<(), UnpackError> {
        let key = join_key(&comps);
        let Some(name) = comps.last() else {
            return Ok(());
        };
        let parent = self.open_parent(&comps, &key, true)?;
        match fsutil::lstat_at(parent.as_fd(), name).map_err(io_err(&key, "stat"))? {
            Some(st) if fsutil::file_type(&st) == FileType::Directory => {}
            Some(_) => {
                // Later wins: a directory replaces an earlier non-directory.
                rfs::unlinkat(parent.as_fd(), name.as_c_str(), AtFlags::empty())
                    .map_err(io_err(&key, "replace"))?;
                self.files.remove(&key);
                rfs::mkdirat(parent.as_fd(), name.as_c_str(), Mode::from_raw_mode(0o700))
                    .map_err(io_err(&key, "create directory"))?;
            }
            None => rfs::mkdirat(parent.as_fd(), name.as_c_str(), Mode::from_raw_mode(0o700))
                .map_err(io_err(&key, "create directory"))?,
        }
        let dir = fsutil::open_dir_nofollow(parent.as_fd(), name)
            .map_err(|e| self.walk_err(e, &key, name))?;
        let (u, g) = fsutil::owner(m.uid, m.gid);
        rfs::fchown(dir.as_fd(), u, g).map_err(io_err(&key, "chown"))?;
        self.deferred.push((comps, m.mode, m.mtime));
        self.summary.dirs += 1;
        Ok(())
    }

    fn symlink(&mut self, comps: &[CString], m: &Member) -> Result<(), UnpackError> {
        let key = join_key(comps);
        let target = m.link.as_deref().unwrap_or_default();
        let invalid = |reason| UnpackError::InvalidSymlink {
            path: lossy(&key),
            target: lossy(target),
            reason,
        };
        if target.is_empty() {
            return Err(invalid("empty target"));
        }
        self.check_len(target.len())?;
        // Stored verbatim: a symlink is only dangerous when followed, and nothing here
        // follows one.
        let target_c = CString::new(target).map_err(|_| invalid("NUL byte in target"))?;
        let Some(name) = comps.last() else {
            return Ok(());
        };
        let parent = self.open_parent(comps, &key, true)?;
        self.clear_slot(parent.as_fd(), name, &key)?;
        rfs::symlinkat(target_c.as_c_str(), parent.as_fd(), name.as_c_str())
            .map_err(io_err(&key, "create symlink"))?;
        fsutil::set_link_meta(parent.as_fd(), name, m.uid, m.gid, (m.mtime, 0))
            .map_err(io_err(&key, "set owner and mtime of"))?;
        self.summary.symlinks += 1;
        Ok(())
    }

    fn hardlink(&mut self, comps: &[CString], m: &Member) -> Result<(), UnpackError> {
        let key = join_key(comps);
        let target = m.link.as_deref().unwrap_or_default();
        let invalid = |reason| UnpackError::InvalidHardlink {
            path: lossy(&key),
            target: lossy(target),
            reason,
        };
        self.check_len(target.len())?;
        let tcomps = split_path(target).map_err(invalid)?;
        let tkey = join_key(&tcomps);
        if tkey == key {
            return Err(invalid("links to itself"));
        }
        if !self.files.contains(&tkey) {
            return Err(invalid(
                "target is not a regular file extracted earlier from this layer",
            ));
        }
        let (Some(tname), Some(name)) = (tcomps.last(), comps.last()) else {
            return Err(invalid("empty path"));
        };
        let tparent = self.open_parent(&tcomps, &tkey, false)?;
        let parent = self.open_parent(comps, &key, true)?;
        self.clear_slot(parent.as_fd(), name, &key)?;
        rfs::linkat(
            tparent.as_fd(),
            tname.as_c_str(),
            parent.as_fd(),
            name.as_c_str(),
            AtFlags::empty(),
        )
        .map_err(io_err(&key, "create hardlink"))?;
        self.files.insert(key);
        self.summary.hardlinks += 1;
        Ok(())
    }

    /// Sets the deferred mode and mtime of every directory entry.
    fn finish_dirs(&mut self) -> Result<(), UnpackError> {
        for (comps, mode, mtime) in std::mem::take(&mut self.deferred) {
            let key = join_key(&comps);
            let dir = self.open_dirs(&comps, &key, false)?;
            rfs::fchmod(dir.as_fd(), Mode::from_raw_mode(mode)).map_err(io_err(&key, "chmod"))?;
            rfs::futimens(dir.as_fd(), &fsutil::timestamps(mtime, 0))
                .map_err(io_err(&key, "set mtime of"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_path_rules() {
        assert_eq!(
            split_path(b"a/./b//c/").unwrap(),
            vec![c"a".to_owned(), c"b".to_owned(), c"c".to_owned()]
        );
        assert_eq!(split_path(b"./x").unwrap(), vec![c"x".to_owned()]);
        assert_eq!(split_path(b""), Err("empty path"));
        assert_eq!(split_path(b"/etc/passwd"), Err("absolute path"));
        assert_eq!(split_path(b"a/../../x"), Err("`..` component"));
        assert_eq!(split_path(b".."), Err("`..` component"));
        assert_eq!(split_path(b"a\0b"), Err("NUL byte in path"));
        assert_eq!(
            split_path(b"./"),
            Err("path names the target directory itself")
        );
    }

    #[test]
    fn pax_parsing() {
        let data = b"21 path=some/long/pa\n13 size=1234\n22 mtime=1700000000.5\n";
        let f = parse_pax(data).unwrap();
        assert_eq!(f.path.as_deref(), Some(&b"some/long/pa"[..]));
        assert_eq!(f.size, Some(1234));
        assert_eq!(f.mtime, Some(1_700_000_000));
        assert!(parse_pax(b"8 uid=x\n").is_err());
    }
}
