//! The udos host agent: everything between the `udos` command line and the step VMs.
//!
//! - [`setup`]: find or build what a run needs (image, base layer, hypervisor, repository);
//! - [`runner`]: run a job, one VM per step, chaining layers;
//! - [`workspace`]: the git working tree as the workspace layer;
//! - [`restic`]: layer snapshots in a restic repository;
//! - [`store`]: runs, steps and layers in SQLite;
//! - [`restore`]: the root as a step left it, from the snapshots;
//! - [`bench`]: per-phase figures against act on the host;
//! - [`state`]: the state directory layout;
//! - [`cluster`]: the master, the worker agent and the cluster CLI.

pub mod bench;
pub mod cluster;
pub mod restic;
pub mod restore;
pub mod runner;
pub mod setup;
pub mod state;
pub mod store;
pub mod workspace;
