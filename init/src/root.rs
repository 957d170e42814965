//! The step root: read-only layers + a writable upper, merged by overlayfs, then made `/`.

use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use nix::unistd::{chdir, chroot};
use udos_layer::boot::{BootConfig, DeviceRef};

use crate::console::info;
use crate::devices;
use crate::error::Error;
use crate::mounts::{mkdir_p, mount_api_filesystems, Mounts};
use crate::net;

/// Where the overlay is assembled before it becomes `/`.
const NEWROOT: &str = "/newroot";
/// act and friends in the initramfs; bind-mounted at `/run/udos/bin` in the step root.
const UDOS_BIN: &str = "/udos/bin";

/// The root the step runs in, as PID 1 sees it once it is ready.
#[derive(Debug, Clone)]
pub struct StepRoot {
    /// The root directory in PID 1's view: `/` after a switch, DIR in harness mode.
    pub dir: PathBuf,
    /// HARNESS: children must `chroot(dir)` because PID 1 itself did not switch.
    pub chroot_child: bool,
    /// The overlay upper directory to seal, if any.
    pub upper: Option<PathBuf>,
}

impl StepRoot {
    /// A path inside the step root, in PID 1's view.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.dir.join(inside.trim_start_matches('/'))
    }
}

/// Mounts lower `i` read-only: erofs (what `udos image build` makes), else ext4.
fn mount_lower(mounts: &mut Mounts, device: &Path, target: &Path) -> Result<(), Error> {
    let src = device.display().to_string();
    let ro = MsFlags::MS_RDONLY;
    match mounts.mount(&src, target, "erofs", ro, None) {
        Ok(()) => Ok(()),
        Err(erofs) => mounts
            .mount(&src, target, "ext4", ro, None)
            .map_err(|ext4| match ext4 {
                Error::Mount {
                    src, target, error, ..
                } => Error::Mount {
                    src,
                    target,
                    fstype: format!("erofs: {erofs_errno}, ext4", erofs_errno = errno_of(&erofs)),
                    error,
                },
                other => other,
            }),
    }
}

fn errno_of(e: &Error) -> String {
    match e {
        Error::Mount { error, .. } => error.to_string(),
        other => other.to_string(),
    }
}

/// The overlay options: `lowerdir` lists the top layer first, the command line the bottom.
pub fn overlay_options(lowers: &[PathBuf], upper: Option<(&Path, &Path)>) -> String {
    let lowerdir: Vec<String> = lowers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    let mut opts = format!("lowerdir={}", lowerdir.join(":"));
    if let Some((upper, work)) = upper {
        opts.push_str(&format!(
            ",upperdir={},workdir={}",
            upper.display(),
            work.display()
        ));
    }
    // user.overlay.* xattrs: the ones erofs keeps and the layer format writes.
    opts.push_str(",userxattr");
    opts
}

/// Step mode in a VM: mount the layers, merge them at `/newroot`, and make it `/`.
pub fn assemble_and_switch(
    cfg: &BootConfig,
    mounts: &mut Mounts,
    clock: &mut crate::Clock,
) -> Result<StepRoot, Error> {
    if cfg.lowers.is_empty() {
        return Err(Error::NoLowers);
    }
    // One lookup for the layers and the upper: each scan asks every disk its serial.
    let wanted: Vec<(&DeviceRef, &'static str)> = cfg
        .lowers
        .iter()
        .map(|l| (l, "layer"))
        .chain(cfg.upper.iter().map(|u| (u, "upper")))
        .collect();
    let mut lower_devs = devices::resolve(&wanted, cfg.device_timeout)?;
    let upper_dev = match cfg.upper {
        Some(_) => lower_devs.pop(),
        None => None,
    };
    clock.lap("devices");

    let mut lowers = Vec::new();
    for (i, dev) in lower_devs.iter().enumerate() {
        let target = PathBuf::from(format!("/run/udos/lower/{i}"));
        mount_lower(mounts, dev, &target)?;
        lowers.push(target);
    }
    clock.lap("lowers");

    let newroot = Path::new(NEWROOT);
    let upper = match upper_dev {
        Some(dev) => Some(mount_upper(mounts, &dev)?),
        None => None,
    };
    clock.lap("upper");
    let layers = lowers.len();
    let upper_pair = upper.as_ref().map(|(u, w)| (u.as_path(), w.as_path()));
    mount_merged(mounts, &lowers, upper_pair, newroot)?;
    clock.lap("overlay");
    if let Some(net) = &cfg.net {
        // The network's files go in a layer on top, made to match what the merged
        // root holds; then the root is mounted again with it.
        lowers.push(net::mount_layer(net, newroot, mounts)?);
        mounts.unmount(newroot)?;
        mount_merged(mounts, &lowers, upper_pair, newroot)?;
        clock.lap("net_layer");
    }
    let upper_dir = upper.map(|(u, _)| u);
    mounts.mark_root(newroot);
    switch_root(mounts, newroot)?;
    clock.lap("switch");
    info!("step root assembled from {layers} layer(s)");
    Ok(StepRoot {
        dir: PathBuf::from("/"),
        chroot_child: false,
        upper: upper_dir,
    })
}

/// Mounts the upper disk at `/run/udos/upperfs`; returns its `upper` and `work` dirs.
fn mount_upper(mounts: &mut Mounts, dev: &Path) -> Result<(PathBuf, PathBuf), Error> {
    let fs = Path::new("/run/udos/upperfs");
    mounts.mount(
        &dev.display().to_string(),
        fs,
        "ext4",
        MsFlags::empty(),
        None,
    )?;
    let (upper, work) = (fs.join("upper"), fs.join("work"));
    mkdir_p(&upper, 0o755)?;
    mkdir_p(&work, 0o755)?;
    Ok((upper, work))
}

/// Mounts the step root at `newroot`: overlay over the upper, read-only overlay of
/// several lowers, or the one lower itself.
fn mount_merged(
    mounts: &mut Mounts,
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    newroot: &Path,
) -> Result<(), Error> {
    if upper.is_some() {
        let opts = overlay_options(lowers, upper);
        mounts.mount("overlay", newroot, "overlay", MsFlags::empty(), Some(&opts))
    } else if lowers.len() >= 2 {
        // Read-only root: overlayfs needs two lowers when there is no upper.
        let opts = overlay_options(lowers, None);
        mounts.mount(
            "overlay",
            newroot,
            "overlay",
            MsFlags::MS_RDONLY,
            Some(&opts),
        )
    } else if let Some(only) = lowers.first() {
        mounts.bind_ro(only, newroot)
    } else {
        Err(Error::NoLowers)
    }
}

/// Moves the API filesystems and `/run` (with the layer mounts under it) into `newroot`,
/// then makes `newroot` the root. `/run` is a tmpfs, so nothing of udos lands in the
/// step's layer; the upper stays reachable at `/run/udos/upperfs` for sealing. The
/// step's `/tmp` is the overlay's, so what a step leaves there carries over to the
/// next step, as on a GitHub runner.
fn switch_root(mounts: &mut Mounts, newroot: &Path) -> Result<(), Error> {
    for dir in ["run", "proc", "sys", "dev"] {
        mounts.move_mount(&Path::new("/").join(dir), &newroot.join(dir))?;
    }
    link_node_shim();
    bind_udos_bin(mounts, newroot)?;
    chdir(newroot).map_err(|error| Error::Syscall {
        call: "chdir /newroot",
        error,
    })?;
    // switch_root(8)'s way: initramfs (rootfs) cannot be pivot_root'ed, but it can be
    // covered by MS_MOVE and left behind with chroot.
    mounts.move_mount(newroot, Path::new("/"))?;
    chroot(".").map_err(|error| Error::Syscall {
        call: "chroot /newroot",
        error,
    })?;
    chdir("/").map_err(|error| Error::Syscall {
        call: "chdir /",
        error,
    })?;
    Ok(())
}

/// `/udos/bin/node`: udos-init itself, which run as `node` answers act's node probe
/// without starting node (`node_shim.rs`). Without it act only starts slower.
fn link_node_shim() {
    let link = Path::new(UDOS_BIN).join(crate::node_shim::NAME);
    match std::fs::hard_link("/init", &link) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => crate::console::warning!(
            "linking {}: {e} (act probes node the slow way)",
            link.display()
        ),
    }
}

/// `/udos/bin` (act) at `<root>/run/udos/bin`, read-only, and act's HOME next to it.
fn bind_udos_bin(mounts: &mut Mounts, root: &Path) -> Result<(), Error> {
    mkdir_p(&root.join("run/udos/home"), 0o700)?;
    if Path::new(UDOS_BIN).is_dir() {
        mounts.bind_ro(Path::new(UDOS_BIN), &root.join("run/udos/bin"))?;
    }
    Ok(())
}

/// HARNESS: `udos.root=DIR` is the step root as-is (no modules, no layers, no switch):
/// the API filesystems are mounted inside it and children are chrooted into it.
pub fn prepare_harness(
    cfg: &BootConfig,
    dir: &Path,
    mounts: &mut Mounts,
) -> Result<StepRoot, Error> {
    mount_api_filesystems(mounts, dir, true)?;
    bind_udos_bin(mounts, dir)?;
    let upper = match &cfg.upper {
        Some(DeviceRef::Path(p)) => Some(p.clone()),
        _ => None,
    };
    Ok(StepRoot {
        dir: dir.to_path_buf(),
        chroot_child: true,
        upper,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_lists_the_top_layer_first() {
        let lowers: Vec<PathBuf> = (0..3)
            .map(|i| PathBuf::from(format!("/run/udos/lower/{i}")))
            .collect();
        let opts = overlay_options(
            &lowers,
            Some((
                Path::new("/run/udos/upperfs/upper"),
                Path::new("/run/udos/upperfs/work"),
            )),
        );
        assert_eq!(
            opts,
            "lowerdir=/run/udos/lower/2:/run/udos/lower/1:/run/udos/lower/0,\
             upperdir=/run/udos/upperfs/upper,workdir=/run/udos/upperfs/work,userxattr"
        );
        assert_eq!(
            overlay_options(&lowers[..2], None),
            "lowerdir=/run/udos/lower/1:/run/udos/lower/0,userxattr"
        );
    }
}
