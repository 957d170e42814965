//! What a run shows on the terminal while it runs.
//!
//! A pure model ([`Board`], updated by [`Event`]s) and two pure renderers: the
//! [`render_frame`] board a terminal redraws in place, and the [`plain_line`] per
//! transition that logs (CI, a file) get. [`Progress`] is the one sink every print of a
//! run goes through, console lines included, so that the board and the lines above it
//! never interleave.
//!
//! Names reach this module already masked (the callers mask job and step names with
//! the run's and the leg's masks); the renderers only make them safe for a terminal.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use udos_core::engine::Conclusion;
use udos_core::text::sanitize_for_terminal;

/// What a job or one of its steps is doing (or how it ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepState {
    /// Not started yet.
    Queued,
    /// Its VM is starting (a job: its steps are running).
    Booting,
    /// `act` runs the step.
    Running,
    /// `act` ended; the guest seals, the host reads the layer back.
    Sealing,
    /// Its layer is being written to the repository.
    Snapshotting,
    /// A recorded result was reused.
    Cached,
    /// It succeeded.
    Done,
    /// It failed.
    Failed,
    /// Its `if:` was false, or what it needs did not succeed.
    Skipped,
    /// It was stopped or never started because of a cancellation.
    Cancelled,
}

impl StepState {
    /// The word the terminal shows.
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Queued => "queued",
            StepState::Booting => "booting",
            StepState::Running => "running",
            StepState::Sealing => "sealing",
            StepState::Snapshotting => "snapshotting",
            StepState::Cached => "cached",
            StepState::Done => "done",
            StepState::Failed => "failed",
            StepState::Skipped => "skipped",
            StepState::Cancelled => "cancelled",
        }
    }

    /// The final state of something that ended with `c`.
    pub fn from_outcome(c: Conclusion) -> StepState {
        match c {
            Conclusion::Success => StepState::Done,
            Conclusion::Failure => StepState::Failed,
            Conclusion::Cancelled => StepState::Cancelled,
            Conclusion::Skipped => StepState::Skipped,
        }
    }

    /// Whether nothing more happens to it.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            StepState::Cached
                | StepState::Done
                | StepState::Failed
                | StepState::Skipped
                | StepState::Cancelled
        )
    }
}

impl std::fmt::Display for StepState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// A leg of the run (a job, or one leg of its matrix): the engine's leg id and its
/// display name (masked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRef {
    /// The engine's leg id.
    pub leg: usize,
    /// `build (ubuntu, 18)`.
    pub name: String,
}

/// Something that happened in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The engine knows the leg; it waits for what it needs or a free slot.
    LegQueued(JobRef),
    /// The leg's thread started.
    LegStarted(JobRef),
    /// A step is being started: in a VM that boots for it, or (`udos run --per job`)
    /// in its job's VM, already up.
    StepStarted {
        /// Its leg.
        job: JobRef,
        /// 1-based.
        number: usize,
        /// Masked.
        name: String,
        /// A VM boots for it.
        boots: bool,
    },
    /// The guest's PID 1 said it started `act`.
    ActStarted {
        /// Its leg.
        job: JobRef,
        /// The step.
        number: usize,
    },
    /// The guest's PID 1 said `act` exited.
    ActEnded {
        /// Its leg.
        job: JobRef,
        /// The step.
        number: usize,
    },
    /// The step's layer was queued for its snapshot under `key`.
    SnapshotQueued {
        /// Its leg.
        job: JobRef,
        /// The step.
        number: usize,
        /// The snapshot thread's key (`leg-1-step-3`).
        key: String,
    },
    /// The snapshot queued under `key` was written (or failed).
    SnapshotDone {
        /// As queued.
        key: String,
        /// Written.
        ok: bool,
    },
    /// A step ended: it ran, was reused, or was decided without running.
    StepFinished {
        /// Its leg.
        job: JobRef,
        /// 1-based.
        number: usize,
        /// Masked.
        name: String,
        /// How it ended.
        outcome: Conclusion,
        /// Reused from (run, step) instead of run.
        cached_from: Option<(i64, i64)>,
        /// Its error or note (masked).
        detail: Option<String>,
    },
    /// The leg ended (or was decided without starting).
    LegFinished {
        /// The leg.
        job: JobRef,
        /// How it ended.
        outcome: Conclusion,
    },
}

/// One step on the board.
#[derive(Debug, Clone)]
struct StepRow {
    number: usize,
    name: String,
    /// The phase it is in (booting, running, sealing) or how it ended.
    state: StepState,
    /// Its layer's snapshot is queued and not written yet.
    snapshot_pending: bool,
    started: Option<Instant>,
    ended: Option<Instant>,
}

impl StepRow {
    fn shown(&self) -> StepState {
        if self.snapshot_pending {
            StepState::Snapshotting
        } else {
            self.state
        }
    }
}

/// One job (leg) on the board.
#[derive(Debug, Clone)]
struct JobRow {
    name: String,
    state: StepState,
    started: Option<Instant>,
    ended: Option<Instant>,
    /// Order in which jobs finished (finished jobs are listed first, in that order).
    finished_seq: Option<u64>,
    steps: Vec<StepRow>,
}

impl JobRow {
    fn new(name: &str) -> JobRow {
        JobRow {
            name: name.to_string(),
            state: StepState::Queued,
            started: None,
            ended: None,
            finished_seq: None,
            steps: Vec::new(),
        }
    }

    fn step(&mut self, number: usize, name: Option<&str>) -> &mut StepRow {
        let i = match self.steps.iter().position(|s| s.number == number) {
            Some(i) => i,
            None => {
                self.steps.push(StepRow {
                    number,
                    name: String::new(),
                    state: StepState::Queued,
                    snapshot_pending: false,
                    started: None,
                    ended: None,
                });
                self.steps.sort_by_key(|s| s.number);
                self.steps
                    .iter()
                    .position(|s| s.number == number)
                    .unwrap_or_default()
            }
        };
        let row = &mut self.steps[i];
        if let Some(n) = name {
            row.name = n.to_string();
        }
        row
    }

    /// It runs (if it had not ended already), since `now` unless it started before.
    fn run_from(&mut self, now: Instant) {
        if self.state == StepState::Queued {
            self.state = StepState::Running;
        }
        self.started.get_or_insert(now);
    }

    /// A job is shown as snapshotting while a layer of it is, even once it ended.
    fn shown(&self) -> StepState {
        if self.steps.iter().any(|s| s.snapshot_pending) {
            StepState::Snapshotting
        } else {
            self.state
        }
    }

    /// Collapsed to one line: ended and nothing of it still being written.
    fn collapsed(&self) -> bool {
        self.state.is_final() && !self.steps.iter().any(|s| s.snapshot_pending)
    }
}

/// The jobs of a run and their steps, as the events told.
#[derive(Debug, Clone, Default)]
pub struct Board {
    jobs: BTreeMap<usize, JobRow>,
    /// Snapshot key -> (leg, step).
    snapshots: BTreeMap<String, (usize, usize)>,
    finished: u64,
}

impl Board {
    /// An empty board.
    pub fn new() -> Board {
        Board::default()
    }

    fn job(&mut self, j: &JobRef) -> &mut JobRow {
        self.jobs
            .entry(j.leg)
            .or_insert_with(|| JobRow::new(&j.name))
    }

    /// Applies `ev`, which happened at `now`.
    pub fn apply(&mut self, ev: &Event, now: Instant) {
        match ev {
            Event::LegQueued(j) => {
                self.job(j);
            }
            Event::LegStarted(j) => self.job(j).run_from(now),
            Event::StepStarted {
                job,
                number,
                name,
                boots,
            } => {
                let job = self.job(job);
                job.run_from(now);
                let s = job.step(*number, Some(name));
                s.state = match boots {
                    true => StepState::Booting,
                    false => StepState::Running,
                };
                s.started = Some(now);
            }
            Event::ActStarted { job, number } => self.phase(job, *number, StepState::Running),
            Event::ActEnded { job, number } => self.phase(job, *number, StepState::Sealing),
            Event::SnapshotQueued { job, number, key } => {
                self.job(job).step(*number, None).snapshot_pending = true;
                self.snapshots.insert(key.clone(), (job.leg, *number));
            }
            Event::SnapshotDone { key, ok } => self.snapshot_done(key, *ok),
            Event::StepFinished {
                job,
                number,
                name,
                outcome,
                cached_from,
                ..
            } => {
                let job = self.job(job);
                job.run_from(now);
                let s = job.step(*number, Some(name));
                s.state = match cached_from {
                    Some(_) if *outcome == Conclusion::Success => StepState::Cached,
                    _ => StepState::from_outcome(*outcome),
                };
                s.started.get_or_insert(now);
                s.ended = Some(now);
            }
            Event::LegFinished { job, outcome } => {
                self.finished += 1;
                let seq = self.finished;
                let job = self.job(job);
                job.state = StepState::from_outcome(*outcome);
                job.ended = Some(now);
                job.finished_seq = Some(seq);
            }
        }
    }

    /// A phase the guest reported; it never takes a step back from where it is.
    fn phase(&mut self, job: &JobRef, number: usize, to: StepState) {
        let s = self.job(job).step(number, None);
        let rank = |st: StepState| match st {
            StepState::Queued => 0,
            StepState::Booting => 1,
            StepState::Running => 2,
            StepState::Sealing => 3,
            _ => 4,
        };
        if rank(to) > rank(s.state) {
            s.state = to;
        }
    }

    fn snapshot_done(&mut self, key: &str, ok: bool) {
        // Keys of layers that are not steps (base, workspace) are not on the board.
        let Some((leg, number)) = self.snapshots.remove(key) else {
            return;
        };
        let Some(s) = self
            .jobs
            .get_mut(&leg)
            .and_then(|j| j.steps.iter_mut().find(|s| s.number == number))
        else {
            return;
        };
        s.snapshot_pending = false;
        if !ok {
            // A layer that is not in the repository is not a restore point: the run fails.
            s.state = StepState::Failed;
        }
    }

    /// The state the board shows for the job of leg `leg`.
    pub fn job_state(&self, leg: usize) -> Option<StepState> {
        self.jobs.get(&leg).map(JobRow::shown)
    }

    /// The state the board shows for step `number` of leg `leg`.
    pub fn step_state(&self, leg: usize, number: usize) -> Option<StepState> {
        self.step_row(leg, number).map(StepRow::shown)
    }

    /// How long step `number` of leg `leg` has taken (so far, at `now`).
    pub fn step_duration(&self, leg: usize, number: usize, now: Instant) -> Option<Duration> {
        let s = self.step_row(leg, number)?;
        Some(span(s.started?, s.ended, now))
    }

    fn step_row(&self, leg: usize, number: usize) -> Option<&StepRow> {
        self.jobs
            .get(&leg)?
            .steps
            .iter()
            .find(|s| s.number == number)
    }

    /// Whether every job the board knows has ended and nothing is being written.
    pub fn is_idle(&self) -> bool {
        self.jobs.values().all(JobRow::collapsed)
    }
}

fn span(start: Instant, end: Option<Instant>, now: Instant) -> Duration {
    end.unwrap_or(now).saturating_duration_since(start)
}

/// `4.2s`, `1m05s`, `2h03m`.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60)
    }
}

/// A name made safe for the terminal and cut to `max` characters.
fn clean(name: &str, max: usize) -> String {
    cut(&sanitize_for_terminal(name), max)
}

/// `s` cut to `max` characters, with `…` when cut.
fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    if max > 0 {
        out.push('…');
    }
    out
}

/// Longest name shown in full; longer ones are cut.
const NAME_MAX: usize = 40;

/// The board as lines for a terminal `width` columns wide, at most `max_rows` of them.
///
/// One line per job; a job that has not ended (or whose layers are still being
/// written) also gets one line per step. Ended jobs come first, in the order they
/// ended, then the others by leg. When there are more rows than `max_rows`, the most
/// recent ones are kept, under a line that says how many are left out. No line is
/// wider than `width`, so the terminal never wraps one (the redraw counts lines).
pub fn render_frame(board: &Board, now: Instant, width: usize, max_rows: usize) -> Vec<String> {
    let mut jobs: Vec<&JobRow> = board.jobs.values().collect();
    // Stable: unfinished jobs keep their leg order after the finished ones.
    jobs.sort_by_key(|j| match (j.collapsed(), j.finished_seq) {
        (true, Some(seq)) => (0, seq),
        (true, None) => (0, u64::MAX),
        (false, _) => (1, 0),
    });
    let name_w = jobs
        .iter()
        .flat_map(|j| {
            std::iter::once(sanitize_for_terminal(&j.name).chars().count()).chain(
                j.steps
                    .iter()
                    .map(|s| sanitize_for_terminal(&s.name).chars().count() + 5),
            )
        })
        .max()
        .unwrap_or(0)
        .min(NAME_MAX);
    let mut rows = Vec::new();
    for j in jobs {
        rows.push(job_line(j, now, name_w));
        if !j.collapsed() && j.state != StepState::Queued {
            rows.extend(j.steps.iter().map(|s| step_line(s, now, name_w)));
        }
    }
    if rows.len() > max_rows {
        let keep = max_rows.saturating_sub(1);
        let left_out = rows.len() - keep;
        rows.drain(..left_out);
        if max_rows > 0 {
            rows.insert(0, format!("… {left_out} more above"));
        }
    }
    rows.into_iter().map(|r| cut(&r, width)).collect()
}

fn job_line(j: &JobRow, now: Instant, name_w: usize) -> String {
    let dur = j
        .started
        .map(|s| format_duration(span(s, j.ended, now)))
        .unwrap_or_default();
    let mut line = format!(
        "{:<name_w$}  {:<12} {:>7}",
        clean(&j.name, name_w),
        j.shown(),
        dur
    );
    if j.collapsed() && !j.steps.is_empty() {
        let n = j.steps.len();
        line.push_str(&format!("  {n} step{}", if n == 1 { "" } else { "s" }));
    }
    line.trim_end().to_string()
}

fn step_line(s: &StepRow, now: Instant, name_w: usize) -> String {
    let dur = s
        .started
        .map(|st| format_duration(span(st, s.ended, now)))
        .unwrap_or_default();
    let w = name_w.saturating_sub(5);
    format!(
        "  {:>2} {:<w$}  {:<12} {:>7}",
        s.number,
        clean(&s.name, w),
        s.shown(),
        dur
    )
    .trim_end()
    .to_string()
}

/// The line a log (not a terminal) gets for `ev`, if it is a transition worth one.
/// The wording is the one udos always printed (tests and users grep it).
pub fn plain_line(ev: &Event) -> Option<String> {
    let name = |n: &str| sanitize_for_terminal(n).into_owned();
    match ev {
        Event::LegStarted(j) => Some(format!("udos: job {}: starting", name(&j.name))),
        // Step names as `{:?}`: quoted, control characters escaped.
        Event::StepStarted {
            job,
            number,
            name: step,
            boots,
        } => Some(format!(
            "udos: {} step {number} {step:?}: {}",
            name(&job.name),
            match boots {
                true => "starting VM",
                false => "starting in the job's VM",
            }
        )),
        Event::StepFinished {
            job,
            number,
            name: step,
            cached_from: Some((run, from)),
            outcome,
            ..
        } => {
            let how = match outcome {
                Conclusion::Success => "cached".to_string(),
                other => format!("{other}, cached"),
            };
            Some(format!(
                "udos: {} step {number} {step:?}: {how} (run {run} step {from})",
                name(&job.name),
            ))
        }
        Event::StepFinished {
            job,
            number,
            name: step,
            outcome,
            detail,
            ..
        } => {
            let detail = detail
                .as_deref()
                .map(|d| format!(" ({})", name(d)))
                .unwrap_or_default();
            Some(format!(
                "udos: {} step {number} {step:?}: {outcome}{detail}",
                name(&job.name),
            ))
        }
        Event::LegFinished { job, outcome } => {
            Some(format!("udos: job {}: {outcome}", name(&job.name)))
        }
        Event::SnapshotDone { key, ok: false } => {
            Some(format!("udos: snapshot {} failed", name(key)))
        }
        Event::LegQueued(_)
        | Event::ActStarted { .. }
        | Event::ActEnded { .. }
        | Event::SnapshotQueued { .. }
        | Event::SnapshotDone { .. } => None,
    }
}

/// How the sink writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// One line per transition (not a terminal, `TERM=dumb`, `--plain`).
    Plain,
    /// The board, redrawn in place, with log and console lines above it.
    Board,
}

impl Output {
    /// The board when stderr is a terminal that can take it and plain lines were
    /// not asked for (`plain`, or `UDOS_PROGRESS=plain`).
    pub fn detect(plain: bool) -> Output {
        use std::io::IsTerminal;
        let dumb = std::env::var("TERM").map_or(true, |t| t.is_empty() || t == "dumb");
        let asked_plain = plain || std::env::var("UDOS_PROGRESS").is_ok_and(|v| v == "plain");
        if asked_plain || dumb || !std::io::stderr().is_terminal() {
            Output::Plain
        } else {
            Output::Board
        }
    }
}

/// The terminal's size: (columns, rows).
pub type SizeFn = Box<dyn Fn() -> (usize, usize) + Send + Sync>;

struct Sink {
    board: Board,
    out: Box<dyn Write + Send>,
    /// Lines to print above the board at the next redraw.
    pending: Vec<String>,
    /// Lines of the frame on screen.
    drawn: usize,
    /// Something changed since the last redraw.
    dirty: bool,
}

/// The one sink a run prints through (thread-safe; share it as `Arc<Progress>`).
pub struct Progress {
    display: Output,
    size: SizeFn,
    sink: Mutex<Sink>,
    stopped: AtomicBool,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("display", &self.display)
            .finish_non_exhaustive()
    }
}

/// Redraws per second at most.
const TICK: Duration = Duration::from_millis(100);

impl Progress {
    /// Plain lines on stderr: what a run prints when nobody set up a terminal.
    pub fn plain() -> Arc<Progress> {
        Progress::new(
            Output::Plain,
            Box::new(std::io::stderr()),
            Box::new(stderr_size),
        )
    }

    /// On stderr, as [`Output::detect`] says; on a terminal a ticker thread redraws
    /// the board until [`Progress::finish`].
    pub fn stderr(plain: bool) -> Arc<Progress> {
        let p = Progress::new(
            Output::detect(plain),
            Box::new(std::io::stderr()),
            Box::new(stderr_size),
        );
        if p.display == Output::Board {
            p.start_ticker();
            *lock_active() = Some(Arc::downgrade(&p));
        }
        p
    }

    /// A sink writing to `out`, of `size` when it is a terminal.
    pub fn new(display: Output, out: Box<dyn Write + Send>, size: SizeFn) -> Arc<Progress> {
        Arc::new(Progress {
            display,
            size,
            sink: Mutex::new(Sink {
                board: Board::new(),
                out,
                pending: Vec::new(),
                drawn: 0,
                dirty: false,
            }),
            stopped: AtomicBool::new(false),
        })
    }

    /// How it writes.
    pub fn output(&self) -> Output {
        self.display
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sink> {
        self.sink.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Something happened.
    pub fn event(&self, ev: Event) {
        let mut sink = self.lock();
        sink.board.apply(&ev, Instant::now());
        match self.display {
            Output::Plain => {
                if let Some(line) = plain_line(&ev) {
                    let _ = writeln!(sink.out, "{line}");
                }
            }
            Output::Board => sink.dirty = true,
        }
    }

    /// `udos: {text}`, above the board.
    pub fn log(&self, text: &str) {
        self.line(format!("udos: {text}"));
    }

    /// A line (already masked and made safe) above the board: a guest's console line.
    pub fn line(&self, text: String) {
        let mut sink = self.lock();
        if self.display == Output::Plain || self.stopped.load(Ordering::Acquire) {
            let _ = writeln!(sink.out, "{text}");
        } else {
            sink.pending.push(text);
            sink.dirty = true;
        }
    }

    /// Clears the frame on screen, prints the pending lines, draws the board.
    pub fn redraw(&self) {
        if self.display != Output::Board {
            return;
        }
        let (cols, rows) = (self.size)();
        let mut sink = self.lock();
        let now = Instant::now();
        // Durations tick: redraw while anything runs, not only on changes.
        if !sink.dirty && sink.board.is_idle() {
            return;
        }
        // One column spare: a line exactly as wide as the terminal wraps on some.
        let frame = render_frame(
            &sink.board,
            now,
            cols.saturating_sub(1),
            rows.saturating_sub(1),
        );
        let mut buf = String::new();
        if sink.drawn > 0 {
            // To the first line of the old frame, then erase to the end of the screen.
            buf.push_str(&format!("\x1b[{}F\x1b[J", sink.drawn));
        }
        for l in sink.pending.drain(..) {
            buf.push_str(&l);
            buf.push('\n');
        }
        for l in &frame {
            buf.push_str(l);
            buf.push('\n');
        }
        sink.drawn = frame.len();
        sink.dirty = false;
        let _ = sink.out.write_all(buf.as_bytes());
        let _ = sink.out.flush();
    }

    fn start_ticker(self: &Arc<Self>) {
        let weak: Weak<Progress> = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                let Some(p) = weak.upgrade() else { return };
                if p.stopped.load(Ordering::Acquire) {
                    return;
                }
                p.redraw();
            });
        if let Err(e) = spawned {
            tracing::warn!("no progress ticker: {e}");
        }
    }

    /// The final frame, left on screen; what is printed afterwards goes below it.
    pub fn finish(&self) {
        self.redraw();
        self.stopped.store(true, Ordering::Release);
        let mut active = lock_active();
        if active
            .as_ref()
            .is_some_and(|a| std::ptr::eq(a.as_ptr(), self))
        {
            *active = None;
        }
        drop(active);
        let mut sink = self.lock();
        let pending: Vec<String> = sink.pending.drain(..).collect();
        for l in pending {
            let _ = writeln!(sink.out, "{l}");
        }
        let _ = sink.out.flush();
    }
}

/// The board on screen, if any: log lines ([`log_writer`]) go above it.
static ACTIVE: Mutex<Option<Weak<Progress>>> = Mutex::new(None);

fn lock_active() -> std::sync::MutexGuard<'static, Option<Weak<Progress>>> {
    ACTIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where `tracing` writes: above the board while one is on screen (a line written
/// under it would be erased, or leave a stale frame), else stderr.
pub fn log_writer() -> LogWriter {
    LogWriter(Vec::new())
}

/// One log event's bytes, written out when dropped (see [`log_writer`]).
pub struct LogWriter(Vec<u8>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        let board = lock_active().as_ref().and_then(Weak::upgrade);
        match board {
            Some(p) => String::from_utf8_lossy(&self.0)
                .lines()
                .for_each(|l| p.line(l.to_string())),
            None => {
                let _ = std::io::stderr().write_all(&self.0);
            }
        }
    }
}

/// The size of the terminal on stderr; 80x24 when it has none.
fn stderr_size() -> (usize, usize) {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we own; fd 2 may be
    // anything, and a failure leaves it zeroed.
    let r = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) };
    if r != 0 || ws.ws_col == 0 || ws.ws_row == 0 {
        (80, 24)
    } else {
        (usize::from(ws.ws_col), usize::from(ws.ws_row))
    }
}

/// How a [`table`] column lines up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Text.
    Left,
    /// Numbers.
    Right,
}

/// `rows` under `columns` (header, alignment), each column as wide as its widest cell,
/// two spaces apart; the last column is not padded. For `udos runs` and `udos layers`.
pub fn table(columns: &[(&str, Align)], rows: &[Vec<String>]) -> Vec<String> {
    let header: Vec<String> = columns.iter().map(|(h, _)| h.to_string()).collect();
    let all: Vec<&Vec<String>> = std::iter::once(&header).chain(rows).collect();
    let widths: Vec<usize> = (0..columns.len())
        .map(|c| {
            all.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    all.iter()
        .map(|r| {
            let cells: Vec<String> = columns
                .iter()
                .enumerate()
                .map(|(c, (_, align))| {
                    let cell = r.get(c).map_or("", String::as_str);
                    let w = widths[c];
                    match align {
                        Align::Left => format!("{cell:<w$}"),
                        Align::Right => format!("{cell:>w$}"),
                    }
                })
                .collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(leg: usize, name: &str) -> JobRef {
        JobRef {
            leg,
            name: name.into(),
        }
    }

    fn started(j: &JobRef, number: usize, name: &str) -> Event {
        Event::StepStarted {
            job: j.clone(),
            number,
            name: name.into(),
            boots: true,
        }
    }

    fn finished(j: &JobRef, number: usize, outcome: Conclusion) -> Event {
        finished_as(j, number, &format!("step {number}"), outcome)
    }

    fn finished_as(j: &JobRef, number: usize, name: &str, outcome: Conclusion) -> Event {
        Event::StepFinished {
            job: j.clone(),
            number,
            name: name.into(),
            outcome,
            cached_from: None,
            detail: None,
        }
    }

    /// A board fed `events` one second apart from `t0`.
    fn board(t0: Instant, events: &[Event]) -> Board {
        let mut b = Board::new();
        for (i, ev) in events.iter().enumerate() {
            b.apply(ev, t0 + Duration::from_secs(i as u64));
        }
        b
    }

    #[test]
    fn a_step_in_its_job_s_vm_already_up_is_running_not_booting() {
        let t0 = Instant::now();
        let j = job(0, "build");
        let in_job_vm = Event::StepStarted {
            job: j.clone(),
            number: 2,
            name: "test".into(),
            boots: false,
        };
        let b = board(
            t0,
            &[
                Event::LegStarted(j.clone()),
                started(&j, 1, "make"),
                in_job_vm,
            ],
        );
        assert_eq!(b.step_state(0, 1), Some(StepState::Booting));
        assert_eq!(b.step_state(0, 2), Some(StepState::Running));
    }

    #[test]
    fn a_step_goes_through_every_phase_to_done_once_its_snapshot_is_written() {
        let t0 = Instant::now();
        let j = job(0, "build");
        let mut b = Board::new();
        let expect = |b: &mut Board, ev: Event, step: StepState, of_job: StepState| {
            b.apply(&ev, t0);
            assert_eq!(b.step_state(0, 1), Some(step), "after {ev:?}");
            assert_eq!(b.job_state(0), Some(of_job), "after {ev:?}");
        };
        b.apply(&Event::LegQueued(j.clone()), t0);
        assert_eq!(b.job_state(0), Some(StepState::Queued));
        assert_eq!(b.step_state(0, 1), None);
        b.apply(&Event::LegStarted(j.clone()), t0);
        assert_eq!(b.job_state(0), Some(StepState::Running));
        use StepState::*;
        expect(&mut b, started(&j, 1, "make"), Booting, Running);
        let act = |ended: bool| {
            let (job, number) = (j.clone(), 1);
            if ended {
                Event::ActEnded { job, number }
            } else {
                Event::ActStarted { job, number }
            }
        };
        expect(&mut b, act(false), Running, Running);
        expect(&mut b, act(true), Sealing, Running);
        // A late console line does not take the step back.
        expect(&mut b, act(false), Sealing, Running);
        let queued = Event::SnapshotQueued {
            job: j.clone(),
            number: 1,
            key: "leg-0-step-1".into(),
        };
        expect(&mut b, queued, Snapshotting, Snapshotting);
        expect(
            &mut b,
            finished(&j, 1, Conclusion::Success),
            Snapshotting,
            Snapshotting,
        );
        let leg_done = Event::LegFinished {
            job: j.clone(),
            outcome: Conclusion::Success,
        };
        // The job ended, but its last layer is still being written.
        expect(&mut b, leg_done, Snapshotting, Snapshotting);
        assert!(!b.is_idle());
        let other = Event::SnapshotDone {
            key: "workspace".into(),
            ok: true,
        };
        expect(&mut b, other, Snapshotting, Snapshotting);
        let written = Event::SnapshotDone {
            key: "leg-0-step-1".into(),
            ok: true,
        };
        expect(&mut b, written, Done, Done);
        assert!(b.is_idle());
    }

    #[test]
    fn final_states_come_from_the_outcome_the_cache_and_the_snapshot() {
        let t0 = Instant::now();
        let j = job(3, "test");
        let cached = |outcome| Event::StepFinished {
            job: j.clone(),
            number: 2,
            name: "cached".into(),
            outcome,
            cached_from: Some((7, 2)),
            detail: None,
        };
        let cases = [
            (finished(&j, 2, Conclusion::Success), StepState::Done),
            (finished(&j, 2, Conclusion::Failure), StepState::Failed),
            (finished(&j, 2, Conclusion::Skipped), StepState::Skipped),
            (finished(&j, 2, Conclusion::Cancelled), StepState::Cancelled),
            (cached(Conclusion::Success), StepState::Cached),
            (cached(Conclusion::Failure), StepState::Failed),
        ];
        for (ev, want) in cases {
            assert_eq!(
                board(t0, std::slice::from_ref(&ev)).step_state(3, 2),
                Some(want),
                "{ev:?}"
            );
        }
        let failed_snapshot = board(
            t0,
            &[
                started(&j, 1, "a"),
                Event::SnapshotQueued {
                    job: j.clone(),
                    number: 1,
                    key: "k".into(),
                },
                finished(&j, 1, Conclusion::Success),
                Event::SnapshotDone {
                    key: "k".into(),
                    ok: false,
                },
            ],
        );
        assert_eq!(failed_snapshot.step_state(3, 1), Some(StepState::Failed));
    }

    #[test]
    fn durations_run_until_the_step_ends() {
        let t0 = Instant::now();
        let j = job(0, "build");
        // Started at t0+0, act at t0+1, finished at t0+2.
        let b = board(
            t0,
            &[
                started(&j, 1, "a"),
                Event::ActStarted {
                    job: j.clone(),
                    number: 1,
                },
                finished(&j, 1, Conclusion::Success),
            ],
        );
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.step_duration(0, 1, later), Some(Duration::from_secs(2)));
        let running = board(t0, &[started(&j, 1, "a")]);
        assert_eq!(
            running.step_duration(0, 1, t0 + Duration::from_millis(4200)),
            Some(Duration::from_millis(4200))
        );
        // Decided without running: no time at all.
        let skipped = board(t0, &[finished(&j, 1, Conclusion::Skipped)]);
        assert_eq!(skipped.step_duration(0, 1, later), Some(Duration::ZERO));
    }

    #[test]
    fn durations_are_short_and_readable() {
        let cases = [
            (Duration::ZERO, "0.0s"),
            (Duration::from_millis(4249), "4.2s"),
            (Duration::from_millis(59_900), "59.9s"),
            (Duration::from_secs(65), "1m05s"),
            (Duration::from_secs(3599), "59m59s"),
            (Duration::from_secs(3725), "1h02m"),
        ];
        for (d, want) in cases {
            assert_eq!(format_duration(d), want);
        }
    }

    /// Two jobs: `done` ended with two steps; `live` runs its second step.
    fn two_jobs(t0: Instant) -> Board {
        let (a, b) = (job(0, "done-job"), job(1, "live-job"));
        board(
            t0,
            &[
                Event::LegQueued(b.clone()),
                Event::LegStarted(a.clone()),
                started(&a, 1, "first"),
                finished_as(&a, 1, "first", Conclusion::Success),
                Event::LegStarted(b.clone()),
                started(&b, 1, "compile"),
                finished_as(&b, 1, "compile", Conclusion::Failure),
                started(&b, 2, "report"),
                finished(&a, 2, Conclusion::Skipped),
                Event::LegFinished {
                    job: a.clone(),
                    outcome: Conclusion::Success,
                },
            ],
        )
    }

    #[test]
    fn finished_jobs_collapse_to_one_line_above_the_running_ones() {
        let t0 = Instant::now();
        let frame = render_frame(&two_jobs(t0), t0 + Duration::from_secs(20), 80, 20);
        assert_eq!(frame.len(), 4, "{frame:#?}");
        let words = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
        // LegStarted at t0+1, LegFinished at t0+9.
        assert_eq!(words(&frame[0]), ["done-job", "done", "8.0s", "2", "steps"]);
        assert_eq!(words(&frame[1]), ["live-job", "running", "16.0s"]);
        assert_eq!(words(&frame[2]), ["1", "compile", "failed", "1.0s"]);
        // Started at t0+7, still running at t0+20.
        assert_eq!(words(&frame[3]), ["2", "report", "booting", "13.0s"]);
        // The columns line up.
        let col = |l: &str, w: &str| l.find(w).unwrap();
        assert_eq!(col(&frame[0], "done "), col(&frame[1], "running"));
        assert_eq!(col(&frame[1], "running"), col(&frame[2], "failed"));
    }

    #[test]
    fn a_short_terminal_shows_the_most_recent_rows_and_a_narrow_one_cuts_them() {
        let t0 = Instant::now();
        let j = job(0, "a-job-with-a-rather-long-name");
        let events: Vec<Event> = (1..=30)
            .flat_map(|n| [started(&j, n, "step"), finished(&j, n, Conclusion::Success)])
            .collect();
        let b = board(t0, &events);
        let frame = render_frame(&b, t0, 80, 6);
        assert_eq!(frame.len(), 6, "{frame:#?}");
        assert_eq!(frame[0], "… 26 more above");
        assert!(frame[5].trim_start().starts_with("30 step"), "{frame:#?}");
        for width in [0, 1, 10, 25] {
            let narrow = render_frame(&b, t0, width, 6);
            assert!(
                narrow.iter().all(|l| l.chars().count() <= width),
                "{narrow:#?}"
            );
        }
        assert!(render_frame(&b, t0, 80, 0).is_empty());
    }

    #[test]
    fn nothing_a_name_holds_reaches_the_terminal_as_a_control_sequence() {
        let t0 = Instant::now();
        let j = job(0, "evil\x1b[2J\u{9b}31m");
        let step = "clear\x1b[H\r\n";
        let events = [
            Event::LegStarted(j.clone()),
            started(&j, 1, step),
            Event::StepFinished {
                job: j.clone(),
                number: 1,
                name: step.into(),
                outcome: Conclusion::Failure,
                cached_from: None,
                detail: Some("boom\x1b]0;title\x07".into()),
            },
        ];
        let b = board(t0, &events);
        let mut out: Vec<String> = render_frame(&b, t0, 200, 20);
        out.extend(events.iter().filter_map(plain_line));
        assert_eq!(out.len(), 2 + 3);
        for l in out {
            assert!(!l.chars().any(|c| c.is_control() || c == '\u{9b}'), "{l:?}");
        }
    }

    #[test]
    fn table_columns_are_as_wide_as_their_widest_cell() {
        let rows = vec![
            vec!["7".into(), "pull_request_review_comment".into(), "a".into()],
            vec!["12".into(), "push".into(), "ünïcode".into()],
        ];
        let t = table(
            &[
                ("RUN", Align::Right),
                ("EVENT", Align::Left),
                ("NAME", Align::Left),
            ],
            &rows,
        );
        assert_eq!(
            t,
            [
                "RUN  EVENT                        NAME",
                "  7  pull_request_review_comment  a",
                " 12  push                         ünïcode",
            ]
        );
    }

    #[test]
    fn plain_lines_keep_the_wording_logs_are_grepped_for() {
        let j = job(0, "build (ubuntu, 18)");
        let cached = Event::StepFinished {
            job: j.clone(),
            number: 2,
            name: "make".into(),
            outcome: Conclusion::Success,
            cached_from: Some((4, 2)),
            detail: None,
        };
        let failed = Event::StepFinished {
            job: j.clone(),
            number: 3,
            name: "step 3".into(),
            outcome: Conclusion::Failure,
            cached_from: None,
            detail: Some("exit code 2".into()),
        };
        let cases = [
            (
                Event::LegStarted(j.clone()),
                Some("udos: job build (ubuntu, 18): starting"),
            ),
            (
                started(&j, 1, "make"),
                Some("udos: build (ubuntu, 18) step 1 \"make\": starting VM"),
            ),
            (
                Event::StepStarted {
                    job: j.clone(),
                    number: 2,
                    name: "test".into(),
                    boots: false,
                },
                Some("udos: build (ubuntu, 18) step 2 \"test\": starting in the job's VM"),
            ),
            (
                cached,
                Some("udos: build (ubuntu, 18) step 2 \"make\": cached (run 4 step 2)"),
            ),
            (
                failed,
                Some("udos: build (ubuntu, 18) step 3 \"step 3\": failure (exit code 2)"),
            ),
            (
                Event::LegFinished {
                    job: j.clone(),
                    outcome: Conclusion::Success,
                },
                Some("udos: job build (ubuntu, 18): success"),
            ),
            (Event::LegQueued(j.clone()), None),
            (
                Event::ActStarted {
                    job: j.clone(),
                    number: 1,
                },
                None,
            ),
            (
                Event::SnapshotDone {
                    key: "k".into(),
                    ok: true,
                },
                None,
            ),
        ];
        for (ev, want) in cases {
            assert_eq!(plain_line(&ev).as_deref(), want, "{ev:?}");
        }
    }

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn take(&self) -> String {
            String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
        }
    }

    #[test]
    fn plain_output_is_one_line_per_transition_and_no_escape() {
        let out = Shared::default();
        let p = Progress::new(Output::Plain, Box::new(out.clone()), Box::new(|| (80, 24)));
        let j = job(0, "build");
        p.event(Event::LegQueued(j.clone()));
        p.event(Event::LegStarted(j.clone()));
        p.line("  [build 1] hello".into());
        p.redraw();
        p.finish();
        assert_eq!(out.take(), "udos: job build: starting\n  [build 1] hello\n");
    }

    #[test]
    fn the_board_is_redrawn_in_place_under_the_lines_printed_since() {
        let out = Shared::default();
        let p = Progress::new(Output::Board, Box::new(out.clone()), Box::new(|| (80, 24)));
        let j = job(0, "build");
        p.event(Event::LegStarted(j.clone()));
        p.event(started(&j, 1, "make"));
        // Nothing is written until the redraw.
        assert_eq!(out.take(), "");
        p.redraw();
        let first = out.take();
        assert!(!first.contains('\x1b'), "nothing to clear yet: {first:?}");
        assert_eq!(first.lines().count(), 2, "{first:?}");
        p.line("  [build 1] console".into());
        p.event(finished(&j, 1, Conclusion::Success));
        p.event(Event::LegFinished {
            job: j.clone(),
            outcome: Conclusion::Success,
        });
        p.redraw();
        let second = out.take();
        // Back over the 2 lines of the old frame, erase, the new line, the new frame.
        let rest = second.strip_prefix("\x1b[2F\x1b[J").expect(&second);
        let lines: Vec<&str> = rest.lines().collect();
        assert_eq!(lines[0], "  [build 1] console");
        assert_eq!(lines.len(), 2, "the ended job is one line: {lines:?}");
        assert!(lines[1].contains("done"), "{lines:?}");
        p.finish();
        // Idle and unchanged: the final frame stays as it is; later lines go below it.
        assert_eq!(out.take(), "");
        p.line("after".into());
        assert_eq!(out.take(), "after\n");
    }
}
