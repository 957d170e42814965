//! The cluster subcommands of `udos`: arguments (clap) and what they do.
//!
//! Exit status: 0 on success; 1 when the master refused the request or could not be
//! reached; 2 for a local error (bad arguments, unreadable files).

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use udos_core::desired::Resources;
use udos_core::text::sanitize_for_terminal as t;
use udos_core::wire::{PublishRequest, ReplaceWorkerRequest, SignatureState};
use udos_master::api::{InstanceHealth, StatusReport};
use udos_master::{Client, ClientError, ServeConfig};
use udos_vmm::HypervisorChoice;

use super::agent::{self, AgentConfig};
use super::executor::{VmExecutor, VmExecutorConfig};
use crate::setup;
use crate::state::StateDir;

/// The master's default address.
pub const DEFAULT_MASTER: &str = "http://127.0.0.1:7400";

/// `udos master ...`
#[derive(Debug, Subcommand)]
pub enum MasterCommand {
    /// Run the master: number published desired state as generations, schedule it,
    /// serve workers their assignments (until SIGINT/SIGTERM)
    Serve(ServeArgs),
    /// Give an enrolled worker a new token and revoke the one it has (publisher
    /// token): for a lost token or a replaced machine. The enrollment token cannot
    /// enroll an id that is already enrolled.
    ReplaceWorker(ReplaceWorkerArgs),
}

/// `udos master replace-worker`
#[derive(Debug, Args)]
pub struct ReplaceWorkerArgs {
    #[command(flatten)]
    pub conn: MasterConn,
    /// The enrolled worker's id
    #[arg(value_name = "ID")]
    pub worker_id: String,
    /// Write the new worker token here (mode 0600); give it to the worker as its
    /// --token-file
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// New labels, `key=value,...` [default: keep the worker's]
    #[arg(long, value_name = "K=V,...")]
    pub labels: Option<String>,
    /// New CPU capacity, thousandths [default: keep the worker's]
    #[arg(long, value_name = "MILLIS", requires = "capacity_memory")]
    pub capacity_cpu: Option<u64>,
    /// New memory capacity, MiB [default: keep the worker's]
    #[arg(long, value_name = "MIB", requires = "capacity_cpu")]
    pub capacity_memory: Option<u64>,
}

/// `udos master serve`
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the URL is printed on stdout)
    #[arg(long, default_value = "127.0.0.1:7400", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// SQLite database [default: STATE_DIR/master/master.db]
    #[arg(long, value_name = "FILE")]
    pub db: Option<PathBuf>,
    /// Publisher token file (publish, status, generations, diff, audit)
    /// [default: STATE_DIR/master/publisher.token, generated when missing]
    #[arg(long, value_name = "FILE")]
    pub publisher_token_file: Option<PathBuf>,
    /// Enrollment token file (workers enroll with it)
    /// [default: STATE_DIR/master/enroll.token, generated when missing]
    #[arg(long, value_name = "FILE")]
    pub enroll_token_file: Option<PathBuf>,
    /// TLS certificate chain (PEM); with --tls-key the master speaks HTTPS only
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM)
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Refuse publications not signed by this ed25519 key (64 hex digits in the file)
    #[arg(long, value_name = "HEX_FILE")]
    pub intent_pubkey: Option<PathBuf>,
    /// A worker not seen for this many seconds loses its instances
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub lease: u64,
}

/// `udos agent`
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The master's URL
    #[arg(long, env = "UDOS_MASTER", default_value = DEFAULT_MASTER, value_name = "URL")]
    pub master: String,
    /// This worker's stable id
    #[arg(long, value_name = "ID")]
    pub worker_id: String,
    /// Worker labels, `key=value,...` (specs select workers by them)
    #[arg(long, default_value = "", value_name = "K=V,...")]
    pub labels: String,
    /// The worker token [default: STATE_DIR/agent/worker.token]; written (0600) by
    /// enrollment when missing
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The enrollment token, to enroll when there is no worker token yet
    #[arg(long, value_name = "FILE")]
    pub enroll_token_file: Option<PathBuf>,
    /// CPU this worker offers, thousandths [default: 1000 per host CPU]
    #[arg(long, value_name = "MILLIS")]
    pub capacity_cpu: Option<u64>,
    /// Memory this worker offers, MiB [default: the host's memory]
    #[arg(long, value_name = "MIB")]
    pub capacity_memory: Option<u64>,
    /// CA certificate (PEM) to trust for an https:// master
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Only run signed intent: verify every assignment with this ed25519 key (hex file)
    #[arg(long, value_name = "HEX_FILE")]
    pub intent_pubkey: Option<PathBuf>,
    /// Longest long poll, seconds (the master answers sooner when something changes)
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub poll: u64,
    /// Wait after a failed poll, seconds
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub retry: u64,
    /// A heartbeat at least this often, seconds (and whenever an instance changes)
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub heartbeat: u64,
    /// Fetch the published commit of workflow_run specs that name no `repository`
    /// from this URL (https://, http://, ssh://, git://, file://, or host:path)
    #[arg(long, value_name = "URL")]
    pub repository: Option<String>,
    /// Without --repository, fetch the published commit from this local git
    /// repository (each run checks the commit out into its own worktree; the
    /// directory's own checkout is never run)
    #[arg(long, default_value = ".", value_name = "DIR")]
    pub workdir: PathBuf,
    /// Which hypervisor runs the VMs: auto, cloud-hypervisor or qemu
    #[arg(long, default_value = "auto")]
    pub hypervisor: HypervisorChoice,
    /// Boot this kernel instead of Debian's cloud kernel
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Print the guests' consoles on stderr
    #[arg(long)]
    pub console: bool,
}

/// Connection options shared by the publisher-side commands.
#[derive(Debug, Args)]
pub struct MasterConn {
    /// The master's URL
    #[arg(long, env = "UDOS_MASTER", default_value = DEFAULT_MASTER, value_name = "URL")]
    pub master: String,
    /// The publisher token file [default: $UDOS_TOKEN_FILE, else
    /// STATE_DIR/master/publisher.token when it exists]
    #[arg(long, env = "UDOS_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for an https:// master
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
}

/// `udos publish`
#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub conn: MasterConn,
    /// The built commit this desired state was evaluated from (40 or 64 hex digits)
    #[arg(long)]
    pub commit: String,
    /// Sign the intent with this ed25519 key (its 32-byte seed as 64 hex digits)
    #[arg(long, value_name = "FILE")]
    pub signing_key: Option<PathBuf>,
    /// Name the publisher in the audit log
    #[arg(long, value_name = "NAME")]
    pub publisher: Option<String>,
    /// Print the master's answer as JSON
    #[arg(long)]
    pub json: bool,
    /// The specs: JSON or YAML, a list or `{"specs": [...]}` (`-`: stdin)
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// `udos status`
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub conn: MasterConn,
    /// The full report as JSON
    #[arg(long)]
    pub json: bool,
}

/// `udos diff-generations`
#[derive(Debug, Args)]
pub struct DiffArgs {
    #[command(flatten)]
    pub conn: MasterConn,
    /// From this generation
    #[arg(value_name = "A")]
    pub from: u64,
    /// To this generation
    #[arg(value_name = "B")]
    pub to: u64,
    /// JSON on stdout
    #[arg(long)]
    pub json: bool,
}

fn fail_local(e: anyhow::Error) -> ExitCode {
    eprintln!("udos: error: {e:#}");
    ExitCode::from(2)
}

fn fail_master(e: anyhow::Error) -> ExitCode {
    eprintln!("udos: error: {e:#}");
    ExitCode::from(1)
}

/// 1 when the master refused or is unreachable, 2 for anything local.
fn fail(e: anyhow::Error) -> ExitCode {
    if e.chain().any(|c| {
        c.downcast_ref::<ClientError>()
            .is_some_and(|c| !matches!(c, ClientError::Config(_) | ClientError::NoToken { .. }))
    }) {
        fail_master(e)
    } else {
        fail_local(e)
    }
}

fn master_dir(state: &StateDir) -> PathBuf {
    state.root().join("master")
}

/// A token file, generated (0600) when missing.
fn token_or_generate(path: &Path) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    let token = udos_master::token::generate_token().context("generating a token")?;
    super::write_secret(path, &token)?;
    eprintln!("udos master: generated a token in {}", path.display());
    Ok(())
}

/// `udos master ...`
pub fn master(state: &StateDir, cmd: MasterCommand) -> ExitCode {
    match cmd {
        MasterCommand::Serve(a) => serve(state, a),
        MasterCommand::ReplaceWorker(a) => replace_worker(state, a),
    }
}

/// `udos master replace-worker`
fn replace_worker(state: &StateDir, a: ReplaceWorkerArgs) -> ExitCode {
    let labels = match a.labels.as_deref().map(super::parse_labels).transpose() {
        Ok(l) => l,
        Err(e) => return fail_local(e),
    };
    let capacity = match (a.capacity_cpu, a.capacity_memory) {
        (Some(cpu_millis), Some(memory_mib)) => Some(Resources {
            cpu_millis,
            memory_mib,
        }),
        _ => None,
    };
    let client = match publisher_client(state, &a.conn) {
        Ok(c) => c,
        Err(e) => return fail_local(e),
    };
    let req = ReplaceWorkerRequest { labels, capacity };
    let token = match client.replace_worker(&a.worker_id, &req) {
        Ok(r) => r.token,
        Err(e) => return fail_master(e.into()),
    };
    if let Err(e) = super::write_secret(&a.out, &token) {
        return fail_local(e.context("the previous token is revoked: run replace-worker again"));
    }
    println!(
        "worker {}: new token in {}; its previous token no longer works",
        t(&a.worker_id),
        a.out.display()
    );
    ExitCode::SUCCESS
}

/// `udos master serve`
fn serve(state: &StateDir, a: ServeArgs) -> ExitCode {
    let dir = master_dir(state);
    let publisher = a
        .publisher_token_file
        .unwrap_or_else(|| dir.join("publisher.token"));
    let enroller = a
        .enroll_token_file
        .unwrap_or_else(|| dir.join("enroll.token"));
    for t in [&publisher, &enroller] {
        if let Err(e) = token_or_generate(t) {
            return fail_local(e);
        }
    }
    let db = a.db.unwrap_or_else(|| dir.join("master.db"));
    if let Some(parent) = db.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let mut config = ServeConfig::new(a.listen, db, publisher, enroller);
    config.tls_cert = a.tls_cert;
    config.tls_key = a.tls_key;
    config.intent_pubkey = a.intent_pubkey;
    config.lease = Duration::from_secs(a.lease.max(1));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("udos-master")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail_local(e.into()),
    };
    let result = rt.block_on(async move {
        let server = udos_master::start(config).await?;
        println!("udos master: listening on {}", server.url());
        let _ = std::io::stdout().flush();
        wait_for_signal().await;
        eprintln!("udos master: shutting down");
        server.shutdown().await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail_local(e),
    }
}

async fn wait_for_signal() {
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

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// SIGTERM and SIGINT set `stop` (through a static flag, the only thing a signal
/// handler may touch).
fn stop_on_signals(stop: Arc<AtomicBool>) {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe;
        // `signal` is given a valid function pointer of the right type.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    std::thread::spawn(move || loop {
        if SIGNALLED.load(Ordering::SeqCst) {
            stop.store(true, Ordering::SeqCst);
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    });
}

/// `udos agent`
pub fn agent(state: &StateDir, a: AgentArgs) -> ExitCode {
    match agent_inner(state, a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn agent_inner(state: &StateDir, a: AgentArgs) -> Result<()> {
    let dir = state.root().join("agent");
    let labels = super::parse_labels(&a.labels)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let capacity = Resources {
        cpu_millis: a.capacity_cpu.unwrap_or(cpus * 1000),
        memory_mib: a
            .capacity_memory
            .or_else(super::host_memory_mib)
            .unwrap_or(1024),
    };
    let intent_key = match &a.intent_pubkey {
        Some(p) => Some(udos_master::signing::load_verifying_key(p)?),
        None => None,
    };
    let workdir = a
        .workdir
        .canonicalize()
        .with_context(|| format!("the working directory {}", a.workdir.display()))?;
    if let Some(url) = &a.repository {
        udos_core::desired::check_repository(url)
            .map_err(|why| anyhow::anyhow!("--repository `{url}` {why}"))?;
    }
    let mut cfg = AgentConfig::new(
        a.master,
        a.worker_id,
        a.token_file.unwrap_or_else(|| dir.join("worker.token")),
        dir,
    );
    cfg.labels = labels;
    cfg.capacity = capacity;
    cfg.enroll_token_file = a.enroll_token_file;
    cfg.ca_cert = a.ca_cert;
    cfg.intent_key = intent_key;
    cfg.poll = Duration::from_secs(a.poll.clamp(1, 60));
    cfg.retry = Duration::from_secs(a.retry.max(1));
    cfg.heartbeat = Duration::from_secs(a.heartbeat.max(1));
    // A bad URL or CA file is a local error: say so before preparing VMs.
    udos_master::Client::new(&cfg.master, cfg.ca_cert.as_deref())?;

    let progress = |m: &str| eprintln!("udos agent: {m}");
    let env = setup::prepare_env(state, a.kernel, a.hypervisor, &progress)?;
    let mut exec = VmExecutor::new(
        state.clone(),
        env,
        VmExecutorConfig {
            repository: a.repository,
            workdir,
            stream_console: a.console,
            ..VmExecutorConfig::default()
        },
    )?;
    eprintln!(
        "udos agent {}: image {}, master {}, labels {:?}, capacity {} mCPU / {} MiB",
        cfg.worker_id,
        &exec.image_id()[..12.min(exec.image_id().len())],
        cfg.master,
        cfg.labels,
        cfg.capacity.cpu_millis,
        cfg.capacity.memory_mib
    );
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signals(stop.clone());
    agent::run(&cfg, &mut exec, stop)
}

fn publisher_client(state: &StateDir, conn: &MasterConn) -> Result<Client> {
    let token = match &conn.token_file {
        Some(t) => t.clone(),
        None => {
            let default = master_dir(state).join("publisher.token");
            if !default.is_file() {
                anyhow::bail!(
                    "no publisher token: pass --token-file (or set UDOS_TOKEN_FILE); on the master's host it is {}",
                    default.display()
                );
            }
            default
        }
    };
    Ok(Client::new(&conn.master, conn.ca_cert.as_deref())?.with_token_file(&token)?)
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// `udos publish`
pub fn publish(state: &StateDir, a: PublishArgs) -> ExitCode {
    let text = if a.file == Path::new("-") {
        let mut s = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut s) {
            return fail_local(anyhow::Error::new(e).context("reading the specs from stdin"));
        }
        s
    } else {
        match std::fs::read_to_string(&a.file) {
            Ok(s) => s,
            Err(e) => {
                return fail_local(
                    anyhow::Error::new(e).context(format!("reading {}", a.file.display())),
                )
            }
        }
    };
    let specs = match super::parse_specs(&text) {
        Ok(s) => s,
        Err(e) => return fail_local(e.context(format!("in {}", a.file.display()))),
    };
    let signature = match &a.signing_key {
        None => None,
        Some(k) => match udos_master::signing::load_signing_key(k) {
            Ok(key) => {
                let h = udos_core::desired::intent_hash(&a.commit, &specs);
                Some(udos_master::signing::sign_intent(&key, &h))
            }
            Err(e) => return fail_local(e.into()),
        },
    };
    let mut client = match publisher_client(state, &a.conn) {
        Ok(c) => c,
        Err(e) => return fail_local(e),
    };
    if let Some(name) = &a.publisher {
        client = client.with_publisher_name(name);
    }
    let n = specs.len();
    let req = PublishRequest {
        commit: a.commit.clone(),
        specs,
        signature,
    };
    match client.publish(&req) {
        Ok(resp) => {
            if a.json {
                print_json(&resp);
            } else {
                println!(
                    "generation {} {} ({n} specs, commit {})",
                    resp.generation,
                    if resp.created {
                        "created"
                    } else {
                        "already published: active again"
                    },
                    t(short(&a.commit))
                );
                println!(
                    "intent {} ({})",
                    t(&resp.intent_hash),
                    resp.signature_state.describe()
                );
            }
            if resp.signature_state == SignatureState::Unverified {
                eprintln!(
                    "udos: warning: the master has no --intent-pubkey: it stored the signature without checking it (workers with the key check it)"
                );
            }
            for u in &resp.unschedulable {
                eprintln!(
                    "udos: warning: {}@{} cannot be placed: {}",
                    t(&u.spec),
                    u.replica,
                    t(&u.reason)
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail_master(e.into()),
    }
}

fn short(s: &str) -> &str {
    s.get(..12).unwrap_or(s)
}

fn health_name(h: InstanceHealth) -> &'static str {
    match h {
        InstanceHealth::Converged => "converged",
        InstanceHealth::Starting => "starting",
        InstanceHealth::Failed => "failed",
        InstanceHealth::Outdated => "outdated",
        InstanceHealth::Missing => "missing",
        InstanceHealth::Pending => "pending",
        InstanceHealth::WorkerDown => "worker-down",
        InstanceHealth::Unschedulable => "unschedulable",
    }
}

fn human_secs(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// The readable form of `udos status`.
pub fn render_status(r: &StatusReport) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    if r.generation == 0 {
        let _ = writeln!(
            o,
            "no generation published yet (publish one with `udos publish`)"
        );
    } else {
        let _ = writeln!(
            o,
            "generation {}  commit {}  intent {}  published {}",
            r.generation,
            t(short(r.commit.as_deref().unwrap_or("-"))),
            t(short(r.intent_hash.as_deref().unwrap_or("-"))),
            t(r.published_at.as_deref().unwrap_or("-"))
        );
        let _ = writeln!(o, "intent {}", r.signature_state.describe());
    }
    let _ = writeln!(
        o,
        "convergence {:.1}% ({}/{} instances), lease {}s",
        r.percent(),
        r.converged_instances,
        r.desired_instances,
        r.lease_s
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<16} {:<5} {:>9} {:>4}  {:<24} {:<16} INSTANCES",
        "WORKER", "LIVE", "SEEN", "GEN", "LABELS", "USED/CAPACITY"
    );
    for w in &r.workers {
        let labels = w
            .labels
            .iter()
            .map(|(k, v)| format!("{}={}", t(k), t(v)))
            .collect::<Vec<_>>()
            .join(",");
        let used = w.used.unwrap_or_default();
        let inst = w
            .instances
            .iter()
            .map(|i| {
                format!(
                    "{}@{} {} {}{}",
                    t(&i.spec),
                    i.replica,
                    super::state_name(i.state),
                    human_secs(i.uptime_s),
                    i.commit
                        .as_deref()
                        .map(|c| format!(" at {}", t(short(c))))
                        .unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            o,
            "{:<16} {:<5} {:>9} {:>4}  {:<24} {:<16} {}",
            t(&w.id),
            if w.live { "yes" } else { "no" },
            w.last_seen_s_ago
                .map(|s| format!("{} ago", human_secs(s)))
                .unwrap_or_else(|| "never".into()),
            w.seen_generation,
            if labels.is_empty() {
                "-".into()
            } else {
                labels
            },
            format!(
                "{}m/{}m {}M/{}M",
                used.cpu_millis, w.capacity.cpu_millis, used.memory_mib, w.capacity.memory_mib
            ),
            if inst.is_empty() { "-".into() } else { inst }
        );
    }
    if !r.specs.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "{:<20} {:<13} {:<13} {:>7}  {:<16} {:<13} STATE",
            "SPEC", "KIND", "HASH", "REPLICA", "WORKER", "COMMIT"
        );
        for s in &r.specs {
            for i in &s.instances {
                let _ = writeln!(
                    o,
                    "{:<20} {:<13} {:<13} {:>7}  {:<16} {:<13} {}{}",
                    t(&s.id),
                    t(&s.kind),
                    t(short(&s.hash)),
                    i.replica,
                    t(i.worker.as_deref().unwrap_or("-")),
                    t(short(i.running_commit.as_deref().unwrap_or("-"))),
                    health_name(i.state),
                    i.message
                        .as_deref()
                        .map(|m| format!(" ({})", t(m)))
                        .unwrap_or_default()
                );
            }
        }
    }
    // Snapshot ids of finished workflow runs.
    let mut snaps = Vec::new();
    for w in &r.workers {
        for i in &w.instances {
            if !i.snapshot_ids.is_empty() {
                snaps.push(format!(
                    "  {}@{} on {}: {}",
                    t(&i.spec),
                    i.replica,
                    t(&w.id),
                    i.snapshot_ids
                        .iter()
                        .map(|s| t(short(s)))
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
            }
        }
    }
    if !snaps.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "snapshots:");
        for s in snaps {
            let _ = writeln!(o, "{s}");
        }
    }
    if !r.drift.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "drift:");
        for d in &r.drift {
            let _ = writeln!(o, "  {}", t(d));
        }
    }
    o
}

/// `udos status`
pub fn status(state: &StateDir, a: StatusArgs) -> ExitCode {
    let client = match publisher_client(state, &a.conn) {
        Ok(c) => c,
        Err(e) => return fail_local(e),
    };
    match client.status() {
        Ok(r) => {
            if a.json {
                print_json(&r);
            } else {
                print!("{}", render_status(&r));
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail_master(e.into()),
    }
}

/// `udos diff-generations`
pub fn diff(state: &StateDir, a: DiffArgs) -> ExitCode {
    let client = match publisher_client(state, &a.conn) {
        Ok(c) => c,
        Err(e) => return fail_local(e),
    };
    match client.diff(Some(a.from), Some(a.to)) {
        Ok(d) => {
            if a.json {
                print_json(&d);
            } else {
                println!(
                    "generation {} -> {}: {} added, {} removed, {} changed, {} unchanged",
                    d.from,
                    d.to,
                    d.added.len(),
                    d.removed.len(),
                    d.changed.len(),
                    d.unchanged
                );
                println!(
                    "generation {}: {}; generation {}: {}",
                    d.from,
                    d.from_signature_state.describe(),
                    d.to,
                    d.to_signature_state.describe()
                );
                for s in &d.added {
                    println!("+ {:<24} {}", t(&s.id), t(short(&s.hash)));
                }
                for s in &d.removed {
                    println!("- {:<24} {}", t(&s.id), t(short(&s.hash)));
                }
                for c in &d.changed {
                    println!(
                        "~ {:<24} {} -> {}",
                        t(&c.id),
                        t(short(&c.from_hash)),
                        t(short(&c.to_hash))
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail_master(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report as a hostile worker could shape it through its enrollment and
    /// heartbeats (the master relays them): escape sequences and line breaks.
    const HOSTILE: &str = r#"{
        "generation": 1, "commit": "0123456789abcdef", "intent_hash": "ab",
        "published_at": "2024-01-01T00:00:00Z",
        "convergence": 0.0, "converged_instances": 0, "desired_instances": 1, "lease_s": 30,
        "workers": [{
            "id": "w1\u001b]0;owned\u0007",
            "labels": {"zone\u001b[2J": "a\u009b31m"},
            "capacity": {"cpu_millis": 1000, "memory_mib": 1000},
            "live": true, "enrolled_at": "2024-01-01T00:00:00Z", "seen_generation": 1,
            "assigned": ["web@0"],
            "instances": [{
                "spec": "web\u001b[1A", "replica": 0, "hash": "ab", "state": "failed",
                "uptime_s": 3, "snapshot_ids": ["\u001b[31mdeadbeef"], "commit": "\u001b[2Jc0ffee",
                "message": "died\nspec web: all fine\r\u202eenil"
            }]
        }],
        "specs": [{"id": "web", "hash": "ab", "kind": "service", "instances": [{
            "replica": 0, "worker": "w1\u001b]0;owned\u0007", "state": "failed",
            "running_commit": "\u001b[2Jc0ffee",
            "message": "died\nspec web: all fine"
        }]}],
        "unschedulable": [],
        "drift": ["worker w1\u001b[8m reports web@0 failed: died\nall converged"]
    }"#;

    #[test]
    fn replace_worker_revokes_the_old_token_and_writes_the_new_one_privately() {
        use clap::Parser as _;
        use std::os::unix::fs::PermissionsExt as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            cmd: MasterCommand,
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pub"), "publisher-token-x").unwrap();
        std::fs::write(dir.path().join("enroll"), "enroll-token-y").unwrap();
        let server = udos_master::spawn(
            ServeConfig::new(
                "127.0.0.1:0".parse().unwrap(),
                dir.path().join("m.db"),
                dir.path().join("pub"),
                dir.path().join("enroll"),
            ),
            1,
        )
        .unwrap();
        let url = server.url();
        let old = Client::new(&url, None)
            .unwrap()
            .with_token("enroll-token-y", "enroll")
            .enroll(&udos_core::wire::EnrollRequest {
                worker_id: "w1".into(),
                labels: Default::default(),
                capacity: Resources::default(),
            })
            .unwrap()
            .token;
        let state = StateDir::resolve(Some(&dir.path().join("state"))).unwrap();
        let out = dir.path().join("w1.token");
        let publisher_file = dir.path().join("pub");
        let args = [
            "udos",
            "replace-worker",
            "w1",
            "--master",
            &url,
            "--token-file",
            publisher_file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--labels",
            "zone=b",
        ];
        let cli = Cli::try_parse_from(args).unwrap();
        assert_eq!(master(&state, cli.cmd), ExitCode::SUCCESS);
        let token = udos_master::token::read_token_file(&out).unwrap();
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let worker = |t: &str| {
            Client::new(&url, None)
                .unwrap()
                .with_token(t, "w1.token")
                .assignment("w1", 0, None)
                .map(|_| ())
                .map_err(|e| e.status())
        };
        assert_eq!(worker(&old), Err(Some(401)));
        assert_eq!(worker(&token), Ok(()));
        // An id that is not enrolled: the master refuses, exit status 1.
        let cli = Cli::try_parse_from(args.map(|a| if a == "w1" { "ghost" } else { a })).unwrap();
        assert_eq!(master(&state, cli.cmd), ExitCode::from(1));
    }

    #[test]
    fn status_says_signed_only_when_the_master_verified_it() {
        let mut report: StatusReport = serde_json::from_str(HOSTILE).unwrap();
        for (state, says) in [
            (SignatureState::Unverified, "intent signature NOT verified"),
            (SignatureState::Invalid, "intent signature INVALID"),
            (SignatureState::Unsigned, "intent unsigned"),
            (
                SignatureState::Verified,
                "intent signed (verified by the master)",
            ),
        ] {
            report.signature_state = state;
            let out = render_status(&report);
            assert!(out.contains(says), "{state:?}: {out}");
            let claims = out.contains("signed (verified");
            assert_eq!(claims, state == SignatureState::Verified, "{out}");
        }
    }

    #[test]
    fn status_names_the_commit_each_run_ran() {
        let a = "a".repeat(40);
        let b = "b".repeat(40);
        let text = HOSTILE.replace("\\u001b[2Jc0ffee", &a).replace(
            "\"commit\": \"0123456789abcdef\"",
            &format!("\"commit\": \"{b}\""),
        );
        let report: StatusReport = serde_json::from_str(&text).unwrap();
        let out = render_status(&report);
        assert!(out.contains(&format!("commit {}", &b[..12])), "{out}");
        assert!(out.contains(&format!("failed 3s at {}", &a[..12])), "{out}");
        let spec_line = out.lines().find(|l| l.starts_with("web ")).unwrap();
        assert!(spec_line.contains(&a[..12]), "{out}");
    }

    #[test]
    fn status_prints_outside_text_escaped() {
        let report: StatusReport = serde_json::from_str(HOSTILE).unwrap();
        let out = render_status(&report);
        let raw: Vec<char> = out
            .chars()
            .filter(|c| (c.is_control() && *c != '\n') || *c == '\u{202e}')
            .collect();
        assert!(raw.is_empty(), "raw control characters {raw:?} in\n{out}");
        for shown in [
            "\\x1b[2Jc0ffee",
            "w1\\x1b]0;owned\\x07",
            "zone\\x1b[2J=a\\u{9b}31m",
            "died\\nspec web",
        ] {
            assert!(out.contains(shown), "{shown} missing in\n{out}");
        }
        // No line of the output was forged by a newline in a message.
        assert!(
            !out.lines()
                .any(|l| l.starts_with("spec web: all fine") || l.starts_with("all converged")),
            "{out}"
        );
    }
}
