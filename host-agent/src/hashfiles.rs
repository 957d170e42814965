//! `hashFiles()` on the host: the workspace as the step will see it (the workspace
//! layer with the earlier steps' layers over it, whiteouts and opaque directories
//! applied), matched with the patterns and hashed as GitHub does: the SHA-256 of
//! each matching file, in path order, hashed together; `''` when nothing matches.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSetBuilder};
use sha2::{Digest, Sha256};
use udos_core::expr::HashFiles;

/// Where the workspace is inside each layer directory.
const WORKSPACE: &str = "workspace";

/// The workspace through a stack of overlay-form layer directories, bottom first.
pub struct LayeredWorkspace {
    /// Layer directories (overlay form), bottom first.
    pub layers: Vec<PathBuf>,
}

fn is_whiteout(md: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    md.file_type().is_char_device() && md.rdev() == 0
}

fn is_opaque(path: &Path) -> bool {
    ["user.overlay.opaque", "trusted.overlay.opaque"]
        .iter()
        .any(|x| xattr_is_y(path, x))
}

fn xattr_is_y(path: &Path, name: &str) -> bool {
    let (Ok(p), Ok(n)) = (
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()),
        std::ffi::CString::new(name),
    ) else {
        return false;
    };
    let mut buf = [0u8; 4];
    // SAFETY: both strings are NUL-terminated and live across the call; the buffer's
    // length is passed with it.
    let n = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    n == 1 && buf[0] == b'y'
}

impl LayeredWorkspace {
    /// Regular files of the merged workspace: relative path → the host file holding
    /// its content (from the topmost layer that has it).
    pub fn files(&self) -> std::io::Result<BTreeMap<String, PathBuf>> {
        let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
        for layer in &self.layers {
            let top = layer.join(WORKSPACE);
            if !top.is_dir() {
                continue;
            }
            let mut todo = vec![(top, String::new())];
            while let Some((dir, rel)) = todo.pop() {
                if !rel.is_empty() && is_opaque(&dir) {
                    let prefix = format!("{rel}/");
                    files.retain(|k, _| !k.starts_with(&prefix));
                }
                for e in std::fs::read_dir(&dir)? {
                    let e = e?;
                    let name = e.file_name().to_string_lossy().into_owned();
                    let r = if rel.is_empty() {
                        name
                    } else {
                        format!("{rel}/{name}")
                    };
                    let md = e.path().symlink_metadata()?;
                    let prefix = format!("{r}/");
                    if is_whiteout(&md) {
                        files.remove(&r);
                        files.retain(|k, _| !k.starts_with(&prefix));
                    } else if md.is_dir() {
                        files.remove(&r);
                        todo.push((e.path(), r));
                    } else if md.is_file() {
                        files.retain(|k, _| !k.starts_with(&prefix));
                        files.insert(r, e.path());
                    } else {
                        files.remove(&r);
                    }
                }
            }
        }
        Ok(files)
    }
}

impl HashFiles for LayeredWorkspace {
    fn hash_files(&self, patterns: &[String]) -> Result<String, String> {
        let mut include = GlobSetBuilder::new();
        let mut exclude = GlobSetBuilder::new();
        for p in patterns {
            let (set, pat) = match p.strip_prefix('!') {
                Some(rest) => (&mut exclude, rest),
                None => (&mut include, p.as_str()),
            };
            let pat = pat.trim_start_matches("./");
            let pat = pat.strip_prefix(&format!("/{WORKSPACE}/")).unwrap_or(pat);
            let glob = GlobBuilder::new(pat)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("hashFiles: bad pattern `{p}`: {e}"))?;
            set.add(glob);
        }
        let (include, exclude) = (
            include.build().map_err(|e| format!("hashFiles: {e}"))?,
            exclude.build().map_err(|e| format!("hashFiles: {e}"))?,
        );
        let files = self
            .files()
            .map_err(|e| format!("hashFiles: reading the workspace: {e}"))?;
        let mut outer = Sha256::new();
        let mut any = false;
        let mut buf = vec![0u8; 1 << 16];
        for (rel, path) in files {
            if !include.is_match(&rel) || exclude.is_match(&rel) {
                continue;
            }
            let mut f = std::fs::File::open(&path).map_err(|e| format!("hashFiles: {rel}: {e}"))?;
            let mut h = Sha256::new();
            loop {
                let n = f
                    .read(&mut buf)
                    .map_err(|e| format!("hashFiles: {rel}: {e}"))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            outer.update(h.finalize());
            any = true;
        }
        Ok(if any {
            hex::encode(outer.finalize())
        } else {
            String::new()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, content: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    #[test]
    fn later_layers_change_and_delete_what_is_hashed() {
        let d = tempfile::tempdir().unwrap();
        let (ws, l1) = (d.path().join("ws"), d.path().join("l1"));
        write(&ws.join("workspace/a/lock.json"), "1");
        write(&ws.join("workspace/b/lock.json"), "2");
        write(&ws.join("workspace/readme"), "r");
        let view = |layers: Vec<PathBuf>| LayeredWorkspace { layers };
        let before = view(vec![ws.clone()])
            .hash_files(&["**/lock.json".into()])
            .unwrap();
        assert_eq!(before.len(), 64);
        // A later layer changes b/lock.json: the hash changes.
        write(&l1.join("workspace/b/lock.json"), "changed");
        let after = view(vec![ws.clone(), l1.clone()])
            .hash_files(&["**/lock.json".into()])
            .unwrap();
        assert_ne!(before, after);
        // Excluding it gives the hash of a/lock.json alone, whatever b holds.
        let only_a = view(vec![ws.clone(), l1.clone()])
            .hash_files(&["**/lock.json".into(), "!b/**".into()])
            .unwrap();
        assert_eq!(
            only_a,
            view(vec![ws.clone()])
                .hash_files(&["a/lock.json".into()])
                .unwrap()
        );
        // A whiteout deletes it; nothing left matches `b/*`.
        let l2 = d.path().join("l2");
        std::fs::create_dir_all(l2.join("workspace")).unwrap();
        let wh =
            std::ffi::CString::new(l2.join("workspace/b").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; a 0/0 character device is overlay's whiteout.
        assert_eq!(unsafe { libc::mknod(wh.as_ptr(), libc::S_IFCHR, 0) }, 0);
        assert_eq!(
            view(vec![ws, l1, l2]).hash_files(&["b/*".into()]).unwrap(),
            ""
        );
    }
}
