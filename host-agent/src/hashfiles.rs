//! The workspace as a step will see it, read on the host: the workspace layer with the
//! earlier steps' layers over it, whiteouts and opaque directories applied. It answers
//! `hashFiles()` (the SHA-256 of each matching file, in path order, hashed together, as
//! GitHub does; `''` when nothing matches) and, for the step cache, what a path is now
//! ([`LayeredWorkspace::seen`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSetBuilder};
use sha2::{Digest, Sha256};
use udos_core::cache::{listing_hash, Seen};
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

/// An entry of the merged workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A regular file: the host file holding its content.
    File(PathBuf),
    /// A directory.
    Dir,
    /// A symlink and its target.
    Symlink(PathBuf),
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// Removes every key under `prefix` (which ends in `/`). They sort together, right
/// from `prefix` on, so this costs what it removes, not a pass over the whole map.
fn remove_under(all: &mut BTreeMap<String, Entry>, prefix: &str) {
    let doomed: Vec<String> = all
        .range::<str, _>((
            std::ops::Bound::Included(prefix),
            std::ops::Bound::Unbounded,
        ))
        .take_while(|(k, _)| k.starts_with(prefix))
        .map(|(k, _)| k.clone())
        .collect();
    for k in doomed {
        all.remove(&k);
    }
}

impl LayeredWorkspace {
    /// Every entry of the merged workspace by relative path (the root is `""`).
    pub fn entries(&self) -> std::io::Result<BTreeMap<String, Entry>> {
        let mut all: BTreeMap<String, Entry> = BTreeMap::new();
        all.insert(String::new(), Entry::Dir);
        for layer in &self.layers {
            let top = layer.join(WORKSPACE);
            if !top.is_dir() {
                continue;
            }
            let mut todo = vec![(top, String::new())];
            while let Some((dir, rel)) = todo.pop() {
                if !rel.is_empty() && is_opaque(&dir) {
                    remove_under(&mut all, &format!("{rel}/"));
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
                        all.remove(&r);
                        remove_under(&mut all, &prefix);
                    } else if md.is_dir() {
                        if all.get(&r) != Some(&Entry::Dir) {
                            remove_under(&mut all, &prefix);
                        }
                        all.insert(r.clone(), Entry::Dir);
                        todo.push((e.path(), r));
                    } else {
                        remove_under(&mut all, &prefix);
                        let entry = if md.file_type().is_symlink() {
                            Entry::Symlink(std::fs::read_link(e.path())?)
                        } else {
                            Entry::File(e.path())
                        };
                        all.insert(r, entry);
                    }
                }
            }
        }
        Ok(all)
    }

    /// What `rel` is in the merged workspace, given its `entries`.
    pub fn seen(entries: &BTreeMap<String, Entry>, rel: &str) -> std::io::Result<Seen> {
        let rel = rel.trim_matches('/');
        // The workspace root is a directory, whether or not the map names it.
        let entry = match entries.get(rel) {
            None if rel.is_empty() => Some(&Entry::Dir),
            other => other,
        };
        Ok(match entry {
            None => Seen::Absent,
            Some(Entry::File(p)) => Seen::File {
                sha256: sha256_file(p)?,
            },
            Some(Entry::Symlink(t)) => Seen::Symlink {
                target: t.display().to_string(),
            },
            Some(Entry::Dir) => {
                let prefix = if rel.is_empty() {
                    String::new()
                } else {
                    format!("{rel}/")
                };
                let names = entries
                    .range::<str, _>((std::ops::Bound::Excluded(rel), std::ops::Bound::Unbounded))
                    .map(|(k, _)| k.as_str())
                    .take_while(|k| k.starts_with(&prefix))
                    .filter_map(|k| k.strip_prefix(&prefix))
                    .filter(|rest| !rest.is_empty() && !rest.contains('/'));
                Seen::Dir {
                    sha256: listing_hash(names),
                }
            }
        })
    }

    /// Regular files of the merged workspace: relative path → the host file holding
    /// its content (from the topmost layer that has it).
    pub fn files(&self) -> std::io::Result<BTreeMap<String, PathBuf>> {
        Ok(self
            .entries()?
            .into_iter()
            .filter_map(|(k, e)| match e {
                Entry::File(p) => Some((k, p)),
                _ => None,
            })
            .collect())
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
        for (rel, path) in files {
            if !include.is_match(&rel) || exclude.is_match(&rel) {
                continue;
            }
            let digest = sha256_file(&path).map_err(|e| format!("hashFiles: {rel}: {e}"))?;
            outer.update(hex::decode(digest).unwrap_or_default());
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
    fn seen_reads_files_listings_and_absences_through_the_layers() {
        let d = tempfile::tempdir().unwrap();
        let (ws, l1) = (d.path().join("ws"), d.path().join("l1"));
        write(&ws.join("workspace/src/a.rs"), "a");
        write(&ws.join("workspace/src/b.rs"), "b");
        write(&l1.join("workspace/src/c.rs"), "c");
        let view = LayeredWorkspace {
            layers: vec![ws.clone(), l1.clone()],
        };
        let e = view.entries().unwrap();
        let file = LayeredWorkspace::seen(&e, "src/a.rs").unwrap();
        assert!(matches!(file, Seen::File { .. }));
        assert_eq!(LayeredWorkspace::seen(&e, "nope").unwrap(), Seen::Absent);
        let dir = LayeredWorkspace::seen(&e, "src").unwrap();
        assert_eq!(
            dir,
            Seen::Dir {
                sha256: listing_hash(["a.rs", "b.rs", "c.rs"])
            }
        );
        // Only the base layer: the listing differs, the file does not.
        let e0 = LayeredWorkspace { layers: vec![ws] }.entries().unwrap();
        assert_ne!(LayeredWorkspace::seen(&e0, "src").unwrap(), dir);
        assert_eq!(LayeredWorkspace::seen(&e0, "src/a.rs").unwrap(), file);
        // The root is a directory too: its listing holds the top-level names.
        assert_eq!(
            LayeredWorkspace::seen(&e, "").unwrap(),
            Seen::Dir {
                sha256: listing_hash(["src"])
            }
        );
        write(&l1.join("workspace/new.txt"), "n");
        let e2 = LayeredWorkspace {
            layers: vec![d.path().join("ws"), l1],
        }
        .entries()
        .unwrap();
        assert_eq!(
            LayeredWorkspace::seen(&e2, "/").unwrap(),
            Seen::Dir {
                sha256: listing_hash(["new.txt", "src"])
            }
        );
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

    #[test]
    fn remove_under_removes_exactly_what_is_below_the_directory() {
        let mut all: BTreeMap<String, Entry> = ["a", "a-x", "a/b", "a/c/d", "ab", "b/a"]
            .into_iter()
            .map(|k| (k.to_string(), Entry::Dir))
            .collect();
        remove_under(&mut all, "a/");
        let left: Vec<&str> = all.keys().map(String::as_str).collect();
        assert_eq!(left, ["a", "a-x", "ab", "b/a"]);
    }

    #[test]
    fn a_file_replacing_a_directory_hides_what_was_under_it() {
        let d = tempfile::tempdir().unwrap();
        let (ws, l1) = (d.path().join("ws"), d.path().join("l1"));
        write(&ws.join("workspace/out/x"), "1");
        write(&ws.join("workspace/out-y"), "2");
        write(&l1.join("workspace/out"), "now a file");
        let entries = LayeredWorkspace {
            layers: vec![ws, l1],
        }
        .entries()
        .unwrap();
        let keys: Vec<&str> = entries.keys().map(String::as_str).collect();
        assert_eq!(keys, ["", "out", "out-y"]);
        assert!(matches!(entries["out"], Entry::File(_)));
    }
}
