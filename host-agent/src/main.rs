//! `udos`: run GitHub Actions workflows with every step in its own micro-VM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use udos_host_agent::{bench, restic::Repo, restore, runner, setup, state::StateDir, store::Store};

#[derive(Parser)]
#[command(
    name = "udos",
    version,
    about = "Run GitHub Actions workflows with every step in its own micro-VM",
    long_about = "Run GitHub Actions workflows with every step in its own micro-VM.\n\n\
        Each step boots a small kernel whose PID 1 mounts the step's layers (base, workspace, \
        earlier steps) under a writable overlay, runs the step with act, and seals what the step \
        wrote as a new layer. Every layer is snapshotted with restic: every step is a restore point."
)]
struct Cli {
    /// State directory [default: $UDOS_STATE_DIR, else $XDG_DATA_HOME/udos, else ~/.local/share/udos]
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum HypervisorArg {
    /// cloud-hypervisor where KVM really boots our kernel, else QEMU (KVM or TCG)
    Auto,
    /// cloud-hypervisor (needs a working /dev/kvm)
    CloudHypervisor,
    /// QEMU microvm, with KVM when it works, else TCG software emulation
    Qemu,
}

#[derive(Subcommand)]
enum Command {
    /// Run one job of a workflow, each step in its own VM
    Run {
        /// The workflow file (.github/workflows/*.yml)
        workflow: PathBuf,
        /// The job to run (needed when the workflow has several)
        #[arg(short, long)]
        job: Option<String>,
        /// Which hypervisor runs the step VMs
        #[arg(long, value_enum, default_value = "auto")]
        hypervisor: HypervisorArg,
        /// Print one JSON report on stdout (logs stay on stderr)
        #[arg(long)]
        json: bool,
        /// vCPUs per step VM
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Memory per step VM, MiB
        #[arg(long, default_value_t = 1024)]
        memory: u64,
        /// A step is stopped after this many seconds
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Boot this kernel (bzImage or vmlinux) instead of Debian's cloud kernel
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Don't stream the guests' consoles to the terminal
        #[arg(long)]
        no_console: bool,
    },
    /// List runs
    Runs {
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// List the layers (restore points) of a run
    Layers {
        /// Run number (see `udos runs`)
        run: i64,
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Restore the root filesystem as a step left it
    Restore {
        /// Run number
        run: i64,
        /// Step: 1-based number or the step's id
        step: String,
        /// Directory to restore into (new or empty)
        #[arg(long)]
        target: PathBuf,
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Build guest images
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Benchmark a workflow: per-step phases and host overhead, against act on the host
    Bench {
        /// The workflow (default: workflows/bench.yml)
        #[arg(default_value = "workflows/bench.yml")]
        workflow: PathBuf,
        /// Which hypervisor runs the step VMs
        #[arg(long, value_enum, default_value = "auto")]
        hypervisor: HypervisorArg,
    },
    /// Run the master of a cluster (see docs/master-api.md)
    Master {
        #[command(subcommand)]
        command: udos_host_agent::cluster::cli::MasterCommand,
    },
    /// Run a worker agent: enroll, pull assignments, run them in VMs, report
    Agent(udos_host_agent::cluster::cli::AgentArgs),
    /// Publish the desired state of a built commit as the next generation
    Publish(udos_host_agent::cluster::cli::PublishArgs),
    /// Show the cluster's convergence, per worker and per spec
    Status(udos_host_agent::cluster::cli::StatusArgs),
    /// Show how two generations differ
    DiffGenerations(udos_host_agent::cluster::cli::DiffArgs),
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build the default image and base layer (idempotent)
    Build {
        /// Use this kernel (bzImage or vmlinux) instead of Debian's cloud kernel
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
}

/// An error before any work started: exit code 2.
struct SetupFailed(anyhow::Error);

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UDOS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(SetupFailed(e)) => {
            eprintln!("udos: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn progress(msg: &str) {
    eprintln!("udos: {msg}");
}

fn choice(h: HypervisorArg) -> udos_vmm::HypervisorChoice {
    match h {
        HypervisorArg::Auto => udos_vmm::HypervisorChoice::Auto,
        HypervisorArg::CloudHypervisor => udos_vmm::HypervisorChoice::CloudHypervisor,
        HypervisorArg::Qemu => udos_vmm::HypervisorChoice::Qemu,
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode, SetupFailed> {
    let state = StateDir::resolve(cli.state_dir.as_deref()).map_err(SetupFailed)?;
    match cli.command {
        Command::Run {
            workflow,
            job,
            hypervisor,
            json,
            cpus,
            memory,
            timeout,
            kernel,
            no_console,
        } => {
            let settings = runner::RunSettings {
                cpus,
                memory_mib: memory,
                step_timeout: Duration::from_secs(timeout),
                stream_console: !no_console,
                ..runner::RunSettings::default()
            };
            // The workflow and the job are checked before any image is built.
            let wf = setup::load_workflow(&workflow).map_err(SetupFailed)?;
            let job = wf
                .select_job(job.as_deref())
                .map_err(|e| SetupFailed(e.into()))?;
            let env = setup::prepare_env(&state, kernel, choice(hypervisor), &progress)
                .map_err(SetupFailed)?;
            let mut store = Store::open(&state.db()).map_err(SetupFailed)?;
            let report = runner::run_job(
                &env.prepared(&state),
                &mut store,
                &workflow,
                &wf,
                job,
                &settings,
            )
            .map_err(SetupFailed)?;
            if json {
                print_json(&report);
            } else {
                print_run(&report);
            }
            Ok(if report.status == "success" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Runs { json } => {
            let store = Store::open(&state.db()).map_err(SetupFailed)?;
            let runs = store.runs().map_err(SetupFailed)?;
            if json {
                print_json(&runs);
            } else if runs.is_empty() {
                println!("no runs yet: start one with `udos run WORKFLOW`");
            } else {
                println!(
                    "{:>5} {:>5}  {:<8} {:<20} {:<16} WORKFLOW",
                    "RUN", "GEN", "STATUS", "STARTED", "JOB"
                );
                for r in runs {
                    println!(
                        "{:>5} {:>5}  {:<8} {:<20} {:<16} {}",
                        r.run_id, r.generation, r.status, r.started_at, r.job, r.workflow
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Layers { run, json } => {
            let store = Store::open(&state.db()).map_err(SetupFailed)?;
            if store.run(run).map_err(SetupFailed)?.is_none() {
                return Err(SetupFailed(anyhow::anyhow!(
                    "no run {run} (see `udos runs`)"
                )));
            }
            let inputs = store.inputs(run).map_err(SetupFailed)?;
            let steps = store.steps(run).map_err(SetupFailed)?;
            if json {
                let v = serde_json::json!({ "run_id": run, "inputs": inputs, "steps": steps });
                print_json(&v);
            } else {
                println!(
                    "{:<10} {:<8} {:<14} {:<10} NAME",
                    "LAYER OF", "STATUS", "LAYER", "SNAPSHOT"
                );
                for i in &inputs {
                    println!(
                        "{:<10} {:<8} {:<14} {:<10}",
                        i.kind,
                        "-",
                        short(&i.layer_id),
                        short(i.snapshot_id.as_deref().unwrap_or("-"))
                    );
                }
                for s in &steps {
                    println!(
                        "{:<10} {:<8} {:<14} {:<10} {}",
                        format!("step {}", s.number),
                        s.status,
                        short(s.layer_id.as_deref().unwrap_or("-")),
                        short(s.snapshot_id.as_deref().unwrap_or("-")),
                        s.name
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore {
            run,
            step,
            target,
            json,
        } => {
            let store = Store::open(&state.db()).map_err(SetupFailed)?;
            let repo = Repo::from_env_or_default(state.root()).map_err(SetupFailed)?;
            let report = restore::restore(&state, &store, &repo, run, &step, &target, &progress)
                .map_err(SetupFailed)?;
            if json {
                print_json(&report);
            } else {
                println!(
                    "restored run {} step {} into {} ({} layers)",
                    report.run_id,
                    report.step,
                    report.target,
                    report.layers.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Image {
            command: ImageCommand::Build { kernel, json },
        } => {
            let (image, base) =
                setup::build_images(&state, kernel, &progress).map_err(SetupFailed)?;
            if json {
                let v = serde_json::json!({
                    "image_id": image.id, "kernel_release": image.kernel_release,
                    "vmlinux": image.vmlinux, "initramfs": image.initramfs,
                    "base_layer_id": base.id, "base_layer": base.erofs,
                });
                print_json(&v);
            } else {
                println!(
                    "image {} (kernel {})",
                    short(&image.id),
                    image.kernel_release
                );
                println!("base layer {}", short(&base.id));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            workflow,
            hypervisor,
        } => {
            bench::run(&state, &workflow, choice(hypervisor), &progress).map_err(SetupFailed)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Master { command } => Ok(udos_host_agent::cluster::cli::master(&state, command)),
        Command::Agent(a) => Ok(udos_host_agent::cluster::cli::agent(&state, a)),
        Command::Publish(a) => Ok(udos_host_agent::cluster::cli::publish(&state, a)),
        Command::Status(a) => Ok(udos_host_agent::cluster::cli::status(&state, a)),
        Command::DiffGenerations(a) => Ok(udos_host_agent::cluster::cli::diff(&state, a)),
    }
}

/// The one JSON document `--json` prints on stdout.
fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("udos: error: cannot encode the report as JSON: {e}"),
    }
}

fn short(s: &str) -> &str {
    s.get(..12).unwrap_or(s)
}

fn print_run(r: &runner::RunReport) {
    println!();
    println!(
        "run {} (generation {}) on {}: {}  [{:.1}s]",
        r.run_id,
        r.generation,
        r.hypervisor,
        r.status,
        r.wall_ms as f64 / 1000.0
    );
    for j in &r.jobs {
        for s in &j.steps {
            println!(
                "  {:>2}. {:<8} {:<40} layer {} snapshot {}",
                s.number,
                s.status,
                truncate(&s.name, 40),
                short(s.layer_id.as_deref().unwrap_or("-")),
                short(s.snapshot_id.as_deref().unwrap_or("-")),
            );
            if let Some(e) = &s.error {
                println!("      error: {e}");
            }
        }
    }
    println!(
        "restore any step with: udos restore {} STEP --target DIR",
        r.run_id
    );
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}
