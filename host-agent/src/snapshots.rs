//! Layer snapshots off the critical path: one thread snapshots the layers, one at a
//! time, while the next step's VM runs. It first opens the repository (deriving its
//! key, creating it on first use) while the first VM boots, then writes each layer
//! through that one handle ([`crate::repository::LayerRepository`]) and returns its
//! full snapshot id: at the end of a run only the last layer's upload is left. With the
//! CLI engine ([`crate::repository::Engine::Cli`]) each layer is one `restic backup`.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::repository::{Engine, LayerRepository};
use crate::restic::{Repo, Tags};
use crate::state::StateDir;

/// File at the root of every layer snapshot describing the layer (its tags, as JSON).
/// It keeps a snapshot of an empty layer from being empty (restic refuses those);
/// restore drops it.
pub const LAYER_META: &str = ".udos-layer.json";

/// A layer to snapshot. `key` names the restore point (`base`, `workspace`,
/// `leg-1-step-3`): two steps that wrote the same bytes share a layer but each gets
/// its own snapshot with its own tags.
struct Job {
    key: String,
    dir: PathBuf,
    tags: Tags,
}

/// How one snapshot went.
#[derive(Debug)]
pub struct Done {
    /// The restore point's key.
    pub key: String,
    /// The full snapshot id, or why it failed.
    pub result: Result<String>,
    /// How long it took.
    pub took: Duration,
}

/// The snapshot thread.
pub struct Snapshotter {
    tx: mpsc::Sender<Job>,
    handle: JoinHandle<Vec<Done>>,
}

/// A handle legs use to queue snapshots (cheap to clone, usable from any thread).
#[derive(Clone)]
pub struct Queue(mpsc::Sender<Job>);

impl Queue {
    /// Queues a snapshot of `dir` under `key`.
    pub fn add(&self, key: String, dir: &Path, tags: Tags) {
        // The thread only stops after `finish`, which consumes the sender's owner.
        let _ = self.0.send(Job {
            key,
            dir: dir.to_path_buf(),
            tags,
        });
    }
}

/// What writes the snapshots.
enum Writer {
    /// The run's repository handle.
    Rustic(Box<LayerRepository>),
    /// One `restic backup` per layer.
    Cli(Repo),
}

impl Writer {
    /// Opens the repository the way `repo.engine` says.
    fn open(repo: &Repo) -> Result<Writer> {
        match repo.engine {
            Engine::Rustic => {
                let dir = repo
                    .local_dir()
                    .context("the rustic engine needs a local repository")?;
                let t = Instant::now();
                let handle = LayerRepository::open(&dir, &repo.password)?;
                tracing::info!(took_ms = t.elapsed().as_millis() as u64, repository = %dir.display(), "repository opened");
                Ok(Writer::Rustic(Box::new(handle)))
            }
            Engine::Cli => Ok(Writer::Cli(repo.clone())),
        }
    }

    /// Snapshots `dir` with `tags`; the full id.
    fn backup(&self, dir: &Path, tags: &Tags) -> Result<String> {
        match self {
            Writer::Rustic(r) => Ok(r.backup(dir, tags)?),
            Writer::Cli(repo) => repo.backup_full(dir, tags),
        }
    }
}

/// Write the layer's description, then back it up, under the layer's lock: the
/// description is per restore point and the directory is shared by every run that made
/// the same layer, so two runs must not describe it at once.
fn snapshot_layer(writer: &Writer, state: &StateDir, job: &Job) -> Result<String> {
    let layer = job
        .tags
        .0
        .iter()
        .find(|(k, _)| k == "layer")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| job.key.clone());
    let _lock = state.lock_layer(&layer)?;
    let meta: serde_json::Map<String, serde_json::Value> = job
        .tags
        .0
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    std::fs::write(job.dir.join(LAYER_META), serde_json::to_vec_pretty(&meta)?)
        .with_context(|| format!("describing layer {}", job.dir.display()))?;
    writer.backup(&job.dir, &job.tags)
}

impl Snapshotter {
    /// Starts the thread, which opens the repository at once (with the engine
    /// `repo.engine` names; the CLI engine is said on stderr).
    pub fn start(repo: Repo, state: StateDir) -> Result<Snapshotter> {
        if repo.engine == Engine::Cli {
            eprintln!(
                "udos: layer snapshots through {} (repository {})",
                repo.engine.describe(),
                repo.location
            );
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new()
            .name("snapshots".into())
            .spawn(move || {
                // If the repository cannot be opened, every layer says why.
                let writer = Writer::open(&repo).map_err(|e| crate::errors::describe(&e));
                rx.into_iter()
                    .map(|j| {
                        let t = Instant::now();
                        let result = match &writer {
                            Ok(w) => snapshot_layer(w, &state, &j),
                            Err(e) => Err(anyhow::anyhow!("{e}")),
                        };
                        Done {
                            key: j.key,
                            result,
                            took: t.elapsed(),
                        }
                    })
                    .collect()
            })
            .context("starting the snapshot thread")?;
        Ok(Snapshotter { tx, handle })
    }

    /// A queue for legs.
    pub fn queue(&self) -> Queue {
        Queue(self.tx.clone())
    }

    /// Waits for every queued snapshot (every [`Queue`] must be dropped first).
    pub fn finish(self) -> Vec<Done> {
        drop(self.tx);
        self.handle.join().unwrap_or_default()
    }
}
