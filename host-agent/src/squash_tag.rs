//! Squash on a git tag (docs/bases.md, "Squashed bases").
//!
//! When a run's workspace is a tagged commit (clean tree, `git tag --points-at HEAD`),
//! each job leg that succeeded and sealed at least one step layer has its final root
//! (its base, then its step layers in order, without `/workspace`) made into a new
//! base: a tree and erofs in `images/base/<id>/`, its own restic snapshot, a row in
//! `squashed_bases`. A later run's leg of the same job, on the same base name, on a
//! descendant of that commit starts from it ([`choose`] picks the nearest).
//!
//! `/workspace` is left out because every run brings its own workspace layer above
//! the base: an old checkout under it would show files the new commit deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use udos_core::engine::Conclusion;
use udos_images::{BaseKind, BaseLayer, ImageStore};

use crate::report::{JobReport, RunReport, SquashedBaseRef};
use crate::restic::Tags;
use crate::runner::Prepared;
use crate::state::StateDir;
use crate::store::{SquashedBaseRow, Store};

/// At most this many squashed bases (the newest) are weighed per (base, job), so the
/// git calls that order them stay bounded.
pub const MAX_CANDIDATES: usize = 16;

/// What git says about the run's workspace repository, read when the run begins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagState {
    /// The repository's top.
    pub root: PathBuf,
    /// HEAD's commit.
    pub head: String,
    /// The tags pointing at HEAD, sorted.
    pub tags: Vec<String>,
    /// The working tree is HEAD's commit (nothing changed or untracked).
    pub clean: bool,
}

impl TagState {
    /// Reads the repository at `root`; `None` when it is not a git tree with a commit.
    /// On every run, so it asks git only what it needs: HEAD and its tags (at once),
    /// and whether the tree is clean only when there are tags to squash at.
    pub fn read(root: &Path) -> Option<TagState> {
        let (head, tags) = std::thread::scope(|s| {
            let tags = s.spawn(|| crate::repo::head_tags(root).unwrap_or_default());
            let head = crate::repo::head(root);
            (head, tags.join().unwrap_or_default())
        });
        let head = head.filter(|h| !h.is_empty())?;
        let clean = !tags.is_empty() && crate::repo::is_clean(root).unwrap_or(false);
        Some(TagState {
            root: root.to_path_buf(),
            head,
            tags,
            clean,
        })
    }
}

/// Which commits descend from which, as data: `(ancestor, descendant)` pairs. A
/// commit is its own ancestor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ancestry(pub BTreeSet<(String, String)>);

impl Ancestry {
    /// Whether `ancestor` is `descendant` or one of its ancestors.
    pub fn is_ancestor(&self, ancestor: &str, descendant: &str) -> bool {
        ancestor == descendant
            || self
                .0
                .contains(&(ancestor.to_string(), descendant.to_string()))
    }
}

/// The squashed base a leg of `job` on the base `base_name` starts from at commit
/// `head`: among those made for that pair on an ancestor of `head` (or `head`
/// itself), the nearest one: the descendant of the most others; on a tie (commits on
/// branches that do not descend from each other, or one commit), the newest run's.
pub fn choose<'a>(
    rows: &'a [SquashedBaseRow],
    base_name: &str,
    job: &str,
    head: &str,
    ancestry: &Ancestry,
) -> Option<&'a SquashedBaseRow> {
    let fits: Vec<&SquashedBaseRow> = rows
        .iter()
        .filter(|r| r.base_name == base_name && r.job_id == job)
        .filter(|r| ancestry.is_ancestor(&r.commit, head))
        .collect();
    fits.iter().copied().max_by_key(|r| {
        let below = fits
            .iter()
            .filter(|o| o.commit != r.commit && ancestry.is_ancestor(&o.commit, &r.commit))
            .count();
        (below, r.run_id)
    })
}

/// The squashed bases the legs of a run start from, by (base name, job).
#[derive(Debug, Clone, Default)]
pub struct Choices {
    picks: BTreeMap<(String, String), (SquashedBaseRef, BaseLayer)>,
}

impl Choices {
    /// The squashed base (and its layer) for a leg of `job` on `base_name`, if any.
    pub fn pick(&self, base_name: &str, job: &str) -> Option<(SquashedBaseRef, BaseLayer)> {
        self.picks
            .get(&(base_name.to_string(), job.to_string()))
            .cloned()
    }
}

/// The ancestry of the recorded commits that matters for `head`: which of them are
/// ancestors of `head`, and how those relate to each other (git, bounded).
fn read_ancestry(root: &Path, head: &str, commits: &BTreeSet<&str>) -> Ancestry {
    let below: Vec<&str> = commits
        .iter()
        .copied()
        .filter(|c| *c == head || crate::repo::is_ancestor(root, c, head) == Some(true))
        .collect();
    let mut pairs: BTreeSet<(String, String)> = below
        .iter()
        .map(|c| (c.to_string(), head.to_string()))
        .collect();
    for a in &below {
        for d in &below {
            if a != d && crate::repo::is_ancestor(root, a, d) == Some(true) {
                pairs.insert((a.to_string(), d.to_string()));
            }
        }
    }
    Ancestry(pairs)
}

/// The squashed bases this run's legs start from. One that is no longer in the state
/// dir is not used (a notice says so; its snapshot still holds it).
pub fn prepare(store: &Store, images: &ImageStore, tags: &TagState) -> (Choices, Vec<String>) {
    let mut notices = Vec::new();
    let rows = match store.squashed_bases() {
        Ok(r) => r,
        Err(e) => {
            notices.push(format!("reading the squashed bases: {e:#}"));
            return (Choices::default(), notices);
        }
    };
    // The newest MAX_CANDIDATES per (base, job): rows come newest run first.
    let mut per_key: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let rows: Vec<SquashedBaseRow> = rows
        .iter()
        .filter(|r| {
            let n = per_key
                .entry((r.base_name.as_str(), r.job_id.as_str()))
                .or_default();
            *n += 1;
            *n <= MAX_CANDIDATES
        })
        .cloned()
        .collect();
    let commits: BTreeSet<&str> = rows.iter().map(|r| r.commit.as_str()).collect();
    let ancestry = read_ancestry(&tags.root, &tags.head, &commits);
    let keys: BTreeSet<(&str, &str)> = per_key.keys().copied().collect();
    let mut picks = BTreeMap::new();
    for (base_name, job) in keys {
        let Some(row) = choose(&rows, base_name, job, &tags.head, &ancestry) else {
            continue;
        };
        let tag = row.tags.first().cloned().unwrap_or_default();
        match images.base_by_id(&row.layer_id, base_name) {
            Ok(Some(b)) => {
                let r = SquashedBaseRef {
                    id: row.layer_id.clone(),
                    tag,
                    commit: row.commit.clone(),
                    run: row.run_id,
                };
                picks.insert((base_name.to_string(), job.to_string()), (r, b.layer));
            }
            Ok(None) | Err(_) => notices.push(format!(
                "the squashed base {} of job {job} (tag {tag}) is no longer in the state dir: the job runs on `{base_name}` (`udos restore` can bring its snapshot back)",
                short(&row.layer_id)
            )),
        }
    }
    (Choices { picks }, notices)
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// The content address of the base squashed from `base` and the step layers
/// `layers` (bottom first), without the workspace.
pub fn squashed_id(base: &str, layers: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(b"udos-squashed-base-v1\0");
    for id in std::iter::once(base).chain(layers.iter().map(String::as_str)) {
        h.update(id.as_bytes());
        h.update(b"\0");
    }
    h.update(b"no workspace");
    hex::encode(h.finalize())
}

/// A leg worth squashing: it succeeded and sealed layers.
struct Candidate<'a> {
    job: &'a JobReport,
    base_name: String,
    base: BaseLayer,
    layers: Vec<String>,
}

/// The legs of `report` to squash, and notices about those left out.
fn candidates<'a>(prep: &Prepared<'_>, report: &'a RunReport) -> (Vec<Candidate<'a>>, Vec<String>) {
    let mut notices = Vec::new();
    let mut out = Vec::new();
    let images = ImageStore::new(prep.state.root());
    for job in &report.jobs {
        let layers: Vec<String> = job
            .steps
            .iter()
            .filter_map(|s| s.layer_id.clone())
            .collect();
        let Some(base_name) = job.base.clone() else {
            continue;
        };
        if job.status != Conclusion::Success || layers.is_empty() {
            continue;
        }
        // A squashed base is chosen by job: legs of a matrix share that key.
        if report.jobs.iter().filter(|j| j.id == job.id).count() > 1 {
            notices.push(format!(
                "job {} has several legs: not squashed (a squashed base is chosen by job)",
                job.id
            ));
            continue;
        }
        let base = match &job.squashed_base {
            Some(s) => images
                .base_by_id(&s.id, &base_name)
                .ok()
                .flatten()
                .map(|b| b.layer),
            None => prep.bases.get(&base_name).ok().map(|b| b.layer),
        };
        match base {
            Some(base) => out.push(Candidate {
                job,
                base_name,
                base,
                layers,
            }),
            None => notices.push(format!(
                "job {}: its base is no longer there: not squashed",
                job.id
            )),
        }
    }
    (out, notices)
}

/// After a run's report is final: squashes its legs when its commit is tagged. A
/// failure is a warning (printed), never the run's; nothing half-made is left.
pub fn after_run(prep: &Prepared<'_>, store: &Mutex<Store>, tags: &TagState, report: &RunReport) {
    if tags.tags.is_empty() {
        return;
    }
    if !tags.clean {
        eprintln!(
            "udos: notice: the working tree has changes: it is not the tagged commit ({}), so nothing is squashed",
            tags.tags.join(", ")
        );
        return;
    }
    let (todo, notices) = candidates(prep, report);
    for n in notices {
        eprintln!("udos: notice: {n}");
    }
    for c in todo {
        let started = Instant::now();
        match squash_leg(prep, store, tags, report.run_id, &c) {
            Ok((id, bytes)) => eprintln!(
                "udos: squashed job {} at tag {} into base {} ({:.1} MiB, {:.1} s)",
                c.job.id,
                tags.tags.join(", "),
                short(&id),
                bytes as f64 / (1 << 20) as f64,
                started.elapsed().as_secs_f64()
            ),
            Err(e) => eprintln!(
                "udos: warning: squashing job {} at tag {}: {}",
                c.job.id,
                tags.tags.join(", "),
                crate::errors::describe(&e)
            ),
        }
    }
}

/// A restic tag value: restic splits `--tag` on commas.
fn tag_value(s: &str) -> String {
    s.replace(',', "_")
}

/// Makes (or finds) the squashed base of one leg, snapshots and records it; its id
/// and erofs size.
fn squash_leg(
    prep: &Prepared<'_>,
    store: &Mutex<Store>,
    tags: &TagState,
    run_id: i64,
    c: &Candidate<'_>,
) -> Result<(String, u64)> {
    let state = prep.state;
    let images = ImageStore::new(state.root());
    let id = squashed_id(&c.base.id, &c.layers);
    let made_now = {
        let _lock = state.lock_layer(&id)?;
        if images.base_by_id(&id, &c.base_name)?.is_some() {
            false
        } else {
            build_tree_base(state, &images, &id, c)?;
            true
        }
    };
    let base = images
        .base_by_id(&id, &c.base_name)?
        .context("the squashed base vanished")?;
    let recorded = lock(store).layer_snapshot(&id)?;
    let snapshot = match recorded {
        Some(s) => s,
        None => match snapshot(prep, &base.layer.tree, &id, c, tags, run_id) {
            Ok(s) => s,
            Err(e) => {
                // Not in the repository: not a base a later run may take.
                if made_now {
                    let _ = std::fs::remove_dir_all(state.images_dir().join("base").join(&id));
                }
                return Err(e);
            }
        },
    };
    let row = SquashedBaseRow {
        layer_id: id.clone(),
        commit: tags.head.clone(),
        base_name: c.base_name.clone(),
        base_layer: c.base.id.clone(),
        job_id: c.job.id.clone(),
        tags: tags.tags.clone(),
        run_id,
        repo: tags.root.display().to_string(),
        snapshot_id: Some(snapshot),
        created_at: String::new(),
    };
    lock(store).put_squashed_base(&row, base.meta.erofs_bytes)?;
    Ok((id, base.meta.erofs_bytes))
}

fn lock(store: &Mutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(|e| e.into_inner())
}

/// Flattens the leg's base and step layers (whiteouts delete) into a staging tree in
/// the state dir's unpack area, drops `/workspace`, and publishes it as the base `id`.
fn build_tree_base(
    state: &StateDir,
    images: &ImageStore,
    id: &str,
    c: &Candidate<'_>,
) -> Result<()> {
    let stage = state.unpack_dir(id)?;
    let tree = stage.path().join("tree");
    std::fs::create_dir(&tree)?;
    udos_layer::apply::apply(&c.base.tree, &tree).context("copying the base")?;
    for l in &c.layers {
        udos_layer::apply::apply(&state.layer_dir(l), &tree)
            .with_context(|| format!("applying step layer {}", short(l)))?;
    }
    for p in [
        tree.join("workspace"),
        tree.join(crate::snapshots::LAYER_META),
    ] {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p)?,
            Ok(_) => std::fs::remove_file(&p)?,
            Err(_) => {}
        }
    }
    let origin = format!(
        "job {} on {} ({}) and {} step layer{}",
        c.job.id,
        c.base_name,
        short(&c.base.id),
        c.layers.len(),
        if c.layers.len() == 1 { "" } else { "s" }
    );
    images.publish_tree_base(stage, id, BaseKind::Squashed, origin, &|m| {
        tracing::info!("{m}")
    })?;
    Ok(())
}

/// Snapshots the squashed base's tree; its full snapshot id.
fn snapshot(
    prep: &Prepared<'_>,
    tree: &Path,
    id: &str,
    c: &Candidate<'_>,
    tags: &TagState,
    run_id: i64,
) -> Result<String> {
    let t = Tags::default()
        .with("udos", "layer")
        .with("kind", "base")
        .with("layer", id)
        .with("base", &c.base_name)
        .with("base-kind", BaseKind::Squashed)
        .with("squash", 1)
        .with(
            "tag",
            tag_value(tags.tags.first().map(String::as_str).unwrap_or("")),
        )
        .with("commit", &tags.head)
        .with("run", run_id)
        .with("job", tag_value(&c.job.id));
    let snapshotter = crate::snapshots::Snapshotter::start(prep.repo.clone(), prep.state.clone())?;
    snapshotter.queue().add("squashed".into(), tree, t);
    let done = snapshotter
        .finish()
        .into_iter()
        .next()
        .context("the snapshot thread returned nothing")?;
    done.result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(layer: &str, commit: &str, run: i64) -> SquashedBaseRow {
        SquashedBaseRow {
            layer_id: layer.into(),
            commit: commit.into(),
            base_name: "minimal".into(),
            base_layer: "b".into(),
            job_id: "build".into(),
            tags: vec![format!("t-{commit}")],
            run_id: run,
            repo: "/r".into(),
            snapshot_id: None,
            created_at: String::new(),
        }
    }

    /// a <- b <- c <- head (a line), x on a branch from a.
    fn ancestry() -> Ancestry {
        let pairs = [
            ("a", "b"),
            ("a", "c"),
            ("a", "head"),
            ("b", "c"),
            ("b", "head"),
            ("c", "head"),
            ("a", "x"),
        ];
        Ancestry(
            pairs
                .iter()
                .map(|(a, d)| (a.to_string(), d.to_string()))
                .collect(),
        )
    }

    #[test]
    fn the_nearest_tagged_ancestor_wins() {
        let rows = vec![row("la", "a", 1), row("lc", "c", 2), row("lb", "b", 3)];
        let got = choose(&rows, "minimal", "build", "head", &ancestry()).unwrap();
        assert_eq!(got.layer_id, "lc");
        // At the tagged commit itself, its own base.
        let got = choose(&rows, "minimal", "build", "b", &ancestry()).unwrap();
        assert_eq!(got.layer_id, "lb");
    }

    #[test]
    fn no_base_from_a_commit_that_is_not_an_ancestor() {
        let rows = vec![row("lx", "x", 5)];
        assert_eq!(choose(&rows, "minimal", "build", "head", &ancestry()), None);
        // A branch from before the tag does not see the tag's base.
        let rows = vec![row("lb", "b", 1)];
        assert_eq!(choose(&rows, "minimal", "build", "x", &ancestry()), None);
        let rows = vec![row("lb", "b", 1), row("la", "a", 2)];
        assert_eq!(
            choose(&rows, "minimal", "build", "x", &ancestry()).map(|r| r.layer_id.as_str()),
            Some("la")
        );
    }

    #[test]
    fn only_the_same_base_and_job() {
        let mut other_job = row("l1", "c", 9);
        other_job.job_id = "test".into();
        let mut other_base = row("l2", "c", 9);
        other_base.base_name = "debian".into();
        let rows = vec![other_job, other_base, row("l3", "a", 1)];
        let got = choose(&rows, "minimal", "build", "head", &ancestry()).unwrap();
        assert_eq!(got.layer_id, "l3");
        assert_eq!(
            choose(&rows, "minimal", "deploy", "head", &ancestry()),
            None
        );
    }

    #[test]
    fn one_commit_twice_takes_the_newest_run() {
        let rows = vec![row("old", "c", 1), row("new", "c", 4), row("la", "a", 7)];
        let got = choose(&rows, "minimal", "build", "head", &ancestry()).unwrap();
        assert_eq!(got.layer_id, "new");
    }

    #[test]
    fn the_id_depends_on_base_and_layers_in_order() {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let a = squashed_id("base", &l(&["1", "2"]));
        assert_eq!(a.len(), 64);
        assert_eq!(a, squashed_id("base", &l(&["1", "2"])));
        assert_ne!(a, squashed_id("base", &l(&["2", "1"])));
        assert_ne!(a, squashed_id("other", &l(&["1", "2"])));
        assert_ne!(a, squashed_id("base", &l(&["12"])));
    }
}
