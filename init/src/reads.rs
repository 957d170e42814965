//! What the step read: while act runs, PID 1 watches the step root with fanotify and
//! keeps the paths under `/workspace` that the step's processes (not act itself, not
//! PID 1) opened, files and directories apart (docs/pid1.md, "What the step read").
//! The host keys its step cache on their content.
//!
//! Notification events only, never permission events: the step never waits for PID 1.
//! Each event carries an fd the kernel opened on the file for PID 1; its path is
//! `/proc/self/fd/N`, and the fd is closed as soon as the path is known.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::fanotify::{EventFFlags, Fanotify, FanotifyEvent, InitFlags, MarkFlags, MaskFlags};
use nix::unistd::Pid;
use udos_layer::{ReadSet, MAX_READ_BYTES, MAX_READ_ENTRIES};

use crate::console::{info, warning};
use crate::error::Error;
use crate::root::StepRoot;

/// PID 1's time on the queue per turn of the supervisor's loop, so that act's pipes
/// and signals are never kept waiting long.
const TURN: Duration = Duration::from_millis(10);
/// Once it has emptied the queue, PID 1 leaves it alone this long, so that events are
/// read in batches instead of one wakeup (two context switches) per open: on a VM with
/// one emulated CPU, waking for each open made a step's opens 4-5 times slower.
const PAUSE: Duration = Duration::from_millis(20);

/// What kind of thing was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file (or anything else that is not a directory).
    File,
    /// A directory: opened to list it.
    Dir,
}

/// Where an opened path lies relative to the workspace.
#[derive(Debug, PartialEq, Eq)]
pub enum Place {
    /// Under the workspace: the relative path (`.` for the workspace itself).
    Inside(String),
    /// Elsewhere in the step root.
    Outside,
    /// Under the workspace, but the path is not UTF-8, so the record cannot hold it.
    NotUtf8,
}

/// Places `path` relative to `workspace` (whole components: `/workspace2` is outside).
pub fn place(workspace: &Path, path: &Path) -> Place {
    let Ok(rel) = path.strip_prefix(workspace) else {
        return Place::Outside;
    };
    match rel.to_str() {
        Some("") => Place::Inside(".".to_string()),
        Some(s) => Place::Inside(s.to_string()),
        None => Place::NotUtf8,
    }
}

/// Bytes `s` takes as a JSON string with its quotes and a comma, so that the bound
/// holds for the record itself whatever the names hold.
fn json_cost(s: &str) -> usize {
    let escaped: usize = s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum();
    escaped + 3
}

/// The paths seen so far: sorted, without duplicates, bounded by [`MAX_READ_ENTRIES`]
/// and [`MAX_READ_BYTES`]; past a bound, or when something was missed, `truncated`.
#[derive(Debug, Default)]
pub struct Collector {
    files: BTreeSet<String>,
    dirs: BTreeSet<String>,
    bytes: usize,
    /// Why the set is incomplete (the first reason), if it is.
    incomplete: Option<String>,
}

impl Collector {
    /// Adds one opened path (relative to the workspace).
    pub fn add(&mut self, kind: Kind, rel: &str) {
        if self.set(kind).contains(rel) {
            return;
        }
        let cost = json_cost(rel);
        let entries = self.files.len() + self.dirs.len();
        if entries >= MAX_READ_ENTRIES || self.bytes + cost > MAX_READ_BYTES {
            self.mark_incomplete(|| {
                format!("over {MAX_READ_ENTRIES} paths or {MAX_READ_BYTES} bytes")
            });
            return;
        }
        self.bytes += cost;
        self.set(kind).insert(rel.to_string());
    }

    fn set(&mut self, kind: Kind) -> &mut BTreeSet<String> {
        match kind {
            Kind::File => &mut self.files,
            Kind::Dir => &mut self.dirs,
        }
    }

    /// The set misses something: the host must never take the step from its cache.
    pub fn mark_incomplete(&mut self, why: impl FnOnce() -> String) {
        if self.incomplete.is_none() {
            self.incomplete = Some(why());
        }
    }

    /// Why the set is incomplete, if it is.
    pub fn incomplete(&self) -> Option<&str> {
        self.incomplete.as_deref()
    }

    /// The record's form.
    pub fn into_read_set(self) -> ReadSet {
        ReadSet {
            files: self.files.into_iter().collect(),
            dirs: self.dirs.into_iter().collect(),
            truncated: self.incomplete.is_some(),
        }
    }
}

/// The path an event's fd is open on, read from `proc_fd` (`/proc/self/fd`, opened
/// once: one lookup instead of four per event). A file deleted (or a directory
/// removed) since the open reads back as `<path> (deleted)`: the suffix is dropped
/// unless a file by that very name is the one open.
fn path_of(proc_fd: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    let link = rustix::fs::readlinkat(proc_fd, fd.as_raw_fd().to_string(), Vec::new())?;
    let link = PathBuf::from(OsString::from_vec(link.into_bytes()));
    let Some(stripped) = link
        .to_str()
        .and_then(|s| s.strip_suffix(" (deleted)"))
        .map(PathBuf::from)
    else {
        return Ok(link);
    };
    let open = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(io::Error::from)?;
    let named = std::fs::symlink_metadata(&link);
    let same = named.is_ok_and(|m| m.dev() == open.st_dev && m.ino() == open.st_ino);
    Ok(if same { link } else { stripped })
}

/// `/proc/self/fd`, for [`path_of`].
fn open_proc_fd() -> io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    Ok(rustix::fs::open("/proc/self/fd", flags, Mode::empty())?)
}

/// What an event's fd is open on. (In fd mode the kernel leaves `FAN_ONDIR` out of
/// the event's mask, so the fd itself says if it is a directory.)
fn kind_of(fd: BorrowedFd<'_>) -> io::Result<Kind> {
    let open = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(io::Error::from)?;
    Ok(if open.st_mode & libc::S_IFMT == libc::S_IFDIR {
        Kind::Dir
    } else {
        Kind::File
    })
}

/// Counts for the console line.
#[derive(Debug, Default)]
struct Counts {
    events: u64,
    ignored: u64,
    /// PID 1's CPU time on the events (not wall time: on one CPU, the step runs while
    /// PID 1 waits for it).
    cpu: Duration,
}

/// CPU time PID 1 has used so far.
fn cpu_time() -> Duration {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_PROCESS_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

/// The fanotify watch on the step root while the step runs.
#[derive(Debug)]
pub struct Watch {
    fan: Fanotify,
    /// `/proc/self/fd`: where the events' fds are named.
    proc_fd: OwnedFd,
    /// `/workspace` in PID 1's view (`DIR/workspace` in harness mode).
    workspace: PathBuf,
    /// Opens by these processes are not the step's: PID 1 and act.
    ignored: Vec<i32>,
    set: Collector,
    counts: Counts,
    /// The queue is not polled before this (see [`PAUSE`]).
    paused_until: Option<Instant>,
}

impl Watch {
    /// Starts watching opens of files and directories (`FAN_OPEN | FAN_ONDIR`) on the
    /// step root's filesystem (its mount where a filesystem mark is refused).
    pub fn start(root: &StepRoot) -> Result<Self, Error> {
        let syscall = |call| move |error| Error::Syscall { call, error };
        // Unlimited queue: an overflow would make the set useless; PID 1 drains it as
        // it goes, so it stays short.
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_NOTIF
                | InitFlags::FAN_CLOEXEC
                | InitFlags::FAN_NONBLOCK
                | InitFlags::FAN_UNLIMITED_QUEUE,
            // O_NONBLOCK: the kernel's open of a fifo for PID 1 must not wait for a writer.
            EventFFlags::O_RDONLY
                | EventFFlags::O_LARGEFILE
                | EventFFlags::O_CLOEXEC
                | EventFFlags::O_NONBLOCK,
        )
        .map_err(syscall("fanotify_init"))?;
        let mask = MaskFlags::FAN_OPEN | MaskFlags::FAN_ONDIR;
        let mark = |how| fan.mark(MarkFlags::FAN_MARK_ADD | how, mask, None, Some(&root.dir));
        let scope = match mark(MarkFlags::FAN_MARK_FILESYSTEM) {
            Ok(()) => "filesystem",
            Err(_) => mark(MarkFlags::FAN_MARK_MOUNT)
                .map(|()| "mount")
                .map_err(syscall("fanotify_mark"))?,
        };
        let proc_fd = open_proc_fd().map_err(|e| Error::io("open", "/proc/self/fd", e))?;
        info!("recording what the step opens under /workspace (fanotify, {scope} mark)");
        Ok(Watch {
            fan,
            proc_fd,
            workspace: root.path("workspace"),
            ignored: vec![nix::unistd::getpid().as_raw()],
            set: Collector::default(),
            counts: Counts::default(),
            paused_until: None,
        })
    }

    /// Opens by `pid` (act) are not the step's reads.
    pub fn ignore(&mut self, pid: Pid) {
        self.ignored.push(pid.as_raw());
    }

    /// The queue's fd, for poll(2), unless reading is paused at `now`.
    pub fn poll_fd(&self, now: Instant) -> Option<BorrowedFd<'_>> {
        match self.paused_until {
            Some(until) if now < until => None,
            _ => Some(self.fan.as_fd()),
        }
    }

    /// When the queue is to be polled again, if reading is paused.
    pub fn paused_until(&self) -> Option<Instant> {
        self.paused_until
    }

    /// Handles what is queued for at most [`TURN`]; once the queue is empty, pauses
    /// reading for [`PAUSE`]. Never blocks.
    pub fn read_some(&mut self) {
        let emptied = self.read(Some(TURN));
        self.paused_until = emptied.then(|| Instant::now() + PAUSE);
    }

    /// Handles everything still queued (once the step's processes are gone) and
    /// returns the set; prints a summary on the console.
    pub fn finish(mut self) -> ReadSet {
        self.read(None);
        let c = &self.counts;
        let (files, dirs) = (self.set.files.len(), self.set.dirs.len());
        info!(
            "read {files} file(s) and {dirs} dir(s) under /workspace ({} open event(s), {} by act or PID 1 not counted; {:.1} ms of CPU)",
            c.events,
            c.ignored,
            c.cpu.as_secs_f64() * 1000.0
        );
        if let Some(why) = self.set.incomplete() {
            warning!("the read set is incomplete ({why}): the step cannot be cached");
        }
        self.set.into_read_set()
    }

    /// Reads the queue until it is empty (then true) or `budget` is spent.
    fn read(&mut self, budget: Option<Duration>) -> bool {
        let (started, cpu) = (Instant::now(), cpu_time());
        let emptied = loop {
            if budget.is_some_and(|b| started.elapsed() >= b) {
                break false;
            }
            match self.fan.read_events() {
                Ok(events) if events.is_empty() => break true,
                Ok(events) => events.into_iter().for_each(|e| self.handle(e)),
                Err(Errno::EAGAIN) => break true,
                Err(Errno::EINTR) => {}
                // The kernel drops an event it could not open an fd for.
                Err(e) => {
                    self.set.mark_incomplete(|| format!("reading events: {e}"));
                    break true;
                }
            }
        };
        self.counts.cpu += cpu_time().saturating_sub(cpu);
        emptied
    }

    /// One event: its fd is closed when `event` drops, at the end of this call.
    fn handle(&mut self, event: FanotifyEvent) {
        self.counts.events += 1;
        let mask = event.mask();
        if mask.contains(MaskFlags::FAN_Q_OVERFLOW) || !event.check_version() {
            self.set
                .mark_incomplete(|| "events lost (queue overflow or new event format)".into());
            return;
        }
        if self.ignored.contains(&event.pid()) {
            self.counts.ignored += 1;
            return;
        }
        let Some(fd) = event.fd() else {
            self.set
                .mark_incomplete(|| "an event without a file".into());
            return;
        };
        if let Err(why) = self.record(fd) {
            self.set.mark_incomplete(|| why);
        }
    }

    /// Adds the path `fd` is open on if it is under the workspace; `Err` says why the
    /// set misses it.
    fn record(&mut self, fd: BorrowedFd<'_>) -> Result<(), String> {
        // The path first: most opens are outside the workspace and need nothing more.
        let path = path_of(self.proc_fd.as_fd(), fd)
            .map_err(|e| format!("path of an opened file: {e}"))?;
        let rel = match place(&self.workspace, &path) {
            Place::Inside(rel) => rel,
            Place::Outside => return Ok(()),
            Place::NotUtf8 => {
                return Err(format!(
                    "a path that is not UTF-8: {}",
                    path.to_string_lossy()
                ))
            }
        };
        let kind = kind_of(fd).map_err(|e| format!("type of {}: {e}", path.display()))?;
        self.set.add(kind, &rel);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    use super::*;

    #[test]
    fn paths_are_placed_by_whole_components() {
        let ws = Path::new("/r/workspace");
        assert_eq!(
            place(ws, Path::new("/r/workspace/src/a.rs")),
            Place::Inside("src/a.rs".into())
        );
        assert_eq!(
            place(ws, Path::new("/r/workspace")),
            Place::Inside(".".into())
        );
        assert_eq!(place(ws, Path::new("/r/workspace2/a")), Place::Outside);
        assert_eq!(place(ws, Path::new("/r/usr/lib/x.so")), Place::Outside);
        let bad = Path::new(OsStr::from_bytes(b"/r/workspace/\xff"));
        assert_eq!(place(ws, bad), Place::NotUtf8);
    }

    #[test]
    fn the_set_is_sorted_deduplicated_and_keeps_kinds_apart() {
        let mut c = Collector::default();
        for (kind, rel) in [
            (Kind::File, "b.txt"),
            (Kind::File, "a.txt"),
            (Kind::Dir, "src"),
            (Kind::File, "b.txt"),
            (Kind::Dir, "."),
            (Kind::File, "src"),
        ] {
            c.add(kind, rel);
        }
        let set = c.into_read_set();
        assert_eq!(set.files, ["a.txt", "b.txt", "src"]);
        assert_eq!(set.dirs, [".", "src"]);
        assert!(!set.truncated);
    }

    #[test]
    fn past_the_entry_bound_the_set_is_truncated() {
        let mut c = Collector::default();
        for i in 0..MAX_READ_ENTRIES {
            c.add(Kind::File, &i.to_string());
        }
        assert_eq!(c.incomplete(), None);
        c.add(Kind::File, "0");
        assert_eq!(c.incomplete(), None, "a path already there costs nothing");
        c.add(Kind::Dir, "one-more");
        assert!(c.incomplete().is_some());
        let set = c.into_read_set();
        assert_eq!((set.files.len(), set.dirs.len()), (MAX_READ_ENTRIES, 0));
        assert!(set.truncated);
    }

    #[test]
    fn past_the_byte_bound_the_set_is_truncated_counting_json_escapes() {
        assert_eq!(json_cost("ab"), 5);
        assert_eq!(json_cost("a\"b"), 7);
        assert_eq!(json_cost("\u{1}"), 9);
        let mut c = Collector::default();
        // Control bytes take 6 bytes each in JSON: the bound counts them so.
        let long = "\u{1}".repeat(4000);
        let fit = MAX_READ_BYTES / json_cost(&format!("{long}0000"));
        for i in 0..fit {
            c.add(Kind::File, &format!("{long}{i:04}"));
        }
        assert_eq!(c.incomplete(), None);
        c.add(Kind::File, &format!("{long}{fit:04}"));
        let set = c.into_read_set();
        assert!(set.truncated);
        assert_eq!(set.files.len(), fit);
        let json = serde_json::to_string(&set.files).unwrap();
        assert!(json.len() <= MAX_READ_BYTES, "{}", json.len());
    }

    #[test]
    fn a_deleted_file_resolves_to_its_name_and_a_name_ending_in_deleted_is_kept() {
        let proc_fd = open_proc_fd().unwrap();
        let path_of = |fd| path_of(proc_fd.as_fd(), fd);
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone.txt");
        std::fs::write(&gone, "x").unwrap();
        let open = std::fs::File::open(&gone).unwrap();
        std::fs::remove_file(&gone).unwrap();
        assert_eq!(path_of(open.as_fd()).unwrap(), gone);
        assert_eq!(kind_of(open.as_fd()).unwrap(), Kind::File);

        let odd = dir.path().join("odd (deleted)");
        std::fs::write(&odd, "y").unwrap();
        let open = std::fs::File::open(&odd).unwrap();
        assert_eq!(path_of(open.as_fd()).unwrap(), odd);

        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let open = std::fs::File::open(&sub).unwrap();
        std::fs::remove_dir(&sub).unwrap();
        assert_eq!(path_of(open.as_fd()).unwrap(), sub);
        assert_eq!(kind_of(open.as_fd()).unwrap(), Kind::Dir);
    }
}
