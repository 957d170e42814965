//! Accepting and serving connections, bounded: at most [`Limits::max_connections`]
//! at once (more wait in the kernel's listen backlog, costing the master nothing),
//! and every TLS handshake and request head — including the wait for the next request
//! on an idle keep-alive connection — must arrive within
//! [`Limits::header_read_timeout`]. Bodies get [`Limits::body_read_timeout`] in the
//! handlers. Without these, idle connections could hold every descriptor the master
//! has and starve real requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use super::Peer;

/// Descriptors kept for everything but connections (database, runtime, logs).
const RESERVED_FDS: u64 = 64;

/// How many connections the master serves at once, and how long it waits for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most connections served at once (TLS handshakes included); the rest wait in
    /// the listen backlog. Also capped by the open-file limit, which the master
    /// raises (up to its hard limit) to fit this many.
    pub max_connections: usize,
    /// A TLS handshake, a request head, and the next request on an idle keep-alive
    /// connection must each arrive within this long, else the connection is closed.
    pub header_read_timeout: Duration,
    /// A request body must arrive whole within this long (else 408).
    pub body_read_timeout: Duration,
}

impl Default for Limits {
    /// 4,096 connections (a thousand workers hold about two each: a long poll and a
    /// heartbeat), 30 s for a head or an idle connection, 60 s for a body.
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(60),
        }
    }
}

/// `wanted` connections, or fewer when the open-file limit cannot hold them; raises
/// the soft limit towards the hard one first.
pub(crate) fn fit_to_open_files(wanted: usize) -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let need = (wanted as u64).saturating_add(RESERVED_FDS);
    let mut limit = getrlimit(Resource::Nofile);
    let mut soft = limit.current.unwrap_or(u64::MAX);
    if soft < need {
        let raised = need.min(limit.maximum.unwrap_or(u64::MAX));
        limit.current = Some(raised);
        if setrlimit(Resource::Nofile, limit).is_ok() {
            soft = raised;
        }
    }
    let room = soft.saturating_sub(RESERVED_FDS).max(1);
    usize::try_from((wanted as u64).min(room)).unwrap_or(wanted)
}

/// Accept and serve until `stop`, then wait for the open connections to finish
/// (each holds a permit until it ends).
pub(crate) async fn serve(
    tcp: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let accepted = tokio::select! {
            r = tcp.accept() => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Usually EMFILE: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Small JSON answers must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            peer,
            tls.clone(),
            app.clone(),
            limits,
            stop.clone(),
            permit,
        ));
    }
    drop(tcp);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
    Ok(())
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: Limits,
    stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let Some(acceptor) = tls else {
        return http(stream, peer, app, limits, stop).await;
    };
    match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => http(tls, peer, app, limits, stop).await,
        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// Serve HTTP/1.1 on one connection; on `stop`, finish the request in flight.
async fn http<I>(
    io: I,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(ConnectInfo(Peer(peer)));
        app.clone().oneshot(req)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => Some(r),
        _ = stop.wait_for(|s| *s) => None,
    };
    let result = match ended {
        Some(r) => r,
        None => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, "connection ended: {e}");
    }
}
