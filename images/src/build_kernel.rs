//! udos's own guest kernel: Debian's `linux-source-6.1` configured as x86_64
//! `allnoconfig` plus `kernel/config.fragment` (everything udos needs built in, no
//! modules) and compiled offline into an ELF `vmlinux` with the PVH entry note.
//!
//! A kernel is content-addressed by its recipe: the builder's version
//! ([`KERNEL_BUILDER`]), the source package (file name and SHA-256, as apt resolves it)
//! and the fragment. It is built once into `<state>/images/kernels/<id>/`
//! (`vmlinux`, `config`, `kernel.json`); `kernels/current` names the last one built
//! from this udos's fragment, which the image then uses instead of Debian's cloud
//! kernel ([`crate::ImageStore::own_kernel`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::apt::DebPackage;
use crate::kernel;
use crate::store::ImageStore;
use crate::streamed::{run_streamed, StreamedError, Tail};
use crate::util::{self, atomic_write, check_token, sha256_hex, tmp_dir_in};

/// Version of the build recipe (the steps and make variables below); part of every
/// kernel's id, so changing how kernels are built never reuses an old one.
pub const KERNEL_BUILDER: &str = "udos-kernel-build/1";

/// The Debian package holding the kernel source (a `.tar.xz` of the whole tree).
pub const LINUX_SOURCE_PACKAGE: &str = "linux-source-6.1";

/// The options udos needs, merged onto `allnoconfig` (`kernel/config.fragment`).
pub const CONFIG_FRAGMENT: &str = include_str!("../../kernel/config.fragment");

/// The kernel's `uname -r` suffix, set by the fragment (`CONFIG_LOCALVERSION`).
pub const LOCALVERSION: &str = "-udos";

/// How many kbuild steps (`CC`, `LD`, `AR`, ... lines) a build of the default
/// fragment prints: counted on a build here, for the progress percentage only.
const BUILD_STEPS_ESTIMATE: usize = 1700;

/// How often a build in progress says how far it is.
const PROGRESS_EVERY: Duration = Duration::from_secs(20);

/// `make allnoconfig`: a few seconds (it compiles kconfig first).
const CONFIGURE_LIMIT: Duration = Duration::from_secs(10 * 60);
/// Unpacking the 138 MB source tarball: ~15 s here.
const UNPACK_LIMIT: Duration = Duration::from_secs(20 * 60);
/// `apt-get install` of the build tools.
const INSTALL_LIMIT: Duration = Duration::from_secs(15 * 60);

/// Programs the build runs, and the Debian package that has each.
const BUILD_TOOLS: &[(&str, &str)] = &[
    ("make", "make"),
    ("gcc", "gcc"),
    ("ld", "binutils"),
    ("bc", "bc"),
    ("bison", "bison"),
    ("flex", "flex"),
    ("perl", "perl"),
    ("xz", "xz-utils"),
    ("tar", "tar"),
    ("dpkg-deb", "dpkg"),
];

/// Headers the build compiles against (objtool needs libelf), and their packages.
const BUILD_HEADERS: &[(&str, &str)] = &[("/usr/include/gelf.h", "libelf-dev")];

/// How to build the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelBuildOptions {
    /// The fragment merged onto `allnoconfig` (default: [`CONFIG_FRAGMENT`]).
    pub fragment: String,
    /// `make -j`.
    pub jobs: usize,
    /// The compile is stopped after this long.
    pub timeout: Duration,
}

impl Default for KernelBuildOptions {
    fn default() -> Self {
        KernelBuildOptions {
            fragment: CONFIG_FRAGMENT.to_string(),
            jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
            timeout: Duration::from_secs(2 * 3600),
        }
    }
}

impl KernelBuildOptions {
    fn is_default_fragment(&self) -> bool {
        self.fragment == CONFIG_FRAGMENT
    }
}

/// What a kernel is built from. Its [`KernelRecipe::id`] addresses the result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelRecipe {
    /// The `linux-source-6.1` package, as apt resolved it.
    pub source: DebPackage,
    /// The config fragment.
    pub fragment: String,
}

impl KernelRecipe {
    /// SHA-256 (hex) over the builder's version, the source package and the fragment.
    pub fn id(&self) -> String {
        let inputs = serde_json::json!({
            "builder": KERNEL_BUILDER,
            "source": [self.source.filename, self.source.sha256],
            "fragment": self.fragment,
        });
        sha256_hex(inputs.to_string().as_bytes())
    }
}

/// SHA-256 (hex) of a fragment: which built kernels this udos may boot.
pub fn fragment_sha256(fragment: &str) -> String {
    sha256_hex(fragment.as_bytes())
}

/// How long each part of a build took, ms.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildTimings {
    /// Downloading the source package (0 when it was cached).
    pub fetch_ms: u64,
    /// Unpacking the source tree.
    pub unpack_ms: u64,
    /// `make allnoconfig` with the fragment, and checking the result.
    pub configure_ms: u64,
    /// `make vmlinux`.
    pub compile_ms: u64,
    /// All of it.
    pub total_ms: u64,
}

/// A kernel in the store (`kernels/<id>/kernel.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltKernel {
    /// [`KernelRecipe::id`].
    pub id: String,
    /// `uname -r` (`6.1.192-udos`).
    pub release: String,
    /// The source package's file name (`linux-source-6.1_6.1.192-3_all.deb`).
    pub source_package: String,
    /// Its version (`6.1.192-3`).
    pub source_version: String,
    /// [`KERNEL_BUILDER`] at build time.
    pub builder: String,
    /// [`fragment_sha256`] of the fragment it was built from.
    pub fragment_sha256: String,
    /// Size of `vmlinux`.
    pub vmlinux_bytes: u64,
    /// Whether `vmlinux` has the PVH entry note (it must).
    pub pvh: bool,
    /// The `make -j` it was built with.
    pub jobs: usize,
    /// How long the build took.
    pub timings: BuildTimings,
    /// `kernels/<id>`.
    #[serde(skip)]
    pub dir: PathBuf,
}

impl BuiltKernel {
    /// The ELF kernel.
    pub fn vmlinux(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }

    /// The full `.config` it was built with.
    pub fn config(&self) -> PathBuf {
        self.dir.join("config")
    }

    /// Built from this udos's recipe (builder and fragment), whatever the source
    /// version: what the image may boot.
    pub fn is_current_recipe(&self) -> bool {
        self.builder == KERNEL_BUILDER && self.fragment_sha256 == fragment_sha256(CONFIG_FRAGMENT)
    }
}

/// What [`ImageStore::ensure_kernel`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelStatus {
    /// Compiled now.
    Built,
    /// Already in the store: nothing was done.
    Cached,
}

/// The kernel the image boots by default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnKernel {
    /// `udos kernel build` has not run here: Debian's cloud kernel is used.
    NotBuilt,
    /// Built from this udos's fragment: the image uses it.
    Ready(BuiltKernel),
    /// Built from another fragment or builder (an older udos): not used.
    Outdated(BuiltKernel),
}

/// A fragment option and the value it asks for (`n` for `# CONFIG_X is not set`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigOption {
    /// `CONFIG_...`.
    pub name: String,
    /// `y`, a number, a quoted string, or `n`.
    pub value: String,
}

/// A fragment option the resulting `.config` does not hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unmet {
    /// The option.
    pub name: String,
    /// What the fragment asks.
    pub wanted: String,
    /// What `.config` has (`n` when absent or not set).
    pub got: String,
}

/// Why a kernel build failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelBuildError {
    /// Build tools are missing and cannot be installed here.
    #[error("building the kernel needs {}: install them (`apt-get install {}`) or run `udos kernel build` as root, which installs them", .packages.join(", "), .packages.join(" "))]
    MissingPackages {
        /// The Debian packages to install.
        packages: Vec<String>,
    },
    /// Kconfig dropped options the fragment asks for (a dependency is missing).
    #[error("the kernel's .config does not hold what the fragment asks (add what these options depend on to the fragment): {}", describe_unmet(.0))]
    Unmet(Vec<Unmet>),
    /// A build step failed or ran out of time.
    #[error("{what} failed ({status}); its last lines:\n{tail}")]
    Failed {
        /// The step (`make vmlinux`).
        what: String,
        /// Its exit status, or why it was stopped.
        status: String,
        /// The end of its output.
        tail: String,
    },
    /// The build gave a vmlinux udos cannot boot.
    #[error("the built vmlinux is unusable: {0}")]
    BadVmlinux(String),
}

fn describe_unmet(unmet: &[Unmet]) -> String {
    unmet
        .iter()
        .map(|u| format!("{}={} (got {})", u.name, u.wanted, u.got))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The options of a fragment or `.config`: `CONFIG_X=value` lines and
/// `# CONFIG_X is not set` lines (value `n`); other lines are ignored.
pub fn parse_config(text: &str) -> Vec<ConfigOption> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("# ") {
                let name = rest.strip_suffix(" is not set")?;
                return name.starts_with("CONFIG_").then(|| ConfigOption {
                    name: name.to_string(),
                    value: "n".to_string(),
                });
            }
            let (name, value) = line.split_once('=')?;
            name.starts_with("CONFIG_").then(|| ConfigOption {
                name: name.to_string(),
                value: value.to_string(),
            })
        })
        .collect()
}

/// The options of `fragment` that `config` (a whole `.config`) does not hold.
pub fn unmet_options(fragment: &str, config: &str) -> Vec<Unmet> {
    let have: std::collections::HashMap<String, String> = parse_config(config)
        .into_iter()
        .map(|o| (o.name, o.value))
        .collect();
    parse_config(fragment)
        .into_iter()
        .filter_map(|want| {
            let got = have.get(&want.name).cloned().unwrap_or_else(|| "n".into());
            (got != want.value).then_some(Unmet {
                name: want.name,
                wanted: want.value,
                got,
            })
        })
        .collect()
}

/// The Debian packages whose programs or headers the build needs and this host lacks.
pub fn missing_build_packages(
    have_tool: &dyn Fn(&str) -> bool,
    have_file: &dyn Fn(&Path) -> bool,
) -> Vec<String> {
    let tools = BUILD_TOOLS
        .iter()
        .filter(|(tool, _)| !have_tool(tool))
        .map(|(_, pkg)| *pkg);
    let headers = BUILD_HEADERS
        .iter()
        .filter(|(file, _)| !have_file(Path::new(file)))
        .map(|(_, pkg)| *pkg);
    let mut pkgs: Vec<String> = tools.chain(headers).map(str::to_string).collect();
    pkgs.dedup();
    pkgs
}

/// Whether a line of kbuild's output is one build step (`  CC      init/main.o`).
fn is_build_step(line: &str) -> bool {
    let Some((tag, what)) = line
        .strip_prefix("  ")
        .and_then(|rest| rest.split_once(char::is_whitespace))
    else {
        return false;
    };
    !tag.is_empty()
        && !what.trim().is_empty()
        && tag
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// `3m05s`, `42s`.
pub fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Turns `make`'s output into progress lines at most every [`PROGRESS_EVERY`].
struct CompileProgress<'a> {
    out: &'a dyn Fn(&str),
    started: Instant,
    last: Instant,
    steps: usize,
    tail: Tail,
}

impl CompileProgress<'_> {
    fn line(&mut self, line: &str) {
        self.tail.push(line);
        if is_build_step(line) {
            self.steps += 1;
        }
        if self.last.elapsed() >= PROGRESS_EVERY {
            self.last = Instant::now();
            (self.out)(&self.report());
        }
    }

    fn report(&self) -> String {
        let elapsed = self.started.elapsed();
        let pct = (self.steps * 100 / BUILD_STEPS_ESTIMATE).min(99);
        let left = if self.steps > 0 && self.steps < BUILD_STEPS_ESTIMATE {
            let per_step = elapsed / self.steps as u32;
            format!(
                ", about {} left",
                minutes(per_step * (BUILD_STEPS_ESTIMATE - self.steps) as u32)
            )
        } else {
            String::new()
        };
        format!(
            "kernel: compiling, {} build steps done (~{pct}%), {} so far{left}",
            self.steps,
            minutes(elapsed)
        )
    }
}

/// The paths of one build, in a scratch directory removed when it is dropped.
struct Workdir {
    dir: tempfile::TempDir,
}

impl Workdir {
    fn src(&self) -> PathBuf {
        self.dir.path().join("src")
    }
    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }
    fn fragment(&self) -> PathBuf {
        self.dir.path().join("config.fragment")
    }

    /// `make -C src O=out ARCH=x86_64 ...`, reproducible: fixed build user, host and
    /// time stamp.
    fn make(&self, source_version: &str) -> Command {
        let mut cmd = Command::new("make");
        cmd.arg("-C")
            .arg(self.src())
            .arg(format!("O={}", self.out().display()))
            .arg("ARCH=x86_64")
            .env("LC_ALL", "C")
            .env("KBUILD_BUILD_USER", "udos")
            .env("KBUILD_BUILD_HOST", "udos")
            .env("KBUILD_BUILD_VERSION", "1")
            .env(
                "KBUILD_BUILD_TIMESTAMP",
                format!("{LINUX_SOURCE_PACKAGE} {source_version}"),
            );
        cmd
    }
}

impl ImageStore {
    /// `<root>/kernels`.
    pub fn kernels_dir(&self) -> PathBuf {
        self.root().join("kernels")
    }

    /// The recipe of the default kernel: `linux-source-6.1` as apt resolves it now
    /// (no download) and the fragment of `opts`.
    pub fn kernel_recipe(&self, opts: &KernelBuildOptions) -> Result<KernelRecipe> {
        let source = self
            .apt()
            .resolve(LINUX_SOURCE_PACKAGE)
            .context("resolve the kernel source package")?;
        Ok(KernelRecipe {
            source,
            fragment: opts.fragment.clone(),
        })
    }

    /// The kernel built as `id`.
    pub fn load_kernel(&self, id: &str) -> Result<BuiltKernel> {
        crate::store::check_hex_id(id)?;
        let dir = self.kernels_dir().join(id);
        let path = dir.join("kernel.json");
        let mut k: BuiltKernel = serde_json::from_slice(
            &fs::read(&path).with_context(|| format!("kernel {id} is not built"))?,
        )
        .with_context(|| format!("bad {}", path.display()))?;
        if k.id != id || !dir.join("vmlinux").is_file() {
            anyhow::bail!("{} does not describe a complete kernel {id}", dir.display());
        }
        k.dir = dir;
        Ok(k)
    }

    /// The kernel images boot by default: the last one `udos kernel build` made from
    /// this udos's fragment, if any.
    pub fn own_kernel(&self) -> Result<OwnKernel> {
        let id = match fs::read_to_string(self.kernels_dir().join("current")) {
            Ok(id) => id,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(OwnKernel::NotBuilt),
            Err(e) => return Err(e).context("read the current kernel pointer"),
        };
        let k = self.load_kernel(id.trim())?;
        Ok(if k.is_current_recipe() {
            OwnKernel::Ready(k)
        } else {
            OwnKernel::Outdated(k)
        })
    }

    /// The id of the built kernel whose `vmlinux` is `path`, if it is one.
    pub(crate) fn built_kernel_at(&self, path: &Path) -> Option<BuiltKernel> {
        let dir = path.parent()?;
        if path.file_name()? != "vmlinux" || dir.parent()? != self.kernels_dir() {
            return None;
        }
        self.load_kernel(dir.file_name()?.to_str()?).ok()
    }

    /// Builds the kernel of `opts` unless the store has it (same recipe), with
    /// progress; a kernel of the default fragment becomes `kernels/current`.
    pub fn ensure_kernel(
        &self,
        opts: &KernelBuildOptions,
        progress: &dyn Fn(&str),
    ) -> Result<(BuiltKernel, KernelStatus)> {
        let recipe = self.kernel_recipe(opts)?;
        let id = recipe.id();
        let _lock = util::lock_file(&self.kernels_dir().join(".lock"))?;
        self.remove_abandoned_builds(progress);
        let (kernel, status) = match self.load_kernel(&id) {
            Ok(k) => (k, KernelStatus::Cached),
            Err(_) => (
                self.build_kernel(&recipe, opts, progress)?,
                KernelStatus::Built,
            ),
        };
        if opts.is_default_fragment() {
            atomic_write(&self.kernels_dir().join("current"), id.as_bytes())?;
        }
        Ok((kernel, status))
    }

    /// Scratch trees of builds that died (a crash, a reboot): with the lock held no
    /// other build is running, and each holds 1.5 GB or more.
    fn remove_abandoned_builds(&self, progress: &dyn Fn(&str)) {
        let Ok(entries) = fs::read_dir(self.kernels_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".work-") || name.starts_with(".build-") {
                progress(&format!(
                    "kernel: removing the scratch of an abandoned build ({name})"
                ));
                if let Err(err) = fs::remove_dir_all(e.path()) {
                    progress(&format!(
                        "warning: cannot remove {}: {err}",
                        e.path().display()
                    ));
                }
            }
        }
    }

    fn build_kernel(
        &self,
        recipe: &KernelRecipe,
        opts: &KernelBuildOptions,
        progress: &dyn Fn(&str),
    ) -> Result<BuiltKernel> {
        let started = Instant::now();
        let id = recipe.id();
        let version = recipe.source.version();
        check_token("source version", &version)?;
        progress(&format!(
            "kernel: building {} from {LINUX_SOURCE_PACKAGE} {version} \
             (allnoconfig + config.fragment, make -j{}): about 16 minutes on 2 busy cores, less on idle ones",
            &id[..12],
            opts.jobs
        ));
        ensure_build_tools(progress)?;
        let mut timings = BuildTimings::default();

        let t = Instant::now();
        let deb = self.apt().download(&recipe.source, progress)?;
        timings.fetch_ms = ms(t.elapsed());

        let work = Workdir {
            dir: tmp_dir_in(&self.kernels_dir(), ".work-")?,
        };
        let t = Instant::now();
        progress(&format!("kernel: unpacking {}", recipe.source.filename));
        unpack_source(&deb, &work.src())?;
        timings.unpack_ms = ms(t.elapsed());

        let t = Instant::now();
        progress("kernel: configuring (make allnoconfig with the fragment)");
        configure(&work, &recipe.fragment, &version)?;
        timings.configure_ms = ms(t.elapsed());

        let t = Instant::now();
        compile(&work, &version, opts, progress)?;
        timings.compile_ms = ms(t.elapsed());
        timings.total_ms = ms(started.elapsed());

        let kernel = self.publish_kernel(recipe, &work, opts, timings)?;
        progress(&format!(
            "kernel: {} ({}) built in {} (unpack {}, configure {}, compile {})",
            &id[..12],
            kernel.release,
            minutes(started.elapsed()),
            minutes(Duration::from_millis(kernel.timings.unpack_ms)),
            minutes(Duration::from_millis(kernel.timings.configure_ms)),
            minutes(Duration::from_millis(kernel.timings.compile_ms)),
        ));
        Ok(kernel)
    }

    /// Checks the built vmlinux and moves it, its `.config` and `kernel.json` into
    /// `kernels/<id>`.
    fn publish_kernel(
        &self,
        recipe: &KernelRecipe,
        work: &Workdir,
        opts: &KernelBuildOptions,
        timings: BuildTimings,
    ) -> Result<BuiltKernel> {
        let id = recipe.id();
        let vmlinux = fs::read(work.out().join("vmlinux")).context("read the built vmlinux")?;
        let release = check_vmlinux(&vmlinux)?;
        let stage = tmp_dir_in(&self.kernels_dir(), ".build-")?;
        fs::write(stage.path().join("vmlinux"), &vmlinux)?;
        fs::copy(work.out().join(".config"), stage.path().join("config"))?;
        let kernel = BuiltKernel {
            id: id.clone(),
            release,
            source_package: recipe.source.filename.clone(),
            source_version: recipe.source.version(),
            builder: KERNEL_BUILDER.to_string(),
            fragment_sha256: fragment_sha256(&recipe.fragment),
            vmlinux_bytes: vmlinux.len() as u64,
            pvh: true,
            jobs: opts.jobs,
            timings,
            dir: self.kernels_dir().join(&id),
        };
        fs::write(
            stage.path().join("kernel.json"),
            serde_json::to_vec_pretty(&kernel)?,
        )?;
        let dest = self.kernels_dir().join(&id);
        if dest.exists() {
            // An incomplete earlier attempt (load_kernel refused it).
            fs::remove_dir_all(&dest).with_context(|| format!("remove {}", dest.display()))?;
        }
        util::publish_dir(stage, &dest)?;
        self.load_kernel(&id)
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Installs the build tools this host lacks (as root, with apt), or says which.
fn ensure_build_tools(progress: &dyn Fn(&str)) -> Result<(), KernelBuildError> {
    let packages = missing_build_packages(&util::have_tool, &|p| p.is_file());
    if packages.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(KernelBuildError::MissingPackages { packages });
    }
    progress(&format!(
        "kernel: installing the build tools: {}",
        packages.join(" ")
    ));
    let mut cmd = Command::new("apt-get");
    cmd.args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&packages)
        .env("DEBIAN_FRONTEND", "noninteractive");
    util::run(&mut cmd, INSTALL_LIMIT).map_err(|e| KernelBuildError::Failed {
        what: format!("apt-get install {}", packages.join(" ")),
        status: "run `apt-get update` first if the package lists are old".into(),
        tail: format!("{e:#}"),
    })?;
    Ok(())
}

/// Unpacks the source tarball inside the .deb into `dest` (the tree's top directory
/// stripped), streaming: no copy of the tarball is kept.
fn unpack_source(deb: &Path, dest: &Path) -> Result<()> {
    fs::create_dir_all(dest)?;
    let member = format!("./usr/src/{LINUX_SOURCE_PACKAGE}.tar.xz");
    let expr = duct::cmd!("dpkg-deb", "--fsys-tarfile", deb)
        .pipe(duct::cmd!("tar", "-xOf", "-", &member))
        .pipe(duct::cmd!(
            "tar",
            "-xJf",
            "-",
            "-C",
            dest,
            "--strip-components=1"
        ))
        .stdin_null()
        .stdout_null()
        .stderr_capture();
    crate::bounded::run_bounded(&expr, UNPACK_LIMIT, "unpacking the kernel source")
        .with_context(|| format!("unpack {member} from {}", deb.display()))?;
    if !dest.join("Makefile").is_file() {
        anyhow::bail!("{} holds no kernel tree at {member}", deb.display());
    }
    Ok(())
}

/// `make allnoconfig` with the fragment as `KCONFIG_ALLCONFIG`, then checks that the
/// `.config` holds every option the fragment asks for.
fn configure(work: &Workdir, fragment: &str, version: &str) -> Result<()> {
    fs::write(work.fragment(), fragment)?;
    fs::create_dir_all(work.out())?;
    let mut cmd = work.make(version);
    cmd.arg(format!("KCONFIG_ALLCONFIG={}", work.fragment().display()))
        .arg("allnoconfig");
    util::run(&mut cmd, CONFIGURE_LIMIT).context("make allnoconfig")?;
    let config = fs::read_to_string(work.out().join(".config")).context("read .config")?;
    let unmet = unmet_options(fragment, &config);
    if !unmet.is_empty() {
        return Err(KernelBuildError::Unmet(unmet).into());
    }
    Ok(())
}

/// `make vmlinux` with progress lines; stopped at `opts.timeout`.
fn compile(
    work: &Workdir,
    version: &str,
    opts: &KernelBuildOptions,
    progress: &dyn Fn(&str),
) -> Result<(), KernelBuildError> {
    progress(&format!(
        "kernel: compiling (make -j{} vmlinux), progress every {} s",
        opts.jobs,
        PROGRESS_EVERY.as_secs()
    ));
    let mut cmd = work.make(version);
    cmd.arg(format!("-j{}", opts.jobs.max(1))).arg("vmlinux");
    let now = Instant::now();
    let mut p = CompileProgress {
        out: progress,
        started: now,
        last: now,
        steps: 0,
        tail: Tail::new(40),
    };
    let failed = |status: String, tail: String| KernelBuildError::Failed {
        what: "make vmlinux".into(),
        status,
        tail,
    };
    match run_streamed(cmd, opts.timeout, &mut |l| p.line(l)) {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(failed(s.to_string(), p.tail.text())),
        Err(e @ StreamedError::TimedOut { .. }) => Err(failed(e.to_string(), p.tail.text())),
        Err(e) => Err(failed(e.to_string(), String::new())),
    }
}

/// The release of a built vmlinux, once it is an ELF with the PVH note and a banner
/// ending in [`LOCALVERSION`].
fn check_vmlinux(vmlinux: &[u8]) -> Result<String, KernelBuildError> {
    if kernel::detect_format(vmlinux).ok() != Some(kernel::KernelFormat::Elf) {
        return Err(KernelBuildError::BadVmlinux("not an ELF file".into()));
    }
    if !kernel::has_pvh_note(vmlinux) {
        return Err(KernelBuildError::BadVmlinux(
            "no PVH entry note (CONFIG_PVH)".into(),
        ));
    }
    let release = kernel::release_from_elf(vmlinux)
        .ok_or_else(|| KernelBuildError::BadVmlinux("no `Linux version` banner".into()))?;
    if !release.ends_with(LOCALVERSION) {
        return Err(KernelBuildError::BadVmlinux(format!(
            "release {release} does not end in {LOCALVERSION} (CONFIG_LOCALVERSION)"
        )));
    }
    Ok(release)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deb(filename: &str, sha: &str) -> DebPackage {
        DebPackage {
            name: LINUX_SOURCE_PACKAGE.into(),
            filename: filename.into(),
            size: 1,
            sha256: sha.into(),
        }
    }

    #[test]
    fn the_id_follows_source_fragment_and_nothing_else() {
        let a = KernelRecipe {
            source: deb("linux-source-6.1_6.1.192-3_all.deb", "aa"),
            fragment: "CONFIG_X=y\n".into(),
        };
        let same = a.clone();
        let mut newer = a.clone();
        newer.source = deb("linux-source-6.1_6.1.193-1_all.deb", "aa");
        let mut other_sum = a.clone();
        other_sum.source.sha256 = "bb".into();
        let mut other_fragment = a.clone();
        other_fragment.fragment.push_str("CONFIG_Y=y\n");
        let mut bigger = a.clone();
        bigger.source.size = 2; // apt's size is not an input: the SHA-256 covers it
        assert_eq!(a.id(), same.id());
        assert_eq!(a.id(), bigger.id());
        for other in [&newer, &other_sum, &other_fragment] {
            assert_ne!(a.id(), other.id());
        }
        assert_eq!(a.id().len(), 64);
    }

    #[test]
    fn config_lines_are_options_and_comments_are_not() {
        let opts = parse_config(
            "# a comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"-udos\"\n\
             CONFIG_N=64\nnot an option\n#CONFIG_D=y\n",
        );
        let got: Vec<(&str, &str)> = opts
            .iter()
            .map(|o| (o.name.as_str(), o.value.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("CONFIG_A", "y"),
                ("CONFIG_B", "n"),
                ("CONFIG_C", "\"-udos\""),
                ("CONFIG_N", "64")
            ]
        );
    }

    #[test]
    fn options_kconfig_dropped_or_changed_are_unmet() {
        let fragment = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_D=8\nCONFIG_E=y\n";
        let config = "CONFIG_A=y\n# CONFIG_B is not set\n# CONFIG_C is not set\nCONFIG_D=4\n";
        let unmet = unmet_options(fragment, config);
        let names: Vec<(&str, &str)> = unmet
            .iter()
            .map(|u| (u.name.as_str(), u.got.as_str()))
            .collect();
        assert_eq!(
            names,
            [("CONFIG_B", "n"), ("CONFIG_D", "4"), ("CONFIG_E", "n")]
        );
        let msg = KernelBuildError::Unmet(unmet).to_string();
        assert!(msg.contains("CONFIG_B=y (got n)"), "{msg}");
        // An option the fragment turns off may be absent from .config altogether.
        assert!(unmet_options("# CONFIG_C is not set\n", "").is_empty());
    }

    #[test]
    fn the_shipped_fragment_builds_a_modular_free_pvh_kernel() {
        let opts = parse_config(CONFIG_FRAGMENT);
        let want = |name: &str, value: &str| {
            assert!(
                opts.iter().any(|o| o.name == name && o.value == value),
                "config.fragment lacks {name}={value}"
            )
        };
        want("CONFIG_MODULES", "n");
        want("CONFIG_PVH", "y");
        want("CONFIG_LOCALVERSION", &format!("\"{LOCALVERSION}\""));
        for built_in in [
            "CONFIG_VIRTIO_MMIO",
            "CONFIG_VIRTIO_PCI",
            "CONFIG_VIRTIO_BLK",
            "CONFIG_VIRTIO_NET",
            "CONFIG_OVERLAY_FS",
            "CONFIG_EROFS_FS",
            "CONFIG_EXT4_FS",
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_SERIAL_8250_CONSOLE",
            "CONFIG_FANOTIFY",
        ] {
            want(built_in, "y");
        }
        let mut names: Vec<&str> = opts.iter().map(|o| o.name.as_str()).collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n, "an option is listed twice");
    }

    #[test]
    fn missing_tools_name_their_packages() {
        let none = missing_build_packages(&|_| true, &|_| true);
        assert!(none.is_empty());
        let pkgs = missing_build_packages(&|t| t != "bison" && t != "flex", &|_| false);
        assert_eq!(pkgs, ["bison", "flex", "libelf-dev"]);
        let msg = KernelBuildError::MissingPackages { packages: pkgs }.to_string();
        assert!(
            msg.contains("apt-get install bison flex libelf-dev"),
            "{msg}"
        );
    }

    #[test]
    fn kbuild_step_lines_are_counted_and_others_are_not() {
        for step in [
            "  CC      init/main.o",
            "  HOSTCC  scripts/kallsyms",
            "  LD      vmlinux.o",
            "  AS      arch/x86/entry/entry_64.o",
            "  SYSHDR  arch/x86/include/generated/uapi/asm/unistd_32.h",
        ] {
            assert!(is_build_step(step), "{step}");
        }
        for other in [
            "make[1]: Entering directory '/x/out'",
            "  GEN     ", // a tag needs something after it
            "  warning: something",
            "CC init/main.o",
            "",
        ] {
            assert!(!is_build_step(other), "{other:?}");
        }
    }

    #[test]
    fn progress_says_how_far_and_how_long() {
        let lines = std::sync::Mutex::new(Vec::new());
        let out = |l: &str| lines.lock().unwrap().push(l.to_string());
        let mut p = CompileProgress {
            out: &out,
            started: Instant::now() - Duration::from_secs(150),
            last: Instant::now() - PROGRESS_EVERY,
            steps: BUILD_STEPS_ESTIMATE / 2 - 1,
            tail: Tail::new(2),
        };
        p.line("  CC      kernel/fork.o");
        let said = lines.lock().unwrap().clone();
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(said[0].contains("(~50%)"), "{said:?}");
        assert!(said[0].contains("2m30s so far"), "{said:?}");
        assert!(said[0].contains("about 2m"), "{said:?}");
        // Not again before the interval.
        p.line("  CC      kernel/exit.o");
        assert_eq!(lines.lock().unwrap().len(), 1);
        assert_eq!(minutes(Duration::from_secs(59)), "59s");
        assert_eq!(minutes(Duration::from_secs(605)), "10m05s");
    }

    #[test]
    fn scratch_of_abandoned_builds_is_removed_and_kernels_are_kept() {
        let state = tempfile::tempdir().unwrap();
        let store = ImageStore::new(state.path());
        let kernels = store.kernels_dir();
        for d in [".work-abc/out", ".build-def", "0123abcd"] {
            fs::create_dir_all(kernels.join(d)).unwrap();
        }
        fs::write(kernels.join("current"), "0123abcd").unwrap();
        let said = std::sync::Mutex::new(Vec::new());
        store.remove_abandoned_builds(&|l| said.lock().unwrap().push(l.to_string()));
        let mut left: Vec<String> = fs::read_dir(&kernels)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["0123abcd", "current"]);
        assert_eq!(said.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_file_that_is_no_pvh_kernel_is_refused() {
        let err = check_vmlinux(b"not an elf").unwrap_err();
        assert!(err.to_string().contains("not an ELF"), "{err}");
        // A real ELF executable, but no kernel: no PVH note.
        let elf = fs::read("/bin/true").unwrap();
        let err = check_vmlinux(&elf).unwrap_err();
        assert!(err.to_string().contains("no PVH entry note"), "{err}");
    }
}
