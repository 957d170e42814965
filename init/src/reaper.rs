//! Signals and children: PID 1 reaps every process of the guest (orphans are
//! reparented to it) and passes the host's SIGTERM/SIGINT/SIGHUP on to act.
//!
//! The signals are blocked and read from a signalfd, so they arrive as data in the same
//! poll(2) that reads act's output: no handlers, no races with the reaping loop.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, killpg, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{read, Pid};

use crate::act::Running;
use crate::actlog::{ActLog, Lines};
use crate::button::Buttons;
use crate::console::{self, info, warning};
use crate::error::Error;
use crate::reads::Watch;

/// The signals PID 1 handles itself.
fn handled() -> SigSet {
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        set.add(sig);
    }
    set
}

/// The signalfd through which PID 1 receives SIGCHLD, SIGTERM, SIGINT and SIGHUP.
#[derive(Debug)]
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Blocks the handled signals and opens the signalfd. Children get an empty mask
    /// back (std's `Command` resets it before exec).
    pub fn block() -> Result<Self, Error> {
        let set = handled();
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None).map_err(|error| Error::Syscall {
            call: "sigprocmask",
            error,
        })?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|error| Error::Syscall {
                call: "signalfd",
                error,
            })?;
        Ok(Signals { fd })
    }

    /// Every pending signal (SIGCHLD coalesces: one means "reap until nothing is left").
    pub fn drain(&self) -> Vec<Signal> {
        let mut got = Vec::new();
        while let Ok(Some(info)) = self.fd.read_signal() {
            if let Ok(sig) = Signal::try_from(info.ssi_signo as i32) {
                got.push(sig);
            }
        }
        got
    }
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(Signal),
}

impl Exit {
    /// Shell convention: 128 + signal number for a killed process.
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s as i32,
        }
    }
}

/// Reaps children and counts the ones nobody else was waiting for.
#[derive(Debug, Default)]
pub struct Reaper {
    /// Reaped processes other than the one being watched (act or the shell).
    pub orphans: u64,
}

/// Result of one reaping pass.
#[derive(Debug, Default)]
pub struct Reaped {
    /// The watched child's exit, if it was reaped in this pass.
    pub watched: Option<Exit>,
    /// No children at all are left.
    pub none_left: bool,
}

impl Reaper {
    /// Reaps every child that has exited, without blocking.
    pub fn reap(&mut self, watch: Option<Pid>) -> Reaped {
        let mut out = Reaped::default();
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return out,
                Ok(status) => {
                    let exit = match status {
                        WaitStatus::Exited(_, code) => Some(Exit::Code(code)),
                        WaitStatus::Signaled(_, sig, _) => Some(Exit::Signal(sig)),
                        _ => None,
                    };
                    match (status.pid(), exit) {
                        (Some(pid), Some(exit)) if Some(pid) == watch => out.watched = Some(exit),
                        (Some(_), Some(_)) => self.orphans += 1,
                        _ => {}
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(_) => {
                    // ECHILD: nobody left to wait for.
                    out.none_left = true;
                    return out;
                }
            }
        }
    }
}

/// How the supervised child ended, and when.
#[derive(Debug)]
pub struct Supervised {
    pub exit: Exit,
    pub elapsed: Duration,
    pub timed_out: bool,
}

/// How long to keep reading act's pipes after act exited (a leftover process may hold
/// them; shutdown kills it anyway).
const DRAIN: Duration = Duration::from_millis(500);

/// One of act's output pipes.
struct Pipe {
    fd: OwnedFd,
    lines: Lines,
}

/// Waits for `child` to exit while reaping everything else, printing and parsing its
/// output, forwarding SIGTERM/SIGINT/SIGHUP to its process group, and enforcing
/// `timeout` (SIGTERM, then SIGKILL after `grace`). `reads`, when given, is fed the
/// step's open events as they come.
pub fn supervise(
    child: Running,
    signals: &Signals,
    reaper: &mut Reaper,
    timeout: Option<Duration>,
    grace: Duration,
    log: &mut ActLog,
    mut reads: Option<&mut Watch>,
) -> Supervised {
    let started = Instant::now();
    let group = child.pid;
    let mut pipes: Vec<Pipe> = [child.stdout, child.stderr]
        .into_iter()
        .flatten()
        .map(|fd| Pipe {
            fd,
            lines: Lines::default(),
        })
        .collect();
    let term_at = timeout.map(|t| started + t);
    let mut kill_at: Option<Instant> = None;
    let mut timed_out = false;
    let mut exit: Option<(Exit, Instant)> = None;

    loop {
        let now = Instant::now();
        if let Some((_, exited)) = exit {
            if pipes.is_empty() || now >= exited + DRAIN {
                break;
            }
        }
        // Deadlines: timeout TERM, then KILL; after exit, the drain limit.
        if exit.is_none() {
            if !timed_out && term_at.is_some_and(|at| now >= at) {
                timed_out = true;
                warning!("step timed out: SIGTERM to act");
                let _ = killpg(group, Signal::SIGTERM);
                kill_at = Some(now + grace);
            }
            if kill_at.is_some_and(|at| now >= at) {
                warning!("act outlived the grace period: SIGKILL");
                let _ = killpg(group, Signal::SIGKILL);
                kill_at = None;
            }
        }
        let next = [
            term_at.filter(|_| !timed_out && exit.is_none()),
            kill_at.filter(|_| exit.is_none()),
            exit.map(|(_, at)| at + DRAIN),
            reads
                .as_ref()
                .and_then(|w| w.paused_until())
                .filter(|at| *at > now),
        ]
        .into_iter()
        .flatten()
        .min();
        let wait = match next {
            Some(at) => {
                PollTimeout::try_from(at.saturating_duration_since(now).as_millis().max(1) as u64)
                    .unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };

        let (sig_ready, pipe_ready, reads_ready) = {
            let mut fds = vec![PollFd::new(signals.fd.as_fd(), PollFlags::POLLIN)];
            fds.extend(
                pipes
                    .iter()
                    .map(|p| PollFd::new(p.fd.as_fd(), PollFlags::POLLIN)),
            );
            let reads_fd = reads.as_ref().and_then(|w| w.poll_fd(now));
            if let Some(fd) = reads_fd {
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
            match poll(&mut fds, wait) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    // Should not happen; avoid a busy loop if it does.
                    warning!("poll: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
            let sig_ready = fds.first().is_some_and(ready);
            let pipe_ready: Vec<bool> = fds.iter().skip(1).take(pipes.len()).map(ready).collect();
            let reads_ready = reads_fd.is_some() && fds.last().is_some_and(ready);
            (sig_ready, pipe_ready, reads_ready)
        };

        if reads_ready {
            if let Some(watch) = reads.as_deref_mut() {
                watch.read_some();
            }
        }
        if sig_ready {
            for sig in signals.drain() {
                if sig != Signal::SIGCHLD && exit.is_none() {
                    info!("forwarding {sig} to act (process group {group})");
                    let _ = killpg(group, sig);
                }
            }
        }
        // Reap on every wakeup: cheap, and SIGCHLDs coalesce.
        if let Some(e) = reaper.reap(Some(group)).watched {
            exit = Some((e, Instant::now()));
        }

        let mut closed = Vec::new();
        for (i, pipe) in pipes.iter_mut().enumerate() {
            if !pipe_ready.get(i).copied().unwrap_or(false) {
                continue;
            }
            let mut buf = [0u8; 65536];
            match read(pipe.fd.as_raw_fd(), &mut buf) {
                Ok(0) => closed.push(i),
                Ok(n) => {
                    for piece in pipe.lines.push(&buf[..n]) {
                        for text in log.handle_piece(piece) {
                            console::line(&text);
                        }
                    }
                }
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(_) => closed.push(i),
            }
        }
        for i in closed.into_iter().rev() {
            let mut pipe = pipes.remove(i);
            if let Some(rest) = pipe.lines.finish() {
                for text in log.handle_piece(rest) {
                    console::line(&text);
                }
            }
        }
    }
    for text in log.finish() {
        console::line(&text);
    }

    let (exit, exited) = exit.unwrap_or((Exit::Signal(Signal::SIGKILL), Instant::now()));
    Supervised {
        exit,
        elapsed: exited.saturating_duration_since(started),
        timed_out,
    }
}

/// Why a service stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGTERM (the host), or SIGINT (Ctrl-Alt-Del).
    Signal(Signal),
    /// A press of the (ACPI) power button.
    PowerButton,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Signal(s) => write!(f, "{s}"),
            StopReason::PowerButton => f.write_str("power button"),
        }
    }
}

/// Service mode: reap every child that exits until SIGTERM, SIGINT or a power-button
/// press says to stop. SIGHUP is ignored. A signal that arrived during boot is still
/// pending on the signalfd, so it is honoured at once.
pub fn idle(signals: &Signals, reaper: &mut Reaper, buttons: &mut Buttons) -> StopReason {
    loop {
        reaper.reap(None);
        let (sig_ready, button_ready) = {
            let button_fds = buttons.fds();
            let mut fds = vec![PollFd::new(signals.fd.as_fd(), PollFlags::POLLIN)];
            fds.extend(
                button_fds
                    .iter()
                    .map(|fd| PollFd::new(*fd, PollFlags::POLLIN)),
            );
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    warning!("poll: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
            let sig_ready = fds.first().is_some_and(ready);
            let button_ready: Vec<bool> = fds.iter().skip(1).map(ready).collect();
            (sig_ready, button_ready)
        };
        if sig_ready {
            for sig in signals.drain() {
                match sig {
                    Signal::SIGTERM | Signal::SIGINT => return StopReason::Signal(sig),
                    Signal::SIGHUP => info!("ignoring SIGHUP"),
                    _ => {}
                }
            }
        }
        for (i, ready) in button_ready.into_iter().enumerate() {
            if ready && buttons.pressed(i) {
                return StopReason::PowerButton;
            }
        }
    }
}

/// Shutdown's first half: SIGTERM to every process, up to `grace` for them to go, then
/// SIGKILL to what is left, and reap. Returns whether SIGKILL was needed.
pub fn terminate_all(reaper: &mut Reaper, grace: Duration) -> bool {
    // kill(-1) reaches every process but PID 1 itself (and kernel threads).
    if reaper.reap(None).none_left {
        return false;
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if reaper.reap(None).none_left {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    info!(
        "processes left after the {:.1} s grace period: SIGKILL",
        grace.as_secs_f64()
    );
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    // SIGKILL cannot be ignored; only a process stuck in the kernel (D state) stays.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if reaper.reap(None).none_left {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    warning!("some processes survived SIGKILL");
    true
}
