//! Squashing a stack of overlay-form layers into one (run as root: mknod, chown,
//! overlay mounts).
//!
//! The reference for "the squash shows what the stack showed" is twofold: `apply`-ing
//! the layers one by one onto a copy of a base tree, and the kernel's own overlayfs
//! mounting the layers as lowers over that base. Random cases are named by their seed
//! (a hand-rolled generator: proptest is not a dependency of this crate).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::*;
use rustix::fs::{self as rfs, AtFlags, Timespec, Timestamps, CWD};
use rustix::mount::{self as rmount, MountFlags, UnmountFlags};
use udos_layer::{apply, prune_whiteouts, squash, ApplyError, SquashError};

// ---------------------------------------------------------------------------------
// Random trees.

/// splitmix64: a seeded generator, so that a failing case is named by its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Few names, so that layers collide with the base and with each other often.
const NAMES: &[&str] = &["a", "b", "c", "d"];
const MAX_DEPTH: u32 = 3;
const FILE_MODES: &[u32] = &[0o644, 0o600, 0o755, 0o4755, 0o2750, 0o6711];
const DIR_MODES: &[u32] = &[0o755, 0o700, 0o2775, 0o1777, 0o555];
const IDS: &[u32] = &[0, 1000, 65534];
/// Symlink targets that would lead out of the tree, or onto other test paths, if
/// anything followed them.
const LINK_TARGETS: &[&str] = &["a", "../b", "/", "/etc", "c/d", "."];

/// What a generated tree is.
#[derive(Clone, Copy)]
enum Role<'a> {
    /// A plain root: no overlay markers.
    Base,
    /// A layer in overlay form, with whiteouts anywhere (over nothing too).
    Layer,
    /// A layer as overlayfs makes them over the tree below it (the view): whiteouts
    /// only for names the view has, in directories that merge with the view's (the
    /// view's directory here, if there is one).
    Natural(Option<&'a Path>),
}

impl<'a> Role<'a> {
    fn is_layer(self) -> bool {
        !matches!(self, Role::Base)
    }

    fn whiteout_allowed(self, name: &str) -> bool {
        match self {
            Role::Base => false,
            Role::Layer => true,
            Role::Natural(view) => view.is_some_and(|v| v.join(name).symlink_metadata().is_ok()),
        }
    }
}

enum Kind {
    Absent,
    File,
    Dir,
    Symlink,
    Whiteout,
    Hardlink,
}

fn pick_kind(rng: &mut Rng, depth: u32, role: Role, name: &str, have_files: bool) -> Kind {
    let kind = match rng.below(100) {
        0..=29 => Kind::Absent,
        30..=54 => Kind::File,
        55..=76 => Kind::Dir,
        77..=84 => Kind::Symlink,
        85..=93 => Kind::Whiteout,
        _ => Kind::Hardlink,
    };
    match kind {
        Kind::Dir if depth >= MAX_DEPTH => Kind::File,
        Kind::Whiteout if !role.whiteout_allowed(name) => Kind::Absent,
        Kind::Hardlink if !have_files => Kind::File,
        k => k,
    }
}

fn set_times(path: &Path, secs: i64, nsecs: i64) {
    let ts = Timespec {
        tv_sec: secs,
        tv_nsec: nsecs,
    };
    let times = Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    rfs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

fn random_times(rng: &mut Rng, path: &Path) {
    let secs = 1_500_000_000 + rng.below(100_000_000) as i64;
    set_times(path, secs, rng.below(1_000_000_000) as i64);
}

/// Owner, then mode (chown clears setuid), then a `user.*` xattr now and then.
fn random_meta(rng: &mut Rng, path: &Path, modes: &[u32]) {
    lchown(path, *rng.pick(IDS), *rng.pick(IDS));
    chmod(path, *rng.pick(modes));
    if rng.chance(30) {
        let value = format!("v{}", rng.below(3));
        rfs::lsetxattr(path, "user.tag", value.as_bytes(), rfs::XattrFlags::empty()).unwrap();
    }
}

/// Fills the directory `dir` with random entries; `files` collects regular files
/// (hardlink candidates within this tree).
fn random_dir(rng: &mut Rng, dir: &Path, depth: u32, role: Role, files: &mut Vec<PathBuf>) {
    for name in NAMES {
        let p = dir.join(name);
        match pick_kind(rng, depth, role, name, !files.is_empty()) {
            Kind::Absent => {}
            Kind::File => {
                let data = format!("{name}:{}", rng.below(4)).repeat(rng.below(3) as usize);
                std::fs::write(&p, data).unwrap();
                random_meta(rng, &p, FILE_MODES);
                random_times(rng, &p);
                files.push(p);
            }
            Kind::Dir => {
                std::fs::create_dir(&p).unwrap();
                let opaque = role.is_layer() && rng.chance(25);
                if opaque {
                    set_opaque(&p);
                }
                // A natural layer's directory merges with the view's unless opaque.
                let view_dir = match role {
                    Role::Natural(Some(v)) if !opaque => Some(v.join(name)),
                    _ => None,
                };
                let child = match role {
                    Role::Natural(_) => Role::Natural(
                        view_dir
                            .as_deref()
                            .filter(|v| v.symlink_metadata().is_ok_and(|m| m.is_dir())),
                    ),
                    other => other,
                };
                random_dir(rng, &p, depth + 1, child, files);
                random_meta(rng, &p, DIR_MODES);
                random_times(rng, &p);
            }
            Kind::Symlink => {
                std::os::unix::fs::symlink(rng.pick(LINK_TARGETS), &p).unwrap();
                lchown(&p, *rng.pick(IDS), *rng.pick(IDS));
                random_times(rng, &p);
            }
            Kind::Whiteout => mknod_whiteout(&p),
            Kind::Hardlink => {
                let first = rng.pick(files).clone();
                std::fs::hard_link(first, &p).unwrap();
            }
        }
    }
}

fn random_tree(rng: &mut Rng, root: &Path, role: Role) {
    std::fs::create_dir(root).unwrap();
    random_dir(rng, root, 0, role, &mut Vec::new());
}

/// A random base tree and 1 to 5 random layers over it, in a fresh tempdir; natural
/// layers (see [`Role::Natural`]) when `natural`.
struct Case {
    dir: tempfile::TempDir,
    base: PathBuf,
    /// Bottom first.
    layers: Vec<PathBuf>,
}

impl Case {
    fn random(seed: u64, natural: bool) -> Self {
        let mut rng = Rng(seed);
        // tmpfs: hundreds of small trees are made and compared, which takes 20 times
        // longer on a busy disk; nothing here depends on the filesystem.
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let base = dir.path().join("base");
        random_tree(&mut rng, &base, Role::Base);
        let count = 1 + rng.below(5) as usize;
        let layers: Vec<PathBuf> = (0..count)
            .map(|i| dir.path().join(format!("layer{i}")))
            .collect();
        // The tree each layer is made over: the base with the layers so far applied.
        let view = dir.path().join("view");
        std::fs::create_dir(&view).unwrap();
        apply(&base, &view).unwrap();
        for layer in &layers {
            let role = if natural {
                Role::Natural(Some(&view))
            } else {
                Role::Layer
            };
            random_tree(&mut rng, layer, role);
            apply(layer, &view).unwrap();
        }
        Self { dir, base, layers }
    }

    fn layer_refs(&self) -> Vec<&Path> {
        self.layers.iter().map(PathBuf::as_path).collect()
    }

    /// A copy of the base (applied onto an empty directory), then `layers` applied
    /// one by one.
    fn restore(&self, name: &str, layers: &[&Path]) -> PathBuf {
        let root = self.dir.path().join(name);
        std::fs::create_dir(&root).unwrap();
        apply(&self.base, &root).unwrap();
        for layer in layers {
            apply(layer, &root).unwrap();
        }
        root
    }
}

// ---------------------------------------------------------------------------------
// Comparing trees.

#[derive(Debug, Clone, PartialEq, Eq)]
enum What {
    Dir,
    File(Vec<u8>),
    Symlink(PathBuf),
    Whiteout,
    /// Listed by `readdir` but not found by `lstat`: what overlayfs makes of a
    /// whiteout in a directory it does not merge.
    Phantom,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    what: What,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    /// `user.*` xattrs, without overlayfs's own `user.overlay.*`.
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn user_xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut list = vec![0u8; 4096];
    let n = rfs::llistxattr(path, &mut list).unwrap();
    list[..n]
        .split(|b| *b == 0)
        .filter_map(|name| std::str::from_utf8(name).ok())
        .filter(|name| name.starts_with("user.") && !name.starts_with("user.overlay."))
        .map(|name| (name.to_string(), xattr(path, name).unwrap()))
        .collect()
}

/// Every path under `root` (not `root` itself) with its type, contents, mode, owner,
/// mtime and user xattrs. Never follows a symlink.
fn tree(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let md = match std::fs::symlink_metadata(&p) {
                Ok(md) => md,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    out.insert(rel, phantom());
                    continue;
                }
                Err(e) => panic!("lstat {}: {e}", p.display()),
            };
            let ft = md.file_type();
            let what = if ft.is_dir() {
                todo.push(p.clone());
                What::Dir
            } else if ft.is_file() {
                What::File(std::fs::read(&p).unwrap())
            } else if ft.is_symlink() {
                What::Symlink(std::fs::read_link(&p).unwrap())
            } else if ft.is_char_device() && md.rdev() == 0 {
                What::Whiteout
            } else {
                What::Other
            };
            let xattrs = if ft.is_symlink() {
                BTreeMap::new()
            } else {
                user_xattrs(&p)
            };
            let node = Node {
                what,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                mtime: (md.mtime(), md.mtime_nsec()),
                xattrs,
            };
            out.insert(rel, node);
        }
    }
    out
}

fn phantom() -> Node {
    Node {
        what: What::Phantom,
        mode: 0,
        uid: 0,
        gid: 0,
        mtime: (0, 0),
        xattrs: BTreeMap::new(),
    }
}

/// `tree` without xattrs (`apply` onto a root does not carry them).
fn tree_without_xattrs(root: &Path) -> BTreeMap<String, Node> {
    let mut t = tree(root);
    for node in t.values_mut() {
        node.xattrs.clear();
    }
    t
}

/// Groups of regular files under `root` that share an inode.
fn link_groups(root: &Path) -> BTreeSet<Vec<String>> {
    let mut by_inode: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    for (rel, node) in tree(root) {
        if matches!(node.what, What::File(_)) {
            let md = std::fs::symlink_metadata(root.join(&rel)).unwrap();
            by_inode.entry((md.dev(), md.ino())).or_default().push(rel);
        }
    }
    by_inode
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|mut g| {
            g.sort();
            g
        })
        .collect()
}

/// A read-only overlayfs of `lowers` (top first), unmounted on drop.
struct Overlay {
    mountpoint: PathBuf,
}

impl Overlay {
    fn mount(mountpoint: &Path, lowers: &[&Path]) -> Self {
        std::fs::create_dir(mountpoint).unwrap();
        let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        // `userxattr`: read `user.overlay.opaque`, as the step VMs' overlay does.
        let data = format!("lowerdir={},userxattr", lowerdir.join(":"));
        rmount::mount("overlay", mountpoint, "overlay", MountFlags::RDONLY, data)
            .unwrap_or_else(|e| panic!("mount -t overlay (needs root): {e}"));
        Self {
            mountpoint: mountpoint.to_path_buf(),
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = rmount::unmount(&self.mountpoint, UnmountFlags::DETACH);
    }
}

// ---------------------------------------------------------------------------------
// Tests.

/// The property: applying the squash onto a copy of the base gives the same tree
/// (types, contents, symlink targets, modes, owners, mtimes, hardlink groups) as
/// applying the layers one by one; and so does the squash once its whiteouts are
/// pruned over the base. Layers have whiteouts anywhere, over nothing too.
#[test]
fn squash_applied_equals_the_layers_applied_one_by_one() {
    for seed in 0..250 {
        let case = Case::random(seed, false);
        let layers = case.layer_refs();
        let squashed = case.dir.path().join("squashed");
        let stats = squash(&layers, &squashed).unwrap();
        assert_eq!(stats.layers, layers.len() as u64);

        let one_by_one = case.restore("one-by-one", &layers);
        let expected = tree(&one_by_one);
        let via_squash = case.restore("via-squash", &[squashed.as_path()]);
        assert_eq!(
            tree(&via_squash),
            expected,
            "seed {seed}: squash {:#?}",
            tree(&squashed)
        );
        assert_eq!(
            link_groups(&via_squash),
            link_groups(&one_by_one),
            "seed {seed}"
        );

        prune_whiteouts(&squashed, &[&case.base]).unwrap();
        let via_pruned = case.restore("via-pruned", &[squashed.as_path()]);
        assert_eq!(
            tree(&via_pruned),
            expected,
            "seed {seed}: pruned squash {:#?}",
            tree(&squashed)
        );
    }
}

/// The same property seen by the kernel: overlayfs with the pruned squash as the one
/// lower over the base shows what it shows with the whole stack (user xattrs and
/// `readdir` included), and both agree with `apply`. Layers are natural (as overlayfs
/// makes them), so the stack itself lists no whiteout.
#[test]
fn overlayfs_shows_the_same_through_the_pruned_squash() {
    for seed in 1000..1150 {
        let case = Case::random(seed, true);
        let layers = case.layer_refs();
        let squashed = case.dir.path().join("squashed");
        squash(&layers, &squashed).unwrap();
        prune_whiteouts(&squashed, &[&case.base]).unwrap();

        let mut stack: Vec<&Path> = layers.iter().rev().copied().collect();
        stack.push(&case.base);
        let whole = Overlay::mount(&case.dir.path().join("m-stack"), &stack);
        let one = Overlay::mount(&case.dir.path().join("m-squash"), &[&squashed, &case.base]);
        let expected = tree(&whole.mountpoint);
        assert!(
            expected.values().all(|n| n.what != What::Phantom),
            "seed {seed}: the generated stack is not natural: {expected:#?}"
        );
        assert_eq!(
            tree(&one.mountpoint),
            expected,
            "seed {seed}: squash {:#?}",
            tree(&squashed)
        );
        let restored = case.restore("restored", &layers);
        assert_eq!(
            tree_without_xattrs(&whole.mountpoint),
            tree_without_xattrs(&restored),
            "seed {seed}: overlayfs and apply disagree"
        );
    }
}

fn write(p: &Path, data: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// Forty one-file layers (the case that ran out of device slots) become one layer of
/// forty files, each the very inode of its source layer.
#[test]
fn forty_single_file_layers_become_one_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let layers: Vec<PathBuf> = (0..40)
        .map(|i| {
            let layer = tmp.path().join(format!("step{i:02}"));
            write(
                &layer.join(format!("out/f{i:02}")),
                format!("{i}").as_bytes(),
            );
            layer
        })
        .collect();
    let refs: Vec<&Path> = layers.iter().map(PathBuf::as_path).collect();
    let squashed = tmp.path().join("squashed");
    let stats = squash(&refs, &squashed).unwrap();

    assert_eq!(stats.layers, 40);
    assert_eq!(stats.merged.linked, 40);
    assert_eq!(stats.merged.files, 0, "nothing copied on one filesystem");
    let names: Vec<String> = std::fs::read_dir(squashed.join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 40);
    for (i, layer) in layers.iter().enumerate() {
        let name = format!("out/f{i:02}");
        let src = std::fs::metadata(layer.join(&name)).unwrap();
        let dst = std::fs::metadata(squashed.join(&name)).unwrap();
        assert_eq!(dst.ino(), src.ino(), "{name} is hardlinked from its layer");
        assert_eq!(
            std::fs::read(squashed.join(&name)).unwrap(),
            i.to_string().as_bytes()
        );
    }

    // One lower over a base shows the forty files beside the base's.
    let base = tmp.path().join("base");
    write(&base.join("out/from-base"), b"base");
    let view = Overlay::mount(&tmp.path().join("m"), &[&squashed, &base]);
    assert_eq!(
        std::fs::read_dir(view.mountpoint.join("out"))
            .unwrap()
            .count(),
        41
    );
}

/// Files sharing an inode within a layer share one in the squash, whether they are
/// hardlinked from the layer (same filesystem) or copied (the layers on tmpfs, the
/// target elsewhere: `EXDEV`).
#[test]
fn hardlinks_within_a_layer_stay_hardlinks_linked_or_copied() {
    let here = tempfile::tempdir().unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
    assert_ne!(
        dev(here.path()),
        dev(shm.path()),
        "/dev/shm must be another fs"
    );

    for (src_dir, copied) in [(here.path(), false), (shm.path(), true)] {
        let l1 = src_dir.join("l1");
        write(&l1.join("bin/tool"), b"tool");
        std::fs::create_dir(l1.join("other")).unwrap();
        std::fs::hard_link(l1.join("bin/tool"), l1.join("bin/alias")).unwrap();
        std::fs::hard_link(l1.join("bin/tool"), l1.join("other/alias2")).unwrap();
        let l2 = src_dir.join("l2");
        write(&l2.join("bin/new"), b"new");
        let squashed = here.path().join(format!("squashed-{copied}"));
        let stats = squash(&[&l1, &l2], &squashed).unwrap();

        let ino = |rel: &str| std::fs::metadata(squashed.join(rel)).unwrap().ino();
        assert_eq!(ino("bin/tool"), ino("bin/alias"), "copied: {copied}");
        assert_eq!(ino("bin/tool"), ino("other/alias2"), "copied: {copied}");
        assert_ne!(ino("bin/tool"), ino("bin/new"));
        if copied {
            assert_eq!(
                (
                    stats.merged.linked,
                    stats.merged.files,
                    stats.merged.hardlinks
                ),
                (0, 2, 2)
            );
        } else {
            assert_eq!((stats.merged.linked, stats.merged.files), (4, 0));
        }
    }
}

/// The markers a squash writes, and the metadata it keeps, read straight from the
/// squashed layer; the same whether files are linked or copied.
#[test]
fn squash_writes_markers_and_keeps_metadata() {
    let here = tempfile::tempdir().unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    for src_dir in [here.path(), shm.path()] {
        let l1 = src_dir.join("l1");
        let l2 = src_dir.join("l2");
        // Layer 1.
        write(&l1.join("bin/su"), b"su");
        lchown(&l1.join("bin/su"), 0, 4);
        chmod(&l1.join("bin/su"), 0o4755);
        rfs::lsetxattr(
            l1.join("bin/su"),
            "user.note",
            b"n",
            rfs::XattrFlags::empty(),
        )
        .unwrap();
        rfs::lsetxattr(l1.join("bin"), "user.dir", b"old", rfs::XattrFlags::empty()).unwrap();
        rfs::lsetxattr(l1.join("bin"), "user.gone", b"x", rfs::XattrFlags::empty()).unwrap();
        write(&l1.join("shared/x"), b"x");
        chmod(&l1.join("shared"), 0o2775);
        lchown(&l1.join("shared"), 7, 8);
        set_mtime(&l1.join("shared"), 1_500_000_000);
        mknod_whiteout(&l1.join("was-deleted"));
        write(&l1.join("was-file"), b"file");
        std::os::unix::fs::symlink("/etc", l1.join("was-link")).unwrap();
        write(&l1.join("opq/in-l1"), b"1");
        rfs::lsetxattr(
            l1.join("opq"),
            "trusted.overlay.opaque",
            b"y",
            rfs::XattrFlags::empty(),
        )
        .unwrap_or_else(|e| panic!("trusted xattr on {}: {e}", src_dir.display()));
        write(&l1.join("tree/deep/file"), b"deep");
        // Layer 2.
        write(&l2.join("bin/ls"), b"ls");
        rfs::lsetxattr(l2.join("bin"), "user.dir", b"new", rfs::XattrFlags::empty()).unwrap();
        write(&l2.join("was-deleted/now"), b"now");
        write(&l2.join("was-file/now"), b"now");
        write(&l2.join("was-link/now"), b"now");
        write(&l2.join("opq/in-l2"), b"2");
        mknod_whiteout(&l2.join("tree"));
        chmod(&l2.join("tree"), 0o600);
        mknod_whiteout(&l2.join("only-below"));
        mkfifo(&l2.join("fifo"));

        let squashed = here.path().join("squashed");
        let stats = squash(&[&l1, &l2], &squashed).unwrap();
        let t = tree(&squashed);
        let at = |rel: &str| {
            t.get(rel)
                .unwrap_or_else(|| panic!("{rel} missing: {t:#?}"))
        };
        let opaque = |rel: &str| xattr(&squashed.join(rel), "user.overlay.opaque");

        // setuid, owner and user xattrs of a file.
        let su = at("bin/su");
        assert_eq!((su.mode, su.uid, su.gid), (0o4755, 0, 4));
        assert_eq!(
            su.xattrs.get("user.note").map(Vec::as_slice),
            Some(&b"n"[..])
        );
        // A merged directory takes the upper's xattrs, all of them; and is not opaque.
        let bin = &at("bin").xattrs;
        assert_eq!(bin.get("user.dir").map(Vec::as_slice), Some(&b"new"[..]));
        assert!(!bin.contains_key("user.gone"), "{bin:?}");
        assert_eq!(opaque("bin"), None);
        // Directory setgid, owner, mtime.
        let shared = at("shared");
        assert_eq!((shared.mode, shared.uid, shared.gid), (0o2775, 7, 8));
        assert_eq!(shared.mtime.0, 1_500_000_000);
        // A directory over a whiteout, a file or a symlink hides the layers below.
        for dir in ["was-deleted", "was-file", "was-link"] {
            assert_eq!(at(dir).what, What::Dir, "{dir}");
            assert_eq!(opaque(dir).as_deref(), Some(&b"y"[..]), "{dir}");
        }
        // An opaque directory (trusted marker in the source) stays opaque, with the
        // user marker, when a later layer merges into it.
        assert_eq!(opaque("opq").as_deref(), Some(&b"y"[..]));
        assert_eq!(xattr(&squashed.join("opq"), "trusted.overlay.opaque"), None);
        assert_eq!(at("opq/in-l1").what, What::File(b"1".to_vec()));
        assert_eq!(at("opq/in-l2").what, What::File(b"2".to_vec()));
        // Whiteouts replace trees and are kept (with their mode) even over nothing.
        assert_eq!(at("tree").what, What::Whiteout);
        assert_eq!(at("tree").mode, 0o600);
        assert!(!t.contains_key("tree/deep"));
        assert_eq!(at("only-below").what, What::Whiteout);
        // Skipped: the fifo.
        assert!(!t.contains_key("fifo"));
        assert_eq!(stats.merged.skipped, 1);
        assert_eq!(stats.merged.whiteouts, 3);
        assert_eq!(stats.merged.opaque_dirs, 1);
        std::fs::remove_dir_all(&squashed).unwrap();
    }
}

/// Symlinks in earlier layers are replaced, never followed: nothing outside the
/// squash target changes.
#[test]
fn symlinks_in_earlier_layers_are_never_followed() {
    let sb = Sandbox::new();
    let l1 = sb.dir.path().join("l1");
    let l2 = sb.dir.path().join("l2");
    std::fs::create_dir_all(&l1).unwrap();
    std::os::unix::fs::symlink(&sb.outside, l1.join("via")).unwrap();
    std::os::unix::fs::symlink(&sb.outside, l1.join("wiped")).unwrap();
    std::os::unix::fs::symlink(sb.outside.join("sentinel"), l1.join("file")).unwrap();
    write(&l2.join("via/pwned"), b"pwned");
    mknod_whiteout(&l2.join("wiped"));
    write(&l2.join("file"), b"replaced");
    let before = sb.snapshot();

    squash(&[&l1, &l2], &sb.target).unwrap();
    assert_eq!(sb.snapshot(), before, "outside of the target changed");
    let t = tree(&sb.target);
    assert_eq!(t["via"].what, What::Dir);
    assert_eq!(t["via/pwned"].what, What::File(b"pwned".to_vec()));
    assert_eq!(t["wiped"].what, What::Whiteout);
    assert_eq!(t["file"].what, What::File(b"replaced".to_vec()));
}

/// Whiteouts that hide nothing below the squash are pruned, the others kept: without
/// pruning overlayfs would list `d/w` (a directory only the squash has), so the view
/// through the squash would differ from the stack's.
#[test]
fn prune_drops_whiteouts_that_hide_nothing_below() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name);
    let (base, ws, l1, l2) = (dir("base"), dir("ws"), dir("l1"), dir("l2"));
    write(&base.join("kept/w"), b"base");
    write(&base.join("opq/f"), b"base");
    std::os::unix::fs::symlink("/", base.join("lnk")).unwrap();
    // The layer over the base (the workspace) hides the base's `gone/w` with a
    // whiteout and `hid/w` with an opaque directory.
    write(&base.join("gone/w"), b"base");
    write(&base.join("hid/w"), b"base");
    std::fs::create_dir_all(ws.join("gone")).unwrap();
    mknod_whiteout(&ws.join("gone/w"));
    std::fs::create_dir_all(ws.join("hid")).unwrap();
    set_opaque(&ws.join("hid"));
    // Step 1 creates d/w and an opaque directory, step 2 deletes what step 1 made and
    // what the base has.
    write(&l1.join("d/w"), b"w");
    write(&l1.join("d/keep"), b"k");
    write(&l1.join("gone/w"), b"l1");
    write(&l1.join("hid/w"), b"l1");
    write(&l1.join("opq/f"), b"l1");
    set_opaque(&l1.join("opq"));
    write(&l2.join("d/other"), b"o");
    for dir in ["kept", "opq", "lnk", "gone", "hid"] {
        std::fs::create_dir(l2.join(dir)).unwrap();
    }
    mknod_whiteout(&l2.join("d/w"));
    mknod_whiteout(&l2.join("gone/w"));
    mknod_whiteout(&l2.join("hid/w"));
    mknod_whiteout(&l2.join("kept/w"));
    mknod_whiteout(&l2.join("opq/f"));
    // Through the base's symlink `lnk` there is an `etc`; the lookup must not follow it.
    mknod_whiteout(&l2.join("lnk/etc"));
    set_mtime(&l2.join("d"), 1_500_000_000);

    let squashed = tmp.path().join("squashed");
    squash(&[&l1, &l2], &squashed).unwrap();
    let before = tree(&squashed);
    assert_eq!(before["d/w"].what, What::Whiteout);
    let pruned = prune_whiteouts(&squashed, &[&base, &ws]).unwrap();

    let after = tree(&squashed);
    assert_eq!(pruned, 5, "{after:#?}");
    assert!(
        !after.contains_key("hid/w"),
        "the workspace's opaque hid hides it"
    );
    assert!(!after.contains_key("d/w"), "nothing below has d");
    assert!(
        !after.contains_key("gone/w"),
        "the workspace hides the base's"
    );
    assert!(!after.contains_key("opq/f"), "under an opaque directory");
    assert!(
        !after.contains_key("lnk/etc"),
        "the base's lnk is a symlink"
    );
    assert_eq!(after["kept/w"].what, What::Whiteout, "the base has kept/w");
    assert_eq!(after["d"].mtime, before["d"].mtime, "directory mtime kept");
    assert_eq!(after["d"].mtime.0, 1_500_000_000);

    let whole = Overlay::mount(&dir("m-stack"), &[&l2, &l1, &ws, &base]);
    let one = Overlay::mount(&dir("m-squash"), &[&squashed, &ws, &base]);
    let view = tree(&one.mountpoint);
    assert!(view.values().all(|n| n.what != What::Phantom), "{view:#?}");
    let mut expected = tree(&whole.mountpoint);
    // Step 2's `lnk` is a directory over the base's symlink, which overlayfs does not
    // merge: the stack itself lists `lnk/etc` (no real upper would make that layer).
    assert_eq!(
        expected.remove("lnk/etc").map(|n| n.what),
        Some(What::Phantom)
    );
    assert_eq!(view, expected);
}

#[test]
fn target_must_be_empty_and_layers_must_exist() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = tmp.path().join("layer");
    write(&layer.join("f"), b"f");

    let full = tmp.path().join("full");
    write(&full.join("x"), b"x");
    let err = squash(&[&layer], &full).unwrap_err();
    assert!(matches!(err, SquashError::TargetNotEmpty { .. }), "{err:?}");

    let err = squash(&[&layer], &tmp.path().join("no/parent")).unwrap_err();
    assert!(matches!(err, SquashError::Target { .. }), "{err:?}");

    let missing = tmp.path().join("missing");
    let err = squash(&[&layer, &missing], &tmp.path().join("out")).unwrap_err();
    assert!(
        matches!(
            err,
            SquashError::Layer {
                index: 1,
                source: ApplyError::OpenLayer { .. },
                ..
            }
        ),
        "{err:?}"
    );

    // No layers: an empty layer.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let stats = squash(&[], &empty).unwrap();
    assert_eq!(stats.layers, 0);
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
}
