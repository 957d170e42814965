//! cloud-hypervisor driver, through its REST API on `runtime_dir/api.sock`:
//! `vmm.ping` → `vm.create` → `vm.boot` → poll `vm.info` while waiting for the
//! process to exit by itself (it does when the guest powers off, and also when a
//! vCPU dies, both with code 0) → on timeout `vm.shutdown`, `vmm.shutdown`, SIGKILL.
//! The serial console goes to `runtime_dir/console.log` (mode `File`), tailed live.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::console::{Pump, TailReader};
use crate::process::{code_and_signal, file_tail, note, Proc, RuntimeDir};
use crate::{http, layout, Accel, Hypervisor, VmExit, VmOutcome, VmSpec, VmmError};

/// Environment variable naming the cloud-hypervisor binary (default:
/// `cloud-hypervisor` in PATH).
pub const CLOUD_HYPERVISOR_ENV: &str = "UDOS_CLOUD_HYPERVISOR";
const CH_BIN: &str = "cloud-hypervisor";
const API: &str = "/api/v1/";
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
const API_TIMEOUT: Duration = Duration::from_secs(30);
const SOCKET_WAIT: Duration = Duration::from_secs(10);
/// After a timeout: how long `vm.shutdown` + `vmm.shutdown` get before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How often `vm.info` is polled while the VM runs.
const INFO_EVERY: Duration = Duration::from_millis(500);
/// If `vm.info` says `Shutdown` and the process is still there after this, the VMM
/// is told to exit.
const SHUTDOWN_LINGER: Duration = Duration::from_secs(2);

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
        json!({
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
        })
    }

    /// Starts a VMM (no VM yet) with its API socket in `runtime_dir`, and waits until
    /// it answers `vmm.ping`. The directory is locked while the handle lives.
    pub fn start_vmm(&self, runtime_dir: &Path) -> Result<VmmHandle, VmmError> {
        let rt = RuntimeDir::prepare(runtime_dir)?;
        let socket = rt.file(layout::API_SOCKET);
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(VmmError::InvalidSpec {
                name: runtime_dir.display().to_string(),
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
        })?;
        let mut h = VmmHandle {
            proc,
            socket,
            log,
            stderr: rt.file(layout::HYPERVISOR_STDERR),
            binary: self.binary.clone(),
            started,
            _rt: rt,
        };
        h.wait_ready()?;
        Ok(h)
    }
}

/// A running cloud-hypervisor VMM. Dropping it kills the process group and removes
/// the socket.
pub struct VmmHandle {
    proc: Proc,
    socket: PathBuf,
    log: PathBuf,
    stderr: PathBuf,
    binary: PathBuf,
    started: Instant,
    _rt: RuntimeDir,
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

    fn wait_ready(&mut self) -> Result<(), VmmError> {
        let deadline = Instant::now() + SOCKET_WAIT;
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
                match http::request(&self.socket, "GET", "/api/v1/vmm.ping", None, API_TIMEOUT) {
                    Ok(r) if (200..300).contains(&r.status) => {
                        tracing::debug!(
                            pid = self.pid(),
                            ping = %String::from_utf8_lossy(&r.body),
                            "cloud-hypervisor is up"
                        );
                        return Ok(());
                    }
                    Ok(_) | Err(_) if Instant::now() < deadline => {}
                    Ok(r) => {
                        return Err(VmmError::Api {
                            method: "GET",
                            endpoint: "vmm.ping".into(),
                            status: Some(r.status),
                            detail: String::from_utf8_lossy(&r.body).into_owned(),
                        })
                    }
                    Err(e) => {
                        return Err(VmmError::Api {
                            method: "GET",
                            endpoint: "vmm.ping".into(),
                            status: None,
                            detail: e.to_string(),
                        })
                    }
                }
            } else if Instant::now() >= deadline {
                return Err(VmmError::Api {
                    method: "GET",
                    endpoint: "vmm.ping".into(),
                    status: None,
                    detail: format!(
                        "the API socket {} did not appear within {SOCKET_WAIT:?}; {}",
                        self.socket.display(),
                        self.diagnostics()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// One API call; a non-2xx answer is an error carrying the VMM's message.
    pub fn call(
        &self,
        method: &'static str,
        endpoint: &str,
        body: Option<&Value>,
    ) -> Result<ApiResponse, VmmError> {
        let body_bytes = body.map(|b| b.to_string().into_bytes());
        let path = format!("{API}{endpoint}");
        let r = http::request(
            &self.socket,
            method,
            &path,
            body_bytes.as_deref(),
            API_TIMEOUT,
        )
        .map_err(|e| VmmError::Api {
            method,
            endpoint: endpoint.to_string(),
            status: None,
            detail: e.to_string(),
        })?;
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
    /// after `grace`. Errors of the API calls are ignored (the VM may be gone).
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus, VmmError> {
        if let Some(s) = self.try_wait()? {
            return Ok(s);
        }
        let deadline = Instant::now() + grace;
        if let Err(e) = self.shutdown() {
            tracing::debug!("vm.shutdown: {e}");
        }
        if let Err(e) = self.shutdown_vmm() {
            tracing::debug!("vmm.shutdown: {e}");
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if let Some(s) = self.wait_for(left)? {
            return Ok(s);
        }
        note(&self.stderr, "did not exit after vmm.shutdown; SIGKILL");
        self.kill()
    }
}

impl Drop for VmmHandle {
    fn drop(&mut self) {
        // `proc` kills the group when dropped unreaped.
        let _ = self.proc.kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Hypervisor for CloudHypervisor {
    fn name(&self) -> &'static str {
        "cloud-hypervisor"
    }

    fn accel(&self) -> Accel {
        Accel::Kvm
    }

    fn run_until(&self, mut spec: VmSpec, halt: &AtomicBool) -> Result<VmOutcome, VmmError> {
        spec.validate()?;
        let mut vmm = self.start_vmm(&spec.runtime_dir)?;
        let boot_started = vmm.started();
        let console_log = spec.runtime_dir.join(layout::CONSOLE_LOG);
        // Created empty before cloud-hypervisor opens it (with truncation), so the
        // tail can start at offset 0 right away.
        File::create(&console_log).map_err(|e| VmmError::io("creating", &console_log, e))?;
        let reader =
            File::open(&console_log).map_err(|e| VmmError::io("opening", &console_log, e))?;
        let config = Self::vm_config(&spec, &console_log);
        let config_path = spec.runtime_dir.join(layout::VM_CONFIG);
        std::fs::write(
            &config_path,
            serde_json::to_vec_pretty(&config).expect("JSON values serialize"),
        )
        .map_err(|e| VmmError::io("writing", &config_path, e))?;

        let stop = Arc::new(AtomicBool::new(false));
        let pump = Pump::start(
            &spec.name,
            TailReader::new(reader, stop.clone()),
            None,
            spec.console.take(),
            None,
        )
        .map_err(|e| VmmError::io("starting the console reader for", &console_log, e))?;
        // On an API error `vmm` is dropped (killed) and `pump` is stopped below.
        let started = vmm.create(&config).and_then(|()| vmm.boot());
        if let Err(e) = started {
            let _ = vmm.stop(STOP_GRACE);
            stop.store(true, Ordering::Release);
            pump.finish(Duration::from_secs(5));
            return Err(e);
        }

        let deadline = boot_started + spec.timeout;
        let mut timed_out = false;
        let mut stopped = false;
        let mut next_info = Instant::now() + INFO_EVERY;
        let mut shutdown_seen: Option<Instant> = None;
        let mut last_state = String::new();
        let status = loop {
            if let Some(s) = vmm.try_wait()? {
                break s;
            }
            if halt.load(Ordering::Acquire) {
                stopped = true;
                note(&vmm.stderr, "the caller stopped the VM: killed");
                break vmm.kill()?;
            }
            let now = Instant::now();
            if now >= deadline {
                timed_out = true;
                note(
                    &vmm.stderr,
                    &format!(
                        "timeout after {:?}: vm.shutdown, vmm.shutdown",
                        spec.timeout
                    ),
                );
                break vmm.stop(STOP_GRACE)?;
            }
            if now >= next_info {
                next_info = now + INFO_EVERY;
                if let Ok(state) = vmm.state() {
                    if state != last_state {
                        tracing::debug!(vm = spec.name, state, "cloud-hypervisor VM state");
                        last_state = state;
                    }
                    if last_state == "Shutdown" {
                        let since = *shutdown_seen.get_or_insert(now);
                        if now.duration_since(since) >= SHUTDOWN_LINGER {
                            let _ = vmm.shutdown_vmm();
                        }
                    }
                }
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
        };
        let wall = boot_started.elapsed();
        stop.store(true, Ordering::Release);
        let first_line = pump.finish(Duration::from_secs(10));
        if let Some(f) = &spec.log_filter {
            filter_file(&console_log, f);
        }
        let (code, signal) = code_and_signal(status);
        let exit = if timed_out {
            VmExit::TimedOut
        } else if stopped {
            VmExit::Stopped
        } else if status.success() {
            VmExit::PoweredOff
        } else {
            VmExit::Crashed {
                code,
                signal,
                detail: vmm.diagnostics(),
            }
        };
        let pid = vmm.pid();
        let hypervisor_log = vmm.log.clone();
        drop(vmm);
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

/// cloud-hypervisor writes the console file itself: rewrite it through the filter
/// once the VM is gone (atomically; on error the file is removed rather than kept
/// unfiltered).
fn filter_file(path: &std::path::Path, filter: &crate::LineFilter) {
    let rewrite = || -> std::io::Result<()> {
        let bytes = std::fs::read(path)?;
        let text = String::from_utf8_lossy(&bytes);
        let mut out = String::with_capacity(text.len());
        for line in text.lines() {
            out.push_str(&filter(line));
            out.push('\n');
        }
        let tmp = path.with_extension("filtered");
        std::fs::write(&tmp, out)?;
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = rewrite() {
        tracing::warn!("filtering {}: {e}; removing it", path.display());
        let _ = std::fs::remove_file(path);
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
}
