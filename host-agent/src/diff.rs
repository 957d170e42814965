//! `udos diff RUN STEP [RUN2 STEP2]`: what a step added, changed and deleted, or how
//! the roots at two restore points differ, with sizes.
//!
//! A root is its stack of layers in overlay form (base, workspace, the leg's step
//! layers). Each stack is read into a manifest, path by path, the way overlayfs shows
//! it: a whiteout removes a path and what is under it, an opaque directory hides what
//! the layers below had in it, anything else replaces what was there. Two manifests
//! are then compared path by path. A path both sides took from the same layer is
//! unchanged (layers never change once made); otherwise a file is changed when its
//! type, mode, owner, size, link target or bytes differ, a directory when its type,
//! mode or owner does (a directory's mtime moves whenever anything in it does, so it
//! says nothing of its own).
//!
//! With one point, the two roots are the root as the step found it and as it left it,
//! so the result is what the step's layer holds, read against what was below it.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::restic::Repo;
use crate::restore::{layer_files, resolve, ChainLayer, LayerFiles, Point, Resolved};
use crate::state::StateDir;
use crate::store::Store;

/// What happened to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// Only the second root has it.
    Added,
    /// Both have it, and it differs.
    Changed,
    /// Only the first root has it.
    Deleted,
}

impl Change {
    /// One letter, as `docker diff` prints it.
    pub fn letter(self) -> char {
        match self {
            Change::Added => 'A',
            Change::Changed => 'C',
            Change::Deleted => 'D',
        }
    }
}

/// The type of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A device node, fifo or socket.
    Other,
}

/// One path that differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiffEntry {
    /// Absolute path in the root (`/workspace/out.txt`).
    pub path: String,
    /// Added, changed or deleted.
    pub change: Change,
    /// Its type (the first root's for a deleted path, else the second's).
    pub kind: Kind,
    /// Size in the first root, for a file (or a symlink: its target's length).
    pub size_before: Option<u64>,
    /// Size in the second root.
    pub size_after: Option<u64>,
}

/// One side of a diff.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// Run number.
    pub run_id: i64,
    /// The leg's job id.
    pub job: String,
    /// Step number.
    pub step: i64,
    /// Whether this is the root as the step found it (`before`) or left it (`after`).
    pub at: At,
    /// The top layer of this side's stack.
    pub top_layer: Option<String>,
}

/// Where, relative to a step, a side's root is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum At {
    /// Before the step ran.
    Before,
    /// After it ran.
    After,
}

/// What `udos diff` found.
#[derive(Debug, Clone, Serialize)]
pub struct DiffReport {
    /// The first root.
    pub from: Side,
    /// The second root.
    pub to: Side,
    /// Paths added.
    pub added: u64,
    /// Paths changed.
    pub changed: u64,
    /// Paths deleted.
    pub deleted: u64,
    /// Bytes of the files added.
    pub bytes_added: u64,
    /// Bytes of the files deleted.
    pub bytes_deleted: u64,
    /// Every path that differs, in path order.
    pub entries: Vec<DiffEntry>,
}

/// A path of a root: what it is and which layer it comes from.
#[derive(Debug, Clone)]
struct Node {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    link: Option<OsString>,
    /// Index of the layer it comes from (into [`Layers::ids`]).
    origin: usize,
}

/// A root: relative path (bytes, no leading `/`) -> node.
type Manifest = BTreeMap<Vec<u8>, Node>;

/// The layers the diff reads, each once: ids and their files.
#[derive(Default)]
struct Layers {
    ids: Vec<String>,
    files: Vec<LayerFiles>,
    index: HashMap<String, usize>,
}

impl Layers {
    /// The index of `layer`, fetching its files the first time.
    fn get(&mut self, state: &StateDir, repo: &Repo, layer: &ChainLayer) -> Result<usize> {
        if let Some(i) = self.index.get(&layer.layer_id) {
            return Ok(*i);
        }
        let files = layer_files(state, repo, layer)?;
        let i = self.ids.len();
        self.ids.push(layer.layer_id.clone());
        self.files.push(files);
        self.index.insert(layer.layer_id.clone(), i);
        Ok(i)
    }

    fn dir(&self, i: usize) -> &Path {
        self.files[i].path()
    }
}

/// The range of keys strictly under `rel` (`rel/...`): `/` + 1 is `0`.
fn under(rel: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut lo = rel.to_vec();
    lo.push(b'/');
    let mut hi = rel.to_vec();
    hi.push(b'0');
    (lo, hi)
}

fn remove_under(m: &mut Manifest, rel: &[u8]) {
    let (lo, hi) = under(rel);
    let doomed: Vec<Vec<u8>> = m.range(lo..hi).map(|(k, _)| k.clone()).collect();
    for k in doomed {
        m.remove(&k);
    }
}

fn is_opaque(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    ["user.overlay.opaque\0", "trusted.overlay.opaque\0"]
        .iter()
        .any(|name| {
            let mut buf = [0u8; 4];
            // SAFETY: both names are NUL-terminated; the buffer's length is passed.
            let n = unsafe {
                libc::lgetxattr(
                    c.as_ptr(),
                    name.as_ptr().cast(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            n == 1 && buf[0] == b'y'
        })
}

fn node_of(md: &std::fs::Metadata, path: &Path, origin: usize) -> Result<Node> {
    let ft = md.file_type();
    let kind = if ft.is_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else {
        Kind::Other
    };
    let link = match kind {
        Kind::Symlink => Some(
            std::fs::read_link(path)
                .with_context(|| format!("reading the link {}", path.display()))?
                .into_os_string(),
        ),
        _ => None,
    };
    let size = match (&kind, &link) {
        (Kind::File, _) => md.len(),
        (Kind::Symlink, Some(l)) => l.len() as u64,
        _ => 0,
    };
    Ok(Node {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size,
        link,
        origin,
    })
}

fn is_whiteout(md: &std::fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

/// Lays layer `origin` (in overlay form at `dir`) over `m`. The snapshot's description
/// at the layer's top is not part of the root. Nothing is followed: only entries
/// `lstat` says are directories are descended into.
fn overlay(m: &mut Manifest, dir: &Path, origin: usize) -> Result<()> {
    let mut todo: Vec<(PathBuf, Vec<u8>)> = vec![(dir.to_path_buf(), Vec::new())];
    while let Some((abs, rel)) = todo.pop() {
        let listing =
            std::fs::read_dir(&abs).with_context(|| format!("listing {}", abs.display()))?;
        for entry in listing {
            let entry = entry.with_context(|| format!("listing {}", abs.display()))?;
            let name = entry.file_name();
            if rel.is_empty() && name == crate::snapshots::LAYER_META {
                continue;
            }
            let path = entry.path();
            let mut child = rel.clone();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(name.as_bytes());
            let md = std::fs::symlink_metadata(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            if is_whiteout(&md) {
                m.remove(&child);
                remove_under(m, &child);
                continue;
            }
            let node = node_of(&md, &path, origin)?;
            let was_dir = m.get(&child).is_some_and(|n| n.kind == Kind::Dir);
            if node.kind != Kind::Dir || !was_dir || is_opaque(&path) {
                remove_under(m, &child);
            }
            let descend = node.kind == Kind::Dir;
            m.insert(child.clone(), node);
            if descend {
                todo.push((path, child));
            }
        }
    }
    Ok(())
}

/// Whether two regular files hold the same bytes (neither is followed if a link).
fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(p)
            .with_context(|| format!("opening {}", p.display()))
    };
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Whether `a` (in the first root) and `b` (in the second) differ.
fn differs(rel: &[u8], a: &Node, b: &Node, layers: &Layers) -> Result<bool> {
    if a.origin == b.origin {
        return Ok(false);
    }
    if (a.kind, a.mode, a.uid, a.gid) != (b.kind, b.mode, b.uid, b.gid) {
        return Ok(true);
    }
    match a.kind {
        Kind::Dir | Kind::Other => Ok(false),
        Kind::Symlink => Ok(a.link != b.link),
        Kind::File if a.size != b.size => Ok(true),
        Kind::File => {
            let rel = Path::new(std::ffi::OsStr::from_bytes(rel));
            Ok(!same_bytes(
                &layers.dir(a.origin).join(rel),
                &layers.dir(b.origin).join(rel),
            )?)
        }
    }
}

fn sized(n: &Node) -> Option<u64> {
    matches!(n.kind, Kind::File | Kind::Symlink).then_some(n.size)
}

/// The paths where `before` and `after` differ, in path order.
fn compare(before: &Manifest, after: &Manifest, layers: &Layers) -> Result<Vec<DiffEntry>> {
    let mut out = Vec::new();
    let entry = |rel: &[u8], change, kind, b: Option<&Node>, a: Option<&Node>| DiffEntry {
        path: format!("/{}", String::from_utf8_lossy(rel)),
        change,
        kind,
        size_before: b.and_then(sized),
        size_after: a.and_then(sized),
    };
    let mut keys: Vec<&Vec<u8>> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    for rel in keys {
        match (before.get(rel), after.get(rel)) {
            (None, Some(a)) => out.push(entry(rel, Change::Added, a.kind, None, Some(a))),
            (Some(b), None) => out.push(entry(rel, Change::Deleted, b.kind, Some(b), None)),
            (Some(b), Some(a)) if differs(rel, b, a, layers)? => {
                out.push(entry(rel, Change::Changed, a.kind, Some(b), Some(a)))
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The manifest of `chain` (bottom first).
fn manifest_of(
    state: &StateDir,
    repo: &Repo,
    chain: &[ChainLayer],
    layers: &mut Layers,
    progress: &dyn Fn(&str),
) -> Result<Manifest> {
    let mut m = Manifest::new();
    for layer in chain {
        progress(&format!(
            "reading the {} layer {}",
            layer.kind,
            &layer.layer_id[..layer.layer_id.len().min(12)]
        ));
        let i = layers.get(state, repo, layer)?;
        overlay(&mut m, layers.dir(i), i)?;
    }
    Ok(m)
}

fn side(r: &Resolved, chain: &[ChainLayer], at: At) -> Side {
    Side {
        run_id: r.run,
        job: r.job.clone(),
        step: r.step,
        at,
        top_layer: chain.last().map(|l| l.layer_id.clone()),
    }
}

/// `udos diff`: with `to` absent, what the step at `from` changed (the root before it
/// against the root after it); else the root after `from` against the root after `to`.
pub fn diff(
    state: &StateDir,
    store: &Store,
    repo: &Repo,
    from: &Point<'_>,
    to: Option<&Point<'_>>,
    progress: &dyn Fn(&str),
) -> Result<DiffReport> {
    let a = resolve(state, store, from)?;
    let mut layers = Layers::default();
    let (before, after, from_side, to_side) = match to {
        None => {
            let below = &a.layers[..a.below];
            let before = manifest_of(state, repo, below, &mut layers, progress)?;
            let mut after = before.clone();
            if let Some(own) = a.own_layer() {
                let i = layers.get(state, repo, own)?;
                overlay(&mut after, layers.dir(i), i)?;
            }
            let sides = (side(&a, below, At::Before), side(&a, &a.layers, At::After));
            (before, after, sides.0, sides.1)
        }
        Some(to) => {
            let b = resolve(state, store, to)?;
            let before = manifest_of(state, repo, &a.layers, &mut layers, progress)?;
            let after = manifest_of(state, repo, &b.layers, &mut layers, progress)?;
            let sides = (
                side(&a, &a.layers, At::After),
                side(&b, &b.layers, At::After),
            );
            (before, after, sides.0, sides.1)
        }
    };
    let entries = compare(&before, &after, &layers)?;
    Ok(summarize(from_side, to_side, entries))
}

fn summarize(from: Side, to: Side, entries: Vec<DiffEntry>) -> DiffReport {
    let count = |c: Change| entries.iter().filter(|e| e.change == c).count() as u64;
    let file_bytes = |c: Change, size: fn(&DiffEntry) -> Option<u64>| {
        entries
            .iter()
            .filter(|e| e.change == c && e.kind == Kind::File)
            .filter_map(size)
            .sum()
    };
    DiffReport {
        added: count(Change::Added),
        changed: count(Change::Changed),
        deleted: count(Change::Deleted),
        bytes_added: file_bytes(Change::Added, |e| e.size_after),
        bytes_deleted: file_bytes(Change::Deleted, |e| e.size_before),
        from,
        to,
        entries,
    }
}

/// Bytes for people: `812 B`, `4.0 KiB`, `1.5 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    fn whiteout(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid path; mknod of a 0/0 character device (needs root, as udos).
        let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, 0) };
        assert_eq!(rc, 0, "mknod {}", p.display());
    }

    fn set_opaque(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated strings and a one-byte value.
        let rc = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                c"user.overlay.opaque".as_ptr(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        assert_eq!(rc, 0, "setxattr {}", p.display());
    }

    fn write(root: &Path, rel: &str, data: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }

    /// Reads real overlay-form directories (whiteouts as 0/0 devices, an opaque
    /// directory as an xattr) as `udos diff` does and compares them.
    fn diff_dirs(lower: &[&Path], top: &Path) -> Vec<(char, String, Option<u64>, Option<u64>)> {
        let mut layers = Layers::default();
        let mut m = Manifest::new();
        for (i, d) in lower.iter().chain([&top]).enumerate() {
            layers.ids.push(format!("L{i}"));
            layers.files.push(LayerFiles::Local(d.to_path_buf()));
            if i < lower.len() {
                overlay(&mut m, d, i).unwrap();
            }
        }
        let mut after = m.clone();
        overlay(&mut after, top, lower.len()).unwrap();
        compare(&m, &after, &layers)
            .unwrap()
            .into_iter()
            .map(|e| (e.change.letter(), e.path, e.size_before, e.size_after))
            .collect()
    }

    #[test]
    fn a_layer_read_against_the_layers_below_gives_added_changed_and_deleted() {
        let t = tempfile::tempdir().unwrap();
        let (base, step) = (t.path().join("base"), t.path().join("step"));
        write(&base, "etc/motd", "hello");
        write(&base, "etc/same", "same");
        write(&base, "old/a", "aa");
        write(&base, "old/sub/b", "bbb");
        write(&base, "keep/x", "x");
        write(&base, "keep/y", "y");
        // The step rewrote motd, rewrote `same` with the same bytes, added a file,
        // deleted a tree and replaced `keep` by an opaque directory holding only `z`.
        write(&step, "etc/motd", "changed!");
        write(&step, "etc/same", "same");
        write(&step, "etc/new", "new file");
        whiteout(&step.join("old"));
        write(&step, "keep/z", "zz");
        set_opaque(&step.join("keep"));
        std::fs::write(step.join(crate::snapshots::LAYER_META), "{}").unwrap();
        let got = diff_dirs(&[&base], &step);
        let e = |c: char, p: &str, b: Option<u64>, a: Option<u64>| (c, p.to_string(), b, a);
        assert_eq!(
            got,
            vec![
                e('C', "/etc/motd", Some(5), Some(8)),
                e('A', "/etc/new", None, Some(8)),
                e('D', "/keep/x", Some(1), None),
                e('D', "/keep/y", Some(1), None),
                e('A', "/keep/z", None, Some(2)),
                e('D', "/old", None, None),
                e('D', "/old/a", Some(2), None),
                e('D', "/old/sub", None, None),
                e('D', "/old/sub/b", Some(3), None),
            ]
        );
    }

    #[test]
    fn type_mode_and_link_changes_count_and_a_file_over_a_directory_hides_it() {
        let t = tempfile::tempdir().unwrap();
        let (base, step) = (t.path().join("base"), t.path().join("step"));
        write(&base, "d/inner", "i");
        write(&base, "f", "f");
        write(&base, "m", "m");
        std::os::unix::fs::symlink("f", base.join("l")).unwrap();
        // `d` becomes a file, `f` a directory, `m` changes mode, `l` points elsewhere.
        write(&step, "d", "now a file");
        write(&step, "f/x", "x");
        set_opaque(&step.join("f"));
        write(&step, "m", "m");
        std::fs::set_permissions(
            step.join("m"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        std::os::unix::fs::symlink("m", step.join("l")).unwrap();
        let got: Vec<(char, String)> = diff_dirs(&[&base], &step)
            .into_iter()
            .map(|(c, p, _, _)| (c, p))
            .collect();
        let s = |c: char, p: &str| (c, p.to_string());
        assert_eq!(
            got,
            vec![
                s('C', "/d"),
                s('D', "/d/inner"),
                s('C', "/f"),
                s('A', "/f/x"),
                s('C', "/l"),
                s('C', "/m"),
            ]
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(812), "812 B");
        assert_eq!(human_bytes(4096), "4.0 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
    }
}
