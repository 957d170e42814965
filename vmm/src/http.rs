//! A minimal HTTP/1.1 client over a Unix socket, enough for cloud-hypervisor's API:
//! one request per connection, `Content-Length` or chunked or read-to-close bodies.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

const MAX_BODY: usize = 16 * 1024 * 1024;

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Sends `method path` with an optional JSON body and reads the whole response.
pub(crate) fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> io::Result<Response> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
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
    let mut w = &stream;
    let mut msg = head.into_bytes();
    if let Some(b) = body {
        msg.extend_from_slice(b);
    }
    w.write_all(&msg)?;
    w.flush()?;
    read_response(BufReader::new(&stream), method == "HEAD")
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
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!((resp.status, resp.body), (200, b"ok".to_vec()));
        let (head, body) = server.join().unwrap();
        assert!(head.starts_with("PUT /api/v1/vm.create HTTP/1.1\r\n"));
        assert!(head.contains("Content-Type: application/json\r\n"));
        assert_eq!(body, b"{\"a\":1}");
    }
}
