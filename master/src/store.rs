//! Durable state of the master: generations, the active one, commit → generation,
//! the audit log and enrolled workers.
//!
//! [`Store`] is the interface (a PostgreSQL implementation can come later);
//! [`SqliteStore`] implements it on one SQLite file (WAL, busy timeout). A
//! publication is one transaction: validated first, so nothing is written when it is
//! refused.
//!
//! The schema is versioned with `PRAGMA user_version` and [`MIGRATIONS`]: opening a
//! database brings it to the latest version, one transaction per step; a database of
//! a newer version is refused. Version 1 predates `user_version` (it is recognised by
//! its `meta.schema_version` row).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use udos_core::desired::{self, DesiredSpec, Invalid, Resources};
use udos_core::wire::Heartbeat;

pub use crate::api::TokenIssuedBy;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The publication is invalid; nothing was written.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The database refused.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored JSON column does not parse.
    #[error("stored JSON does not parse: {0}")]
    Json(#[from] serde_json::Error),
    /// The database holds something this version cannot read.
    #[error("database content is inconsistent: {0}")]
    Corrupt(String),
}

/// A stored generation, specs included (sorted by id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationRecord {
    /// Generation number.
    pub number: u64,
    /// The built commit.
    pub commit: String,
    /// sha256(commit + canonical specs JSON), hex.
    pub intent_hash: String,
    /// The desired state, sorted by id.
    pub specs: Vec<DesiredSpec>,
    /// Signature over the intent, hex, when published signed.
    pub signature: Option<String>,
    /// First publication, unix ms.
    pub published_at_ms: u64,
    /// Who published it first.
    pub publisher: String,
}

/// A stored generation without its specs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationMeta {
    /// Generation number.
    pub number: u64,
    /// The built commit.
    pub commit: String,
    /// Intent hash.
    pub intent_hash: String,
    /// Number of specs.
    pub spec_count: usize,
    /// Its signature (hex), if it carries one.
    pub signature: Option<String>,
    /// First publication, unix ms.
    pub published_at_ms: u64,
    /// Who published it first.
    pub publisher: String,
}

/// What to store for a publication. The caller has checked auth and signature.
#[derive(Debug, Clone)]
pub struct NewPublication<'a> {
    /// The commit.
    pub commit: &'a str,
    /// The specs as published (any order).
    pub specs: &'a [DesiredSpec],
    /// Optional signature (hex).
    pub signature: Option<&'a str>,
    /// Whether the caller verified `signature` under its intent key. A verified
    /// signature replaces the one an existing generation carries; an unverified one
    /// is stored only where there is none.
    pub signature_verified: bool,
    /// Who publishes.
    pub publisher: &'a str,
    /// The client's address.
    pub remote: Option<&'a str>,
    /// Now, unix ms.
    pub at_ms: u64,
}

/// Result of a publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOutcome {
    /// The generation of this intent.
    pub generation: u64,
    /// Its intent hash.
    pub intent_hash: String,
    /// false when the intent already had a generation.
    pub created: bool,
    /// The generation that was active before (None at first).
    pub previous_active: Option<u64>,
}

/// One audit-log line (an accepted publication).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Sequence number.
    pub seq: u64,
    /// When, unix ms.
    pub at_ms: u64,
    /// Who.
    pub publisher: String,
    /// From where.
    pub remote: Option<String>,
    /// Commit.
    pub commit: String,
    /// Generation.
    pub generation: u64,
    /// Intent hash.
    pub intent_hash: String,
    /// Whether a new generation was created.
    pub created: bool,
}

fn issuer_text(by: TokenIssuedBy) -> &'static str {
    match by {
        TokenIssuedBy::EnrollmentToken => "enrollment_token",
        TokenIssuedBy::WorkerToken => "worker_token",
        TokenIssuedBy::Publisher => "publisher",
    }
}

fn parse_issuer(text: &str) -> Result<TokenIssuedBy, StoreError> {
    match text {
        "enrollment_token" => Ok(TokenIssuedBy::EnrollmentToken),
        "worker_token" => Ok(TokenIssuedBy::WorkerToken),
        "publisher" => Ok(TokenIssuedBy::Publisher),
        other => Err(StoreError::Corrupt(format!(
            "unknown token issuer `{other}`"
        ))),
    }
}

/// An enrolled worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRecord {
    /// Worker id.
    pub id: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Capacity.
    pub capacity: Resources,
    /// sha256 of its bearer token.
    pub token_hash: [u8; 32],
    /// Who issued that token.
    pub token_issued_by: TokenIssuedBy,
    /// Enrollment time, unix ms.
    pub enrolled_at_ms: u64,
    /// Last heartbeat, unix ms.
    pub last_heartbeat_at_ms: Option<u64>,
    /// Generation of its last heartbeat.
    pub seen_generation: u64,
    /// Its last heartbeat.
    pub last_heartbeat: Option<Heartbeat>,
}

/// The master's durable state.
pub trait Store: Send {
    /// Validate and store a publication in one transaction, and make it active.
    /// The same intent again returns its existing generation (`created: false`).
    fn publish(&mut self, p: &NewPublication<'_>) -> Result<PublishOutcome, StoreError>;
    /// The active generation, if any.
    fn active_generation(&self) -> Result<Option<GenerationRecord>, StoreError>;
    /// One generation.
    fn generation(&self, number: u64) -> Result<Option<GenerationRecord>, StoreError>;
    /// All generations, oldest first.
    fn generations(&self) -> Result<Vec<GenerationMeta>, StoreError>;
    /// The latest generation published for a commit.
    fn generation_for_commit(&self, commit: &str) -> Result<Option<u64>, StoreError>;
    /// The audit log, oldest first.
    fn audit(&self) -> Result<Vec<AuditRecord>, StoreError>;
    /// Insert or replace a worker (re-enrollment replaces its token, labels and capacity).
    fn upsert_worker(&mut self, w: &WorkerRecord) -> Result<(), StoreError>;
    /// All workers, by id.
    fn workers(&self) -> Result<Vec<WorkerRecord>, StoreError>;
    /// Record a worker's heartbeat.
    fn record_heartbeat(&mut self, at_ms: u64, hb: &Heartbeat) -> Result<(), StoreError>;
}

/// [`Store`] on a SQLite file.
pub struct SqliteStore {
    conn: Connection,
}

/// Schema migrations: `MIGRATIONS[i]` takes a database from version `i` to `i + 1`
/// (`PRAGMA user_version`). Append only: a released step is never edited.
pub const MIGRATIONS: &[&str] = &[V1, V2];

/// The latest schema version.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Version 1: generations, the active one, commits, audit log, workers.
const V1: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS generations (
    number INTEGER PRIMARY KEY AUTOINCREMENT,
    commit_id TEXT NOT NULL,
    intent_hash TEXT NOT NULL UNIQUE,
    specs_json TEXT NOT NULL,
    spec_count INTEGER NOT NULL,
    signature TEXT,
    published_at INTEGER NOT NULL,
    publisher TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS active (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    generation INTEGER NOT NULL REFERENCES generations(number),
    activated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS commits (
    commit_id TEXT PRIMARY KEY,
    generation INTEGER NOT NULL REFERENCES generations(number)
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    action TEXT NOT NULL,
    publisher TEXT NOT NULL,
    remote TEXT,
    commit_id TEXT NOT NULL,
    generation INTEGER NOT NULL REFERENCES generations(number),
    intent_hash TEXT NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    labels_json TEXT NOT NULL,
    cpu_millis INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    token_hash TEXT NOT NULL,
    enrolled_at INTEGER NOT NULL,
    last_heartbeat_at INTEGER,
    seen_generation INTEGER NOT NULL DEFAULT 0,
    last_heartbeat_json TEXT
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '1');
";

/// Version 2: who issued each worker's token (enrollment can no longer take a
/// worker over; a replacement by the publisher shows). `meta.schema_version` follows,
/// so a version-1 master, which checks it, refuses the database.
const V2: &str = "
ALTER TABLE workers ADD COLUMN token_issued_by TEXT NOT NULL DEFAULT 'enrollment_token';
UPDATE meta SET value = '2' WHERE key = 'schema_version';
";

/// The schema version of `conn`: `user_version`, or 1 for a version-1 database,
/// which did not set it.
fn schema_version(conn: &Connection) -> Result<u32, StoreError> {
    let version: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version != 0 {
        return Ok(version);
    }
    let has_meta: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta')",
        [],
        |r| r.get(0),
    )?;
    if !has_meta {
        return Ok(0);
    }
    let legacy: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    match legacy.as_deref() {
        Some("1") => Ok(1),
        other => Err(StoreError::Corrupt(format!(
            "no user_version and meta.schema_version {other:?}: not a udos master database"
        ))),
    }
}

/// Bring `conn` to [`SCHEMA_VERSION`], one transaction per step.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let from = schema_version(conn)?;
    if from > SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "the database has schema version {from}, this master knows versions up to {SCHEMA_VERSION}: it was written by a newer master"
        )));
    }
    for (step, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        let to = step as u32 + 1;
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", to)?;
        tx.commit()?;
        if from > 0 {
            tracing::info!("master database migrated to schema version {to}");
        }
    }
    Ok(())
}

impl SqliteStore {
    /// Open (creating if needed) the database file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// A private in-memory database (tests).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        conn.busy_timeout(Duration::from_secs(10))?;
        // WAL: readers never block the writer; NORMAL is durable across process
        // crashes (a power loss may lose the last transactions, never corrupt).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        Ok(Self { conn })
    }

    fn read_generation(&self, number: u64) -> Result<Option<GenerationRecord>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT number, commit_id, intent_hash, specs_json, signature, published_at, publisher
                 FROM generations WHERE number = ?1",
                params![number as i64],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, Option<String>>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, String>(6)?,
                    ))
                },
            )
            .optional()?;
        let Some((number, commit, intent_hash, specs_json, signature, published_at, publisher)) =
            row
        else {
            return Ok(None);
        };
        Ok(Some(GenerationRecord {
            number: number as u64,
            commit,
            intent_hash,
            specs: serde_json::from_str(&specs_json)?,
            signature,
            published_at_ms: published_at as u64,
            publisher,
        }))
    }
}

fn parse_token_hash(text: &str) -> Result<[u8; 32], StoreError> {
    hex::decode(text)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| StoreError::Corrupt(format!("token hash `{text}` is not 64 hex digits")))
}

impl Store for SqliteStore {
    fn publish(&mut self, p: &NewPublication<'_>) -> Result<PublishOutcome, StoreError> {
        desired::validate(p.commit, p.specs)?;
        let intent_hash = desired::intent_hash(p.commit, p.specs);
        let specs_json = desired::canonical_specs_json(p.specs);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let previous_active: Option<i64> = tx
            .query_row("SELECT generation FROM active WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()?;
        let existing: Option<(i64, Option<String>)> = tx
            .query_row(
                "SELECT number, signature FROM generations WHERE intent_hash = ?1",
                params![intent_hash],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let (generation, created) = match existing {
            Some((number, signature)) => {
                let better = signature.is_none() || p.signature_verified;
                if p.signature.is_some() && better && signature.as_deref() != p.signature {
                    tx.execute(
                        "UPDATE generations SET signature = ?1 WHERE number = ?2",
                        params![p.signature, number],
                    )?;
                }
                (number, false)
            }
            None => {
                tx.execute(
                    "INSERT INTO generations
                       (commit_id, intent_hash, specs_json, spec_count, signature, published_at, publisher)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        p.commit,
                        intent_hash,
                        specs_json,
                        p.specs.len() as i64,
                        p.signature,
                        p.at_ms as i64,
                        p.publisher
                    ],
                )?;
                (tx.last_insert_rowid(), true)
            }
        };
        tx.execute(
            "INSERT INTO commits (commit_id, generation) VALUES (?1, ?2)
             ON CONFLICT (commit_id) DO UPDATE SET generation = excluded.generation",
            params![p.commit, generation],
        )?;
        tx.execute(
            "INSERT INTO active (id, generation, activated_at) VALUES (1, ?1, ?2)
             ON CONFLICT (id) DO UPDATE SET generation = excluded.generation,
                                            activated_at = excluded.activated_at",
            params![generation, p.at_ms as i64],
        )?;
        tx.execute(
            "INSERT INTO audit (at, action, publisher, remote, commit_id, generation, intent_hash, created)
             VALUES (?1, 'publish', ?2, ?3, ?4, ?5, ?6, ?7)",
            params![p.at_ms as i64, p.publisher, p.remote, p.commit, generation, intent_hash, created],
        )?;
        tx.commit()?;
        Ok(PublishOutcome {
            generation: generation as u64,
            intent_hash,
            created,
            previous_active: previous_active.map(|n| n as u64),
        })
    }

    fn active_generation(&self) -> Result<Option<GenerationRecord>, StoreError> {
        let active: Option<i64> = self
            .conn
            .query_row("SELECT generation FROM active WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()?;
        match active {
            None => Ok(None),
            Some(n) => match self.read_generation(n as u64)? {
                Some(g) => Ok(Some(g)),
                None => Err(StoreError::Corrupt(format!(
                    "active generation {n} is not stored"
                ))),
            },
        }
    }

    fn generation(&self, number: u64) -> Result<Option<GenerationRecord>, StoreError> {
        if number > i64::MAX as u64 {
            return Ok(None);
        }
        self.read_generation(number)
    }

    fn generations(&self) -> Result<Vec<GenerationMeta>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT number, commit_id, intent_hash, spec_count, signature, published_at, publisher
             FROM generations ORDER BY number",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(GenerationMeta {
                number: r.get::<_, i64>(0)? as u64,
                commit: r.get(1)?,
                intent_hash: r.get(2)?,
                spec_count: r.get::<_, i64>(3)? as usize,
                signature: r.get(4)?,
                published_at_ms: r.get::<_, i64>(5)? as u64,
                publisher: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn generation_for_commit(&self, commit: &str) -> Result<Option<u64>, StoreError> {
        let n: Option<i64> = self
            .conn
            .query_row(
                "SELECT generation FROM commits WHERE commit_id = ?1",
                params![commit],
                |r| r.get(0),
            )
            .optional()?;
        Ok(n.map(|n| n as u64))
    }

    fn audit(&self) -> Result<Vec<AuditRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT seq, at, publisher, remote, commit_id, generation, intent_hash, created
             FROM audit ORDER BY seq",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(AuditRecord {
                seq: r.get::<_, i64>(0)? as u64,
                at_ms: r.get::<_, i64>(1)? as u64,
                publisher: r.get(2)?,
                remote: r.get(3)?,
                commit: r.get(4)?,
                generation: r.get::<_, i64>(5)? as u64,
                intent_hash: r.get(6)?,
                created: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn upsert_worker(&mut self, w: &WorkerRecord) -> Result<(), StoreError> {
        let labels = serde_json::to_string(&w.labels)?;
        let hb = w
            .last_heartbeat
            .as_ref()
            .map(serde_json::to_string)
            .transpose()?;
        self.conn.execute(
            "INSERT INTO workers (id, labels_json, cpu_millis, memory_mib, token_hash, enrolled_at,
                                  last_heartbeat_at, seen_generation, last_heartbeat_json,
                                  token_issued_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (id) DO UPDATE SET
                labels_json = excluded.labels_json, cpu_millis = excluded.cpu_millis,
                memory_mib = excluded.memory_mib, token_hash = excluded.token_hash,
                enrolled_at = excluded.enrolled_at, last_heartbeat_at = excluded.last_heartbeat_at,
                seen_generation = excluded.seen_generation,
                last_heartbeat_json = excluded.last_heartbeat_json,
                token_issued_by = excluded.token_issued_by",
            params![
                w.id,
                labels,
                w.capacity.cpu_millis as i64,
                w.capacity.memory_mib as i64,
                hex::encode(w.token_hash),
                w.enrolled_at_ms as i64,
                w.last_heartbeat_at_ms.map(|t| t as i64),
                w.seen_generation as i64,
                hb,
                issuer_text(w.token_issued_by)
            ],
        )?;
        Ok(())
    }

    fn workers(&self) -> Result<Vec<WorkerRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, labels_json, cpu_millis, memory_mib, token_hash, enrolled_at,
                    last_heartbeat_at, seen_generation, last_heartbeat_json, token_issued_by
             FROM workers ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, Option<i64>>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, Option<String>>(8)?,
                r.get::<_, String>(9)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, labels, cpu, mem, token, enrolled, last_hb, seen, hb_json, issuer) = row?;
            out.push(WorkerRecord {
                id,
                labels: serde_json::from_str(&labels)?,
                capacity: Resources {
                    cpu_millis: cpu as u64,
                    memory_mib: mem as u64,
                },
                token_hash: parse_token_hash(&token)?,
                token_issued_by: parse_issuer(&issuer)?,
                enrolled_at_ms: enrolled as u64,
                last_heartbeat_at_ms: last_hb.map(|t| t as u64),
                seen_generation: seen as u64,
                last_heartbeat: hb_json.as_deref().map(serde_json::from_str).transpose()?,
            });
        }
        Ok(out)
    }

    fn record_heartbeat(&mut self, at_ms: u64, hb: &Heartbeat) -> Result<(), StoreError> {
        let json = serde_json::to_string(hb)?;
        self.conn.execute(
            "UPDATE workers SET last_heartbeat_at = ?1, seen_generation = ?2, last_heartbeat_json = ?3
             WHERE id = ?4",
            params![at_ms as i64, hb.seen_generation as i64, json, hb.worker_id],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use udos_core::desired::SpecKind;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    fn spec(id: &str) -> DesiredSpec {
        DesiredSpec {
            id: id.into(),
            hash: "ab".repeat(16),
            kind: SpecKind::WorkflowRun {
                workflow: "ci.yml".into(),
                job: None,
                repository: None,
            },
            labels: BTreeMap::new(),
            selector: BTreeMap::new(),
            resources: Resources::default(),
        }
    }

    fn publication<'a>(specs: &'a [DesiredSpec]) -> NewPublication<'a> {
        NewPublication {
            commit: COMMIT,
            specs,
            signature: None,
            signature_verified: false,
            publisher: "ci",
            remote: None,
            at_ms: 1000,
        }
    }

    #[test]
    fn publish_numbers_dedupes_and_reactivates() {
        let mut s = SqliteStore::in_memory().unwrap();
        let a = [spec("a")];
        let b = [spec("a"), spec("b")];
        let o1 = s.publish(&publication(&a)).unwrap();
        assert_eq!(
            (o1.generation, o1.created, o1.previous_active),
            (1, true, None)
        );
        let o2 = s.publish(&publication(&b)).unwrap();
        assert_eq!(
            (o2.generation, o2.created, o2.previous_active),
            (2, true, Some(1))
        );
        let again = s.publish(&publication(&a)).unwrap();
        assert_eq!((again.generation, again.created), (1, false));
        assert_eq!(s.active_generation().unwrap().unwrap().number, 1);
        assert_eq!(s.generation_for_commit(COMMIT).unwrap(), Some(1));
        assert_eq!(s.generations().unwrap().len(), 2);
        assert_eq!(s.audit().unwrap().len(), 3);
        assert_eq!(s.generation(2).unwrap().unwrap().specs, b.to_vec());
    }

    #[test]
    fn invalid_publication_writes_nothing() {
        let mut s = SqliteStore::in_memory().unwrap();
        let dup = [spec("a"), spec("a")];
        assert!(matches!(
            s.publish(&publication(&dup)),
            Err(StoreError::Invalid(_))
        ));
        assert!(s.generations().unwrap().is_empty());
        assert!(s.audit().unwrap().is_empty());
        assert!(s.active_generation().unwrap().is_none());
    }

    /// The schema the first release created, verbatim (it set no `user_version`).
    /// Kept apart from [`MIGRATIONS`], so that an edit of a released step shows here.
    const RELEASED_V1: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS generations (
    number INTEGER PRIMARY KEY AUTOINCREMENT,
    commit_id TEXT NOT NULL,
    intent_hash TEXT NOT NULL UNIQUE,
    specs_json TEXT NOT NULL,
    spec_count INTEGER NOT NULL,
    signature TEXT,
    published_at INTEGER NOT NULL,
    publisher TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS active (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    generation INTEGER NOT NULL REFERENCES generations(number),
    activated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS commits (
    commit_id TEXT PRIMARY KEY,
    generation INTEGER NOT NULL REFERENCES generations(number)
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    action TEXT NOT NULL,
    publisher TEXT NOT NULL,
    remote TEXT,
    commit_id TEXT NOT NULL,
    generation INTEGER NOT NULL REFERENCES generations(number),
    intent_hash TEXT NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    labels_json TEXT NOT NULL,
    cpu_millis INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    token_hash TEXT NOT NULL,
    enrolled_at INTEGER NOT NULL,
    last_heartbeat_at INTEGER,
    seen_generation INTEGER NOT NULL DEFAULT 0,
    last_heartbeat_json TEXT
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '1');
";

    fn user_version(path: &Path) -> u32 {
        Connection::open(path)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_version_1_database_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.db");
        let specs = [spec("a")];
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(RELEASED_V1).unwrap();
            conn.execute(
                "INSERT INTO generations (commit_id, intent_hash, specs_json, spec_count,
                                          signature, published_at, publisher)
                 VALUES (?1, ?2, ?3, 1, NULL, 7, 'ci')",
                params![
                    COMMIT,
                    desired::intent_hash(COMMIT, &specs),
                    desired::canonical_specs_json(&specs)
                ],
            )
            .unwrap();
            conn.execute_batch(
                "INSERT INTO active (id, generation, activated_at) VALUES (1, 1, 7);
                 INSERT INTO workers (id, labels_json, cpu_millis, memory_mib, token_hash,
                                      enrolled_at, last_heartbeat_at, seen_generation,
                                      last_heartbeat_json)
                 VALUES ('w1', '{\"zone\":\"a\"}', 1000, 512,
                         '0707070707070707070707070707070707070707070707070707070707070707',
                         5, NULL, 0, NULL);",
            )
            .unwrap();
        }
        assert_eq!(user_version(&path), 0);

        let mut s = SqliteStore::open(&path).unwrap();
        assert_eq!(user_version(&path), SCHEMA_VERSION);
        assert_eq!(SCHEMA_VERSION, 2);
        let meta: String = s
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            meta, "2",
            "a version-1 master must refuse the migrated database"
        );
        let workers = s.workers().unwrap();
        assert_eq!(workers.len(), 1);
        assert_eq!(workers[0].id, "w1");
        assert_eq!(workers[0].labels["zone"], "a");
        assert_eq!(workers[0].token_hash, [7; 32]);
        assert_eq!(workers[0].token_issued_by, TokenIssuedBy::EnrollmentToken);
        let active = s.active_generation().unwrap().unwrap();
        assert_eq!((active.number, active.specs.clone()), (1, specs.to_vec()));
        // It works as a current database: numbering goes on, new columns are written.
        let more = [spec("b")];
        assert_eq!(s.publish(&publication(&more)).unwrap().generation, 2);
        let mut w = workers[0].clone();
        w.token_issued_by = TokenIssuedBy::Publisher;
        s.upsert_worker(&w).unwrap();
        drop(s);
        // Opening again changes nothing.
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(user_version(&path), SCHEMA_VERSION);
        assert_eq!(s.workers().unwrap(), vec![w]);
        assert_eq!(s.generations().unwrap().len(), 2);
    }

    #[test]
    fn a_database_of_a_newer_master_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.db");
        drop(SqliteStore::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let e = SqliteStore::open(&path)
            .err()
            .expect("a newer schema was opened");
        assert!(e.to_string().contains("newer master"), "{e}");
        // Something that is not a master database at all is refused too.
        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE meta (key TEXT, value TEXT)")
            .unwrap();
        assert!(SqliteStore::open(&other).is_err());
    }

    #[test]
    fn workers_round_trip() {
        let mut s = SqliteStore::in_memory().unwrap();
        let mut w = WorkerRecord {
            id: "w1".into(),
            labels: BTreeMap::from([("zone".into(), "a".into())]),
            capacity: Resources {
                cpu_millis: 4000,
                memory_mib: 8192,
            },
            token_hash: [7; 32],
            token_issued_by: TokenIssuedBy::Publisher,
            enrolled_at_ms: 5,
            last_heartbeat_at_ms: None,
            seen_generation: 0,
            last_heartbeat: None,
        };
        s.upsert_worker(&w).unwrap();
        let hb = Heartbeat {
            worker_id: "w1".into(),
            seen_generation: 3,
            instances: vec![],
            used: Resources::default(),
        };
        s.record_heartbeat(99, &hb).unwrap();
        w.last_heartbeat_at_ms = Some(99);
        w.seen_generation = 3;
        w.last_heartbeat = Some(hb);
        assert_eq!(s.workers().unwrap(), vec![w]);
    }
}
