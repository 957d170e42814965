//! cloud-hypervisor driver, through its REST API on `runtime_dir/api.sock`:
//! `vmm.ping` → `vm.create` → `vm.boot` → wait for the process to exit by itself (it
//! does when the guest powers off, and also when a vCPU dies, both with code 0) → on
//! timeout `vm.shutdown`, `vmm.shutdown`, SIGKILL.
//!
//! Every API call is bounded by the VM's deadline and by the caller's stop flag
//! (`http::Bound`), so a VMM that stops answering cannot stretch a run past its
//! timeout. The serial console goes through a FIFO (`serial.fifo`, cloud-hypervisor's
//! `File` mode) into the same bounded console pump QEMU uses. cloud-hypervisor's log
//! is watched for the lines that say the guest is dead although the process lives on
//! or exits 0 ([`FATAL_LOG`]).
//!
//! A network is the TAP backend (`net_tap`): the VMM runs inside the VM's namespace,
//! where the TAP already exists, and `vm.create` names it.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::console::{Pump, SerialFifo};
use crate::http::{self, Bound, Failure};
use crate::net::{self, NetBackend};
use crate::process::{code_and_signal, file_tail, note, Proc, RuntimeDir};
use crate::{layout, Accel, Hypervisor, VmExit, VmOutcome, VmSpec, VmmError};

/// Environment variable naming the cloud-hypervisor binary (default:
/// `cloud-hypervisor` in PATH).
pub const CLOUD_HYPERVISOR_ENV: &str = "UDOS_CLOUD_HYPERVISOR";
const CH_BIN: &str = "cloud-hypervisor";
const API: &str = "/api/v1/";
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// The most one API call may take (calls in a run are also bounded by the VM's
/// deadline). cloud-hypervisor answers in milliseconds; `vm.create` and `vm.boot`
/// allocate guest memory and load the kernel, which takes longer on a busy host.
const API_TIMEOUT: Duration = Duration::from_secs(30);
/// From start to the API answering `vmm.ping`, this call included.
const SOCKET_WAIT: Duration = Duration::from_secs(10);
/// After a timeout: how long `vm.shutdown` + `vmm.shutdown` get before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// One API call while stopping: a VMM that needs longer to answer is hung, and a hung
/// VMM is killed rather than waited for.
const STOP_CALL: Duration = Duration::from_secs(1);
/// The lock cloud-hypervisor takes next to its API socket (`<socket>.lock`); it
/// leaves the file behind.
pub(crate) const API_SOCKET_LOCK: &str = "api.sock.lock";
/// The FIFO the guest's serial port is written into.
pub(crate) const SERIAL_FIFO: &str = "serial.fifo";
/// Lines of cloud-hypervisor's log that mean the guest is dead: a vCPU error (the
/// process then exits with code 0, like a power-off), or a reset, which
/// cloud-hypervisor answers by booting the guest again. udos-init never reboots, so a
/// reset is a kernel panic (`panic=-1`) or a triple fault, and a second boot would
/// run the step again. Either ends the VM as [`VmExit::Crashed`].
pub(crate) const FATAL_LOG: &[&str] = &[
    "VCPU generated error",
    "vCPU thread panicked",
    "Guest likely triple-faulted",
    "VM reset event",
];
/// How much of the log from the fatal line on goes into the crash detail.
const FATAL_DETAIL: usize = 2048;

/// cloud-hypervisor (always KVM).
#[derive(Clone, Debug)]
pub struct CloudHypervisor {
    binary: PathBuf,
}

/// An API answer with a 2xx status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: String,
}

impl CloudHypervisor {
    /// Finds cloud-hypervisor through `UDOS_CLOUD_HYPERVISOR` or PATH.
    pub fn find() -> Result<CloudHypervisor, VmmError> {
        if let Some(p) = std::env::var_os(CLOUD_HYPERVISOR_ENV) {
            let p = PathBuf::from(p);
            if p.is_file() {
                return Ok(CloudHypervisor::with_binary(p));
            }
            return Err(VmmError::NotInstalled {
                what: "cloud-hypervisor",
                hint: format!("{CLOUD_HYPERVISOR_ENV}={} is not a file", p.display()),
            });
        }
        crate::find_in_path(CH_BIN)
            .map(CloudHypervisor::with_binary)
            .ok_or_else(|| VmmError::NotInstalled {
                what: "cloud-hypervisor",
                hint: format!(
                    "no `{CH_BIN}` in PATH. It is not packaged by Debian: build it from \
                     its source (cargo build --release in a cloud-hypervisor checkout) and \
                     put the binary in PATH, or set {CLOUD_HYPERVISOR_ENV}=/path/to/cloud-hypervisor; \
                     or use --hypervisor qemu"
                ),
            })
    }

    pub fn with_binary(binary: impl Into<PathBuf>) -> CloudHypervisor {
        CloudHypervisor {
            binary: binary.into(),
        }
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The `vm.create` body for `spec`, with the serial console written to
    /// `serial_file`. Field names follow cloud-hypervisor's `VmConfig`
    /// (vmm/src/vm_config.rs): `memory.size` is in bytes; `console` defaults to `Tty`
    /// and `serial` to `Null` when omitted, so both are set.
    pub fn vm_config(spec: &VmSpec, serial_file: &Path) -> Value {
        let disks: Vec<Value> = spec
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                json!({
                    "id": format!("udos-disk{i}"),
                    "path": d.path,
                    "readonly": d.read_only,
                    "serial": d.serial,
                    "image_type": "Raw",
                })
            })
            .collect();
        let mut config = json!({
            "payload": {
                "kernel": spec.kernel,
                "initramfs": spec.initramfs,
                "cmdline": spec.cmdline,
            },
            "cpus": { "boot_vcpus": spec.cpus, "max_vcpus": spec.cpus },
            "memory": { "size": spec.memory_mib * 1024 * 1024 },
            "disks": disks,
            "serial": { "mode": "File", "file": serial_file },
            "console": { "mode": "Off" },
            "rng": { "src": "/dev/urandom" },
        });
        if let Some(n) = &spec.network {
            config["net"] = json!([Self::net_config(n)]);
        }
        config
    }

    /// The guest's NIC on the namespace's TAP. `ip` and `mask` are the gateway's, which
    /// the TAP already has: releases that take no address as none are unaffected, and
    /// older ones, which put 192.168.249.1/24 on the TAP when none is given, re-set the
    /// same address (a no-op) instead of replacing the gateway.
    fn net_config(n: &crate::Network) -> Value {
        json!({
            "id": "udos-net0",
            "tap": crate::net_tap::TAP_NAME,
            "mac": crate::net_tap::GUEST_MAC,
            "ip": n.gateway.to_string(),
            "mask": n.netmask().to_string(),
        })
    }

    /// Starts a VMM (no VM yet) with its API socket in `runtime_dir`, and waits until
    /// it answers `vmm.ping` (at most 10 s). The directory is locked while the handle
    /// lives.
    pub fn start_vmm(&self, runtime_dir: &Path) -> Result<VmmHandle, VmmError> {
        let mut h = self.spawn(runtime_dir)?;
        h.wait_ready(Bound::within(SOCKET_WAIT, far_future(), None))?;
        Ok(h)
    }

    /// Starts the process; does not wait for its API.
    fn spawn(&self, runtime_dir: &Path) -> Result<VmmHandle, VmmError> {
        self.spawn_in(RuntimeDir::prepare(runtime_dir)?, None)
    }

    /// Starts the process in `rt`, inside the network namespace `netns` if given.
    fn spawn_in(&self, rt: RuntimeDir, netns: Option<RawFd>) -> Result<VmmHandle, VmmError> {
        let socket = rt.file(layout::API_SOCKET);
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(VmmError::InvalidSpec {
                name: rt.path.display().to_string(),
                reason: format!(
                    "the API socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter runtime_dir",
                    socket.display()
                ),
            });
        }
        let log = rt.file(layout::CH_LOG);
        let stderr = rt.create(layout::HYPERVISOR_STDERR)?;
        let stderr2 = stderr
            .try_clone()
            .map_err(|e| VmmError::io("duplicating", &rt.file(layout::HYPERVISOR_STDERR), e))?;
        let mut api_arg = OsString::from("path=");
        api_arg.push(&socket);
        let args: Vec<OsString> = vec![
            "--api-socket".into(),
            api_arg,
            "--log-file".into(),
            log.clone().into_os_string(),
            "-v".into(),
        ];
        let started = Instant::now();
        let proc = Proc::spawn(&self.binary, &args, &rt.path, |c| {
            c.stdout(Stdio::from(stderr)).stderr(Stdio::from(stderr2));
            if let Some(fd) = netns {
                // SAFETY: the closure only calls setns(2), async-signal-safe, on a
                // descriptor the caller's network keeps open until the VMM is reaped.
                unsafe {
                    std::os::unix::process::CommandExt::pre_exec(c, move || {
                        net::enter_in_child(fd)
                    });
                }
            }
        })?;
        Ok(VmmHandle {
            proc,
            socket,
            log,
            stderr: rt.file(layout::HYPERVISOR_STDERR),
            binary: self.binary.clone(),
            started,
            rt,
        })
    }
}

/// A deadline that does not bind (calls outside a run are bounded by their own limit).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

/// A running cloud-hypervisor VMM. Dropping it kills the process group and removes
/// the socket and its lock file.
pub struct VmmHandle {
    proc: Proc,
    socket: PathBuf,
    log: PathBuf,
    stderr: PathBuf,
    binary: PathBuf,
    started: Instant,
    rt: RuntimeDir,
}

impl VmmHandle {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// When the process was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    fn diagnostics(&self) -> String {
        let mut s = file_tail(&self.stderr, 2048);
        let log = file_tail(&self.log, 2048);
        if !log.is_empty() {
            if !s.is_empty() {
                s.push('\n');
            }
            s.push_str(&log);
        }
        s
    }

    fn api_error(
        &self,
        method: &'static str,
        endpoint: &str,
        f: Failure,
        waited: Duration,
    ) -> VmmError {
        let detail = match f {
            Failure::TimedOut => {
                format!("no answer within {waited:.1?}: cloud-hypervisor is not responding")
            }
            other => other.to_string(),
        };
        VmmError::Api {
            method,
            endpoint: endpoint.to_string(),
            status: None,
            detail,
        }
    }

    /// Waits for the API socket and a 2xx `vmm.ping`, within `bound`.
    fn wait_ready(&mut self, bound: Bound<'_>) -> Result<(), VmmError> {
        loop {
            if let Some(status) = self
                .proc
                .try_wait()
                .map_err(|e| VmmError::io("waiting for", &self.binary, e))?
            {
                return Err(VmmError::EarlyExit {
                    binary: self.binary.clone(),
                    status: status.to_string(),
                    detail: self.diagnostics(),
                });
            }
            if self.socket.exists() {
                match self.call_within("GET", "vmm.ping", None, bound) {
                    Ok(r) => {
                        tracing::debug!(pid = self.pid(), ping = r.body, "cloud-hypervisor is up");
                        return Ok(());
                    }
                    // Not listening yet (the socket file exists before `listen`).
                    Err(VmmError::Api { status: None, .. })
                        if Instant::now() < bound.deadline && !cancelled(bound) => {}
                    Err(e) => return Err(e),
                }
            } else if Instant::now() >= bound.deadline || cancelled(bound) {
                let expired = Instant::now() >= bound.deadline;
                return Err(VmmError::Api {
                    method: "GET",
                    endpoint: "vmm.ping".into(),
                    status: None,
                    detail: format!(
                        "the API socket {} did not appear{}; {}",
                        self.socket.display(),
                        if expired { " in time" } else { ": cancelled" },
                        self.diagnostics()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// One API call, bounded by [`API_TIMEOUT`]; a non-2xx answer is an error carrying
    /// the VMM's message.
    pub fn call(
        &self,
        method: &'static str,
        endpoint: &str,
        body: Option<&Value>,
    ) -> Result<ApiResponse, VmmError> {
        self.call_within(
            method,
            endpoint,
            body,
            Bound::within(API_TIMEOUT, far_future(), None),
        )
    }

    fn call_within(
        &self,
        method: &'static str,
        endpoint: &str,
        body: Option<&Value>,
        bound: Bound<'_>,
    ) -> Result<ApiResponse, VmmError> {
        let body_bytes = body.map(|b| b.to_string().into_bytes());
        let path = format!("{API}{endpoint}");
        let began = Instant::now();
        let r = http::request(&self.socket, method, &path, body_bytes.as_deref(), bound)
            .map_err(|f| self.api_error(method, endpoint, f, began.elapsed()))?;
        let text = String::from_utf8_lossy(&r.body).into_owned();
        if !(200..300).contains(&r.status) {
            return Err(VmmError::Api {
                method,
                endpoint: endpoint.to_string(),
                status: Some(r.status),
                detail: if text.trim().is_empty() {
                    self.diagnostics()
                } else {
                    text
                },
            });
        }
        Ok(ApiResponse {
            status: r.status,
            body: text,
        })
    }

    fn json(&self, endpoint: &str) -> Result<Value, VmmError> {
        let r = self.call("GET", endpoint, None)?;
        serde_json::from_str(&r.body).map_err(|e| VmmError::Api {
            method: "GET",
            endpoint: endpoint.to_string(),
            status: Some(r.status),
            detail: format!("invalid JSON ({e}): {}", r.body),
        })
    }

    /// `GET vmm.ping`: `{"version": ..., "pid": ..., ...}`.
    pub fn ping(&self) -> Result<Value, VmmError> {
        self.json("vmm.ping")
    }

    /// `PUT vm.create`.
    pub fn create(&self, config: &Value) -> Result<(), VmmError> {
        self.call("PUT", "vm.create", Some(config)).map(drop)
    }

    /// `PUT vm.boot`.
    pub fn boot(&self) -> Result<(), VmmError> {
        self.call("PUT", "vm.boot", None).map(drop)
    }

    /// `GET vm.info`.
    pub fn info(&self) -> Result<Value, VmmError> {
        self.json("vm.info")
    }

    /// `vm.info`'s `state`: `Created`, `Running`, `Shutdown`, `Paused` or `BreakPoint`.
    pub fn state(&self) -> Result<String, VmmError> {
        let info = self.info()?;
        Ok(info
            .get("state")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string())
    }

    /// `PUT vm.shutdown`.
    pub fn shutdown(&self) -> Result<(), VmmError> {
        self.call("PUT", "vm.shutdown", None).map(drop)
    }

    /// `PUT vm.delete`.
    pub fn delete(&self) -> Result<(), VmmError> {
        self.call("PUT", "vm.delete", None).map(drop)
    }

    /// `PUT vmm.shutdown`: the process exits.
    pub fn shutdown_vmm(&self) -> Result<(), VmmError> {
        self.call("PUT", "vmm.shutdown", None).map(drop)
    }

    /// Reaps the process if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, VmmError> {
        self.proc
            .try_wait()
            .map_err(|e| VmmError::io("waiting for", &self.binary, e))
    }

    /// Waits up to `limit` for the process to exit by itself.
    pub fn wait_for(&mut self, limit: Duration) -> Result<Option<ExitStatus>, VmmError> {
        self.proc
            .wait_for(limit)
            .map_err(|e| VmmError::io("waiting for", &self.binary, e))
    }

    /// SIGKILLs the process group and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus, VmmError> {
        self.proc
            .kill()
            .map_err(|e| VmmError::io("killing", &self.binary, e))
    }

    /// `vm.shutdown`, `vmm.shutdown`, then SIGKILL if the process is still there
    /// after `grace`. Each call gets at most 1 s; a VMM that does not answer one is
    /// killed at once. Errors the VMM answers with are ignored (the VM may be gone).
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus, VmmError> {
        self.stop_within(grace, None)
    }

    /// [`VmmHandle::stop`] that also gives up on the API as soon as `cancel` is set.
    fn stop_within(
        &mut self,
        grace: Duration,
        cancel: Option<&AtomicBool>,
    ) -> Result<ExitStatus, VmmError> {
        if let Some(s) = self.try_wait()? {
            return Ok(s);
        }
        let deadline = Instant::now() + grace;
        for endpoint in ["vm.shutdown", "vmm.shutdown"] {
            match self.call_within(
                "PUT",
                endpoint,
                None,
                Bound::within(STOP_CALL, deadline, cancel),
            ) {
                Ok(_) => {}
                Err(VmmError::Api {
                    status: None,
                    detail,
                    ..
                }) => {
                    note(&self.stderr, &format!("{endpoint}: {detail}; SIGKILL"));
                    return self.kill();
                }
                Err(e) => tracing::debug!("{endpoint}: {e}"),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if let Some(s) = self.wait_for(left)? {
            return Ok(s);
        }
        note(&self.stderr, "did not exit after vmm.shutdown; SIGKILL");
        self.kill()
    }
}

fn cancelled(bound: Bound<'_>) -> bool {
    bound.cancel.is_some_and(|c| c.load(Ordering::Acquire))
}

impl Drop for VmmHandle {
    fn drop(&mut self) {
        // `proc` kills the group when dropped unreaped.
        let _ = self.proc.kill();
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(self.rt.file(API_SOCKET_LOCK));
    }
}

/// Follows cloud-hypervisor's log (it appends; we read what is new each time) and
/// remembers where the first [`FATAL_LOG`] line starts.
struct LogWatch {
    path: PathBuf,
    file: Option<File>,
    offset: u64,
    partial: Vec<u8>,
    fatal_at: Option<u64>,
}

impl LogWatch {
    fn new(path: &Path) -> Self {
        LogWatch {
            path: path.to_path_buf(),
            file: None,
            offset: 0,
            partial: Vec::new(),
            fatal_at: None,
        }
    }

    /// Reads what was appended since the last call; true once a fatal line was seen.
    fn poll(&mut self) -> bool {
        if self.fatal_at.is_some() {
            return true;
        }
        if self.file.is_none() {
            self.file = File::open(&self.path).ok();
        }
        let Some(f) = self.file.as_mut() else {
            return false;
        };
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            for part in buf[..n].split_inclusive(|&b| b == b'\n') {
                let line_start = self.offset - self.partial.len() as u64;
                self.offset += part.len() as u64;
                self.partial.extend_from_slice(part);
                if part.ends_with(b"\n") || self.partial.len() >= 64 * 1024 {
                    let line = String::from_utf8_lossy(&self.partial);
                    let fatal = FATAL_LOG.iter().any(|m| line.contains(m));
                    self.partial.clear();
                    if fatal {
                        self.fatal_at = Some(line_start);
                        return true;
                    }
                }
            }
        }
    }

    /// The log from the fatal line on (at most [`FATAL_DETAIL`] bytes).
    fn detail(&self) -> Option<String> {
        let at = self.fatal_at?;
        let mut f = File::open(&self.path).ok()?;
        f.seek(SeekFrom::Start(at)).ok()?;
        let mut bytes = Vec::new();
        f.take(FATAL_DETAIL as u64).read_to_end(&mut bytes).ok()?;
        Some(String::from_utf8_lossy(&bytes).trim().to_string())
    }
}

/// How the wait for the VM ended.
enum Ended {
    /// The process exited by itself.
    Exited,
    /// [`FATAL_LOG`] matched; the VMM was killed (or had exited).
    Fatal,
    TimedOut,
    Stopped,
}

/// The guest's serial console: the FIFO cloud-hypervisor writes and the pump that
/// reads it into the bounded `console.log` and the callback.
struct SerialConsole {
    fifo: SerialFifo,
    pump: Pump,
    path: PathBuf,
}

impl SerialConsole {
    fn start(spec: &mut VmSpec, fifo_path: &Path, log_path: &Path) -> Result<Self, VmmError> {
        let log = File::create(log_path).map_err(|e| VmmError::io("creating", log_path, e))?;
        let (fifo, reader) = SerialFifo::create(fifo_path)
            .map_err(|e| VmmError::io("creating the serial FIFO", fifo_path, e))?;
        let pump = Pump::start(
            &spec.name,
            reader,
            Some(log),
            spec.console.take(),
            spec.log_filter.clone(),
        )
        .map_err(|e| VmmError::io("starting the console reader for", fifo_path, e))?;
        Ok(SerialConsole {
            fifo,
            pump,
            path: fifo_path.to_path_buf(),
        })
    }

    /// Call once the VMM is reaped: the pump reads what is left, then ends.
    fn finish(mut self) -> Option<Instant> {
        self.fifo.close();
        let first = self.pump.finish(Duration::from_secs(10));
        let _ = std::fs::remove_file(&self.path);
        first
    }
}

impl Hypervisor for CloudHypervisor {
    fn name(&self) -> &'static str {
        "cloud-hypervisor"
    }

    fn accel(&self) -> Accel {
        Accel::Kvm
    }

    fn has_network(&self) -> bool {
        true
    }

    fn run_until(&self, mut spec: VmSpec, halt: &AtomicBool) -> Result<VmOutcome, VmmError> {
        spec.validate_with_network()?;
        spec.refuse_channel()?;
        let deadline = Instant::now() + spec.timeout;
        let rt = RuntimeDir::prepare(&spec.runtime_dir)?;
        // Before the VMM starts: the TAP must exist when `vm.create` opens it.
        let network = match &spec.network {
            Some(n) => Some(net::Attached::start(n, &rt.path, NetBackend::Tap)?),
            None => None,
        };
        let mut vmm = self.spawn_in(rt, network.as_ref().map(net::Attached::netns_fd))?;
        let boot_started = vmm.started();
        let console_log = vmm.rt.file(layout::CONSOLE_LOG);
        let console = SerialConsole::start(&mut spec, &vmm.rt.file(SERIAL_FIFO), &console_log)?;
        let config = Self::vm_config(&spec, &vmm.rt.file(SERIAL_FIFO));
        let config_path = vmm.rt.file(layout::VM_CONFIG);
        if let Err(e) = std::fs::write(
            &config_path,
            serde_json::to_vec_pretty(&config).expect("JSON values serialize"),
        ) {
            let _ = vmm.kill();
            console.finish();
            return Err(VmmError::io("writing", &config_path, e));
        }

        let mut log = LogWatch::new(&vmm.log);
        let ended = match boot(&mut vmm, &config, deadline, halt) {
            Ok(()) => wait_end(&mut vmm, &mut log, deadline, halt, spec.timeout),
            Err(e) => failed_start(&mut vmm, e, deadline, halt, spec.timeout),
        };
        let wall = boot_started.elapsed();
        let first_line = console.finish();
        let (status, ended) = ended?;
        let exit = exit_of(ended, status, &mut log, &vmm);
        tracing::debug!(vm = spec.name, %exit, ?wall, "cloud-hypervisor finished");
        let pid = vmm.pid();
        let hypervisor_log = vmm.log.clone();
        let stderr = vmm.stderr.clone();
        drop(vmm);
        // pasta and the namespace go only after the VMM is reaped.
        if let Some(network) = network {
            network.finish(&stderr);
        }
        Ok(VmOutcome {
            exit,
            console_log,
            hypervisor_log,
            boot_started,
            wall,
            first_console_line_after: first_line.map(|t| t.saturating_duration_since(boot_started)),
            pid,
        })
    }
}

/// `vmm.ping` (the API is up), `vm.create`, `vm.boot`: each bounded by [`API_TIMEOUT`]
/// (the ping by [`SOCKET_WAIT`]), by the VM's deadline and by the stop flag.
fn boot(
    vmm: &mut VmmHandle,
    config: &Value,
    deadline: Instant,
    halt: &AtomicBool,
) -> Result<(), VmmError> {
    let ready_by = vmm.started() + SOCKET_WAIT;
    vmm.wait_ready(Bound {
        deadline: deadline.min(ready_by),
        cancel: Some(halt),
    })?;
    let bound = || Bound::within(API_TIMEOUT, deadline, Some(halt));
    vmm.call_within("PUT", "vm.create", Some(config), bound())?;
    vmm.call_within("PUT", "vm.boot", None, bound())?;
    Ok(())
}

/// After `vmm.ping`, `vm.create` or `vm.boot` failed: the VMM is killed; the run is
/// `Stopped` or `TimedOut` if that is why the call gave up, else the error stands.
fn failed_start(
    vmm: &mut VmmHandle,
    e: VmmError,
    deadline: Instant,
    halt: &AtomicBool,
    timeout: Duration,
) -> Result<(ExitStatus, Ended), VmmError> {
    let status = vmm.kill()?;
    if halt.load(Ordering::Acquire) {
        note(
            &vmm.stderr,
            "the caller stopped the VM while it started: killed",
        );
        Ok((status, Ended::Stopped))
    } else if Instant::now() >= deadline {
        note(
            &vmm.stderr,
            &format!("timeout after {timeout:?} while starting ({e}): killed"),
        );
        Ok((status, Ended::TimedOut))
    } else {
        Err(e)
    }
}

/// The [`VmExit`] of a reaped VMM.
fn exit_of(ended: Ended, status: ExitStatus, log: &mut LogWatch, vmm: &VmmHandle) -> VmExit {
    let (code, signal) = code_and_signal(status);
    let crashed = |detail| VmExit::Crashed {
        code,
        signal,
        detail,
    };
    match ended {
        Ended::TimedOut => VmExit::TimedOut,
        Ended::Stopped => VmExit::Stopped,
        Ended::Fatal => crashed(log.detail().unwrap_or_default()),
        // A fatal line written just before the process exited by itself.
        Ended::Exited if log.poll() => crashed(log.detail().unwrap_or_default()),
        Ended::Exited if status.success() => VmExit::PoweredOff,
        Ended::Exited => crashed(vmm.diagnostics()),
    }
}

/// Waits for the VMM to exit, the stop flag, a fatal log line or the deadline.
fn wait_end(
    vmm: &mut VmmHandle,
    log: &mut LogWatch,
    deadline: Instant,
    halt: &AtomicBool,
    timeout: Duration,
) -> Result<(ExitStatus, Ended), VmmError> {
    loop {
        if let Some(s) = vmm.try_wait()? {
            return Ok((s, Ended::Exited));
        }
        if halt.load(Ordering::Acquire) {
            note(&vmm.stderr, "the caller stopped the VM: killed");
            return Ok((vmm.kill()?, Ended::Stopped));
        }
        if log.poll() {
            note(
                &vmm.stderr,
                "cloud-hypervisor logged a fatal guest error: killed",
            );
            return Ok((vmm.kill()?, Ended::Fatal));
        }
        let now = Instant::now();
        if now >= deadline {
            note(
                &vmm.stderr,
                &format!("timeout after {timeout:?}: vm.shutdown, vmm.shutdown"),
            );
            return Ok((vmm.stop_within(STOP_GRACE, Some(halt))?, Ended::TimedOut));
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Disk;

    #[test]
    fn vm_config_uses_cloud_hypervisor_field_names() {
        let mut spec = VmSpec::new("vm", "/k/vmlinux", "/k/initrd", "/rt");
        spec.cmdline = "console=ttyS0 udos.mode=probe".into();
        spec.cpus = 2;
        spec.memory_mib = 512;
        spec.disks = vec![
            Disk::read_only("/l0.img", "udos-l0"),
            Disk::writable("/up.img", "udos-upper"),
        ];
        let c = CloudHypervisor::vm_config(&spec, Path::new("/rt/console.log"));
        assert_eq!(c["payload"]["kernel"], "/k/vmlinux");
        assert_eq!(c["payload"]["initramfs"], "/k/initrd");
        assert_eq!(c["payload"]["cmdline"], "console=ttyS0 udos.mode=probe");
        assert_eq!(c["cpus"]["boot_vcpus"], 2);
        assert_eq!(c["cpus"]["max_vcpus"], 2);
        assert_eq!(c["memory"]["size"], 512u64 * 1024 * 1024);
        assert_eq!(c["disks"][0]["path"], "/l0.img");
        assert_eq!(c["disks"][0]["readonly"], true);
        assert_eq!(c["disks"][0]["serial"], "udos-l0");
        assert_eq!(c["disks"][1]["readonly"], false);
        assert_eq!(c["disks"][1]["id"], "udos-disk1");
        assert_eq!(c["serial"]["mode"], "File");
        assert_eq!(c["serial"]["file"], "/rt/console.log");
        assert_eq!(c["console"]["mode"], "Off");
        assert_eq!(c["rng"]["src"], "/dev/urandom");
    }

    #[test]
    fn vm_config_has_a_nic_on_the_tap_exactly_when_the_spec_has_a_network() {
        let mut spec = VmSpec::new("vm", "/k/vmlinux", "/k/initrd", "/rt");
        let c = CloudHypervisor::vm_config(&spec, Path::new("/rt/serial.fifo"));
        assert!(c.get("net").is_none(), "a NIC without a network: {c}");
        spec.network = Some(crate::Network {
            host_ports: vec![8080],
            address: std::net::Ipv4Addr::new(10, 0, 2, 15),
            prefix_len: 24,
            gateway: std::net::Ipv4Addr::new(10, 0, 2, 2),
            dns: std::net::Ipv4Addr::new(10, 0, 2, 3),
        });
        let c = CloudHypervisor::vm_config(&spec, Path::new("/rt/serial.fifo"));
        let nics = c["net"].as_array().expect("a net list");
        assert_eq!(nics.len(), 1, "{c}");
        assert_eq!(nics[0]["tap"], "udos0");
        assert_eq!(nics[0]["mac"], "52:54:00:12:34:56");
        assert_eq!(nics[0]["ip"], "10.0.2.2", "the gateway the TAP already has");
        assert_eq!(nics[0]["mask"], "255.255.255.0");
        assert!(
            nics[0].get("vhost_user").is_none(),
            "the TAP, not vhost-user"
        );
    }

    /// Real namespace, pasta, TAP and rules; a stand-in for cloud-hypervisor (which
    /// cannot boot here) that records where it runs and exits: the VMM starts inside
    /// the VM's namespace with the TAP already there, and the failed start leaves no
    /// namespace and no pasta behind.
    #[test]
    fn the_vmm_starts_in_the_namespace_with_its_tap_and_a_failure_leaves_nothing() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("cloud-hypervisor");
        std::fs::write(
            &fake,
            "#!/bin/sh\nrt=$(dirname \"${2#path=}\")\n\
             { readlink /proc/self/ns/net; cat \"$rt/net/hypervisor.pid\"; cat /proc/net/dev; } \
             > \"$rt/../seen\"\nexit 3\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let rt = dir.path().join("rt");
        let mut spec = VmSpec::new("ch-net", &f, &f, &rt);
        spec.network = Some(crate::Network {
            host_ports: vec![],
            address: std::net::Ipv4Addr::new(10, 0, 2, 15),
            prefix_len: 24,
            gateway: std::net::Ipv4Addr::new(10, 0, 2, 2),
            dns: std::net::Ipv4Addr::new(10, 0, 2, 3),
        });
        let err = CloudHypervisor::with_binary(&fake).run(spec).unwrap_err();
        assert!(matches!(err, VmmError::EarlyExit { .. }), "{err}");
        let seen = std::fs::read_to_string(dir.path().join("seen")).unwrap();
        let mut lines = seen.lines();
        let ns = lines.next().unwrap();
        let host_ns = std::fs::read_link("/proc/self/ns/net").unwrap();
        assert_ne!(
            Path::new(ns),
            host_ns,
            "the VMM ran in the host's namespace"
        );
        let pasta: u32 = lines.next().unwrap().trim().parse().unwrap();
        assert!(seen.contains("udos0:"), "no TAP where the VMM ran: {seen}");
        assert!(
            !rt.join("net/netns").exists(),
            "the namespace outlived the run"
        );
        let stat = std::fs::read_to_string(format!("/proc/{pasta}/stat")).unwrap_or_default();
        assert!(stat.is_empty(), "pasta {pasta} outlived the run: {stat}");
    }

    #[test]
    fn the_log_watch_finds_a_fatal_line_written_in_pieces() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud-hypervisor.log");
        let mut watch = LogWatch::new(&path);
        assert!(!watch.poll(), "no log yet");
        let mut f = File::create(&path).unwrap();
        let mut put = |text: &str| {
            f.write_all(text.as_bytes()).unwrap();
            f.flush().unwrap();
        };
        put("cloud-hypervisor: 0.004s: <vmm> INFO:vmm/src/vm.rs:606 -- Booting VM\n");
        assert!(!watch.poll());
        put("cloud-hypervisor: 0.015s: <vcpu0> ERROR:vmm/src/cpu.rs:1460 -- VCPU gener");
        assert!(!watch.poll(), "half a line is not judged yet");
        put("ated error: VcpuRun(Failed to run vcpu\n\nCaused by:\n    Unexpected exit reason on vcpu run: InternalError\n");
        assert!(watch.poll());
        let detail = watch.detail().unwrap();
        assert!(
            detail.starts_with("cloud-hypervisor: 0.015s: <vcpu0> ERROR:vmm/src/cpu.rs:1460 -- VCPU generated error"),
            "{detail}"
        );
        assert!(detail.ends_with("InternalError"), "{detail}");
    }

    #[test]
    fn ordinary_log_lines_are_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud-hypervisor.log");
        std::fs::write(
            &path,
            "cloud-hypervisor: 0.26s: <vmm> INFO:vmm/src/lib.rs:2080 -- VM exit event\n\
             cloud-hypervisor: 0.27s: <main> INFO:cloud-hypervisor/src/main.rs:962 -- Cloud Hypervisor exited successfully\n",
        )
        .unwrap();
        let mut watch = LogWatch::new(&path);
        assert!(!watch.poll());
        assert_eq!(watch.detail(), None);
    }
}
