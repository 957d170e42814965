//! `udos gc [--keep-last N] [--keep-tagged] [--dry-run]`: keep the runs that matter,
//! and free what only the others needed: their rows, their restic snapshots (forgotten,
//! then pruned), their layers and images in the state dir. docs/restore-points.md.
//!
//! The rules, conservative by design (when in doubt, keep):
//!
//! - Kept runs: the newest N (all runs without `--keep-last`), every run still
//!   `running` (it may be in progress), and with `--keep-tagged` every run whose
//!   workspace commit carries a git tag, or whose commit cannot be told.
//! - A layer is needed when a kept run names it (an input, or a step's layer). Only
//!   `step` and `workspace` layers are ever evicted: base layers, and any kind a newer
//!   udos records (squashed bases), stay with their snapshots. Squashed leg layers
//!   (`layers/squash-*`) are caches rebuilt when needed, and go, unless a run is in
//!   progress. Layers the database does not know are kept (another process may be
//!   making them). Step cache rows naming an evicted layer are deleted.
//! - A snapshot is forgotten only when the database names it (a step's or a layer's)
//!   and nothing kept needs it: a kept run's steps, or a layer that stays. Snapshots
//!   the database does not name (another state dir's, say) are never touched.
//! - Guest images and base layers in `images/` go when they are not the current ones
//!   and no kept run booted or stacked them.
//! - A squashed base (crate::squash_tag) stays, with its snapshot, while a tag it was
//!   made at still names its commit in the workspace repository (or git cannot tell),
//!   while a kept run used it, and while a run is in progress; otherwise it goes like
//!   an evicted layer: its directory, its snapshot, its rows.
//! - Action trees in `actions/` go when no kept run's report names them and no ref
//!   is pinned to them now (`pins.json`), unless a run is in progress or a kept run
//!   has no report to tell; the store's scratch (`actions/.staging`) goes with them.
//!
//! Order: forget, then remove the files, then delete the rows, then prune. Stopped
//! half way, nothing kept is damaged, and the next gc finishes the job.
//!
//! gc runs only while no run uses the state dir: `udos gc` holds the state dir's lock
//! exclusive ([`crate::state::StateLock`]; runs hold it shared), so a run still
//! `running` in the database here is one that ended without a word.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::actions::ActionStore;
use crate::restic::{Repo, SnapshotInfo};
use crate::state::StateDir;
use crate::store::{LayerRow, RunRow, Store};

/// What to keep, and whether to change anything.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Keep the newest N runs (`None`: every run).
    pub keep_last: Option<usize>,
    /// Keep runs whose workspace commit carries a git tag.
    pub keep_tagged: bool,
    /// Only say what would be freed.
    pub dry_run: bool,
}

/// Why a run is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason", content = "detail")]
pub enum KeepReason {
    /// No `--keep-last`: every run is kept.
    All,
    /// Among the newest N.
    Newest,
    /// Still `running`: in progress, or ended without a word.
    Running,
    /// Its workspace commit carries these tags.
    Tagged(Vec<String>),
    /// `--keep-tagged` and its commit cannot be told.
    TagUnknown(String),
}

/// A run gc keeps.
#[derive(Debug, Clone, Serialize)]
pub struct Kept {
    /// Run number.
    pub run_id: i64,
    /// Why.
    #[serde(flatten)]
    pub why: KeepReason,
}

/// Something removed from the state dir.
#[derive(Debug, Clone, Serialize)]
pub struct Freed {
    /// What it was: `layer`, `squash`, `image`, `base`, `squashed-base`, `run-dir`,
    /// `action`.
    pub what: What,
    /// Its id (run number for a run dir).
    pub id: String,
    /// Bytes on disk that removing it frees (hardlinked files count where their last
    /// link goes).
    pub bytes: u64,
}

/// The kinds of things gc removes from the state dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum What {
    /// A step or workspace layer (`layers/<id>`, `layers/<id>.erofs`).
    Layer,
    /// A squashed leg layer (`layers/squash-*`).
    Squash,
    /// A guest image (`images/<id>`).
    Image,
    /// A base layer (`images/base/<id>`).
    Base,
    /// A squashed base (`images/base/<id>`, crate::squash_tag).
    SquashedBase,
    /// A removed run's VM directories (`runs/<run>`).
    RunDir,
    /// An action tree in the action store (`actions/<owner>/<repo>/<commit>`,
    /// `actions/.local/<sha256>`), or the store's scratch (`actions/.staging`).
    Action,
}

/// What gc did (or, with `--dry-run`, would do).
#[derive(Debug, Clone, Serialize)]
pub struct GcReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Runs kept, and why.
    pub kept_runs: Vec<Kept>,
    /// Runs removed.
    pub removed_runs: Vec<i64>,
    /// Layer rows removed (with their step cache rows).
    pub removed_layers: Vec<String>,
    /// Step cache rows removed.
    pub cache_rows_removed: u64,
    /// Restic snapshots forgotten (full ids).
    pub forgotten_snapshots: Vec<String>,
    /// What left the state dir.
    pub freed: Vec<Freed>,
    /// Sum of `freed`.
    pub state_bytes_freed: u64,
    /// Size of a local repository before and after (none for a remote one, or a dry run).
    pub repository_bytes: Option<(u64, u64)>,
    /// What the user should know.
    pub notes: Vec<String>,
}

/// A run as gc sees it.
#[derive(Debug, Clone)]
struct RunFacts {
    row: RunRow,
    image: String,
    inputs: Vec<(String, String)>,
    /// (layer, snapshot) of each step.
    steps: Vec<(Option<String>, Option<String>)>,
    /// The action trees its steps used ([`ActionStore::tree_key`]); `None` when it
    /// has no report to tell.
    actions: Option<BTreeSet<String>>,
}

impl RunFacts {
    fn layers(&self) -> impl Iterator<Item = &String> {
        self.inputs
            .iter()
            .map(|(_, l)| l)
            .chain(self.steps.iter().filter_map(|(l, _)| l.as_ref()))
    }

    fn workspace(&self) -> Option<&str> {
        self.inputs
            .iter()
            .find(|(k, _)| k == "workspace")
            .map(|(_, l)| l.as_str())
    }
}

/// A squashed base as gc sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Squashed {
    layer_id: String,
    /// Why its tag keeps it (a tag still names its commit, or git cannot tell), if it
    /// does.
    tag_keeps: Option<String>,
}

/// What is on disk in the state dir.
#[derive(Debug, Clone, Default)]
struct OnDisk {
    /// Ids of complete or partial layers in `layers/` (from `<id>` and `<id>.erofs`).
    layers: BTreeSet<String>,
    /// Image ids in `images/`.
    images: BTreeSet<String>,
    /// Base layer ids in `images/base/`.
    bases: BTreeSet<String>,
    current_image: Option<String>,
    current_base: Option<String>,
    /// Run numbers with a directory in `runs/`.
    run_dirs: BTreeSet<i64>,
    /// The action store's trees, by key.
    actions: BTreeSet<String>,
    /// The trees the store's refs are pinned to now.
    pinned_actions: BTreeSet<String>,
    /// The action store has a scratch directory.
    action_scratch: bool,
}

/// What gc will remove.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Plan {
    kept: Vec<(i64, KeepReason)>,
    removed_runs: Vec<i64>,
    removed_layers: Vec<String>,
    forget: Vec<String>,
    evict_layers: Vec<(What, String)>,
    evict_images: Vec<String>,
    evict_bases: Vec<String>,
    evict_squashed: Vec<String>,
    run_dirs: Vec<i64>,
    evict_actions: Vec<String>,
    notes: Vec<String>,
}

/// The layer kinds gc may evict; every other kind is kept.
const EVICTABLE_KINDS: [&str; 2] = ["step", "workspace"];

/// Which runs to keep. `tags` tells a run's tags (`Err`: cannot be told).
fn keep_runs(
    runs: &[RunFacts],
    opts: &Options,
    tags: &dyn Fn(&RunFacts) -> std::result::Result<Vec<String>, String>,
) -> Vec<(i64, Option<KeepReason>)> {
    let mut newest: Vec<i64> = runs.iter().map(|r| r.row.run_id).collect();
    newest.sort_unstable_by(|a, b| b.cmp(a));
    let newest: BTreeSet<i64> = match opts.keep_last {
        Some(n) => newest.into_iter().take(n).collect(),
        None => newest.into_iter().collect(),
    };
    runs.iter()
        .map(|r| {
            let id = r.row.run_id;
            let why = if newest.contains(&id) {
                Some(match opts.keep_last {
                    None => KeepReason::All,
                    Some(_) => KeepReason::Newest,
                })
            } else if r.row.status == "running" {
                Some(KeepReason::Running)
            } else if opts.keep_tagged {
                match tags(r) {
                    Ok(t) if t.is_empty() => None,
                    Ok(t) => Some(KeepReason::Tagged(t)),
                    Err(why) => Some(KeepReason::TagUnknown(why)),
                }
            } else {
                None
            };
            (id, why)
        })
        .collect()
}

/// The plan, from what the store, the repository and the state dir hold (pure).
fn plan(
    runs: &[RunFacts],
    keep: &[(i64, Option<KeepReason>)],
    layers: &[LayerRow],
    snapshots: &[SnapshotInfo],
    disk: &OnDisk,
    squashed: &[Squashed],
) -> Plan {
    let kept_ids: BTreeSet<i64> = keep
        .iter()
        .filter(|(_, w)| w.is_some())
        .map(|(id, _)| *id)
        .collect();
    let kept: Vec<&RunFacts> = runs
        .iter()
        .filter(|r| kept_ids.contains(&r.row.run_id))
        .collect();
    let in_progress: Vec<&RunFacts> = kept
        .iter()
        .copied()
        .filter(|r| r.row.status == "running")
        .collect();
    // Layers recorded since the oldest run in progress began may be its own, not yet
    // named by its steps.
    let progress_since = in_progress.iter().map(|r| r.row.started_at.as_str()).min();

    let needed: BTreeSet<&String> = kept.iter().flat_map(|r| r.layers()).collect();
    // Squashed bases no tag, kept run or run in progress needs.
    let dropped_squashed: BTreeSet<&String> = squashed
        .iter()
        .filter(|s| s.tag_keeps.is_none() && !needed.contains(&s.layer_id))
        .filter(|_| in_progress.is_empty())
        .map(|s| &s.layer_id)
        .collect();
    let all_squashed: BTreeSet<&String> = squashed.iter().map(|s| &s.layer_id).collect();
    let removed_layers: Vec<String> = layers
        .iter()
        .filter(|l| {
            (EVICTABLE_KINDS.contains(&l.kind.as_str()) || dropped_squashed.contains(&l.id))
                && !needed.contains(&l.id)
        })
        .filter(|l| progress_since.is_none_or(|t| l.created_at.as_str() < t))
        .map(|l| l.id.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let removed_set: BTreeSet<&String> = removed_layers.iter().collect();

    let mut needed_snaps: BTreeSet<&String> = kept
        .iter()
        .flat_map(|r| r.steps.iter().filter_map(|(_, s)| s.as_ref()))
        .collect();
    needed_snaps.extend(
        layers
            .iter()
            .filter(|l| !removed_set.contains(&l.id))
            .filter_map(|l| l.snapshot_id.as_ref()),
    );
    let mut known: BTreeSet<&String> = runs
        .iter()
        .flat_map(|r| r.steps.iter().filter_map(|(_, s)| s.as_ref()))
        .collect();
    known.extend(layers.iter().filter_map(|l| l.snapshot_id.as_ref()));
    let forget: Vec<String> = snapshots
        .iter()
        .filter(|s| known.contains(&s.id) && !needed_snaps.contains(&s.id))
        .map(|s| s.id.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();

    let mut evict_layers = Vec::new();
    for id in &disk.layers {
        if id.starts_with("squash-") {
            if in_progress.is_empty() {
                evict_layers.push((What::Squash, id.clone()));
            }
        } else if removed_set.contains(id) {
            evict_layers.push((What::Layer, id.clone()));
        }
    }
    let kept_images: BTreeSet<&String> = kept.iter().map(|r| &r.image).collect();
    let evict_images = disk
        .images
        .iter()
        .filter(|i| !kept_images.contains(i) && disk.current_image.as_ref() != Some(*i))
        .cloned()
        .collect();
    let kept_bases: BTreeSet<&String> = kept
        .iter()
        .flat_map(|r| r.inputs.iter().filter(|(k, _)| k == "base").map(|(_, l)| l))
        .collect();
    let evict_bases = disk
        .bases
        .iter()
        .filter(|b| !all_squashed.contains(b))
        .filter(|b| !kept_bases.contains(b) && disk.current_base.as_ref() != Some(*b))
        .cloned()
        .collect();
    let evict_squashed = disk
        .bases
        .iter()
        .filter(|b| dropped_squashed.contains(b))
        .cloned()
        .collect();
    let removed_runs: BTreeSet<i64> = runs
        .iter()
        .map(|r| r.row.run_id)
        .filter(|id| !kept_ids.contains(id))
        .collect();
    let run_dirs = removed_runs
        .iter()
        .copied()
        .filter(|id| disk.run_dirs.contains(id))
        .collect();
    let evict_actions = if in_progress.is_empty() {
        evict_actions(&kept, disk)
    } else {
        Vec::new()
    };
    let mut notes = Vec::new();
    for s in squashed {
        if let Some(why) = &s.tag_keeps {
            notes.push(format!(
                "squashed base {} kept: {why}",
                &s.layer_id[..s.layer_id.len().min(12)]
            ));
        }
    }
    if !in_progress.is_empty() {
        notes.push(format!(
            "run(s) {} are still `running`: kept, with every layer recorded since they began, every squashed layer and every action",
            in_progress
                .iter()
                .map(|r| r.row.run_id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let mut kept: Vec<(i64, KeepReason)> = keep
        .iter()
        .filter_map(|(id, w)| w.clone().map(|w| (*id, w)))
        .collect();
    kept.sort_by_key(|(id, _)| *id);
    Plan {
        kept,
        removed_runs: removed_runs.into_iter().collect(),
        removed_layers,
        forget,
        evict_layers,
        evict_images,
        evict_bases,
        evict_squashed,
        run_dirs,
        evict_actions,
        notes,
    }
}

/// The action trees no kept run used and no ref is pinned to, and the store's
/// scratch. When a kept run cannot tell what it used, every tree stays.
fn evict_actions(kept: &[&RunFacts], disk: &OnDisk) -> Vec<String> {
    let mut used: BTreeSet<&String> = disk.pinned_actions.iter().collect();
    for r in kept {
        match &r.actions {
            Some(a) => used.extend(a),
            None => return Vec::new(),
        }
    }
    let mut evict: Vec<String> = disk
        .actions
        .iter()
        .filter(|k| !used.contains(k))
        .cloned()
        .collect();
    if disk.action_scratch {
        evict.push(ACTION_SCRATCH.to_string());
    }
    evict
}

/// The key [`What::Action`] gives the action store's scratch directory.
const ACTION_SCRATCH: &str = ".staging";

/// The action trees a run report names: each step's `actions` (`uses`, `sha`,
/// `local`), wherever they sit in the report. `None` when the report is not JSON.
fn report_actions(report: &str) -> Option<BTreeSet<String>> {
    let json: serde_json::Value = serde_json::from_str(report).ok()?;
    let mut keys = BTreeSet::new();
    let mut todo = vec![&json];
    while let Some(v) = todo.pop() {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::Array(actions)) = m.get("actions") {
                    keys.extend(actions.iter().filter_map(action_key));
                }
                todo.extend(m.values());
            }
            serde_json::Value::Array(a) => todo.extend(a),
            _ => {}
        }
    }
    Some(keys)
}

/// The tree key of one recorded action (`{"uses", "sha", "local"}`).
fn action_key(a: &serde_json::Value) -> Option<String> {
    let uses = a.get("uses")?.as_str()?;
    let sha = a.get("sha")?.as_str()?;
    let local = a.get("local").is_some_and(|l| !l.is_null());
    ActionStore::tree_key(uses, sha, local)
}

/// How long a git query for a run's tags may take.
const GIT_LIMIT: Duration = Duration::from_secs(60);

fn git(git_dir: &Path, args: &[&str]) -> Result<String> {
    let mut full: Vec<String> = vec![
        "-c".into(),
        "core.fsmonitor=".into(),
        format!("--git-dir={}", git_dir.display()),
    ];
    full.extend(args.iter().map(|a| a.to_string()));
    let e = duct::cmd("git", full).stdin_null().unchecked();
    let out = crate::proc::run_bounded(&e.stdout_capture().stderr_capture(), GIT_LIMIT, "git")?;
    anyhow::ensure!(
        out.status.success(),
        "git {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The tags on a run's workspace commit: the commit is HEAD of the repository in the
/// run's workspace layer; its tags are those of that repository and of the repository
/// the workflow is in now (tags made since count). `Err` when it cannot be told.
fn run_tags(state: &StateDir, run: &RunFacts) -> std::result::Result<Vec<String>, String> {
    let ws = run
        .workspace()
        .ok_or("the run records no workspace layer")?;
    let layer = state.layer_dir(ws);
    if !layer.is_dir() {
        return Err(format!(
            "its workspace layer {} is no longer in the state dir",
            &ws[..ws.len().min(12)]
        ));
    }
    let git_dir = layer.join("workspace/.git");
    if git_dir.symlink_metadata().is_err() {
        // Not a git working tree: no commit, so no tag.
        return Ok(Vec::new());
    }
    let commit = git(&git_dir, &["rev-parse", "--verify", "-q", "HEAD^{commit}"])
        .map_err(|e| format!("its workspace commit: {e:#}"))?;
    let mut tags: BTreeSet<String> = BTreeSet::new();
    let list = |dir: &Path| -> Result<Vec<String>> {
        Ok(git(dir, &["tag", "--points-at", &commit])?
            .lines()
            .map(str::to_string)
            .filter(|t| !t.is_empty())
            .collect())
    };
    tags.extend(list(&git_dir).map_err(|e| format!("{e:#}"))?);
    let live = Path::new(&run.row.workflow)
        .parent()
        .map(|d| duct::cmd!("git", "rev-parse", "--absolute-git-dir").dir(d));
    if let Some(Ok(dir)) = live.map(|e| crate::proc::read_bounded(&e.unchecked(), GIT_LIMIT, "git"))
    {
        if !dir.is_empty() {
            tags.extend(list(Path::new(&dir)).unwrap_or_default());
        }
    }
    Ok(tags.into_iter().collect())
}

/// Whether the tags of a squashed base's rows keep it: one still names its commit in
/// the repository it was made in, or git cannot tell (when in doubt, keep).
fn squashed_facts(store: &Store) -> Result<Vec<Squashed>> {
    let mut by_layer: std::collections::BTreeMap<String, Option<String>> = Default::default();
    for row in store.squashed_bases()? {
        let keeps = by_layer.entry(row.layer_id.clone()).or_default();
        if keeps.is_some() {
            continue;
        }
        for t in &row.tags {
            match crate::repo::tag_names(Path::new(&row.repo), t, &row.commit) {
                Some(true) => *keeps = Some(format!("tag {t} still names its commit")),
                Some(false) => continue,
                None => {
                    *keeps = Some(format!(
                        "cannot tell whether tag {t} still names its commit in {}",
                        row.repo
                    ))
                }
            }
            break;
        }
    }
    Ok(by_layer
        .into_iter()
        .map(|(layer_id, tag_keeps)| Squashed {
            layer_id,
            tag_keeps,
        })
        .collect())
}

fn facts(store: &Store) -> Result<Vec<RunFacts>> {
    let images: HashMap<i64, String> = store.run_images()?.into_iter().collect();
    store
        .runs()?
        .into_iter()
        .map(|row| {
            let id = row.run_id;
            Ok(RunFacts {
                image: images.get(&id).cloned().unwrap_or_default(),
                inputs: store
                    .inputs(id)?
                    .into_iter()
                    .map(|i| (i.kind, i.layer_id))
                    .collect(),
                steps: store
                    .steps(id)?
                    .into_iter()
                    .map(|s| (s.layer_id, s.snapshot_id))
                    .collect(),
                actions: store.run_report(id)?.and_then(|r| report_actions(&r)),
                row,
            })
        })
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn is_hex_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn read_id(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn on_disk(state: &StateDir) -> OnDisk {
    let mut layers = BTreeSet::new();
    for n in names(&state.layers_dir()) {
        // `<id>.<random>.tmp` (being unpacked) and `<id>.lock` are not layers.
        let id = n.strip_suffix(".erofs").unwrap_or(&n);
        if !id.contains('.') {
            layers.insert(id.to_string());
        }
    }
    let images = state.images_dir();
    let action_store = ActionStore::new(state.root());
    OnDisk {
        layers,
        images: names(&images)
            .into_iter()
            .filter(|n| is_hex_id(n))
            .collect(),
        bases: names(&images.join("base"))
            .into_iter()
            .filter(|n| is_hex_id(n))
            .collect(),
        current_image: read_id(&images.join("current")),
        current_base: read_id(&images.join("base/current")),
        run_dirs: names(&state.root().join("runs"))
            .into_iter()
            .filter_map(|n| n.parse().ok())
            .collect(),
        actions: action_store.stored_trees(),
        pinned_actions: action_store.pinned_trees(),
        action_scratch: action_store.staging_dir().exists(),
    }
}

/// Bytes on disk that removing every path in `paths` frees: a file's blocks count
/// once, and only when all its links are among the paths (a squashed layer shares its
/// files with the step layers it was made from).
fn freed_bytes(paths: &[PathBuf]) -> u64 {
    // (dev, ino) -> (bytes, links, links seen, is a directory)
    let mut inodes: HashMap<(u64, u64), (u64, u64, u64, bool)> = HashMap::new();
    let mut todo: Vec<PathBuf> = paths.to_vec();
    while let Some(p) = todo.pop() {
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let e = inodes.entry((md.dev(), md.ino())).or_insert((
            md.blocks() * 512,
            md.nlink(),
            0,
            md.is_dir(),
        ));
        e.2 += 1;
        if md.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                todo.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        }
    }
    inodes
        .values()
        .filter(|(_, links, seen, dir)| *dir || seen >= links)
        .map(|(bytes, ..)| bytes)
        .sum()
}

/// The paths that make up each thing to remove.
fn paths_of(state: &StateDir, what: What, id: &str) -> Vec<PathBuf> {
    match what {
        What::Layer | What::Squash => vec![state.layer_dir(id), state.layer_erofs(id)],
        What::Image => vec![state.images_dir().join(id)],
        What::Base | What::SquashedBase => vec![state.images_dir().join("base").join(id)],
        What::RunDir => vec![state.root().join("runs").join(id)],
        What::Action => vec![ActionStore::new(state.root()).key_path(id)],
    }
}

fn remove_path(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        Ok(md) if md.is_dir() => {
            std::fs::remove_dir_all(p).with_context(|| format!("removing {}", p.display()))
        }
        Ok(_) => std::fs::remove_file(p).with_context(|| format!("removing {}", p.display())),
    }
}

/// Image pointers (`images/inputs/*`) naming an evicted image go with it, so a later
/// build does not trust a pointer to nothing.
fn remove_image_pointers(state: &StateDir, evicted: &BTreeSet<&String>) -> Result<()> {
    let inputs = state.images_dir().join("inputs");
    for n in names(&inputs) {
        let p = inputs.join(&n);
        if read_id(&p).is_some_and(|id| evicted.contains(&id)) {
            remove_path(&p)?;
        }
    }
    Ok(())
}

fn repo_bytes(repo: &Repo) -> Option<u64> {
    repo.local_dir().map(|d| freed_bytes(&[d]))
}

/// `udos gc`.
pub fn gc(
    state: &StateDir,
    store: &mut Store,
    repo: &Repo,
    opts: &Options,
    progress: &dyn Fn(&str),
) -> Result<GcReport> {
    let runs = facts(store)?;
    let keep = keep_runs(&runs, opts, &|r| run_tags(state, r));
    let layers = store.layers()?;
    progress("listing the repository's snapshots");
    let snapshots = repo.snapshots(&[])?;
    let disk = on_disk(state);
    let squashed = squashed_facts(store)?;
    let p = plan(&runs, &keep, &layers, &snapshots, &disk, &squashed);

    let mut things: Vec<(What, String)> = p.evict_layers.clone();
    things.extend(p.evict_images.iter().map(|i| (What::Image, i.clone())));
    things.extend(p.evict_bases.iter().map(|b| (What::Base, b.clone())));
    things.extend(
        p.evict_squashed
            .iter()
            .map(|b| (What::SquashedBase, b.clone())),
    );
    things.extend(p.run_dirs.iter().map(|r| (What::RunDir, r.to_string())));
    things.extend(p.evict_actions.iter().map(|a| (What::Action, a.clone())));
    let freed: Vec<Freed> = things
        .iter()
        .map(|(what, id)| Freed {
            what: *what,
            id: id.clone(),
            bytes: freed_bytes(&paths_of(state, *what, id)),
        })
        .collect();
    let mut report = GcReport {
        dry_run: opts.dry_run,
        kept_runs: p
            .kept
            .iter()
            .map(|(id, why)| Kept {
                run_id: *id,
                why: why.clone(),
            })
            .collect(),
        removed_runs: p.removed_runs.clone(),
        removed_layers: p.removed_layers.clone(),
        cache_rows_removed: 0,
        forgotten_snapshots: p.forget.clone(),
        state_bytes_freed: freed.iter().map(|f| f.bytes).sum(),
        freed,
        repository_bytes: None,
        notes: p.notes.clone(),
    };
    if opts.dry_run {
        return Ok(report);
    }
    let repo_before = repo_bytes(repo);
    if !p.forget.is_empty() {
        progress(&format!("forgetting {} snapshots", p.forget.len()));
        repo.forget(&p.forget)?;
    }
    // Files before rows: a layer directory the database no longer names would be
    // taken for another process's and kept for ever; a row whose files are gone is
    // only a row, and the next gc drops it.
    for (what, id) in &things {
        // Under the layer's lock, as everything that makes a layer holds it.
        let _lock = match what {
            What::Layer | What::Squash => Some(state.lock_layer(id)?),
            _ => None,
        };
        for path in paths_of(state, *what, id) {
            remove_path(&path)?;
        }
    }
    let evicted: BTreeSet<&String> = p.evict_images.iter().collect();
    remove_image_pointers(state, &evicted)?;
    let deleted = store.delete_runs_and_layers(&p.removed_runs, &p.removed_layers)?;
    report.cache_rows_removed = deleted.cache_rows;
    if !p.forget.is_empty() {
        progress("pruning the repository");
        repo.prune()?;
    }
    report.repository_bytes = repo_before.zip(repo_bytes(repo));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: i64, status: &str, inputs: &[(&str, &str)], steps: &[(&str, &str)]) -> RunFacts {
        RunFacts {
            row: RunRow {
                run_id: id,
                generation: id,
                workflow: "/nowhere/wf.yml".into(),
                job: "build".into(),
                event: "push".into(),
                status: status.into(),
                started_at: format!("2026-01-0{id}T00:00:00Z"),
                hypervisor: "qemu".into(),
            },
            image: format!("img{id}"),
            inputs: inputs
                .iter()
                .map(|(k, l)| (k.to_string(), l.to_string()))
                .collect(),
            steps: steps
                .iter()
                .map(|(l, s)| (Some(l.to_string()), Some(s.to_string())))
                .collect(),
            actions: Some(BTreeSet::new()),
        }
    }

    fn layer(id: &str, kind: &str, snap: &str, day: u32) -> LayerRow {
        LayerRow {
            id: id.into(),
            kind: kind.into(),
            snapshot_id: Some(snap.into()),
            created_at: format!("2026-01-0{day}T00:00:00Z"),
        }
    }

    fn snaps(ids: &[&str]) -> Vec<SnapshotInfo> {
        ids.iter()
            .map(|id| SnapshotInfo {
                id: id.to_string(),
                tags: vec!["udos=layer".into()],
            })
            .collect()
    }

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    /// Three runs on one base. Run 3 reused run 1's first layer (a cache hit: its row
    /// names run 1's snapshot of it) and has a workspace of its own.
    fn three_runs() -> (Vec<RunFacts>, Vec<LayerRow>, Vec<SnapshotInfo>, OnDisk) {
        let inputs_old = [("base", "B"), ("workspace", "W1")];
        let runs = vec![
            run(1, "success", &inputs_old, &[("L1", "s1a"), ("L1b", "s1b")]),
            run(2, "failure", &inputs_old, &[("L2", "s2")]),
            run(
                3,
                "success",
                &[("base", "B"), ("workspace", "W3")],
                &[("L1", "s1a"), ("L3", "s3")],
            ),
        ];
        let layers = vec![
            layer("B", "base", "sB", 1),
            layer("W1", "workspace", "sW1", 1),
            layer("W3", "workspace", "sW3", 3),
            layer("L1", "step", "s1a", 1),
            layer("L1b", "step", "s1b", 1),
            layer("L2", "step", "s2", 2),
            layer("L3", "step", "s3", 3),
            layer("SB", "squashed-base", "sSB", 2),
        ];
        // The store lists runs newest first.
        let runs: Vec<RunFacts> = runs.into_iter().rev().collect();
        // `s2dup`: a second snapshot of L2 the database never named; `other`: not ours.
        let repo = snaps(&[
            "sB", "sW1", "sW3", "s1a", "s1b", "s2", "s2dup", "s3", "sSB", "other",
        ]);
        let disk = OnDisk {
            layers: set(&["W1", "W3", "L1", "L1b", "L2", "L3", "squash-x", "orphan"]),
            images: set(&["img1", "img2", "img3", "imgcur"]),
            bases: set(&["B", "Bold"]),
            current_image: Some("imgcur".into()),
            current_base: Some("B".into()),
            run_dirs: [1, 2, 3].into_iter().collect(),
            ..OnDisk::default()
        };
        (runs, layers, repo, disk)
    }

    fn no_tags(_: &RunFacts) -> std::result::Result<Vec<String>, String> {
        Ok(Vec::new())
    }

    #[test]
    fn keep_last_frees_only_what_no_kept_run_base_or_other_kind_needs() {
        let (runs, layers, repo, disk) = three_runs();
        let opts = Options {
            keep_last: Some(1),
            ..Options::default()
        };
        let keep = keep_runs(&runs, &opts, &no_tags);
        let p = plan(&runs, &keep, &layers, &repo, &disk, &[]);
        assert_eq!(p.kept, vec![(3, KeepReason::Newest)]);
        assert_eq!(p.removed_runs, vec![1, 2]);
        // L1 stays (run 3 names it), so does its snapshot made by run 1; the base and
        // the squashed base are never evicted.
        assert_eq!(p.removed_layers, vec!["L1b", "L2", "W1"]);
        assert_eq!(p.forget, vec!["s1b", "s2", "sW1"]);
        assert_eq!(
            p.evict_layers,
            vec![
                (What::Layer, "L1b".to_string()),
                (What::Layer, "L2".to_string()),
                (What::Layer, "W1".to_string()),
                (What::Squash, "squash-x".to_string()),
            ]
        );
        assert_eq!(p.evict_images, vec!["img1", "img2"]);
        assert_eq!(p.evict_bases, vec!["Bold"]);
        assert_eq!(p.run_dirs, vec![1, 2]);
    }

    #[test]
    fn squashed_bases_stay_while_a_tag_a_kept_run_or_a_run_in_progress_needs_them() {
        let (mut runs, mut layers, mut repo, mut disk) = three_runs();
        // SB: its tag is alive. Q1: tag gone, run 3 (kept) ran on it. Q2: tag gone,
        // run 1 (removed) ran on it. Q3: tag gone, no run used it.
        let input = |r: &mut Vec<RunFacts>, id: i64, l: &str| {
            let run = r.iter_mut().find(|x| x.row.run_id == id).unwrap();
            let pos = run.inputs.len();
            run.inputs.insert(pos - 1, ("base".into(), l.into()));
        };
        input(&mut runs, 3, "Q1");
        input(&mut runs, 1, "Q2");
        for q in ["Q1", "Q2", "Q3"] {
            layers.push(layer(q, "squashed-base", &format!("s{q}"), 2));
            repo.extend(snaps(&[&format!("s{q}")]));
        }
        disk.bases.extend(set(&["SB", "Q1", "Q2", "Q3"]));
        let squashed: Vec<Squashed> = [
            ("SB", Some("tag v1 still names its commit")),
            ("Q1", None),
            ("Q2", None),
            ("Q3", None),
        ]
        .iter()
        .map(|(id, why)| Squashed {
            layer_id: id.to_string(),
            tag_keeps: why.map(str::to_string),
        })
        .collect();
        let opts = Options {
            keep_last: Some(1),
            ..Options::default()
        };
        let keep = keep_runs(&runs, &opts, &no_tags);
        let p = plan(&runs, &keep, &layers, &repo, &disk, &squashed);
        assert_eq!(p.evict_squashed, vec!["Q2", "Q3"]);
        assert_eq!(p.removed_layers, vec!["L1b", "L2", "Q2", "Q3", "W1"]);
        assert_eq!(p.forget, vec!["s1b", "s2", "sQ2", "sQ3", "sW1"]);
        // Squashed bases never go as plain bases.
        assert_eq!(p.evict_bases, vec!["Bold"]);
        assert!(
            p.notes
                .iter()
                .any(|n| n == "squashed base SB kept: tag v1 still names its commit"),
            "{:?}",
            p.notes
        );

        // A run in progress may be on any of them: all stay.
        runs.iter_mut()
            .find(|r| r.row.run_id == 1)
            .unwrap()
            .row
            .status = "running".into();
        let keep = keep_runs(&runs, &opts, &no_tags);
        let p = plan(&runs, &keep, &layers, &repo, &disk, &squashed);
        assert!(p.evict_squashed.is_empty(), "{:?}", p.evict_squashed);
        assert!(!p.removed_layers.iter().any(|l| l.starts_with('Q')));
    }

    #[test]
    fn action_trees_go_when_no_kept_run_used_them_and_no_ref_is_pinned_to_them() {
        let (mut runs, layers, repo, mut disk) = three_runs();
        let (old, pinned, kept_local) = (
            format!("octo/a/{}", "1".repeat(40)),
            format!("octo/a/{}", "2".repeat(40)),
            format!(".local/{}", "3".repeat(64)),
        );
        let unused_local = format!(".local/{}", "4".repeat(64));
        disk.actions = [&old, &pinned, &kept_local, &unused_local]
            .into_iter()
            .cloned()
            .collect();
        disk.pinned_actions = [pinned.clone()].into();
        disk.action_scratch = true;
        // Run 1 (dropped) used the old commit; run 3 (kept) a local tree.
        runs.iter_mut().find(|r| r.row.run_id == 1).unwrap().actions = Some([old.clone()].into());
        runs.iter_mut().find(|r| r.row.run_id == 3).unwrap().actions =
            Some([kept_local.clone()].into());
        let opts = Options {
            keep_last: Some(1),
            ..Options::default()
        };
        let keep = keep_runs(&runs, &opts, &no_tags);
        let p = plan(&runs, &keep, &layers, &repo, &disk, &[]);
        assert_eq!(
            p.evict_actions,
            vec![unused_local.clone(), old.clone(), ".staging".to_string()]
        );

        // A kept run that cannot tell what it used keeps every tree.
        runs.iter_mut().find(|r| r.row.run_id == 3).unwrap().actions = None;
        let p = plan(&runs, &keep, &layers, &repo, &disk, &[]);
        assert!(p.evict_actions.is_empty(), "{:?}", p.evict_actions);
    }

    #[test]
    fn a_report_tells_the_action_trees_its_steps_used() {
        let sha = "a".repeat(40);
        let tree = "b".repeat(64);
        let report = serde_json::json!({
            "jobs": [{"steps": [
                {"actions": [
                    {"uses": "octo/tools/sub@v1", "sha": sha, "local": null},
                    {"uses": "octo/x@main", "sha": tree, "local": "/src/x"},
                    {"uses": "octo/bad@v1", "sha": "../../etc", "local": null},
                ]},
                {"actions": []},
            ]}]
        });
        let keys = report_actions(&report.to_string()).unwrap();
        assert_eq!(
            keys,
            [format!("octo/tools/{sha}"), format!(".local/{tree}")].into()
        );
        assert_eq!(report_actions("not json"), None);
    }

    #[test]
    fn without_keep_last_every_run_and_its_layers_stay() {
        let (runs, layers, repo, disk) = three_runs();
        let keep = keep_runs(&runs, &Options::default(), &no_tags);
        let p = plan(&runs, &keep, &layers, &repo, &disk, &[]);
        assert_eq!(p.kept.len(), 3);
        assert!(p.kept.iter().all(|(_, w)| *w == KeepReason::All));
        assert!(p.removed_runs.is_empty() && p.removed_layers.is_empty());
        assert!(p.forget.is_empty());
        // Only the squashed leg layer (a cache) and images no run used go.
        assert_eq!(p.evict_layers, vec![(What::Squash, "squash-x".to_string())]);
        assert_eq!(p.evict_images, Vec::<String>::new());
    }

    #[test]
    fn a_run_in_progress_keeps_its_recent_layers_and_every_squash() {
        let (mut runs, mut layers, repo, disk) = three_runs();
        // Run 2 is still running: it began on day 2. `new` was recorded since and no
        // step names it yet (it may be run 2's); `old` was recorded before.
        runs[1].row.status = "running".into();
        layers.push(layer("new", "step", "sN", 2));
        layers.push(layer("old", "step", "sO", 1));
        let opts = Options {
            keep_last: Some(1),
            ..Options::default()
        };
        let keep = keep_runs(&runs, &opts, &no_tags);
        let p = plan(&runs, &keep, &layers, &repo, &disk, &[]);
        assert_eq!(
            p.kept,
            vec![(2, KeepReason::Running), (3, KeepReason::Newest)]
        );
        assert_eq!(p.removed_runs, vec![1]);
        // W1 and L2 are run 2's.
        assert_eq!(p.removed_layers, vec!["L1b", "old"]);
        assert!(!p.evict_layers.iter().any(|(w, _)| *w == What::Squash));
        assert!(!p.notes.is_empty());
    }

    #[test]
    fn keep_tagged_keeps_tagged_runs_and_runs_it_cannot_tell() {
        let (runs, layers, repo, disk) = three_runs();
        let opts = Options {
            keep_last: Some(1),
            keep_tagged: true,
            dry_run: false,
        };
        let tags = |r: &RunFacts| match r.row.run_id {
            1 => Ok(vec!["v1.0".to_string()]),
            2 => Err("no workspace layer".to_string()),
            _ => Ok(Vec::new()),
        };
        let keep = keep_runs(&runs, &opts, &tags);
        let p = plan(&runs, &keep, &layers, &repo, &disk, &[]);
        assert_eq!(
            p.kept,
            vec![
                (1, KeepReason::Tagged(vec!["v1.0".into()])),
                (2, KeepReason::TagUnknown("no workspace layer".into())),
                (3, KeepReason::Newest),
            ]
        );
        assert!(p.removed_runs.is_empty() && p.forget.is_empty());
    }

    /// The store refuses to drop a layer a remaining run names, and drops the cache
    /// rows of the layers it removes (real SQLite file).
    #[test]
    fn deleting_runs_and_layers_in_the_store_keeps_what_remaining_runs_name() {
        use crate::report::StepReport;
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("udos.db")).unwrap();
        let step = |layer: &str| StepReport {
            number: 1,
            id: None,
            name: "s".into(),
            status: udos_core::engine::Conclusion::Success,
            outcome: udos_core::engine::Conclusion::Success,
            conclusion: udos_core::engine::Conclusion::Success,
            exit_code: Some(0),
            snapshot_id: None,
            layer_id: Some(layer.into()),
            cache_key: None,
            outputs: Default::default(),
            summary: None,
            cached_from: None,
            cached: false,
            phases_ms: Default::default(),
            error: None,
            note: None,
            console_log: None,
            actions: Vec::new(),
        };
        let (r1, _) = s.begin_run("wf", "b", "push", "q", "i").unwrap();
        let (r2, _) = s.begin_run("wf", "b", "push", "q", "i").unwrap();
        for l in ["A", "B"] {
            s.put_layer(l, "step", 1, 1).unwrap();
            s.cache_put("k", "[]", Some(l), "{}", (r1, 0, 1)).unwrap();
        }
        s.put_step(r1, 0, "b", &step("A")).unwrap();
        s.put_step(r2, 0, "b", &step("B")).unwrap();
        // B is named by run 2, which stays: nothing happens.
        assert!(s
            .delete_runs_and_layers(&[r1], &["A".into(), "B".into()])
            .is_err());
        assert_eq!(s.runs().unwrap().len(), 2);
        let d = s.delete_runs_and_layers(&[r1], &["A".into()]).unwrap();
        assert_eq!(
            d,
            crate::store::Deleted {
                runs: 1,
                layers: 1,
                cache_rows: 1
            }
        );
        assert_eq!(s.runs().unwrap().len(), 1);
        assert!(s.steps(r1).unwrap().is_empty());
        assert_eq!(
            s.layers()
                .unwrap()
                .iter()
                .map(|l| &l.id)
                .collect::<Vec<_>>(),
            vec!["B"]
        );
        assert_eq!(s.cache_candidates("k").unwrap().len(), 1);
    }

    /// The commit is read from the repository inside the run's workspace layer and
    /// its tags from there and from the workflow's repository now (real git).
    #[test]
    fn a_runs_tags_come_from_its_workspace_commit() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::resolve(Some(&dir.path().join("st"))).unwrap();
        let live = dir.path().join("repo");
        std::fs::create_dir_all(&live).unwrap();
        let git = |args: &[&str]| {
            let ok = std::process::Command::new("git")
                .args(args)
                .current_dir(&live)
                .env("GIT_AUTHOR_NAME", "t")
                .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
                .env("GIT_COMMITTER_NAME", "t")
                .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
                .status()
                .unwrap()
                .success();
            assert!(ok, "git {args:?}");
        };
        std::fs::write(live.join("f"), "1").unwrap();
        git(&["init", "-q", "."]);
        git(&["add", "-A"]);
        git(&["commit", "-q", "-m", "one"]);
        // The run's workspace layer holds the tree and its repository as they were.
        std::fs::create_dir_all(state.layer_dir("W")).unwrap();
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(&live)
            .arg(state.layer_dir("W").join("workspace"))
            .status()
            .unwrap()
            .success();
        assert!(copied);
        let mut r = run(1, "success", &[("base", "B"), ("workspace", "W")], &[]);
        r.row.workflow = live.join("wf.yml").display().to_string();
        assert_eq!(run_tags(&state, &r), Ok(Vec::new()));
        // A tag made after the run counts.
        git(&["tag", "v1.0"]);
        assert_eq!(run_tags(&state, &r), Ok(vec!["v1.0".to_string()]));
        // A later commit is not the run's.
        std::fs::write(live.join("f"), "2").unwrap();
        git(&["commit", "-q", "-am", "two"]);
        git(&["tag", "v2.0"]);
        assert_eq!(run_tags(&state, &r), Ok(vec!["v1.0".to_string()]));
        // No workspace layer in the state dir: it cannot be told.
        let gone = run(2, "success", &[("workspace", "gone")], &[]);
        assert!(run_tags(&state, &gone).is_err());
    }

    #[test]
    fn freed_bytes_counts_shared_files_where_their_last_link_goes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("big"), vec![7u8; 256 * 1024]).unwrap();
        std::fs::hard_link(a.join("big"), b.join("big")).unwrap();
        let only_b = freed_bytes(std::slice::from_ref(&b));
        let both = freed_bytes(&[a, b]);
        assert!(only_b < 64 * 1024, "{only_b}");
        assert!(both >= 256 * 1024, "{both}");
    }
}
