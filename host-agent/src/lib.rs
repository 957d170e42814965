//! The udos host agent: everything between the `udos` command line and the step VMs.
//!
//! - [`actions`]: actions of other repositories, fetched and pinned before the run;
//! - [`setup`]: find or build what a run needs (image, base layer, hypervisor, repository);
//! - [`plan`]: read the workflows and what they refer to, pick the event's jobs;
//! - [`runner`]: drive the engine: each job leg on its own thread ([`leg`]), each step
//!   in its own VM ([`step_vm`]), layers snapshotted off the critical path ([`snapshots`]);
//! - [`repo`], [`request`]: what git and the flags say about the run; [`report`]: its JSON;
//! - [`workspace`]: the git working tree as the workspace layer;
//! - [`restic`], [`repository`]: the restic repository (CLI) and the run's long-lived
//!   handle on it that writes the layer snapshots;
//! - [`store`]: runs, steps and layers in SQLite;
//! - [`restore`]: the root as a step left it, from the snapshots;
//! - [`boot`]: a VM on a restore point with a shell on the terminal, kept as a new one;
//! - [`diff`], [`export`]: what a step changed; a restore point as an OCI layer tar;
//! - [`squash_tag`]: a job's final root on a tagged commit as a base later runs use;
//! - [`gc`]: keep the runs that matter, free what only the others needed;
//! - [`bench`]: per-phase figures against act on the host;
//! - [`state`]: the state directory layout;
//! - [`cluster`]: the master, the worker agent and the cluster CLI.

pub mod actions;
pub mod bench;
pub mod boot;
pub mod cache;
pub mod cluster;
pub mod diff;
pub mod errors;
pub mod export;
pub mod gc;
pub mod git_scrub;
pub mod hashfiles;
pub mod job_vm;
pub mod leg;
pub mod plan;
pub mod proc;
pub mod progress;
pub mod repo;
pub mod report;
pub mod repository;
pub mod request;
pub mod rerun;
pub mod restic;
pub mod restore;
pub mod runner;
pub mod setup;
pub mod snapshots;
pub mod squash_tag;
pub mod state;
pub mod step_vm;
pub mod store;
pub mod workspace;
