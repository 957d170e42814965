//! PID 1 start -> act spawn, in harness mode (root only): `cargo bench -p udos-init`.
//!
//! Runs udos-init N times (`UDOS_BENCH_RUNS`, default 20) as PID 1 of a fresh PID +
//! mount namespace with a stand-in act that exits at once, and prints the record's
//! `timings_ms.init_to_act` as min/median/max. The target is <= 50 ms; this prints the
//! figure and does not assert it (the VM adds module loading and layer mounts).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("start_to_act: skipped (needs root for namespaces and mounts)");
        return;
    }
    let runs: usize = std::env::var("UDOS_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut init_to_act = Vec::new();
    let mut to_power_off = Vec::new();
    for _ in 0..runs {
        let mut h = common::Harness::new();
        h.fake_act("#!/bin/sh\nexit 0\n");
        let done = h.spawn(&h.cmdline("")).wait(Duration::from_secs(30));
        done.assert_powered_off();
        let record = h.sealed().record;
        let Some(ms) = record.timings_ms.get("init_to_act").copied() else {
            panic!("no init_to_act in {record:?}");
        };
        // The console line has microseconds; the record only whole milliseconds.
        let precise = done.lines.iter().find_map(|(_, l)| {
            let rest = l.strip_prefix("udos-init: act started (pid ")?;
            rest.split(", ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<f64>()
                .ok()
        });
        init_to_act.push(precise.unwrap_or(ms as f64));
        to_power_off.push((done.ended - done.started).as_secs_f64() * 1000.0);
    }
    report("PID 1 start -> act spawn", &mut init_to_act);
    report(
        "spawn -> power off, whole run (host wall clock)",
        &mut to_power_off,
    );
    println!("target: init_to_act <= 50 ms");
}

fn report(what: &str, values: &mut [f64]) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return;
    }
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    println!(
        "{what}: min {:.1} ms, median {:.1} ms, max {:.1} ms ({n} runs)",
        values[0],
        median,
        values[n - 1]
    );
}
