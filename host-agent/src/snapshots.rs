//! Layer snapshots off the critical path: one thread runs `restic backup` per layer,
//! one at a time, while the next step's VM runs; full ids are resolved once at the end.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

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
    /// The short snapshot id, or why it failed.
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

/// Write the layer's description, then back it up, under the layer's lock: the
/// description is per restore point and the directory is shared by every run that made
/// the same layer, so two runs must not describe it at once.
fn snapshot_layer(repo: &Repo, state: &StateDir, job: &Job) -> Result<String> {
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
    repo.backup(&job.dir, &job.tags)
}

impl Snapshotter {
    /// Starts the thread.
    pub fn start(repo: Repo, state: StateDir) -> Result<Snapshotter> {
        let (tx, rx) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new()
            .name("snapshots".into())
            .spawn(move || {
                rx.into_iter()
                    .map(|j| {
                        let t = Instant::now();
                        let result = snapshot_layer(&repo, &state, &j);
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
