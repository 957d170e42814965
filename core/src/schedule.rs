//! Placing spec instances on workers: a pure function of (specs × live workers).
//!
//! # Algorithm
//!
//! Every spec expands into instances `(spec id, replica)`. Each instance ranks the
//! workers whose labels satisfy its selector by a score `hash(spec id, replica, worker
//! id)` and goes to the best-scored one that still has room (cpu and memory summed
//! over what is already placed there ≤ capacity). This is *rendezvous* (highest
//! random weight) hashing.
//!
//! Why HRW: the score of a (instance, worker) pair does not depend on any other
//! worker, so the result is **stable**: when a worker joins, the only instances that
//! move are the ones that now rank it first (they move *to* it); when a worker leaves,
//! only the instances it held move, each to its next-best worker. Everything else
//! stays put, so the workers do not churn VMs when the fleet changes. (That holds while
//! capacity is not binding; once workers are full, a change can ripple through
//! instances that were pushed off their first choice.) Unlike a consistent-hash
//! ring it needs no virtual nodes and handles selectors by simply skipping
//! ineligible workers.
//!
//! Replicas of one spec are spread (soft anti-affinity): a replica goes to the
//! eligible worker with room that holds the *fewest* replicas of its spec, the
//! highest score breaking the tie. With fewer eligible workers than replicas they
//! double up rather than fail. (No pure function can place labelled replicas on
//! distinct workers with perfect stability; this rule keeps moves within the specs
//! that touch the joining or leaving worker.)
//!
//! Determinism: workers and specs are sorted by id first, so the input order never
//! matters. Instances are processed biggest first (`4 × cpu_millis + memory_mib`,
//! i.e. one vCPU weighs like 4 GiB), then by spec id and replica, so large instances
//! find room before small ones fragment the workers. The hash is FNV-1a folded
//! through a splitmix64/murmur3 finaliser, written here with fixed constants: it is
//! the same in every process and every release (a unit test pins its values). It is
//! cheap (a few multiplies per score) and per-worker and per-instance seeds are
//! computed once, so the inner loop allocates nothing and hashes one `u64`.
//!
//! Duplicates: a worker id listed more than once keeps the entry that sorts first by
//! `(labels, capacity)`; the others are ignored. A spec id listed more than once
//! (which [`crate::desired::validate`] refuses) is not placed at all: each of its
//! instances is reported unschedulable.
//!
//! Performance: 10,000 specs on 1,000 workers take a few tens of milliseconds in
//! release (see `cargo bench -p udos-core --bench schedule`).

use std::collections::BTreeMap;

use crate::desired::{DesiredSpec, Invalid, Resources};
use crate::wire::{Assignment, Unschedulable};

/// A live worker as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInventory {
    /// Stable worker id.
    pub id: String,
    /// Its labels (`zone=a`, `kvm=true`, ...).
    pub labels: BTreeMap<String, String>,
    /// What it can host in total.
    pub capacity: Resources,
}

/// The result of [`schedule`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// worker id -> sorted (spec id, replica) it should run; every live worker has an
    /// entry (possibly empty).
    pub by_worker: BTreeMap<String, Vec<(String, u32)>>,
    /// Instances that could not be placed, sorted by (spec id, replica).
    pub unschedulable: Vec<Unschedulable>,
}

impl Placement {
    /// The assignments of one worker, sorted by (spec id, replica), with the spec
    /// bodies taken from `specs` (an instance whose spec is not in `specs` is
    /// skipped). Empty for an unknown worker.
    pub fn assignments_for(&self, worker: &str, specs: &[DesiredSpec]) -> Vec<Assignment> {
        let Some(instances) = self.by_worker.get(worker) else {
            return Vec::new();
        };
        let by_id: BTreeMap<&str, &DesiredSpec> =
            specs.iter().map(|s| (s.id.as_str(), s)).collect();
        instances
            .iter()
            .filter_map(|(id, replica)| {
                by_id.get(id.as_str()).map(|spec| Assignment {
                    spec: (*spec).clone(),
                    replica: *replica,
                })
            })
            .collect()
    }

    /// How many instances placed in both `self` and `other` are on a different
    /// worker. Instances placed in only one of them (new, removed, or unschedulable
    /// in the other) are not counted.
    pub fn moved_from(&self, other: &Placement) -> usize {
        let before: BTreeMap<(&str, u32), &str> = other
            .by_worker
            .iter()
            .flat_map(|(w, list)| {
                list.iter()
                    .map(move |(s, r)| ((s.as_str(), *r), w.as_str()))
            })
            .collect();
        self.by_worker
            .iter()
            .flat_map(|(w, list)| {
                list.iter()
                    .map(move |(s, r)| ((s.as_str(), *r), w.as_str()))
            })
            .filter(|(key, w)| before.get(key).is_some_and(|old| old != w))
            .count()
    }

    /// Where each placed instance runs: (spec id, replica) -> worker id.
    pub fn worker_of(&self) -> BTreeMap<(&str, u32), &str> {
        self.by_worker
            .iter()
            .flat_map(|(w, list)| {
                list.iter()
                    .map(move |(s, r)| ((s.as_str(), *r), w.as_str()))
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Hashing: fixed, portable, and never to be changed (placements depend on it).

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const DOMAIN_WORKER: u64 = 0x5744_4f53_574b_5231; // distinct seeds for worker ids...
const DOMAIN_SPEC: u64 = 0x5544_4f53_5350_4543; // ...and spec ids
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The murmur3 / splitmix64 64-bit finaliser: a bijection with full avalanche.
#[inline(always)]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a over the bytes (plus the length), finalised by [`mix64`].
fn seed_str(domain: u64, s: &str) -> u64 {
    let mut h = FNV_OFFSET ^ domain;
    for &b in s.as_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    mix64(h ^ (s.len() as u64).wrapping_mul(GOLDEN))
}

fn worker_seed(worker: &str) -> u64 {
    seed_str(DOMAIN_WORKER, worker)
}

fn instance_seed(spec_seed: u64, replica: u32) -> u64 {
    mix64(spec_seed ^ (u64::from(replica) + 1).wrapping_mul(GOLDEN))
}

#[inline(always)]
fn score_seeds(instance: u64, worker: u64) -> u64 {
    mix64(instance ^ worker)
}

/// The rendezvous score of instance `(spec, replica)` on `worker`: higher wins.
/// Stable across processes and releases.
pub fn score(spec: &str, replica: u32, worker: &str) -> u64 {
    score_seeds(
        instance_seed(seed_str(DOMAIN_SPEC, spec), replica),
        worker_seed(worker),
    )
}

// ---------------------------------------------------------------------------

fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `zone=c,kvm=true` (keys sorted).
fn selector_text(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Larger first: one vCPU weighs like 4 GiB.
fn demand_weight(r: &Resources) -> u128 {
    u128::from(r.cpu_millis) * 4 + u128::from(r.memory_mib)
}

/// A worker's mutable state during one scheduling pass.
struct Slot {
    seed: u64,
    cpu_left: u64,
    mem_left: u64,
    /// Index (in processing order) of the last spec that put a replica here...
    spec_mark: u32,
    /// ...and how many of its replicas are here.
    spec_count: u32,
}

/// [`schedule`] for specs that may not have been validated (a generation an older
/// master stored, say): refuses specs too large to expand into instances
/// ([`crate::desired::check_size`]) instead of allocating for each of them.
pub fn try_schedule(
    specs: &[DesiredSpec],
    workers: &[WorkerInventory],
) -> Result<Placement, Invalid> {
    crate::desired::check_size(specs)?;
    Ok(schedule(specs, workers))
}

/// Place every instance of `specs` on `workers`. Pure and deterministic: the same
/// sets in any order give the same [`Placement`]. See the module docs. It allocates
/// per instance: give it validated specs, or call [`try_schedule`].
pub fn schedule(specs: &[DesiredSpec], workers: &[WorkerInventory]) -> Placement {
    // Workers: sorted by id, duplicates keep the first by (labels, capacity).
    let mut ws: Vec<&WorkerInventory> = workers.iter().collect();
    ws.sort_by(|a, b| {
        a.id.cmp(&b.id)
            .then_with(|| a.labels.cmp(&b.labels))
            .then_with(|| a.capacity.cpu_millis.cmp(&b.capacity.cpu_millis))
            .then_with(|| a.capacity.memory_mib.cmp(&b.capacity.memory_mib))
    });
    ws.dedup_by(|later, first| later.id == first.id);

    let mut slots: Vec<Slot> = ws
        .iter()
        .map(|w| Slot {
            seed: worker_seed(&w.id),
            cpu_left: w.capacity.cpu_millis,
            mem_left: w.capacity.memory_mib,
            spec_mark: u32::MAX,
            spec_count: 0,
        })
        .collect();

    // Workers grouped by label set, so a selector is matched once per distinct set.
    let mut groups: BTreeMap<&BTreeMap<String, String>, Vec<u32>> = BTreeMap::new();
    for (i, w) in ws.iter().enumerate() {
        groups.entry(&w.labels).or_default().push(i as u32);
    }
    let mut eligible_cache: BTreeMap<&BTreeMap<String, String>, Vec<u32>> = BTreeMap::new();

    // Specs: sorted by id; duplicated ids are all reported, none placed.
    let mut sorted: Vec<&DesiredSpec> = specs.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut unschedulable: Vec<Unschedulable> = Vec::new();
    let mut unique: Vec<&DesiredSpec> = Vec::with_capacity(sorted.len());
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i + 1;
        while j < sorted.len() && sorted[j].id == sorted[i].id {
            j += 1;
        }
        if j - i == 1 {
            unique.push(sorted[i]);
        } else {
            let n = sorted[i..j]
                .iter()
                .map(|s| s.instances())
                .max()
                .unwrap_or(0);
            unschedulable.extend((0..n).map(|replica| Unschedulable {
                spec: sorted[i].id.clone(),
                replica,
                reason: format!(
                    "spec id `{}` appears {} times in the publication",
                    sorted[i].id,
                    j - i
                ),
            }));
        }
        i = j;
    }
    // Processing order: biggest first, then id (a stable sort keeps id order).
    unique.sort_by_key(|s| std::cmp::Reverse(demand_weight(&s.resources)));

    let mut placed: Vec<Vec<(String, u32)>> = vec![Vec::new(); ws.len()];
    for (spec_idx, spec) in unique.iter().enumerate() {
        let spec_idx = spec_idx as u32;
        let eligible: &[u32] = eligible_cache.entry(&spec.selector).or_insert_with(|| {
            let mut v: Vec<u32> = groups
                .iter()
                .filter(|(labels, _)| matches(&spec.selector, labels))
                .flat_map(|(_, idx)| idx.iter().copied())
                .collect();
            v.sort_unstable();
            v
        });
        let cpu = spec.resources.cpu_millis;
        let mem = spec.resources.memory_mib;
        let spec_seed = seed_str(DOMAIN_SPEC, &spec.id);
        for replica in 0..spec.instances() {
            let inst = instance_seed(spec_seed, replica);
            // Best = fewest replicas of this spec, then highest score, then lowest
            // index (the strict `>` keeps the first of equal scores).
            let mut best: Option<usize> = None;
            let mut best_count = u32::MAX;
            let mut best_score = 0u64;
            for &w in eligible {
                let slot = &slots[w as usize];
                if slot.cpu_left < cpu || slot.mem_left < mem {
                    continue;
                }
                let count = if slot.spec_mark == spec_idx {
                    slot.spec_count
                } else {
                    0
                };
                if count > best_count {
                    continue;
                }
                let s = score_seeds(inst, slot.seed);
                if count < best_count || s > best_score {
                    best = Some(w as usize);
                    best_count = count;
                    best_score = s;
                }
            }
            match best {
                Some(w) => {
                    let slot = &mut slots[w];
                    slot.cpu_left -= cpu;
                    slot.mem_left -= mem;
                    if slot.spec_mark == spec_idx {
                        slot.spec_count += 1;
                    } else {
                        slot.spec_mark = spec_idx;
                        slot.spec_count = 1;
                    }
                    placed[w].push((spec.id.clone(), replica));
                }
                None => {
                    let reason = if eligible.is_empty() {
                        if ws.is_empty() {
                            "no live worker".to_string()
                        } else {
                            format!(
                                "no worker matches selector {}",
                                selector_text(&spec.selector)
                            )
                        }
                    } else {
                        let matching = if spec.selector.is_empty() {
                            format!("{} live workers", eligible.len())
                        } else {
                            format!("{} match the selector", eligible.len())
                        };
                        format!("no worker with room for {cpu}m CPU / {mem} MiB ({matching})")
                    };
                    unschedulable.push(Unschedulable {
                        spec: spec.id.clone(),
                        replica,
                        reason,
                    });
                }
            }
        }
    }

    unschedulable.sort_by(|a, b| a.spec.cmp(&b.spec).then(a.replica.cmp(&b.replica)));
    let by_worker = ws
        .iter()
        .zip(placed)
        .map(|(w, mut list)| {
            list.sort_unstable();
            (w.id.clone(), list)
        })
        .collect();
    Placement {
        by_worker,
        unschedulable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::SpecKind;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn svc(id: &str, replicas: u32, selector: &[(&str, &str)], cpu: u64, mem: u64) -> DesiredSpec {
        DesiredSpec {
            id: id.into(),
            hash: "ab".repeat(16),
            kind: SpecKind::Service {
                image: "img".into(),
                replicas,
            },
            labels: BTreeMap::new(),
            selector: labels(selector),
            resources: Resources {
                cpu_millis: cpu,
                memory_mib: mem,
            },
        }
    }

    fn run(id: &str, selector: &[(&str, &str)], cpu: u64, mem: u64) -> DesiredSpec {
        DesiredSpec {
            kind: SpecKind::WorkflowRun {
                workflow: "ci.yml".into(),
                job: None,
                repository: None,
            },
            ..svc(id, 1, selector, cpu, mem)
        }
    }

    fn worker(id: &str, l: &[(&str, &str)], cpu: u64, mem: u64) -> WorkerInventory {
        WorkerInventory {
            id: id.into(),
            labels: labels(l),
            capacity: Resources {
                cpu_millis: cpu,
                memory_mib: mem,
            },
        }
    }

    #[test]
    fn hash_is_pinned() {
        // These values must never change: placements across releases depend on them.
        assert_eq!(mix64(0), 0);
        assert_eq!(mix64(1), 0x5692_161d_100b_05e5);
        let pinned = [
            score("web", 0, "w1"),
            score("web", 1, "w1"),
            score("web", 0, "w2"),
            score("db", 0, "w1"),
        ];
        assert_eq!(pinned, PINNED);
        let distinct: BTreeSet<u64> = pinned.iter().copied().collect();
        assert_eq!(distinct.len(), 4);
    }
    const PINNED: [u64; 4] = [
        0xca13_5e42_8620_4f6d,
        0xa78a_0b37_c9f7_fec6,
        0x92eb_d1e7_f975_b32a,
        0x9aae_800e_d770_1977,
    ];

    #[test]
    fn try_schedule_refuses_what_it_cannot_expand() {
        let workers = vec![worker("w1", &[], 4000, 8192)];
        // With no worker every instance would be listed as unschedulable, one by one:
        // refused before anything is allocated.
        let huge = svc("web", u32::MAX, &[], 100, 100);
        assert!(matches!(
            try_schedule(std::slice::from_ref(&huge), &[]),
            Err(Invalid::TooManyReplicas { .. })
        ));
        assert!(matches!(
            try_schedule(&[huge], &workers),
            Err(Invalid::TooManyReplicas { .. })
        ));
        let fine = [svc("web", 2, &[], 100, 100)];
        assert_eq!(
            try_schedule(&fine, &workers).unwrap(),
            schedule(&fine, &workers)
        );
    }

    #[test]
    fn reasons_name_the_problem() {
        let workers = vec![
            worker("w1", &[("zone", "a")], 4000, 8192),
            worker("w2", &[("zone", "a")], 4000, 8192),
            worker("w3", &[("zone", "b")], 1000, 1024),
        ];
        let specs = vec![
            svc("db", 1, &[("zone", "c")], 100, 100),
            svc("big", 1, &[("zone", "a")], 8000, 4096),
            svc("small", 1, &[], 100, 100),
        ];
        let p = schedule(&specs, &workers);
        assert_eq!(p.unschedulable.len(), 2);
        assert_eq!(p.unschedulable[0].spec, "big");
        assert_eq!(
            p.unschedulable[0].reason,
            "no worker with room for 8000m CPU / 4096 MiB (2 match the selector)"
        );
        assert_eq!(p.unschedulable[1].spec, "db");
        assert_eq!(
            p.unschedulable[1].reason,
            "no worker matches selector zone=c"
        );
        assert_eq!(p.by_worker.len(), 3);
        assert_eq!(p.by_worker.values().map(Vec::len).sum::<usize>(), 1);

        let none = schedule(&specs, &[]);
        assert!(none.by_worker.is_empty());
        assert!(none
            .unschedulable
            .iter()
            .all(|u| u.reason == "no live worker"));
        let tight = schedule(&[svc("x", 1, &[], 5000, 1)], &workers);
        assert_eq!(
            tight.unschedulable[0].reason,
            "no worker with room for 5000m CPU / 1 MiB (3 live workers)"
        );
    }

    #[test]
    fn replicas_spread_then_double_up() {
        let workers = vec![
            worker("w1", &[("zone", "a")], 64_000, 65_536),
            worker("w2", &[("zone", "a")], 64_000, 65_536),
            worker("w3", &[("zone", "a")], 64_000, 65_536),
            worker("w4", &[("zone", "b")], 64_000, 65_536),
        ];
        let p = schedule(&[svc("web", 3, &[("zone", "a")], 100, 100)], &workers);
        let hosts: BTreeSet<&str> = p.worker_of().values().copied().collect();
        assert_eq!(hosts, BTreeSet::from(["w1", "w2", "w3"]));
        // 5 replicas on 3 workers: 2, 2, 1 — never 3 on one.
        let p = schedule(&[svc("web", 5, &[("zone", "a")], 100, 100)], &workers);
        let mut counts: Vec<usize> = ["w1", "w2", "w3"]
            .iter()
            .map(|w| p.by_worker[*w].len())
            .collect();
        counts.sort_unstable();
        assert_eq!(counts, vec![1, 2, 2]);
        assert!(p.by_worker["w4"].is_empty());
        assert!(p.unschedulable.is_empty());
    }

    #[test]
    fn capacity_pushes_to_the_next_best() {
        // Each worker fits exactly one instance: 3 instances on 3 workers, 4th fails.
        let workers: Vec<_> = (0..3)
            .map(|i| worker(&format!("w{i}"), &[], 1000, 1000))
            .collect();
        let specs: Vec<_> = (0..4)
            .map(|i| run(&format!("r{i}"), &[], 1000, 1000))
            .collect();
        let p = schedule(&specs, &workers);
        assert!(p.by_worker.values().all(|l| l.len() == 1));
        assert_eq!(p.unschedulable.len(), 1);
        // The biggest instance is placed first: it gets a worker even listed last.
        let mut specs: Vec<_> = (0..3)
            .map(|i| run(&format!("r{i}"), &[], 500, 500))
            .collect();
        specs.push(run("zz-big", &[], 1000, 1000));
        let p = schedule(&specs, &workers[..2]);
        assert!(p.worker_of().contains_key(&("zz-big", 0)));
        assert_eq!(p.unschedulable.len(), 1);
    }

    #[test]
    fn golden_placement() {
        // Pins processing order, tie rules and the hash together: a change here moves
        // instances on every cluster that upgrades.
        let workers = vec![
            worker("w1", &[("zone", "a")], 3000, 8192),
            worker("w2", &[("zone", "a")], 2000, 8192),
            worker("w3", &[("zone", "b")], 4000, 8192),
        ];
        let specs = vec![
            svc("web", 3, &[], 1000, 1024),
            svc("api", 2, &[("zone", "a")], 1000, 512),
            run("ci", &[], 2000, 2048),
            run("lint", &[("zone", "b")], 500, 256),
            run("big", &[], 2500, 256),
        ];
        let p = schedule(&specs, &workers);
        let got: Vec<(&str, Vec<String>)> = p
            .by_worker
            .iter()
            .map(|(w, l)| {
                (
                    w.as_str(),
                    l.iter().map(|(s, r)| format!("{s}@{r}")).collect(),
                )
            })
            .collect();
        let unplaced: Vec<String> = p
            .unschedulable
            .iter()
            .map(|u| format!("{}@{}: {}", u.spec, u.replica, u.reason))
            .collect();
        assert_eq!(format!("{got:?} {unplaced:?}"), GOLDEN_PLACEMENT);
    }
    const GOLDEN_PLACEMENT: &str = concat!(
        r#"[("w1", ["ci@0", "web@2"]), ("w2", ["api@0", "web@1"]), "#,
        r#"("w3", ["big@0", "lint@0", "web@0"])] "#,
        r#"["api@1: no worker with room for 1000m CPU / 512 MiB (2 match the selector)"]"#
    );

    #[test]
    fn duplicates_are_deterministic() {
        let a = worker("w1", &[("zone", "a")], 1000, 1000);
        let b = worker("w1", &[("zone", "b")], 1000, 1000);
        let specs = vec![svc("s", 1, &[("zone", "a")], 10, 10)];
        let p1 = schedule(&specs, &[a.clone(), b.clone()]);
        let p2 = schedule(&specs, &[b, a]);
        assert_eq!(p1, p2);
        assert_eq!(p1.by_worker["w1"], vec![("s".to_string(), 0)]);
        let dup = schedule(
            &[svc("s", 2, &[], 1, 1), run("s", &[], 1, 1)],
            &[worker("w", &[], 9, 9)],
        );
        assert_eq!(dup.unschedulable.len(), 2);
        assert!(dup.by_worker["w"].is_empty());
        assert!(dup.unschedulable[0].reason.contains("appears 2 times"));
    }

    #[test]
    fn assignments_and_moves() {
        let workers = vec![worker("w1", &[], 9000, 9000), worker("w2", &[], 9000, 9000)];
        let specs = vec![svc("web", 2, &[], 10, 10), run("ci", &[], 10, 10)];
        let p = schedule(&specs, &workers);
        let mut all = Vec::new();
        for w in ["w1", "w2"] {
            let a = p.assignments_for(w, &specs);
            assert_eq!(a.len(), p.by_worker[w].len());
            assert!(a
                .windows(2)
                .all(|x| (&x[0].spec.id, x[0].replica) < (&x[1].spec.id, x[1].replica)));
            all.extend(a.into_iter().map(|a| (a.spec.id, a.replica)));
        }
        all.sort();
        assert_eq!(
            all,
            vec![("ci".into(), 0), ("web".into(), 0), ("web".into(), 1)]
        );
        assert!(p.assignments_for("nope", &specs).is_empty());
        assert_eq!(p.moved_from(&p), 0);
        let only_w1 = schedule(&specs, &workers[..1]);
        assert_eq!(only_w1.moved_from(&p), p.by_worker["w2"].len());
    }

    // ------------------------------------------------------------------ properties

    const ZONES: [&str; 3] = ["a", "b", "c"];

    fn arb_labels() -> impl Strategy<Value = BTreeMap<String, String>> {
        (0usize..4, any::<bool>()).prop_map(|(z, kvm)| {
            let mut l = BTreeMap::new();
            if z < 3 {
                l.insert("zone".to_string(), ZONES[z].to_string());
            }
            if kvm {
                l.insert("kvm".to_string(), "true".to_string());
            }
            l
        })
    }

    fn arb_selector() -> impl Strategy<Value = BTreeMap<String, String>> {
        prop_oneof![
            3 => Just(BTreeMap::new()),
            2 => (0usize..3).prop_map(|z| labels(&[("zone", ZONES[z])])),
            1 => Just(labels(&[("kvm", "true")])),
            1 => (0usize..3).prop_map(|z| labels(&[("zone", ZONES[z]), ("kvm", "true")])),
            1 => Just(labels(&[("gpu", "true")])),
        ]
    }

    /// Specs with unique ids; `max_replicas` 1 gives single-instance specs.
    fn arb_specs(
        n: usize,
        max_replicas: u32,
        max_cpu: u64,
    ) -> impl Strategy<Value = Vec<DesiredSpec>> {
        prop::collection::vec(
            (
                any::<bool>(),
                1..=max_replicas,
                arb_selector(),
                1..=max_cpu,
                1u64..=4096,
            ),
            0..n,
        )
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (is_svc, replicas, selector, cpu, mem))| DesiredSpec {
                    id: format!("s{i}"),
                    hash: format!("{:016x}", i),
                    kind: if is_svc {
                        SpecKind::Service {
                            image: "img".into(),
                            replicas,
                        }
                    } else {
                        SpecKind::WorkflowRun {
                            workflow: "w.yml".into(),
                            job: None,
                            repository: None,
                        }
                    },
                    labels: BTreeMap::new(),
                    selector,
                    resources: Resources {
                        cpu_millis: cpu,
                        memory_mib: mem,
                    },
                })
                .collect()
        })
    }

    fn arb_workers(n: usize, max_cpu: u64) -> impl Strategy<Value = Vec<WorkerInventory>> {
        prop::collection::vec((arb_labels(), 0..=max_cpu, 0u64..=65_536), 0..n).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (labels, cpu, mem))| WorkerInventory {
                    id: format!("w{i}"),
                    labels,
                    capacity: Resources {
                        cpu_millis: cpu,
                        memory_mib: mem,
                    },
                })
                .collect()
        })
    }

    /// Capacity that never binds.
    const ROOMY: Resources = Resources {
        cpu_millis: u64::MAX / 2,
        memory_mib: u64::MAX / 2,
    };

    fn roomy(mut ws: Vec<WorkerInventory>) -> Vec<WorkerInventory> {
        for w in &mut ws {
            w.capacity = ROOMY;
        }
        ws
    }

    fn shuffled<T: Clone>(v: &[T], seed: u64) -> Vec<T> {
        let mut out = v.to_vec();
        let mut s = seed;
        for i in (1..out.len()).rev() {
            s = mix64(s.wrapping_add(GOLDEN));
            out.swap(i, (s % (i as u64 + 1)) as usize);
        }
        out
    }

    /// Everything the scheduler promises about one placement.
    fn check_invariants(specs: &[DesiredSpec], workers: &[WorkerInventory], p: &Placement) {
        let by_id: BTreeMap<&str, &WorkerInventory> =
            workers.iter().map(|w| (w.id.as_str(), w)).collect();
        let spec_by_id: BTreeMap<&str, &DesiredSpec> =
            specs.iter().map(|s| (s.id.as_str(), s)).collect();
        assert_eq!(
            p.by_worker.keys().map(String::as_str).collect::<Vec<_>>(),
            by_id.keys().copied().collect::<Vec<_>>()
        );
        let mut seen: BTreeSet<(String, u32)> = BTreeSet::new();
        for (w, list) in &p.by_worker {
            let worker = by_id[w.as_str()];
            assert!(list.windows(2).all(|x| x[0] < x[1]), "sorted and unique");
            let (mut cpu, mut mem) = (0u64, 0u64);
            for (s, r) in list {
                let spec = spec_by_id[s.as_str()];
                assert!(*r < spec.instances());
                assert!(
                    matches(&spec.selector, &worker.labels),
                    "{s} on {w} breaks its selector"
                );
                cpu += spec.resources.cpu_millis;
                mem += spec.resources.memory_mib;
                assert!(seen.insert((s.clone(), *r)), "{s}@{r} placed twice");
            }
            assert!(
                cpu <= worker.capacity.cpu_millis && mem <= worker.capacity.memory_mib,
                "{w} over capacity"
            );
        }
        for u in &p.unschedulable {
            assert!(
                seen.insert((u.spec.clone(), u.replica)),
                "{}@{} both placed and unschedulable",
                u.spec,
                u.replica
            );
            assert!(!u.reason.is_empty());
        }
        let expected: BTreeSet<(String, u32)> = specs
            .iter()
            .flat_map(|s| (0..s.instances()).map(move |r| (s.id.clone(), r)))
            .collect();
        assert_eq!(seen, expected, "every instance placed once or reported");
    }

    /// With room everywhere, each spec's instances are spread evenly over the workers
    /// matching its selector: per-worker counts differ by at most one.
    fn check_spread(specs: &[DesiredSpec], workers: &[WorkerInventory], p: &Placement) {
        for s in specs {
            let counts: Vec<usize> = workers
                .iter()
                .filter(|w| matches(&s.selector, &w.labels))
                .map(|w| {
                    p.by_worker[&w.id]
                        .iter()
                        .filter(|(id, _)| *id == s.id)
                        .count()
                })
                .collect();
            if let (Some(lo), Some(hi)) = (counts.iter().min(), counts.iter().max()) {
                assert!(hi - lo <= 1, "{} unevenly spread: {:?}", s.id, counts);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn placement_invariants_and_determinism(
            specs in arb_specs(40, 4, 8000),
            workers in arb_workers(12, 32_000),
            seed in any::<u64>(),
        ) {
            let p = schedule(&specs, &workers);
            check_invariants(&specs, &workers, &p);
            let q = schedule(&shuffled(&specs, seed), &shuffled(&workers, seed ^ 1));
            prop_assert_eq!(&p, &q);
        }

        #[test]
        fn spread_when_capacity_is_not_binding(
            specs in arb_specs(30, 5, 8000),
            workers in arb_workers(10, 0),
        ) {
            let workers = roomy(workers);
            let p = schedule(&specs, &workers);
            check_invariants(&specs, &workers, &p);
            check_spread(&specs, &workers, &p);
            // And with room nothing is unschedulable unless no worker matches.
            for u in &p.unschedulable {
                prop_assert!(u.reason.starts_with("no worker matches") || u.reason == "no live worker");
            }
        }

        #[test]
        fn adding_a_worker_moves_only_what_it_wins(
            specs in arb_specs(60, 1, 8000),
            workers in arb_workers(10, 0),
            new_labels in arb_labels(),
        ) {
            let workers = roomy(workers);
            let before = schedule(&specs, &workers);
            let mut more = workers.clone();
            more.push(WorkerInventory { id: "new".into(), labels: new_labels, capacity: ROOMY });
            let after = schedule(&specs, &more);
            check_invariants(&specs, &more, &after);
            let old = before.worker_of();
            // Instances newly placed (no matching worker before) do not count as moves.
            let won = after.by_worker["new"].iter().filter(|(s, r)| old.contains_key(&(s.as_str(), *r))).count();
            prop_assert_eq!(after.moved_from(&before), won);
            for ((s, r), w) in after.worker_of() {
                if let Some(o) = old.get(&(s, r)) {
                    prop_assert!(*o == w || w == "new", "{}@{} moved {} -> {}", s, r, o, w);
                }
            }
        }

        #[test]
        fn removing_a_worker_moves_only_what_it_held(
            specs in arb_specs(60, 1, 8000),
            workers in arb_workers(10, 0),
            pick in any::<prop::sample::Index>(),
        ) {
            prop_assume!(!workers.is_empty());
            let workers = roomy(workers);
            let gone = pick.index(workers.len());
            let before = schedule(&specs, &workers);
            let mut fewer = workers.clone();
            let removed = fewer.remove(gone);
            let after = schedule(&specs, &fewer);
            check_invariants(&specs, &fewer, &after);
            let held = &before.by_worker[&removed.id];
            let now = after.worker_of();
            let rehomed = held.iter().filter(|(s, r)| now.contains_key(&(s.as_str(), *r))).count();
            prop_assert_eq!(after.moved_from(&before), rehomed);
            for ((s, r), w) in before.worker_of() {
                if w != removed.id {
                    prop_assert_eq!(now.get(&(s, r)).copied(), Some(w), "{}@{} moved although its worker stayed", s, r);
                }
            }
        }

        #[test]
        fn with_replicas_moves_stay_within_touched_specs(
            specs in arb_specs(30, 5, 8000),
            workers in arb_workers(8, 0),
            new_labels in arb_labels(),
            pick in any::<prop::sample::Index>(),
        ) {
            prop_assume!(!workers.is_empty());
            let workers = roomy(workers);
            let base = schedule(&specs, &workers);
            // Add: specs without an instance on the new worker do not move at all.
            let mut more = workers.clone();
            more.push(WorkerInventory { id: "new".into(), labels: new_labels, capacity: ROOMY });
            let added = schedule(&specs, &more);
            let touched: BTreeSet<&str> = added.by_worker["new"].iter().map(|(s, _)| s.as_str()).collect();
            let old = base.worker_of();
            for ((s, r), w) in added.worker_of() {
                if !touched.contains(s) {
                    prop_assert_eq!(old.get(&(s, r)).copied(), Some(w));
                }
            }
            // Remove: specs without an instance on the removed worker do not move.
            let gone = pick.index(workers.len());
            let mut fewer = workers.clone();
            let removed = fewer.remove(gone);
            let cut = schedule(&specs, &fewer);
            let touched: BTreeSet<&str> = base.by_worker[&removed.id].iter().map(|(s, _)| s.as_str()).collect();
            let now = cut.worker_of();
            for ((s, r), w) in base.worker_of() {
                if !touched.contains(s) {
                    prop_assert_eq!(now.get(&(s, r)).copied(), Some(w));
                }
            }
        }
    }
}
