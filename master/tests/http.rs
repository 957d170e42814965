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
