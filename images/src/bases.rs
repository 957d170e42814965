//! Named bases in the image store: the Debian base (`debian`) and imported ones, next
//! to the busybox base (`minimal`; see [`ImageStore::ensure_base_layer`]).
//!
//! ```text
//! <state_dir>/images/base/
//!   <layer id>/base.erofs, tree/, base.json, packages.txt   a Debian or imported base
//!   names/<name>          the layer id the name stands for
//!   recipes/<key>         the Debian base built from that recipe (DebianOptions::recipe_key)
//!   .debian.lock          held while the Debian base is built (one build at a time)
//! ```
//!
//! Base directories are made in a 0700 staging directory and renamed into place, so a
//! failed build or import leaves nothing behind, and the trees (setuid files included,
//! from images the user chose) stay out of other users' reach.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::debian::{
    debian_base_id, finish_tree, installed_packages, packages_text, run_mmdebstrap, DebianOptions,
    DEBIAN_VARIANT,
};
use crate::erofs::{mkfs_erofs_with, ErofsOptions};
use crate::import::{assemble_tree, check_base_name, default_base_name, tree_id, ImportLimits};
use crate::store::{check_hex_id, uuid_from_hex, BaseLayer, ImageStore};
use crate::util::{self, atomic_write, sha256_hex, tmp_dir_in};

/// Format of `base.json`.
pub const BASE_FORMAT: &str = "udos-base/1";

/// Where a base came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseKind {
    /// busybox-static and bash-static (`minimal`).
    Busybox,
    /// Debian built with mmdebstrap (`debian`).
    Debian,
    /// `udos base import`.
    Imported,
    /// A job's final root on a tagged commit, merged with its base (`udos run` on a
    /// git tag; host-agent's `squash_tag`).
    Squashed,
}

impl std::fmt::Display for BaseKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            BaseKind::Busybox => "busybox",
            BaseKind::Debian => "debian",
            BaseKind::Imported => "imported",
            BaseKind::Squashed => "squashed",
        })
    }
}

/// What is recorded about a base (`base.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseMeta {
    /// [`BASE_FORMAT`].
    pub format: String,
    /// Layer id.
    pub id: String,
    /// Where it came from.
    pub kind: BaseKind,
    /// In words: `mmdebstrap bookworm (variant apt)`, `OCI image layout x.tar, 2 layers`.
    pub origin: String,
    /// Installed Debian packages (from its dpkg database; 0 when it has none).
    pub package_count: usize,
    /// SHA-256 of its package list (`packages.txt`: `name version arch` lines).
    pub packages_sha256: String,
    /// Size of its erofs image.
    pub erofs_bytes: u64,
    /// How long building or importing it took.
    pub build_ms: u64,
}

/// A base a job can run on, by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedBase {
    /// `minimal`, `debian` or an imported name.
    pub name: String,
    /// Its layer.
    pub layer: BaseLayer,
    /// What is recorded about it.
    pub meta: BaseMeta,
}

impl NamedBase {
    /// The package list (`name version arch` lines) recorded beside the base, if any.
    pub fn packages_file(&self) -> Option<PathBuf> {
        let p = self.layer.erofs.with_file_name("packages.txt");
        p.is_file().then_some(p)
    }
}

impl ImageStore {
    fn bases_dir(&self) -> PathBuf {
        self.root().join("base")
    }

    fn layer_of(&self, id: &str) -> BaseLayer {
        let dir = self.bases_dir().join(id);
        BaseLayer {
            id: id.to_string(),
            erofs: dir.join("base.erofs"),
            tree: dir.join("tree"),
        }
    }

    /// The busybox base last ensured ([`ImageStore::ensure_base_layer`]), if it is
    /// there. Builds nothing.
    pub fn current_base_layer(&self) -> Result<Option<BaseLayer>> {
        let pointer = self.bases_dir().join("current");
        let id = match fs::read_to_string(&pointer) {
            Ok(id) => id.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("read {}", pointer.display())),
        };
        check_hex_id(&id)?;
        let layer = self.layer_of(&id);
        Ok(layer.erofs.is_file().then_some(layer))
    }

    /// The busybox base `layer` under `name` (`minimal`).
    pub fn busybox_base(&self, name: &str, layer: &BaseLayer) -> Result<NamedBase> {
        let debs = self.base_layer_packages(layer)?;
        let list: String = debs
            .iter()
            .map(|d| {
                let arch = d.filename.trim_end_matches(".deb").rsplit('_').next();
                format!("{} {} {}\n", d.name, d.version(), arch.unwrap_or(""))
            })
            .collect();
        Ok(NamedBase {
            name: name.to_string(),
            layer: layer.clone(),
            meta: BaseMeta {
                format: BASE_FORMAT.to_string(),
                id: layer.id.clone(),
                kind: BaseKind::Busybox,
                origin: "busybox-static and bash-static from Debian".into(),
                package_count: debs.len(),
                packages_sha256: sha256_hex(list.as_bytes()),
                erofs_bytes: fs::metadata(&layer.erofs).map(|m| m.len()).unwrap_or(0),
                build_ms: 0,
            },
        })
    }

    /// The base recorded as `base/<id>`, under `name`.
    fn load_named(&self, id: &str, name: &str) -> Result<NamedBase> {
        check_hex_id(id)?;
        let layer = self.layer_of(id);
        let path = self.bases_dir().join(id).join("base.json");
        let meta: BaseMeta = serde_json::from_slice(
            &fs::read(&path).with_context(|| format!("base {id} has no {}", path.display()))?,
        )
        .with_context(|| format!("bad {}", path.display()))?;
        if meta.id != id || meta.format != BASE_FORMAT {
            bail!("{} does not describe base {id}", path.display());
        }
        if !layer.erofs.is_file() || !layer.tree.is_dir() {
            bail!("base {id} is incomplete (no base.erofs or tree)");
        }
        Ok(NamedBase {
            name: name.to_string(),
            layer,
            meta,
        })
    }

    /// The complete base recorded as `base/<id>` (under `name`), if there is one.
    pub fn base_by_id(&self, id: &str, name: &str) -> Result<Option<NamedBase>> {
        check_hex_id(id)?;
        if !self.bases_dir().join(id).join("base.json").is_file() {
            return Ok(None);
        }
        self.load_named(id, name).map(Some)
    }

    /// Records the finished root `stage/tree` as the base `id` of `kind`: its erofs
    /// and `base.json` are made in `stage`, which is then renamed to `base/<id>` (on
    /// the same file system as the store; a base of that id already there is kept).
    /// Gives it no name. `stage` is removed on every error.
    pub fn publish_tree_base(
        &self,
        stage: tempfile::TempDir,
        id: &str,
        kind: BaseKind,
        origin: String,
        progress: &dyn Fn(&str),
    ) -> Result<NamedBase> {
        check_hex_id(id)?;
        fs::set_permissions(stage.path(), fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod {}", stage.path().display()))?;
        let started = Instant::now();
        let pkgs = installed_packages(&stage.path().join("tree"))
            .context("read the tree's dpkg status")?;
        let packages = packages_text(&pkgs);
        let mut meta = BaseMeta {
            format: BASE_FORMAT.to_string(),
            id: id.to_string(),
            kind,
            origin,
            package_count: pkgs.len(),
            packages_sha256: sha256_hex(packages.as_bytes()),
            erofs_bytes: 0,
            build_ms: 0,
        };
        fs::create_dir_all(self.bases_dir())?;
        self.publish_base(stage, &mut meta, &packages, progress)?;
        meta.build_ms = millis(started);
        self.rewrite_meta(&meta)?;
        self.load_named(id, id)
    }

    /// The base named `name` (`debian` once built, or an imported name), if there is one.
    pub fn named_base(&self, name: &str) -> Result<Option<NamedBase>> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            bail!("invalid base name {name:?}");
        }
        let pointer = self.bases_dir().join("names").join(name);
        match fs::read_to_string(&pointer) {
            Ok(id) => self.load_named(id.trim(), name).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("read {}", pointer.display())),
        }
    }

    /// Every named base (Debian and imported), by name. Names whose base is broken are
    /// left out with a warning through `warn`.
    pub fn named_bases(&self, warn: &dyn Fn(&str)) -> Result<Vec<NamedBase>> {
        let dir = self.bases_dir().join("names");
        let mut names: Vec<String> = match fs::read_dir(&dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| !n.starts_with('.'))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("list {}", dir.display())),
        };
        names.sort();
        let mut out = Vec::new();
        for n in names {
            match self.named_base(&n) {
                Ok(Some(b)) => out.push(b),
                Ok(None) => {}
                Err(e) => warn(&format!("base `{n}`: {e:#}")),
            }
        }
        Ok(out)
    }

    fn set_name(&self, name: &str, id: &str) -> Result<()> {
        atomic_write(&self.bases_dir().join("names").join(name), id.as_bytes())
    }

    /// Makes the erofs of a finished tree in `stage`, records it and moves it into
    /// place as `base/<id>`.
    fn publish_base(
        &self,
        stage: tempfile::TempDir,
        meta: &mut BaseMeta,
        packages: &str,
        progress: &dyn Fn(&str),
    ) -> Result<()> {
        let tree = stage.path().join("tree");
        let erofs = stage.path().join("base.erofs");
        progress(&format!("mkfs.erofs {} base {}", meta.kind, &meta.id[..12]));
        // Owners and mtimes as built: Python's bytecode caches check source mtimes.
        mkfs_erofs_with(
            &tree,
            &erofs,
            &ErofsOptions {
                all_root: false,
                fixed_time: None,
                uuid: Some(uuid_from_hex(&meta.id)),
            },
        )?;
        meta.erofs_bytes = fs::metadata(&erofs)?.len();
        fs::write(stage.path().join("packages.txt"), packages)?;
        fs::write(
            stage.path().join("base.json"),
            serde_json::to_vec_pretty(&meta)?,
        )?;
        let dest = self.bases_dir().join(&meta.id);
        if dest.exists() && !dest.join("base.json").is_file() {
            fs::remove_dir_all(&dest)
                .with_context(|| format!("remove stale {}", dest.display()))?;
        }
        util::publish_dir(stage, &dest)
    }

    /// Builds (if missing) the Debian base and names it `debian`. The recipe
    /// ([`DebianOptions::recipe_key`]) is built once; its id hashes the suite and the
    /// exact package versions installed, so a rebuild (`refresh`) that installs the same
    /// versions keeps the base it had. Builds are serialized across processes.
    pub fn ensure_debian_base(
        &self,
        opts: &DebianOptions,
        progress: &dyn Fn(&str),
    ) -> Result<NamedBase> {
        let key = opts.recipe_key();
        let recipe = self.bases_dir().join("recipes").join(&key);
        let _lock = util::lock_file(&self.bases_dir().join(".debian.lock"))?;
        if !opts.refresh {
            if let Ok(id) = fs::read_to_string(&recipe) {
                if let Ok(b) = self.load_named(id.trim(), "debian") {
                    self.set_name("debian", &b.meta.id)?;
                    return Ok(b);
                }
            }
        }
        progress(&format!(
            "building the Debian base: Debian {} from Debian's archive with mmdebstrap \
             (once; downloads about 300 MB and takes minutes)",
            opts.suite
        ));
        let started = Instant::now();
        let stage = private_stage(&self.bases_dir(), ".debian-")?;
        let tree = stage.path().join("tree");
        run_mmdebstrap(opts, &tree, progress)?;
        finish_tree(&tree)?;
        let pkgs = installed_packages(&tree).context("read the built base's dpkg status")?;
        let id = debian_base_id(&opts.suite, &pkgs);
        let packages = packages_text(&pkgs);
        if let Ok(b) = self.load_named(&id, "debian") {
            progress(&format!(
                "the archive has the same packages as debian base {}: keeping it",
                &id[..12]
            ));
            atomic_write(&recipe, id.as_bytes())?;
            self.set_name("debian", &id)?;
            return Ok(b);
        }
        let mut meta = BaseMeta {
            format: BASE_FORMAT.to_string(),
            id: id.clone(),
            kind: BaseKind::Debian,
            origin: format!("mmdebstrap {} (variant {DEBIAN_VARIANT})", opts.suite),
            package_count: pkgs.len(),
            packages_sha256: sha256_hex(packages.as_bytes()),
            erofs_bytes: 0,
            build_ms: 0,
        };
        meta.build_ms = millis(started);
        self.publish_base(stage, &mut meta, &packages, progress)?;
        // The build time includes mkfs.erofs.
        meta.build_ms = millis(started);
        self.rewrite_meta(&meta)?;
        atomic_write(&recipe, id.as_bytes())?;
        self.set_name("debian", &id)?;
        progress(&format!(
            "debian base {} built in {:.0} s: erofs {} MiB, {} packages",
            &id[..12],
            meta.build_ms as f64 / 1000.0,
            meta.erofs_bytes >> 20,
            meta.package_count
        ));
        self.load_named(&id, "debian")
    }

    fn rewrite_meta(&self, meta: &BaseMeta) -> Result<()> {
        atomic_write(
            &self.bases_dir().join(&meta.id).join("base.json"),
            &serde_json::to_vec_pretty(meta)?,
        )
    }

    /// Imports the image tar `file` (OCI layout, `docker save`, or a plain rootfs tar;
    /// see [`crate::import`]) as the base `name` (default: from the file name). The base
    /// is content-addressed by its tree: importing the same image twice reuses it.
    /// Nothing is left behind when the import is refused.
    pub fn import_base(
        &self,
        file: &Path,
        name: Option<&str>,
        progress: &dyn Fn(&str),
    ) -> Result<NamedBase> {
        let name = match name {
            Some(n) => n.to_string(),
            None => default_base_name(file),
        };
        check_base_name(&name).map_err(anyhow::Error::msg)?;
        if !file.is_file() {
            bail!("{} is not a file", file.display());
        }
        let started = Instant::now();
        let stage = private_stage(&self.bases_dir(), ".import-")?;
        let tree = stage.path().join("tree");
        let scratch = stage.path().join("scratch");
        for d in [&tree, &scratch] {
            fs::create_dir(d).with_context(|| format!("create {}", d.display()))?;
        }
        fs::set_permissions(&tree, fs::Permissions::from_mode(0o755))?;
        let done = assemble_tree(file, &scratch, &tree, &ImportLimits::default(), progress)
            .with_context(|| format!("importing {}", file.display()))?;
        fs::remove_dir_all(&scratch)?;
        let id = tree_id(&tree)?;
        if let Ok(b) = self.load_named(&id, &name) {
            progress(&format!(
                "base {} exists already: naming it `{name}`",
                &id[..12]
            ));
            self.set_name(&name, &id)?;
            return Ok(b);
        }
        let pkgs = installed_packages(&tree).context("read the image's dpkg status")?;
        let packages = packages_text(&pkgs);
        let file_name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut meta = BaseMeta {
            format: BASE_FORMAT.to_string(),
            id: id.clone(),
            kind: BaseKind::Imported,
            origin: format!(
                "{} {file_name}, {} layer{}",
                done.layout,
                done.layers,
                if done.layers == 1 { "" } else { "s" }
            ),
            package_count: pkgs.len(),
            packages_sha256: sha256_hex(packages.as_bytes()),
            erofs_bytes: 0,
            build_ms: 0,
        };
        self.publish_base(stage, &mut meta, &packages, progress)?;
        meta.build_ms = millis(started);
        self.rewrite_meta(&meta)?;
        self.set_name(&name, &id)?;
        progress(&format!(
            "base `{name}` ({}) imported in {:.1} s from {}, erofs {} MiB",
            &id[..12],
            meta.build_ms as f64 / 1000.0,
            meta.origin,
            meta.erofs_bytes >> 20
        ));
        self.load_named(&id, &name)
    }
}

/// A staging directory only root can enter: what it will hold (setuid files
/// included) must stay out of other users' reach, also once renamed into place.
fn private_stage(parent: &Path, prefix: &str) -> Result<tempfile::TempDir> {
    let stage = tmp_dir_in(parent, prefix)?;
    fs::set_permissions(stage.path(), fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod {}", stage.path().display()))?;
    Ok(stage)
}

fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}
