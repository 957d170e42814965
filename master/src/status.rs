//! The convergence report, as a pure function of (active generation, placement,
//! workers with their last heartbeats, now). See docs/master-api.md, "Status".

use std::collections::{BTreeMap, HashMap};

use udos_core::desired::{DesiredSpec, Resources, SpecKind};
use udos_core::schedule::Placement;
use udos_core::wire::{Heartbeat, InstanceState, RunningInstance, SignatureState};

use crate::api::{
    InstanceHealth, InstanceStatus, SpecStatus, StatusReport, TokenIssuedBy, WorkerStatus,
};
use crate::store::GenerationRecord;
use crate::time::{human_duration, rfc3339};

/// What the status computation needs to know about one enrolled worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerState {
    /// Worker id.
    pub id: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Capacity.
    pub capacity: Resources,
    /// Enrollment, unix ms.
    pub enrolled_at_ms: u64,
    /// Who issued its current token.
    pub token_issued_by: TokenIssuedBy,
    /// Last contact (heartbeat, assignment poll, or now while a long poll is open), unix ms.
    pub last_seen_ms: u64,
    /// Last heartbeat, unix ms.
    pub last_heartbeat_ms: Option<u64>,
    /// Its last heartbeat.
    pub heartbeat: Option<Heartbeat>,
}

impl WorkerState {
    /// Seen within the lease at `now_ms`.
    pub fn live(&self, now_ms: u64, lease_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_seen_ms) < lease_ms
    }

    fn seen_generation(&self) -> u64 {
        self.heartbeat.as_ref().map_or(0, |h| h.seen_generation)
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

fn kind_name(kind: &SpecKind) -> &'static str {
    match kind {
        SpecKind::Service { .. } => "service",
        SpecKind::WorkflowRun { .. } => "workflow_run",
    }
}

/// For a workflow run reported at another commit than the active generation's: (the
/// commit it ran, the one wanted). Services run no commit's files; a run that reports
/// no commit (an older agent) is judged by its hash alone.
fn other_commit<'a>(
    spec: &DesiredSpec,
    active: Option<&'a GenerationRecord>,
    r: &'a RunningInstance,
) -> Option<(&'a str, &'a str)> {
    if !matches!(spec.kind, SpecKind::WorkflowRun { .. }) {
        return None;
    }
    let want = active?.commit.as_str();
    let ran = r.commit.as_deref()?;
    (!ran.eq_ignore_ascii_case(want)).then_some((ran, want))
}

/// Compute the status report. `workers` in any order; the report lists them by id.
/// `problem`: why the active generation cannot be scheduled, if it cannot; its specs
/// are then listed without instances (they may be far too many to list).
pub fn compute_status(
    active: Option<&GenerationRecord>,
    placement: &Placement,
    workers: &[WorkerState],
    now_ms: u64,
    lease_ms: u64,
    problem: Option<&str>,
) -> StatusReport {
    let mut workers: Vec<&WorkerState> = workers.iter().collect();
    workers.sort_by(|a, b| a.id.cmp(&b.id));
    let by_id: HashMap<&str, &WorkerState> = workers.iter().map(|w| (w.id.as_str(), *w)).collect();
    let generation = active.map_or(0, |g| g.number);

    let mut drift_workers = Vec::new();
    for w in &workers {
        if !w.live(now_ms, lease_ms) {
            let ago = human_duration(now_ms.saturating_sub(w.last_seen_ms) / 1000);
            drift_workers.push(format!("worker {} last seen {ago} ago", w.id));
        } else if active.is_some() && w.seen_generation() != generation {
            drift_workers.push(match &w.heartbeat {
                None => format!("worker {} has not sent a heartbeat yet", w.id),
                Some(h) => format!(
                    "worker {} has not reported generation {generation} yet (last reported {})",
                    w.id, h.seen_generation
                ),
            });
        }
    }

    // (spec, replica) → worker, and each worker's reported instances.
    let mut placed: HashMap<(&str, u32), &str> = HashMap::new();
    for (worker, list) in &placement.by_worker {
        for (spec, replica) in list {
            placed.insert((spec.as_str(), *replica), worker.as_str());
        }
    }
    let reported: HashMap<&str, HashMap<(&str, u32), &RunningInstance>> = workers
        .iter()
        .map(|w| {
            let m = w
                .heartbeat
                .iter()
                .flat_map(|h| h.instances.iter())
                .map(|i| ((i.spec.as_str(), i.replica), i))
                .collect();
            (w.id.as_str(), m)
        })
        .collect();
    let unschedulable_reason: HashMap<(&str, u32), &str> = placement
        .unschedulable
        .iter()
        .map(|u| ((u.spec.as_str(), u.replica), u.reason.as_str()))
        .collect();

    let mut specs = Vec::new();
    let mut drift_instances = Vec::new();
    let mut converged = 0u64;
    let mut desired = 0u64;
    let mut unsched_lines: BTreeMap<(String, String), Vec<u32>> = BTreeMap::new();
    for spec in active.map(|g| g.specs.as_slice()).unwrap_or(&[]) {
        let mut instances = Vec::new();
        if problem.is_some() {
            desired += u64::from(spec.instances());
            specs.push(SpecStatus {
                id: spec.id.clone(),
                hash: spec.hash.clone(),
                kind: kind_name(&spec.kind).to_string(),
                instances,
            });
            continue;
        }
        for replica in 0..spec.instances() {
            desired += 1;
            let name = format!("{}@{replica}", spec.id);
            let Some(&worker_id) = placed.get(&(spec.id.as_str(), replica)) else {
                let reason = unschedulable_reason
                    .get(&(spec.id.as_str(), replica))
                    .copied()
                    .unwrap_or("not placed");
                unsched_lines
                    .entry((spec.id.clone(), reason.to_string()))
                    .or_default()
                    .push(replica);
                instances.push(InstanceStatus {
                    replica,
                    worker: None,
                    state: InstanceHealth::Unschedulable,
                    running_hash: None,
                    running_commit: None,
                    message: Some(reason.to_string()),
                });
                continue;
            };
            let mut st = InstanceStatus {
                replica,
                worker: Some(worker_id.to_string()),
                state: InstanceHealth::WorkerDown,
                running_hash: None,
                running_commit: None,
                message: None,
            };
            let worker = by_id.get(worker_id);
            match worker {
                None => {
                    drift_instances.push(format!("{name} is placed on unknown worker {worker_id}"));
                }
                Some(w) if !w.live(now_ms, lease_ms) => {}
                Some(w) if w.seen_generation() != generation => st.state = InstanceHealth::Pending,
                Some(w) => {
                    let run = reported
                        .get(w.id.as_str())
                        .and_then(|m| m.get(&(spec.id.as_str(), replica)));
                    match run {
                        None => {
                            st.state = InstanceHealth::Missing;
                            drift_instances.push(format!(
                                "worker {worker_id} does not run {name}, wants hash {}",
                                short(&spec.hash)
                            ));
                        }
                        Some(r) => {
                            st.running_hash = Some(r.hash.clone());
                            st.running_commit = r.commit.clone();
                            st.message = r.message.clone();
                            let other_commit = other_commit(spec, active, r);
                            if r.hash != spec.hash {
                                st.state = InstanceHealth::Outdated;
                                drift_instances.push(format!(
                                    "worker {worker_id} runs {name} hash {}, wants {}",
                                    short(&r.hash),
                                    short(&spec.hash)
                                ));
                            } else if let Some((ran, want)) = other_commit {
                                st.state = InstanceHealth::Outdated;
                                drift_instances.push(format!(
                                    "worker {worker_id} runs {name} at commit {}, wants {}",
                                    short(ran),
                                    short(want)
                                ));
                            } else {
                                // A workflow run converges when it has finished well; a
                                // service, while it runs.
                                let is_run = matches!(spec.kind, SpecKind::WorkflowRun { .. });
                                st.state = match (r.state, is_run) {
                                    (InstanceState::Running, false)
                                    | (InstanceState::Succeeded, true) => InstanceHealth::Converged,
                                    (InstanceState::Starting, _)
                                    | (InstanceState::Running, true) => InstanceHealth::Starting,
                                    (InstanceState::Failed, _) => InstanceHealth::Failed,
                                    (InstanceState::Succeeded, false)
                                    | (InstanceState::Stopping, _) => InstanceHealth::Missing,
                                };
                                match st.state {
                                    InstanceHealth::Converged => converged += 1,
                                    InstanceHealth::Starting if is_run && r.state == InstanceState::Running => {
                                        drift_instances.push(format!("worker {worker_id} is still running {name}"))
                                    }
                                    InstanceHealth::Starting => {
                                        drift_instances.push(format!("worker {worker_id} is starting {name}"))
                                    }
                                    InstanceHealth::Failed => drift_instances.push(format!(
                                        "worker {worker_id} reports {name} failed{}",
                                        r.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default()
                                    )),
                                    _ if r.state == InstanceState::Stopping => drift_instances
                                        .push(format!("worker {worker_id} is stopping {name}, which it should run")),
                                    _ => drift_instances
                                        .push(format!("worker {worker_id} reports service {name} exited")),
                                }
                            }
                        }
                    }
                }
            }
            instances.push(st);
        }
        specs.push(SpecStatus {
            id: spec.id.clone(),
            hash: spec.hash.clone(),
            kind: kind_name(&spec.kind).to_string(),
            instances,
        });
    }

    // What workers run that is not assigned to them.
    let mut drift_extra = Vec::new();
    let mut worker_status = Vec::new();
    for w in &workers {
        let assigned: Vec<(String, u32)> =
            placement.by_worker.get(&w.id).cloned().unwrap_or_default();
        let live = w.live(now_ms, lease_ms);
        if live && active.is_some() && w.seen_generation() == generation {
            for i in w.heartbeat.iter().flat_map(|h| h.instances.iter()) {
                let mine = placed.get(&(i.spec.as_str(), i.replica)) == Some(&w.id.as_str());
                if !mine && i.state != InstanceState::Stopping {
                    drift_extra.push(format!(
                        "worker {} still runs {}@{} (hash {}), which is not assigned to it",
                        w.id,
                        i.spec,
                        i.replica,
                        short(&i.hash)
                    ));
                }
            }
        }
        worker_status.push(WorkerStatus {
            id: w.id.clone(),
            labels: w.labels.clone(),
            capacity: w.capacity,
            used: w.heartbeat.as_ref().map(|h| h.used),
            live,
            enrolled_at: rfc3339(w.enrolled_at_ms),
            token_issued_by: Some(w.token_issued_by),
            last_seen_at: Some(rfc3339(w.last_seen_ms)),
            last_seen_s_ago: Some(now_ms.saturating_sub(w.last_seen_ms) / 1000),
            last_heartbeat_at: w.last_heartbeat_ms.map(rfc3339),
            seen_generation: w.seen_generation(),
            assigned: assigned.iter().map(|(s, r)| format!("{s}@{r}")).collect(),
            instances: w
                .heartbeat
                .as_ref()
                .map(|h| h.instances.clone())
                .unwrap_or_default(),
        });
    }

    let mut drift_unsched = Vec::new();
    for ((spec, reason), replicas) in unsched_lines {
        if let Some(sel) = reason.strip_prefix("no worker matches selector ") {
            drift_unsched.push(format!("spec {spec} has no worker matching {sel}"));
        } else {
            let which = if replicas.len() == 1 {
                format!("replica {}", replicas[0])
            } else {
                format!(
                    "replicas {}",
                    replicas
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            drift_unsched.push(format!("spec {spec} ({which}) cannot be placed: {reason}"));
        }
    }

    let mut drift: Vec<String> = problem.map(str::to_string).into_iter().collect();
    drift.extend(drift_workers);
    drift.extend(drift_instances);
    drift.extend(drift_extra);
    drift.extend(drift_unsched);
    StatusReport {
        generation,
        commit: active.map(|g| g.commit.clone()),
        intent_hash: active.map(|g| g.intent_hash.clone()),
        published_at: active.map(|g| rfc3339(g.published_at_ms)),
        // Only the server knows its intent key: it fills this in.
        signature_state: SignatureState::Unsigned,
        convergence: if desired == 0 {
            1.0
        } else {
            converged as f64 / desired as f64
        },
        converged_instances: converged,
        desired_instances: desired,
        lease_s: lease_ms / 1000,
        workers: worker_status,
        specs,
        unschedulable: placement.unschedulable.clone(),
        drift,
        problem: problem.map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use udos_core::wire::Unschedulable;

    const H1: &str = "1111111111111111aaaa";
    const H2: &str = "2222222222222222bbbb";

    fn svc(id: &str, hash: &str, replicas: u32) -> DesiredSpec {
        DesiredSpec {
            id: id.into(),
            hash: hash.into(),
            kind: SpecKind::Service {
                image: "img".into(),
                replicas,
            },
            labels: BTreeMap::new(),
            selector: BTreeMap::new(),
            resources: Resources {
                cpu_millis: 100,
                memory_mib: 100,
            },
        }
    }

    type Reported<'a> = Vec<(&'a str, u32, &'a str, InstanceState)>;

    fn worker(id: &str, last_seen_ms: u64, hb: Option<(u64, Reported<'_>)>) -> WorkerState {
        WorkerState {
            id: id.into(),
            labels: BTreeMap::new(),
            capacity: Resources {
                cpu_millis: 1000,
                memory_mib: 1000,
            },
            enrolled_at_ms: 0,
            token_issued_by: TokenIssuedBy::EnrollmentToken,
            last_seen_ms,
            last_heartbeat_ms: hb.as_ref().map(|_| last_seen_ms),
            heartbeat: hb.map(|(g, inst)| Heartbeat {
                worker_id: id.into(),
                seen_generation: g,
                instances: inst
                    .into_iter()
                    .map(|(s, r, h, st)| RunningInstance {
                        spec: s.into(),
                        replica: r,
                        hash: h.into(),
                        state: st,
                        uptime_s: 1,
                        snapshot_ids: vec![],
                        message: None,
                        commit: None,
                    })
                    .collect(),
                used: Resources::default(),
            }),
        }
    }

    #[test]
    fn explains_every_kind_of_drift() {
        let gen = GenerationRecord {
            number: 3,
            commit: "c".repeat(40),
            intent_hash: "i".repeat(64),
            specs: vec![svc("db", H1, 1), svc("web", H1, 3)],
            signature: None,
            published_at_ms: 0,
            publisher: "ci".into(),
        };
        let placement = Placement {
            by_worker: BTreeMap::from([
                ("w1".to_string(), vec![("web".to_string(), 0)]),
                ("w2".to_string(), vec![("web".to_string(), 1)]),
                ("w4".to_string(), vec![("web".to_string(), 2)]),
            ]),
            unschedulable: vec![Unschedulable {
                spec: "db".into(),
                replica: 0,
                reason: "no worker matches selector zone=c".into(),
            }],
        };
        let now = 1_000_000;
        let workers = vec![
            worker(
                "w1",
                now,
                Some((3, vec![("web", 0, H1, InstanceState::Running)])),
            ),
            worker(
                "w2",
                now,
                Some((
                    3,
                    vec![
                        ("web", 1, H2, InstanceState::Running),
                        ("old", 0, H2, InstanceState::Running),
                    ],
                )),
            ),
            worker("w3", now - 240_000, Some((2, vec![]))),
            worker("w4", now, Some((2, vec![]))),
        ];
        let r = compute_status(Some(&gen), &placement, &workers, now, 30_000, None);
        assert_eq!((r.converged_instances, r.desired_instances), (1, 4));
        assert!((r.convergence - 0.25).abs() < 1e-9);
        assert_eq!(
            r.drift,
            vec![
                "worker w3 last seen 4m ago".to_string(),
                "worker w4 has not reported generation 3 yet (last reported 2)".into(),
                "worker w2 runs web@1 hash 222222222222, wants 111111111111".into(),
                "worker w2 still runs old@0 (hash 222222222222), which is not assigned to it"
                    .into(),
                "spec db has no worker matching zone=c".into(),
            ]
        );
        let web = &r.specs[1];
        assert_eq!(web.instances[0].state, InstanceHealth::Converged);
        assert_eq!(web.instances[1].state, InstanceHealth::Outdated);
        assert_eq!(web.instances[2].state, InstanceHealth::Pending);
        assert_eq!(r.specs[0].instances[0].state, InstanceHealth::Unschedulable);
        assert!(!r.workers[2].live);
        assert_eq!(r.workers[0].assigned, vec!["web@0".to_string()]);
    }

    #[test]
    fn a_workflow_run_converges_only_once_it_succeeded() {
        let mut run = svc("ci", H1, 1);
        run.kind = SpecKind::WorkflowRun {
            workflow: "w.yml".into(),
            job: None,
            repository: None,
        };
        let gen = GenerationRecord {
            number: 1,
            commit: "c".repeat(40),
            intent_hash: "i".repeat(64),
            specs: vec![run, svc("web", H1, 1)],
            signature: None,
            published_at_ms: 0,
            publisher: "ci".into(),
        };
        let placement = Placement {
            by_worker: BTreeMap::from([(
                "w1".to_string(),
                vec![("ci".to_string(), 0), ("web".to_string(), 0)],
            )]),
            unschedulable: vec![],
        };
        let status = |ci: InstanceState, web: InstanceState| {
            let w = worker(
                "w1",
                5,
                Some((1, vec![("ci", 0, H1, ci), ("web", 0, H1, web)])),
            );
            compute_status(Some(&gen), &placement, &[w], 5, 30_000, None)
        };
        let r = status(InstanceState::Running, InstanceState::Running);
        assert_eq!((r.converged_instances, r.desired_instances), (1, 2));
        assert_eq!(r.specs[0].instances[0].state, InstanceHealth::Starting);
        assert!(
            r.drift
                .contains(&"worker w1 is still running ci@0".to_string()),
            "{:?}",
            r.drift
        );
        let r = status(InstanceState::Succeeded, InstanceState::Running);
        assert_eq!(r.converged_instances, 2);
        // A service that exited is not converged, even with the right hash.
        let r = status(InstanceState::Succeeded, InstanceState::Succeeded);
        assert_eq!(r.converged_instances, 1);
        assert_eq!(r.specs[1].instances[0].state, InstanceHealth::Missing);
    }

    #[test]
    fn a_workflow_run_at_another_commit_is_outdated() {
        let mut run = svc("ci", H1, 1);
        run.kind = SpecKind::WorkflowRun {
            workflow: "w.yml".into(),
            job: None,
            repository: None,
        };
        let gen = GenerationRecord {
            number: 2,
            commit: "b".repeat(40),
            intent_hash: "i".repeat(64),
            specs: vec![run, svc("web", H1, 1)],
            signature: None,
            published_at_ms: 0,
            publisher: "ci".into(),
        };
        let placement = Placement {
            by_worker: BTreeMap::from([(
                "w1".to_string(),
                vec![("ci".to_string(), 0), ("web".to_string(), 0)],
            )]),
            unschedulable: vec![],
        };
        // The same hash, run at `ran` (None: an agent that does not say).
        let status = |ran: Option<String>| {
            let mut w = worker(
                "w1",
                5,
                Some((
                    2,
                    vec![
                        ("ci", 0, H1, InstanceState::Succeeded),
                        ("web", 0, H1, InstanceState::Running),
                    ],
                )),
            );
            if let Some(hb) = w.heartbeat.as_mut() {
                for i in hb.instances.iter_mut() {
                    // A service reporting a commit is not judged by it.
                    i.commit = ran.clone();
                }
            }
            compute_status(Some(&gen), &placement, &[w], 5, 30_000, None)
        };
        let r = status(Some("a".repeat(40)));
        assert_eq!(r.specs[0].instances[0].state, InstanceHealth::Outdated);
        assert_eq!(
            r.specs[0].instances[0].running_commit.as_deref(),
            Some("a".repeat(40).as_str())
        );
        assert_eq!(r.converged_instances, 1, "only the service: {:?}", r.drift);
        assert!(
            r.drift.contains(
                &"worker w1 runs ci@0 at commit aaaaaaaaaaaa, wants bbbbbbbbbbbb".to_string()
            ),
            "{:?}",
            r.drift
        );
        let r = status(Some("B".repeat(40)));
        assert_eq!(r.specs[0].instances[0].state, InstanceHealth::Converged);
        assert_eq!(r.converged_instances, 2);
        let r = status(None);
        assert_eq!(r.converged_instances, 2);
        assert_eq!(r.specs[0].instances[0].running_commit, None);
    }

    #[test]
    fn an_unschedulable_generation_lists_no_instances() {
        let gen = GenerationRecord {
            number: 2,
            commit: "c".repeat(40),
            intent_hash: "i".repeat(64),
            specs: vec![svc("web", H1, u32::MAX), svc("db", H1, 1)],
            signature: None,
            published_at_ms: 0,
            publisher: "old master".into(),
        };
        let why = "generation 2 cannot be scheduled: too many replicas";
        let w = worker(
            "w1",
            5,
            Some((1, vec![("web", 0, H1, InstanceState::Running)])),
        );
        let r = compute_status(
            Some(&gen),
            &Placement::default(),
            &[w],
            5,
            30_000,
            Some(why),
        );
        assert_eq!(r.problem.as_deref(), Some(why));
        assert_eq!(r.drift[0], why);
        assert_eq!(r.desired_instances, u64::from(u32::MAX) + 1);
        assert_eq!(r.converged_instances, 0);
        assert_eq!(r.convergence, 0.0);
        assert_eq!(r.specs.len(), 2);
        assert!(r.specs.iter().all(|s| s.instances.is_empty()));
    }

    #[test]
    fn nothing_published_is_converged() {
        let r = compute_status(
            None,
            &Placement::default(),
            &[worker("w1", 10, None)],
            10,
            30_000,
            None,
        );
        assert_eq!(r.generation, 0);
        assert_eq!(r.convergence, 1.0);
        assert!(r.drift.is_empty());
    }
}
