//! What recording the step's reads costs, in harness mode (root only):
//! `cargo bench -p udos-init --bench reads`.
//!
//! A stand-in act runs a step that opens 10,000 files (`UDOS_BENCH_FILES`) one after
//! the other from one shell (no fork per file, so the opens dominate), first under the
//! workspace, then elsewhere in the step root (events PID 1 reads and drops). Each is
//! run `UDOS_BENCH_RUNS` times (default 9) with the watch and with fanotify denied (a
//! seccomp filter, as on a kernel without it), and the step's own wall time, act's
//! time in the record and PID 1's CPU time on the events are printed as medians. Run
//! it under `taskset -c 0` too: a step VM has one CPU, where PID 1's work adds up.
//! Figures, not a timed test: nothing is asserted but that the record is right.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

const STEP: &str = r#"#!/bin/sh
dir="$1"
start=$(date +%s%N)
for f in "$dir"/*; do : < "$f"; done
end=$(date +%s%N)
echo "STEP-NS $((end - start))"
"#;

struct Run {
    step_ms: f64,
    act_ms: f64,
    pid1_ms: Option<f64>,
    files: Option<usize>,
}

fn run_once(files: usize, under_workspace: bool, watched: bool) -> Run {
    let mut h = common::Harness::new();
    let dir = if under_workspace {
        "workspace/many"
    } else {
        "opt/many"
    };
    std::fs::create_dir_all(h.base.join(dir)).unwrap();
    for i in 0..files {
        std::fs::write(h.base.join(format!("{dir}/f{i:05}")), "x").unwrap();
    }
    std::fs::write(h.base.join("opt/step.sh"), STEP).unwrap();
    // A child of act, not act itself: act's own opens are not the step's.
    h.fake_act(&format!("#!/bin/sh\nsh /opt/step.sh /{dir}\n"));
    h.deny_fanotify = !watched;
    let done = h.spawn(&h.cmdline("")).wait(Duration::from_secs(120));
    done.assert_powered_off();
    let record = h.sealed().record;
    let step_ns: f64 = done
        .lines
        .iter()
        .find_map(|(_, l)| l.strip_prefix("STEP-NS ")?.parse().ok())
        .expect("the step printed its time");
    // "udos-init: read N file(s) and M dir(s) under /workspace (...; X ms of CPU)"
    let pid1_ms = done.lines.iter().find_map(|(_, l)| {
        let rest = l.strip_prefix("udos-init: read ")?;
        rest.rsplit_once("; ")?
            .1
            .strip_suffix(" ms of CPU)")?
            .parse()
            .ok()
    });
    let reads = record.reads.as_ref();
    assert_eq!(reads.is_some(), watched, "{record:?}");
    if let Some(reads) = reads {
        let expected = if under_workspace { files } else { 0 };
        assert_eq!(reads.files.len(), expected, "{:?}", reads.dirs);
    }
    Run {
        step_ms: step_ns / 1e6,
        act_ms: record.timings_ms.get("act").copied().unwrap_or(0) as f64,
        pid1_ms,
        files: reads.map(|r| r.files.len()),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("reads: skipped (needs root for namespaces and mounts)");
        return;
    }
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (runs, files) = (env("UDOS_BENCH_RUNS", 9), env("UDOS_BENCH_FILES", 10_000));
    for under_workspace in [true, false] {
        let place = if under_workspace {
            "under /workspace"
        } else {
            "outside /workspace"
        };
        // Interleaved, so that a busy neighbour on the machine weighs on both alike.
        let mut all: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..runs {
            for (i, watched) in [false, true].into_iter().enumerate() {
                all[i].push(run_once(files, under_workspace, watched));
            }
        }
        let mut medians = Vec::new();
        for (watched, all) in [false, true].into_iter().zip(&all) {
            let step = median(all.iter().map(|r| r.step_ms).collect());
            let act = median(all.iter().map(|r| r.act_ms).collect());
            let pid1 = median(all.iter().filter_map(|r| r.pid1_ms).collect());
            let recorded = all.first().and_then(|r| r.files);
            println!(
                "{files} opens {place}, {}: step {step:.1} ms, act {act:.0} ms{}{} (median of {runs})",
                if watched { "recorded" } else { "fanotify denied" },
                if watched { format!(", PID 1's CPU on events {pid1:.1} ms") } else { String::new() },
                recorded.map_or(String::new(), |n| format!(", {n} file(s) in the record")),
            );
            medians.push(step);
        }
        if let [off, on] = medians[..] {
            println!(
                "  overhead {place}: {:+.1} ms on the step ({:+.1}%)",
                on - off,
                (on - off) / off * 100.0
            );
        }
    }
}
