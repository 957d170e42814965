//! Runs, steps and layers, recorded in SQLite (`<state>/udos.db`).
//!
//! Each local `udos run` is one generation: the number is taken when the run starts,
//! so runs are numbered in the order they began. Timestamps are UTC RFC 3339, made by
//! SQLite itself (`strftime`).

use std::path::Path;

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

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
    /// Workflow file.
    pub workflow: String,
    /// Job id.
    pub job: String,
    /// `running`, `success`, `failure` or `error`.
    pub status: String,
    /// RFC 3339 start time (UTC).
    pub started_at: String,
    /// Hypervisor used.
    pub hypervisor: String,
}

/// A step of a run, with its layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRow {
    /// 1-based step number.
    pub number: i64,
    /// The user's step id, if any.
    pub step_id: Option<String>,
    /// Display name.
    pub name: String,
    /// `success`, `failure` or `skipped`.
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

const SCHEMA: &str = r#"
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

impl Store {
    /// Open (and create or migrate) the store at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let conn = Connection::open(path)
            .with_context(|| format!("opening the udos database {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("creating the schema in {}", path.display()))?;
        Ok(Store { conn })
    }

    /// Start a run: take the next generation number and record the run as `running`.
    pub fn begin_run(
        &mut self,
        workflow: &str,
        job: &str,
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
            "INSERT INTO runs (generation, workflow, job, status, started_at, hypervisor, image_id)
             VALUES (?1, ?2, ?3, 'running', strftime('%Y-%m-%dT%H:%M:%SZ','now'), ?4, ?5)",
            params![generation, workflow, job, hypervisor, image_id],
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

    /// Record (or update) a step of a run.
    #[allow(clippy::too_many_arguments)]
    pub fn put_step(
        &self,
        run_id: i64,
        row: &StepRow,
        outputs_json: &str,
        phases_json: &str,
        error: Option<&str>,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT INTO steps (run_id, number, step_id, name, status, exit_code, layer_id, snapshot_id, cache_key, outputs, phases_ms, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT(run_id, number) DO UPDATE SET
               status = excluded.status, exit_code = excluded.exit_code, layer_id = excluded.layer_id,
               snapshot_id = excluded.snapshot_id, cache_key = excluded.cache_key,
               outputs = excluded.outputs, phases_ms = excluded.phases_ms, error = excluded.error",
            params![
                run_id,
                row.number,
                row.step_id,
                row.name,
                row.status,
                row.exit_code,
                row.layer_id,
                row.snapshot_id,
                row.cache_key,
                outputs_json,
                phases_json,
                error
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

    /// All runs, newest first.
    pub fn runs(&self) -> Result<Vec<RunRow>> {
        let mut st = self.conn.prepare(
            "SELECT id, generation, workflow, job, status, started_at, hypervisor FROM runs ORDER BY id DESC",
        )?;
        let rows = st.query_map([], |r| {
            Ok(RunRow {
                run_id: r.get(0)?,
                generation: r.get(1)?,
                workflow: r.get(2)?,
                job: r.get(3)?,
                status: r.get(4)?,
                started_at: r.get(5)?,
                hypervisor: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// One run.
    pub fn run(&self, run_id: i64) -> Result<Option<RunRow>> {
        Ok(self.runs()?.into_iter().find(|r| r.run_id == run_id))
    }

    /// The steps of a run, in order.
    pub fn steps(&self, run_id: i64) -> Result<Vec<StepRow>> {
        let mut st = self.conn.prepare(
            "SELECT number, step_id, name, status, exit_code, layer_id, snapshot_id, cache_key
             FROM steps WHERE run_id = ?1 ORDER BY number",
        )?;
        let rows = st.query_map(params![run_id], |r| {
            Ok(StepRow {
                number: r.get(0)?,
                step_id: r.get(1)?,
                name: r.get(2)?,
                status: r.get(3)?,
                exit_code: r.get(4)?,
                layer_id: r.get(5)?,
                snapshot_id: r.get(6)?,
                cache_key: r.get(7)?,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_steps_and_layers_round_trip_in_a_real_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("udos.db");
        let mut s = Store::open(&path).unwrap();
        let (r1, g1) = s.begin_run("wf.yml", "build", "qemu-tcg", "img").unwrap();
        let (r2, g2) = s.begin_run("wf.yml", "build", "qemu-tcg", "img").unwrap();
        assert_eq!((r2, g2), (r1 + 1, g1 + 1));
        s.put_layer("base1", "base", 10, 2).unwrap();
        s.put_layer("base1", "base", 99, 99).unwrap();
        s.set_layer_snapshot("base1", "snapA").unwrap();
        s.set_layer_snapshot("base1", "snapB").unwrap();
        assert_eq!(s.layer_snapshot("base1").unwrap().as_deref(), Some("snapA"));
        s.add_input(r1, 0, "base", "base1").unwrap();
        let row = StepRow {
            number: 1,
            step_id: Some("make".into()),
            name: "make".into(),
            status: "success".into(),
            exit_code: Some(0),
            layer_id: Some("base1".into()),
            snapshot_id: None,
            cache_key: Some("k".into()),
        };
        s.put_step(r1, &row, "{}", "{}", None).unwrap();
        s.put_step(
            r1,
            &StepRow {
                snapshot_id: Some("full".into()),
                ..row
            },
            "{}",
            "{}",
            None,
        )
        .unwrap();
        s.finish_run(r1, "success", "{}").unwrap();
        drop(s);

        // Reopen: everything is on disk.
        let s = Store::open(&path).unwrap();
        let runs = s.runs().unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[1].status, "success");
        assert_eq!(runs[0].status, "running");
        let steps = s.steps(r1).unwrap();
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].snapshot_id.as_deref(), Some("full"));
        let inputs = s.inputs(r1).unwrap();
        assert_eq!(inputs[0].snapshot_id.as_deref(), Some("snapA"));
    }
}
