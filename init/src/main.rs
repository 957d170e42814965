//! `udos-init`: PID 1 of a udos step VM (docs/pid1.md).
//!
//! Boot: API filesystems, kernel modules, the layered step root (`root`); then act
//! (`act`, with the step's `secrets`, supervised by `reaper`, its log read and masked
//! by `actlog`, what the step opens under `/workspace` recorded by `reads`) — or, in
//! service mode, nothing but reaping until
//! SIGTERM, SIGINT or the power button (`reaper::idle`, `button`); then `shutdown`:
//! kill everything, seal the output (`report`), unmount, power off. Every path, including errors and panics, ends in a
//! step record, a `UDOS-RESULT` line and `reboot(RB_POWER_OFF)`: PID 1 never exits.

mod act;
mod actlog;
mod button;
mod console;
mod devices;
mod error;
mod job;
mod modules;
mod mounts;
mod net;
mod node_shim;
mod reads;
mod reaper;
mod report;
mod root;
mod secrets;
mod shutdown;
mod spawn;

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::unistd::getpid;
use udos_layer::boot::{BootConfig, Mode};
use udos_layer::{RecordStatus, StepRecord, RECORD_VERSION};

use crate::act::Stdio3;
use crate::actlog::ActLog;
use crate::console::{error, info, warning};
use crate::error::Error;
use crate::mounts::Mounts;
use crate::reaper::{supervise, Exit, Reaper, Signals, Supervised};
use crate::root::StepRoot;

/// Module names to load; absent means every module depmod knows.
const MODULE_LIST: &str = "/udos/modules";
/// The manager-mode agent, if the image carries one.
const AGENT: &str = "/sbin/udos-agent";

/// PID 1's state, kept outside the fallible boot so shutdown can always use it.
/// The network being brought up ([`Init::start_network`]).
enum NetStart {
    Thread(std::thread::JoinHandle<Result<(String, std::time::Duration), Error>>),
    Done(Result<(String, std::time::Duration), Error>),
}

struct Init {
    started: Instant,
    cfg: BootConfig,
    mounts: Mounts,
    signals: Option<Signals>,
    reaper: Reaper,
    root: Option<StepRoot>,
    timings: BTreeMap<String, u64>,
    /// Step mode: what the step opens under `/workspace`, watched until shutdown.
    reads: Option<reads::Watch>,
    /// The boot's laps, up to act's start.
    clock: Clock,
    /// Probe mode: no record, no seal, straight to power-off.
    probe: bool,
}

/// PID 1's boot, lap by lap: where the time before act goes (the `act started` line).
pub struct Clock {
    last: Instant,
    laps: Vec<(&'static str, std::time::Duration)>,
}

impl Clock {
    fn new() -> Self {
        Clock {
            last: Instant::now(),
            laps: Vec::new(),
        }
    }

    /// Ends the lap `name` now and starts the next.
    pub fn lap(&mut self, name: &'static str) {
        let now = Instant::now();
        self.laps.push((name, now - self.last));
        self.last = now;
    }

    /// `devices=1.2 lowers=3.4 ...` in milliseconds (`udos bench` reads it back).
    fn summary(&self) -> String {
        let laps: Vec<String> = self
            .laps
            .iter()
            .map(|(name, d)| format!("{name}={:.1}", d.as_secs_f64() * 1000.0))
            .collect();
        laps.join(" ")
    }
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Init {
    fn new(started: Instant) -> Self {
        Init {
            started,
            cfg: BootConfig::default(),
            mounts: Mounts::default(),
            signals: None,
            reaper: Reaper::default(),
            root: None,
            timings: BTreeMap::new(),
            reads: None,
            clock: Clock::new(),
            probe: false,
        }
    }

    /// Boots and runs the step; any error becomes an error record.
    fn run(&mut self) -> StepRecord {
        match self.try_run() {
            Ok(record) => record,
            Err(e) => {
                error!("{e}");
                StepRecord::error(e.to_string())
            }
        }
    }

    fn try_run(&mut self) -> Result<StepRecord, Error> {
        // First: a SIGTERM from the host during boot must wait for act, not be lost.
        self.signals = Some(Signals::block()?);
        let bad_cmdline = self.read_config()?;
        if self.cfg.mode == Mode::Probe {
            console::line("UDOS-PROBE-OK");
            self.probe = true;
            return Ok(StepRecord::error("probe"));
        }

        let boot = Instant::now();
        self.clock.lap("cmdline");
        let harness_dir = self.cfg.root.clone();
        if harness_dir.is_none() {
            mounts::mount_api_filesystems(&mut self.mounts, Path::new("/"), false)?;
            self.clock.lap("api_fs");
        }
        // Reported only now: with /sys and /dev up, the error record can be sealed.
        if let Some(e) = bad_cmdline {
            return Err(e);
        }
        let root = match harness_dir {
            // HARNESS: the test's directory is the root; nothing to load or assemble.
            Some(_) if self.cfg.net.is_some() => return Err(Error::NetInHarness),
            Some(dir) => root::prepare_harness(&self.cfg, &dir, &mut self.mounts)?,
            None => {
                self.load_modules()?;
                // The NIC comes up while the layers are mounted: neither needs the other
                // (the root's resolv.conf comes from the config, not the interface).
                self.clock.lap("modules");
                let net = self.start_network();
                // A root that cannot be assembled is the error to report (the thread
                // is left to finish on its own: power-off follows).
                let root = root::assemble_and_switch(&self.cfg, &mut self.mounts, &mut self.clock)?;
                self.finish_network(net)?;
                set_hostname();
                self.clock.lap("net_and_hostname");
                root
            }
        };
        // The network comes up beside the mounts, so only the modules came before.
        let before = self.timings.get("modules").copied().unwrap_or(0);
        self.timings
            .insert("mount".into(), ms(boot.elapsed()).saturating_sub(before));
        let root = self.root.insert(root).clone();
        if self.cfg.mode == Mode::Service {
            return self.run_service(&root);
        }
        if self.cfg.mode == Mode::Job {
            return self.run_job(&root);
        }
        if self.cfg.mode == Mode::Step && root.path(".actrc").exists() {
            self.run_act(&root)
        } else {
            self.run_manager(&root)
        }
    }

    /// The command line: `UDOS_CMDLINE` (HARNESS) or `/proc/cmdline`, mounting /proc
    /// first if needed. A bad `udos.*` value is returned, not raised: the keys that did
    /// parse (the output device) are still needed to seal the error.
    fn read_config(&mut self) -> Result<Option<Error>, Error> {
        let text = match std::env::var("UDOS_CMDLINE") {
            Ok(text) => text,
            Err(_) => {
                let path = Path::new("/proc/cmdline");
                if !path.exists() {
                    let flags = nix::mount::MsFlags::MS_NOSUID
                        | nix::mount::MsFlags::MS_NODEV
                        | nix::mount::MsFlags::MS_NOEXEC;
                    self.mounts
                        .mount("proc", Path::new("/proc"), "proc", flags, None)?;
                }
                std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?
            }
        };
        let (cfg, bad) = BootConfig::parse_lenient(&text);
        self.cfg = cfg;
        Ok(bad.map(Error::from))
    }

    fn load_modules(&mut self) -> Result<(), Error> {
        // udos's own kernel has every driver built in, and its initramfs no modules
        // directory: nothing to read (not even the kernel's release) and nothing to say.
        if !Path::new("/lib/modules").exists() && !Path::new(MODULE_LIST).exists() {
            return Ok(());
        }
        let t = Instant::now();
        let release_path = Path::new("/proc/sys/kernel/osrelease");
        let release = std::fs::read_to_string(release_path)
            .map_err(|e| Error::io("read", release_path, e))?;
        let loaded = modules::load(
            Path::new("/lib/modules"),
            release.trim(),
            Path::new(MODULE_LIST),
        )?;
        let took = ms(t.elapsed());
        self.timings.insert("modules".into(), took);
        if !loaded.loaded.is_empty() {
            info!(
                "loaded {} module(s) in {took} ms: {}",
                loaded.loaded.len(),
                loaded.loaded.join(" ")
            );
        }
        Ok(())
    }

    /// `udos.net`: brings the NIC and `lo` up with the host's addresses on a thread of
    /// its own (the step root's `resolv.conf` comes with the root,
    /// `root::assemble_and_switch`). Without a thread, it is done here and now.
    fn start_network(&mut self) -> Option<NetStart> {
        let cfg = self.cfg.net?;
        let timeout = self.cfg.device_timeout;
        let configure = move || {
            let t = Instant::now();
            net::configure(&cfg, timeout).map(|iface| (iface, t.elapsed()))
        };
        Some(
            match std::thread::Builder::new()
                .name("net".into())
                .spawn(configure)
            {
                Ok(handle) => NetStart::Thread(handle),
                Err(e) => {
                    warning!("network on a thread: {e}; configuring it first");
                    NetStart::Done(configure())
                }
            },
        )
    }

    /// Waits for [`Init::start_network`]'s result and reports it.
    fn finish_network(&mut self, started: Option<NetStart>) -> Result<(), Error> {
        let (Some(started), Some(cfg)) = (started, self.cfg.net) else {
            return Ok(());
        };
        let result = match started {
            NetStart::Done(r) => r,
            NetStart::Thread(h) => h.join().unwrap_or_else(|payload| {
                Err(Error::NetworkThread(panic_message(payload.as_ref())))
            }),
        };
        let (iface, took) = result?;
        let took = ms(took);
        self.timings.insert("net".into(), took);
        info!(
            "network: {iface} {}/{} via {}, DNS {} ({took} ms, beside the mounts)",
            cfg.address, cfg.prefix_len, cfg.gateway, cfg.dns
        );
        Ok(())
    }

    /// Waits for `running` (act or the manager's program) while reaping everything.
    fn supervise(&mut self, running: act::Running, log: &mut ActLog) -> Result<Supervised, Error> {
        let signals = self.signals.as_ref().ok_or(Error::Syscall {
            call: "signalfd",
            error: nix::errno::Errno::EBADF,
        })?;
        Ok(supervise(
            running,
            signals,
            &mut self.reaper,
            self.cfg.timeout,
            self.cfg.grace,
            log,
            self.reads.as_mut(),
        ))
    }

    /// Step mode: act, with the step's secrets, supervised to the end.
    fn run_act(&mut self, root: &StepRoot) -> Result<StepRecord, Error> {
        let (args, mut log) = self.act_args_and_log()?;
        self.clock.lap("secrets");
        let watch = start_watch(root);
        self.clock.lap("watch");
        let running = act::spawn(&self.cfg.act, &args, root, Stdio3::Piped)?;
        self.clock.lap("spawn");
        self.reads = watch.map(|mut w| {
            w.ignore(running.pid);
            w
        });
        let init_to_act = self.started.elapsed();
        self.timings.insert("init_to_act".into(), ms(init_to_act));
        info!(
            "act started (pid {}), {:.3} ms after PID 1 start; laps (ms): {}",
            running.pid,
            init_to_act.as_secs_f64() * 1000.0,
            self.clock.summary()
        );
        let done = self.supervise(running, &mut log)?;
        self.timings.insert("act".into(), ms(done.elapsed));
        info!("act exited: {}", describe(done.exit));
        let mut record = outcome("act", &done, self.cfg.timeout);
        record.act_exit_code = Some(done.exit.code());
        record.steps = log.into_steps();
        Ok(record)
    }

    /// act's arguments (`--json`, then `--secret NAME=VALUE` for each secret) and the
    /// log reader that masks what act prints.
    fn act_args_and_log(&self) -> Result<(Vec<String>, ActLog), Error> {
        let Some(device) = &self.cfg.secrets else {
            return Ok((vec!["--json".to_string()], ActLog::default()));
        };
        let secrets = secrets::load(device, self.cfg.device_timeout)?;
        info!(
            "{} secret(s) for act, {} more value(s) to mask",
            secrets.secrets.len(),
            secrets.masks.len()
        );
        let mut args = vec!["--json".to_string()];
        args.extend(secrets.act_args());
        Ok((args, ActLog::new(secrets.masker())))
    }

    /// Job mode: tell the host the root is ready, then run each step it sends until
    /// it says seal (or closes the channel). The record returned is the job's, sealed
    /// with the one layer of everything the steps wrote.
    fn run_job(&mut self, root: &StepRoot) -> Result<StepRecord, Error> {
        let name = self.cfg.channel.clone().ok_or(Error::NoChannel)?;
        let mut channel = job::Channel::open(&name, self.cfg.device_timeout)?;
        self.timings
            .insert("init_to_ready".into(), ms(self.started.elapsed()));
        channel.send(&udos_layer::job::GuestMessage::Ready)?;
        info!("job mode: ready on {name}");
        let mut steps = 0u32;
        loop {
            match channel.recv()? {
                Some(udos_layer::job::JobMessage::Step(step)) => {
                    steps += 1;
                    let record = self.run_job_step(root, &step);
                    info!("job step {steps}: {}", report::status_word(record.status));
                    let done = udos_layer::job::GuestMessage::StepDone(Box::new(record));
                    channel.send(&done)?;
                }
                Some(udos_layer::job::JobMessage::Seal) => {
                    info!("job mode: sealing after {steps} step(s)");
                    break;
                }
                None => {
                    warning!(
                        "job mode: the host closed the channel after {steps} step(s); sealing"
                    );
                    break;
                }
            }
        }
        Ok(StepRecord::success())
    }

    /// One step of a job: its control files into the root, act as in step mode (with
    /// the step's secrets and timeout), then the files and act's home removed again.
    /// Every failure is the step's record, never the job's end.
    fn run_job_step(&mut self, root: &StepRoot, step: &udos_layer::job::JobStep) -> StepRecord {
        let timeout = std::time::Duration::try_from_secs_f64(step.timeout_secs)
            .unwrap_or(std::time::Duration::from_secs(1));
        self.cfg.timeout = Some(timeout.max(std::time::Duration::from_millis(1)));
        let result = job::write_control_files(&root.dir, &step.files).and_then(|()| {
            let mut args = vec!["--json".to_string()];
            args.extend(step.secrets.act_args());
            let mut log = ActLog::new(step.secrets.masker());
            let running = act::spawn(&self.cfg.act, &args, root, Stdio3::Piped)?;
            let done = self.supervise(running, &mut log)?;
            info!("act exited: {}", describe(done.exit));
            let mut record = outcome("act", &done, self.cfg.timeout);
            record.act_exit_code = Some(done.exit.code());
            record.steps = log.into_steps();
            record.timings_ms.insert("act".into(), ms(done.elapsed));
            Ok(record)
        });
        let mut record = result.unwrap_or_else(|e| {
            error!("{e}");
            StepRecord::error(e.to_string())
        });
        // act's home too: each step gets a fresh one, as in its own VM.
        for e in job::remove_control_files(&root.dir, &step.files, &[act::HOME]) {
            warning!("job mode: {e}");
            record.error.get_or_insert_with(|| e.to_string());
        }
        record
    }

    /// Manager mode: an emergency shell, the agent, or nothing to do.
    fn run_manager(&mut self, root: &StepRoot) -> Result<StepRecord, Error> {
        let program = if self.cfg.shell {
            PathBuf::from("/bin/sh")
        } else if root.path(AGENT).exists() {
            PathBuf::from(AGENT)
        } else {
            return Err(Error::NothingToRun);
        };
        let running = act::spawn(&program, &[], root, Stdio3::Console)?;
        info!("{} started (pid {})", program.display(), running.pid);
        let done = self.supervise(running, &mut ActLog::default())?;
        info!("{} exited: {}", program.display(), describe(done.exit));
        Ok(outcome(
            &program.display().to_string(),
            &done,
            self.cfg.timeout,
        ))
    }

    /// Service mode: report that the service is up, then reap until told to stop.
    fn run_service(&mut self, root: &StepRoot) -> Result<StepRecord, Error> {
        let signals = self.signals.as_ref().ok_or(Error::Syscall {
            call: "signalfd",
            error: nix::errno::Errno::EBADF,
        })?;
        let mut buttons = button::Buttons::open(&root.path("dev/input"));
        let up = Instant::now();
        self.timings
            .insert("init_to_service".into(), ms(self.started.elapsed()));
        // The host waits for exactly this line (host-agent's SERVICE_UP).
        info!("service up");
        if buttons.len() > 0 {
            info!(
                "watching {} input device(s) for the power button",
                buttons.len()
            );
        }
        let why = reaper::idle(signals, &mut self.reaper, &mut buttons);
        info!(
            "service stopping on {why} after {:.1} s",
            up.elapsed().as_secs_f64()
        );
        self.timings.insert("service".into(), ms(up.elapsed()));
        Ok(StepRecord::success())
    }

    /// Shutdown (docs/pid1.md, step 7), then power off.
    fn shutdown(&mut self, mut record: StepRecord) {
        if self.probe {
            return;
        }
        record.timings_ms.extend(std::mem::take(&mut self.timings));
        let upper = self.root.as_ref().and_then(|r| r.upper.clone());
        shutdown::Shutdown {
            reaper: &mut self.reaper,
            mounts: &mut self.mounts,
            grace: self.cfg.grace,
            output: self.cfg.output.as_ref(),
            upper: upper.as_deref(),
            device_timeout: self.cfg.device_timeout,
            reads: self.reads.take(),
        }
        .run(record);
    }
}

/// The watch on what the step opens; without one (no fanotify in this kernel, no
/// permission) the record's `reads` stays null and the step runs all the same.
fn start_watch(root: &StepRoot) -> Option<reads::Watch> {
    match reads::Watch::start(root) {
        Ok(watch) => Some(watch),
        Err(e) => {
            warning!("cannot record what the step reads ({e}): reads will be null");
            None
        }
    }
}

/// The guest's host name: the root's `/etc/hostname`, else `udos` (tools such as sudo
/// look it up). Only in a real VM: the harness shares the test machine's UTS namespace.
fn set_hostname() {
    let name = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.len() <= 64)
        .unwrap_or_else(|| "udos".to_string());
    if let Err(e) = nix::unistd::sethostname(&name) {
        warning!("cannot set the host name {name:?}: {e}");
    }
}

fn describe(exit: Exit) -> String {
    match exit {
        Exit::Code(c) => format!("exit code {c}"),
        Exit::Signal(s) => format!("killed by {s}"),
    }
}

/// The record for a child (`what`) that ran: success on exit 0, else failure (with why,
/// when it was not simply a non-zero exit).
fn outcome(what: &str, done: &Supervised, timeout: Option<std::time::Duration>) -> StepRecord {
    let mut record = StepRecord {
        version: RECORD_VERSION,
        status: match done.exit {
            Exit::Code(0) if !done.timed_out => RecordStatus::Success,
            _ => RecordStatus::Failure,
        },
        error: None,
        act_exit_code: None,
        steps: Vec::new(),
        timings_ms: BTreeMap::new(),
        layer: Default::default(),
        reads: None,
    };
    if done.timed_out {
        let secs = timeout.map(|t| t.as_secs_f64()).unwrap_or(0.0);
        record.error = Some(format!("step timed out after {secs} s"));
    } else if let Exit::Signal(s) = done.exit {
        record.error = Some(format!("{what} killed by {s}"));
    }
    record
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

fn main() {
    // Linked into act's PATH as `node` (node_shim.rs): then it is not PID 1 at all.
    if std::env::args_os()
        .next()
        .is_some_and(|argv0| node_shim::invoked_as_shim(&argv0))
    {
        node_shim::main();
    }
    let started = Instant::now();
    std::panic::set_hook(Box::new(|info| {
        console::line(&format!("udos-init: panic: {info}"));
    }));
    // kill(-1) and reboot() from anything but a PID namespace's init would hit the
    // whole machine: refuse to run at all.
    if getpid().as_raw() != 1 {
        console::line("udos-init: error: not PID 1; refusing to run (it would signal every process and power the machine off)");
        std::process::exit(2);
    }

    let mut init = Init::new(started);
    let record = match catch_unwind(AssertUnwindSafe(|| init.run())) {
        Ok(record) => record,
        Err(payload) => {
            let msg = format!("udos-init panicked: {}", panic_message(payload.as_ref()));
            error!("{msg}");
            StepRecord::error(msg)
        }
    };
    if catch_unwind(AssertUnwindSafe(|| init.shutdown(record))).is_err() {
        warning!("shutdown panicked; powering off anyway");
        shutdown::result_line("error");
    }
    shutdown::power_off()
}
