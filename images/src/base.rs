//! The default base layer: a small root made of Debian's `busybox-static` and
//! `bash-static`, packed as erofs.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::util::{copy_file, run_stdout};

/// `busybox --list-full`: a static binary printing its applet list.
const APPLET_LIST_LIMIT: Duration = Duration::from_secs(30);

/// Bumped whenever the tree's layout changes; part of the base layer id.
pub const BASE_LAYOUT_VERSION: u32 = 1;

/// Debian packages the base layer is made of.
pub const BASE_PACKAGES: &[&str] = &["busybox-static", "bash-static"];

/// Directories of the base root and their modes.
pub const BASE_DIRS: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("sbin", 0o755),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("usr/local", 0o755),
    ("usr/local/bin", 0o755),
    ("usr/local/sbin", 0o755),
    ("etc", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("root", 0o700),
    ("home", 0o755),
    ("workspace", 0o755),
    ("mnt", 0o755),
    ("var", 0o755),
    ("var/tmp", 0o1777),
];

const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";
const HOSTNAME: &str = "udos\n";
pub(crate) const HOSTS: &str =
    "127.0.0.1\tlocalhost udos\n::1\tlocalhost ip6-localhost ip6-loopback\n";

/// Applet paths (from `busybox --list-full`) left out of the tree: `bash` is the real
/// bash-static, `linuxrc` is not a command.
fn skip_applet(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    matches!(name, "bash" | "linuxrc" | "busybox")
        || !["bin/", "sbin/", "usr/bin/", "usr/sbin/"]
            .iter()
            .any(|d| path.starts_with(d) && !path[d.len()..].contains('/'))
}

/// Assembles the base root in `out` (which must not exist yet) from the extracted
/// busybox-static and bash-static packages.
pub fn build_base_tree(busybox_root: &Path, bash_root: &Path, out: &Path) -> Result<()> {
    let busybox = busybox_root.join("bin/busybox");
    let bash = bash_root.join("bin/bash-static");
    for p in [&busybox, &bash] {
        if !p.is_file() {
            bail!("{} missing from the extracted package", p.display());
        }
    }
    fs::create_dir(out).with_context(|| format!("create {}", out.display()))?;
    for (d, _) in BASE_DIRS {
        fs::create_dir_all(out.join(d))?;
    }
    copy_file(&busybox, &out.join("bin/busybox"))?;
    set_mode(&out.join("bin/busybox"), 0o755)?;
    copy_file(&bash, &out.join("bin/bash"))?;
    set_mode(&out.join("bin/bash"), 0o755)?;

    let list = run_stdout(Command::new(&busybox).arg("--list-full"), APPLET_LIST_LIMIT)
        .context("busybox --list-full")?;
    let mut applets: Vec<&str> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !skip_applet(l))
        .collect();
    applets.sort();
    applets.dedup();
    for a in &applets {
        let link = out.join(a);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        symlink("/bin/busybox", &link).with_context(|| format!("symlink {}", link.display()))?;
    }
    for must in ["bin/sh", "usr/bin/env"] {
        let p = out.join(must);
        if p.symlink_metadata().is_err() {
            symlink("/bin/busybox", &p)?;
        }
    }
    for (f, body, mode) in [
        ("etc/passwd", PASSWD, 0o644),
        ("etc/group", GROUP, 0o644),
        ("etc/hostname", HOSTNAME, 0o644),
        ("etc/hosts", HOSTS, 0o644),
        ("etc/shells", "/bin/sh\n/bin/bash\n", 0o644),
    ] {
        let p = out.join(f);
        fs::write(&p, body)?;
        set_mode(&p, mode)?;
    }
    // Modes last: create_dir_all is subject to the umask.
    for (d, mode) in BASE_DIRS {
        set_mode(&out.join(d), *mode)?;
    }
    set_mode(out, 0o755)?;
    Ok(())
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::skip_applet;

    #[test]
    fn applet_filter() {
        assert!(!skip_applet("bin/ls"));
        assert!(!skip_applet("usr/bin/env"));
        assert!(!skip_applet("bin/sh"));
        assert!(skip_applet("bin/bash"));
        assert!(skip_applet("linuxrc"));
        assert!(skip_applet("usr/lib/x"));
        assert!(skip_applet("bin/a/b"));
    }
}
