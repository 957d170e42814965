//! The Ubuntu-like base: a Debian 12 root built from Debian's archive with
//! `mmdebstrap`, holding what GitHub's `ubuntu-*` runners are mostly used for (bash,
//! coreutils, git, curl, python3, node, build-essential, sudo, ...).
//!
//! mmdebstrap runs in root mode (the only mode that writes a directory with the right
//! owners) inside a private mount namespace (`unshare --mount`), so the `/proc`, `/sys`
//! and `/dev` mounts it makes in the chroot vanish with it, also when it is killed at
//! the time limit. The result is made equivalent to the busybox base for udos's PID 1
//! and act: an empty `/dev` (PID 1 mounts devtmpfs), udos's `/etc/hostname` and
//! `/etc/hosts`, no copy of the host's `/etc/resolv.conf`.

use std::collections::VecDeque;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::base::HOSTS;
use crate::streamed::{run_streamed, StreamedError};
use crate::util::sha256_hex;

/// Bumped whenever the recipe or the tree's post-processing changes; part of the id.
pub const DEBIAN_LAYOUT_VERSION: u32 = 1;

/// The Debian release the base is built from.
pub const DEBIAN_SUITE: &str = "bookworm";

/// mmdebstrap's variant: `Essential: yes` packages plus apt, then [`DEBIAN_PACKAGES`].
pub const DEBIAN_VARIANT: &str = "apt";

/// What the issue asks an `ubuntu-*` step to find (their dependencies come along).
pub const DEBIAN_PACKAGES: &[&str] = &[
    "bash",
    "coreutils",
    "findutils",
    "grep",
    "sed",
    "gawk",
    "diffutils",
    "tar",
    "gzip",
    "bzip2",
    "xz-utils",
    "zstd",
    "unzip",
    "zip",
    "git",
    "curl",
    "wget",
    "ca-certificates",
    "openssh-client",
    "gnupg",
    "jq",
    "python3",
    "python3-pip",
    "python3-venv",
    "nodejs",
    "npm",
    "build-essential",
    "pkg-config",
    "make",
    "sudo",
    "procps",
    "iproute2",
    "iputils-ping",
    "file",
    "less",
    "patch",
    "locales",
    "tzdata",
];

/// dpkg options, kept in the base (`/etc/dpkg/dpkg.cfg.d/99mmdebstrap`), so packages
/// a step installs get them too: no manual pages, info pages, documentation (but
/// copyrights) or message translations (but the alias database), about 100 MB less;
/// and no fsync per file (a build took 131 s instead of 192 s here; a step's writes
/// are synced once when its layer is sealed).
pub const DPKG_OPTIONS: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "force-unsafe-io",
];

/// apt options: no description translations to download.
pub const APT_OPTIONS: &[&str] = &["Acquire::Languages \"none\""];

/// `SOURCE_DATE_EPOCH` for mmdebstrap (2023-06-10, Debian 12's release): files it
/// makes get this time and it leaves out what would differ between two builds.
pub const SOURCE_DATE_EPOCH: u64 = 1_686_355_200;

/// How long a build may take (downloading ~300 MB and installing ~600 packages)
/// before it is stopped.
pub const DEFAULT_BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// How to build the Debian base.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebianOptions {
    /// Debian release (codename).
    pub suite: String,
    /// An apt mirror URL (e.g. a local proxy); `None` lets mmdebstrap use
    /// deb.debian.org with the release's -updates and -security suites.
    pub mirror: Option<String>,
    /// The build is stopped after this long.
    pub timeout: Duration,
    /// Build again from the archive as it is now, even when a base from the same
    /// recipe exists (its packages may have had updates since).
    pub refresh: bool,
}

impl Default for DebianOptions {
    fn default() -> Self {
        DebianOptions {
            suite: DEBIAN_SUITE.to_string(),
            mirror: None,
            timeout: DEFAULT_BUILD_TIMEOUT,
            refresh: false,
        }
    }
}

impl DebianOptions {
    /// The recipe's hash: what decides whether a base built before is still the one
    /// asked for (mirror included: another mirror may carry other versions).
    pub fn recipe_key(&self) -> String {
        let recipe = serde_json::json!({
            "format": "udos-debian-recipe/1",
            "layout": DEBIAN_LAYOUT_VERSION,
            "suite": self.suite,
            "variant": DEBIAN_VARIANT,
            "mirror": self.mirror,
            "packages": DEBIAN_PACKAGES,
            "dpkg": DPKG_OPTIONS,
            "apt": APT_OPTIONS,
        });
        sha256_hex(recipe.to_string().as_bytes())
    }
}

/// Why building the Debian base failed.
#[derive(Debug, thiserror::Error)]
pub enum DebianError {
    /// A tool is missing on the host.
    #[error("{tool} not found: install it (`apt-get install {package}`), or run ./udos, which installs what it needs")]
    MissingTool {
        /// The program.
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// Not root.
    #[error("building the Debian base needs root: mmdebstrap's root mode is the only one that makes a directory with the right owners")]
    NotRoot,
    /// A suite or mirror that is not a plain token or URL.
    #[error("invalid {what} {value:?}")]
    BadOption {
        /// `suite` or `mirror`.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// mmdebstrap could not be started.
    #[error("cannot start mmdebstrap: {0}")]
    Spawn(std::io::Error),
    /// mmdebstrap failed.
    #[error("mmdebstrap failed ({status}){hint}; its last lines:\n{tail}")]
    Failed {
        /// Its exit status.
        status: String,
        /// What to do, when the output says (e.g. the archive is unreachable).
        hint: String,
        /// The end of its output.
        tail: String,
    },
    /// The build ran out of time.
    #[error("mmdebstrap did not finish within {secs} s and was stopped; its last lines:\n{tail}")]
    Timeout {
        /// The limit.
        secs: u64,
        /// The end of its output.
        tail: String,
    },
    /// Reading or changing the built tree failed.
    #[error("{op} {path}: {cause}")]
    Io {
        /// What was done.
        op: &'static str,
        /// Where.
        path: String,
        /// The OS error.
        cause: std::io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DebianError {
    let path = path.display().to_string();
    move |cause| DebianError::Io { op, path, cause }
}

/// One installed package, as dpkg's status file lists it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstalledPackage {
    /// Package name.
    pub name: String,
    /// Exact version.
    pub version: String,
    /// Architecture (`amd64`, `all`).
    pub arch: String,
}

/// The packages dpkg's status file (`var/lib/dpkg/status` text) says are installed,
/// sorted by name and architecture.
pub fn parse_dpkg_status(text: &str) -> Vec<InstalledPackage> {
    let mut out: Vec<InstalledPackage> = text
        .split("\n\n")
        .filter_map(|stanza| {
            let field = |name: &str| {
                stanza.lines().find_map(|l| {
                    l.strip_prefix(name)
                        .and_then(|r| r.strip_prefix(':'))
                        .map(|v| v.trim().to_string())
                })
            };
            let installed = field("Status").is_some_and(|s| s.ends_with(" installed"));
            Some(InstalledPackage {
                name: field("Package")?,
                version: field("Version")?,
                arch: field("Architecture").unwrap_or_default(),
            })
            .filter(|_| installed)
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The installed packages of the root `tree` (none when it has no dpkg database).
pub fn installed_packages(tree: &Path) -> Result<Vec<InstalledPackage>, std::io::Error> {
    match fs::read_to_string(tree.join("var/lib/dpkg/status")) {
        Ok(text) => Ok(parse_dpkg_status(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The package list as recorded beside a base (`packages.txt`) and hashed into its
/// tags: one `name version arch` line per package.
pub fn packages_text(pkgs: &[InstalledPackage]) -> String {
    pkgs.iter()
        .map(|p| format!("{} {} {}\n", p.name, p.version, p.arch))
        .collect()
}

/// The Debian base's id: its layout version, suite and exact package set.
pub fn debian_base_id(suite: &str, pkgs: &[InstalledPackage]) -> String {
    let mut key = format!(
        "udos-debian-base/{DEBIAN_LAYOUT_VERSION}\nsuite {suite}\nvariant {DEBIAN_VARIANT}\n"
    );
    for o in DPKG_OPTIONS {
        key.push_str(&format!("dpkg {o}\n"));
    }
    key.push_str(&packages_text(pkgs));
    sha256_hex(key.as_bytes())
}

fn check_options(opts: &DebianOptions) -> Result<(), DebianError> {
    let token = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'))
    };
    if !token(&opts.suite) {
        return Err(DebianError::BadOption {
            what: "suite",
            value: opts.suite.clone(),
        });
    }
    if let Some(m) = &opts.mirror {
        let ok = (m.starts_with("http://") || m.starts_with("https://") || m.starts_with("file:/"))
            && !m
                .bytes()
                .any(|c| c.is_ascii_whitespace() || c.is_ascii_control());
        if !ok {
            return Err(DebianError::BadOption {
                what: "mirror",
                value: m.clone(),
            });
        }
    }
    Ok(())
}

/// The mmdebstrap command line that builds the root into the directory `target`.
pub fn mmdebstrap_command(opts: &DebianOptions, target: &Path) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "mmdebstrap"])
        .args(["--mode=root", "--format=directory", "--verbose"])
        .arg(format!("--variant={DEBIAN_VARIANT}"))
        .arg(format!("--include={}", DEBIAN_PACKAGES.join(",")));
    for o in DPKG_OPTIONS {
        cmd.arg(format!("--dpkgopt={o}"));
    }
    for o in APT_OPTIONS {
        cmd.arg(format!("--aptopt={o}"));
    }
    cmd.arg(&opts.suite).arg(target);
    if let Some(m) = &opts.mirror {
        cmd.arg(m);
    }
    cmd.env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH.to_string())
        .env("LC_ALL", "C.UTF-8")
        .env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// Progress from mmdebstrap's verbose output: its own `I:`/`W:`/`E:` lines, apt's
/// summary, and package counts at most every few seconds.
struct Progress<'a> {
    out: &'a dyn Fn(&str),
    fetched: usize,
    set_up: usize,
    last: Instant,
    last_shown: Option<String>,
    tail: VecDeque<String>,
}

const TAIL_LINES: usize = 30;
const COUNT_EVERY: Duration = Duration::from_secs(10);

impl Progress<'_> {
    fn line(&mut self, line: &str) {
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_string());
        let shown = ["I: ", "W: ", "E: ", "Fetched "];
        if shown.iter().any(|p| line.starts_with(p)) {
            // apt writes some lines to both stdout and stderr: show them once.
            if self.last_shown.as_deref() != Some(line) {
                (self.out)(&format!("debian base: {line}"));
                self.last_shown = Some(line.to_string());
            }
        } else if line.starts_with("Get:") {
            self.fetched += 1;
            self.maybe_count();
        } else if line.starts_with("Setting up ") {
            self.set_up += 1;
            self.maybe_count();
        }
    }

    fn maybe_count(&mut self) {
        if self.last.elapsed() >= COUNT_EVERY {
            self.last = Instant::now();
            (self.out)(&format!(
                "debian base: {} packages downloaded, {} set up",
                self.fetched, self.set_up
            ));
        }
    }

    fn tail(&self) -> String {
        self.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// A hint for a failure whose output shows the archive was out of reach.
fn failure_hint(tail: &str) -> String {
    let unreachable = [
        "Could not resolve",
        "Temporary failure resolving",
        "Failed to fetch",
        "Unable to connect",
        "Connection timed out",
        "Network is unreachable",
    ];
    if unreachable.iter().any(|u| tail.contains(u)) {
        ": Debian's archive could not be reached (check the network, or give a reachable mirror)"
            .into()
    } else {
        String::new()
    }
}

/// Runs mmdebstrap into `target` (which must not exist or be empty), streaming its
/// progress and stopping it at `opts.timeout`.
pub fn run_mmdebstrap(
    opts: &DebianOptions,
    target: &Path,
    progress: &dyn Fn(&str),
) -> Result<(), DebianError> {
    check_options(opts)?;
    for (tool, package) in [("mmdebstrap", "mmdebstrap"), ("unshare", "util-linux")] {
        if !crate::util::have_tool(tool) {
            return Err(DebianError::MissingTool { tool, package });
        }
    }
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(DebianError::NotRoot);
    }
    run_bounded(mmdebstrap_command(opts, target), opts.timeout, progress)
}

/// Runs `cmd` (mmdebstrap) in its own process group, turning its output into progress
/// lines; after `timeout` the whole group is stopped. Fails with the end of its output.
fn run_bounded(
    cmd: Command,
    timeout: Duration,
    progress: &dyn Fn(&str),
) -> Result<(), DebianError> {
    let mut p = Progress {
        out: progress,
        fetched: 0,
        set_up: 0,
        last: Instant::now(),
        last_shown: None,
        tail: VecDeque::new(),
    };
    let status = match run_streamed(cmd, timeout, &mut |line| p.line(line)) {
        Ok(status) => status,
        Err(StreamedError::Spawn { source, .. }) => return Err(DebianError::Spawn(source)),
        Err(StreamedError::TimedOut { .. }) => {
            return Err(DebianError::Timeout {
                secs: timeout.as_secs(),
                tail: p.tail(),
            })
        }
    };
    if !status.success() {
        let tail = p.tail();
        return Err(DebianError::Failed {
            status: status.to_string(),
            hint: failure_hint(&tail),
            tail,
        });
    }
    Ok(())
}

/// Files udos writes into the built root, and their modes.
const ETC_FILES: &[(&str, &str, u32)] = &[
    ("etc/hostname", "udos\n", 0o644),
    ("etc/hosts", HOSTS, 0o644),
    ("etc/default/locale", "LANG=C.UTF-8\n", 0o644),
];

/// Makes the built root what udos's PID 1 and act expect, like the busybox base:
/// `/dev` empty (PID 1 mounts devtmpfs over it), udos's hostname and hosts, no copy
/// of the build host's `resolv.conf`, `/tmp` 1777 and `/root` 0700.
pub fn finish_tree(tree: &Path) -> Result<(), DebianError> {
    let dev = tree.join("dev");
    for e in fs::read_dir(&dev).map_err(io_err("list", &dev))? {
        let p = e.map_err(io_err("list", &dev))?.path();
        let is_dir = p.symlink_metadata().is_ok_and(|m| m.is_dir());
        let r = if is_dir {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        r.map_err(io_err("remove", &p))?;
    }
    let resolv = tree.join("etc/resolv.conf");
    if resolv.symlink_metadata().is_ok() {
        fs::remove_file(&resolv).map_err(io_err("remove", &resolv))?;
    }
    for (rel, body, mode) in ETC_FILES {
        let p = tree.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        }
        fs::write(&p, body).map_err(io_err("write", &p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).map_err(io_err("chmod", &p))?;
    }
    for (rel, mode) in [("tmp", 0o1777), ("var/tmp", 0o1777), ("root", 0o700)] {
        let p = tree.join(rel);
        fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", &p))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Package: bash\nStatus: install ok installed\nPriority: required\nArchitecture: amd64\nVersion: 5.2.15-2+b7\nDescription: GNU Bourne Again SHell\n multi-line\n\nPackage: gone\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 1.0\n\nPackage: ca-certificates\nStatus: install ok installed\nArchitecture: all\nVersion: 20230311\n";

    #[test]
    fn dpkg_status_lists_only_installed_packages_sorted() {
        let pkgs = parse_dpkg_status(STATUS);
        let names: Vec<&str> = pkgs.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["bash", "ca-certificates"]);
        assert_eq!(pkgs[0].version, "5.2.15-2+b7");
        assert_eq!(pkgs[1].arch, "all");
        assert_eq!(
            packages_text(&pkgs),
            "bash 5.2.15-2+b7 amd64\nca-certificates 20230311 all\n"
        );
    }

    #[test]
    fn the_id_follows_every_package_version() {
        let a = parse_dpkg_status(STATUS);
        let mut b = a.clone();
        b[0].version = "5.2.15-2+b8".into();
        assert_ne!(
            debian_base_id("bookworm", &a),
            debian_base_id("bookworm", &b)
        );
        assert_ne!(debian_base_id("bookworm", &a), debian_base_id("trixie", &a));
        assert_eq!(
            debian_base_id("bookworm", &a),
            debian_base_id("bookworm", &a)
        );
    }

    #[test]
    fn the_recipe_key_follows_the_mirror_and_suite() {
        let d = DebianOptions::default();
        let m = DebianOptions {
            mirror: Some("http://mirror.example/debian".into()),
            ..d.clone()
        };
        let t = DebianOptions {
            timeout: Duration::from_secs(1),
            refresh: true,
            ..d.clone()
        };
        assert_ne!(d.recipe_key(), m.recipe_key());
        // How long and whether to refresh are not part of the recipe.
        assert_eq!(d.recipe_key(), t.recipe_key());
    }

    #[test]
    fn options_that_could_inject_arguments_are_refused() {
        for (suite, mirror) in [
            ("--variant=x", None),
            ("bookworm main", None),
            ("bookworm", Some("ftp://x")),
            ("bookworm", Some("http://x deb y")),
        ] {
            let o = DebianOptions {
                suite: suite.into(),
                mirror: mirror.map(String::from),
                ..DebianOptions::default()
            };
            assert!(check_options(&o).is_err(), "{suite} {mirror:?}");
        }
        assert!(check_options(&DebianOptions::default()).is_ok());
    }

    #[test]
    fn an_unreachable_archive_gets_a_hint() {
        assert!(failure_hint("E: Failed to fetch http://deb.debian.org/x").contains("reached"));
        assert_eq!(failure_hint("E: Unable to locate package nope"), "");
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    }

    #[test]
    fn a_build_past_its_time_is_stopped_with_its_whole_process_group() {
        let d = tempfile::tempdir().unwrap();
        let pidfile = d.path().join("pid");
        // A grandchild that ignores TERM: only the group KILL ends it.
        let script = format!(
            "echo 'I: starting'; (trap '' TERM; sleep 60) & echo $! > {}; wait",
            pidfile.display()
        );
        let lines = std::sync::Mutex::new(Vec::new());
        let t = Instant::now();
        let e = run_bounded(sh(&script), Duration::from_secs(1), &|l| {
            lines.lock().unwrap().push(l.to_string())
        })
        .unwrap_err();
        assert!(matches!(e, DebianError::Timeout { secs: 1, .. }), "{e}");
        assert!(e.to_string().contains("I: starting"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(30));
        assert_eq!(*lines.lock().unwrap(), ["debian base: I: starting"]);
        // Gone, or a zombie waiting for its reaper.
        let pid = fs::read_to_string(&pidfile).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let stat = fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .chars()
            .next();
        assert!(
            matches!(state, None | Some('Z')),
            "the grandchild is gone: {stat}"
        );
    }

    #[test]
    fn a_failed_build_reports_its_last_lines_and_a_hint() {
        let e = run_bounded(
            sh("echo 'E: Failed to fetch http://x/InRelease' >&2; exit 25"),
            Duration::from_secs(30),
            &|_| {},
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("exit status: 25") && msg.contains("could not be reached"),
            "{msg}"
        );
        assert!(msg.contains("E: Failed to fetch"), "{msg}");
        run_bounded(sh("echo fine"), Duration::from_secs(30), &|_| {}).unwrap();
    }

    #[test]
    fn finish_tree_empties_dev_and_writes_udos_files() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path();
        for dir in ["dev/pts", "etc", "tmp", "root"] {
            fs::create_dir_all(t.join(dir)).unwrap();
        }
        fs::write(t.join("dev/null-standin"), "").unwrap();
        std::os::unix::fs::symlink("/proc/self/fd", t.join("dev/fd")).unwrap();
        fs::write(t.join("etc/resolv.conf"), "nameserver 10.0.0.1\n").unwrap();
        fs::write(t.join("etc/hostname"), "buildhost\n").unwrap();
        finish_tree(t).unwrap();
        assert_eq!(fs::read_dir(t.join("dev")).unwrap().count(), 0);
        assert!(t.join("etc/resolv.conf").symlink_metadata().is_err());
        assert_eq!(
            fs::read_to_string(t.join("etc/hostname")).unwrap(),
            "udos\n"
        );
        assert!(fs::read_to_string(t.join("etc/hosts"))
            .unwrap()
            .contains("localhost"));
        let mode = |p: &str| fs::metadata(t.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("tmp"), 0o1777);
        assert_eq!(mode("root"), 0o700);
    }
}
