//! `cargo bench -p udos-core --bench schedule`: time `schedule` on 10,000 specs and
//! 1,000 workers (fixed seed), check it is deterministic under shuffling, and show how
//! many instances move when one worker leaves or joins.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use udos_core::desired::{DesiredSpec, Resources, SpecKind};
use udos_core::schedule::{schedule, Placement, WorkerInventory};

const SPECS: usize = 10_000;
const WORKERS: usize = 1_000;
const RUNS: usize = 10;
const TARGET: Duration = Duration::from_millis(200);

/// splitmix64: a fixed-seed generator, so every run builds the same cluster.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn worker(rng: &mut Rng, i: usize) -> WorkerInventory {
    let zone = rng.pick(&["a", "b", "c"]);
    let mut l = vec![("zone", zone)];
    if rng.below(10) < 7 {
        l.push(("kvm", "true"));
    }
    if rng.below(20) == 0 {
        l.push(("gpu", "true"));
    }
    // 16, 32 or 64 vCPU with 4 GiB per vCPU.
    let cpus = rng.pick(&[16u64, 32, 32, 64]);
    WorkerInventory {
        id: format!("worker-{i:04}"),
        labels: labels(&l),
        capacity: Resources {
            cpu_millis: cpus * 1000,
            memory_mib: cpus * 4096,
        },
    }
}

fn spec(rng: &mut Rng, i: usize) -> DesiredSpec {
    let selector = match rng.below(100) {
        0..=44 => labels(&[]),
        45..=69 => labels(&[("zone", rng.pick(&["a", "b", "c"]))]),
        70..=89 => labels(&[("kvm", "true")]),
        90..=96 => labels(&[("zone", rng.pick(&["a", "b", "c"])), ("kvm", "true")]),
        97..=98 => labels(&[("gpu", "true")]),
        _ => labels(&[("zone", "d")]), // no such worker: unschedulable
    };
    let cpu = rng.pick(&[250u64, 500, 500, 1000, 1000, 2000, 4000]);
    let mem = cpu * rng.pick(&[1u64, 2, 4]) + rng.below(512);
    let service = rng.below(10) < 6;
    let kind = if service {
        SpecKind::Service {
            image: format!("{:064x}", rng.next()),
            replicas: rng.pick(&[1u32, 1, 1, 2, 3, 5]),
        }
    } else {
        SpecKind::WorkflowRun {
            workflow: ".github/workflows/ci.yml".into(),
            job: Some(format!("job-{}", rng.below(20))),
            repository: None,
        }
    };
    DesiredSpec {
        id: format!("spec-{i:05}"),
        hash: format!("{:032x}", rng.next()),
        kind,
        labels: BTreeMap::new(),
        selector,
        resources: Resources {
            cpu_millis: cpu,
            memory_mib: mem,
        },
    }
}

fn placed(p: &Placement) -> usize {
    p.by_worker.values().map(Vec::len).sum()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Moves when the most loaded worker leaves, and when a large one joins.
fn report_moves(what: &str, specs: &[DesiredSpec], workers: &[WorkerInventory], base: &Placement) {
    let (gone, held) = base
        .by_worker
        .iter()
        .max_by_key(|(_, l)| l.len())
        .map(|(w, l)| (w.clone(), l.len()))
        .unwrap_or_default();
    let fewer: Vec<WorkerInventory> = workers.iter().filter(|w| w.id != gone).cloned().collect();
    let p = schedule(specs, &fewer);
    println!(
        "{what}: remove {gone} (held {held}): {} moved, placed {}, unschedulable {}",
        p.moved_from(base),
        placed(&p),
        p.unschedulable.len(),
    );
    let mut more = workers.to_vec();
    more.push(WorkerInventory {
        id: "worker-new".into(),
        labels: labels(&[("zone", "a"), ("kvm", "true")]),
        capacity: Resources {
            cpu_millis: 64_000,
            memory_mib: 64 * 4096,
        },
    });
    let p = schedule(specs, &more);
    println!(
        "{what}: add worker-new: {} moved, worker-new holds {}, placed {}, unschedulable {}",
        p.moved_from(base),
        p.by_worker["worker-new"].len(),
        placed(&p),
        p.unschedulable.len()
    );
}

fn main() -> ExitCode {
    let mut rng = Rng(0x75_64_6f_73); // "udos"
    let workers: Vec<WorkerInventory> = (0..WORKERS).map(|i| worker(&mut rng, i)).collect();
    let specs: Vec<DesiredSpec> = (0..SPECS).map(|i| spec(&mut rng, i)).collect();
    let instances: u64 = specs.iter().map(|s| u64::from(s.instances())).sum();
    let demand: u64 = specs
        .iter()
        .map(|s| s.resources.cpu_millis * u64::from(s.instances()))
        .sum();
    let capacity: u64 = workers.iter().map(|w| w.capacity.cpu_millis).sum();
    println!(
        "cluster: {SPECS} specs ({instances} instances, {} vCPU asked) on {WORKERS} workers ({} vCPU)",
        demand / 1000,
        capacity / 1000
    );

    let mut times = Vec::with_capacity(RUNS);
    let mut base = Placement::default();
    for _ in 0..RUNS {
        let t = Instant::now();
        base = std::hint::black_box(schedule(std::hint::black_box(&specs), &workers));
        times.push(t.elapsed());
    }
    times.sort();
    let (min, median) = (times[0], times[RUNS / 2]);
    println!(
        "schedule: min {}, median {} over {RUNS} runs (target ≤ {}): {}",
        ms(min),
        ms(median),
        ms(TARGET),
        if median <= TARGET { "ok" } else { "SLOW" }
    );
    println!(
        "placed: {}, unschedulable: {}",
        placed(&base),
        base.unschedulable.len()
    );
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for u in &base.unschedulable {
        let kind = u.reason.split(" (").next().unwrap_or_default();
        let kind = if kind.starts_with("no worker with room") {
            "no worker with room"
        } else {
            kind
        };
        *reasons.entry(kind.to_string()).or_default() += 1;
    }
    for (reason, n) in &reasons {
        println!("  {n:5} × {reason}");
    }

    let mut ok = true;
    for round in 0..3 {
        let mut s = specs.clone();
        let mut w = workers.clone();
        rng.shuffle(&mut s);
        rng.shuffle(&mut w);
        if schedule(&s, &w) != base {
            println!("determinism: FAILED (shuffle {round} gave another placement)");
            ok = false;
        }
    }
    if ok {
        println!("determinism: ok (3 shuffles of specs and workers)");
    }

    report_moves("as built", &specs, &workers, &base);
    // The same with 4× the capacity: nothing is pushed off its first choice, so only
    // the instances of the leaving or joining worker (and, for replicated services,
    // the spread of those specs) move.
    let roomy: Vec<WorkerInventory> = workers
        .iter()
        .map(|w| WorkerInventory {
            capacity: Resources {
                cpu_millis: w.capacity.cpu_millis * 4,
                memory_mib: w.capacity.memory_mib * 4,
            },
            ..w.clone()
        })
        .collect();
    let roomy_base = schedule(&specs, &roomy);
    report_moves("4× capacity", &specs, &roomy, &roomy_base);

    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
