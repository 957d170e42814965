//! Console plumbing: a thread that splits the guest's serial output into lines, hands
//! each to the caller's callback, and (for QEMU, whose console arrives on a pipe)
//! keeps the raw bytes in `console.log`; a reader that tails a file another process
//! writes (cloud-hypervisor's serial file); a watcher for the hypervisor's stderr.

use std::fs::File;
use std::io::{self, Read, Write};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{ConsoleCallback, LineFilter};

/// Lines longer than this are cut and delivered in pieces.
const MAX_LINE: usize = 64 * 1024;

/// A running console pump.
pub(crate) struct Pump {
    handle: Option<JoinHandle<()>>,
    first_line: Arc<OnceLock<Instant>>,
}

impl Pump {
    /// Reads `reader` until EOF, splitting on `\n` (a trailing `\r` is dropped), and
    /// calls `callback` per line; copies every byte to `log` if given, or with a
    /// `filter`, each line as the filter rewrites it. A panicking callback is dropped
    /// (logged once) and the log goes on.
    pub(crate) fn start<R: Read + Send + 'static>(
        name: &str,
        mut reader: R,
        mut log: Option<File>,
        mut callback: Option<ConsoleCallback>,
        filter: Option<LineFilter>,
    ) -> io::Result<Pump> {
        let first_line = Arc::new(OnceLock::new());
        let first = first_line.clone();
        let vm = name.to_string();
        let handle = std::thread::Builder::new()
            .name(format!("console-{name}"))
            .spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                let mut line: Vec<u8> = Vec::new();
                let mut filtered_log = if filter.is_some() { log.take() } else { None };
                let mut deliver = |line: &mut Vec<u8>, cb: &mut Option<ConsoleCallback>| {
                    let _ = first.set(Instant::now());
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    if let (Some(f), Some(l)) = (filter.as_ref(), filtered_log.as_mut()) {
                        let kept = f(&String::from_utf8_lossy(line));
                        if l.write_all(kept.as_bytes())
                            .and_then(|()| l.write_all(b"\n"))
                            .is_err()
                        {
                            filtered_log = None;
                        }
                    }
                    if let Some(f) = cb.as_mut() {
                        let text = String::from_utf8_lossy(line);
                        if std::panic::catch_unwind(AssertUnwindSafe(|| f(&text))).is_err() {
                            tracing::warn!(vm, "the console callback panicked; dropping it");
                            *cb = None;
                        }
                    }
                    line.clear();
                };
                loop {
                    let n = match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::warn!(vm, "reading the console: {e}");
                            break;
                        }
                    };
                    let chunk = &buf[..n];
                    if let Some(l) = log.as_mut() {
                        if let Err(e) = l.write_all(chunk) {
                            tracing::warn!(vm, "writing console.log: {e}");
                            log = None;
                        }
                    }
                    for part in chunk.split_inclusive(|&b| b == b'\n') {
                        if let Some(body) = part.strip_suffix(b"\n") {
                            line.extend_from_slice(body);
                            deliver(&mut line, &mut callback);
                        } else {
                            line.extend_from_slice(part);
                            if line.len() >= MAX_LINE {
                                deliver(&mut line, &mut callback);
                            }
                        }
                    }
                }
                if !line.is_empty() {
                    deliver(&mut line, &mut callback);
                }
                if let Some(l) = log.as_mut() {
                    let _ = l.flush();
                }
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

/// Reads a file that another process appends to. At end of file it waits and retries
/// until `stop` is set; then it drains what is left and reports EOF.
pub(crate) struct TailReader {
    file: File,
    stop: Arc<AtomicBool>,
}

impl TailReader {
    pub(crate) fn new(file: File, stop: Arc<AtomicBool>) -> Self {
        TailReader { file, stop }
    }
}

impl Read for TailReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // Read the flag before reading, so data written before it was set is seen.
            let stopping = self.stop.load(Ordering::Acquire);
            let n = self.file.read(buf)?;
            if n > 0 || stopping {
                return Ok(n);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
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
    fn tail_reader_follows_a_growing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("serial");
        let mut w = File::create(&p).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let l2 = lines.clone();
        let pump = Pump::start(
            "t",
            TailReader::new(File::open(&p).unwrap(), stop.clone()),
            None,
            Some(Box::new(move |s: &str| {
                l2.lock().unwrap().push(s.to_string())
            })),
            None,
        )
        .unwrap();
        w.write_all(b"first\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while lines.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        w.write_all(b"second\nlast").unwrap();
        stop.store(true, Ordering::Release);
        pump.finish(Duration::from_secs(5));
        assert_eq!(*lines.lock().unwrap(), vec!["first", "second", "last"]);
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
