//! QEMU `microvm` driver: the console is the first serial port on QEMU's stdout,
//! read line by line; disks are `virtio-blk-device`s (virtio-mmio) with serials; a
//! network is a `virtio-net-device` on slirp (or the namespace's TAP, [`NetBackend`]),
//! inside a namespace of its own (`net`).

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::attach::{Attach, Session};
use crate::console::{Pump, StderrWatch};
use crate::net::{self, NetBackend};
use crate::process::{code_and_signal, note, Proc, RuntimeDir};
use crate::{layout, Accel, Hypervisor, VmExit, VmOutcome, VmSpec, VmmError};

/// Environment variable naming the QEMU binary (default: `qemu-system-x86_64` in PATH).
pub const QEMU_ENV: &str = "UDOS_QEMU";
const QEMU_BIN: &str = "qemu-system-x86_64";

/// QEMU microvm with KVM or TCG.
#[derive(Clone, Debug)]
pub struct Qemu {
    binary: PathBuf,
    accel: Accel,
    net_backend: NetBackend,
}

/// Escapes a value for QEMU's `key=value,...` option syntax (a comma is doubled).
fn opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

impl Qemu {
    /// Finds QEMU through `UDOS_QEMU` or `qemu-system-x86_64` in PATH.
    pub fn find(accel: Accel) -> Result<Qemu, VmmError> {
        if let Some(p) = std::env::var_os(QEMU_ENV) {
            let p = PathBuf::from(p);
            if p.is_file() {
                return Ok(Qemu::with_binary(p, accel));
            }
            return Err(VmmError::NotInstalled {
                what: "qemu",
                hint: format!("{QEMU_ENV}={} is not a file", p.display()),
            });
        }
        crate::find_in_path(QEMU_BIN)
            .map(|p| Qemu::with_binary(p, accel))
            .ok_or_else(|| VmmError::NotInstalled {
                what: "qemu",
                hint: format!(
                    "{QEMU_BIN} is not in PATH; install it (Debian: apt-get install qemu-system-x86) or set {QEMU_ENV}"
                ),
            })
    }

    pub fn with_binary(binary: impl Into<PathBuf>, accel: Accel) -> Qemu {
        Qemu {
            binary: binary.into(),
            accel,
            net_backend: NetBackend::default(),
        }
    }

    /// The same QEMU with the guest's NIC on `backend` (default: slirp). The TAP
    /// backend is cloud-hypervisor's; QEMU offers it so it can be tested where
    /// cloud-hypervisor does not boot.
    pub fn with_net_backend(mut self, backend: NetBackend) -> Qemu {
        self.net_backend = backend;
        self
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The kernel command line QEMU is given. Under TCG the guest's TSC runs at the
    /// host's TSC rate, but the kernel's calibration against the emulated PIT fails
    /// when the host is busy (`tsc: Unable to calibrate against PIT`), after which
    /// the boot hangs; so the rate is passed in (`tsc_early_khz=`) and the TSC is
    /// trusted (`tsc=reliable`), unless the caller already set either.
    pub fn effective_cmdline(&self, cmdline: &str) -> String {
        let mut out = cmdline.trim().to_string();
        if self.accel == Accel::Tcg {
            let has = |key: &str| cmdline.split_whitespace().any(|w| w.starts_with(key));
            if !has("tsc_early_khz=") && !has("tsc=") {
                if let Some(khz) = host_tsc_khz() {
                    out.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
                }
            }
        }
        out
    }

    /// The full QEMU argument list for `spec`.
    pub fn args(&self, spec: &VmSpec) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
        push(&["-name", &opt_escape(&spec.name)]);
        push(&["-M", "microvm"]);
        match self.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
        }
        push(&["-smp", &spec.cpus.to_string()]);
        push(&["-m", &format!("{}M", spec.memory_mib)]);
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
        ]);
        a.push("-kernel".into());
        a.push(spec.kernel.clone().into_os_string());
        a.push("-initrd".into());
        a.push(spec.initramfs.clone().into_os_string());
        a.push("-append".into());
        a.push(self.effective_cmdline(&spec.cmdline).into());
        for (i, d) in spec.disks.iter().enumerate() {
            // Raw writes reach the host file on every guest write; `unsafe` only
            // drops the guest's flushes (the disks are scratch, and QEMU flushes when
            // it exits).
            let cache = if d.read_only { "writeback" } else { "unsafe" };
            let mut drive = OsString::from(format!("id=d{i},file="));
            drive.push(opt_escape(&d.path.to_string_lossy()));
            drive.push(format!(
                ",format=raw,if=none,readonly={},cache={cache}",
                if d.read_only { "on" } else { "off" }
            ));
            a.push("-drive".into());
            a.push(drive);
            a.push("-device".into());
            a.push(
                format!(
                    "virtio-blk-device,drive=d{i},serial={}",
                    opt_escape(&d.serial)
                )
                .into(),
            );
        }
        if let Some(network) = &spec.network {
            a.extend(
                network
                    .qemu_args(self.net_backend)
                    .into_iter()
                    .map(OsString::from),
            );
        }
        if let Some(port) = &spec.channel {
            a.extend(channel_args(
                port,
                &spec.runtime_dir.join(layout::CHANNEL_SOCKET),
            ));
        }
        a
    }
}

impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn has_network(&self) -> bool {
        true
    }

    fn has_channel(&self) -> bool {
        true
    }

    fn accel(&self) -> Accel {
        self.accel
    }

    fn run_until(&self, spec: VmSpec, stop: &AtomicBool) -> Result<VmOutcome, VmmError> {
        self.run_with(spec, stop, None)
    }

    fn run_attached(
        &self,
        spec: VmSpec,
        attach: Attach,
        stop: &AtomicBool,
    ) -> Result<VmOutcome, VmmError> {
        self.run_with(spec, stop, Some(attach))
    }
}

impl Qemu {
    /// Runs the VM; with `attach`, QEMU's serial input is a pipe the terminal's
    /// keystrokes are forwarded to, and its output is also copied to the terminal.
    fn run_with(
        &self,
        mut spec: VmSpec,
        stop: &AtomicBool,
        attach: Option<Attach>,
    ) -> Result<VmOutcome, VmmError> {
        spec.validate_with_network()?;
        let rt = RuntimeDir::prepare(&spec.runtime_dir)?;
        // Before QEMU starts: its namespace must be connected when the guest boots.
        let network = match &spec.network {
            Some(n) => Some(net::Attached::start(n, &rt.path, self.net_backend)?),
            None => None,
        };
        let netns = network.as_ref().map(net::Attached::netns_fd);
        let console_log = rt.file(layout::CONSOLE_LOG);
        let stderr_path = rt.file(layout::HYPERVISOR_STDERR);
        let log = rt.create(layout::CONSOLE_LOG)?;
        let stderr_file = rt.create(layout::HYPERVISOR_STDERR)?;
        let args = self.args(&spec);
        tracing::debug!(vm = spec.name, accel = %self.accel, "starting qemu");

        let attached = attach.is_some();
        let boot_started = Instant::now();
        let mut proc = Proc::spawn(&self.binary, &args, &rt.path, |c| {
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
            if attached {
                c.stdin(Stdio::piped());
            }
            if let Some(fd) = netns {
                // SAFETY: the closure only calls setns(2), async-signal-safe, on a
                // descriptor `network` keeps open until QEMU is reaped.
                unsafe {
                    std::os::unix::process::CommandExt::pre_exec(c, move || {
                        net::enter_in_child(fd)
                    });
                }
            }
        })?;
        let pid = proc.pid();
        let io_err = |what: &str, e: std::io::Error| VmmError::io(what, &self.binary, e);
        let stdout = proc.take_stdout().expect("stdout is piped");
        let stderr = proc.take_stderr().expect("stderr is piped");
        let (console, session): (Box<dyn Read + Send>, Option<Session>) = match attach {
            None => (Box::new(stdout), None),
            Some(a) => {
                let stdin = proc.take_stdin().expect("stdin is piped");
                let (session, console) = Session::start(a, stdin, stdout)
                    .map_err(|e| io_err("attaching the terminal to", e))?;
                (console, Some(session))
            }
        };
        let pump = Pump::start(
            &spec.name,
            console,
            Some(log),
            spec.console.take(),
            spec.log_filter.clone(),
        )
        .map_err(|e| io_err("starting the console reader for", e))?;
        let watch = StderrWatch::start(stderr, stderr_file)
            .map_err(|e| io_err("starting the stderr reader for", e))?;

        let deadline = boot_started + spec.timeout;
        let mut timed_out = false;
        let mut stopped = false;
        let mut fatal = None;
        let status = loop {
            if let Some(s) = proc.try_wait().map_err(|e| io_err("waiting for", e))? {
                break s;
            }
            if stop.load(Ordering::Acquire) || session.as_ref().is_some_and(Session::detached) {
                stopped = true;
                break proc.kill().map_err(|e| io_err("killing", e))?;
            }
            if let Some(f) = watch.fatal() {
                fatal = Some(f);
                break proc.kill().map_err(|e| io_err("killing", e))?;
            }
            let now = Instant::now();
            if now >= deadline {
                timed_out = true;
                break proc.kill().map_err(|e| io_err("killing", e))?;
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
        };
        let wall = boot_started.elapsed();
        let first_line = pump.finish(Duration::from_secs(10));
        let stderr_tail = watch.finish(Duration::from_secs(5));
        drop(session);
        let (code, signal) = code_and_signal(status);

        let exit = if timed_out {
            note(
                &stderr_path,
                &format!("killed after the {:?} timeout", spec.timeout),
            );
            VmExit::TimedOut
        } else if stopped {
            note(&stderr_path, "killed: the caller stopped the VM");
            VmExit::Stopped
        } else if let Some(detail) = fatal {
            note(
                &stderr_path,
                &format!("killed after a fatal error: {detail}"),
            );
            VmExit::Crashed {
                code,
                signal,
                detail,
            }
        } else if status.success() && !stderr_tail.contains("terminating on signal") {
            VmExit::PoweredOff
        } else {
            VmExit::Crashed {
                code,
                signal,
                detail: stderr_tail,
            }
        };
        tracing::debug!(vm = spec.name, %exit, ?wall, "qemu finished");
        // pasta and the namespace go only after QEMU is reaped.
        if let Some(network) = network {
            network.finish(&stderr_path);
        }
        Ok(VmOutcome {
            exit,
            console_log,
            hypervisor_log: stderr_path,
            boot_started,
            wall,
            first_console_line_after: first_line.map(|t| t.saturating_duration_since(boot_started)),
            pid,
        })
    }
}

/// Job mode's channel: a virtio-console port named `port` on a virtio-serial bus
/// (virtio-mmio, as microvm has no PCI), backed by a Unix socket QEMU listens on
/// without waiting for the host to connect.
fn channel_args(port: &str, socket: &Path) -> Vec<OsString> {
    let mut chardev = OsString::from("socket,id=udosctl,server=on,wait=off,path=");
    chardev.push(opt_escape(&socket.to_string_lossy()));
    vec![
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        chardev,
        "-device".into(),
        format!("virtserialport,chardev=udosctl,name={}", opt_escape(port)).into(),
    ]
}

/// The host's TSC rate in kHz (measured once against the monotonic clock), when the
/// host has an invariant TSC. Under QEMU TCG the guest's TSC is the host's.
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: OnceLock<Option<u64>> = OnceLock::new();
    *KHZ.get_or_init(measure_tsc_khz)
}

#[cfg(target_arch = "x86_64")]
fn measure_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    if !(has("constant_tsc") && has("nonstop_tsc")) {
        return None;
    }
    let rdtsc = || {
        // SAFETY: RDTSC is available on every x86_64 CPU and has no memory effects.
        #[allow(unused_unsafe)]
        unsafe {
            core::arch::x86_64::_rdtsc()
        }
    };
    // Median of three 20 ms samples; a preemption between the paired reads only
    // costs a few microseconds of the 20 ms.
    let mut samples: Vec<u64> = (0..3)
        .map(|_| {
            let (t0, c0) = (Instant::now(), rdtsc());
            std::thread::sleep(Duration::from_millis(20));
            let (c1, t1) = (rdtsc(), Instant::now());
            let ns = t1.duration_since(t0).as_nanos().max(1) as u64;
            c1.saturating_sub(c0).saturating_mul(1_000_000) / ns
        })
        .collect();
    samples.sort_unstable();
    let khz = samples[1];
    (100_000..20_000_000).contains(&khz).then_some(khz)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc_khz() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Disk;

    #[test]
    fn args_have_disks_with_serials_and_escaped_paths() {
        let q = Qemu::with_binary("/usr/bin/qemu-system-x86_64", Accel::Kvm);
        let mut spec = VmSpec::new("vm", "/k", "/i", "/rt");
        spec.cmdline = "console=ttyS0 quiet".into();
        spec.disks = vec![
            Disk::read_only("/a,b.img", "udos-l0"),
            Disk::writable("/up.img", "udos-upper"),
        ];
        spec.cpus = 2;
        spec.memory_mib = 256;
        let a: Vec<String> = q
            .args(&spec)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let joined = a.join(" ");
        assert!(joined.contains("-M microvm -accel kvm -cpu host -smp 2 -m 256M"));
        assert!(joined.contains(
            "-drive id=d0,file=/a,,b.img,format=raw,if=none,readonly=on,cache=writeback -device virtio-blk-device,drive=d0,serial=udos-l0"
        ));
        assert!(joined.contains("readonly=off,cache=unsafe"));
        assert!(joined.contains("serial=udos-upper"));
        let i = a.iter().position(|s| s == "-append").unwrap();
        assert_eq!(a[i + 1], "console=ttyS0 quiet");
    }

    #[test]
    fn a_channel_is_a_named_virtio_console_port_on_a_socket() {
        let q = Qemu::with_binary("/usr/bin/qemu-system-x86_64", Accel::Tcg);
        let mut spec = VmSpec::new("vm", "/k", "/i", "/rt,x");
        let joined = |spec: &VmSpec| {
            q.args(spec)
                .into_iter()
                .map(|s| s.into_string().unwrap())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert!(!joined(&spec).contains("virtio-serial"));
        spec.channel = Some("udos.ctl".into());
        assert!(joined(&spec).contains(
            "-device virtio-serial-device -chardev socket,id=udosctl,server=on,wait=off,path=/rt,,x/ctl.sock -device virtserialport,chardev=udosctl,name=udos.ctl"
        ));
    }

    #[test]
    fn tcg_pins_the_tsc_rate_unless_given() {
        let q = Qemu::with_binary("qemu", Accel::Tcg);
        let c = q.effective_cmdline("console=ttyS0");
        if host_tsc_khz().is_some() {
            assert!(
                c.contains("tsc_early_khz=") && c.ends_with("tsc=reliable"),
                "{c}"
            );
        }
        assert_eq!(
            q.effective_cmdline("console=ttyS0 tsc=unstable"),
            "console=ttyS0 tsc=unstable"
        );
    }

    #[test]
    fn tsc_rate_is_plausible() {
        if let Some(khz) = host_tsc_khz() {
            // Compare with the kernel's figure when it is shown.
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
            if let Some(mhz) = cpuinfo
                .lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
            {
                let ratio = khz as f64 / (mhz * 1000.0);
                println!("measured {khz} kHz, cpuinfo {mhz} MHz");
                // Frequency scaling can make cpuinfo differ; only catch gross errors.
                assert!((0.3..3.0).contains(&ratio), "{khz} kHz vs {mhz} MHz");
            }
        }
    }
}
