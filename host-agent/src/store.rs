//! Runs, job legs, steps and layers, recorded in SQLite (`<state>/udos.db`).
//!
//! Each local `udos run` is one generation: the number is taken when the run starts,
//! so runs are numbered in the order they began. Timestamps are UTC RFC 3339, made by
//! SQLite itself (`strftime`). The schema is versioned with `PRAGMA user_version` and
//! migrated forward on open ([`MIGRATIONS`]).

use std::path::Path;

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::report::{JobReport, StepReport};

/// The SQLite store.
pub struct Store {
    conn: Connection,
}

/// A run as listed by `udos runs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRow {
    /// Run number.
    pub run_id: i64,
    /// Generation the run belongs to.
    pub generation: i64,
    /// Workflow file(s).
    pub workflow: String,
    /// The jobs, comma-separated.
    pub job: String,
    /// The event.
    pub event: String,
    /// `running`, `success`, `failure`, `cancelled` or `error`.
    pub status: String,
    /// RFC 3339 start time (UTC).
    pub started_at: String,
    /// Hypervisor used.
    pub hypervisor: String,
}

/// A job leg of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRow {
    /// The leg's number in the run.
    pub leg: i64,
    /// The job's key (`caller/job` in a reusable workflow).
    pub job_id: String,
    /// Display name.
    pub name: String,
    /// The leg's matrix, as JSON, if any.
    pub matrix: Option<String>,
    /// success, failure, skipped or cancelled.
    pub status: String,
    /// The base layer it ran on (null: recorded by a udos before schema 6, or it got
    /// no base).
    pub base_layer: Option<String>,
}

/// A step of a run, with its layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRow {
    /// The leg it belongs to.
    pub leg: i64,
    /// The leg's job key.
    pub job_id: String,
    /// 1-based step number.
    pub number: i64,
    /// The user's step id, if any.
    pub step_id: Option<String>,
    /// Display name.
    pub name: String,
    /// success, failure, skipped or cancelled.
    pub status: String,
    /// Exit code of the step, when it ran.
    pub exit_code: Option<i64>,
    /// Layer the step produced.
    pub layer_id: Option<String>,
    /// Full restic snapshot id of that layer.
    pub snapshot_id: Option<String>,
    /// Cache key of the step's inputs.
    pub cache_key: Option<String>,
}

/// An input layer of a run (base, workspace).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputRow {
    /// Position, bottom first.
    pub position: i64,
    /// `base` or `workspace`.
    pub kind: String,
    /// Layer id.
    pub layer_id: String,
    /// Restic snapshot of that layer.
    pub snapshot_id: Option<String>,
}

/// A recorded layer (`udos gc` reads them all).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerRow {
    /// Layer id.
    pub id: String,
    /// `base`, `workspace`, `step` (or a kind a newer udos records).
    pub kind: String,
    /// The restic snapshot recorded for it (the first one made).
    pub snapshot_id: Option<String>,
    /// When it was first recorded (RFC 3339, UTC).
    pub created_at: String,
}

/// What [`Store::delete_runs_and_layers`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Deleted {
    /// Runs.
    pub runs: u64,
    /// Layer rows.
    pub layers: u64,
    /// Step cache rows (those naming a deleted layer).
    pub cache_rows: u64,
}

/// The schema version this code writes.
pub const SCHEMA_VERSION: i64 = 6;

/// Version 1: one job per run, steps numbered within the run.
const SCHEMA_V1: &str = r#"
CREATE TABLE IF NOT EXISTS generations (
    number     INTEGER PRIMARY KEY,
    created_at TEXT NOT NULL,
    source     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id          INTEGER PRIMARY KEY,
    generation  INTEGER NOT NULL REFERENCES generations(number),
    workflow    TEXT NOT NULL,
    job         TEXT NOT NULL,
    status      TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    hypervisor  TEXT NOT NULL,
    image_id    TEXT NOT NULL,
    report      TEXT
);
CREATE TABLE IF NOT EXISTS layers (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    snapshot_id TEXT,
    bytes       INTEGER,
    entries     INTEGER,
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS run_inputs (
    run_id   INTEGER NOT NULL REFERENCES runs(id),
    position INTEGER NOT NULL,
    kind     TEXT NOT NULL,
    layer_id TEXT NOT NULL REFERENCES layers(id),
    PRIMARY KEY (run_id, position)
);
CREATE TABLE IF NOT EXISTS steps (
    run_id      INTEGER NOT NULL REFERENCES runs(id),
    number      INTEGER NOT NULL,
    step_id     TEXT,
    name        TEXT NOT NULL,
    status      TEXT NOT NULL,
    exit_code   INTEGER,
    layer_id    TEXT REFERENCES layers(id),
    snapshot_id TEXT,
    cache_key   TEXT,
    outputs     TEXT NOT NULL DEFAULT '{}',
    phases_ms   TEXT NOT NULL DEFAULT '{}',
    error       TEXT,
    PRIMARY KEY (run_id, number)
);
"#;

/// Version 2: many jobs and matrix legs per run; steps belong to a leg.
const V1_TO_V2: &str = r#"
ALTER TABLE runs ADD COLUMN event TEXT NOT NULL DEFAULT 'push';
CREATE TABLE jobs (
    run_id     INTEGER NOT NULL REFERENCES runs(id),
    leg        INTEGER NOT NULL,
    job_id     TEXT NOT NULL,
    name       TEXT NOT NULL,
    matrix     TEXT,
    status     TEXT NOT NULL,
    conclusion TEXT NOT NULL,
    outputs    TEXT NOT NULL DEFAULT '{}',
    error      TEXT,
    PRIMARY KEY (run_id, leg)
);
CREATE TABLE steps_v2 (
    run_id      INTEGER NOT NULL REFERENCES runs(id),
    leg         INTEGER NOT NULL,
    job_id      TEXT NOT NULL,
    number      INTEGER NOT NULL,
    step_id     TEXT,
    name        TEXT NOT NULL,
    status      TEXT NOT NULL,
    conclusion  TEXT NOT NULL,
    exit_code   INTEGER,
    layer_id    TEXT REFERENCES layers(id),
    snapshot_id TEXT,
    cache_key   TEXT,
    outputs     TEXT NOT NULL DEFAULT '{}',
    phases_ms   TEXT NOT NULL DEFAULT '{}',
    error       TEXT,
    PRIMARY KEY (run_id, leg, number)
);
INSERT INTO steps_v2 (run_id, leg, job_id, number, step_id, name, status, conclusion,
                      exit_code, layer_id, snapshot_id, cache_key, outputs, phases_ms, error)
    SELECT s.run_id, 0, r.job, s.number, s.step_id, s.name, s.status, s.status,
           s.exit_code, s.layer_id, s.snapshot_id, s.cache_key, s.outputs, s.phases_ms, s.error
    FROM steps s JOIN runs r ON r.id = s.run_id;
INSERT INTO jobs (run_id, leg, job_id, name, status, conclusion)
    SELECT id, 0, job, job, status, status FROM runs;
DROP TABLE steps;
ALTER TABLE steps_v2 RENAME TO steps;
"#;

/// Version 3: the step cache.
const V2_TO_V3: &str = r#"
CREATE TABLE step_cache (
    id         INTEGER PRIMARY KEY,
    key        TEXT NOT NULL,
    reads      TEXT NOT NULL,
    layer_id   TEXT REFERENCES layers(id),
    result     TEXT NOT NULL,
    run_id     INTEGER NOT NULL,
    leg        INTEGER NOT NULL,
    number     INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX step_cache_key ON step_cache(key);
"#;

/// Version 4: how each run was asked for, for `udos rerun` (crate::rerun::Invocation).
const V3_TO_V4: &str = r#"
ALTER TABLE runs ADD COLUMN invocation TEXT;
"#;

/// Version 5: bases squashed from a job's final root on a tagged commit
/// (crate::squash_tag); one row per (layer, commit): two tagged commits can give the
/// same layers, hence the same base.
const V4_TO_V5: &str = r#"
CREATE TABLE squashed_bases (
    layer_id    TEXT NOT NULL REFERENCES layers(id),
    commit_sha  TEXT NOT NULL,
    base_name   TEXT NOT NULL,
    base_layer  TEXT NOT NULL,
    job_id      TEXT NOT NULL,
    tags        TEXT NOT NULL,
    run_id      INTEGER NOT NULL,
    repo        TEXT NOT NULL,
    snapshot_id TEXT,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (layer_id, commit_sha)
);
CREATE INDEX squashed_bases_job ON squashed_bases(base_name, job_id);
"#;

/// Version 6: the base layer each leg ran on (its plain base, or the squashed base it
/// started from), so a restore stacks that base only; null for legs recorded before.
const V5_TO_V6: &str = r#"
ALTER TABLE jobs ADD COLUMN base_layer TEXT;
"#;

/// Migrations: `MIGRATIONS[v]` takes a database at version `v` to `v + 1`. A database
/// made before versions existed has `user_version` 0 and the version 1 tables (or
/// none, when new).
const MIGRATIONS: &[&str] = &[SCHEMA_V1, V1_TO_V2, V2_TO_V3, V3_TO_V4, V4_TO_V5, V5_TO_V6];

/// A recorded step result the cache may reuse.
#[derive(Debug, Clone)]
pub struct CacheRow {
    /// The reads, as JSON (`udos_core::cache::ReadEntry` list).
    pub reads: String,
    /// The layer the step made, if any.
    pub layer_id: Option<String>,
    /// The result, as JSON.
    pub result: String,
    /// Where it was made: run, leg, step number.
    pub from: (i64, i64, i64),
}

impl Store {
    /// Open (and create or migrate) the store at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let mut conn = Connection::open(path)
            .with_context(|| format!("opening the udos database {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn).with_context(|| format!("migrating {}", path.display()))?;
        Ok(Store { conn })
    }

    /// Start a run: take the next generation number and record the run as `running`.
    pub fn begin_run(
        &mut self,
        workflow: &str,
        jobs: &str,
        event: &str,
        hypervisor: &str,
        image_id: &str,
    ) -> Result<(i64, i64)> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO generations (created_at, source) VALUES (strftime('%Y-%m-%dT%H:%M:%SZ','now'), ?1)",
            params![format!("local run of {workflow}")],
        )?;
        let generation = tx.last_insert_rowid();
        tx.execute(
            "INSERT INTO runs (generation, workflow, job, event, status, started_at, hypervisor, image_id)
             VALUES (?1, ?2, ?3, ?4, 'running', strftime('%Y-%m-%dT%H:%M:%SZ','now'), ?5, ?6)",
            params![generation, workflow, jobs, event, hypervisor, image_id],
        )?;
        let run_id = tx.last_insert_rowid();
        tx.commit()?;
        Ok((run_id, generation))
    }

    /// Record a layer (idempotent on its id).
    pub fn put_layer(&self, id: &str, kind: &str, bytes: u64, entries: u64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO layers (id, kind, bytes, entries, created_at)
             VALUES (?1, ?2, ?3, ?4, strftime('%Y-%m-%dT%H:%M:%SZ','now'))
             ON CONFLICT(id) DO NOTHING",
            params![id, kind, bytes as i64, entries as i64],
        )?;
        Ok(())
    }

    /// The snapshot already holding layer `id`, if any.
    pub fn layer_snapshot(&self, id: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT snapshot_id FROM layers WHERE id = ?1",
                params![id],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?
            .flatten())
    }

    /// Remember the snapshot holding layer `id` (the first one wins).
    pub fn set_layer_snapshot(&self, id: &str, snapshot: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE layers SET snapshot_id = ?2 WHERE id = ?1 AND snapshot_id IS NULL",
            params![id, snapshot],
        )?;
        Ok(())
    }

    /// Record an input layer of a run.
    pub fn add_input(&self, run_id: i64, position: i64, kind: &str, layer_id: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO run_inputs (run_id, position, kind, layer_id) VALUES (?1, ?2, ?3, ?4)",
            params![run_id, position, kind, layer_id],
        )?;
        Ok(())
    }

    /// Record (or update) a step of leg `leg`.
    pub fn put_step(&self, run_id: i64, leg: i64, job_id: &str, s: &StepReport) -> Result<()> {
        self.conn.execute(
            "INSERT INTO steps (run_id, leg, job_id, number, step_id, name, status, conclusion, exit_code,
                                layer_id, snapshot_id, cache_key, outputs, phases_ms, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
             ON CONFLICT(run_id, leg, number) DO UPDATE SET
               status = excluded.status, conclusion = excluded.conclusion,
               exit_code = excluded.exit_code, layer_id = excluded.layer_id,
               snapshot_id = excluded.snapshot_id, cache_key = excluded.cache_key,
               outputs = excluded.outputs, phases_ms = excluded.phases_ms, error = excluded.error",
            params![
                run_id,
                leg,
                job_id,
                s.number as i64,
                s.id,
                s.name,
                s.outcome.as_str(),
                s.conclusion.as_str(),
                s.exit_code.map(i64::from),
                s.layer_id,
                s.snapshot_id,
                s.cache_key,
                serde_json::to_string(&s.outputs)?,
                serde_json::to_string(&s.phases_ms)?,
                s.error
            ],
        )?;
        Ok(())
    }

    /// Record (or update) a job leg.
    pub fn put_job(&self, run_id: i64, leg: i64, j: &JobReport) -> Result<()> {
        self.conn.execute(
            "INSERT INTO jobs (run_id, leg, job_id, name, matrix, status, conclusion, outputs, error,
                               base_layer)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT(run_id, leg) DO UPDATE SET
               status = excluded.status, conclusion = excluded.conclusion,
               outputs = excluded.outputs, error = excluded.error,
               base_layer = excluded.base_layer",
            params![
                run_id,
                leg,
                j.id,
                j.name,
                j.matrix.as_ref().map(serde_json::to_string).transpose()?,
                j.status.as_str(),
                j.conclusion.as_str(),
                serde_json::to_string(&j.outputs)?,
                j.error,
                j.base_layer
            ],
        )?;
        Ok(())
    }

    /// Finish a run with its status and JSON report.
    pub fn finish_run(&self, run_id: i64, status: &str, report_json: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE runs SET status = ?2, report = ?3, finished_at = strftime('%Y-%m-%dT%H:%M:%SZ','now') WHERE id = ?1",
            params![run_id, status, report_json],
        )?;
        Ok(())
    }

    /// Records a step result under `key`.
    #[allow(clippy::too_many_arguments)]
    pub fn cache_put(
        &self,
        key: &str,
        reads_json: &str,
        layer_id: Option<&str>,
        result_json: &str,
        from: (i64, i64, i64),
    ) -> Result<()> {
        self.conn.execute(
            "INSERT INTO step_cache (key, reads, layer_id, result, run_id, leg, number, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, strftime('%Y-%m-%dT%H:%M:%SZ','now'))",
            params![
                key,
                reads_json,
                layer_id,
                result_json,
                from.0,
                from.1,
                from.2
            ],
        )?;
        Ok(())
    }

    /// The results recorded under `key`, newest first.
    pub fn cache_candidates(&self, key: &str) -> Result<Vec<CacheRow>> {
        let mut st = self.conn.prepare(
            "SELECT reads, layer_id, result, run_id, leg, number FROM step_cache
             WHERE key = ?1 ORDER BY id DESC LIMIT 16",
        )?;
        let rows = st.query_map(params![key], |r| {
            Ok(CacheRow {
                reads: r.get(0)?,
                layer_id: r.get(1)?,
                result: r.get(2)?,
                from: (r.get(3)?, r.get(4)?, r.get(5)?),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// All runs, newest first.
    pub fn runs(&self) -> Result<Vec<RunRow>> {
        let mut st = self.conn.prepare(
            "SELECT id, generation, workflow, job, event, status, started_at, hypervisor FROM runs ORDER BY id DESC",
        )?;
        let rows = st.query_map([], |r| {
            Ok(RunRow {
                run_id: r.get(0)?,
                generation: r.get(1)?,
                workflow: r.get(2)?,
                job: r.get(3)?,
                event: r.get(4)?,
                status: r.get(5)?,
                started_at: r.get(6)?,
                hypervisor: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// One run.
    pub fn run(&self, run_id: i64) -> Result<Option<RunRow>> {
        Ok(self.runs()?.into_iter().find(|r| r.run_id == run_id))
    }

    /// The JSON report a finished run was recorded with (`None` while it runs, or
    /// when it ended without one).
    pub fn run_report(&self, run_id: i64) -> Result<Option<String>> {
        let report = self
            .conn
            .query_row("SELECT report FROM runs WHERE id = ?1", [run_id], |r| {
                r.get::<_, Option<String>>(0)
            })
            .optional()?;
        Ok(report.flatten())
    }

    /// Records how run `run_id` was asked for (JSON: crate::rerun::Invocation).
    pub fn set_invocation(&self, run_id: i64, json: &str) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE runs SET invocation = ?2 WHERE id = ?1",
            params![run_id, json],
        )?;
        anyhow::ensure!(n == 1, "no run {run_id} to record its invocation");
        Ok(())
    }

    /// How run `run_id` was asked for: `Ok(None)` when there is no such run, `Some(None)`
    /// when it was recorded without (by an older udos, or not by `udos run`).
    pub fn invocation(&self, run_id: i64) -> Result<Option<Option<String>>> {
        Ok(self
            .conn
            .query_row("SELECT invocation FROM runs WHERE id = ?1", [run_id], |r| {
                r.get::<_, Option<String>>(0)
            })
            .optional()?)
    }

    /// The job legs of a run, in leg order.
    pub fn jobs(&self, run_id: i64) -> Result<Vec<JobRow>> {
        let mut st = self.conn.prepare(
            "SELECT leg, job_id, name, matrix, status, base_layer FROM jobs WHERE run_id = ?1
             ORDER BY leg",
        )?;
        let rows = st.query_map(params![run_id], |r| {
            Ok(JobRow {
                leg: r.get(0)?,
                job_id: r.get(1)?,
                name: r.get(2)?,
                matrix: r.get(3)?,
                status: r.get(4)?,
                base_layer: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The steps of a run, by leg then number.
    pub fn steps(&self, run_id: i64) -> Result<Vec<StepRow>> {
        let mut st = self.conn.prepare(
            "SELECT leg, job_id, number, step_id, name, status, exit_code, layer_id, snapshot_id, cache_key
             FROM steps WHERE run_id = ?1 ORDER BY leg, number",
        )?;
        let rows = st.query_map(params![run_id], |r| {
            Ok(StepRow {
                leg: r.get(0)?,
                job_id: r.get(1)?,
                number: r.get(2)?,
                step_id: r.get(3)?,
                name: r.get(4)?,
                status: r.get(5)?,
                exit_code: r.get(6)?,
                layer_id: r.get(7)?,
                snapshot_id: r.get(8)?,
                cache_key: r.get(9)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The input layers of a run (base, workspace), bottom first.
    pub fn inputs(&self, run_id: i64) -> Result<Vec<InputRow>> {
        let mut st = self.conn.prepare(
            "SELECT i.position, i.kind, i.layer_id, l.snapshot_id
             FROM run_inputs i JOIN layers l ON l.id = i.layer_id
             WHERE i.run_id = ?1 ORDER BY i.position",
        )?;
        let rows = st.query_map(params![run_id], |r| {
            Ok(InputRow {
                position: r.get(0)?,
                kind: r.get(1)?,
                layer_id: r.get(2)?,
                snapshot_id: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

impl Store {
    /// Every recorded layer.
    pub fn layers(&self) -> Result<Vec<LayerRow>> {
        let mut st = self
            .conn
            .prepare("SELECT id, kind, snapshot_id, created_at FROM layers ORDER BY id")?;
        let rows = st.query_map([], |r| {
            Ok(LayerRow {
                id: r.get(0)?,
                kind: r.get(1)?,
                snapshot_id: r.get(2)?,
                created_at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The guest image each run booted: (run, image id).
    pub fn run_images(&self) -> Result<Vec<(i64, String)>> {
        let mut st = self
            .conn
            .prepare("SELECT id, image_id FROM runs ORDER BY id")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes, in one transaction, the runs `runs` (their steps, legs and inputs) and
    /// the layer rows `layers` with the step cache rows naming them. Generations stay,
    /// so their numbers are never given out again. A layer still named by a step or an
    /// input of a run that stays makes the whole deletion fail (foreign keys).
    pub fn delete_runs_and_layers(&mut self, runs: &[i64], layers: &[String]) -> Result<Deleted> {
        let tx = self.conn.transaction()?;
        let mut d = Deleted::default();
        for l in layers {
            d.cache_rows +=
                tx.execute("DELETE FROM step_cache WHERE layer_id = ?1", params![l])? as u64;
        }
        for r in runs {
            for table in ["steps", "jobs", "run_inputs"] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE run_id = ?1"),
                    params![r],
                )?;
            }
            d.runs += tx.execute("DELETE FROM runs WHERE id = ?1", params![r])? as u64;
        }
        for l in layers {
            tx.execute("DELETE FROM squashed_bases WHERE layer_id = ?1", params![l])?;
            d.layers += tx.execute("DELETE FROM layers WHERE id = ?1", params![l])? as u64;
        }
        tx.commit()?;
        Ok(d)
    }
}

/// A base squashed from a job's final root on a tagged commit (crate::squash_tag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SquashedBaseRow {
    /// Its layer id (`images/base/<id>`).
    pub layer_id: String,
    /// The tagged commit whose run made it.
    pub commit: String,
    /// The base name the job's `runs-on` mapped to (`minimal`, `debian`, ...).
    pub base_name: String,
    /// The base layer the job ran on (a plain base, or an earlier squashed one).
    pub base_layer: String,
    /// The job's report id.
    pub job_id: String,
    /// The commit's tags when it was made.
    pub tags: Vec<String>,
    /// The run that made it.
    pub run_id: i64,
    /// The workspace repository's top, where gc looks for the tags.
    pub repo: String,
    /// Its restic snapshot (full id).
    pub snapshot_id: Option<String>,
    /// When it was recorded (RFC 3339, UTC; empty on a row not yet written).
    pub created_at: String,
}

impl Store {
    /// Records a squashed base (its layer row first, kind `squashed-base`); again for
    /// the same layer and commit replaces the row.
    pub fn put_squashed_base(&self, r: &SquashedBaseRow, bytes: u64) -> Result<()> {
        self.put_layer(&r.layer_id, "squashed-base", bytes, 0)?;
        if let Some(snap) = &r.snapshot_id {
            self.set_layer_snapshot(&r.layer_id, snap)?;
        }
        self.conn.execute(
            "INSERT OR REPLACE INTO squashed_bases (layer_id, commit_sha, base_name, base_layer,
                 job_id, tags, run_id, repo, snapshot_id, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, strftime('%Y-%m-%dT%H:%M:%SZ','now'))",
            params![
                r.layer_id,
                r.commit,
                r.base_name,
                r.base_layer,
                r.job_id,
                r.tags.join(" "),
                r.run_id,
                r.repo,
                r.snapshot_id
            ],
        )?;
        Ok(())
    }

    /// Every squashed base, newest run first.
    pub fn squashed_bases(&self) -> Result<Vec<SquashedBaseRow>> {
        let mut st = self.conn.prepare(
            "SELECT layer_id, commit_sha, base_name, base_layer, job_id, tags, run_id, repo,
                    snapshot_id, created_at
             FROM squashed_bases ORDER BY run_id DESC, layer_id",
        )?;
        let rows = st.query_map([], |r| {
            let tags: String = r.get(5)?;
            Ok(SquashedBaseRow {
                layer_id: r.get(0)?,
                commit: r.get(1)?,
                base_name: r.get(2)?,
                base_layer: r.get(3)?,
                job_id: r.get(4)?,
                tags: tags.split_whitespace().map(str::to_string).collect(),
                run_id: r.get(6)?,
                repo: r.get(7)?,
                snapshot_id: r.get(8)?,
                created_at: r.get(9)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// Brings the database to [`SCHEMA_VERSION`], one migration per transaction. A
/// database from a newer udos is refused rather than damaged.
fn migrate(conn: &mut Connection) -> Result<()> {
    let mut version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        bail!(
            "the database has schema version {version}, newer than this udos understands ({SCHEMA_VERSION}): use a newer udos"
        );
    }
    while version < SCHEMA_VERSION {
        let tx = conn.transaction()?;
        tx.execute_batch(MIGRATIONS[version as usize])
            .with_context(|| format!("migrating the schema from version {version}"))?;
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
        version += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use udos_core::engine::Conclusion;

    fn step(number: usize, status: Conclusion) -> StepReport {
        StepReport {
            number,
            id: Some("make".into()),
            name: "make".into(),
            status,
            outcome: status,
            conclusion: status,
            exit_code: Some(0),
            snapshot_id: None,
            layer_id: Some("base1".into()),
            cache_key: Some("k".into()),
            outputs: Default::default(),
            summary: None,
            cached_from: None,
            cached: false,
            phases_ms: Default::default(),
            error: None,
            note: None,
            console_log: None,
            actions: Vec::new(),
        }
    }

    #[test]
    fn squashed_bases_round_trip_and_go_with_their_layer() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("udos.db")).unwrap();
        let row = |commit: &str, run_id: i64| SquashedBaseRow {
            layer_id: "q".into(),
            commit: commit.into(),
            base_name: "minimal".into(),
            base_layer: "b".into(),
            job_id: "build".into(),
            tags: vec!["v1".into(), "v1.0".into()],
            run_id,
            repo: "/src/r".into(),
            snapshot_id: Some("snap".into()),
            created_at: String::new(),
        };
        s.put_squashed_base(&row("c1", 1), 10).unwrap();
        s.put_squashed_base(&row("c2", 2), 10).unwrap();
        // Again for one layer and commit: one row.
        s.put_squashed_base(&row("c2", 2), 10).unwrap();
        let got = s.squashed_bases().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].commit.as_str(), got[0].run_id), ("c2", 2));
        assert_eq!(got[0].tags, ["v1", "v1.0"]);
        assert!(!got[0].created_at.is_empty());
        assert_eq!(s.layer_snapshot("q").unwrap().as_deref(), Some("snap"));
        assert_eq!(s.layers().unwrap()[0].kind, "squashed-base");
        let d = s.delete_runs_and_layers(&[], &["q".into()]).unwrap();
        assert_eq!(d.layers, 1);
        assert!(s.squashed_bases().unwrap().is_empty());
    }

    #[test]
    fn runs_legs_steps_and_layers_round_trip_in_a_real_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("udos.db");
        let mut s = Store::open(&path).unwrap();
        let (r1, g1) = s
            .begin_run("wf.yml", "build", "push", "qemu-tcg", "img")
            .unwrap();
        let (r2, g2) = s
            .begin_run("wf.yml", "build", "push", "qemu-tcg", "img")
            .unwrap();
        assert_eq!((r2, g2), (r1 + 1, g1 + 1));
        assert_eq!(s.invocation(r1).unwrap(), Some(None));
        s.set_invocation(r1, r#"{"version":1}"#).unwrap();
        assert_eq!(
            s.invocation(r1).unwrap(),
            Some(Some(r#"{"version":1}"#.to_string()))
        );
        assert_eq!(s.invocation(r2 + 1).unwrap(), None);
        assert!(s.set_invocation(r2 + 1, "{}").is_err());
        s.put_layer("base1", "base", 10, 2).unwrap();
        s.put_layer("base1", "base", 99, 99).unwrap();
        s.set_layer_snapshot("base1", "snapA").unwrap();
        s.set_layer_snapshot("base1", "snapB").unwrap();
        assert_eq!(s.layer_snapshot("base1").unwrap().as_deref(), Some("snapA"));
        s.add_input(r1, 0, "base", "base1").unwrap();
        s.put_step(r1, 0, "build", &step(1, Conclusion::Success))
            .unwrap();
        s.put_step(r1, 1, "test", &step(1, Conclusion::Failure))
            .unwrap();
        let mut again = step(1, Conclusion::Success);
        again.snapshot_id = Some("full".into());
        s.put_step(r1, 0, "build", &again).unwrap();
        s.finish_run(r1, "success", "{}").unwrap();
        drop(s);

        let s = Store::open(&path).unwrap();
        let runs = s.runs().unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[1].status, "success");
        assert_eq!(runs[0].status, "running");
        let steps = s.steps(r1).unwrap();
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].snapshot_id.as_deref(), Some("full"));
        assert_eq!(
            (
                steps[1].leg,
                steps[1].job_id.as_str(),
                steps[1].status.as_str()
            ),
            (1, "test", "failure")
        );
        assert_eq!(
            s.inputs(r1).unwrap()[0].snapshot_id.as_deref(),
            Some("snapA")
        );
    }

    /// A database written by the previous udos (schema 1, no user_version) opens, and
    /// its runs and steps are still there, as leg 0 of their job.
    #[test]
    fn a_version_1_database_is_migrated_with_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("udos.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(SCHEMA_V1).unwrap();
            c.execute_batch(
                "INSERT INTO generations VALUES (1, '2026-01-01T00:00:00Z', 'old');
                 INSERT INTO runs (id, generation, workflow, job, status, started_at, hypervisor, image_id)
                     VALUES (1, 1, 'wf.yml', 'build', 'success', '2026-01-01T00:00:00Z', 'qemu', 'img');
                 INSERT INTO layers VALUES ('L1', 'step', 'snap1', 10, 1, '2026-01-01T00:00:00Z');
                 INSERT INTO steps (run_id, number, step_id, name, status, exit_code, layer_id, snapshot_id)
                     VALUES (1, 1, 'make', 'make', 'success', 0, 'L1', 'snap1');",
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let v: i64 = s
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let steps = s.steps(1).unwrap();
        assert_eq!(steps.len(), 1);
        assert_eq!((steps[0].leg, steps[0].job_id.as_str()), (0, "build"));
        assert_eq!(steps[0].snapshot_id.as_deref(), Some("snap1"));
        assert_eq!(s.jobs(1).unwrap()[0].job_id, "build");
        assert_eq!(s.jobs(1).unwrap()[0].base_layer, None, "not known then");
        assert_eq!(s.runs().unwrap()[0].event, "push");
        // Reopening is a no-op.
        drop(s);
        Store::open(&path).unwrap();
    }

    #[test]
    fn a_newer_database_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("udos.db");
        {
            let c = Connection::open(&path).unwrap();
            c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .unwrap();
        }
        let err = Store::open(&path).err().unwrap();
        assert!(format!("{err:#}").contains("newer"), "{err:#}");
    }
}
