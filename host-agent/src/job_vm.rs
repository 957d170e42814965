//! `udos run --per job` (docs/job-mode.md): a job's steps in one VM. The VM boots on
//! the leg's lowers with `udos.mode=job` and a channel (a virtio-console port on a
//! Unix socket); the leg sends each step the engine decides to run and waits for its
//! record, so that the engine stays the one place that evaluates `if:`, outputs, env
//! and masks. At the end the guest seals one layer: the job's restore point.
//!
//! Everything the guest sends is untrusted: frames are bounded, and a frame that does
//! not parse is the step's failure (and the VM's end), never a panic.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use udos_core::engine::leg::ResolvedStep;
use udos_core::engine::synth::StepFiles;
use udos_layer::job::{self, ControlFile, FrameError, GuestMessage, JobMessage, JobStep};
use udos_vmm::{Disk, VmOutcome, VmmError};

use crate::step_vm::{StepVm, StepVmOutcome, HOST_GRACE};

/// How long the host waits for the guest's `Ready` after QEMU started.
pub const READY_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the host tries to connect to the channel's socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const TICK: Duration = Duration::from_millis(50);
/// How long one write to the channel may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(120);

/// A job VM that is up: the channel, and the thread the hypervisor runs on.
pub struct JobVm<'scope> {
    writer: UnixStream,
    messages: Receiver<Result<GuestMessage, FrameError>>,
    stop: Arc<AtomicBool>,
    vm: Option<ScopedJoinHandle<'scope, Result<VmOutcome, VmmError>>>,
    dir: PathBuf,
    output: PathBuf,
    upper: PathBuf,
    started: Instant,
    console_log: PathBuf,
}

impl Drop for JobVm<'_> {
    // A VM nobody will talk to again is stopped (its scratch disks go with it).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(vm) = self.vm.take() {
            let _ = vm.join();
        }
        let _ = std::fs::remove_file(&self.upper);
        let _ = std::fs::remove_file(&self.output);
    }
}

/// The control files step mode puts in the step's control layer, for the channel:
/// `/.actrc`, `/.udos/step.yml`, `/.udos/event.json`, `/.udos/context.json` and the
/// trees of the step's actions under `/.udos/actions/`.
pub fn control_files(
    vm: &StepVm<'_>,
    files: &StepFiles,
    step: &ResolvedStep,
) -> Result<Vec<ControlFile>> {
    let file = |path: &str, data: Vec<u8>| ControlFile::File {
        path: path.into(),
        mode: 0o644,
        data,
    };
    let context = serde_json::to_vec_pretty(&serde_json::json!({
        "job": step.job_id, "leg": step.leg_name, "step": step.number,
    }))?;
    let mut out = vec![
        file("/.actrc", files.actrc.clone().into_bytes()),
        file("/.udos/step.yml", files.workflow_yaml.clone().into_bytes()),
        file("/.udos/event.json", vm.event_json.to_vec()),
        file("/.udos/context.json", context),
    ];
    for (tree, rel) in &vm.actions {
        let guest = Path::new("/").join(rel);
        walk_tree(tree, &guest, &mut out)
            .with_context(|| format!("reading the action tree {}", tree.display()))?;
    }
    Ok(out)
}

/// Every file and link under `tree`, as control files under `guest`.
fn walk_tree(tree: &Path, guest: &Path, out: &mut Vec<ControlFile>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut todo = vec![(tree.to_path_buf(), guest.to_path_buf())];
    while let Some((from, to)) = todo.pop() {
        for entry in std::fs::read_dir(&from)? {
            let entry = entry?;
            let (f, t) = (entry.path(), to.join(entry.file_name()));
            let meta = std::fs::symlink_metadata(&f)?;
            let path = t.to_string_lossy().into_owned();
            if meta.is_dir() {
                todo.push((f, t));
            } else if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&f)?.to_string_lossy().into_owned();
                out.push(ControlFile::Symlink { path, target });
            } else if meta.is_file() {
                out.push(ControlFile::File {
                    path,
                    mode: meta.permissions().mode() & 0o7777,
                    data: std::fs::read(&f)?,
                });
            }
        }
    }
    Ok(())
}

/// The message for one step: its control files, secrets and masks, and its limit.
pub fn step_message(files: Vec<ControlFile>, step: &ResolvedStep, limit: Duration) -> JobMessage {
    JobMessage::Step(Box::new(JobStep {
        files,
        secrets: udos_layer::StepSecrets {
            secrets: step.secrets.clone(),
            masks: step.masks.clone(),
        },
        timeout_secs: limit.max(Duration::from_secs(1)).as_secs_f64(),
    }))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl<'scope> JobVm<'scope> {
    /// Boots the job VM on `lowers` (bottom first: base, workspace, the leg's layers)
    /// in `dir`, and waits for the guest's `Ready`. `vm` gives the image, sizes,
    /// console and masks, `hypervisor` runs it; `life` bounds the whole VM (the
    /// hypervisor's backstop); `step` is the number of the step it runs now (for the
    /// progress display).
    pub fn boot<'env>(
        (scope, hypervisor): (&'scope Scope<'scope, 'env>, &'env dyn udos_vmm::Hypervisor),
        vm: &StepVm<'_>,
        dir: &Path,
        lowers: &[PathBuf],
        life: Duration,
        step: Arc<AtomicUsize>,
        stop_now: &AtomicBool,
    ) -> Result<JobVm<'scope>> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let upper = dir.join("upper.img");
        let output = dir.join("output.img");
        vm.make_scratch_disks(&upper, &output)?;
        let mut disks: Vec<Disk> = lowers
            .iter()
            .enumerate()
            .map(|(i, p)| Disk::read_only(p, udos_layer::boot::lower_serial(i)))
            .collect();
        let serials: Vec<String> = disks.iter().map(|d| d.serial.clone()).collect();
        disks.push(Disk::writable(&upper, udos_layer::boot::SERIAL_UPPER));
        disks.push(Disk::writable(&output, udos_layer::boot::SERIAL_OUTPUT));
        let boot = udos_layer::boot::BootConfig {
            mode: udos_layer::boot::Mode::Job,
            lowers: serials
                .iter()
                .map(|s| udos_layer::boot::DeviceRef::Serial(s.clone()))
                .collect(),
            upper: Some(udos_layer::boot::DeviceRef::serial(
                udos_layer::boot::SERIAL_UPPER,
            )),
            output: Some(udos_layer::boot::DeviceRef::serial(
                udos_layer::boot::SERIAL_OUTPUT,
            )),
            net: vm
                .settings
                .network
                .as_ref()
                .map(|_| udos_layer::boot::NetConfig::USER_MODE),
            channel: Some(job::CHANNEL_NAME.into()),
            ..udos_layer::boot::BootConfig::default()
        };
        let cmdline = format!(
            "console=ttyS0 quiet panic=-1 {}",
            boot.render().context("the job's kernel command line")?
        );
        let runtime = dir.join("vm");
        let spec = vm.vm_spec(
            cmdline,
            disks,
            &runtime,
            life + HOST_GRACE,
            step,
            Some(job::CHANNEL_NAME.into()),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let vm_stop = stop.clone();
        let handle = scope.spawn(move || hypervisor.run_until(spec, &vm_stop));
        let mut job = JobVm {
            writer: placeholder_stream()?,
            messages: std::sync::mpsc::channel().1,
            stop,
            vm: Some(handle),
            dir: dir.to_path_buf(),
            output,
            upper,
            started: Instant::now(),
            console_log: runtime.join(udos_vmm::layout::CONSOLE_LOG),
        };
        job.connect(&runtime.join(udos_vmm::layout::CHANNEL_SOCKET))?;
        match job.wait(READY_TIMEOUT, stop_now)? {
            Waited::Message(GuestMessage::Ready) => Ok(job),
            Waited::Message(other) => anyhow::bail!("the job VM said {other:?} before Ready"),
            Waited::Stopped => anyhow::bail!("the job VM was stopped while booting"),
            Waited::TimedOut => anyhow::bail!(
                "the job VM did not get ready within {READY_TIMEOUT:?}; console log: {}",
                job.console_log.display()
            ),
        }
    }

    /// The console log of the VM.
    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    /// Connects to the channel's socket once the hypervisor listens on it, and starts
    /// the thread that reads the guest's messages.
    fn connect(&mut self, socket: &Path) -> Result<()> {
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) => {
                    if self.vm_ended() {
                        return Err(self.why_ended());
                    }
                    if started.elapsed() >= CONNECT_TIMEOUT {
                        anyhow::bail!(
                            "cannot connect to the job VM's channel {}: {e}",
                            socket.display()
                        );
                    }
                    std::thread::sleep(TICK);
                }
            }
        };
        // A guest that stops reading must not hang the leg on a full socket.
        stream
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .context("setting the channel's write timeout")?;
        let mut reader = stream.try_clone().context("cloning the channel")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("udos-job-channel".into())
            .spawn(move || loop {
                let got = job::recv::<GuestMessage>(&mut reader, job::MAX_FRAME);
                let end = !matches!(got, Ok(Some(_)));
                let sent = match got {
                    Ok(Some(m)) => tx.send(Ok(m)),
                    Ok(None) => break,
                    Err(e) => tx.send(Err(e)),
                };
                if end || sent.is_err() {
                    break;
                }
            })
            .context("starting the channel reader")?;
        self.writer = stream;
        self.messages = rx;
        Ok(())
    }

    /// Why the VM ended before its channel opened (a driver that refuses a channel
    /// says so here).
    fn why_ended(&mut self) -> anyhow::Error {
        match self.vm.take().map(|h| h.join()) {
            Some(Ok(Err(e))) => anyhow::anyhow!("the hypervisor could not run the job VM: {e}"),
            Some(Ok(Ok(o))) => anyhow::anyhow!(
                "the job VM ended ({}) before its channel opened; console log: {}",
                o.exit,
                self.console_log.display()
            ),
            Some(Err(_)) => anyhow::anyhow!("the job VM's thread panicked"),
            None => anyhow::anyhow!("the job VM is not running"),
        }
    }

    fn vm_ended(&self) -> bool {
        self.vm.as_ref().is_none_or(|h| h.is_finished())
    }

    /// The guest's next message, within `limit`, unless `stop_now` is set or the VM ends.
    fn wait(&mut self, limit: Duration, stop_now: &AtomicBool) -> Result<Waited> {
        let started = Instant::now();
        loop {
            match self.messages.recv_timeout(TICK) {
                Ok(Ok(m)) => return Ok(Waited::Message(m)),
                Ok(Err(e)) => return Err(e).context("the job VM's message was refused"),
                Err(RecvTimeoutError::Disconnected) => anyhow::bail!(
                    "the job VM closed its channel; console log: {}",
                    self.console_log.display()
                ),
                Err(RecvTimeoutError::Timeout) => {}
            }
            if stop_now.load(Ordering::Acquire) {
                return Ok(Waited::Stopped);
            }
            if started.elapsed() >= limit {
                return Ok(Waited::TimedOut);
            }
            if self.vm_ended() {
                // What it sent before it ended is still in the queue.
                if let Ok(Ok(m)) = self.messages.recv_timeout(Duration::from_millis(200)) {
                    return Ok(Waited::Message(m));
                }
                anyhow::bail!(
                    "the job VM ended; console log: {}",
                    self.console_log.display()
                );
            }
        }
    }

    /// Runs one step: sends `message`, waits for its record within `limit` plus the
    /// host's grace. On a stop, a timeout or a broken channel the VM is stopped and
    /// `alive` comes back false: the caller boots a new one for later steps.
    pub fn run_step(
        &mut self,
        message: &JobMessage,
        limit: Duration,
        stop_now: &AtomicBool,
    ) -> (StepVmOutcome, bool) {
        let t = Instant::now();
        let mut out = StepVmOutcome::new(self.console_log.clone());
        let waited = job::send(&mut self.writer, message)
            .context("sending the step to the job VM")
            .and_then(|()| self.wait(limit + HOST_GRACE, stop_now));
        out.phases.insert("step".into(), ms(t.elapsed()));
        let alive = match waited {
            Ok(Waited::Message(GuestMessage::StepDone(record))) => {
                for (k, v) in &record.timings_ms {
                    out.phases.insert(format!("guest_{k}"), *v);
                }
                out.record = Some(*record);
                true
            }
            Ok(Waited::Message(other)) => {
                out.error = Some(format!(
                    "the job VM answered {other:?} instead of the step's record"
                ));
                false
            }
            Ok(Waited::Stopped) => {
                out.stopped = true;
                false
            }
            Ok(Waited::TimedOut) => {
                out.timed_out = true;
                false
            }
            Err(e) => {
                out.error = Some(crate::errors::describe(&e));
                false
            }
        };
        if !alive {
            self.stop.store(true, Ordering::Release);
        }
        (out, alive)
    }

    /// Tells the guest to seal, waits for the VM to power off, and reads the job's
    /// layer back exactly as step mode reads a step's (`StepVm::read_back`).
    pub fn seal(mut self, vm: &StepVm<'_>) -> StepVmOutcome {
        let mut out = StepVmOutcome::new(self.console_log.clone());
        let t = Instant::now();
        if let Err(e) = job::send(&mut self.writer, &JobMessage::Seal) {
            out.error = Some(format!("telling the job VM to seal: {e}"));
            return out;
        }
        let Some(handle) = self.vm.take() else {
            out.error = Some("the job VM is not running".into());
            return out;
        };
        let outcome = match handle.join() {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                out.error = Some(format!(
                    "{} could not run the job VM: {e}",
                    vm.prep.hypervisor.name()
                ));
                return out;
            }
            Err(_) => {
                out.error = Some("the job VM's thread panicked".into());
                return out;
            }
        };
        out.phases.insert("seal_wait".into(), ms(t.elapsed()));
        let wall = self.started.elapsed();
        if let Err(e) = vm.read_back(&self.output, &outcome.exit, wall, &mut out) {
            out.error = Some(crate::errors::describe(&e));
        }
        out
    }

    /// The job VM's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A leg's job VM across its steps: booted at the first step that runs, replaced
/// when a step's failure stopped it.
#[derive(Default)]
pub struct JobSlot<'scope> {
    vm: Option<JobVm<'scope>>,
    boots: usize,
    /// The step the live VM runs now, for its console's progress events.
    step: Arc<AtomicUsize>,
    /// Where in the leg's reports the last step that ran in the live VM is.
    pub last_ran: Option<usize>,
}

/// What a step needs from the leg to run in the job VM.
pub struct JobStepRun<'r> {
    /// The step.
    pub step: &'r ResolvedStep,
    /// Its act files.
    pub files: &'r StepFiles,
    /// The leg's lowers, for a VM that boots now.
    pub lowers: &'r [PathBuf],
    /// The step's limit.
    pub limit: Duration,
    /// The VM's backstop, for a VM that boots now.
    pub life: Duration,
}

impl<'scope> JobSlot<'scope> {
    /// Is the leg's job VM up (the next step runs in it, without a boot)?
    pub fn is_live(&self) -> bool {
        self.vm.is_some()
    }

    /// Runs the step in the leg's job VM, booting one first if there is none; `vm`
    /// gives the image, sizes, masks and the step's action trees. The step that boots
    /// a VM gets its `vm` phase (the boot, to the guest's `Ready`), so a run's
    /// `vms_booted` counts VMs.
    pub fn run<'env>(
        &mut self,
        (scope, hypervisor): (&'scope Scope<'scope, 'env>, &'env dyn udos_vmm::Hypervisor),
        vm: &StepVm<'_>,
        dir: &Path,
        run: JobStepRun<'_>,
        stop: &AtomicBool,
    ) -> StepVmOutcome {
        let mut booted = None;
        self.step.store(run.step.number, Ordering::Release);
        if self.vm.is_none() {
            self.boots += 1;
            self.last_ran = None;
            let t = Instant::now();
            let dir = dir.join(format!("job-{}", self.boots));
            let step = self.step.clone();
            match JobVm::boot(
                (scope, hypervisor),
                vm,
                &dir,
                run.lowers,
                run.life,
                step,
                stop,
            ) {
                Ok(j) => self.vm = Some(j),
                Err(e) => {
                    let mut out = failed(dir.join("vm").join(udos_vmm::layout::CONSOLE_LOG), e);
                    out.stopped = stop.load(Ordering::Acquire);
                    return out;
                }
            }
            booted = Some(ms(t.elapsed()));
        }
        let Some(job) = self.vm.as_mut() else {
            return failed(PathBuf::new(), anyhow::anyhow!("no job VM"));
        };
        let files = match control_files(vm, run.files, run.step) {
            Ok(f) => f,
            Err(e) => return failed(job.console_log().to_path_buf(), e),
        };
        let message = step_message(files, run.step, run.limit);
        let (mut out, alive) = job.run_step(&message, run.limit, stop);
        if let Some(boot) = booted {
            out.phases.insert("vm".into(), boot);
        }
        if !alive {
            // Dropping it stops the VM; what its steps wrote is lost with it.
            self.vm = None;
        }
        out
    }

    /// Seals the live VM's layer, if there is one.
    pub fn seal(&mut self, vm: &StepVm<'_>) -> Option<StepVmOutcome> {
        self.vm.take().map(|job| job.seal(vm))
    }
}

fn failed(console_log: PathBuf, e: anyhow::Error) -> StepVmOutcome {
    StepVmOutcome {
        error: Some(crate::errors::describe(&e)),
        ..StepVmOutcome::new(console_log)
    }
}

/// What waiting for the guest gave.
enum Waited {
    Message(GuestMessage),
    Stopped,
    TimedOut,
}

/// A stream that is replaced by the real channel before anything is written.
fn placeholder_stream() -> Result<UnixStream> {
    Ok(UnixStream::pair().context("creating a socket pair")?.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_trees_become_control_files_with_modes_and_links() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("sub")).unwrap();
        std::fs::write(tree.join("action.yml"), b"runs: {}").unwrap();
        std::fs::write(tree.join("sub/run.sh"), b"#!/bin/sh").unwrap();
        std::fs::set_permissions(
            tree.join("sub/run.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("sub/run.sh", tree.join("link")).unwrap();
        let mut out = Vec::new();
        walk_tree(&tree, Path::new("/.udos/actions/o/r"), &mut out).unwrap();
        out.sort_by(|a, b| a.path().cmp(b.path()));
        assert_eq!(
            out,
            vec![
                ControlFile::File {
                    path: "/.udos/actions/o/r/action.yml".into(),
                    mode: std::fs::metadata(tree.join("action.yml"))
                        .unwrap()
                        .permissions()
                        .mode()
                        & 0o7777,
                    data: b"runs: {}".to_vec()
                },
                ControlFile::Symlink {
                    path: "/.udos/actions/o/r/link".into(),
                    target: "sub/run.sh".into()
                },
                ControlFile::File {
                    path: "/.udos/actions/o/r/sub/run.sh".into(),
                    mode: 0o755,
                    data: b"#!/bin/sh".to_vec()
                },
            ]
        );
    }
}
