//! `udos`: run GitHub Actions workflows with every step in its own micro-VM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use udos_core::engine::Conclusion;
use udos_host_agent::{
    bench, boot, diff, export, gc, plan, restic::Repo, restore, runner, setup, state::StateDir,
    store::Store,
};

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

#[derive(Clone, Copy, ValueEnum, serde::Serialize, serde::Deserialize)]
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
    /// Run workflows as GitHub runs them, each step in its own VM
    ///
    /// act's flags where act has them: `udos run [EVENT] [-W PATH] [-j JOB]... ...`.
    Run(Box<RunArgs>),
    /// Run a recorded run again: the same workflows, event, inputs, vars and flags, its
    /// secrets by name (their values from the environment, as `-s NAME` takes them).
    /// Unchanged steps are reused from the run's restore points; `--from STEP` runs
    /// that step and every later one again
    Rerun(RerunArgs),
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
        /// The job leg (its id, e.g. `build`, or its name, e.g. `test (ubuntu, 18)`):
        /// needed when the run has several legs with layers
        #[arg(short, long)]
        job: Option<String>,
        /// Directory to restore into (new or empty)
        #[arg(long)]
        target: PathBuf,
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Show what a step added, changed and deleted, or how two restore points differ
    ///
    /// `udos diff RUN STEP`: the root as the step left it against the root it found.
    /// `udos diff RUN STEP RUN2 STEP2`: the root after STEP against the root after STEP2.
    Diff {
        /// Run number
        run: i64,
        /// Step: 1-based number or the step's id
        step: String,
        /// A second restore point's run
        #[arg(requires = "step2")]
        run2: Option<i64>,
        /// A second restore point's step
        step2: Option<String>,
        /// The job leg of the first point (needed when the run has several legs with layers)
        #[arg(short, long)]
        job: Option<String>,
        /// The job leg of the second point
        #[arg(long)]
        job2: Option<String>,
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Write a restore point as an OCI layer tar
    ///
    /// The step's own layer (`.wh.` whiteouts), or with --flatten the whole root at that point.
    Export {
        /// Run number
        run: i64,
        /// Step: 1-based number or the step's id
        step: String,
        /// The job leg (needed when the run has several legs with layers)
        #[arg(short, long)]
        job: Option<String>,
        /// The tar file to write (must not exist)
        #[arg(short, long)]
        output: PathBuf,
        /// The whole root at that point (base, workspace, the steps' layers), no whiteouts
        #[arg(long)]
        flatten: bool,
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Boot a VM on a restore point with a shell on this terminal
    ///
    /// The root is the one the step left (base, workspace, the leg's layers up to the
    /// step). Keys go to the guest, Ctrl-C included; `exit` leaves the shell and powers
    /// the VM off; Ctrl-] stops the VM at once (nothing is kept). Input that is not a
    /// terminal is typed into the shell as it is (end such a script with `exit`).
    /// QEMU only.
    Boot {
        /// Run number
        run: i64,
        /// Step: 1-based number or the step's id
        step: String,
        /// The job leg (needed when the run has several legs with layers)
        #[arg(short, long)]
        job: Option<String>,
        /// After the shell exits, seal what it changed as a new layer and restore point
        /// (recorded as a new run: `udos runs`, `udos layers`)
        #[arg(long)]
        keep: bool,
        /// vCPUs
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Memory, MiB
        #[arg(long, default_value_t = 1024)]
        memory: u64,
        /// End the shell after this many seconds (what it changed is still kept)
        #[arg(long, default_value_t = 8 * 3600)]
        timeout: u64,
        /// The VM's network: `nat` (egress through NAT, DNS) or `none`
        #[arg(long, value_enum, default_value = "nat")]
        network: NetworkArg,
        /// A port of this host the VM may reach at 10.0.2.2; repeatable
        #[arg(long = "host-port", value_name = "PORT")]
        host_port: Vec<u16>,
    },
    /// Free what only old runs need: their snapshots, layers and images
    ///
    /// Never removes what a kept run, a base layer or a tag needs (docs/restore-points.md).
    Gc {
        /// Keep the newest N runs [default: every run]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        keep_last: Option<u64>,
        /// Also keep runs whose workspace commit carries a git tag
        #[arg(long)]
        keep_tagged: bool,
        /// Say what would be freed, change nothing
        #[arg(long)]
        dry_run: bool,
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Build guest images
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// udos's own guest kernel: build it (images then boot it instead of Debian's)
    Kernel {
        #[command(subcommand)]
        command: KernelCommand,
    },
    /// The bases jobs run on: list them, import an image tar, build the Debian base
    Base {
        #[command(subcommand)]
        command: BaseCommand,
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

/// Recorded with each run (secrets by name only) for `udos rerun`: a field added here
/// needs `#[serde(default)]` so that older runs can still be rerun.
#[derive(clap::Args, serde::Serialize, serde::Deserialize)]
struct RunArgs {
    /// `[EVENT] [WORKFLOW]`: the event (default: the workflows' only event, else push)
    /// and a workflow file (or use -W)
    #[arg(value_name = "EVENT|WORKFLOW", num_args = 0..=2)]
    args: Vec<String>,
    /// A workflow file, or a directory of workflows [default: .github/workflows]
    #[arg(short = 'W', long = "workflows", value_name = "PATH")]
    workflows: Option<PathBuf>,
    /// Run this job (and what it needs); repeatable
    #[arg(short, long = "job")]
    job: Vec<String>,
    /// The event payload (JSON), as GitHub would send it
    #[arg(short = 'e', long = "eventpath", value_name = "FILE")]
    eventpath: Option<PathBuf>,
    /// An input for workflow_dispatch / workflow_call: K=V; repeatable
    #[arg(long = "input", value_name = "K=V")]
    input: Vec<String>,
    /// A secret: NAME=VALUE, or NAME to take the value from the environment; repeatable
    #[arg(short = 's', long = "secret", value_name = "NAME[=VALUE]")]
    secret: Vec<String>,
    /// Secrets from a dotenv file
    #[arg(long = "secret-file", value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// A variable (the `vars` context): K=V; repeatable
    #[arg(long = "var", value_name = "K=V")]
    var: Vec<String>,
    /// Variables from a dotenv file
    #[arg(long = "var-file", value_name = "FILE")]
    var_file: Option<PathBuf>,
    /// Environment for every step, from a dotenv file (below the workflow's env:)
    #[arg(long = "env-file", value_name = "FILE")]
    env_file: Option<PathBuf>,
    /// Run only the matrix legs with K:V; repeatable
    #[arg(long = "matrix", value_name = "K:V")]
    matrix: Vec<String>,
    /// Step VMs at once [default: what the machine's cores and memory hold]
    #[arg(long = "jobs", value_name = "N")]
    jobs: Option<usize>,
    /// Map a runs-on label to a base: LABEL=BASE; repeatable. Bases: debian (Debian 12
    /// with git, curl, python3, node, build tools, sudo...: built once, the first time a
    /// run needs it; what ubuntu-*, linux and self-hosted get unless $UDOS_DEFAULT_BASE
    /// names another), minimal (busybox and bash), or a base `udos base import` made
    #[arg(short = 'P', long = "platform", value_name = "LABEL=BASE")]
    platform: Vec<String>,
    /// Print the plan and boot nothing
    #[arg(short = 'n', long = "dryrun")]
    dryrun: bool,
    /// List the jobs by stage and exit
    #[arg(short = 'l', long = "list")]
    list: bool,
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
    /// No step runs longer than this many seconds (below the workflow's timeout-minutes)
    #[arg(long, default_value_t = 6 * 3600)]
    timeout: u64,
    /// Boot this kernel (bzImage or vmlinux) instead of Debian's cloud kernel
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Don't stream the guests' consoles to the terminal
    #[arg(long)]
    no_console: bool,
    /// Plain progress lines, not the board redrawn in place (also `UDOS_PROGRESS=plain`;
    /// automatic when stderr is not a terminal)
    #[arg(long)]
    #[serde(skip)]
    plain: bool,
    /// Run every step, even those whose inputs are unchanged since a recorded run
    #[arg(long)]
    no_cache: bool,
    /// Neither squash the jobs' final roots on a tagged commit into bases, nor start
    /// from such a base (docs/bases.md)
    #[arg(long)]
    #[serde(default)]
    no_squash: bool,
    /// A VM per `step` (each step its own restore point) or per `job` (its steps in
    /// one VM, one restore point per job; no step cache)
    #[arg(long, value_enum, default_value = "step")]
    #[serde(default)]
    per: udos_host_agent::runner::Per,
    /// The steps' network: `nat` (egress through NAT, DNS; QEMU) or `none`
    #[arg(long, value_enum, default_value = "nat")]
    network: NetworkArg,
    /// A port of this host that steps may reach, at their gateway address (10.0.2.2);
    /// repeatable. Nothing else of the host is reachable from a step.
    #[arg(long = "host-port", value_name = "PORT")]
    host_port: Vec<u16>,
    /// Where actions of other repositories (`uses: owner/repo@ref`) are fetched from
    /// before the run: GitHub, a mirror, or GitHub Enterprise (URL/OWNER/REPO is a git
    /// repository)
    #[arg(long = "actions-url", value_name = "URL", default_value = udos_host_agent::actions::DEFAULT_ACTIONS_URL)]
    actions_url: String,
    /// Use the directory PATH as the action OWNER/REPO at REF instead of fetching it,
    /// as act's flag does; repeatable
    #[arg(long = "local-repository", value_name = "OWNER/REPO@REF=PATH")]
    local_repository: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
enum NetworkArg {
    /// A NIC with NAT egress and DNS
    Nat,
    /// No NIC
    None,
}

#[derive(clap::Args)]
struct RerunArgs {
    /// The run (see `udos runs`)
    run: i64,
    /// Run this step (1-based, as `udos layers` numbers them) and every later one
    /// again, reusing the restore point before it
    #[arg(long, value_name = "STEP")]
    from: Option<usize>,
    /// Only this job (and what it needs, reused where unchanged); `--from` applies to it
    #[arg(long)]
    job: Option<String>,
    /// Print one JSON report on stdout (logs stay on stderr)
    #[arg(long)]
    json: bool,
    /// Don't stream the guests' consoles to the terminal
    #[arg(long)]
    no_console: bool,
    /// Plain progress lines, not the board redrawn in place
    #[arg(long)]
    plain: bool,
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

#[derive(Subcommand)]
enum KernelCommand {
    /// Build the kernel from Debian's linux-source-6.1 and kernel/config.fragment
    ///
    /// allnoconfig plus the fragment, every driver built in, no modules: about 16 minutes
    /// on 2 cores the first time, then cached (by source version, fragment and builder).
    /// Images built afterwards boot it; Debian's cloud kernel stays the fallback.
    Build {
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BaseCommand {
    /// List the bases: name, kind, id, size, packages
    List {
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Import an image tar as a base: an OCI image layout, what `docker save` writes, or a
    /// plain root filesystem tar (any of them gzip- or zstd-compressed)
    Import {
        /// The tar
        file: PathBuf,
        /// The base's name, for `-P LABEL=NAME` [default: the file name without .tar]
        #[arg(long)]
        name: Option<String>,
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Build a base now (`udos run` builds the bases it needs by itself)
    Build {
        /// Which base
        #[arg(value_enum)]
        base: BuildBase,
        /// Build again from the archive as it is now (a new base only if a package changed)
        #[arg(long)]
        refresh: bool,
        /// A Debian mirror URL to build from [default: deb.debian.org and security.debian.org]
        #[arg(long, value_name = "URL")]
        mirror: Option<String>,
        /// Stop the build after this many seconds
        #[arg(long, default_value_t = 1800)]
        timeout: u64,
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum BuildBase {
    /// Debian 12 built with mmdebstrap
    Debian,
}

/// An error before any work started: exit code 2.
struct SetupFailed(anyhow::Error);

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UDOS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(udos_host_agent::progress::log_writer)
        .init();
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(SetupFailed(e)) => {
            eprintln!("udos: error: {}", udos_host_agent::errors::describe(&e));
            ExitCode::from(2)
        }
    }
}

/// The state dir's lock, shared, for a command that reads layers (restore, diff,
/// export, boot): gc is refused while it is held (`StateDir::lock_for_run`).
fn lock_for_reading(state: &StateDir) -> Result<udos_host_agent::state::StateLock, SetupFailed> {
    state
        .lock_for_run(udos_host_agent::state::GC_WAIT, &progress)
        .map_err(SetupFailed)
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
        Command::Run(a) => run(&state, *a, Attempt::default()),
        Command::Rerun(r) => rerun(&state, r),
        Command::Runs { json } => {
            let store = Store::open(&state.db()).map_err(SetupFailed)?;
            let runs = store.runs().map_err(SetupFailed)?;
            if json {
                print_json(&runs);
            } else if runs.is_empty() {
                println!("no runs yet: start one with `udos run WORKFLOW`");
            } else {
                use udos_host_agent::progress::{table, Align};
                let rows: Vec<Vec<String>> = runs
                    .into_iter()
                    .map(|r| {
                        vec![
                            r.run_id.to_string(),
                            r.generation.to_string(),
                            r.status,
                            r.started_at,
                            r.event,
                            truncate(&r.job, 24),
                            r.workflow,
                        ]
                    })
                    .collect();
                let columns = [
                    ("RUN", Align::Right),
                    ("GEN", Align::Right),
                    ("STATUS", Align::Left),
                    ("STARTED", Align::Left),
                    ("EVENT", Align::Left),
                    ("JOBS", Align::Left),
                    ("WORKFLOW", Align::Left),
                ];
                table(&columns, &rows).iter().for_each(|l| println!("{l}"));
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
            let jobs = store.jobs(run).map_err(SetupFailed)?;
            if json {
                let v = serde_json::json!({ "run_id": run, "inputs": inputs, "jobs": jobs, "steps": steps });
                print_json(&v);
            } else {
                use udos_host_agent::progress::{table, Align};
                let mut rows: Vec<Vec<String>> = inputs
                    .iter()
                    .map(|i| {
                        vec![
                            i.kind.clone(),
                            "-".into(),
                            short(&i.layer_id).into(),
                            short(i.snapshot_id.as_deref().unwrap_or("-")).into(),
                        ]
                    })
                    .collect();
                let several = jobs.len() > 1;
                rows.extend(steps.iter().map(|s| {
                    let of = if several {
                        format!("{} step {}", truncate(&s.job_id, 24), s.number)
                    } else {
                        format!("step {}", s.number)
                    };
                    vec![
                        of,
                        s.status.clone(),
                        short(s.layer_id.as_deref().unwrap_or("-")).into(),
                        short(s.snapshot_id.as_deref().unwrap_or("-")).into(),
                        s.name.clone(),
                    ]
                }));
                let columns = [
                    ("LAYER OF", Align::Left),
                    ("STATUS", Align::Left),
                    ("LAYER", Align::Left),
                    ("SNAPSHOT", Align::Left),
                    ("NAME", Align::Left),
                ];
                table(&columns, &rows).iter().for_each(|l| println!("{l}"));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore {
            run,
            step,
            job,
            target,
            json,
        } => {
            let _lock = lock_for_reading(&state)?;
            let store = Store::open(&state.db()).map_err(SetupFailed)?;
            let repo = Repo::from_env_or_default(state.root()).map_err(SetupFailed)?;
            let report = restore::restore(
                &state,
                &store,
                &repo,
                &restore::Point {
                    run,
                    step: &step,
                    job: job.as_deref(),
                },
                &target,
                &progress,
            )
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
        Command::Diff {
            run,
            step,
            run2,
            step2,
            job,
            job2,
            json,
        } => {
            let second = run2.zip(step2);
            let from = restore::Point {
                run,
                step: &step,
                job: job.as_deref(),
            };
            let to = second.as_ref().map(|(run, step)| restore::Point {
                run: *run,
                step,
                job: job2.as_deref(),
            });
            diff_command(&state, &from, to.as_ref(), json)
        }
        Command::Export {
            run,
            step,
            job,
            output,
            flatten,
            json,
        } => {
            let point = restore::Point {
                run,
                step: &step,
                job: job.as_deref(),
            };
            let mode = if flatten {
                export::Mode::Flatten
            } else {
                export::Mode::Layer
            };
            export_command(&state, &point, mode, &output, json)
        }
        Command::Boot {
            run,
            step,
            job,
            keep,
            cpus,
            memory,
            timeout,
            network,
            host_port,
        } => {
            let point = restore::Point {
                run,
                step: &step,
                job: job.as_deref(),
            };
            let opts = boot::BootOptions {
                keep,
                cpus,
                memory_mib: memory,
                timeout: Duration::from_secs(timeout.max(1)),
                network: match network {
                    NetworkArg::None => None,
                    NetworkArg::Nat => Some(runner::nat_network(host_port)),
                },
                ..boot::BootOptions::default()
            };
            boot_command(&state, &point, &opts)
        }
        Command::Gc {
            keep_last,
            keep_tagged,
            dry_run,
            json,
        } => {
            let opts = gc::Options {
                keep_last: keep_last.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
                keep_tagged,
                dry_run,
            };
            gc_command(&state, &opts, json)
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
        Command::Kernel {
            command: KernelCommand::Build { json },
        } => kernel_build(&state, json),
        Command::Base { command } => base(&state, command),
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

/// `udos kernel build`.
fn kernel_build(state: &StateDir, json: bool) -> Result<ExitCode, SetupFailed> {
    use udos_images::{ImageStore, KernelBuildOptions, KernelStatus};
    let store = ImageStore::new(state.root());
    let (k, status) = store
        .ensure_kernel(&KernelBuildOptions::default(), &progress)
        .map_err(SetupFailed)?;
    if json {
        print_json(&serde_json::json!({
            "status": status,
            "cached": status == KernelStatus::Cached,
            "id": k.id,
            "release": k.release,
            "source_package": k.source_package,
            "source_version": k.source_version,
            "vmlinux": k.vmlinux(),
            "config": k.config(),
            "vmlinux_bytes": k.vmlinux_bytes,
            "pvh": k.pvh,
            "jobs": k.jobs,
            "timings_ms": k.timings,
        }));
    } else {
        let how = match status {
            KernelStatus::Built => "built now",
            KernelStatus::Cached => "already built",
        };
        println!(
            "kernel {} {} (linux-source-6.1 {}): {how}; its build took {} \
             (compile {}); images now boot it",
            short(&k.id),
            k.release,
            k.source_version,
            udos_images::build_kernel::minutes(Duration::from_millis(k.timings.total_ms)),
            udos_images::build_kernel::minutes(Duration::from_millis(k.timings.compile_ms)),
        );
        println!("{}", k.vmlinux().display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `udos base ...`.
fn base(state: &StateDir, command: BaseCommand) -> Result<ExitCode, SetupFailed> {
    let (made, json) = match command {
        BaseCommand::List { json } => {
            let bases = setup::list_bases(state, &|w| eprintln!("udos: warning: {w}"))
                .map_err(SetupFailed)?;
            print_bases(&bases, json);
            return Ok(ExitCode::SUCCESS);
        }
        BaseCommand::Import { file, name, json } => (
            setup::import_base(state, &file, name.as_deref(), &progress).map_err(SetupFailed)?,
            json,
        ),
        BaseCommand::Build {
            base: BuildBase::Debian,
            refresh,
            mirror,
            timeout,
            json,
        } => {
            let opts = udos_images::DebianOptions {
                mirror,
                timeout: Duration::from_secs(timeout.max(1)),
                refresh,
                ..udos_images::DebianOptions::default()
            };
            (
                setup::build_debian(state, &opts, &progress).map_err(SetupFailed)?,
                json,
            )
        }
    };
    if json {
        print_json(&setup::base_json(&made));
    } else {
        println!(
            "base `{}` {} ({}): erofs {} MiB, {} packages, made in {:.1} s",
            made.name,
            short(&made.meta.id),
            udos_core::text::sanitize_for_terminal(&made.meta.origin),
            made.meta.erofs_bytes >> 20,
            made.meta.package_count,
            made.meta.build_ms as f64 / 1000.0
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_bases(bases: &[udos_images::NamedBase], json: bool) {
    if json {
        let rows: Vec<serde_json::Value> = bases.iter().map(setup::base_json).collect();
        print_json(&rows);
        return;
    }
    if bases.is_empty() {
        println!("no bases yet: `udos image build` makes the default one");
        return;
    }
    println!(
        "{:<16} {:<9} {:<13} {:>10} {:>8}  ORIGIN",
        "NAME", "KIND", "ID", "SIZE", "PACKAGES"
    );
    for b in bases {
        println!(
            "{:<16} {:<9} {:<13} {:>6} MiB {:>8}  {}",
            b.name,
            b.meta.kind,
            short(&b.meta.id),
            b.meta.erofs_bytes >> 20,
            b.meta.package_count,
            udos_core::text::sanitize_for_terminal(&b.meta.origin)
        );
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

fn print_run(r: &udos_host_agent::report::RunReport) {
    println!();
    println!(
        "run {} (generation {}) on {}, event {}: {}  [{:.1}s]",
        r.run_id,
        r.generation,
        r.hypervisor,
        r.event,
        r.status,
        r.wall_ms as f64 / 1000.0
    );
    let clean = |s: &str| udos_core::text::sanitize_for_terminal(s).into_owned();
    for j in &r.jobs {
        println!("  job {}: {}", clean(&j.name), j.status);
        if let Some(e) = &j.error {
            println!("      error: {}", clean(e));
        }
        for s in &j.steps {
            println!(
                "  {:>4}. {:<9} {:<40} layer {} snapshot {}",
                s.number,
                s.status,
                truncate(&clean(&s.name), 40),
                short(s.layer_id.as_deref().unwrap_or("-")),
                short(s.snapshot_id.as_deref().unwrap_or("-")),
            );
            if let Some(e) = &s.error {
                println!("        error: {}", clean(e));
            }
        }
    }
    for n in &r.notices {
        println!("  note: {}", clean(n));
    }
    println!(
        "restore any step with: udos restore {} STEP [--job JOB] --target DIR",
        r.run_id
    );
}

/// Which attempt of a run this is (`udos rerun` makes the later ones).
struct Attempt {
    /// 1 for a first run.
    number: u32,
    /// `udos rerun --from`.
    from: Option<udos_host_agent::rerun::RerunFrom>,
}

impl Default for Attempt {
    fn default() -> Self {
        Attempt {
            number: 1,
            from: None,
        }
    }
}

/// What `udos rerun` replays of this invocation (secrets by name only).
fn invocation(a: &RunArgs, attempt: u32) -> anyhow::Result<String> {
    let mut args = serde_json::to_value(a)?;
    args["secret"] = serde_json::to_value(udos_host_agent::rerun::secret_names(&a.secret))?;
    let event = match &a.eventpath {
        Some(p) => Some(serde_json::from_slice(&std::fs::read(p)?)?),
        None => None,
    };
    let inv = udos_host_agent::rerun::Invocation {
        version: udos_host_agent::rerun::INVOCATION_VERSION,
        cwd: std::env::current_dir()?,
        attempt,
        args,
        event,
    };
    Ok(serde_json::to_string(&inv)?)
}

/// `udos rerun`: `udos run` again, as its invocation was recorded.
fn rerun(state: &StateDir, r: RerunArgs) -> Result<ExitCode, SetupFailed> {
    let fail = |e: anyhow::Error| SetupFailed(e);
    if r.from == Some(0) {
        return Err(fail(anyhow::anyhow!("--from 0: steps are numbered from 1")));
    }
    let store = Store::open(&state.db()).map_err(fail)?;
    let json = match store.invocation(r.run).map_err(fail)? {
        None => {
            return Err(fail(anyhow::anyhow!(
                "there is no run {} (`udos runs` lists them)",
                r.run
            )))
        }
        Some(None) => {
            return Err(fail(anyhow::anyhow!(
                "run {} was recorded without its invocation (by an older udos, `udos boot` or an agent): it cannot be rerun",
                r.run
            )))
        }
        Some(Some(json)) => json,
    };
    drop(store);
    let inv =
        udos_host_agent::rerun::Invocation::parse(r.run, &json).map_err(|e| fail(e.into()))?;
    let mut a: RunArgs = serde_json::from_value(inv.args.clone()).map_err(|e| {
        fail(
            udos_host_agent::rerun::RerunError::Unreadable {
                run: r.run,
                why: e.to_string(),
            }
            .into(),
        )
    })?;
    std::env::set_current_dir(&inv.cwd).map_err(|e| {
        fail(anyhow::anyhow!(
            "run {} ran in {}, which cannot be entered now: {e}",
            r.run,
            inv.cwd.display()
        ))
    })?;
    // The event payload as the run read it, whatever became of its file.
    let event_file = match &inv.event {
        Some(event) => {
            let f = tempfile::NamedTempFile::new().map_err(|e| fail(e.into()))?;
            std::fs::write(f.path(), serde_json::to_vec(event).unwrap_or_default())
                .map_err(|e| fail(e.into()))?;
            a.eventpath = Some(f.path().to_path_buf());
            Some(f)
        }
        None => None,
    };
    if let Some(job) = &r.job {
        a.job = vec![job.clone()];
    }
    a.json = r.json;
    a.no_console |= r.no_console;
    a.plain = r.plain;
    let attempt = Attempt {
        number: inv.attempt.saturating_add(1),
        from: r.from.map(|step| udos_host_agent::rerun::RerunFrom {
            job: r.job.clone(),
            step,
        }),
    };
    progress(&format!(
        "rerunning run {} (attempt {}) in {}",
        r.run,
        attempt.number,
        inv.cwd.display()
    ));
    let code = run(state, a, attempt);
    drop(event_file);
    code
}

/// `udos run`: plan (setup errors exit 2 before anything is built), then run.
fn run(state: &StateDir, a: RunArgs, attempt: Attempt) -> Result<ExitCode, SetupFailed> {
    // Read before the flags are taken apart; a flag it cannot read fails planning too.
    let recorded = invocation(&a, attempt.number).ok();
    let args = plan::PlanArgs {
        positionals: a.args,
        workflows: a.workflows,
        jobs: a.job,
        eventpath: a.eventpath,
        inputs: a.input,
        secrets: a.secret,
        secret_file: a.secret_file,
        vars: a.var,
        var_file: a.var_file,
        env_file: a.env_file,
        matrix: a.matrix,
        parallel: a.jobs,
        platforms: a.platform,
        memory_mib: a.memory,
        state_root: Some(state.root().to_path_buf()),
        list_only: a.list,
        actions_url: Some(a.actions_url),
        local_repositories: a.local_repository,
    };
    let (planned, set) = plan::plan(&args).map_err(SetupFailed)?;
    let mut req = match planned {
        plan::Planned::Run(req) => req,
        plan::Planned::Nothing(reasons) => {
            for r in &reasons {
                eprintln!("udos: not triggered: {r}");
            }
            if a.json {
                print_json(
                    &serde_json::json!({ "status": "skipped", "jobs": [], "notices": reasons }),
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    if a.list {
        let rows = plan::list(&set, &req.selection).map_err(SetupFailed)?;
        println!(
            "{:<6} {:<20} {:<24} {:<20} {:<32} EVENTS",
            "STAGE", "JOB ID", "JOB NAME", "WORKFLOW", "FILE"
        );
        for [stage, id, name, wf, file, events] in rows {
            println!("{stage:<6} {id:<20} {name:<24} {wf:<20} {file:<32} {events}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if a.dryrun {
        print!(
            "{}",
            plan::dry_run(&set, &req.selection).map_err(SetupFailed)?
        );
        return Ok(ExitCode::SUCCESS);
    }
    // Ctrl-C (or SIGTERM) cancels the run: its VMs are stopped, `always()` steps still
    // run, and the run is recorded as cancelled. A second one ends udos at once.
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, cancel.clone());
        let _ = signal_hook::flag::register(sig, cancel.clone());
    }
    let settings = runner::RunSettings {
        cpus: a.cpus,
        memory_mib: a.memory,
        step_timeout: Duration::from_secs(a.timeout.max(1)),
        stream_console: !a.no_console,
        cancel: Some(cancel),
        use_cache: !a.no_cache,
        rerun_from: attempt.from,
        squash: !a.no_squash,
        per: a.per,
        ..runner::RunSettings::default()
    };
    req.config.facts.run_attempt = attempt.number.to_string();
    let env = setup::prepare_env(state, a.kernel, choice(a.hypervisor), &progress)
        .map_err(SetupFailed)?;
    let mut settings = settings;
    settings.network = match a.network {
        NetworkArg::None => None,
        // A driver that gives VMs no network (both built-in ones do give one): its
        // steps run without one, and the run says so.
        NetworkArg::Nat if !env.hypervisor.has_network() => {
            if !a.host_port.is_empty() {
                return Err(SetupFailed(anyhow::anyhow!(
                    "--host-port needs a network, and {} gives steps none",
                    env.hypervisor.name()
                )));
            }
            progress(&format!("{} gives steps no network", env.hypervisor.name()));
            None
        }
        NetworkArg::Nat => Some(runner::nat_network(a.host_port.clone())),
    };
    if settings.per == runner::Per::Job && !env.hypervisor.has_channel() {
        return Err(SetupFailed(anyhow::anyhow!(
            "--per job needs a channel to the VM, and {} has none: use --hypervisor qemu (docs/job-mode.md)",
            env.hypervisor.name()
        )));
    }
    let store = Store::open(&state.db()).map_err(SetupFailed)?;
    settings.progress = udos_host_agent::progress::Progress::stderr(a.plain);
    let ran = runner::run(&env.prepared(state), store, *req, &settings);
    settings.progress.finish();
    let report = match ran {
        Ok(r) => r,
        Err(e) => {
            // The run began (and is recorded as `error`): a failed run, not a setup error.
            eprintln!("udos: error: {}", udos_host_agent::errors::describe(&e));
            return Ok(ExitCode::from(1));
        }
    };
    if let Some(json) = recorded {
        let stored = Store::open(&state.db()).and_then(|s| s.set_invocation(report.run_id, &json));
        if let Err(e) = stored {
            eprintln!(
                "udos: warning: run {} cannot be rerun: {e:#}",
                report.run_id
            );
        }
    }
    if a.json {
        print_json(&report);
    } else {
        print_run(&report);
    }
    Ok(if report.status == Conclusion::Success {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `udos diff`.
fn diff_command(
    state: &StateDir,
    from: &restore::Point<'_>,
    to: Option<&restore::Point<'_>>,
    json: bool,
) -> Result<ExitCode, SetupFailed> {
    let _lock = lock_for_reading(state)?;
    let store = Store::open(&state.db()).map_err(SetupFailed)?;
    let repo = Repo::from_env_or_default(state.root()).map_err(SetupFailed)?;
    let report = diff::diff(state, &store, &repo, from, to, &progress).map_err(SetupFailed)?;
    if json {
        print_json(&report);
    } else {
        print_diff(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_diff(r: &diff::DiffReport) {
    let side = |s: &diff::Side| {
        let at = match s.at {
            diff::At::Before => "before",
            diff::At::After => "after",
        };
        format!(
            "run {} job {} {at} step {}",
            s.run_id,
            udos_core::text::sanitize_for_terminal(&s.job),
            s.step
        )
    };
    println!("{} -> {}", side(&r.from), side(&r.to));
    let size = |n: Option<u64>| n.map(diff::human_bytes).unwrap_or_default();
    for e in &r.entries {
        let sizes = match e.change {
            diff::Change::Added => size(e.size_after),
            diff::Change::Deleted => size(e.size_before),
            diff::Change::Changed if e.size_before != e.size_after => {
                format!("{} -> {}", size(e.size_before), size(e.size_after))
            }
            diff::Change::Changed => size(e.size_after),
        };
        let path = udos_core::text::sanitize_for_terminal(&e.path);
        let dir = if e.kind == diff::Kind::Dir { "/" } else { "" };
        let line = format!("{}  {path}{dir}  {sizes}", e.change.letter());
        println!("{}", line.trim_end());
    }
    println!(
        "{} added ({}), {} changed, {} deleted ({})",
        r.added,
        diff::human_bytes(r.bytes_added),
        r.changed,
        r.deleted,
        diff::human_bytes(r.bytes_deleted)
    );
}

/// `udos export`.
fn export_command(
    state: &StateDir,
    point: &restore::Point<'_>,
    mode: export::Mode,
    output: &std::path::Path,
    json: bool,
) -> Result<ExitCode, SetupFailed> {
    let _lock = lock_for_reading(state)?;
    let store = Store::open(&state.db()).map_err(SetupFailed)?;
    let repo = Repo::from_env_or_default(state.root()).map_err(SetupFailed)?;
    let r = export::export(state, &store, &repo, point, mode, output, &progress)
        .map_err(SetupFailed)?;
    if json {
        print_json(&r);
    } else {
        let what = match r.mode {
            export::Mode::Layer => format!(
                "the layer {} of",
                short(r.layer_id.as_deref().unwrap_or("-"))
            ),
            export::Mode::Flatten => "the root after".to_string(),
        };
        println!(
            "wrote {what} run {} step {} to {} ({} entries, {}, sha256 {})",
            r.run_id,
            r.step,
            r.output,
            r.entries,
            diff::human_bytes(r.bytes),
            r.sha256
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `udos boot`: the terminal is attached to the VM; udos's own words go to stderr
/// before and after.
fn boot_command(
    state: &StateDir,
    point: &restore::Point<'_>,
    opts: &boot::BootOptions,
) -> Result<ExitCode, SetupFailed> {
    let _lock = lock_for_reading(state)?;
    let mut store = Store::open(&state.db()).map_err(SetupFailed)?;
    // Resolved first: a wrong RUN STEP is refused before any image work.
    restore::resolve(state, &store, point).map_err(SetupFailed)?;
    let env = setup::prepare_env(state, None, udos_vmm::HypervisorChoice::Qemu, &progress)
        .map_err(SetupFailed)?;
    // The terminal sends no signals while raw (Ctrl-C is a byte for the guest); a
    // signal from elsewhere stops the VM, so the terminal gets its settings back.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        let _ = signal_hook::flag::register(sig, stop.clone());
    }
    let attach = udos_vmm::Attach::stdio()
        .map_err(|e| SetupFailed(anyhow::anyhow!("attaching the terminal: {e}")))?;
    let report = match boot::boot(
        &env.prepared(state),
        &mut store,
        point,
        opts,
        attach,
        &stop,
        &progress,
    ) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("udos: error: {}", udos_host_agent::errors::describe(&e));
            return Ok(ExitCode::from(1));
        }
    };
    let ok = report.ended == boot::Ended::PoweredOff;
    if let Some(k) = &report.kept {
        progress(&format!(
            "kept as run {} step {} (layer {}, snapshot {}): `udos restore {} {} --target DIR`",
            k.run_id,
            k.step,
            short(&k.layer_id),
            short(&k.snapshot_id),
            k.run_id,
            k.step
        ));
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `udos gc`.
fn gc_command(state: &StateDir, opts: &gc::Options, json: bool) -> Result<ExitCode, SetupFailed> {
    // A dry run changes nothing, so it needs no lock (and tells what gc would do even
    // while runs are in progress).
    let _lock = match opts.dry_run {
        true => None,
        false => Some(state.lock_for_gc().map_err(SetupFailed)?),
    };
    let mut store = Store::open(&state.db()).map_err(SetupFailed)?;
    let repo = Repo::from_env_or_default(state.root()).map_err(SetupFailed)?;
    let r = gc::gc(state, &mut store, &repo, opts, &progress).map_err(SetupFailed)?;
    if json {
        print_json(&r);
    } else {
        print_gc(&r);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_gc(r: &gc::GcReport) {
    let verb = |done: &'static str, would: &'static str| if r.dry_run { would } else { done };
    let list = |ids: &[i64]| {
        ids.iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let kept: Vec<String> = r
        .kept_runs
        .iter()
        .map(|k| {
            let why = match &k.why {
                gc::KeepReason::All => "no --keep-last".to_string(),
                gc::KeepReason::Newest => "newest".to_string(),
                gc::KeepReason::Running => "running".to_string(),
                gc::KeepReason::Tagged(t) => format!("tagged {}", t.join(" ")),
                gc::KeepReason::TagUnknown(why) => format!("tag unknown: {why}"),
            };
            format!("{} ({why})", k.run_id)
        })
        .collect();
    println!("kept runs: {}", kept.join(", "));
    let removed: Vec<i64> = r.removed_runs.clone();
    println!(
        "{} runs: {}",
        verb("removed", "would remove"),
        if removed.is_empty() {
            "none".to_string()
        } else {
            list(&removed)
        }
    );
    println!(
        "{} {} snapshots, {} layer records and {} step cache entries",
        verb("forgot", "would forget"),
        r.forgotten_snapshots.len(),
        r.removed_layers.len(),
        r.cache_rows_removed
    );
    for f in &r.freed {
        let what = serde_json::to_value(f.what)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        println!(
            "  {what:<8} {:<14} {}",
            short(&f.id),
            diff::human_bytes(f.bytes)
        );
    }
    println!(
        "{} {} in the state dir",
        verb("freed", "would free"),
        diff::human_bytes(r.state_bytes_freed)
    );
    if let Some((before, after)) = r.repository_bytes {
        println!(
            "repository: {} -> {}",
            diff::human_bytes(before),
            diff::human_bytes(after)
        );
    }
    for n in &r.notes {
        println!("note: {n}");
    }
    if r.dry_run {
        println!("(dry run: nothing was changed)");
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}
