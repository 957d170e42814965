//! Hypervisor drivers for udos step VMs.
//!
//! One trait, [`Hypervisor`], with two real implementations:
//!
//! - [`Qemu`]: `qemu-system-x86_64 -M microvm`, with KVM or TCG (software emulation);
//! - [`CloudHypervisor`]: `cloud-hypervisor` driven through its REST API on a Unix socket.
//!
//! [`select`] picks one for `--hypervisor auto|cloud-hypervisor|qemu`, after checking
//! with a real probe boot whether `/dev/kvm` can run our kernel at all ([`kvm_works`]).
//!
//! Every VM gets its own runtime directory ([`VmSpec::runtime_dir`], layout in [`layout`]),
//! so VMs run in parallel. [`Hypervisor::run`] boots, streams the console line by line,
//! waits for the guest to stop or for the timeout, and always reaps the hypervisor
//! process (its whole process group) before returning, also when the caller unwinds.
//! See `docs/hypervisors.md`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

mod attach;
mod cloud_hypervisor;
mod console;
mod detect;
mod http;
mod net;
mod net_tap;
mod process;
mod qemu;

pub use attach::{Attach, RawMode, ESCAPE};
pub use cloud_hypervisor::{ApiResponse, CloudHypervisor, VmmHandle, CLOUD_HYPERVISOR_ENV};
pub use console::CONSOLE_LOG_MAX;
pub use detect::{
    cache_path, choose, kvm_works, probe_kvm, probe_kvm_with, select, KvmVerdict, ProbeInput,
    Selection, PROBE_MARKER, PROBE_TIMEOUT, PROBE_TIMEOUT_ENV,
};
pub use net::{layout as net_layout, NetBackend, Network, PASTA_ENV, PASTA_READY_TIMEOUT};
pub use net_tap::{COMMAND_TIMEOUT as NET_COMMAND_TIMEOUT, GUEST_MAC, TAP_NAME};
pub use qemu::{host_tsc_khz, Qemu, QEMU_ENV};

/// A virtio-blk serial is at most this many bytes (`VIRTIO_BLK_ID_BYTES`).
pub const MAX_SERIAL_LEN: usize = 20;

/// File names inside [`VmSpec::runtime_dir`].
pub mod layout {
    /// Everything the guest wrote on its serial console (ttyS0), raw bytes.
    pub const CONSOLE_LOG: &str = "console.log";
    /// The hypervisor's own stdout and stderr.
    pub const HYPERVISOR_STDERR: &str = "hypervisor.stderr";
    /// cloud-hypervisor's `--log-file`.
    pub const CH_LOG: &str = "cloud-hypervisor.log";
    /// cloud-hypervisor's API socket.
    pub const API_SOCKET: &str = "api.sock";
    /// The hypervisor's pid while it runs (removed once it is reaped).
    pub const PID_FILE: &str = "hypervisor.pid";
    /// The full command line the hypervisor was started with, one argument per line.
    pub const COMMAND: &str = "hypervisor.cmd";
    /// cloud-hypervisor: the JSON body sent to `vm.create`.
    pub const VM_CONFIG: &str = "vm-config.json";
    /// Held (flock) for the whole run: a second VM on the same directory is refused.
    pub const LOCK: &str = ".lock";
    /// The job channel's socket ([`crate::VmSpec::channel`]): the hypervisor listens,
    /// the host connects.
    pub const CHANNEL_SOCKET: &str = "ctl.sock";
}

/// A raw disk image given to the guest as a virtio-blk device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    pub read_only: bool,
    /// The virtio-blk serial the guest finds the disk by (`/sys/block/vd*/serial`);
    /// printable ASCII, at most [`MAX_SERIAL_LEN`] bytes.
    pub serial: String,
}

impl Disk {
    pub fn read_only(path: impl Into<PathBuf>, serial: impl Into<String>) -> Self {
        Disk {
            path: path.into(),
            read_only: true,
            serial: serial.into(),
        }
    }

    pub fn writable(path: impl Into<PathBuf>, serial: impl Into<String>) -> Self {
        Disk {
            path: path.into(),
            read_only: false,
            serial: serial.into(),
        }
    }
}

/// Called once per console line (without the line ending), live, from a helper thread.
pub type ConsoleCallback = Box<dyn FnMut(&str) + Send>;

/// Rewrites each console line before it is kept in `console.log` (masking secrets).
pub type LineFilter = std::sync::Arc<dyn Fn(&str) -> String + Send + Sync>;

/// What to boot.
pub struct VmSpec {
    /// A label for logs and the hypervisor's process title.
    pub name: String,
    /// The guest kernel. cloud-hypervisor needs an ELF `vmlinux` (PVH entry); QEMU
    /// microvm boots a `vmlinux` directly (PVH) and a bzImage through its firmware.
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Kernel command line. It should contain `console=ttyS0` (the console is the
    /// first serial port on both hypervisors) and preferably `panic=-1`, so a kernel
    /// panic ends the VM instead of waiting for the timeout.
    pub cmdline: String,
    pub disks: Vec<Disk>,
    pub cpus: u32,
    pub memory_mib: u64,
    /// Unique per VM: sockets, logs and the pid file live here (see [`layout`]).
    /// Created if missing.
    pub runtime_dir: PathBuf,
    /// The hypervisor is killed when the VM runs longer than this.
    pub timeout: Duration,
    /// Called per console line, live; the log is also kept in
    /// `runtime_dir/console.log`, bounded ([`CONSOLE_LOG_MAX`]: its head and its tail).
    pub console: Option<ConsoleCallback>,
    /// When set, `console.log` keeps each line as this function returns it, not the
    /// raw bytes (both hypervisors' consoles go through the same reader).
    pub log_filter: Option<LineFilter>,
    /// A virtio-net NIC with NAT egress on a network of the VM's own; `None`: no NIC.
    /// QEMU and cloud-hypervisor implement it; a driver that does not refuses a spec
    /// that asks for one.
    pub network: Option<Network>,
    /// Job mode's host channel: a virtio-console port of this name, backed by the
    /// Unix socket [`layout::CHANNEL_SOCKET`] in `runtime_dir` that the hypervisor
    /// listens on. Only QEMU implements it; other drivers refuse a spec that asks.
    pub channel: Option<String>,
}

impl fmt::Debug for VmSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmSpec")
            .field("name", &self.name)
            .field("kernel", &self.kernel)
            .field("initramfs", &self.initramfs)
            .field("cmdline", &self.cmdline)
            .field("disks", &self.disks)
            .field("cpus", &self.cpus)
            .field("memory_mib", &self.memory_mib)
            .field("runtime_dir", &self.runtime_dir)
            .field("timeout", &self.timeout)
            .field("console", &self.console.as_ref().map(|_| "callback"))
            .field("log_filter", &self.log_filter.as_ref().map(|_| "filter"))
            .field("network", &self.network)
            .field("channel", &self.channel)
            .finish()
    }
}

impl VmSpec {
    /// A spec with 1 vCPU, 512 MiB, `console=ttyS0 panic=-1`, no disks, a 10-minute
    /// timeout, no console callback and no network.
    pub fn new(
        name: impl Into<String>,
        kernel: impl Into<PathBuf>,
        initramfs: impl Into<PathBuf>,
        runtime_dir: impl Into<PathBuf>,
    ) -> Self {
        VmSpec {
            name: name.into(),
            kernel: kernel.into(),
            initramfs: initramfs.into(),
            cmdline: "console=ttyS0 panic=-1".into(),
            disks: Vec::new(),
            cpus: 1,
            memory_mib: 512,
            runtime_dir: runtime_dir.into(),
            timeout: Duration::from_secs(600),
            console: None,
            log_filter: None,
            network: None,
            channel: None,
        }
    }

    /// Checks what both drivers need: files exist, serials fit and are unique, sizes
    /// are sane; and refuses a [`VmSpec::network`] ([`VmmError::Unsupported`]), so a
    /// driver that does not implement networking never boots a VM without the network
    /// its caller asked for. Drivers that do call [`VmSpec::validate_with_network`].
    pub fn validate(&self) -> Result<(), VmmError> {
        self.validate_with_network()?;
        if self.network.is_some() {
            return Err(VmmError::Unsupported {
                what: "a network for the VM",
                hint: "this driver gives VMs no network (--hypervisor qemu or cloud-hypervisor do); see docs/hypervisors.md".into(),
            });
        }
        self.refuse_channel()
    }

    /// Refuses a [`VmSpec::channel`] ([`VmmError::Unsupported`]): for drivers without
    /// one, whatever they say about the network.
    pub fn refuse_channel(&self) -> Result<(), VmmError> {
        if self.channel.is_some() {
            return Err(VmmError::Unsupported {
                what: "a job channel (udos run --per job)",
                hint: "only the qemu driver has a socket-backed virtio-console port (--hypervisor qemu); see docs/job-mode.md".into(),
            });
        }
        Ok(())
    }

    /// [`VmSpec::validate`] for drivers that implement [`VmSpec::network`]: also checks
    /// the network's addresses and ports.
    pub fn validate_with_network(&self) -> Result<(), VmmError> {
        let bad = |reason: String| {
            Err(VmmError::InvalidSpec {
                name: self.name.clone(),
                reason,
            })
        };
        if self.cpus == 0 || self.cpus > 254 {
            return bad(format!("cpus must be 1..=254, not {}", self.cpus));
        }
        if self.memory_mib < 64 {
            return bad(format!(
                "memory_mib must be at least 64, not {}",
                self.memory_mib
            ));
        }
        if self.timeout.is_zero() {
            return bad("timeout must not be zero".into());
        }
        for (what, p) in [("kernel", &self.kernel), ("initramfs", &self.initramfs)] {
            if !p.is_file() {
                return bad(format!("{what} {} is not a file", p.display()));
            }
        }
        if self.cmdline.contains('\n') || self.cmdline.contains('\0') {
            return bad("the kernel command line must be a single line".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for d in &self.disks {
            if d.serial.is_empty() || d.serial.len() > MAX_SERIAL_LEN {
                return bad(format!(
                    "disk serial {:?} must be 1..={MAX_SERIAL_LEN} bytes (virtio-blk limit)",
                    d.serial
                ));
            }
            if !d.serial.bytes().all(|b| b.is_ascii_graphic()) {
                return bad(format!(
                    "disk serial {:?} must be printable ASCII without spaces",
                    d.serial
                ));
            }
            if !seen.insert(d.serial.as_str()) {
                return bad(format!("disk serial {:?} is used twice", d.serial));
            }
            if !d.path.is_file() {
                return bad(format!("disk {} is not a file", d.path.display()));
            }
        }
        if let Some(net) = &self.network {
            net.check().map_err(|reason| VmmError::InvalidSpec {
                name: self.name.clone(),
                reason: format!("network: {reason}"),
            })?;
        }
        Ok(())
    }

    /// `runtime_dir/console.log`.
    pub fn console_log(&self) -> PathBuf {
        self.runtime_dir.join(layout::CONSOLE_LOG)
    }
}

/// How the guest's vCPUs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation (no `/dev/kvm` needed; ~10-50x slower CPU).
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// How the VM ended. The guest's own report (its sealed output) is what says whether
/// a step succeeded: cloud-hypervisor also exits with code 0 when a vCPU crashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The hypervisor exited by itself with code 0 (the guest powered off, rebooted
    /// under `-no-reboot`, or — on cloud-hypervisor — its vCPU died).
    PoweredOff,
    /// The hypervisor failed: a non-zero exit code, death by a signal it did not
    /// choose, or a fatal error it reported (e.g. `KVM internal error`).
    Crashed {
        code: Option<i32>,
        signal: Option<i32>,
        /// The tail of the hypervisor's stderr / log, or what was detected.
        detail: String,
    },
    /// Killed after [`VmSpec::timeout`].
    TimedOut,
    /// Killed because the caller asked ([`Hypervisor::run_until`]'s `stop` flag).
    Stopped,
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::PoweredOff => f.write_str("powered off"),
            VmExit::TimedOut => f.write_str("timed out"),
            VmExit::Stopped => f.write_str("stopped"),
            VmExit::Crashed {
                code,
                signal,
                detail,
            } => {
                f.write_str("crashed")?;
                if let Some(c) = code {
                    write!(f, " (exit code {c})")?;
                }
                if let Some(s) = signal {
                    write!(f, " (signal {s})")?;
                }
                if !detail.is_empty() {
                    write!(f, ": {}", detail.trim())?;
                }
                Ok(())
            }
        }
    }
}

/// What [`Hypervisor::run`] observed.
#[derive(Clone, Debug)]
pub struct VmOutcome {
    pub exit: VmExit,
    /// `runtime_dir/console.log`.
    pub console_log: PathBuf,
    /// The hypervisor's own output (`hypervisor.stderr`, or cloud-hypervisor's log file).
    pub hypervisor_log: PathBuf,
    /// When the hypervisor process was started.
    pub boot_started: Instant,
    /// From start to the hypervisor being reaped.
    pub wall: Duration,
    /// From start to the first complete console line.
    pub first_console_line_after: Option<Duration>,
    /// The hypervisor's pid (already reaped).
    pub pid: u32,
}

/// A hypervisor that can run step VMs.
pub trait Hypervisor: Send + Sync {
    /// `"qemu"` or `"cloud-hypervisor"`.
    fn name(&self) -> &'static str;
    /// How vCPUs run.
    fn accel(&self) -> Accel;
    /// Whether it gives a VM the network its spec asks for (`VmSpec::network`); one
    /// that does not would run the VM without a NIC.
    fn has_network(&self) -> bool {
        false
    }
    /// Whether it gives a VM the host channel its spec asks for (`VmSpec::channel`,
    /// `udos run --per job`); one that does not refuses such a spec.
    fn has_channel(&self) -> bool {
        false
    }
    /// Human-readable, e.g. `qemu (tcg)`.
    fn describe(&self) -> String {
        format!("{} ({})", self.name(), self.accel())
    }
    /// Boots, streams the console, waits for the hypervisor to exit or the timeout,
    /// and always reaps the hypervisor (and its process group) before returning.
    /// `Err` only when the VM could not be started at all.
    fn run(&self, spec: VmSpec) -> Result<VmOutcome, VmmError> {
        self.run_until(spec, &AtomicBool::new(false))
    }
    /// [`Hypervisor::run`] that can also be ended from another thread: once `stop` is
    /// true (checked every few milliseconds) the hypervisor is killed and reaped, and
    /// the outcome is [`VmExit::Stopped`]. For VMs that run until they are told to
    /// stop (services).
    fn run_until(&self, spec: VmSpec, stop: &AtomicBool) -> Result<VmOutcome, VmmError>;
    /// [`Hypervisor::run_until`] with a terminal attached to the guest's serial console
    /// ([`Attach`]): the terminal is in raw mode while the VM runs (its settings come
    /// back on every path), keystrokes go to the guest, the guest's output comes back
    /// as it is written (and is kept in `console.log` as usual). Reading
    /// [`Attach::escape`] stops the VM ([`VmExit::Stopped`]). Drivers that cannot
    /// attach refuse with [`VmmError::Unsupported`].
    fn run_attached(
        &self,
        spec: VmSpec,
        attach: Attach,
        stop: &AtomicBool,
    ) -> Result<VmOutcome, VmmError> {
        let _ = (spec, attach, stop);
        Err(VmmError::Unsupported {
            what: "an attached console",
            hint: format!(
                "{} cannot attach a terminal yet; use --hypervisor qemu",
                self.name()
            ),
        })
    }
}

/// `--hypervisor auto|cloud-hypervisor|qemu`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HypervisorChoice {
    #[default]
    Auto,
    CloudHypervisor,
    Qemu,
}

impl FromStr for HypervisorChoice {
    type Err = VmmError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(HypervisorChoice::Auto),
            "cloud-hypervisor" | "ch" => Ok(HypervisorChoice::CloudHypervisor),
            "qemu" => Ok(HypervisorChoice::Qemu),
            other => Err(VmmError::UnknownChoice(other.to_string())),
        }
    }
}

impl fmt::Display for HypervisorChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HypervisorChoice::Auto => "auto",
            HypervisorChoice::CloudHypervisor => "cloud-hypervisor",
            HypervisorChoice::Qemu => "qemu",
        })
    }
}

/// Why a VM could not be run (as opposed to a VM that ran and ended badly, which is a
/// [`VmExit`]).
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("invalid VM spec for {name:?}: {reason}")]
    InvalidSpec { name: String, reason: String },

    #[error("unknown hypervisor {0:?} (expected auto, cloud-hypervisor or qemu)")]
    UnknownChoice(String),

    #[error("{what} not found: {hint}")]
    NotInstalled { what: &'static str, hint: String },

    #[error("{what} is not supported by this hypervisor driver: {hint}")]
    Unsupported { what: &'static str, hint: String },

    #[error("cannot set up the VM's network: {detail}")]
    Network { detail: String },

    #[error("{what} needs a working KVM, which this host does not have: {reason}")]
    KvmUnavailable { what: &'static str, reason: String },

    #[error("cannot start {} {args}: {source}", binary.display())]
    Spawn {
        binary: PathBuf,
        args: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{context} {}: {source}", path.display())]
    Io {
        context: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("runtime directory {} is already in use by another VM", path.display())]
    RuntimeDirBusy { path: PathBuf },

    #[error("{} exited before the VM was started ({status}): {detail}", binary.display())]
    EarlyExit {
        binary: PathBuf,
        status: String,
        detail: String,
    },

    #[error("cloud-hypervisor API {method} {endpoint} failed{}: {detail}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Api {
        method: &'static str,
        endpoint: String,
        status: Option<u16>,
        detail: String,
    },
}

impl VmmError {
    pub(crate) fn io(context: impl Into<String>, path: &Path, source: std::io::Error) -> Self {
        VmmError::Io {
            context: context.into(),
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Looks `name` up in `PATH`; returns the first executable file.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_parses() {
        assert_eq!(
            "auto".parse::<HypervisorChoice>().unwrap(),
            HypervisorChoice::Auto
        );
        assert_eq!(
            "cloud-hypervisor".parse::<HypervisorChoice>().unwrap(),
            HypervisorChoice::CloudHypervisor
        );
        assert_eq!(
            "qemu".parse::<HypervisorChoice>().unwrap(),
            HypervisorChoice::Qemu
        );
        assert!("firecracker".parse::<HypervisorChoice>().is_err());
        assert_eq!(
            HypervisorChoice::CloudHypervisor.to_string(),
            "cloud-hypervisor"
        );
    }

    #[test]
    fn validate_rejects_bad_serials() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let mut spec = VmSpec::new("t", &f, &f, dir.path().join("rt"));
        spec.validate().unwrap();
        spec.disks
            .push(Disk::read_only(&f, "a-serial-that-is-too-long"));
        assert!(spec.validate().unwrap_err().to_string().contains("1..=20"));
        spec.disks = vec![Disk::read_only(&f, "x"), Disk::writable(&f, "x")];
        assert!(spec.validate().unwrap_err().to_string().contains("twice"));
        spec.disks = vec![Disk::read_only(&f, "has space")];
        assert!(spec.validate().is_err());
        spec.disks.clear();
        spec.channel = Some("udos.ctl".into());
        assert!(spec
            .validate()
            .unwrap_err()
            .to_string()
            .contains("job channel"));
        spec.validate_with_network().unwrap();
        assert!(spec.refuse_channel().is_err());
        spec.channel = None;
        spec.disks = vec![Disk::read_only(dir.path().join("missing"), "m")];
        assert!(spec
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not a file"));
    }
}
