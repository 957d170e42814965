//! The master's HTTP server (axum on tokio; TLS with rustls when configured).
//!
//! [`serve`] runs until SIGINT/SIGTERM. [`start`] binds (port 0 is fine), returns a
//! [`RunningServer`] that knows its address; [`spawn`] does the same on a thread of
//! its own with its own runtime, for blocking callers and tests.

mod conn;
mod handlers;
mod state;
pub mod tls;

pub use conn::Limits;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::{ArcSwap, ArcSwapOption};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::store::{SqliteStore, Store};
use crate::time::now_ms;
use crate::token::{hash_token, read_token_file};
use state::{build_snapshot, AuthTable, Counters, Master, WorkerEntry};

/// Default lease: a worker not seen for this long is not live.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// How to run the master.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// SQLite database file (created if missing).
    pub db_path: PathBuf,
    /// File holding the publisher token (`publish`, `status`, `generations`, `diff`, `audit`).
    pub publisher_token_file: PathBuf,
    /// File holding the enrollment token (`enroll`).
    pub enroll_token_file: PathBuf,
    /// PEM certificate chain; with `tls_key`, the server speaks HTTPS only.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// File holding an ed25519 public key (64 hex digits): publications must then be
    /// signed with the matching private key.
    pub intent_pubkey: Option<PathBuf>,
    /// A worker not seen (heartbeat or assignment request) for this long is not live
    /// and its instances move. An open long poll counts as being seen.
    pub lease: Duration,
    /// Connection limit and timeouts.
    pub limits: Limits,
}

impl ServeConfig {
    /// Plain HTTP, no intent key, the default lease.
    pub fn new(
        listen: SocketAddr,
        db_path: impl Into<PathBuf>,
        publisher_token_file: impl Into<PathBuf>,
        enroll_token_file: impl Into<PathBuf>,
    ) -> Self {
        Self {
            listen,
            db_path: db_path.into(),
            publisher_token_file: publisher_token_file.into(),
            enroll_token_file: enroll_token_file.into(),
            tls_cert: None,
            tls_key: None,
            intent_pubkey: None,
            lease: DEFAULT_LEASE,
            limits: Limits::default(),
        }
    }
}

/// A master running on the caller's tokio runtime.
pub struct RunningServer {
    addr: SocketAddr,
    tls: bool,
    stop: watch::Sender<bool>,
    server: JoinHandle<std::io::Result<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningServer {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` or `https://ADDR`.
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }

    /// Stop accepting, end long polls, wait for in-flight requests, stop background tasks.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.wait().await
    }

    /// Wait until the server stops (after [`RunningServer::shutdown`] or an I/O error).
    pub async fn wait(self) -> anyhow::Result<()> {
        let result = self.server.await;
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        result
            .context("server task panicked")?
            .context("server failed")
    }
}

/// Run the master until SIGINT or SIGTERM.
pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let server = start(config).await?;
    tracing::info!("udos master listening on {}", server.url());
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn router(master: Arc<Master>) -> Router {
    Router::new()
        .route("/healthz", get(handlers::healthz))
        .route("/metrics", get(handlers::metrics))
        .route("/v1/publish", post(handlers::publish))
        .route("/v1/enroll", post(handlers::enroll))
        .route("/v1/workers/{id}/replace", post(handlers::replace_worker))
        .route("/v1/assignment", get(handlers::assignment))
        .route("/v1/heartbeat", post(handlers::heartbeat))
        .route("/v1/status", get(handlers::status))
        .route("/v1/generations", get(handlers::generations))
        .route("/v1/generations/{n}", get(handlers::generation))
        .route("/v1/diff", get(handlers::diff))
        .route("/v1/audit", get(handlers::audit))
        .fallback(handlers::not_found)
        .with_state(master)
}

/// The client's address, for the audit log.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub SocketAddr);

/// Bind and start serving on the current tokio runtime.
pub async fn start(config: ServeConfig) -> anyhow::Result<RunningServer> {
    let publisher = read_token_file(&config.publisher_token_file)?;
    let enroller = read_token_file(&config.enroll_token_file)?;
    if publisher == enroller {
        anyhow::bail!("the publisher and enrollment tokens must differ");
    }
    let intent_key = match &config.intent_pubkey {
        Some(p) => Some(crate::signing::load_verifying_key(p)?),
        None => None,
    };
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) => Some(tls::server_config(c, k)?),
        (None, None) => None,
        _ => anyhow::bail!("TLS needs both a certificate (--tls-cert) and a key (--tls-key)"),
    };
    if config.lease < Duration::from_millis(100) {
        anyhow::bail!("the lease must be at least 100 ms");
    }
    let lease_ms = config.lease.as_millis() as u64;

    let db_path = config.db_path.clone();
    let (store, active, workers) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let store = SqliteStore::open(&db_path)
            .with_context(|| format!("cannot open the database {}", db_path.display()))?;
        let active = store.active_generation()?;
        let workers = store.workers()?;
        Ok((store, active, workers))
    })
    .await??;

    // After a restart every enrolled worker gets a full lease to show up again,
    // whatever its stored last heartbeat: the master being down is not their fault.
    let now = now_ms();
    let mut auth = AuthTable {
        by_id: HashMap::new(),
        by_token: HashMap::new(),
    };
    for w in &workers {
        let e = Arc::new(WorkerEntry::from_record(w, now));
        auth.by_id.insert(w.id.clone(), e.clone());
        auth.by_token.insert(w.token_hash, e);
    }
    let active = active.map(Arc::new);
    let first = {
        let active = active.clone();
        let auth = auth.clone();
        tokio::task::spawn_blocking(move || build_snapshot(0, active, &auth, now, lease_ms)).await?
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let (snap_tx, _) = watch::channel(1);
    let mut first = first;
    first.epoch = 1;
    if let Some(problem) = &first.problem {
        // The master serves on: status explains, workers keep what they run.
        tracing::error!("{problem}");
    }
    let master = Arc::new(Master {
        store: Arc::new(Mutex::new(Box::new(store) as Box<dyn Store>)),
        publisher_hash: hash_token(&publisher),
        enroll_hash: hash_token(&enroller),
        intent_key,
        lease_ms,
        auth: ArcSwap::from_pointee(auth),
        active: ArcSwapOption::new(active),
        snapshot: ArcSwap::from_pointee(first),
        snap_tx,
        version: AtomicU64::new(0),
        recompute: Notify::new(),
        enroll_lock: tokio::sync::Mutex::new(()),
        publish_lock: tokio::sync::Mutex::new(()),
        shutdown: stop_rx.clone(),
        counters: Counters::default(),
        detail_cache: Mutex::new(None),
        body_read_timeout: config.limits.body_read_timeout,
    });
    tracing::info!(
        workers = workers.len(),
        generation = master.snapshot.load().generation_number(),
        "state loaded from {}",
        config.db_path.display()
    );

    let tcp = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = tcp.local_addr()?;
    let mut limits = config.limits;
    if limits.max_connections == 0 {
        anyhow::bail!("the connection limit must be at least 1");
    }
    limits.max_connections = conn::fit_to_open_files(limits.max_connections);
    if limits.max_connections < config.limits.max_connections {
        tracing::warn!(
            "serving at most {} connections (the open-file limit is too low for {})",
            limits.max_connections,
            config.limits.max_connections
        );
    }
    let is_tls = tls.is_some();
    let acceptor = tls.map(|cfg| tokio_rustls::TlsAcceptor::from(Arc::new(cfg)));
    let server = tokio::spawn(conn::serve(
        tcp,
        acceptor,
        router(master.clone()),
        limits,
        stop_rx.clone(),
    ));
    let tasks = vec![
        tokio::spawn(scheduler_loop(master.clone(), stop_rx.clone())),
        tokio::spawn(lease_loop(master.clone(), stop_rx)),
    ];
    Ok(RunningServer {
        addr,
        tls: is_tls,
        stop: stop_tx,
        server,
        tasks,
    })
}

/// Recompute the placement whenever the state changes (coalescing bursts).
async fn scheduler_loop(m: Arc<Master>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = m.recompute.notified() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let version = m.version.load(std::sync::atomic::Ordering::SeqCst);
        let active = m.active.load_full();
        let auth = m.auth.load_full();
        let lease_ms = m.lease_ms;
        let started = std::time::Instant::now();
        let built = tokio::task::spawn_blocking(move || {
            build_snapshot(version, active, &auth, now_ms(), lease_ms)
        })
        .await;
        match built {
            Ok(snap) => {
                tracing::debug!(
                    version,
                    live = snap.live.len(),
                    assigned = snap.assigned_total,
                    unschedulable = snap.placement.unschedulable.len(),
                    "placement recomputed in {:?}",
                    started.elapsed()
                );
                m.install(snap);
            }
            Err(e) => tracing::error!("placement computation panicked: {e}"),
        }
    }
}

/// Watch leases: when a worker expires (or comes back), recompute.
async fn lease_loop(m: Arc<Master>, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_millis((m.lease_ms / 10).clamp(100, 1000));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if m.liveness_changed(now_ms()) {
            tracing::info!("worker liveness changed: rescheduling");
            m.bump();
        }
    }
}

/// A master running on a thread of its own (its own tokio runtime). Stops on
/// [`BackgroundServer::shutdown`] or drop.
pub struct BackgroundServer {
    addr: SocketAddr,
    tls: bool,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl BackgroundServer {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` or `https://ADDR`.
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }

    /// Stop and wait for the thread (the database is closed when this returns).
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// Start a master on its own thread and runtime (`worker_threads` tokio threads).
pub fn spawn(config: ServeConfig, worker_threads: usize) -> anyhow::Result<BackgroundServer> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("udos-master".into())
        .spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(worker_threads.max(1))
                .thread_name("udos-master-rt")
                .enable_all()
                .build()?;
            rt.block_on(async move {
                match start(config).await {
                    Ok(server) => {
                        let _ = ready_tx.send(Ok((server.local_addr(), server.tls)));
                        let _ = stop_rx.await;
                        server.shutdown().await
                    }
                    Err(e) => {
                        let msg = format!("{e:#}");
                        let _ = ready_tx.send(Err(e));
                        Err(anyhow::anyhow!(msg))
                    }
                }
            })
        })?;
    match ready_rx.recv() {
        Ok(Ok((addr, tls))) => Ok(BackgroundServer {
            addr,
            tls,
            stop: Some(stop_tx),
            thread: Some(thread),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => match thread.join() {
            Ok(r) => Err(r
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("server thread ended early"))),
            Err(_) => Err(anyhow::anyhow!("server thread panicked")),
        },
    }
}
