//! The step cache on the host: keys computed from the resolved step and the leg's
//! layers (`udos_core::cache`), results recorded in SQLite with the workspace files the
//! step read (PID 1 records which; the host records what they were), and reused when
//! the key matches and every read still sees the same thing. docs/cache.md.

use std::collections::BTreeMap;
use std::sync::Mutex;

use anyhow::Result;
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use udos_core::cache::{reads_hold, step_key, KeyInputs, ReadEntry, Seen};
use udos_core::engine::leg::{ResolvedBody, ResolvedStep, StepRun};
use udos_core::engine::Conclusion;
use udos_core::value::{Object, Value};
use udos_layer::StepRecord;

use crate::hashfiles::{Entry, LayeredWorkspace};
use crate::state::StateDir;
use crate::store::Store;

/// A step's result as the cache keeps it (only successful steps are kept).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Kept {
    outputs: IndexMap<String, String>,
    env: IndexMap<String, String>,
    path: Vec<String>,
    summary: Option<String>,
}

/// A reusable result.
#[derive(Debug, Clone)]
pub struct Hit {
    /// The layer the step made, if any (present in the state dir).
    pub layer_id: Option<String>,
    /// The step's result, as if it had run.
    pub run: StepRun,
    /// Its `$GITHUB_STEP_SUMMARY`.
    pub summary: Option<String>,
    /// Where it was made: run, leg, step.
    pub from: (i64, i64, i64),
}

/// The names of the secrets whose values the step was given.
pub fn secret_names(step: &ResolvedStep, secrets: Option<&Object>) -> Vec<String> {
    let Some(secrets) = secrets else {
        return Vec::new();
    };
    secrets
        .iter()
        .filter_map(|(name, v)| {
            let v = v.as_str().filter(|v| !v.is_empty())?;
            step.secrets
                .values()
                .any(|given| given.contains(v))
                .then(|| name.clone())
        })
        .collect()
}

/// The step's key over the leg's layers and what the workspace says now.
pub fn key(
    image_id: &str,
    base_id: &str,
    step: &ResolvedStep,
    step_layers: &[String],
    secrets: Option<&Object>,
    entries: &BTreeMap<String, Entry>,
) -> Result<String> {
    let action = match &step.body {
        ResolvedBody::Uses { uses, .. } => {
            let dir = uses.trim_start_matches("./").trim_end_matches('/');
            let mut seen = Seen::Absent;
            for f in ["action.yml", "action.yaml"] {
                seen = LayeredWorkspace::seen(entries, &format!("{dir}/{f}"))?;
                if seen != Seen::Absent {
                    break;
                }
            }
            Some(serde_json::to_string(&seen)?)
        }
        ResolvedBody::Run { .. } => None,
    };
    let names = secret_names(step, secrets);
    Ok(step_key(
        step,
        &KeyInputs {
            image_id,
            base_id,
            layers: step_layers,
            action_definition: action.as_deref(),
            secret_names: &names,
        },
    ))
}

/// The first recorded result under `key` whose reads still hold and whose layer is
/// still in the state dir.
pub fn lookup(
    store: &Mutex<Store>,
    state: &StateDir,
    key: &str,
    entries: &BTreeMap<String, Entry>,
) -> Result<Option<Hit>> {
    let rows = store
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .cache_candidates(key)?;
    for row in rows {
        let Ok(reads) = serde_json::from_str::<Vec<ReadEntry>>(&row.reads) else {
            continue;
        };
        let Ok(kept) = serde_json::from_str::<Kept>(&row.result) else {
            continue;
        };
        if let Some(l) = &row.layer_id {
            if !state.layer_erofs(l).is_file() || !state.layer_dir(l).is_dir() {
                continue;
            }
        }
        let holds = reads_hold(&reads, |p| {
            LayeredWorkspace::seen(entries, p).unwrap_or(Seen::Absent)
        });
        if holds {
            return Ok(Some(Hit {
                layer_id: row.layer_id,
                run: StepRun {
                    outcome: Some(Conclusion::Success),
                    exit_code: Some(0),
                    outputs: kept.outputs,
                    env: kept.env,
                    path: kept.path,
                    masks: Vec::new(),
                    error: None,
                },
                summary: kept.summary,
                from: row.from,
            }));
        }
    }
    Ok(None)
}

/// What the step's recorded reads were in the workspace it started from; `None` when
/// the guest recorded no reads (or too many), so the step is not kept.
pub fn reads_of(record: &StepRecord, before: &BTreeMap<String, Entry>) -> Option<Vec<ReadEntry>> {
    tracing::debug!(reads = ?record.reads, "the step's reads");
    let set = record.reads.as_ref().filter(|r| !r.truncated)?;
    let read = set.files.iter().chain(set.dirs.iter());
    let looked_in = udos_core::cache::looked_in(read.clone().map(String::as_str));
    let mut paths: Vec<&String> = read.chain(looked_in.iter()).collect();
    paths.sort();
    paths.dedup();
    paths
        .into_iter()
        .map(|p| match LayeredWorkspace::seen(before, p) {
            Ok(seen) => Some(ReadEntry {
                path: p.clone(),
                seen,
            }),
            Err(e) => {
                tracing::debug!(path = %p, "what the step read cannot be told: {e}");
                None
            }
        })
        .collect()
}

/// Keeps a successful step's result under `key`, unless it must not be kept: it
/// failed, registered masks, or its outputs or env hold a secret (the cache would
/// store the value).
#[allow(clippy::too_many_arguments)]
pub fn keep(
    store: &Mutex<Store>,
    key: &str,
    reads: &[ReadEntry],
    layer_id: Option<&str>,
    run: &StepRun,
    summary: Option<&str>,
    secrets: Option<&Object>,
    from: (i64, i64, i64),
) -> Result<bool> {
    if run.outcome != Some(Conclusion::Success) || !run.masks.is_empty() {
        return Ok(false);
    }
    let secret_values: Vec<&str> = secrets
        .map(|s| {
            s.values()
                .filter_map(Value::as_str)
                .filter(|v| !v.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let leaks = run
        .outputs
        .values()
        .chain(run.env.values())
        .any(|v| secret_values.iter().any(|s| v.contains(s)));
    if leaks {
        return Ok(false);
    }
    let kept = Kept {
        outputs: run.outputs.clone(),
        env: run.env.clone(),
        path: run.path.clone(),
        summary: summary.map(str::to_string),
    };
    store.lock().unwrap_or_else(|e| e.into_inner()).cache_put(
        key,
        &serde_json::to_string(reads)?,
        layer_id,
        &serde_json::to_string(&kept)?,
        from,
    )?;
    Ok(true)
}
