//! An interactive console: a terminal attached to the guest's serial port.
//!
//! [`Attach`] says where keystrokes come from and where the guest's output goes. While
//! the VM runs, the terminal is in raw mode ([`RawMode`]: every key, Ctrl-C included,
//! is a byte for the guest, and the guest echoes), a thread forwards the input to the
//! hypervisor's serial input ([`Forwarder`]), and the console pump copies the guest's
//! output to the terminal as it comes ([`Tee`]), partial lines (a prompt) included.
//! The escape byte ([`ESCAPE`], Ctrl-]) detaches: the VM is stopped.
//!
//! Input is held until the guest says it reads its console ([`Attach::input_after`]):
//! bytes that reach the emulated serial port while the guest boots are lost or
//! mangled (the UART's FIFO is reset when the port is set up, and the line discipline
//! treats control characters its own way before the shell takes the terminal).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::termios::{self, SetArg, Termios};

/// Ctrl-] (as in telnet and `virsh console`): rarely needed inside a shell, one key.
pub const ESCAPE: u8 = 0x1d;

/// How often the forwarder looks at its flags while the input is quiet.
const POLL_MS: i32 = 50;
/// The most input held while the guest boots; past it the input is left unread.
const MAX_HELD: usize = 64 << 10;

/// A terminal (or any readable descriptor) attached to a VM's serial console.
pub struct Attach {
    /// Keystrokes. When it is a terminal it is put in raw mode for the VM's life.
    pub input: OwnedFd,
    /// Where the guest's console output goes, byte for byte, as it comes.
    pub output: Box<dyn Write + Send>,
    /// Reading this byte detaches: the VM is stopped at once. `None`: no escape.
    pub escape: Option<u8>,
    /// Input is held (read, and the escape byte honoured, but not sent) until the
    /// guest's output contains these bytes. `None`: sent from the start.
    pub input_after: Option<Vec<u8>>,
}

impl Attach {
    /// This process's stdin and stdout, with [`ESCAPE`], input sent from the start.
    pub fn stdio() -> io::Result<Attach> {
        Ok(Attach {
            input: io::stdin().as_fd().try_clone_to_owned()?,
            output: Box::new(io::stdout()),
            escape: Some(ESCAPE),
            input_after: None,
        })
    }
}

/// A terminal in raw mode; its previous settings come back when this is dropped (also
/// when the caller unwinds).
pub struct RawMode {
    fd: OwnedFd,
    saved: Termios,
}

impl RawMode {
    /// Puts the terminal `fd` in raw mode; `None` when `fd` is not a terminal.
    pub fn enter(fd: BorrowedFd<'_>) -> io::Result<Option<RawMode>> {
        if !nix::unistd::isatty(fd.as_raw_fd()).unwrap_or(false) {
            return Ok(None);
        }
        let fd = fd.try_clone_to_owned()?;
        let saved = termios::tcgetattr(&fd)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&fd, SetArg::TCSANOW, &raw)?;
        Ok(Some(RawMode { fd, saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // TCSADRAIN: what the guest printed last is on the screen before the settings
        // change back.
        if let Err(e) = termios::tcsetattr(&self.fd, SetArg::TCSADRAIN, &self.saved) {
            tracing::warn!("restoring the terminal's settings: {e}");
        }
    }
}

/// A reader that copies what it reads to `copy` (the terminal) before handing it on
/// (to the console pump, which keeps `console.log`), and sets `ready` once `marker`
/// has gone by. Errors writing the copy are ignored: a terminal that went away must
/// not stop the log.
pub(crate) struct Tee<R> {
    inner: R,
    copy: Box<dyn Write + Send>,
    marker: Option<Marker>,
}

/// Looks for a byte string in a stream read in pieces.
struct Marker {
    pattern: Vec<u8>,
    /// The end of what was read so far: a match may start in it.
    tail: Vec<u8>,
    ready: Arc<AtomicBool>,
}

impl Marker {
    fn feed(&mut self, chunk: &[u8]) -> bool {
        self.tail.extend_from_slice(chunk);
        let found = self
            .tail
            .windows(self.pattern.len())
            .any(|w| w == self.pattern.as_slice());
        let keep = self.pattern.len().saturating_sub(1);
        let cut = self.tail.len().saturating_sub(keep);
        self.tail.drain(..cut);
        found
    }
}

impl<R: Read> Tee<R> {
    /// `ready` is set once `marker` was read; with no (or an empty) marker, at once.
    pub(crate) fn new(
        inner: R,
        copy: Box<dyn Write + Send>,
        marker: Option<Vec<u8>>,
        ready: Arc<AtomicBool>,
    ) -> Tee<R> {
        let marker = match marker.filter(|m| !m.is_empty()) {
            Some(pattern) => Some(Marker {
                pattern,
                tail: Vec::new(),
                ready,
            }),
            None => {
                ready.store(true, Ordering::Release);
                None
            }
        };
        Tee {
            inner,
            copy,
            marker,
        }
    }
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            let _ = self.copy.write_all(&buf[..n]);
            let _ = self.copy.flush();
            if let Some(m) = self.marker.as_mut() {
                if m.feed(&buf[..n]) {
                    m.ready.store(true, Ordering::Release);
                    self.marker = None;
                }
            }
        }
        Ok(n)
    }
}

/// The thread that forwards input to the guest until it is finished, the input ends,
/// the guest's side closes, or the escape byte is read.
pub(crate) struct Forwarder {
    handle: Option<JoinHandle<()>>,
    done: Arc<AtomicBool>,
    detached: Arc<AtomicBool>,
}

impl Forwarder {
    /// Starts forwarding `input` to `guest`, holding it until `ready`. The end of the
    /// input is not sent on (a script piped in ends the shell with `exit`): a byte
    /// meaning "end of file" would depend on the guest terminal's mode when it lands.
    pub(crate) fn start<W: Write + Send + 'static>(
        input: OwnedFd,
        guest: W,
        escape: Option<u8>,
        ready: Arc<AtomicBool>,
    ) -> io::Result<Forwarder> {
        let done = Arc::new(AtomicBool::new(false));
        let detached = Arc::new(AtomicBool::new(false));
        let flags = Flags {
            done: done.clone(),
            detached: detached.clone(),
            ready,
        };
        let handle = std::thread::Builder::new()
            .name("console-input".into())
            .spawn(move || forward(input, guest, escape, &flags))?;
        Ok(Forwarder {
            handle: Some(handle),
            done,
            detached,
        })
    }

    /// Whether the escape byte was read.
    pub(crate) fn detached(&self) -> bool {
        self.detached.load(Ordering::Acquire)
    }

    /// Stops the thread (within one poll interval) and waits for it.
    fn stop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            crate::console::join_for(h, Duration::from_secs(2), "console input");
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An attached terminal while its VM runs: raw mode and the input forwarder. Dropping
/// it stops the forwarder and gives the terminal its settings back.
pub(crate) struct Session {
    // Field order is drop order: the forwarder stops reading before the terminal
    // leaves raw mode.
    forwarder: Forwarder,
    _raw: Option<RawMode>,
}

impl Session {
    /// Puts the terminal in raw mode, forwards `attach.input` to `guest_input`, and
    /// returns the reader of the guest's `console` output to hand to the console pump,
    /// which then also copies it to `attach.output`.
    pub(crate) fn start<W, R>(
        attach: Attach,
        guest_input: W,
        console: R,
    ) -> io::Result<(Session, Box<dyn Read + Send>)>
    where
        W: Write + Send + 'static,
        R: Read + Send + 'static,
    {
        let raw = RawMode::enter(attach.input.as_fd())?;
        let ready = Arc::new(AtomicBool::new(false));
        let reader = Box::new(Tee::new(
            console,
            attach.output,
            attach.input_after,
            ready.clone(),
        ));
        let forwarder = Forwarder::start(attach.input, guest_input, attach.escape, ready)?;
        Ok((
            Session {
                forwarder,
                _raw: raw,
            },
            reader,
        ))
    }

    /// Whether the escape byte was read.
    pub(crate) fn detached(&self) -> bool {
        self.forwarder.detached()
    }
}

/// Whether `fd` has input within [`POLL_MS`].
fn readable(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd on the stack, for a descriptor borrowed for the call.
    let rc = unsafe { libc::poll(&mut p, 1, POLL_MS) };
    match rc {
        -1 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        // POLLHUP / POLLERR: the read that follows says what happened.
        _ => Ok(true),
    }
}

/// What the forwarder shares with the VM's loop and the console reader.
struct Flags {
    /// Set by the VM's side: stop.
    done: Arc<AtomicBool>,
    /// Set here: the escape byte was read.
    detached: Arc<AtomicBool>,
    /// Set by the console reader: the guest reads its console now.
    ready: Arc<AtomicBool>,
}

fn send<W: Write>(guest: &mut W, bytes: &[u8]) -> bool {
    bytes.is_empty() || guest.write_all(bytes).and_then(|_| guest.flush()).is_ok()
}

fn forward<W: Write>(input: OwnedFd, mut guest: W, escape: Option<u8>, flags: &Flags) {
    let mut file = File::from(input);
    let mut buf = [0u8; 4096];
    let mut held: Vec<u8> = Vec::new();
    let mut ended = false;
    let pause = || std::thread::sleep(Duration::from_millis(POLL_MS as u64));
    while !flags.done.load(Ordering::Acquire) {
        let ready = flags.ready.load(Ordering::Acquire);
        // A failed write means the hypervisor closed its input: it is ending.
        if ready && !send(&mut guest, &std::mem::take(&mut held)) {
            return;
        }
        if ended {
            // Nothing more to read; what is held still goes once the guest is ready.
            if ready {
                return;
            }
            pause();
            continue;
        }
        if !ready && held.len() >= MAX_HELD {
            pause();
            continue;
        }
        match readable(file.as_fd()) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!("waiting for console input: {e}");
                return;
            }
        }
        let n = match file.read(&mut buf) {
            Ok(0) => {
                ended = true;
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            // A terminal that hung up (EIO): nothing more will come.
            Err(_) => return,
        };
        let chunk = &buf[..n];
        let (keys, escaped) = match escape.and_then(|e| chunk.iter().position(|&b| b == e)) {
            Some(at) => (&chunk[..at], true),
            None => (chunk, false),
        };
        if !ready {
            held.extend_from_slice(keys);
        } else if !send(&mut guest, keys) {
            return;
        }
        if escaped {
            flags.detached.store(true, Ordering::Release);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Instant;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn bytes(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
    }

    fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        f()
    }

    fn pipe() -> (File, OwnedFd) {
        let (r, w) = nix::unistd::pipe().unwrap();
        (File::from(w), r)
    }

    #[test]
    fn input_is_forwarded_until_the_escape_byte_which_detaches() {
        let (mut keys, input) = pipe();
        let guest = Shared::default();
        let fwd = Forwarder::start(input, guest.clone(), Some(ESCAPE), ready()).unwrap();
        keys.write_all(b"ls\r\x03").unwrap();
        assert!(wait_until(Duration::from_secs(5), || guest.bytes() == b"ls\r\x03"));
        assert!(!fwd.detached());
        keys.write_all(b"ab\x1dcd").unwrap();
        assert!(wait_until(Duration::from_secs(5), || fwd.detached()));
        // Nothing after the escape byte reaches the guest.
        assert_eq!(guest.bytes(), b"ls\r\x03ab");
        drop(fwd);
    }

    #[test]
    fn stopping_returns_while_the_input_is_quiet() {
        let (_keys, input) = pipe();
        let fwd = Forwarder::start(input, Shared::default(), None, ready()).unwrap();
        let t = Instant::now();
        drop(fwd);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }

    fn ready() -> Arc<AtomicBool> {
        Arc::new(AtomicBool::new(true))
    }

    #[test]
    fn input_is_held_until_the_guest_is_ready_but_the_escape_byte_is_not() {
        let (mut keys, input) = pipe();
        let guest = Shared::default();
        let flag = Arc::new(AtomicBool::new(false));
        let fwd = Forwarder::start(input, guest.clone(), Some(ESCAPE), flag.clone()).unwrap();
        keys.write_all(b"early\r").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(guest.bytes(), b"", "sent before the guest was ready");
        flag.store(true, Ordering::Release);
        assert!(wait_until(Duration::from_secs(5), || guest.bytes() == b"early\r"));
        drop(fwd);

        let (mut keys, input) = pipe();
        let fwd = Forwarder::start(input, Shared::default(), Some(ESCAPE), Arc::default()).unwrap();
        keys.write_all(b"\x1d").unwrap();
        assert!(wait_until(Duration::from_secs(5), || fwd.detached()));
    }

    /// A piped script that ends before the guest is ready is sent once it is, as it
    /// was (its end adds nothing).
    #[test]
    fn a_piped_input_that_ends_early_is_sent_once_the_guest_is_ready() {
        let (mut keys, input) = pipe();
        let guest = Shared::default();
        let flag = Arc::new(AtomicBool::new(false));
        let fwd = Forwarder::start(input, guest.clone(), None, flag.clone()).unwrap();
        keys.write_all(b"ls\n").unwrap();
        drop(keys);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(guest.bytes(), b"");
        flag.store(true, Ordering::Release);
        assert!(wait_until(Duration::from_secs(5), || guest.bytes() == b"ls\n"));
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(guest.bytes(), b"ls\n");
        drop(fwd);
    }

    #[test]
    fn tee_copies_what_it_reads_including_a_partial_line() {
        let copy = Shared::default();
        let flag = Arc::new(AtomicBool::new(false));
        let mut tee = Tee::new(
            &b"boot\n/ # "[..],
            Box::new(copy.clone()),
            None,
            flag.clone(),
        );
        assert!(flag.load(Ordering::Acquire), "no marker: ready at once");
        let mut out = Vec::new();
        tee.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"boot\n/ # ");
        assert_eq!(copy.bytes(), b"boot\n/ # ");
    }

    /// A reader that hands out its bytes a few at a time.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.1.min(self.0.len()).min(buf.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn tee_sees_the_marker_across_reads_and_not_before_it() {
        let flag = Arc::new(AtomicBool::new(false));
        let text = b"udos-init: loaded\nudos-init: /bin/sh started (pid 82)\n";
        let mut tee = Tee::new(
            Trickle(text, 5),
            Box::new(Shared::default()),
            Some(b"/bin/sh started".to_vec()),
            flag.clone(),
        );
        let mut buf = [0u8; 64];
        let mut seen = 0;
        while seen < text.len() {
            let before = flag.load(Ordering::Acquire);
            assert!(!before || seen >= 42, "ready after {seen} bytes");
            seen += tee.read(&mut buf).unwrap();
        }
        assert!(flag.load(Ordering::Acquire));
    }

    #[test]
    fn raw_mode_on_a_real_terminal_is_undone_on_drop() {
        let pty = nix::pty::openpty(None, None).unwrap();
        let before = termios::tcgetattr(&pty.slave).unwrap();
        assert!(before
            .local_flags
            .contains(termios::LocalFlags::ICANON | termios::LocalFlags::ISIG));
        let raw = RawMode::enter(pty.slave.as_fd()).unwrap().expect("a tty");
        let during = termios::tcgetattr(&pty.slave).unwrap();
        assert!(!during.local_flags.intersects(
            termios::LocalFlags::ICANON | termios::LocalFlags::ISIG | termios::LocalFlags::ECHO
        ));
        drop(raw);
        let after = termios::tcgetattr(&pty.slave).unwrap();
        assert_eq!(after.local_flags, before.local_flags);
        assert_eq!(after.input_flags, before.input_flags);
        assert_eq!(after.output_flags, before.output_flags);
    }

    #[test]
    fn raw_mode_leaves_a_pipe_alone() {
        let (_w, r) = pipe();
        assert!(RawMode::enter(r.as_fd()).unwrap().is_none());
    }
}
