//! GetAssignment latency under load (harness = false; `cargo bench -p udos-master`).
//!
//! 1,000 enrolled workers, a generation of ~10,000 specs, then N concurrent clients on
//! loopback issuing `GET /v1/assignment` (no long poll) for a fixed number of requests.
//! Prints p50/p99/max latency and requests/s beside the 20 ms p99 target.
//! Knobs (environment): UDOS_BENCH_WORKERS (1000), UDOS_BENCH_SPECS (10000),
//! UDOS_BENCH_CLIENTS (32), UDOS_BENCH_REQUESTS (20000), UDOS_BENCH_SERVER_THREADS (2).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use udos_core::desired::{DesiredSpec, Resources, SpecKind};
use udos_core::wire::{EnrollRequest, Heartbeat, InstanceState, PublishRequest, RunningInstance};
use udos_master::{spawn, Client, ServeConfig};

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn spec(i: usize) -> DesiredSpec {
    let zone = ["a", "b", "c"][i % 3];
    let kind = if i % 4 == 0 {
        SpecKind::WorkflowRun {
            workflow: format!(".github/workflows/job-{i}.yml"),
            job: Some("build".into()),
            repository: None,
        }
    } else {
        SpecKind::Service {
            image: format!("sha256-{i:060x}"),
            replicas: 1,
        }
    };
    DesiredSpec {
        id: format!("spec-{i:05}"),
        hash: format!("{:064x}", i * 7919 + 1),
        kind,
        labels: BTreeMap::from([("app".to_string(), format!("app-{}", i % 50))]),
        selector: if i % 5 == 0 {
            BTreeMap::from([("zone".to_string(), zone.to_string())])
        } else {
            BTreeMap::new()
        },
        resources: Resources {
            cpu_millis: 100,
            memory_mib: 128,
        },
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let n_workers = knob("UDOS_BENCH_WORKERS", 1000);
    let n_specs = knob("UDOS_BENCH_SPECS", 10_000);
    let n_clients = knob("UDOS_BENCH_CLIENTS", 32).max(1);
    let n_requests = knob("UDOS_BENCH_REQUESTS", 20_000).max(n_clients);
    let server_threads = knob("UDOS_BENCH_SERVER_THREADS", 2);

    let dir = tempfile::tempdir()?;
    let (pt, et) = (dir.path().join("p.token"), dir.path().join("e.token"));
    std::fs::write(&pt, "bench-publisher-token")?;
    std::fs::write(&et, "bench-enroll-token")?;
    let config = ServeConfig::new(
        "127.0.0.1:0".parse()?,
        dir.path().join("master.db"),
        &pt,
        &et,
    );
    let server = spawn(config, server_threads)?;
    let url = server.url();
    println!(
        "assignment bench: {n_workers} workers, {n_specs} specs, {n_clients} clients, {n_requests} requests, \
         server on {server_threads} tokio threads, {url}"
    );

    let t = Instant::now();
    let enroller = Client::new(&url, None)?.with_token("bench-enroll-token", "e.token");
    let mut tokens = Vec::with_capacity(n_workers);
    for i in 0..n_workers {
        let id = format!("w{i:04}");
        let resp = enroller.enroll(&EnrollRequest {
            worker_id: id.clone(),
            labels: BTreeMap::from([("zone".to_string(), ["a", "b", "c"][i % 3].to_string())]),
            capacity: Resources {
                cpu_millis: 16_000,
                memory_mib: 65_536,
            },
        })?;
        tokens.push((id, resp.token));
    }
    println!("enrolled {n_workers} workers in {:.2?}", t.elapsed());

    let specs: Vec<DesiredSpec> = (0..n_specs).map(spec).collect();
    let publisher = Client::new(&url, None)?
        .with_token("bench-publisher-token", "p.token")
        .with_timeout(Duration::from_secs(120));
    let t = Instant::now();
    let out = publisher.publish(&PublishRequest {
        commit: format!("{:040x}", 1),
        specs,
        signature: None,
    })?;
    println!(
        "published generation {} ({} unschedulable) in {:.2?} (validate + store + schedule + per-worker answers)",
        out.generation,
        out.unschedulable.len(),
        t.elapsed()
    );

    // Every worker converges once (so poll_hint is the long one, as in steady state).
    let t = Instant::now();
    let base = Client::new(&url, None)?;
    let mut instances = 0;
    for (id, token) in &tokens {
        let c = base.clone().with_token(token.clone(), "worker token");
        let a = c.assignment(id, 0, None)?;
        instances += a.assignments.len();
        c.heartbeat(&Heartbeat {
            worker_id: id.clone(),
            seen_generation: a.generation,
            instances: a
                .assignments
                .iter()
                .map(|x| RunningInstance {
                    spec: x.spec.id.clone(),
                    replica: x.replica,
                    hash: x.spec.hash.clone(),
                    state: InstanceState::Running,
                    uptime_s: 1,
                    snapshot_ids: vec![],
                    message: None,
                    commit: None,
                })
                .collect(),
            used: Resources::default(),
        })?;
    }
    println!(
        "{instances} instances on {n_workers} workers; each polled and heartbeated once in {:.2?}",
        t.elapsed()
    );

    let tokens = Arc::new(tokens);
    let per_client = n_requests / n_clients;
    let start = Instant::now();
    let threads: Vec<_> = (0..n_clients)
        .map(|c| {
            let tokens = tokens.clone();
            let url = url.clone();
            std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                // One connection pool per client thread, one token per worker.
                let base = Client::new(&url, None)?;
                let mut lat = Vec::with_capacity(per_client);
                for k in 0..per_client {
                    let (id, token) = &tokens[(c + k * n_clients) % tokens.len()];
                    let client = base.clone().with_token(token.clone(), "worker token");
                    let t = Instant::now();
                    let a = client.assignment(id, 1, None)?;
                    lat.push(t.elapsed());
                    anyhow::ensure!(a.generation == 1, "wrong generation");
                }
                Ok(lat)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n_requests);
    for t in threads {
        all.extend(t.join().map_err(|_| anyhow::anyhow!("client panicked"))??);
    }
    let wall = start.elapsed();
    all.sort();
    let p50 = percentile(&all, 0.50);
    let p99 = percentile(&all, 0.99);
    let max = *all.last().unwrap_or(&Duration::ZERO);
    println!(
        "GET /v1/assignment: {} requests in {:.2?}: {:.0} req/s; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms \
         (target p99 <= 20 ms: {})",
        all.len(),
        wall,
        all.len() as f64 / wall.as_secs_f64(),
        ms(p50),
        ms(p99),
        ms(max),
        if p99 <= Duration::from_millis(20) { "met" } else { "MISSED" }
    );
    server.shutdown()?;
    Ok(())
}
