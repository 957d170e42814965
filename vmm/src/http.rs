//! A minimal HTTP/1.1 client over a Unix socket, enough for cloud-hypervisor's API:
//! one request per connection, `Content-Length` or chunked or read-to-close bodies.
//!
//! Every request is bounded ([`Bound`]): connecting, writing and reading all give up
//! at the deadline, or within [`SLICE`] of the cancel flag being set, so a
//! hypervisor that stopped answering (stopped, deadlocked, its backlog full) cannot
//! hold the caller past its own timeout or past a stop request.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

const MAX_BODY: usize = 16 * 1024 * 1024;

/// How often a blocked request looks at its cancel flag.
pub(crate) const SLICE: Duration = Duration::from_millis(20);

/// When a request gives up: at `deadline`, or once `cancel` is set.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bound<'a> {
    pub deadline: Instant,
    pub cancel: Option<&'a AtomicBool>,
}

impl<'a> Bound<'a> {
    /// At most `limit` from now, and never past `deadline`.
    pub(crate) fn within(
        limit: Duration,
        deadline: Instant,
        cancel: Option<&'a AtomicBool>,
    ) -> Self {
        Bound {
            deadline: deadline.min(Instant::now() + limit),
            cancel,
        }
    }

    /// How long the next blocking step may take, or why there is no time left.
    fn slice(&self) -> Result<Duration, Failure> {
        if self.cancel.is_some_and(|c| c.load(Ordering::Acquire)) {
            return Err(Failure::Cancelled);
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failure::TimedOut);
        }
        Ok(left.min(SLICE))
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    #[error("no answer before the deadline")]
    TimedOut,
    #[error("cancelled: the VM is being stopped")]
    Cancelled,
    #[error(transparent)]
    Io(io::Error),
}

impl From<io::Error> for Failure {
    /// Undoes [`Failure::into_io`] for errors that passed through `std::io` readers.
    fn from(e: io::Error) -> Self {
        match e.get_ref().and_then(|i| i.downcast_ref::<Failure>()) {
            Some(Failure::TimedOut) => Failure::TimedOut,
            Some(Failure::Cancelled) => Failure::Cancelled,
            _ => Failure::Io(e),
        }
    }
}

impl Failure {
    fn into_io(self) -> io::Error {
        match self {
            Failure::Io(e) => e,
            other => io::Error::other(other),
        }
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Sends `method path` with an optional JSON body and reads the whole response,
/// within `bound`.
pub(crate) fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    bound: Bound<'_>,
) -> Result<Response, Failure> {
    let stream = connect(socket, bound)?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    match body {
        Some(b) => head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            b.len()
        )),
        None if method == "PUT" || method == "POST" => head.push_str("Content-Length: 0\r\n\r\n"),
        None => head.push_str("\r\n"),
    }
    let mut msg = head.into_bytes();
    if let Some(b) = body {
        msg.extend_from_slice(b);
    }
    let mut io = Timed {
        stream: &stream,
        bound,
    };
    io.write_all(&msg)?;
    Ok(read_response(BufReader::new(io), method == "HEAD")?)
}

/// Connects without blocking: a Unix socket whose listener does not accept (its
/// backlog full) makes a blocking `connect` wait for ever.
fn connect(socket: &Path, bound: Bound<'_>) -> Result<UnixStream, Failure> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let addr = SockAddr::unix(socket)?;
    let s = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    loop {
        match s.connect(&addr) {
            Ok(()) => break,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(bound.slice()?.min(Duration::from_millis(5)));
            }
            Err(e) => return Err(e.into()),
        }
    }
    s.set_nonblocking(false)?;
    Ok(UnixStream::from(OwnedFd::from(s)))
}

/// The stream, with every read and write cut into [`SLICE`]s that check the bound.
struct Timed<'a> {
    stream: &'a UnixStream,
    bound: Bound<'a>,
}

fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let slice = self.bound.slice().map_err(Failure::into_io)?;
            self.stream.set_read_timeout(Some(slice))?;
            match (&mut &*self.stream).read(buf) {
                Err(e) if retry(&e) => {}
                r => return r,
            }
        }
    }
}

impl Write for Timed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            let slice = self.bound.slice().map_err(Failure::into_io)?;
            self.stream.set_write_timeout(Some(slice))?;
            match (&mut &*self.stream).write(buf) {
                Err(e) if retry(&e) => {}
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub(crate) fn read_response<R: BufRead>(mut r: R, head_only: bool) -> io::Result<Response> {
    let mut line = String::new();
    // Skip interim 1xx responses.
    let status = loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(bad("connection closed before a status line"));
        }
        let mut parts = line.split_whitespace();
        let version = parts.next().unwrap_or("");
        if !version.starts_with("HTTP/1.") {
            return Err(bad(format!("not an HTTP response: {:?}", line.trim())));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("bad status line {:?}", line.trim())))?;
        let mut content_length = None;
        let mut chunked = false;
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Err(bad("connection closed inside the headers"));
            }
            let h = line.trim_end_matches(['\r', '\n']);
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim(), v.trim());
                if k.eq_ignore_ascii_case("content-length") {
                    content_length =
                        Some(v.parse::<usize>().map_err(|_| bad("bad Content-Length"))?);
                } else if k.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = v.to_ascii_lowercase().contains("chunked");
                }
            }
        }
        if (100..200).contains(&status) {
            continue;
        }
        break (status, content_length, chunked);
    };
    let (status, content_length, chunked) = status;
    let mut body = Vec::new();
    if head_only || status == 204 || status == 304 {
        // No body.
    } else if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size_text = line.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| bad(format!("bad chunk size {size_text:?}")))?;
            if size == 0 {
                break;
            }
            if body.len() + size > MAX_BODY {
                return Err(bad("response body too large"));
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(n) = content_length {
        if n > MAX_BODY {
            return Err(bad("response body too large"));
        }
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.take(MAX_BODY as u64).read_to_end(&mut body)?;
    }
    Ok(Response { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn parses_the_common_shapes() {
        let r = read_response(
            &b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"state\":\"Ok\"}xyz"[..],
            false,
        )
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"{\"state\":\"Ok\"}x");
        let r = read_response(&b"HTTP/1.1 204 No Content\r\n\r\n"[..], false).unwrap();
        assert_eq!((r.status, r.body.len()), (204, 0));
        let r = read_response(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"[..],
            false,
        )
        .unwrap();
        assert_eq!((r.status, r.body), (500, b"abcde".to_vec()));
        let r = read_response(&b"HTTP/1.0 400 Bad\r\n\r\nuntil close"[..], false).unwrap();
        assert_eq!(r.body, b"until close");
        assert!(read_response(&b"SSH-2.0\r\n"[..], false).is_err());
    }

    #[test]
    fn talks_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(&s);
            let mut head = String::new();
            let mut len = 0;
            loop {
                let mut l = String::new();
                r.read_line(&mut l).unwrap();
                if let Some(v) = l.strip_prefix("Content-Length: ") {
                    len = v.trim().parse().unwrap();
                }
                head.push_str(&l);
                if l == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            let mut w = &s;
            w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .unwrap();
            (head, body)
        });
        let resp = request(
            &sock,
            "PUT",
            "/api/v1/vm.create",
            Some(b"{\"a\":1}"),
            Bound::within(Duration::from_secs(5), far(), None),
        )
        .unwrap();
        assert_eq!((resp.status, resp.body), (200, b"ok".to_vec()));
        let (head, body) = server.join().unwrap();
        assert!(head.starts_with("PUT /api/v1/vm.create HTTP/1.1\r\n"));
        assert!(head.contains("Content-Type: application/json\r\n"));
        assert_eq!(body, b"{\"a\":1}");
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[test]
    fn a_server_that_never_answers_is_given_up_on_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        // Listening but never accepting: what a stopped cloud-hypervisor looks like.
        let _listener = UnixListener::bind(&sock).unwrap();
        let t = Instant::now();
        let err = request(
            &sock,
            "GET",
            "/api/v1/vm.info",
            None,
            Bound::within(Duration::from_millis(300), far(), None),
        )
        .unwrap_err();
        assert!(matches!(err, Failure::TimedOut), "{err}");
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_millis(800),
            "{took:?}"
        );
    }

    #[test]
    fn a_full_backlog_does_not_block_the_connect() {
        use socket2::{Domain, SockAddr, Socket, Type};
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        listener.bind(&SockAddr::unix(&sock).unwrap()).unwrap();
        listener.listen(0).unwrap();
        // Fill the backlog with connections nobody accepts.
        let mut held = Vec::new();
        loop {
            let c = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
            c.set_nonblocking(true).unwrap();
            match c.connect(&SockAddr::unix(&sock).unwrap()) {
                Ok(()) => held.push(c),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            assert!(held.len() < 10_000);
        }
        let t = Instant::now();
        let err = request(
            &sock,
            "GET",
            "/api/v1/vmm.ping",
            None,
            Bound::within(Duration::from_millis(300), far(), None),
        )
        .unwrap_err();
        assert!(matches!(err, Failure::TimedOut), "{err}");
        assert!(
            t.elapsed() < Duration::from_millis(800),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn a_cancel_ends_a_waiting_request_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        // Accepts and reads the request, never answers.
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_secs(3));
            drop(s);
        });
        let cancel = AtomicBool::new(false);
        let t = Instant::now();
        let err = std::thread::scope(|scope| {
            scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(200));
                cancel.store(true, Ordering::Release);
            });
            request(
                &sock,
                "PUT",
                "/api/v1/vm.shutdown",
                None,
                Bound::within(Duration::from_secs(30), far(), Some(&cancel)),
            )
            .unwrap_err()
        });
        assert!(matches!(err, Failure::Cancelled), "{err}");
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_millis(600),
            "{took:?}"
        );
        server.join().unwrap();
    }
}
