//! The worker agent loop (`udos agent`, docs/master-api.md "Worker loop").
//!
//! Two threads:
//! - the **poller** asks the master for this worker's assignment (a long poll: it
//!   returns when the generation or the assignment changes), passes every answer to
//!   the main loop, waits until the main loop has reported the new assignment in a
//!   heartbeat (otherwise the master answers at once again), and retries after
//!   `--retry` when the master cannot be reached;
//! - the **main loop** verifies a new assignment (signed intent, with
//!   `--intent-pubkey`), persists it as the last known good one, and once a second
//!   reconciles it with what the [`Executor`] runs (`udos_core::reconcile`), applies
//!   the actions, and sends a heartbeat when something changed (or every
//!   `--heartbeat`).
//!
//! When the master is unreachable the worker keeps running its last known good
//! assignment; after a restart it loads it from the state dir, asks the master again,
//! and falls back to it if the master does not answer.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use udos_core::desired::Resources;
use udos_core::reconcile::{reconcile, Action, Running};
use udos_core::wire::{
    Assignment, AssignmentResponse, EnrollRequest, Heartbeat, InstanceState, RunningInstance,
};
use udos_master::api::GenerationDetail;
use udos_master::{Client, ClientError};

use super::executor::{summarize, Executor};

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Master URL (`http://` or `https://`).
    pub master: String,
    /// CA certificate (PEM) to trust for `https://`.
    pub ca_cert: Option<PathBuf>,
    /// Stable worker id.
    pub worker_id: String,
    /// Worker labels.
    pub labels: BTreeMap<String, String>,
    /// What this worker offers.
    pub capacity: Resources,
    /// The worker token (written by enrollment when missing, mode 0600).
    pub token_file: PathBuf,
    /// The enrollment token, needed when `token_file` is missing or refused.
    pub enroll_token_file: Option<PathBuf>,
    /// Verify signed intent with this key.
    pub intent_key: Option<VerifyingKey>,
    /// Longest wait of one long poll.
    pub poll: Duration,
    /// Wait after a failed poll.
    pub retry: Duration,
    /// A heartbeat at least this often (and whenever something changes).
    pub heartbeat: Duration,
    /// Where the agent keeps its state (`assignment.json`).
    pub dir: PathBuf,
    /// How often the main loop reconciles.
    pub tick: Duration,
}

impl AgentConfig {
    /// Defaults: poll 60 s, retry 30 s, heartbeat 10 s, tick 1 s, no TLS, no intent key.
    pub fn new(
        master: impl Into<String>,
        worker_id: impl Into<String>,
        token_file: impl Into<PathBuf>,
        dir: impl Into<PathBuf>,
    ) -> Self {
        AgentConfig {
            master: master.into(),
            ca_cert: None,
            worker_id: worker_id.into(),
            labels: BTreeMap::new(),
            capacity: Resources::default(),
            token_file: token_file.into(),
            enroll_token_file: None,
            intent_key: None,
            poll: Duration::from_secs(60),
            retry: Duration::from_secs(30),
            heartbeat: Duration::from_secs(10),
            dir: dir.into(),
            tick: Duration::from_secs(1),
        }
    }

    fn client(&self) -> Result<Client> {
        Ok(Client::new(&self.master, self.ca_cert.as_deref())?
            .with_timeout(Duration::from_secs(20)))
    }

    fn log(&self, msg: &str) {
        eprintln!("udos agent {}: {msg}", self.worker_id);
    }
}

/// The last known good assignment, as `<dir>/assignment.json` keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedAssignment {
    /// Whose.
    pub worker_id: String,
    /// From which master.
    pub master: String,
    /// When it was saved (unix seconds).
    pub saved_at: u64,
    /// The master's answer.
    pub assignment: AssignmentResponse,
}

/// Where the last known good assignment is kept.
pub fn assignment_file(dir: &Path) -> PathBuf {
    dir.join("assignment.json")
}

/// Load the last known good assignment of `worker_id`, if any.
pub fn load_assignment(dir: &Path, worker_id: &str) -> Result<Option<AssignmentResponse>> {
    let path = assignment_file(dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context(format!("reading {}", path.display())),
    };
    let saved: SavedAssignment = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a saved assignment", path.display()))?;
    if saved.worker_id != worker_id {
        bail!(
            "{} belongs to worker `{}`, not `{worker_id}`: use another --state-dir",
            path.display(),
            saved.worker_id
        );
    }
    Ok(Some(saved.assignment))
}

/// The worker token: read it, or enroll and write it (0600).
pub fn ensure_token(cfg: &AgentConfig) -> Result<String> {
    match udos_master::token::read_token_file(&cfg.token_file) {
        Ok(t) => return Ok(t),
        Err(udos_master::token::TokenError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    enroll(cfg)
}

/// Enroll with the enrollment token and write the worker token file (0600).
pub fn enroll(cfg: &AgentConfig) -> Result<String> {
    let Some(enroll_file) = &cfg.enroll_token_file else {
        bail!(
            "no worker token in {} and no --enroll-token-file to enroll with",
            cfg.token_file.display()
        );
    };
    let client = cfg.client()?.with_token_file(enroll_file)?;
    let resp = client
        .enroll(&EnrollRequest {
            worker_id: cfg.worker_id.clone(),
            labels: cfg.labels.clone(),
            capacity: cfg.capacity,
        })
        .context("enrolling")?;
    super::write_secret(&cfg.token_file, &resp.token)?;
    cfg.log(&format!(
        "enrolled with {}; token saved in {}",
        cfg.master,
        cfg.token_file.display()
    ));
    Ok(resp.token)
}

enum Event {
    /// An answer; `changed` when it differs from the previous one.
    Assignment(Box<AssignmentResponse>, bool),
    /// The poll failed.
    Unreachable(String),
    /// The poller re-enrolled: use this token.
    Token(String),
}

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let deadline = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(100)));
    }
}

type AnswerKey = (u64, Option<String>, Option<String>, Vec<Assignment>);

fn poller(
    cfg: AgentConfig,
    mut client: Client,
    tx: Sender<Event>,
    ack: Receiver<()>,
    stop: Arc<AtomicBool>,
) {
    let mut seen = 0u64;
    let mut wait = 0u64;
    let mut last: Option<AnswerKey> = None;
    let mut reenrolled = false;
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        let w = (wait > 0).then(|| Duration::from_secs(wait));
        match client.assignment(&cfg.worker_id, seen, w) {
            Ok(resp) => {
                reenrolled = false;
                let key: AnswerKey = (
                    resp.generation,
                    resp.intent_hash.clone(),
                    resp.signature.clone(),
                    resp.assignments.clone(),
                );
                let changed = last.as_ref() != Some(&key);
                seen = resp.generation;
                let hint = resp.poll_hint.max(1);
                if tx.send(Event::Assignment(Box::new(resp), changed)).is_err() {
                    return;
                }
                if changed {
                    last = Some(key);
                    // Wait until the main loop has reported it (or a while).
                    while ack.try_recv().is_ok() {}
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        match ack.recv_timeout(Duration::from_millis(100)) {
                            Ok(()) => break,
                            Err(RecvTimeoutError::Timeout) => {}
                            Err(RecvTimeoutError::Disconnected) => return,
                        }
                    }
                } else if t0.elapsed() < Duration::from_millis(500) {
                    // The master answered at once without news: it has not seen our
                    // report of this assignment yet. Do not hammer it.
                    sleep_unless(
                        &stop,
                        Duration::from_secs(hint.min(cfg.poll.as_secs().max(1))),
                    );
                }
                wait = cfg.poll.as_secs().clamp(1, 60).min(hint.max(1));
            }
            Err(e) => {
                let refused = matches!(e, ClientError::Unauthorized { .. });
                if refused && !reenrolled && cfg.enroll_token_file.is_some() {
                    reenrolled = true;
                    cfg.log(&format!("{e}; enrolling again"));
                    match enroll(&cfg) {
                        Ok(token) => {
                            client = client
                                .with_token(token.clone(), cfg.token_file.display().to_string());
                            let _ = tx.send(Event::Token(token));
                            continue;
                        }
                        Err(e) => cfg.log(&format!("error: {e:#}")),
                    }
                }
                if tx.send(Event::Unreachable(e.to_string())).is_err() {
                    return;
                }
                sleep_unless(&stop, cfg.retry);
                wait = 0;
            }
        }
    }
}

/// Checks an assignment against signed intent.
struct Verifier {
    key: Option<VerifyingKey>,
    cache: HashMap<u64, GenerationDetail>,
}

impl Verifier {
    fn check(&mut self, client: &Client, resp: &AssignmentResponse) -> Result<()> {
        let Some(key) = &self.key else { return Ok(()) };
        if resp.generation == 0 {
            if resp.assignments.is_empty() {
                return Ok(());
            }
            bail!("generation 0 cannot assign anything");
        }
        let n = resp.generation;
        let intent = resp
            .intent_hash
            .as_deref()
            .with_context(|| format!("generation {n} has no intent hash"))?;
        let sig = resp
            .signature
            .as_deref()
            .with_context(|| format!("generation {n} is not signed"))?;
        udos_master::signing::verify_intent(key, intent, sig)
            .with_context(|| format!("generation {n}"))?;
        if !self.cache.contains_key(&n) {
            let detail = client
                .generation(n)
                .with_context(|| format!("fetching generation {n} to check it"))?;
            let recomputed = udos_core::desired::intent_hash(&detail.commit, &detail.specs);
            if recomputed != detail.intent_hash {
                bail!(
                    "generation {n}: its specs hash to {recomputed}, not to its intent hash {}",
                    detail.intent_hash
                );
            }
            if self.cache.len() >= 16 {
                self.cache.clear();
            }
            self.cache.insert(n, detail);
        }
        let detail = &self.cache[&n];
        if detail.intent_hash != intent {
            bail!(
                "generation {n}: the assignment names intent {intent}, the generation holds {}",
                detail.intent_hash
            );
        }
        if resp.commit.as_deref() != Some(detail.commit.as_str()) {
            bail!("generation {n}: the assignment's commit is not the generation's");
        }
        for a in &resp.assignments {
            if !detail.specs.contains(&a.spec) {
                bail!(
                    "generation {n}: spec `{}` (hash {}) is not in the signed intent",
                    a.spec.id,
                    a.spec.hash
                );
            }
            if a.replica >= a.spec.instances() {
                bail!(
                    "generation {n}: replica {} of `{}` does not exist",
                    a.replica,
                    a.spec.id
                );
            }
        }
        Ok(())
    }
}

/// Restarts (a service re-created with the same hash, or a failed create) back off:
/// 1 s, 2 s, 4 s ... up to a minute.
#[derive(Default)]
struct Backoff {
    tries: HashMap<(String, u32), (u32, Instant)>,
}

impl Backoff {
    fn ready(&self, key: &(String, u32), now: Instant) -> bool {
        match self.tries.get(key) {
            None => true,
            Some((n, last)) => {
                let delay = Duration::from_secs(1u64 << (*n).min(6)).min(Duration::from_secs(60));
                now.duration_since(*last) >= delay
            }
        }
    }
    fn note(&mut self, key: (String, u32), now: Instant) {
        let e = self.tries.entry(key).or_insert((0, now));
        e.0 += 1;
        e.1 = now;
    }
    /// Forget instances that have been running for a while.
    fn settle(&mut self, running: &[RunningInstance], now: Instant) {
        self.tries.retain(|k, (_, last)| {
            let up = running
                .iter()
                .any(|i| i.spec == k.0 && i.replica == k.1 && i.state == InstanceState::Running);
            !(up && now.duration_since(*last) > Duration::from_secs(60))
        });
    }
}

/// What a heartbeat reports, without the ever-growing uptimes: a change means a
/// heartbeat is due.
type Summary = Vec<(
    String,
    u32,
    String,
    &'static str,
    Vec<String>,
    Option<String>,
    Option<String>,
)>;

fn summary(instances: &[RunningInstance]) -> Summary {
    let mut s: Summary = instances
        .iter()
        .map(|i| {
            (
                i.spec.clone(),
                i.replica,
                i.hash.clone(),
                super::state_name(i.state),
                i.snapshot_ids.clone(),
                i.message.clone(),
                i.commit.clone(),
            )
        })
        .collect();
    s.sort();
    s
}

/// The instances to report: an instance still stopping is left out when another
/// instance of the same (spec, replica) runs (the master keys its report by them).
fn reportable(instances: &[RunningInstance]) -> Vec<RunningInstance> {
    let live: std::collections::HashSet<(&str, u32)> = instances
        .iter()
        .filter(|i| i.state != InstanceState::Stopping)
        .map(|i| (i.spec.as_str(), i.replica))
        .collect();
    let mut out: Vec<RunningInstance> = instances
        .iter()
        .filter(|i| {
            i.state != InstanceState::Stopping || !live.contains(&(i.spec.as_str(), i.replica))
        })
        .cloned()
        .collect();
    out.sort_by(|a, b| (&a.spec, a.replica, &a.hash).cmp(&(&b.spec, b.replica, &b.hash)));
    out
}

fn used(desired: &[Assignment], instances: &[RunningInstance]) -> Resources {
    let mut total = Resources::default();
    for i in instances {
        if !matches!(i.state, InstanceState::Starting | InstanceState::Running) {
            continue;
        }
        if let Some(a) = desired
            .iter()
            .find(|a| a.spec.id == i.spec && a.replica == i.replica && a.spec.hash == i.hash)
        {
            total.cpu_millis += a.spec.resources.cpu_millis;
            total.memory_mib += a.spec.resources.memory_mib;
        }
    }
    total
}

/// Run the agent until `stop` is set: enroll if needed, then poll, reconcile and
/// report (see the module docs). The executor is shut down before returning.
pub fn run(cfg: &AgentConfig, exec: &mut dyn Executor, stop: Arc<AtomicBool>) -> Result<()> {
    std::fs::create_dir_all(&cfg.dir).with_context(|| format!("creating {}", cfg.dir.display()))?;
    let token = loop {
        match ensure_token(cfg) {
            Ok(t) => break t,
            Err(e) => {
                // A master that is down at first start: wait for it.
                let unreachable = e.chain().any(|c| {
                    matches!(
                        c.downcast_ref::<ClientError>(),
                        Some(ClientError::Unreachable { .. })
                    )
                });
                if !unreachable {
                    return Err(e);
                }
                cfg.log(&format!(
                    "cannot enroll yet: {e:#}; retrying in {:?}",
                    cfg.retry
                ));
                sleep_unless(&stop, cfg.retry);
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
            }
        }
    };
    let origin = cfg.token_file.display().to_string();
    let mut client = cfg.client()?.with_token(token, origin.clone());
    let saved = load_assignment(&cfg.dir, &cfg.worker_id)?;
    if let Some(s) = &saved {
        cfg.log(&format!(
            "last known good assignment: generation {}, {} instance(s)",
            s.generation,
            s.assignments.len()
        ));
    }

    let (tx, rx) = mpsc::channel();
    let (ack_tx, ack_rx) = mpsc::channel();
    {
        let cfg = cfg.clone();
        let client = client.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("udos-agent-poll".into())
            .spawn(move || poller(cfg, client, tx, ack_rx, stop))
            .context("starting the poller")?;
    }

    let mut verifier = Verifier {
        key: cfg.intent_key,
        cache: HashMap::new(),
    };
    let mut desired: Option<AssignmentResponse> = None;
    let mut started = false;
    let mut unreachable_since: Option<Instant> = None;
    let mut refused_generation: Option<u64> = None;
    let mut pending_ack = false;
    let mut last_report: Option<Summary> = None;
    let mut hb_due = Instant::now();
    let mut hb_not_before = Instant::now();
    let mut backoff = Backoff::default();
    let mut last_counts = String::new();

    while !stop.load(Ordering::Relaxed) {
        match rx.recv_timeout(cfg.tick) {
            Ok(Event::Assignment(resp, changed)) => {
                started = true;
                if let Some(since) = unreachable_since.take() {
                    cfg.log(&format!(
                        "the master answers again (after {}s)",
                        since.elapsed().as_secs()
                    ));
                    // It may have restarted: tell it at once what runs here.
                    hb_not_before = Instant::now();
                    hb_due = hb_not_before;
                }
                if changed {
                    pending_ack = true;
                    let same = desired.as_ref().is_some_and(|d| same_intent(d, &resp));
                    if !same {
                        match verifier.check(&client, &resp) {
                            Ok(()) => {
                                refused_generation = None;
                                cfg.log(&format!(
                                    "generation {} ({}): {} instance(s) assigned",
                                    resp.generation,
                                    resp.commit
                                        .as_deref()
                                        .map(|c| &c[..c.len().min(12)])
                                        .unwrap_or("-"),
                                    resp.assignments.len()
                                ));
                                let saved = SavedAssignment {
                                    worker_id: cfg.worker_id.clone(),
                                    master: cfg.master.clone(),
                                    saved_at: super::executor::unix_now(),
                                    assignment: (*resp).clone(),
                                };
                                if let Err(e) =
                                    super::write_json_atomic(&assignment_file(&cfg.dir), &saved)
                                {
                                    cfg.log(&format!("error: cannot save the assignment: {e:#}"));
                                }
                                desired = Some(*resp);
                            }
                            Err(e) => {
                                if refused_generation != Some(resp.generation) {
                                    cfg.log(&format!(
                                        "error: refusing the assignment of generation {}: {e:#}; keeping generation {}",
                                        resp.generation,
                                        desired.as_ref().map_or(0, |d| d.generation)
                                    ));
                                }
                                refused_generation = Some(resp.generation);
                                if desired.is_none() {
                                    desired = saved.clone();
                                }
                            }
                        }
                    }
                }
            }
            Ok(Event::Unreachable(e)) => {
                if !started {
                    started = true;
                    desired = saved.clone();
                    cfg.log(&format!(
                        "cannot reach the master ({e}); running the last known good assignment (generation {})",
                        desired.as_ref().map_or(0, |d| d.generation)
                    ));
                } else if unreachable_since.is_none() {
                    cfg.log(&format!(
                        "cannot reach the master ({e}); keeping generation {}",
                        desired.as_ref().map_or(0, |d| d.generation)
                    ));
                }
                unreachable_since.get_or_insert_with(Instant::now);
            }
            Ok(Event::Token(t)) => {
                client = client.with_token(t, origin.clone());
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) if stop.load(Ordering::Relaxed) => break,
            Err(RecvTimeoutError::Disconnected) => bail!("the poller thread ended"),
        }
        if !started {
            continue;
        }

        // Reconcile.
        let assignments: &[Assignment] = desired.as_ref().map_or(&[], |d| &d.assignments);
        let commit: Option<&str> = desired.as_ref().and_then(|d| d.commit.as_deref());
        let mut instances = exec.poll();
        let now = Instant::now();
        backoff.settle(&instances, now);
        let running: Vec<Running> = instances
            .iter()
            .map(|i| Running {
                spec: i.spec.clone(),
                replica: i.replica,
                hash: i.hash.clone(),
                state: i.state,
                commit: i.commit.clone(),
            })
            .collect();
        let mut acted = false;
        for action in reconcile(assignments, commit, &running) {
            match action {
                Action::Noop { .. } => {}
                Action::Stop {
                    spec,
                    replica,
                    hash,
                } => {
                    // Already on its way out: nothing more to do.
                    let stopping = instances.iter().any(|i| {
                        i.spec == spec
                            && i.replica == replica
                            && i.hash == hash
                            && i.state == InstanceState::Stopping
                    });
                    if stopping {
                        continue;
                    }
                    cfg.log(&format!("stop {spec}@{replica} (hash {})", short(&hash)));
                    if let Err(e) = exec.stop(&spec, replica, &hash) {
                        cfg.log(&format!("error: stopping {spec}@{replica}: {e:#}"));
                    }
                    acted = true;
                }
                Action::Replace { old_hash, new } => {
                    let key = (new.spec.id.clone(), new.replica);
                    let old = instances
                        .iter()
                        .find(|i| i.spec == key.0 && i.replica == key.1 && i.hash == old_hash);
                    // Same hash: a restart, or a workflow run of an earlier commit.
                    let ran = old.and_then(|i| i.commit.clone());
                    let new_commit = ran
                        .as_deref()
                        .is_some_and(|r| commit.is_some_and(|c| !c.eq_ignore_ascii_case(r)));
                    let restart = old_hash == new.spec.hash && !new_commit;
                    if restart && !backoff.ready(&key, now) {
                        continue;
                    }
                    let why = old.and_then(|i| i.message.clone());
                    if new_commit {
                        cfg.log(&format!(
                            "run {}@{} again: it ran commit {}, the generation is at {}",
                            key.0,
                            key.1,
                            short(ran.as_deref().unwrap_or("-")),
                            short(commit.unwrap_or("-"))
                        ));
                    } else if restart {
                        backoff.note(key.clone(), now);
                        cfg.log(&format!(
                            "restart {}@{}{}",
                            key.0,
                            key.1,
                            why.map(|w| format!(" ({w})")).unwrap_or_default()
                        ));
                    } else {
                        cfg.log(&format!(
                            "replace {}@{}: hash {} -> {}",
                            key.0,
                            key.1,
                            short(&old_hash),
                            short(&new.spec.hash)
                        ));
                    }
                    if let Err(e) = exec.stop(&key.0, key.1, &old_hash) {
                        cfg.log(&format!("error: stopping {}@{}: {e:#}", key.0, key.1));
                    }
                    if let Err(e) = exec.create(&new, commit) {
                        backoff.note(key.clone(), now);
                        cfg.log(&format!("error: creating {}@{}: {e:#}", key.0, key.1));
                    }
                    acted = true;
                }
                Action::Create(a) => {
                    let key = (a.spec.id.clone(), a.replica);
                    if !backoff.ready(&key, now) {
                        continue;
                    }
                    let at = match (&a.spec.kind, commit) {
                        (udos_core::desired::SpecKind::WorkflowRun { .. }, Some(c)) => {
                            format!(" at commit {}", short(c))
                        }
                        _ => String::new(),
                    };
                    cfg.log(&format!(
                        "create {}@{} (hash {}){at}",
                        key.0,
                        key.1,
                        short(&a.spec.hash)
                    ));
                    if let Err(e) = exec.create(&a, commit) {
                        backoff.note(key.clone(), now);
                        cfg.log(&format!("error: creating {}@{}: {e:#}", key.0, key.1));
                    }
                    acted = true;
                }
            }
        }
        if acted {
            instances = exec.poll();
        }
        let counts = summarize(&instances);
        if counts != last_counts {
            cfg.log(&format!("instances: {counts}"));
            last_counts = counts;
        }

        // Report.
        let report = reportable(&instances);
        let sum = summary(&report);
        let now = Instant::now();
        let due = pending_ack || last_report.as_ref() != Some(&sum) || now >= hb_due;
        if due && now >= hb_not_before {
            let hb = Heartbeat {
                worker_id: cfg.worker_id.clone(),
                seen_generation: desired.as_ref().map_or(0, |d| d.generation),
                used: used(assignments, &report),
                instances: report,
            };
            match client.heartbeat(&hb) {
                Ok(_) => {
                    last_report = Some(sum);
                    hb_due = now + cfg.heartbeat;
                    if pending_ack {
                        pending_ack = false;
                        let _ = ack_tx.send(());
                    }
                }
                Err(e) => {
                    hb_not_before = now + cfg.retry.min(Duration::from_secs(5));
                    if unreachable_since.is_none() {
                        cfg.log(&format!("heartbeat failed: {e}"));
                    }
                    if matches!(
                        e,
                        ClientError::Unauthorized { .. } | ClientError::Forbidden { .. }
                    ) {
                        hb_not_before = now + cfg.retry;
                    }
                }
            }
        }
    }
    cfg.log("stopping");
    exec.shutdown();
    Ok(())
}

/// Same generation, intent and assignments (the poll hint aside).
fn same_intent(a: &AssignmentResponse, b: &AssignmentResponse) -> bool {
    a.generation == b.generation
        && a.commit == b.commit
        && a.intent_hash == b.intent_hash
        && a.signature == b.signature
        && a.assignments == b.assignments
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use udos_core::desired::{DesiredSpec, SpecKind};
    use udos_core::wire::PublishRequest;
    use udos_master::{spawn, ServeConfig};

    /// Runs nothing, remembers everything: services start at once, workflow runs
    /// succeed at once.
    #[derive(Default, Clone)]
    struct Fake {
        inner: Arc<Mutex<FakeState>>,
    }

    #[derive(Default)]
    struct FakeState {
        running: Vec<RunningInstance>,
        created: Vec<(String, u32, String, Option<String>)>,
        stopped: Vec<(String, u32, String)>,
    }

    impl Executor for Fake {
        fn create(&mut self, a: &Assignment, commit: Option<&str>) -> Result<()> {
            let mut g = self.inner.lock().unwrap();
            g.created.push((
                a.spec.id.clone(),
                a.replica,
                a.spec.hash.clone(),
                commit.map(str::to_string),
            ));
            let is_run = matches!(a.spec.kind, SpecKind::WorkflowRun { .. });
            let state = match a.spec.kind {
                SpecKind::Service { .. } => InstanceState::Running,
                SpecKind::WorkflowRun { .. } => InstanceState::Succeeded,
            };
            g.running.push(RunningInstance {
                spec: a.spec.id.clone(),
                replica: a.replica,
                hash: a.spec.hash.clone(),
                state,
                uptime_s: 0,
                snapshot_ids: if state == InstanceState::Succeeded {
                    vec!["ab".repeat(32)]
                } else {
                    vec![]
                },
                message: None,
                commit: is_run.then(|| commit.map(str::to_string)).flatten(),
            });
            Ok(())
        }
        fn stop(&mut self, spec: &str, replica: u32, hash: &str) -> Result<()> {
            let mut g = self.inner.lock().unwrap();
            g.stopped.push((spec.into(), replica, hash.into()));
            g.running
                .retain(|i| !(i.spec == spec && i.replica == replica && i.hash == hash));
            Ok(())
        }
        fn poll(&mut self) -> Vec<RunningInstance> {
            self.inner.lock().unwrap().running.clone()
        }
    }

    impl Fake {
        fn kill_all(&self) {
            let mut g = self.inner.lock().unwrap();
            for i in g.running.iter_mut() {
                if i.state == InstanceState::Running {
                    i.state = InstanceState::Failed;
                }
            }
        }
        fn running(&self) -> Vec<RunningInstance> {
            self.inner.lock().unwrap().running.clone()
        }
        fn created(&self) -> usize {
            self.inner.lock().unwrap().created.len()
        }
        fn created_list(&self) -> Vec<(String, u32, String, Option<String>)> {
            self.inner.lock().unwrap().created.clone()
        }
    }

    fn svc(id: &str, hash: &str) -> DesiredSpec {
        DesiredSpec {
            id: id.into(),
            hash: hash.into(),
            kind: SpecKind::Service {
                image: "default".into(),
                replicas: 1,
            },
            labels: BTreeMap::new(),
            selector: BTreeMap::new(),
            resources: Resources {
                cpu_millis: 250,
                memory_mib: 128,
            },
        }
    }

    fn wf(id: &str, hash: &str) -> DesiredSpec {
        DesiredSpec {
            id: id.into(),
            hash: hash.into(),
            kind: SpecKind::WorkflowRun {
                workflow: ".github/workflows/ci.yml".into(),
                job: None,
                repository: None,
            },
            labels: BTreeMap::new(),
            selector: BTreeMap::new(),
            resources: Resources::default(),
        }
    }

    struct Master {
        dir: tempfile::TempDir,
        config: ServeConfig,
    }

    impl Master {
        fn new(key: Option<&str>) -> Master {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("pub"), "publisher-token-x").unwrap();
            std::fs::write(dir.path().join("enroll"), "enroll-token-y").unwrap();
            let mut config = ServeConfig::new(
                "127.0.0.1:0".parse().unwrap(),
                dir.path().join("m.db"),
                dir.path().join("pub"),
                dir.path().join("enroll"),
            );
            config.lease = Duration::from_secs(4);
            if let Some(k) = key {
                std::fs::write(dir.path().join("key.pub"), k).unwrap();
                config.intent_pubkey = Some(dir.path().join("key.pub"));
            }
            Master { dir, config }
        }
        fn publisher(&self, url: &str) -> Client {
            Client::new(url, None)
                .unwrap()
                .with_token("publisher-token-x", "test")
        }
    }

    fn agent_cfg(m: &Master, url: &str, id: &str) -> AgentConfig {
        let mut cfg = AgentConfig::new(
            url,
            id,
            m.dir.path().join(format!("{id}.token")),
            m.dir.path().join(id),
        );
        cfg.enroll_token_file = Some(m.dir.path().join("enroll"));
        cfg.capacity = Resources {
            cpu_millis: 4000,
            memory_mib: 4096,
        };
        cfg.poll = Duration::from_secs(2);
        cfg.retry = Duration::from_millis(300);
        cfg.tick = Duration::from_millis(100);
        cfg
    }

    fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn converged(c: &Client, generation: u64) -> bool {
        c.status()
            .map(|s| s.generation == generation && s.converged_instances == s.desired_instances)
            .unwrap_or(false)
    }

    const COMMIT_A: &str = "0123456789abcdef0123456789abcdef01234567";
    const COMMIT_B: &str = "1123456789abcdef0123456789abcdef01234567";

    #[test]
    fn converges_keeps_running_without_master_and_restarts_dead_services() {
        let m = Master::new(None);
        let server = spawn(m.config.clone(), 1).unwrap();
        let url = server.url();
        let publisher = m.publisher(&url);
        let cfg = agent_cfg(&m, &url, "w1");
        let fake = Fake::default();
        let stop = Arc::new(AtomicBool::new(false));
        let agent = {
            let (cfg, mut fake, stop) = (cfg.clone(), fake.clone(), stop.clone());
            std::thread::spawn(move || run(&cfg, &mut fake, stop))
        };
        publisher
            .publish(&PublishRequest {
                commit: COMMIT_A.into(),
                specs: vec![svc("web", &"a1".repeat(8)), wf("ci", &"c1".repeat(8))],
                signature: None,
            })
            .unwrap();
        wait_until("convergence", Duration::from_secs(20), || {
            converged(&publisher, 1)
        });
        assert!(cfg.token_file.is_file());
        let saved = load_assignment(&cfg.dir, "w1").unwrap().unwrap();
        assert_eq!(saved.generation, 1);
        assert_eq!(fake.created(), 2);

        // A dead service is restarted; a finished workflow run is not run again.
        fake.kill_all();
        wait_until("restart", Duration::from_secs(20), || fake.created() == 3);
        wait_until("convergence again", Duration::from_secs(20), || {
            converged(&publisher, 1)
        });

        // Master down: nothing is stopped; back with a new generation: converges.
        let port = server.local_addr().port();
        server.shutdown().unwrap();
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(fake.running().len(), 2);
        let mut config = m.config.clone();
        config.listen = format!("127.0.0.1:{port}").parse().unwrap();
        let server = spawn(config, 1).unwrap();
        wait_until("convergence after restart", Duration::from_secs(20), || {
            converged(&publisher, 1)
        });
        assert_eq!(
            fake.created(),
            3,
            "nothing re-created after a master restart"
        );
        publisher
            .publish(&PublishRequest {
                commit: COMMIT_B.into(),
                specs: vec![svc("web", &"a2".repeat(8))],
                signature: None,
            })
            .unwrap();
        wait_until("generation 2", Duration::from_secs(20), || {
            converged(&publisher, 2)
        });
        let running = fake.running();
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].hash, "a2".repeat(8));

        stop.store(true, Ordering::Relaxed);
        agent.join().unwrap().unwrap();

        // A restarted agent with the master gone runs the saved assignment.
        drop(server);
        let fresh = Fake::default();
        let stop = Arc::new(AtomicBool::new(false));
        let agent = {
            let (cfg, mut fresh, stop) = (cfg.clone(), fresh.clone(), stop.clone());
            std::thread::spawn(move || run(&cfg, &mut fresh, stop))
        };
        wait_until(
            "recreate from the saved assignment",
            Duration::from_secs(10),
            || fresh.created() == 1,
        );
        assert_eq!(fresh.running()[0].hash, "a2".repeat(8));
        stop.store(true, Ordering::Relaxed);
        agent.join().unwrap().unwrap();
    }

    #[test]
    fn an_unsigned_or_forged_assignment_is_refused() {
        use udos_master::signing;
        let key = signing::parse_signing_key(&"42".repeat(32)).unwrap();
        // The master does not check signatures (it may be compromised); the worker does.
        let m = Master::new(None);
        let server = spawn(m.config.clone(), 1).unwrap();
        let url = server.url();
        let publisher = m.publisher(&url);
        let mut cfg = agent_cfg(&m, &url, "w1");
        cfg.intent_key = Some(key.verifying_key());
        let fake = Fake::default();
        let stop = Arc::new(AtomicBool::new(false));
        let agent = {
            let (cfg, mut fake, stop) = (cfg.clone(), fake.clone(), stop.clone());
            std::thread::spawn(move || run(&cfg, &mut fake, stop))
        };
        let signed = |commit: &str, specs: Vec<DesiredSpec>| {
            let h = udos_core::desired::intent_hash(commit, &specs);
            PublishRequest {
                commit: commit.into(),
                signature: Some(signing::sign_intent(&key, &h)),
                specs,
            }
        };
        publisher
            .publish(&signed(COMMIT_A, vec![svc("web", &"a1".repeat(8))]))
            .unwrap();
        wait_until("signed generation 1", Duration::from_secs(20), || {
            converged(&publisher, 1)
        });
        // Unsigned: refused, generation 1 keeps running.
        publisher
            .publish(&PublishRequest {
                commit: COMMIT_B.into(),
                specs: vec![svc("web", &"b2".repeat(8))],
                signature: None,
            })
            .unwrap();
        // Signed by another key: refused too.
        let other = signing::parse_signing_key(&"43".repeat(32)).unwrap();
        let specs = vec![svc("web", &"b3".repeat(8))];
        let h = udos_core::desired::intent_hash(COMMIT_B, &specs);
        publisher
            .publish(&PublishRequest {
                commit: COMMIT_B.into(),
                signature: Some(signing::sign_intent(&other, &h)),
                specs,
            })
            .unwrap();
        std::thread::sleep(Duration::from_secs(3));
        let st = publisher.status().unwrap();
        assert_eq!(st.generation, 3);
        assert_eq!(st.workers[0].seen_generation, 1, "{st:#?}");
        assert_eq!(fake.running()[0].hash, "a1".repeat(8));
        assert_eq!(
            load_assignment(&cfg.dir, "w1").unwrap().unwrap().generation,
            1
        );
        // Properly signed: applied.
        publisher
            .publish(&signed(COMMIT_B, vec![svc("web", &"b4".repeat(8))]))
            .unwrap();
        wait_until("signed generation 4", Duration::from_secs(20), || {
            converged(&publisher, 4)
        });
        stop.store(true, Ordering::Relaxed);
        agent.join().unwrap().unwrap();
    }

    #[test]
    fn a_workflow_run_runs_again_for_a_new_commit_and_reports_it() {
        let m = Master::new(None);
        let server = spawn(m.config.clone(), 1).unwrap();
        let url = server.url();
        let publisher = m.publisher(&url);
        let cfg = agent_cfg(&m, &url, "w1");
        let fake = Fake::default();
        let stop = Arc::new(AtomicBool::new(false));
        let agent = {
            let (cfg, mut fake, stop) = (cfg.clone(), fake.clone(), stop.clone());
            std::thread::spawn(move || run(&cfg, &mut fake, stop))
        };
        // The publisher's hash covers the spec, not the commit's files: the same hash.
        let specs = vec![wf("ci", &"c1".repeat(8)), svc("web", &"a1".repeat(8))];
        let reported_commit = |c: &Client| -> Option<String> {
            let s = c.status().ok()?;
            let i = s
                .workers
                .first()?
                .instances
                .iter()
                .find(|i| i.spec == "ci")?;
            i.commit.clone()
        };
        for (n, commit) in [(1, COMMIT_A), (2, COMMIT_B)] {
            publisher
                .publish(&PublishRequest {
                    commit: commit.into(),
                    specs: specs.clone(),
                    signature: None,
                })
                .unwrap();
            wait_until(&format!("generation {n}"), Duration::from_secs(20), || {
                converged(&publisher, n) && reported_commit(&publisher).as_deref() == Some(commit)
            });
            let spec = &publisher.status().unwrap().specs[0];
            assert_eq!(spec.instances[0].running_commit.as_deref(), Some(commit));
        }
        let created = fake.created_list();
        let runs: Vec<_> = created.iter().filter(|c| c.0 == "ci").collect();
        assert_eq!(runs.len(), 2, "{created:?}");
        assert_eq!(runs[0].3.as_deref(), Some(COMMIT_A));
        assert_eq!(runs[1].3.as_deref(), Some(COMMIT_B));
        // The service was not touched by the new commit.
        assert_eq!(created.iter().filter(|c| c.0 == "web").count(), 1);
        stop.store(true, Ordering::Relaxed);
        agent.join().unwrap().unwrap();
    }

    #[test]
    fn reports_leave_out_stopping_duplicates() {
        let mk = |hash: &str, state| RunningInstance {
            spec: "web".into(),
            replica: 0,
            hash: hash.into(),
            state,
            uptime_s: 1,
            snapshot_ids: vec![],
            message: None,
            commit: None,
        };
        let r = reportable(&[
            mk("a", InstanceState::Stopping),
            mk("b", InstanceState::Running),
        ]);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].hash, "b");
        let r = reportable(&[mk("a", InstanceState::Stopping)]);
        assert_eq!(r.len(), 1);
    }
}
