//! Filesystem images: erofs for every read-only layer (`mkfs.erofs`), and the sparse ext4
//! upper disk each step VM writes to.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::util::{self, parent_of, run};

/// `mkfs.erofs` of a layer: ~0.4 s for 209 MB here, so half an hour is thousands of
/// times the work of any layer udos accepts, and still ends a mkfs that hangs.
pub const MKFS_EROFS_LIMIT: Duration = Duration::from_secs(30 * 60);
/// `mkfs.ext4` of the sparse upper template: metadata only (~0.6 s), made once per size.
pub const MKFS_EXT4_LIMIT: Duration = Duration::from_secs(2 * 60);
/// `cp --sparse=always` of the upper template: a reflink or a few MiB of metadata.
pub const CP_UPPER_LIMIT: Duration = Duration::from_secs(2 * 60);

/// Options for [`mkfs_erofs_with`].
#[derive(Clone, Debug, Default)]
pub struct ErofsOptions {
    /// Every file owned by 0:0 (`--all-root`), for trees built by an unprivileged user.
    pub all_root: bool,
    /// A fixed timestamp for every inode (`-T`), for reproducible images; `None` keeps
    /// each file's own mtime (`--preserve-mtime`), which step layers need.
    pub fixed_time: Option<u64>,
    /// A fixed filesystem UUID (`-U`); `None` lets mkfs.erofs pick a random one.
    pub uuid: Option<String>,
}

/// Builds an uncompressed erofs image of `tree` at `out`, atomically (temporary file in the
/// same directory, then rename). Keeps modes, uid/gid, mtimes, hardlinks, device nodes
/// (overlay whiteouts are 0/0 char devices) and `user.*` xattrs (`user.overlay.opaque`);
/// mkfs.erofs drops `trusted.*` xattrs, which is why layers use the `userxattr` form.
pub fn mkfs_erofs(tree: &Path, out: &Path) -> Result<()> {
    mkfs_erofs_with(tree, out, &ErofsOptions::default())
}

pub fn mkfs_erofs_with(tree: &Path, out: &Path, opts: &ErofsOptions) -> Result<()> {
    if !tree.is_dir() {
        bail!("{} is not a directory", tree.display());
    }
    let dir = parent_of(out)?;
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".erofs-")
        .tempfile_in(dir)
        .with_context(|| format!("create a temporary file in {}", dir.display()))?;
    let mut cmd = util::tool("mkfs.erofs");
    cmd.arg("--quiet");
    if opts.all_root {
        cmd.arg("--all-root");
    }
    match opts.fixed_time {
        Some(t) => {
            cmd.arg(format!("-T{t}"));
        }
        None => {
            cmd.arg("--preserve-mtime");
        }
    }
    if let Some(u) = &opts.uuid {
        cmd.arg(format!("-U{u}"));
    }
    cmd.arg(tmp.path()).arg(tree);
    run(&mut cmd, MKFS_EROFS_LIMIT).with_context(|| {
        format!(
            "mkfs.erofs {} failed (is erofs-utils installed?)",
            tree.display()
        )
    })?;
    tmp.as_file().sync_all()?;
    tmp.persist(out)
        .map_err(|e| e.error)
        .with_context(|| format!("rename into {}", out.display()))?;
    Ok(())
}

/// Layout version of the upper-disk template (part of its file name).
const UPPER_TEMPLATE_VERSION: u32 = 1;

/// The cached template for `size_bytes` (made on first use).
pub fn upper_template_path(template_cache: &Path, size_bytes: u64) -> PathBuf {
    template_cache.join(format!(
        "upper-ext4-v{UPPER_TEMPLATE_VERSION}-{size_bytes}.img"
    ))
}

/// Makes `out`, a sparse ext4 image of `size_bytes` for an overlay upper: the filesystem
/// is made once per size into a template under `template_cache`, then copied sparsely
/// (`cp --sparse=always --reflink=auto`: a reflink where the filesystem can, else only
/// the few MiB of metadata are written) for each VM, atomically.
///
/// The filesystem has no journal (the disk is scratch: its content leaves the VM through
/// the sealed output device), no reserved blocks, inode tables initialised up front (no
/// lazy-init writes inside the guest), and a root directory owned by 0:0.
pub fn make_upper_disk(template_cache: &Path, out: &Path, size_bytes: u64) -> Result<()> {
    if size_bytes < 16 << 20 {
        bail!("upper disk size {size_bytes} is below 16 MiB");
    }
    if size_bytes & 4095 != 0 {
        bail!("upper disk size {size_bytes} is not a multiple of 4096");
    }
    let template = upper_template_path(template_cache, size_bytes);
    if !template.is_file() {
        make_upper_template(&template, size_bytes)?;
    }
    let dir = parent_of(out)?;
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".upper-")
        .tempfile_in(dir)
        .with_context(|| format!("create a temporary file in {}", dir.display()))?;
    run(
        Command::new("cp")
            .args(["--sparse=always", "--reflink=auto"])
            .arg(&template)
            .arg(tmp.path()),
        CP_UPPER_LIMIT,
    )
    .context("copy the upper-disk template")?;
    tmp.persist(out)
        .map_err(|e| e.error)
        .with_context(|| format!("rename into {}", out.display()))?;
    Ok(())
}

fn make_upper_template(template: &Path, size_bytes: u64) -> Result<()> {
    let dir = parent_of(template)?;
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".upper-template-")
        .tempfile_in(dir)?;
    tmp.as_file().set_len(size_bytes)?;
    run(
        util::tool("mkfs.ext4")
            .args(["-F", "-q", "-t", "ext4", "-m", "0", "-L", "udos-upper"])
            .args(["-O", "^has_journal"])
            .args([
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
            ])
            .args(["-U", "5d0a7c1e-0d05-4a55-9d2e-000000000001"])
            .arg(tmp.path()),
        MKFS_EXT4_LIMIT,
    )
    .context("mkfs.ext4 for the upper-disk template failed (is e2fsprogs installed?)")?;
    tmp.as_file().sync_all()?;
    tmp.persist(template)
        .map_err(|e| e.error)
        .with_context(|| format!("rename into {}", template.display()))?;
    Ok(())
}
