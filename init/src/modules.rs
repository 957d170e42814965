//! Kernel modules: the virtio, erofs and overlay drivers the step root needs.
//!
//! No modprobe in the initramfs: PID 1 reads depmod's `modules.dep` itself and loads
//! dependencies first with `finit_module(2)`.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};

use crate::console::{info, warning};
use crate::error::Error;

/// `MODULE_INIT_COMPRESSED_FILE`: the kernel decompresses `.ko.xz`/`.ko.zst` itself.
const MODULE_INIT_COMPRESSED_FILE: u32 = 4;

/// What was done, for the console.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub loaded: Vec<String>,
    pub skipped: usize,
}

/// depmod's view of one kernel release.
#[derive(Debug, Default)]
pub struct Index {
    /// name -> (path relative to the release dir, dependency names)
    modules: HashMap<String, (PathBuf, Vec<String>)>,
    /// Names in `modules.dep` order (the "load everything" order).
    order: Vec<String>,
    builtin: HashSet<String>,
}

/// Module name as the kernel knows it: file stem without `.ko*`, `-` folded to `_`.
pub fn module_name(path_or_name: &str) -> String {
    let base = path_or_name.rsplit('/').next().unwrap_or(path_or_name);
    let stem = match base.find(".ko") {
        Some(i) => &base[..i],
        None => base,
    };
    stem.replace('-', "_")
}

impl Index {
    /// Parses `modules.dep` and `modules.builtin` (the latter may be empty).
    pub fn parse(dep: &str, builtin: &str) -> Self {
        let mut index = Index::default();
        for line in dep.lines() {
            let Some((module, deps)) = line.split_once(':') else {
                continue;
            };
            let name = module_name(module.trim());
            let deps = deps.split_whitespace().map(module_name).collect();
            index.order.push(name.clone());
            index
                .modules
                .insert(name, (PathBuf::from(module.trim()), deps));
        }
        index.builtin = builtin
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| module_name(l.trim()))
            .collect();
        index
    }

    /// The order to load `name` in: its dependencies (recursively) first, each once.
    /// Builtins are left out; an unknown name is an error.
    pub fn plan(
        &self,
        name: &str,
        done: &mut HashSet<String>,
    ) -> Result<Vec<(String, PathBuf)>, Error> {
        let mut plan = Vec::new();
        self.plan_into(&module_name(name), done, &mut HashSet::new(), &mut plan)?;
        Ok(plan)
    }

    fn plan_into(
        &self,
        name: &str,
        done: &mut HashSet<String>,
        visiting: &mut HashSet<String>,
        plan: &mut Vec<(String, PathBuf)>,
    ) -> Result<(), Error> {
        if done.contains(name) || self.builtin.contains(name) || !visiting.insert(name.to_string())
        {
            return Ok(());
        }
        let Some((path, deps)) = self.modules.get(name) else {
            return Err(Error::ModuleLoad {
                name: name.to_string(),
                error: "not in modules.dep or modules.builtin".to_string(),
            });
        };
        // depmod lists the deepest dependency last: walk backwards so it loads first.
        for dep in deps.iter().rev() {
            self.plan_into(dep, done, visiting, plan)?;
        }
        done.insert(name.to_string());
        plan.push((name.to_string(), path.clone()));
        Ok(())
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(name)
    }
}

/// Loads the modules for this kernel from `/lib/modules/<release>`: those named in
/// `list` (one per line) when it exists, else every module `modules.dep` knows. A named
/// module that fails is an error; in "everything" mode failures are only warnings
/// (some drivers refuse to load without their hardware).
pub fn load(modules_root: &Path, release: &str, list: &Path) -> Result<Loaded, Error> {
    let dir = modules_root.join(release);
    let wanted = match fs::read_to_string(list) {
        Ok(text) => Some(
            text.lines()
                .map(|l| l.trim())
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(module_name)
                .collect::<Vec<_>>(),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io("read", list, e)),
    };
    let dep_path = dir.join("modules.dep");
    let dep = match fs::read_to_string(&dep_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && wanted.is_none() => {
            info!("no {}: no modules to load", dep_path.display());
            return Ok(Loaded::default());
        }
        Err(e) => return Err(Error::io("read", dep_path, e)),
    };
    let builtin = fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    let index = Index::parse(&dep, &builtin);

    let strict = wanted.is_some();
    let names = wanted.unwrap_or_else(|| index.order.clone());
    let mut done = HashSet::new();
    let mut result = Loaded::default();
    for name in names {
        if index.is_builtin(&name) {
            result.skipped += 1;
            continue;
        }
        let plan = match index.plan(&name, &mut done) {
            Ok(plan) => plan,
            Err(e) if strict => return Err(e),
            Err(e) => {
                warning!("{e}");
                continue;
            }
        };
        for (module, rel) in plan {
            match load_one(&module, &dir.join(&rel)) {
                Ok(true) => result.loaded.push(module),
                Ok(false) => result.skipped += 1,
                Err(e) if strict => return Err(e),
                Err(e) => warning!("{e}"),
            }
        }
    }
    Ok(result)
}

/// `finit_module` one file. Ok(false): it was already loaded.
fn load_one(name: &str, path: &Path) -> Result<bool, Error> {
    let file = fs::File::open(path).map_err(|e| Error::ModuleLoad {
        name: name.to_string(),
        error: format!("open {}: {e}", path.display()),
    })?;
    let compressed = path.extension().is_some_and(|ext| ext != "ko");
    let flags = if compressed {
        ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE)
    } else {
        ModuleInitFlags::empty()
    };
    match finit_module(&file, c"", flags) {
        Ok(()) => Ok(true),
        Err(Errno::EEXIST) => Ok(false),
        Err(e) => Err(Error::ModuleLoad {
            name: name.to_string(),
            error: format!("finit_module {}: {e}", path.display()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/fs/erofs/erofs.ko.xz: kernel/lib/libcrc32c.ko
kernel/lib/libcrc32c.ko:
kernel/fs/overlayfs/overlay.ko:
";

    fn names(plan: &[(String, PathBuf)]) -> Vec<&str> {
        plan.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn names_fold_dashes_and_suffixes() {
        assert_eq!(module_name("kernel/fs/erofs/erofs.ko.xz"), "erofs");
        assert_eq!(module_name("virtio-blk"), "virtio_blk");
        assert_eq!(module_name("virtio_blk.ko"), "virtio_blk");
    }

    #[test]
    fn dependencies_load_first_and_once() {
        let index = Index::parse(DEP, "kernel/fs/ext4/ext4.ko\n");
        let mut done = HashSet::new();
        let plan = index.plan("virtio_blk", &mut done).unwrap();
        assert_eq!(names(&plan), ["virtio_ring", "virtio", "virtio_blk"]);
        let plan = index.plan("virtio-mmio", &mut done).unwrap();
        assert_eq!(names(&plan), ["virtio_mmio"]);
        let plan = index.plan("erofs", &mut done).unwrap();
        assert_eq!(names(&plan), ["libcrc32c", "erofs"]);
        assert_eq!(plan[1].1, PathBuf::from("kernel/fs/erofs/erofs.ko.xz"));
        assert!(index.plan("ext4", &mut done).unwrap().is_empty());
        let err = index.plan("nope", &mut done).unwrap_err();
        assert_eq!(
            err.to_string(),
            "load module nope: not in modules.dep or modules.builtin"
        );
    }

    #[test]
    fn missing_release_dir_without_list_is_nothing_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let got = load(dir.path(), "0.0.0", &dir.path().join("modules")).unwrap();
        assert_eq!(got, Loaded::default());
    }

    #[test]
    fn missing_listed_module_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let rel = dir.path().join("6.1.0");
        fs::create_dir_all(&rel).unwrap();
        fs::write(rel.join("modules.dep"), DEP).unwrap();
        fs::write(rel.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();
        let list = dir.path().join("modules");
        fs::write(&list, "ext4\nvirtio_nope\n").unwrap();
        let err = load(dir.path(), "6.1.0", &list).unwrap_err();
        assert!(
            err.to_string().starts_with("load module virtio_nope"),
            "{err}"
        );
    }
}
