//! A deterministic initramfs writer: "newc" cpio (the format the kernel unpacks), entries
//! sorted by path, every mtime 0, uid/gid 0, written as is or compressed with zstd.
//!
//! newc: each entry is a 110-byte ASCII header (`070701` and 13 eight-digit hex fields),
//! the NUL-terminated name padded to a multiple of 4 (counting the header), then the data
//! padded to a multiple of 4. The archive ends with an entry named `TRAILER!!!`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::util::io_other;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// zstd level for the initramfs (the kernel's decompressor handles any level; 3 is fast
/// to build and within a few percent of 19 on this content).
pub const ZSTD_LEVEL: i32 = 3;

#[derive(Clone, Debug)]
pub enum Data {
    Bytes(Vec<u8>),
    File(PathBuf),
}

#[derive(Clone, Debug)]
pub enum Kind {
    Dir,
    File(Data),
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

#[derive(Clone, Debug)]
pub struct Entry {
    /// Permission bits (and setuid/setgid/sticky), without the file type.
    pub perm: u32,
    pub kind: Kind,
}

/// An in-memory list of archive entries keyed by path (relative, no leading `/`).
/// Regular files may refer to a host file that is streamed at write time.
#[derive(Default, Clone, Debug)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

fn norm(path: &str) -> Result<String> {
    let p = path.trim_start_matches('/').trim_end_matches('/');
    if p.is_empty() {
        bail!("empty archive path");
    }
    if p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        bail!("bad archive path {path:?}");
    }
    Ok(p.to_string())
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    fn insert(&mut self, path: &str, perm: u32, kind: Kind) -> Result<()> {
        let p = norm(path)?;
        // Parents first, as directories 0755 unless already given.
        let mut acc = String::new();
        let comps: Vec<&str> = p.split('/').collect();
        for c in &comps[..comps.len() - 1] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(c);
            match self.entries.get(&acc) {
                Some(Entry {
                    kind: Kind::Dir, ..
                }) => {}
                Some(_) => bail!("{acc} is not a directory in the archive (adding {p})"),
                None => {
                    self.entries.insert(
                        acc.clone(),
                        Entry {
                            perm: 0o755,
                            kind: Kind::Dir,
                        },
                    );
                }
            }
        }
        self.entries.insert(
            p,
            Entry {
                perm: perm & 0o7777,
                kind,
            },
        );
        Ok(())
    }

    pub fn dir(&mut self, path: &str, perm: u32) -> Result<()> {
        self.insert(path, perm, Kind::Dir)
    }

    pub fn file_bytes(&mut self, path: &str, bytes: impl Into<Vec<u8>>, perm: u32) -> Result<()> {
        self.insert(path, perm, Kind::File(Data::Bytes(bytes.into())))
    }

    pub fn file_from(&mut self, path: &str, src: &Path, perm: u32) -> Result<()> {
        let m = fs::metadata(src).with_context(|| format!("stat {}", src.display()))?;
        if !m.is_file() {
            bail!("{} is not a regular file", src.display());
        }
        if m.len() > u32::MAX as u64 {
            bail!(
                "{} is too large for a newc archive (4 GiB max)",
                src.display()
            );
        }
        self.insert(path, perm, Kind::File(Data::File(src.to_path_buf())))
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.insert(path, 0o777, Kind::Symlink(target.to_string()))
    }

    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<()> {
        self.insert(path, perm, Kind::CharDev { major, minor })
    }

    /// Adds a host directory tree under `prefix`: directories, regular files (their
    /// permission bits kept) and symlinks; anything else is an error.
    pub fn add_tree(&mut self, host_dir: &Path, prefix: &str) -> Result<()> {
        let mut stack = vec![(host_dir.to_path_buf(), norm(prefix)?)];
        while let Some((dir, guest)) = stack.pop() {
            let perm = perm_of(&fs::symlink_metadata(&dir)?);
            self.dir(&guest, perm)?;
            for e in fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
                let e = e?;
                let name = e.file_name();
                let name = name
                    .to_str()
                    .with_context(|| format!("non-UTF-8 name in {}", dir.display()))?;
                let g = format!("{guest}/{name}");
                let m = fs::symlink_metadata(e.path())?;
                let ft = m.file_type();
                if ft.is_dir() {
                    stack.push((e.path(), g));
                } else if ft.is_file() {
                    self.file_from(&g, &e.path(), perm_of(&m))?;
                } else if ft.is_symlink() {
                    let t = fs::read_link(e.path())?;
                    let t = t.to_str().context("non-UTF-8 symlink target")?;
                    self.symlink(&g, t)?;
                } else {
                    bail!(
                        "{}: unsupported file type for the initramfs",
                        e.path().display()
                    );
                }
            }
        }
        Ok(())
    }

    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path.trim_start_matches('/'))
    }

    /// Writes the archive as newc cpio; returns the number of bytes written.
    pub fn write_newc<W: Write>(&self, w: W) -> io::Result<u64> {
        let mut w = CountingWriter { inner: w, n: 0 };
        let mut buf = vec![0u8; 1 << 20];
        for (ino, (path, e)) in (1u32..).zip(&self.entries) {
            let (mode, nlink, rdev, size) = match &e.kind {
                Kind::Dir => (S_IFDIR | e.perm, 2, (0, 0), 0u64),
                Kind::File(Data::Bytes(b)) => (S_IFREG | e.perm, 1, (0, 0), b.len() as u64),
                Kind::File(Data::File(p)) => (S_IFREG | e.perm, 1, (0, 0), fs::metadata(p)?.len()),
                Kind::Symlink(t) => (S_IFLNK | 0o777, 1, (0, 0), t.len() as u64),
                Kind::CharDev { major, minor } => (S_IFCHR | e.perm, 1, (*major, *minor), 0),
            };
            let size32 = u32::try_from(size).map_err(|_| io_other(format!("{path}: too large")))?;
            write_header(&mut w, ino, mode, nlink, size32, rdev, path)?;
            match &e.kind {
                Kind::File(Data::Bytes(b)) => w.write_all(b)?,
                Kind::Symlink(t) => w.write_all(t.as_bytes())?,
                Kind::File(Data::File(p)) => {
                    let mut f = fs::File::open(p)?;
                    let mut left = size;
                    while left > 0 {
                        let want = buf.len().min(left as usize);
                        let n = f.read(&mut buf[..want])?;
                        if n == 0 {
                            return Err(io_other(format!(
                                "{} shrank while archiving",
                                p.display()
                            )));
                        }
                        w.write_all(&buf[..n])?;
                        left -= n as u64;
                    }
                }
                Kind::Dir | Kind::CharDev { .. } => {}
            }
            pad4(&mut w)?;
        }
        write_header(&mut w, 0, 0, 1, 0, (0, 0), "TRAILER!!!")?;
        // Pad the whole archive to 512 bytes like GNU cpio does (harmless, conventional).
        let rem = (w.n % 512) as usize;
        if rem != 0 {
            w.write_all(&vec![0u8; 512 - rem])?;
        }
        w.flush()?;
        Ok(w.n)
    }

    /// Writes the archive uncompressed to `out`; returns its size.
    pub fn write_file(&self, out: &Path) -> Result<u64> {
        let f = fs::File::create(out).with_context(|| format!("create {}", out.display()))?;
        let mut w = io::BufWriter::new(f);
        let n = self
            .write_newc(&mut w)
            .with_context(|| format!("write {}", out.display()))?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        Ok(n)
    }

    /// Writes the archive zstd-compressed (single-threaded, deterministic) to `out`.
    pub fn write_zstd_file(&self, out: &Path, level: i32) -> Result<u64> {
        let f = fs::File::create(out).with_context(|| format!("create {}", out.display()))?;
        let mut enc = zstd::stream::write::Encoder::new(io::BufWriter::new(f), level)?;
        enc.include_checksum(true)?;
        self.write_newc(&mut enc)
            .with_context(|| format!("write {}", out.display()))?;
        let bw = enc.finish()?;
        let f = bw.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        Ok(f.metadata()?.len())
    }
}

fn perm_of(m: &fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    m.permissions().mode() & 0o7777
}

struct CountingWriter<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn pad4<W: Write>(w: &mut CountingWriter<W>) -> io::Result<()> {
    let rem = (w.n % 4) as usize;
    if rem != 0 {
        w.write_all(&[0u8; 3][..4 - rem])?;
    }
    Ok(())
}

fn write_header<W: Write>(
    w: &mut CountingWriter<W>,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
    name: &str,
) -> io::Result<()> {
    let namesize = name.len() + 1;
    let h = format!(
        "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0
    );
    debug_assert_eq!(h.len(), 110);
    w.write_all(h.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad4(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_aligned_and_sorted() {
        let mut a = Archive::new();
        a.file_bytes("b/x", b"hello".to_vec(), 0o644).unwrap();
        a.char_dev("dev/console", 0o600, 5, 1).unwrap();
        a.dir("a", 0o700).unwrap();
        let mut v = Vec::new();
        let n = a.write_newc(&mut v).unwrap();
        assert_eq!(n as usize, v.len());
        assert_eq!(v.len() % 512, 0);
        assert!(v.starts_with(b"070701"));
        let names: Vec<_> = a.paths().collect();
        assert_eq!(names, ["a", "b", "b/x", "dev", "dev/console"]);
        assert!(a.file_bytes("../x", Vec::new(), 0o644).is_err());
        assert!(a.file_bytes("b/x/y", Vec::new(), 0o644).is_err());
    }
}
