//! Console plumbing: a thread that splits the guest's serial output into lines, hands
//! each to the caller's callback and keeps the output in `console.log`, bounded
//! ([`CONSOLE_LOG_MAX`]); the FIFO cloud-hypervisor writes its serial port into; a
//! watcher for the hypervisor's stderr.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};

use crate::{ConsoleCallback, LineFilter};

/// Lines longer than this are cut and delivered in pieces.
const MAX_LINE: usize = 64 * 1024;

/// The most of a guest's console the host keeps in `console.log`: the guest decides
/// how much it prints, and a step (or a service VM left running for weeks) must not
/// fill the host's disk. 16 MiB is thousands of times a normal step's console, and
/// still opens in an editor. Past it the log keeps the first half and the last half
/// (where the error usually is), with [`CUT_MARKER`] between them; the live
/// callback still sees every line.
pub const CONSOLE_LOG_MAX: u64 = 16 << 20;

/// Written once where the console log was cut.
pub(crate) const CUT_MARKER: &[u8] =
    b"\n[udos-vmm: console output cut here: the log keeps its first and its last part]\n";

/// A running console pump.
pub(crate) struct Pump {
    handle: Option<JoinHandle<()>>,
    first_line: Arc<OnceLock<Instant>>,
}

impl Pump {
    /// Reads `reader` until EOF, splitting on `\n` (a trailing `\r` is dropped), and
    /// calls `callback` per line; copies every byte to `log` if given, or with a
    /// `filter`, each line as the filter rewrites it, keeping at most
    /// [`CONSOLE_LOG_MAX`] bytes. A panicking callback is dropped (logged once) and
    /// the log goes on.
    pub(crate) fn start<R: Read + Send + 'static>(
        name: &str,
        reader: R,
        log: Option<File>,
        callback: Option<ConsoleCallback>,
        filter: Option<LineFilter>,
    ) -> io::Result<Pump> {
        Self::start_bounded(name, reader, log, callback, filter, CONSOLE_LOG_MAX)
    }

    fn start_bounded<R: Read + Send + 'static>(
        name: &str,
        mut reader: R,
        log: Option<File>,
        callback: Option<ConsoleCallback>,
        filter: Option<LineFilter>,
        log_max: u64,
    ) -> io::Result<Pump> {
        let first_line = Arc::new(OnceLock::new());
        let log = log.map(|f| BoundedLog::new(f, log_max)).transpose()?;
        let mut sink = Sink {
            vm: name.to_string(),
            first: first_line.clone(),
            callback,
            filter,
            log,
            line: Vec::new(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("console-{name}"))
            .spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => sink.feed(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            tracing::warn!(vm = sink.vm, "reading the console: {e}");
                            break;
                        }
                    }
                }
                sink.end();
            })?;
        Ok(Pump {
            handle: Some(handle),
            first_line,
        })
    }

    /// When the first line was complete, if any yet.
    pub(crate) fn first_line(&self) -> Option<Instant> {
        self.first_line.get().copied()
    }

    /// Waits (up to `limit`) for the pump to drain its input.
    pub(crate) fn finish(mut self, limit: Duration) -> Option<Instant> {
        if let Some(h) = self.handle.take() {
            join_for(h, limit, "console");
        }
        self.first_line()
    }
}

/// Where the pump puts what it reads: lines to the callback, bytes (or filtered
/// lines) to the log.
struct Sink {
    vm: String,
    first: Arc<OnceLock<Instant>>,
    callback: Option<ConsoleCallback>,
    filter: Option<LineFilter>,
    log: Option<BoundedLog>,
    line: Vec<u8>,
}

impl Sink {
    fn feed(&mut self, chunk: &[u8]) {
        if self.filter.is_none() {
            self.keep(chunk);
        }
        for part in chunk.split_inclusive(|&b| b == b'\n') {
            match part.strip_suffix(b"\n") {
                Some(body) => {
                    self.line.extend_from_slice(body);
                    self.deliver();
                }
                None => {
                    self.line.extend_from_slice(part);
                    if self.line.len() >= MAX_LINE {
                        self.deliver();
                    }
                }
            }
        }
    }

    fn deliver(&mut self) {
        let _ = self.first.set(Instant::now());
        if self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        let text = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        if let Some(f) = self.filter.clone() {
            let mut kept = f(&text);
            kept.push('\n');
            self.keep(kept.as_bytes());
        }
        if let Some(cb) = self.callback.as_mut() {
            if std::panic::catch_unwind(AssertUnwindSafe(|| cb(&text))).is_err() {
                tracing::warn!(vm = self.vm, "the console callback panicked; dropping it");
                self.callback = None;
            }
        }
    }

    fn keep(&mut self, bytes: &[u8]) {
        if let Some(l) = self.log.as_mut() {
            if let Err(e) = l.write_all(bytes) {
                tracing::warn!(vm = self.vm, "writing console.log: {e}");
                self.log = None;
            }
        }
    }

    fn end(mut self) {
        if !self.line.is_empty() {
            self.deliver();
        }
        if let Some(l) = self.log.take() {
            match l.finish() {
                Ok(0) => {}
                Ok(cut) => tracing::info!(
                    vm = self.vm,
                    cut,
                    "console.log reached its bound; bytes left out at the cut"
                ),
                Err(e) => tracing::warn!(vm = self.vm, "finishing console.log: {e}"),
            }
        }
    }
}

/// A log file that never grows much past its bound: the first `head` bytes are kept,
/// then [`CUT_MARKER`], then the most recent output. The tail region may grow to twice
/// its size before it is compacted (so compaction copies once per tail's worth of
/// output), and [`BoundedLog::finish`] brings the file within `max`.
pub(crate) struct BoundedLog {
    file: File,
    /// The same file opened for reading (the drivers open the log write-only), for
    /// compaction.
    reader: File,
    head: u64,
    tail: u64,
    len: u64,
    /// Where the tail region starts, once the head is full.
    cut_at: Option<u64>,
    dropped: u64,
}

impl BoundedLog {
    pub(crate) fn new(file: File, max: u64) -> io::Result<BoundedLog> {
        // Compaction writes at offsets, which O_APPEND would turn into appends.
        clear_flag(&file, OFlag::O_APPEND)?;
        let reader = File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        let mut file = file;
        let len = file.seek(SeekFrom::End(0))?;
        let head = max / 2;
        let tail = (max - head).saturating_sub(CUT_MARKER.len() as u64).max(1);
        Ok(BoundedLog {
            file,
            reader,
            head,
            tail,
            len,
            cut_at: None,
            dropped: 0,
        })
    }

    /// Compacts the tail and flushes; returns how many bytes were left out.
    pub(crate) fn finish(mut self) -> io::Result<u64> {
        self.compact(self.tail)?;
        self.file.flush()?;
        Ok(self.dropped)
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Keeps only the last `tail` bytes of the tail region if it holds more than
    /// `over` bytes.
    fn compact(&mut self, over: u64) -> io::Result<()> {
        let Some(cut) = self.cut_at else {
            return Ok(());
        };
        let region = self.len - cut;
        if region <= over {
            return Ok(());
        }
        let from = self.len - self.tail;
        let mut buf = vec![0u8; 1 << 16];
        let mut done = 0;
        // Forward copy: the destination is always before the source.
        while done < self.tail {
            let n = buf.len().min((self.tail - done) as usize);
            self.reader.read_exact_at(&mut buf[..n], from + done)?;
            self.file.write_all_at(&buf[..n], cut + done)?;
            done += n as u64;
        }
        self.dropped += region - self.tail;
        self.len = cut + self.tail;
        self.file.set_len(self.len)?;
        self.file.seek(SeekFrom::Start(self.len))?;
        Ok(())
    }
}

impl Write for BoundedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        if self.cut_at.is_none() {
            let room = self.head.saturating_sub(self.len) as usize;
            if rest.len() <= room {
                self.append(rest)?;
                return Ok(buf.len());
            }
            self.append(&rest[..room])?;
            rest = &rest[room..];
            self.append(CUT_MARKER)?;
            self.cut_at = Some(self.len);
        }
        self.append(rest)?;
        self.compact(2 * self.tail)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// The named pipe cloud-hypervisor writes the guest's serial port into (its `File`
/// mode), so the console reaches the host as a stream, like QEMU's stdout, and is
/// kept bounded by the [`Pump`] instead of growing as a file the hypervisor owns.
///
/// The host holds a write end of its own until the hypervisor is gone, so the reader
/// sees no end of file before the hypervisor opens the pipe (at `vm.boot`) or
/// between a guest reset and the reopening; [`SerialFifo::close`] drops it, and the
/// reader then ends once the buffered output is read.
pub(crate) struct SerialFifo {
    keeper: Option<File>,
}

impl SerialFifo {
    /// Makes the FIFO at `path` (mode 0600) and returns it with its reader.
    pub(crate) fn create(path: &Path) -> io::Result<(SerialFifo, File)> {
        nix::unistd::mkfifo(
            path,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )?;
        // Open the read end without blocking (no writer yet), then make reads block.
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        let keeper = OpenOptions::new().write(true).open(path)?;
        clear_flag(&reader, OFlag::O_NONBLOCK)?;
        Ok((
            SerialFifo {
                keeper: Some(keeper),
            },
            reader,
        ))
    }

    /// Drops the host's write end: call once the hypervisor is reaped.
    pub(crate) fn close(&mut self) {
        self.keeper = None;
    }
}

fn clear_flag(f: &File, flag: OFlag) -> io::Result<()> {
    let fd = f.as_raw_fd();
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags - flag))?;
    Ok(())
}

/// Joins a thread, giving up (and leaving it detached) after `limit`.
pub(crate) fn join_for(h: JoinHandle<()>, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    while !h.is_finished() {
        if Instant::now() >= deadline {
            tracing::warn!("the {what} reader did not finish in {limit:?}; detaching it");
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = h.join();
}

/// Collects a hypervisor's stderr into a file and watches it for fatal messages.
pub(crate) struct StderrWatch {
    handle: Option<JoinHandle<()>>,
    fatal: Arc<OnceLock<String>>,
    tail: Arc<Mutex<Vec<u8>>>,
}

/// QEMU stays alive (paused) after these, so they end the VM at once.
const FATAL: &[&str] = &["KVM internal error", "kvm run failed"];
const TAIL_MAX: usize = 8 * 1024;

impl StderrWatch {
    pub(crate) fn start<R: Read + Send + 'static>(
        mut reader: R,
        mut file: File,
    ) -> io::Result<StderrWatch> {
        let fatal = Arc::new(OnceLock::new());
        let tail = Arc::new(Mutex::new(Vec::new()));
        let (f2, t2) = (fatal.clone(), tail.clone());
        let handle = std::thread::Builder::new()
            .name("hypervisor-stderr".into())
            .spawn(move || {
                let mut buf = vec![0u8; 8 * 1024];
                loop {
                    let n = match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    };
                    let _ = file.write_all(&buf[..n]);
                    let mut t = t2.lock().unwrap_or_else(|p| p.into_inner());
                    t.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&t).into_owned();
                    if f2.get().is_none() {
                        if let Some(line) = text
                            .lines()
                            .find(|l| FATAL.iter().any(|pat| l.contains(pat)))
                        {
                            let _ = f2.set(line.trim().to_string());
                        }
                    }
                    if t.len() > TAIL_MAX {
                        let cut = t.len() - TAIL_MAX;
                        t.drain(..cut);
                    }
                }
            })?;
        Ok(StderrWatch {
            handle: Some(handle),
            fatal,
            tail,
        })
    }

    /// The first fatal line seen, if any.
    pub(crate) fn fatal(&self) -> Option<String> {
        self.fatal.get().cloned()
    }

    /// Waits for EOF (up to `limit`) and returns the last few KiB of stderr.
    pub(crate) fn finish(mut self, limit: Duration) -> String {
        if let Some(h) = self.handle.take() {
            join_for(h, limit, "stderr");
        }
        let t = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&t).trim().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pump_splits_lines_and_keeps_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let l2 = lines.clone();
        let input: &[u8] = b"one\r\ntwo\n\nthree";
        let pump = Pump::start(
            "t",
            input,
            Some(File::create(&log).unwrap()),
            Some(Box::new(move |s: &str| {
                l2.lock().unwrap().push(s.to_string())
            })),
            None,
        )
        .unwrap();
        assert!(pump.finish(Duration::from_secs(5)).is_some());
        assert_eq!(*lines.lock().unwrap(), vec!["one", "two", "", "three"]);
        assert_eq!(std::fs::read(&log).unwrap(), input);
    }

    #[test]
    fn a_filter_rewrites_each_line_kept_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let input: &[u8] = b"token=hunter2\r\nplain\nhunter2 again";
        let filter: LineFilter = Arc::new(|l: &str| l.replace("hunter2", "***"));
        let pump = Pump::start(
            "t",
            input,
            Some(File::create(&log).unwrap()),
            None,
            Some(filter),
        )
        .unwrap();
        pump.finish(Duration::from_secs(5));
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "token=***\nplain\n*** again\n"
        );
    }

    #[test]
    fn a_panicking_callback_does_not_stop_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let input: &[u8] = b"a\nb\nc\n";
        let pump = Pump::start(
            "t",
            input,
            Some(File::create(&log).unwrap()),
            Some(Box::new(|_: &str| panic!("boom"))),
            None,
        )
        .unwrap();
        pump.finish(Duration::from_secs(5));
        assert_eq!(std::fs::read(&log).unwrap(), input);
    }

    #[test]
    fn the_fifo_streams_across_writers_and_ends_when_closed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("serial.fifo");
        let (mut fifo, reader) = SerialFifo::create(&p).unwrap();
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let l2 = lines.clone();
        let pump = Pump::start(
            "t",
            reader,
            Some(File::create(dir.path().join("console.log")).unwrap()),
            Some(Box::new(move |s: &str| {
                l2.lock().unwrap().push(s.to_string())
            })),
            None,
        )
        .unwrap();
        // Nobody has opened it yet: the pump must not see an end of file.
        std::thread::sleep(Duration::from_millis(100));
        // A writer that opens, writes and closes, twice (a guest reset reopens it).
        for text in [&b"first\n"[..], b"second\nlast"] {
            let mut w = OpenOptions::new().write(true).open(&p).unwrap();
            w.write_all(text).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while lines.lock().unwrap().len() < 2 {
            assert!(Instant::now() < deadline, "{:?}", lines.lock().unwrap());
            std::thread::sleep(Duration::from_millis(5));
        }
        fifo.close();
        assert!(pump.finish(Duration::from_secs(5)).is_some());
        assert_eq!(*lines.lock().unwrap(), vec!["first", "second", "last"]);
        assert_eq!(
            std::fs::read(dir.path().join("console.log")).unwrap(),
            b"first\nsecond\nlast"
        );
    }

    /// Feeds `lines` numbered lines of `width` bytes through a pump whose log is
    /// bounded at `max`; returns the log and how many lines the callback saw.
    fn pump_many(
        lines: usize,
        width: usize,
        max: u64,
        filter: Option<LineFilter>,
    ) -> (Vec<u8>, usize) {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let mut input = Vec::new();
        for i in 0..lines {
            let mut l = format!("line {i:08} ");
            l.extend(std::iter::repeat_n('x', width.saturating_sub(l.len() + 1)));
            input.extend_from_slice(l.as_bytes());
            input.push(b'\n');
        }
        let seen = Arc::new(Mutex::new(0usize));
        let s2 = seen.clone();
        // Opened for appending, as the drivers open it.
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let pump = Pump::start_bounded(
            "t",
            std::io::Cursor::new(input),
            Some(file),
            Some(Box::new(move |_: &str| *s2.lock().unwrap() += 1)),
            filter,
            max,
        )
        .unwrap();
        pump.finish(Duration::from_secs(60));
        let n = *seen.lock().unwrap();
        (std::fs::read(&log).unwrap(), n)
    }

    #[test]
    fn a_log_within_its_bound_is_kept_whole() {
        let (log, seen) = pump_many(100, 50, 64 << 10, None);
        assert_eq!(log.len(), 100 * 50);
        assert_eq!(seen, 100);
        assert!(!log.windows(CUT_MARKER.len()).any(|w| w == CUT_MARKER));
    }

    #[test]
    fn a_chatty_guest_keeps_the_head_and_the_tail_within_the_bound() {
        let max = 64 << 10;
        // 1 MiB of output through a 64 KiB bound: several compactions.
        let (log, seen) = pump_many(20_000, 50, max, None);
        assert_eq!(seen, 20_000, "the callback sees every line");
        assert_eq!(log.len() as u64, max, "exactly at the bound");
        let text = String::from_utf8_lossy(&log);
        assert!(text.starts_with("line 00000000 "), "the head is kept");
        assert!(text.ends_with(&format!("line {:08} {}\n", 19_999, "x".repeat(35))));
        let cut = text.find(std::str::from_utf8(CUT_MARKER).unwrap()).unwrap();
        assert_eq!(cut as u64, max / 2, "the head is half the bound");
        assert_eq!(text.matches("console output cut here").count(), 1);
        // The tail is the most recent output, contiguous: line numbers ascend by one.
        let tail = &text[cut + CUT_MARKER.len()..];
        let numbers: Vec<u32> = tail
            .lines()
            .skip(1) // the first may be a fragment
            .map(|l| l[5..13].parse().unwrap())
            .collect();
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1));
        assert_eq!(*numbers.last().unwrap(), 19_999);
    }

    #[test]
    fn the_bound_holds_for_filtered_logs_and_at_the_real_size() {
        let filter: LineFilter = Arc::new(|l: &str| l.replace('x', "*"));
        // 24 MiB through the real 16 MiB bound.
        let (log, seen) = pump_many(24 << 14, 64, CONSOLE_LOG_MAX, Some(filter));
        assert_eq!(seen, 24 << 14);
        assert_eq!(log.len() as u64, CONSOLE_LOG_MAX);
        assert!(!log.contains(&b'x'), "filtered lines are what is kept");
    }

    #[test]
    fn stderr_watch_flags_kvm_errors() {
        let dir = tempfile::tempdir().unwrap();
        let input: &[u8] = b"warning: x\nKVM internal error. Suberror: 1\nmore\n";
        let w = StderrWatch::start(input, File::create(dir.path().join("e")).unwrap()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while w.fatal().is_none() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(w.fatal().unwrap(), "KVM internal error. Suberror: 1");
        assert!(w.finish(Duration::from_secs(5)).ends_with("more"));
    }
}
