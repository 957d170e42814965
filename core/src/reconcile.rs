//! A worker's reconcile decision: what to do to turn what runs into what is assigned.
//!
//! Pure: the worker feeds in its assignment (from the master) and what it runs (or
//! has finished), and gets one [`Action`] per instance, in an order it can apply
//! one by one. Instances are keyed by `(spec id, replica)` and compared by the spec's
//! content hash:
//!
//! - assigned and not running → [`Action::Create`];
//! - running with another hash → [`Action::Replace`] (stop the old, create the new);
//! - running with the same hash → [`Action::Noop`], with these exceptions by state:
//!   - a **workflow run** that `Succeeded` or `Failed` with that hash is a `Noop`: it ran
//!     to completion, and re-running it would repeat its side effects (a failed run is
//!     retried by publishing again, which gives a new hash or a new generation);
//!   - a **service** that is `Failed` or `Succeeded` (it exited, and services run
//!     until replaced) is `Replace`d with itself (`old_hash == new hash`): a restart;
//!   - an instance that is `Stopping` with that hash is `Replace`d too: it is on its
//!     way out, so the worker lets the stop finish and creates it again;
//!   - a **workflow run** of that hash that runs (or ran) another commit than the
//!     generation's is `Replace`d with itself: a publication runs its own commit's
//!     files, whatever the publisher's hash covers. A run that recorded no commit (an
//!     agent from before commits were recorded), or a generation without one, is
//!     compared by hash alone;
//! - running but not assigned (any state) → [`Action::Stop`]; so is any extra entry
//!   with another hash for an assigned `(spec, replica)` (only one is kept).
//!
//! Order: all `Stop`s first (they free capacity), then `Replace`s (stop then create at
//! about the same size), then `Create`s (they take capacity), then `Noop`s; within
//! each group by (spec id, replica, hash). The input order never matters.
//!
//! Degenerate inputs are handled deterministically: a `(spec, replica)` assigned
//! twice keeps the assignment with the smallest hash; a `(spec, replica, hash)`
//! reported twice counts once, with the liveliest state (running, starting,
//! succeeded, failed, stopping), then the entry at the generation's commit; when
//! several hashes run for one assigned instance and none is the desired one, the
//! smallest hash is replaced and the others stopped.

use std::collections::BTreeMap;

use crate::desired::SpecKind;
use crate::wire::{Assignment, InstanceState};

/// One instance the worker runs (or has finished).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// Spec id.
    pub spec: String,
    /// Replica index.
    pub replica: u32,
    /// The spec hash it runs.
    pub hash: String,
    /// Its state.
    pub state: InstanceState,
    /// For a workflow run, the commit it runs or ran (`None`: not recorded).
    pub commit: Option<String>,
}

/// What to do for one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// It already runs (or ran to completion) as desired.
    Noop {
        /// Spec id.
        spec: String,
        /// Replica index.
        replica: u32,
    },
    /// It is assigned and does not run: create it.
    Create(Assignment),
    /// It runs `old_hash`: stop that, then create `new` (a restart when the hashes
    /// are equal).
    Replace {
        /// The hash running now.
        old_hash: String,
        /// What to run instead.
        new: Assignment,
    },
    /// It runs but is not assigned (or is a surplus copy): stop it.
    Stop {
        /// Spec id.
        spec: String,
        /// Replica index.
        replica: u32,
        /// The hash it runs.
        hash: String,
    },
}

impl Action {
    /// Application order: stops, replaces, creates, noops.
    fn rank(&self) -> u8 {
        match self {
            Action::Stop { .. } => 0,
            Action::Replace { .. } => 1,
            Action::Create(_) => 2,
            Action::Noop { .. } => 3,
        }
    }

    /// (spec id, replica, hash) the action is about; the hash is the old one for a stop
    /// or replace, the new one for a create, empty for a noop.
    fn key(&self) -> (&str, u32, &str) {
        match self {
            Action::Noop { spec, replica } => (spec, *replica, ""),
            Action::Create(a) => (&a.spec.id, a.replica, &a.spec.hash),
            Action::Replace { old_hash, new } => (&new.spec.id, new.replica, old_hash),
            Action::Stop {
                spec,
                replica,
                hash,
            } => (spec, *replica, hash),
        }
    }
}

/// Lower is livelier: the state kept when one `(spec, replica, hash)` is reported twice.
fn liveliness(s: InstanceState) -> u8 {
    match s {
        InstanceState::Running => 0,
        InstanceState::Starting => 1,
        InstanceState::Succeeded => 2,
        InstanceState::Failed => 3,
        InstanceState::Stopping => 4,
    }
}

/// Whether an instance running the desired hash in `state` needs no action.
fn settled(kind: &SpecKind, state: InstanceState) -> bool {
    match state {
        InstanceState::Starting | InstanceState::Running => true,
        InstanceState::Stopping => false,
        InstanceState::Succeeded | InstanceState::Failed => {
            matches!(kind, SpecKind::WorkflowRun { .. })
        }
    }
}

/// Whether an instance of `kind` that ran `ran` is of the generation's `commit`. Only
/// workflow runs execute the commit's files; a missing commit on either side cannot
/// be compared and counts as current.
fn at_commit(kind: &SpecKind, commit: Option<&str>, ran: Option<&str>) -> bool {
    match (kind, commit, ran) {
        (SpecKind::WorkflowRun { .. }, Some(want), Some(ran)) => want.eq_ignore_ascii_case(ran),
        _ => true,
    }
}

/// Compare the assignment of the generation at `commit` with what runs; see the
/// module docs for the rules and the order of the result.
pub fn reconcile(desired: &[Assignment], commit: Option<&str>, running: &[Running]) -> Vec<Action> {
    // (spec, replica) -> assignment; a duplicate keeps the smallest hash.
    let mut want: BTreeMap<(&str, u32), &Assignment> = BTreeMap::new();
    for a in desired {
        want.entry((a.spec.id.as_str(), a.replica))
            .and_modify(|cur| {
                if a.spec.hash < cur.spec.hash {
                    *cur = a;
                }
            })
            .or_insert(a);
    }
    // (spec, replica) -> hash -> (state, commit) (when reported twice: the liveliest,
    // then the one at `commit`, then the smallest commit; whatever the input order).
    type Seen<'a> = (InstanceState, Option<&'a str>);
    let rank = |(state, ran): Seen<'_>| {
        let current = match (commit, ran) {
            (Some(want), Some(ran)) => want.eq_ignore_ascii_case(ran),
            _ => true,
        };
        (
            liveliness(state),
            !current,
            ran.map(str::to_ascii_lowercase),
        )
    };
    let mut have: BTreeMap<(&str, u32), BTreeMap<&str, Seen>> = BTreeMap::new();
    for r in running {
        let seen = (r.state, r.commit.as_deref());
        have.entry((r.spec.as_str(), r.replica))
            .or_default()
            .entry(r.hash.as_str())
            .and_modify(|s| {
                if rank(seen) < rank(*s) {
                    *s = seen;
                }
            })
            .or_insert(seen);
    }

    let stop = |(spec, replica): (&str, u32), hash: &str| Action::Stop {
        spec: spec.to_string(),
        replica,
        hash: hash.to_string(),
    };
    let mut actions = Vec::with_capacity(want.len() + running.len());
    for (&key, hashes) in &have {
        if !want.contains_key(&key) {
            actions.extend(hashes.keys().map(|h| stop(key, h)));
        }
    }
    for (&key, &a) in &want {
        let Some(hashes) = have.get(&key) else {
            actions.push(Action::Create(a.clone()));
            continue;
        };
        let desired_hash = a.spec.hash.as_str();
        // The entry that stays (noop) or is replaced; every other entry is stopped.
        let kept = match hashes.get(desired_hash) {
            Some(&(state, ran)) => {
                let current = at_commit(&a.spec.kind, commit, ran);
                actions.push(if current && settled(&a.spec.kind, state) {
                    Action::Noop {
                        spec: key.0.to_string(),
                        replica: key.1,
                    }
                } else {
                    Action::Replace {
                        old_hash: desired_hash.to_string(),
                        new: a.clone(),
                    }
                });
                desired_hash
            }
            None => {
                // Non-empty: `have` only holds keys with at least one hash.
                let oldest = hashes.keys().next().copied().unwrap_or_default();
                actions.push(Action::Replace {
                    old_hash: oldest.to_string(),
                    new: a.clone(),
                });
                oldest
            }
        };
        actions.extend(hashes.keys().filter(|h| **h != kept).map(|h| stop(key, h)));
    }
    actions.sort_by(|x, y| x.rank().cmp(&y.rank()).then_with(|| x.key().cmp(&y.key())));
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{DesiredSpec, Resources};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn spec(id: &str, hash: &str, service: bool) -> DesiredSpec {
        DesiredSpec {
            id: id.into(),
            hash: hash.into(),
            kind: if service {
                SpecKind::Service {
                    image: "img".into(),
                    replicas: 2,
                }
            } else {
                SpecKind::WorkflowRun {
                    workflow: "ci.yml".into(),
                    job: None,
                    repository: None,
                }
            },
            labels: BTreeMap::new(),
            selector: BTreeMap::new(),
            resources: Resources {
                cpu_millis: 100,
                memory_mib: 64,
            },
        }
    }

    fn assign(id: &str, replica: u32, hash: &str, service: bool) -> Assignment {
        Assignment {
            spec: spec(id, hash, service),
            replica,
        }
    }

    fn running(id: &str, replica: u32, hash: &str, state: InstanceState) -> Running {
        Running {
            spec: id.into(),
            replica,
            hash: hash.into(),
            state,
            commit: None,
        }
    }

    fn at(mut r: Running, commit: &str) -> Running {
        r.commit = Some(commit.into());
        r
    }

    fn noop(id: &str, replica: u32) -> Action {
        Action::Noop {
            spec: id.into(),
            replica,
        }
    }

    #[test]
    fn each_rule_and_the_order() {
        use InstanceState::*;
        let desired = vec![
            assign("web", 0, "h2", true),   // runs h1 -> replace
            assign("web", 1, "h2", true),   // runs h2 -> noop
            assign("api", 0, "a1", true),   // not running -> create
            assign("ci", 0, "c1", false),   // succeeded -> noop
            assign("lint", 0, "l1", false), // failed run -> noop
            assign("db", 0, "d1", true),    // failed service -> restart
        ];
        let run = vec![
            running("web", 0, "h1", Running),
            running("web", 1, "h2", Starting),
            running("ci", 0, "c1", Succeeded),
            running("lint", 0, "l1", Failed),
            running("db", 0, "d1", Failed),
            running("old", 0, "o1", Running), // not assigned -> stop
        ];
        let actions = reconcile(&desired, None, &run);
        assert_eq!(
            actions,
            vec![
                Action::Stop {
                    spec: "old".into(),
                    replica: 0,
                    hash: "o1".into()
                },
                Action::Replace {
                    old_hash: "d1".into(),
                    new: desired[5].clone()
                },
                Action::Replace {
                    old_hash: "h1".into(),
                    new: desired[0].clone()
                },
                Action::Create(desired[2].clone()),
                noop("ci", 0),
                noop("lint", 0),
                noop("web", 1),
            ]
        );
    }

    #[test]
    fn surplus_copies_and_stopping() {
        use InstanceState::*;
        let desired = vec![assign("web", 0, "h3", true), assign("x", 0, "x1", false)];
        let run = vec![
            running("web", 0, "h2", Running),
            running("web", 0, "h1", Stopping),
            running("x", 0, "x1", Stopping),
            running("x", 0, "x0", Running),
        ];
        let actions = reconcile(&desired, None, &run);
        assert_eq!(
            actions,
            vec![
                Action::Stop {
                    spec: "web".into(),
                    replica: 0,
                    hash: "h2".into()
                },
                Action::Stop {
                    spec: "x".into(),
                    replica: 0,
                    hash: "x0".into()
                },
                Action::Replace {
                    old_hash: "h1".into(),
                    new: desired[0].clone()
                },
                Action::Replace {
                    old_hash: "x1".into(),
                    new: desired[1].clone()
                },
            ]
        );
        assert!(reconcile(&[], None, &[]).is_empty());
    }

    #[test]
    fn a_workflow_run_of_another_commit_is_run_again() {
        use InstanceState::*;
        let desired = vec![
            assign("ci", 0, "c1", false), // succeeded at A, generation at B -> replace
            assign("lint", 0, "l1", false), // failed at A -> replace
            assign("e2e", 0, "e1", false), // running at A -> replace (cancel, run B)
            assign("doc", 0, "d1", false), // succeeded at B -> noop
            assign("old", 0, "o1", false), // no commit recorded -> noop
            assign("web", 0, "w1", true), // a service runs no commit's files -> noop
        ];
        let run = vec![
            at(running("ci", 0, "c1", Succeeded), "aa"),
            at(running("lint", 0, "l1", Failed), "aa"),
            at(running("e2e", 0, "e1", Running), "aa"),
            at(running("doc", 0, "d1", Succeeded), "BB"),
            running("old", 0, "o1", Succeeded),
            at(running("web", 0, "w1", Running), "aa"),
        ];
        let replace = |i: usize, h: &str| Action::Replace {
            old_hash: h.into(),
            new: desired[i].clone(),
        };
        assert_eq!(
            reconcile(&desired, Some("bb"), &run),
            vec![
                replace(0, "c1"),
                replace(2, "e1"),
                replace(1, "l1"),
                noop("doc", 0),
                noop("old", 0),
                noop("web", 0),
            ]
        );
        // Without a generation commit nothing can be compared: by hash alone.
        assert!(reconcile(&desired, None, &run)
            .iter()
            .all(|a| matches!(a, Action::Noop { .. })));
        // The old run on its way out and the new one at the commit: the new one counts.
        let replacing = vec![
            at(running("ci", 0, "c1", Stopping), "aa"),
            at(running("ci", 0, "c1", Running), "bb"),
        ];
        assert_eq!(
            reconcile(&desired[..1], Some("bb"), &replacing),
            vec![noop("ci", 0)]
        );
        // Reported twice in the same state: the entry at the commit counts, in
        // whichever order they come (a case proptest found).
        let mut twice = vec![
            at(running("ci", 0, "c1", Running), "aa"),
            running("ci", 0, "c1", Running),
        ];
        for _ in 0..2 {
            assert_eq!(
                reconcile(&desired[..1], Some("bb"), &twice),
                vec![noop("ci", 0)]
            );
            twice.reverse();
        }
    }

    // ------------------------------------------------------------------ properties

    fn arb_state() -> impl Strategy<Value = InstanceState> {
        prop_oneof![
            Just(InstanceState::Starting),
            Just(InstanceState::Running),
            Just(InstanceState::Succeeded),
            Just(InstanceState::Failed),
            Just(InstanceState::Stopping),
        ]
    }

    /// Small id / replica / hash spaces so desired and running overlap often.
    /// No commit, or one of two.
    fn commit_of(c: u8) -> Option<String> {
        (c > 0).then(|| format!("c{c}"))
    }

    fn arb_case() -> impl Strategy<Value = (Vec<Assignment>, Vec<Running>)> {
        let key = (0u8..5, 0u32..3);
        (
            prop::collection::vec((key.clone(), 0u8..3), 0..12),
            prop::collection::vec((key, 0u8..3, arb_state(), 0u8..3), 0..12),
        )
            .prop_map(|(d, r)| {
                // The kind is a property of the spec id, as it is in a real publication.
                let is_service = |s: u8| matches!(s, 0 | 2 | 4);
                let desired = d
                    .into_iter()
                    .map(|((s, rep), h)| {
                        assign(&format!("s{s}"), rep, &format!("h{h}"), is_service(s))
                    })
                    .collect();
                let running = r
                    .into_iter()
                    .map(|((s, rep), h, st, c)| {
                        let mut r = running(&format!("s{s}"), rep, &format!("h{h}"), st);
                        r.commit = commit_of(c);
                        r
                    })
                    .collect();
                (desired, running)
            })
    }

    fn shuffled<T: Clone>(v: &[T], seed: u64) -> Vec<T> {
        let mut out = v.to_vec();
        let mut s = seed | 1;
        for i in (1..out.len()).rev() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            out.swap(i, (s % (i as u64 + 1)) as usize);
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn applying_the_actions_yields_the_desired_hashes(
            (desired, run) in arb_case(),
            commit in 0u8..3,
            seed in any::<u64>(),
        ) {
            let commit = commit_of(commit);
            let actions = reconcile(&desired, commit.as_deref(), &run);
            // The world as the worker sees it: a set of (spec, replica, hash).
            let mut world: BTreeSet<(String, u32, String)> =
                run.iter().map(|r| (r.spec.clone(), r.replica, r.hash.clone())).collect();
            let before = world.clone();
            let mut touched: BTreeSet<(String, u32, String)> = BTreeSet::new();
            let mut ranks = Vec::new();
            for a in &actions {
                ranks.push(a.rank());
                match a {
                    Action::Stop { spec, replica, hash } => {
                        let k = (spec.clone(), *replica, hash.clone());
                        prop_assert!(world.remove(&k), "stop of something not running: {:?}", k);
                        prop_assert!(touched.insert(k));
                    }
                    Action::Replace { old_hash, new } => {
                        let k = (new.spec.id.clone(), new.replica, old_hash.clone());
                        prop_assert!(world.remove(&k), "replace of something not running: {:?}", k);
                        prop_assert!(touched.insert(k));
                        world.insert((new.spec.id.clone(), new.replica, new.spec.hash.clone()));
                    }
                    Action::Create(a) => {
                        prop_assert!(!world.iter().any(|(s, r, _)| *s == a.spec.id && *r == a.replica));
                        world.insert((a.spec.id.clone(), a.replica, a.spec.hash.clone()));
                    }
                    Action::Noop { spec, replica } => {
                        let here: Vec<_> = world.iter().filter(|(s, r, _)| s == spec && r == replica).cloned().collect();
                        prop_assert_eq!(here.len(), 1);
                        prop_assert!(touched.insert(here[0].clone()));
                    }
                }
            }
            // Every running entry got exactly one action about it.
            prop_assert_eq!(&touched, &before);
            // The result is exactly the assignment (one hash per instance).
            let mut want: BTreeMap<(String, u32), String> = BTreeMap::new();
            for a in &desired {
                let e = want.entry((a.spec.id.clone(), a.replica)).or_insert_with(|| a.spec.hash.clone());
                if a.spec.hash < *e { *e = a.spec.hash.clone(); }
            }
            let want: BTreeSet<(String, u32, String)> = want.into_iter().map(|((s, r), h)| (s, r, h)).collect();
            prop_assert_eq!(&world, &want);
            // Stops, then replaces, creates, noops; and input order does not matter.
            prop_assert!(ranks.windows(2).all(|w| w[0] <= w[1]));
            let again = reconcile(&shuffled(&desired, seed), commit.as_deref(), &shuffled(&run, seed ^ 0x5555));
            prop_assert_eq!(&actions, &again);
            // Converged: reconciling the result again only yields noops (restarted
            // instances are reported as starting, at the generation's commit).
            let after: Vec<Running> = world
                .iter()
                .map(|(s, r, h)| {
                    let mut x = running(s, *r, h, InstanceState::Starting);
                    x.commit = commit.clone();
                    x
                })
                .collect();
            let settled = reconcile(&desired, commit.as_deref(), &after).iter().all(|a| matches!(a, Action::Noop { .. }));
            prop_assert!(settled, "not converged after one round");
        }
    }
}
