//! `node` in act's PATH, answering act's node probe without starting node.
//!
//! act runs `node --no-warnings -e console.log(process.execPath)` at the start of every
//! job, whether or not a step uses node, to learn where node is. Under software
//! emulation node's start costs about 1.5 s, most of a step VM on a base with node. So
//! PID 1 links itself into `/run/udos/bin` (first in act's PATH) as `node`; run under
//! that name, udos-init is this shim: it answers the probe with the path of the real
//! node (the first `node` further along PATH, resolved as `process.execPath` would be),
//! and runs the real node, with the same arguments, for anything else. Without a real
//! node it fails as a missing node would (127), and act falls back to `node`, as it
//! does without the shim.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// The name PID 1 links itself as.
pub const NAME: &str = "node";

/// act's probe, after `node`.
const PROBE: [&str; 3] = ["--no-warnings", "-e", "console.log(process.execPath)"];

/// Whether `argv0` (how this binary was started) names the shim.
pub fn invoked_as_shim(argv0: &OsStr) -> bool {
    Path::new(argv0).file_name() == Some(OsStr::new(NAME))
}

/// Whether `args` (without argv[0]) are act's probe.
pub fn is_probe(args: &[OsString]) -> bool {
    args.len() == PROBE.len() && args.iter().zip(PROBE).all(|(a, p)| a == p)
}

/// The first executable `node` along `path_var` that is not the file `me` (by device
/// and inode: the shim is a hard link of udos-init).
pub fn find_real(path_var: &OsStr, me: Option<(u64, u64)>) -> Option<PathBuf> {
    std::env::split_paths(path_var)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(NAME))
        .find(|candidate| {
            std::fs::metadata(candidate).is_ok_and(|md| {
                md.is_file()
                    && md.permissions().mode() & 0o111 != 0
                    && Some((md.dev(), md.ino())) != me
            })
        })
}

/// Runs as the shim; never returns.
pub fn main() -> ! {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let me = std::fs::metadata("/proc/self/exe")
        .ok()
        .map(|md| (md.dev(), md.ino()));
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let Some(real) = find_real(&path_var, me) else {
        eprintln!("node: not found");
        std::process::exit(127);
    };
    if is_probe(&args) {
        // What node prints: its executable, symlinks resolved.
        let resolved = std::fs::canonicalize(&real).unwrap_or(real);
        println!("{}", resolved.display());
        std::process::exit(0);
    }
    let err = std::process::Command::new(&real)
        .arg0(NAME)
        .args(&args)
        .exec();
    eprintln!("node: {}: {err}", real.display());
    std::process::exit(126)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exe(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn only_the_name_node_is_the_shim() {
        assert!(invoked_as_shim(OsStr::new("node")));
        assert!(invoked_as_shim(OsStr::new("/run/udos/bin/node")));
        assert!(!invoked_as_shim(OsStr::new("/init")));
        assert!(!invoked_as_shim(OsStr::new("nodejs")));
    }

    #[test]
    fn only_acts_exact_probe_is_answered() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(is_probe(&args(&PROBE)));
        assert!(!is_probe(&args(&["-e", "console.log(process.execPath)"])));
        assert!(!is_probe(&args(&[
            "--no-warnings",
            "-e",
            "console.log(process.execPath)",
            "x"
        ])));
        assert!(!is_probe(&args(&["--version"])));
    }

    #[test]
    fn the_real_node_is_the_next_executable_one_along_path_never_the_shim() {
        let d = tempfile::tempdir().unwrap();
        let (shim_dir, empty, plain, bin) = (
            d.path().join("shim"),
            d.path().join("empty"),
            d.path().join("plain"),
            d.path().join("bin"),
        );
        exe(&shim_dir.join(NAME));
        std::fs::create_dir_all(&empty).unwrap();
        // Not executable: skipped, as a shell would.
        std::fs::create_dir_all(&plain).unwrap();
        std::fs::write(plain.join(NAME), b"").unwrap();
        exe(&bin.join(NAME));
        let md = std::fs::metadata(shim_dir.join(NAME)).unwrap();
        let me = Some((md.dev(), md.ino()));
        let path = std::env::join_paths([&shim_dir, &empty, &plain, &bin]).unwrap();
        assert_eq!(find_real(&path, me), Some(bin.join(NAME)));
        // A hard link of the shim elsewhere is still the shim.
        std::fs::hard_link(shim_dir.join(NAME), empty.join(NAME)).unwrap();
        assert_eq!(find_real(&path, me), Some(bin.join(NAME)));
        // No other node: none.
        let only_shim = std::env::join_paths([&shim_dir, &empty]).unwrap();
        assert_eq!(find_real(&only_shim, me), None);
        // Relative PATH entries are not searched.
        assert_eq!(find_real(OsStr::new("bin"), me), None);
    }
}
