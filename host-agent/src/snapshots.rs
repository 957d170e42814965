//! Layer snapshots off the critical path: one thread snapshots the layers, one at a
//! time, while the next step's VM runs. It opens the repository (deriving its key,
//! creating it on first use) only once a run has something to write: when the first
//! VM is about to boot ([`Queue::warm`]) or a layer is queued, so a run whose steps all
//! come from the step cache derives no key at all. Then it writes each layer
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

/// What legs send the snapshot thread.
enum Msg {
    /// A VM is about to boot: open the repository now, while it boots.
    Warm,
    /// A layer to snapshot.
    Layer(Job),
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
    tx: mpsc::Sender<Msg>,
    handle: JoinHandle<Vec<Done>>,
}

/// A handle legs use to queue snapshots (cheap to clone, usable from any thread).
#[derive(Clone)]
pub struct Queue(mpsc::Sender<Msg>);

impl Queue {
    /// Queues a snapshot of `dir` under `key`.
    pub fn add(&self, key: String, dir: &Path, tags: Tags) {
        // The thread only stops after `finish`, which consumes the sender's owner.
        let _ = self.0.send(Msg::Layer(Job {
            key,
            dir: dir.to_path_buf(),
            tags,
        }));
    }

    /// Says a VM is about to boot, so the repository is opened while it boots rather
    /// than after it, when its layer is queued.
    pub fn warm(&self) {
        let _ = self.0.send(Msg::Warm);
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
    /// Starts the thread, which opens the repository (with the engine `repo.engine`
    /// names; the CLI engine is said on stderr) once the first message asks for it.
    pub fn start(repo: Repo, state: StateDir) -> Result<Snapshotter> {
        Snapshotter::start_with(repo, state, |_| {})
    }

    /// [`Snapshotter::start`], calling `on_done` on the thread as each snapshot ends
    /// (the progress display shows which layers are still being written).
    pub fn start_with(
        repo: Repo,
        state: StateDir,
        on_done: impl Fn(&Done) + Send + 'static,
    ) -> Result<Snapshotter> {
        if repo.engine == Engine::Cli {
            eprintln!(
                "udos: layer snapshots through {} (repository {})",
                repo.engine.describe(),
                repo.location
            );
        }
        let (tx, rx) = mpsc::channel::<Msg>();
        let handle = std::thread::Builder::new()
            .name("snapshots".into())
            .spawn(move || {
                // Opened on the first message; if it cannot be, every layer says why.
                let mut writer: Option<Result<Writer, String>> = None;
                let mut done = Vec::new();
                for msg in rx {
                    let w = writer.get_or_insert_with(|| {
                        Writer::open(&repo).map_err(|e| crate::errors::describe(&e))
                    });
                    let Msg::Layer(j) = msg else { continue };
                    let t = Instant::now();
                    let result = match w {
                        Ok(w) => snapshot_layer(w, &state, &j),
                        Err(e) => Err(anyhow::anyhow!("{e}")),
                    };
                    let d = Done {
                        key: j.key,
                        result,
                        took: t.elapsed(),
                    };
                    on_done(&d);
                    done.push(d);
                }
                done
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restic::Password;

    fn queue_layers(snapshotter: &Snapshotter, state: &StateDir, n: usize) {
        let queue = snapshotter.queue();
        for i in 0..n {
            let id = format!("layer{i}");
            let dir = state.layer_dir(&id);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("file"), format!("{i}")).unwrap();
            let tags = Tags::default().with("udos", "layer").with("layer", &id);
            queue.add(format!("key{i}"), &dir, tags);
        }
    }

    /// Both engines return, per queued layer in order, the full id of a snapshot
    /// `restic snapshots` lists with the layer's tags.
    #[test]
    fn every_queued_layer_comes_back_with_its_full_snapshot_id() {
        for engine in [Engine::Rustic, Engine::Cli] {
            let tmp = tempfile::tempdir().unwrap();
            let state = StateDir::resolve(Some(&tmp.path().join("state"))).unwrap();
            let repo = Repo {
                engine,
                ..Repo::new(
                    tmp.path().join("repo").display().to_string(),
                    Password::Env("pw".into()),
                )
            };
            if engine == Engine::Cli {
                repo.ensure_initialized().unwrap();
            }
            let snapshotter = Snapshotter::start(repo.clone(), state.clone()).unwrap();
            queue_layers(&snapshotter, &state, 3);
            let done = snapshotter.finish();
            let keys: Vec<&str> = done.iter().map(|d| d.key.as_str()).collect();
            assert_eq!(keys, ["key0", "key1", "key2"], "{engine:?}");
            let listed = repo.snapshots(&[]).unwrap();
            for (i, d) in done.iter().enumerate() {
                let id = d.result.as_ref().unwrap();
                let snap = listed.iter().find(|s| &s.id == id).unwrap();
                assert!(snap.tags.contains(&format!("layer=layer{i}")), "{engine:?}");
            }
        }
    }

    /// A repository the handle cannot open (wrong password) fails every layer with
    /// the reason, rather than falling back to another path.
    #[test]
    fn a_repository_that_cannot_be_opened_fails_every_layer_with_the_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::resolve(Some(&tmp.path().join("state"))).unwrap();
        let location = tmp.path().join("repo").display().to_string();
        LayerRepository::open(Path::new(&location), &Password::Env("right".into())).unwrap();
        let repo = Repo::new(location, Password::Env("wrong".into()));
        assert_eq!(repo.engine, Engine::Rustic);
        let snapshotter = Snapshotter::start(repo, state.clone()).unwrap();
        queue_layers(&snapshotter, &state, 2);
        let done = snapshotter.finish();
        assert_eq!(done.len(), 2);
        for d in done {
            let e = format!("{:#}", d.result.unwrap_err());
            assert!(e.contains("RESTIC_PASSWORD"), "{e}");
        }
    }
}
