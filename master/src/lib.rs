//! The udos master: Git is the only write interface; CI publishes the desired state
//! of a built commit, the master numbers it as a generation, schedules it on the live
//! workers, and the workers pull their assignments and report heartbeats.
//! Contract: docs/master-api.md; OpenAPI: docs/openapi.yaml.
//!
//! - [`store`]: durable state ([`store::Store`], [`store::SqliteStore`]).
//! - [`server`]: the HTTP API ([`server::serve`], [`server::start`], [`server::spawn`]).
//! - [`status`]: the convergence report, a pure function.
//! - [`client`]: a blocking client of the API, for the CLI and the worker agent.
//! - [`signing`]: signed intent (ed25519).
//! - [`api`]: the answers not defined in `udos_core::wire`.

pub mod api;
pub mod client;
pub mod server;
pub mod signing;
pub mod status;
pub mod store;
pub mod time;
pub mod token;

pub use client::{Client, ClientError};
pub use server::{
    serve, spawn, start, BackgroundServer, Limits, RunningServer, ServeConfig, DEFAULT_LEASE,
};
