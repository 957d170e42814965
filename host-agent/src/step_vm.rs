//! One step in one VM: its control layer, disks and command line; the boot; and the
//! read-back of what the guest sealed, which is trusted only once verified.
//!
//! Scratch (the upper and output disks, unpack directories) is removed on every path:
//! the disks by a guard, the unpack directory by `tempfile`.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use udos_core::engine::leg::ResolvedStep;
use udos_core::engine::synth::StepFiles;
use udos_layer::output::{read_output, ReadLimits};
use udos_layer::unpack::UnpackLimits;
use udos_layer::{RecordStatus, StepRecord};
use udos_vmm::{Disk, VmExit, VmSpec};

use crate::runner::{Prepared, RunSettings};

/// How long a guest may overrun its own step timeout before the host kills the VM
/// (the guest stops the step itself and still seals; this is the backstop).
pub const HOST_GRACE: Duration = Duration::from_secs(60);

/// A layer the step produced, verified and stored.
#[derive(Debug, Clone)]
pub struct LayerDone {
    /// SHA-256 of the layer stream.
    pub id: String,
    /// Bytes of the stream.
    pub bytes: u64,
    /// Entries in the stream.
    pub entries: u64,
}

/// How the VM part of a step went.
#[derive(Debug)]
pub struct StepVmOutcome {
    /// The guest's record, when it sealed one that verified.
    pub record: Option<StepRecord>,
    /// The layer, when it verified and was stored.
    pub layer: Option<LayerDone>,
    /// Phase timings, ms.
    pub phases: BTreeMap<String, u64>,
    /// The console log.
    pub console_log: PathBuf,
    /// What went wrong on udos's side, if anything.
    pub error: Option<String>,
    /// The host stopped the VM at a deadline (job or step timeout).
    pub timed_out: bool,
    /// The host stopped the VM because the leg was cancelled.
    pub stopped: bool,
}

impl StepVmOutcome {
    /// Nothing yet: no record, no layer, no phases; the console log at `console_log`.
    pub fn new(console_log: PathBuf) -> StepVmOutcome {
        StepVmOutcome {
            record: None,
            layer: None,
            phases: BTreeMap::new(),
            console_log,
            error: None,
            timed_out: false,
            stopped: false,
        }
    }
}

/// Everything a step VM needs besides the step.
pub struct StepVm<'a> {
    /// Image, base, hypervisor, state dir.
    pub prep: &'a Prepared<'a>,
    /// CPU, memory, disk sizes, console streaming.
    pub settings: &'a RunSettings,
    /// The step's runtime directory (control layer, console log).
    pub dir: PathBuf,
    /// The event payload (`/.udos/event.json`).
    pub event_json: &'a [u8],
    /// A label for the console prefix and the VM's name.
    pub label: String,
    /// Its leg, for the progress display.
    pub job: crate::progress::JobRef,
    /// Masks for what the host prints and keeps of the console.
    pub masks: Arc<RwLock<Vec<String>>>,
    /// The trees of the step's actions of other repositories: where each is on the
    /// host, and where it goes in the control layer (`crate::actions::control_trees`).
    pub actions: Vec<(PathBuf, PathBuf)>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Removes the scratch disks however the step ends.
struct Scratch(Vec<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The phase a console line of PID 1 announces: `act started`, `act exited`.
fn guest_phase(
    line: &str,
    job: &crate::progress::JobRef,
    number: usize,
) -> Option<crate::progress::Event> {
    use crate::progress::Event;
    let said = line.trim().strip_prefix("udos-init: ")?;
    if said.starts_with("act started") {
        Some(Event::ActStarted {
            job: job.clone(),
            number,
        })
    } else if said.starts_with("act exited") {
        Some(Event::ActEnded {
            job: job.clone(),
            number,
        })
    } else {
        None
    }
}

/// Masks `line` with `masks` (secret values, `::add-mask::` values).
pub fn mask(line: &str, masks: &[String]) -> String {
    let mut m = udos_layer::mask::Masker::new();
    for v in masks {
        m.add(v);
    }
    m.mask(line).into_owned()
}

impl StepVm<'_> {
    /// Runs `step` on `lowers` (bottom first: base, workspace, earlier layers). `stop`
    /// ends the VM early (cancellation or a deadline the caller watches).
    pub fn run(
        &self,
        step: &ResolvedStep,
        files: &StepFiles,
        lowers: &[PathBuf],
        timeout: Duration,
        stop: &AtomicBool,
    ) -> StepVmOutcome {
        let console_log = self.dir.join("vm").join(udos_vmm::layout::CONSOLE_LOG);
        let mut out = StepVmOutcome::new(console_log);
        if let Err(e) = self.run_inner(step, files, lowers, timeout, stop, &mut out) {
            out.error = Some(crate::errors::describe(&e));
        }
        out
    }

    fn control_layer(&self, files: &StepFiles, step: &ResolvedStep) -> Result<PathBuf> {
        let control = self.dir.join("control");
        std::fs::create_dir_all(control.join(".udos"))?;
        std::fs::write(control.join(".actrc"), &files.actrc)?;
        std::fs::write(control.join(".udos/step.yml"), &files.workflow_yaml)?;
        std::fs::write(control.join(".udos/event.json"), self.event_json)?;
        std::fs::write(
            control.join(".udos/context.json"),
            serde_json::to_vec_pretty(&serde_json::json!({
                "job": step.job_id, "leg": step.leg_name, "step": step.number,
            }))?,
        )?;
        // Hard links into the store's trees (which nothing changes): the erofs image
        // holds copies, the step directory no extra bytes.
        for (tree, rel) in &self.actions {
            let dest = control.join(rel);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            crate::actions::copy_tree(tree, &dest, crate::actions::Copy::Link, &[]).with_context(
                || {
                    format!(
                        "putting the action tree {} in the step's VM",
                        tree.display()
                    )
                },
            )?;
        }
        let img = self.dir.join("control.erofs");
        udos_images::mkfs_erofs(&control, &img)?;
        Ok(img)
    }

    fn run_inner(
        &self,
        step: &ResolvedStep,
        files: &StepFiles,
        lowers: &[PathBuf],
        timeout: Duration,
        stop: &AtomicBool,
        out: &mut StepVmOutcome,
    ) -> Result<()> {
        let t0 = Instant::now();
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let control_img = self.control_layer(files, step)?;

        let upper = self.dir.join("upper.img");
        let output = self.dir.join("output.img");
        let _scratch = Scratch(vec![upper.clone(), output.clone()]);
        self.make_scratch_disks(&upper, &output)?;

        let mut disks: Vec<Disk> = lowers
            .iter()
            .chain(std::iter::once(&control_img))
            .enumerate()
            .map(|(i, p)| Disk::read_only(p, udos_layer::boot::lower_serial(i)))
            .collect();
        let lower_serials: Vec<String> = disks.iter().map(|d| d.serial.clone()).collect();
        disks.push(Disk::writable(&upper, udos_layer::boot::SERIAL_UPPER));
        disks.push(Disk::writable(&output, udos_layer::boot::SERIAL_OUTPUT));
        // Secrets travel on a memory-only device: a memfd the hypervisor opens through
        // /proc, never a file on disk. It lives until this function returns.
        let secrets_fd = if step.secrets.is_empty() && step.masks.is_empty() {
            None
        } else {
            let blob = udos_layer::secrets::StepSecrets {
                secrets: step.secrets.clone(),
                masks: step.masks.clone(),
            }
            .encode()
            .context("encoding the step's secrets")?;
            let fd = memfd::MemfdOptions::default()
                .close_on_exec(true)
                .create("udos-secrets")
                .context("creating the secrets memfd")?;
            use std::io::Write;
            fd.as_file().write_all(&blob)?;
            let path = PathBuf::from(format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                fd.as_file().as_raw_fd()
            ));
            disks.push(Disk::read_only(path, udos_layer::boot::SERIAL_SECRETS));
            Some(fd)
        };
        let guest_timeout = timeout.max(Duration::from_secs(1));
        let boot = udos_layer::boot::BootConfig {
            mode: udos_layer::boot::Mode::Step,
            lowers: lower_serials
                .iter()
                .map(|s| udos_layer::boot::DeviceRef::Serial(s.clone()))
                .collect(),
            upper: Some(udos_layer::boot::DeviceRef::Serial(
                udos_layer::boot::SERIAL_UPPER.into(),
            )),
            output: Some(udos_layer::boot::DeviceRef::Serial(
                udos_layer::boot::SERIAL_OUTPUT.into(),
            )),
            secrets: secrets_fd.as_ref().map(|_| {
                udos_layer::boot::DeviceRef::Serial(udos_layer::boot::SERIAL_SECRETS.into())
            }),
            timeout: Some(guest_timeout),
            net: self
                .settings
                .network
                .as_ref()
                .map(|_| udos_layer::boot::NetConfig::USER_MODE),
            ..udos_layer::boot::BootConfig::default()
        };
        let cmdline = format!(
            "console=ttyS0 quiet panic=-1 {}",
            boot.render().context("the step's kernel command line")?
        );
        let spec = self.vm_spec(
            cmdline,
            disks,
            &self.dir.join("vm"),
            guest_timeout + HOST_GRACE,
            Arc::new(AtomicUsize::new(step.number)),
            None,
        );
        out.phases.insert("materialize".into(), ms(t0.elapsed()));
        let vm_started = Instant::now();
        let outcome = self.prep.hypervisor.run_until(spec, stop);
        drop(secrets_fd);
        let vm_wall = vm_started.elapsed();
        out.phases.insert("vm".into(), ms(vm_wall));
        let outcome = outcome.map_err(|e| {
            anyhow::anyhow!("{} could not run the VM: {e}", self.prep.hypervisor.name())
        })?;
        match outcome.exit {
            VmExit::TimedOut => out.timed_out = true,
            VmExit::Stopped => out.stopped = true,
            _ => {}
        }
        self.read_back(&output, &outcome.exit, vm_wall, out)
    }

    /// The writable disks of a VM: `upper`, a sparse ext4 image copied from the
    /// template, and `output`, zeroed, both of the run's disk size.
    pub(crate) fn make_scratch_disks(&self, upper: &Path, output: &Path) -> Result<()> {
        udos_images::make_upper_disk(
            &udos_images::ImageStore::new(self.prep.state.root()).upper_template_dir(),
            upper,
            self.settings.disk_bytes,
        )?;
        std::fs::File::create(output)
            .and_then(|f| f.set_len(self.settings.disk_bytes))
            .with_context(|| format!("creating the output disk {}", output.display()))?;
        Ok(())
    }

    /// The VM's spec: image, sizes, network, and a console whose lines are masked,
    /// shown through the progress display when streamed, and whose `act started` /
    /// `act exited` lines move the step numbered `step` (the job VM's current one in
    /// job mode) on the board.
    pub(crate) fn vm_spec(
        &self,
        cmdline: String,
        disks: Vec<Disk>,
        runtime_dir: &Path,
        timeout: Duration,
        step: Arc<AtomicUsize>,
        channel: Option<String>,
    ) -> VmSpec {
        let prefix = format!("  [{}] ", self.label);
        let stream = self.settings.stream_console;
        let progress = self.settings.progress.clone();
        let job = self.job.clone();
        let masks = self.masks.clone();
        let filter_masks = self.masks.clone();
        VmSpec {
            name: format!("udos-{}", self.label.replace([' ', '/'], "-")),
            kernel: self.prep.image.vmlinux.clone(),
            initramfs: self.prep.image.initramfs.clone(),
            cmdline,
            disks,
            cpus: self.settings.cpus,
            memory_mib: self.settings.memory_mib,
            runtime_dir: runtime_dir.to_path_buf(),
            timeout,
            console: Some(Box::new(move |line: &str| {
                if let Some(ev) = guest_phase(line, &job, step.load(Ordering::Acquire)) {
                    progress.event(ev);
                }
                if stream {
                    let m = masks.read().map(|m| m.clone()).unwrap_or_default();
                    progress.line(format!(
                        "{prefix}{}",
                        udos_core::text::sanitize_for_terminal(&mask(line, &m))
                    ));
                }
            })),
            network: self.settings.network.clone(),
            log_filter: Some(Arc::new(move |line: &str| {
                let m = filter_masks.read().map(|m| m.clone()).unwrap_or_default();
                mask(line, &m)
            })),
            channel,
        }
    }

    /// Reads what the guest sealed. Nothing from it is believed before its checksums
    /// verify: the record's (by `read_output`), then the layer stream's, before its id
    /// is used to find or store the layer.
    pub(crate) fn read_back(
        &self,
        output: &Path,
        exit: &VmExit,
        vm_wall: Duration,
        out: &mut StepVmOutcome,
    ) -> Result<()> {
        let t = Instant::now();
        let sealed = match read_output(output, &ReadLimits::default()) {
            Ok(s) => s,
            Err(e) => {
                let why = match exit {
                    VmExit::TimedOut => "the guest hung and was killed at its deadline".to_string(),
                    VmExit::Crashed { .. } => format!("the hypervisor {exit}"),
                    VmExit::PoweredOff if e.means_not_sealed() => {
                        "the guest stopped without sealing its output".to_string()
                    }
                    VmExit::PoweredOff => "the guest's sealed output was refused".to_string(),
                    VmExit::Stopped => "the VM was stopped".to_string(),
                };
                anyhow::bail!("{why} ({e}); console log: {}", out.console_log.display());
            }
        };
        let record = &sealed.record;
        let act_ms = record.timings_ms.get("act").copied().unwrap_or(0);
        let seal_ms = record.timings_ms.get("seal").copied().unwrap_or(0);
        out.phases.insert("guest".into(), act_ms);
        out.phases.insert("seal".into(), seal_ms);
        if let Some(v) = record.timings_ms.get("init_to_act") {
            out.phases.insert("init_to_act".into(), *v);
        }
        out.phases
            .insert("boot".into(), ms(vm_wall).saturating_sub(act_ms + seal_ms));
        if record.status == RecordStatus::Error {
            out.error = record.error.clone();
        }
        if sealed.layer_len > 0 {
            sealed
                .verify_layer(output)
                .context("the step's layer does not match its checksum: refused")?;
            let id = sealed.layer_id.clone();
            self.store_layer(&sealed, output, &id)?;
            out.layer = Some(LayerDone {
                id,
                bytes: record.layer.bytes,
                entries: record.layer.entries,
            });
        }
        out.phases.insert("unpack".into(), ms(t.elapsed()));
        out.record = Some(sealed.record);
        Ok(())
    }

    /// Makes the verified layer `id` a lower: unpacked (untrusted, bounded) into a
    /// private scratch directory, renamed into place, then its erofs image. Under the
    /// layer's lock, so two legs storing the same layer do not race.
    fn store_layer(
        &self,
        sealed: &udos_layer::output::SealedOutput,
        output: &Path,
        id: &str,
    ) -> Result<()> {
        let state = self.prep.state;
        let _lock = state.lock_layer(id)?;
        if state.layer_erofs(id).exists() {
            return Ok(());
        }
        let tmp = state.unpack_dir(id)?;
        let limits = UnpackLimits {
            max_total_bytes: self.settings.disk_bytes,
            ..UnpackLimits::default()
        };
        sealed
            .unpack_layer(output, tmp.path(), &limits)
            .context("unpacking the step's layer")?;
        let final_dir = state.layer_dir(id);
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir)?;
        }
        std::fs::rename(tmp.keep(), &final_dir)?;
        udos_images::mkfs_erofs(&final_dir, &state.layer_erofs(id))?;
        Ok(())
    }
}
