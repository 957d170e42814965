//! The master's HTTP handling against raw sockets: what it reads from whom, and for
//! how long.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

/// Longest wait for an answer the master owes at once (generous: a failing test
/// waits this long, a passing one does not).
const ANSWER: Duration = Duration::from_secs(30);

/// Read one HTTP response: (status, body). Err when the connection ends or the read
/// times out first.
fn read_response(s: &mut TcpStream) -> std::io::Result<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..]).to_string();
    Ok((status, body))
}

/// Send a request head declaring a `declared`-byte body, then only the first KiB of
/// it, and wait for the answer without ever sending the rest.
fn announce_body(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    declared: usize,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(ANSWER))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: master\r\nContent-Type: application/json\r\n{auth}Content-Length: {declared}\r\n\r\n"
    );
    s.write_all(head.as_bytes())?;
    s.write_all(&[b' '; 1024])?;
    read_response(&mut s)
}

#[test]
fn bodies_are_read_only_from_authenticated_callers() {
    let env = Env::new();
    let server = env.start();
    let addr = server.local_addr();
    let w1 = enroll(&server, "w1", &[]);
    // (path, token, declared body size, expected status): the master answers with
    // 1 KiB of the body sent, so it did not wait for (or buffer) the rest.
    let cases: [(&str, Option<&str>, usize, u16); 6] = [
        ("/v1/publish", None, 64 << 20, 401),
        ("/v1/publish", Some("guessed"), 64 << 20, 401),
        ("/v1/publish", Some(&w1.token), 64 << 20, 403),
        ("/v1/enroll", None, 2 << 20, 401),
        ("/v1/enroll", Some(PUBLISHER), 2 << 20, 403),
        ("/v1/heartbeat", None, 2 << 20, 401),
    ];
    for (path, token, declared, want) in cases {
        let (status, body) = announce_body(addr, path, token, declared)
            .unwrap_or_else(|e| panic!("{path} with {token:?}: no answer before the body: {e}"));
        assert_eq!(status, want, "{path} with {token:?}: {body}");
        assert!(body.contains("\"error\""), "{body}");
    }
    // An authenticated caller announcing more than the limit is refused at once too.
    let (status, body) = announce_body(addr, "/v1/publish", Some(PUBLISHER), (64 << 20) + 1)
        .expect("no answer to an oversized publication");
    assert_eq!(status, 413, "{body}");
    let (status, body) =
        announce_body(addr, "/v1/heartbeat", Some(&w1.token), (2 << 20) + 1).unwrap();
    assert_eq!(status, 413, "{body}");
}

/// Whether the master closed the connection (EOF or reset) within [`ANSWER`],
/// reading and dropping whatever it answered first.
fn closed_by_master(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(ANSWER)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn idle_slow_and_stalled_connections_are_closed() {
    let mut env = Env::new();
    env.config.limits.header_read_timeout = Duration::from_millis(500);
    env.config.limits.body_read_timeout = Duration::from_millis(500);
    let server = env.start();
    let addr = server.local_addr();

    // Connected, never a byte.
    let mut idle = TcpStream::connect(addr).unwrap();
    assert!(
        closed_by_master(&mut idle),
        "an idle connection stayed open"
    );

    // Half a request head, then nothing.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: m").unwrap();
    assert!(
        closed_by_master(&mut slow),
        "a stalled request head stayed open"
    );

    // A served request, then an idle keep-alive connection.
    let mut kept = TcpStream::connect(addr).unwrap();
    kept.set_read_timeout(Some(ANSWER)).unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: m\r\n\r\n")
        .unwrap();
    let (status, body) = read_response(&mut kept).unwrap();
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert!(
        closed_by_master(&mut kept),
        "an idle keep-alive connection stayed open"
    );

    // An authenticated publication whose body stalls: 408, then closed.
    let mut stalled = TcpStream::connect(addr).unwrap();
    stalled.set_read_timeout(Some(ANSWER)).unwrap();
    let head = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: m\r\nAuthorization: Bearer {PUBLISHER}\r\nContent-Length: 100\r\n\r\n{{\"commit\""
    );
    stalled.write_all(head.as_bytes()).unwrap();
    let (status, body) = read_response(&mut stalled).expect("no answer to a stalled body");
    assert_eq!(status, 408, "{body}");
    assert!(closed_by_master(&mut stalled));

    // The master still serves.
    publisher(&server).healthz().unwrap();
}
