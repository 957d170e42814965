//! Debian packages through apt's ordinary clients: resolve (`apt-cache depends`,
//! `apt-get download --print-uris`), download (`apt-get download`, never install) and
//! extract (`dpkg -x`). Resolutions are cached against a stamp of apt's package lists so a
//! warm build does not pay apt's ~1 s start-up per query.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::util::{self, atomic_write, check_token, run, run_stdout, sha256_file, tmp_dir_in};

/// `apt-cache depends`, `apt-get download --print-uris`: reads of apt's local lists
/// (~1 s of start-up), no network.
const APT_QUERY_LIMIT: Duration = Duration::from_secs(2 * 60);
/// `apt-get download` of one package (the kernel is the largest, ~60 MB): minutes on a
/// slow mirror; a stalled one fails the build instead of blocking it.
const APT_DOWNLOAD_LIMIT: Duration = Duration::from_secs(15 * 60);
/// `dpkg -x` of a downloaded package, local disk only.
const DPKG_EXTRACT_LIMIT: Duration = Duration::from_secs(5 * 60);

/// One downloadable Debian package, as apt resolved it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebPackage {
    pub name: String,
    /// File name of the .deb (`name_version_arch.deb`, epoch colon escaped as `%3a`).
    pub filename: String,
    pub size: u64,
    pub sha256: String,
}

impl DebPackage {
    /// The version part of the file name (`6.1.192-2`, `1:1.35.0-4+deb12u1+b1`).
    pub fn version(&self) -> String {
        let stem = self.filename.trim_end_matches(".deb");
        let mut parts = stem.splitn(3, '_');
        let _name = parts.next();
        parts.next().unwrap_or("").replace("%3a", ":")
    }

    /// A directory-name-safe identifier: file name without `.deb`.
    pub fn stem(&self) -> String {
        self.filename.trim_end_matches(".deb").replace('%', "_")
    }
}

#[derive(Default, Serialize, Deserialize)]
struct ResolveCache {
    stamp: String,
    depends: BTreeMap<String, String>,
    packages: BTreeMap<String, DebPackage>,
}

/// Resolves packages with apt and downloads/extracts them under a cache directory.
pub struct Apt {
    cache: PathBuf,
}

impl Apt {
    pub fn new(cache: &Path) -> Self {
        Apt {
            cache: cache.to_path_buf(),
        }
    }

    fn resolve_cache_path(&self) -> PathBuf {
        self.cache.join("apt-resolve.json")
    }

    fn load_cache(&self, stamp: &str) -> ResolveCache {
        let loaded: Option<ResolveCache> = fs::read(self.resolve_cache_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        match loaded {
            Some(c) if c.stamp == stamp => c,
            _ => ResolveCache {
                stamp: stamp.to_string(),
                ..Default::default()
            },
        }
    }

    fn store_cache(&self, c: &ResolveCache) {
        if let Ok(b) = serde_json::to_vec_pretty(c) {
            let _ = atomic_write(&self.resolve_cache_path(), &b);
        }
    }

    /// The first `Depends:` of a metapackage (`linux-image-cloud-amd64` ->
    /// `linux-image-6.1.0-56-cloud-amd64`).
    pub fn metapackage_target(&self, meta: &str) -> Result<String> {
        check_token("package name", meta)?;
        let stamp = lists_stamp();
        let mut cache = self.load_cache(&stamp);
        if let Some(t) = cache.depends.get(meta) {
            return Ok(t.clone());
        }
        let out = run_stdout(
            Command::new("apt-cache").args(["depends", meta]),
            APT_QUERY_LIMIT,
        )
        .with_context(|| format!("apt-cache depends {meta} failed: run `apt-get update` first"))?;
        let target = out
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix("Depends:"))
            .map(|s| s.trim().trim_start_matches('<').trim_end_matches('>').to_string())
            .with_context(|| {
                format!("apt-cache depends {meta} lists no Depends (is apt's package list current? run `apt-get update`)")
            })?;
        check_token("package name", &target)?;
        cache.depends.insert(meta.to_string(), target.clone());
        self.store_cache(&cache);
        Ok(target)
    }

    /// File name, size and SHA-256 of the candidate version of `pkg`, without downloading.
    pub fn resolve(&self, pkg: &str) -> Result<DebPackage> {
        Ok(self.resolve_many(&[pkg])?.remove(0))
    }

    /// [`Apt::resolve`] for several packages with one apt call (apt takes ~1 s to start).
    pub fn resolve_many(&self, pkgs: &[&str]) -> Result<Vec<DebPackage>> {
        for p in pkgs {
            check_token("package name", p)?;
        }
        let stamp = lists_stamp();
        let mut cache = self.load_cache(&stamp);
        let missing: Vec<&str> = pkgs
            .iter()
            .copied()
            .filter(|p| !cache.packages.contains_key(*p))
            .collect();
        if !missing.is_empty() {
            let out = run_stdout(
                Command::new("apt-get")
                    .args(["download", "--print-uris"])
                    .args(&missing),
                APT_QUERY_LIMIT,
            )
            .with_context(|| {
                format!(
                    "apt-get download --print-uris {} failed: run `apt-get update` first",
                    missing.join(" ")
                )
            })?;
            let found = parse_print_uris(&out)?;
            for p in &missing {
                let deb = found
                    .iter()
                    .find(|d| d.name == *p)
                    .with_context(|| {
                        format!("apt-get download --print-uris {p} printed no URI for it: {out:?}")
                    })?
                    .clone();
                cache.packages.insert(p.to_string(), deb);
            }
            self.store_cache(&cache);
        }
        Ok(pkgs.iter().map(|p| cache.packages[*p].clone()).collect())
    }

    /// Downloads `deb` into `<cache>/debs/` (once) and returns its path, checked against
    /// apt's SHA-256.
    pub fn download(&self, deb: &DebPackage, progress: &dyn Fn(&str)) -> Result<PathBuf> {
        let dir = self.cache.join("debs");
        let dest = dir.join(&deb.filename);
        if dest.is_file() {
            return Ok(dest);
        }
        progress(&format!("downloading {} {}", deb.name, deb.version()));
        let tmp = tmp_dir_in(&dir, ".dl-")?;
        run(
            Command::new("apt-get")
                .args(["download", "-q", deb.name.as_str()])
                .current_dir(tmp.path()),
            APT_DOWNLOAD_LIMIT,
        )
        .with_context(|| {
            format!(
                "apt-get download {} failed: run `apt-get update` first",
                deb.name
            )
        })?;
        let got = tmp.path().join(&deb.filename);
        let got = if got.is_file() {
            got
        } else {
            // apt names the file itself; take the single .deb it wrote.
            let mut debs: Vec<PathBuf> = fs::read_dir(tmp.path())?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "deb"))
                .collect();
            if debs.len() != 1 {
                bail!(
                    "apt-get download {} produced {} .deb files",
                    deb.name,
                    debs.len()
                );
            }
            debs.remove(0)
        };
        let sum = sha256_file(&got)?;
        if sum != deb.sha256 {
            bail!(
                "{}: SHA-256 {sum} does not match apt's {} (apt lists changed? run `apt-get update`)",
                deb.filename,
                deb.sha256
            );
        }
        fs::rename(&got, &dest)
            .with_context(|| format!("rename {} to {}", got.display(), dest.display()))?;
        Ok(dest)
    }

    /// Downloads (if needed) and extracts `deb` with `dpkg -x` into
    /// `<cache>/extract/<stem>/`, once; returns that directory.
    pub fn fetch_extracted(&self, deb: &DebPackage, progress: &dyn Fn(&str)) -> Result<PathBuf> {
        let dest = self.cache.join("extract").join(deb.stem());
        if dest.join(".complete").is_file() {
            return Ok(dest);
        }
        let path = self.download(deb, progress)?;
        progress(&format!("extracting {}", deb.filename));
        let parent = self.cache.join("extract");
        let tmp = tmp_dir_in(&parent, ".x-")?;
        run(
            util::tool("dpkg").arg("-x").arg(&path).arg(tmp.path()),
            DPKG_EXTRACT_LIMIT,
        )
        .with_context(|| format!("dpkg -x {} failed", path.display()))?;
        fs::write(tmp.path().join(".complete"), &deb.sha256)?;
        if dest.exists() {
            // A half-finished earlier attempt (no .complete): replace it.
            if !dest.join(".complete").is_file() {
                fs::remove_dir_all(&dest)
                    .with_context(|| format!("remove stale {}", dest.display()))?;
            }
        }
        util::publish_dir(tmp, &dest)?;
        Ok(dest)
    }
}

/// Parses `apt-get download --print-uris` output, one package per line:
/// `'http://.../name_ver_arch.deb' name_1%3aver_arch.deb 928188 SHA256:3d3f...`.
fn parse_print_uris(out: &str) -> Result<Vec<DebPackage>> {
    let mut debs = Vec::new();
    for line in out.lines().filter(|l| l.starts_with('\'')) {
        let mut it = line.split_whitespace();
        let _uri = it.next();
        let filename = it.next().context("missing file name")?.to_string();
        let size: u64 = it
            .next()
            .context("missing size")?
            .parse()
            .context("bad size")?;
        let hash = it.next().context("missing hash")?;
        let sha256 = hash
            .strip_prefix("SHA256:")
            .with_context(|| format!("apt gave no SHA256 for {filename}: {hash}"))?
            .to_ascii_lowercase();
        if filename.contains('/') || !filename.ends_with(".deb") {
            bail!("unexpected .deb file name {filename:?}");
        }
        let name = filename.split('_').next().unwrap_or_default().to_string();
        debs.push(DebPackage {
            name,
            filename,
            size,
            sha256,
        });
    }
    Ok(debs)
}

/// A cheap fingerprint of apt's state: names, sizes and mtimes of the package lists and
/// the source/preference configuration. Changes when `apt-get update` fetches new lists.
fn lists_stamp() -> String {
    let mut items: Vec<String> = Vec::new();
    for dir in [
        "/var/lib/apt/lists",
        "/etc/apt/sources.list.d",
        "/etc/apt/preferences.d",
    ] {
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                if let Ok(m) = e.metadata() {
                    if m.is_file() {
                        items.push(stamp_item(&e.path(), &m));
                    }
                }
            }
        }
    }
    for f in ["/etc/apt/sources.list", "/etc/apt/preferences"] {
        if let Ok(m) = fs::metadata(f) {
            items.push(stamp_item(Path::new(f), &m));
        }
    }
    items.sort();
    util::sha256_hex(items.join("\n").as_bytes())
}

fn stamp_item(p: &Path, m: &fs::Metadata) -> String {
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{} {} {}", p.display(), m.len(), mtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_print_uris() {
        let out = "'http://deb.debian.org/debian/pool/main/b/busybox/busybox-static_1.35.0-4%2bdeb12u1%2bb1_amd64.deb' busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb 928188 SHA256:3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744\n";
        let d = parse_print_uris(out).unwrap().remove(0);
        assert_eq!(d.name, "busybox-static");
        assert_eq!(
            d.filename,
            "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"
        );
        assert_eq!(d.size, 928188);
        assert_eq!(d.version(), "1:1.35.0-4+deb12u1+b1");
        assert_eq!(d.stem(), "busybox-static_1_3a1.35.0-4+deb12u1+b1_amd64");
        assert!(d.sha256.starts_with("3d3f"));
    }
}
