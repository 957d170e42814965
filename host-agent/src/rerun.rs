//! `udos rerun RUN [--from STEP] [--job JOB]`: a recorded run asked for again
//! (docs/restore-points.md).
//!
//! Every `udos run` records its [`Invocation`]: its directory, its flags with each
//! secret reduced to its name, the event payload `-e` gave, and its attempt. A rerun
//! plans again from those, as attempt + 1: the same workflows, event, inputs, vars and
//! flags; the secrets' values come from the environment (or the same `--secret-file`).
//! Steps are reused through the step cache (docs/cache.md): those whose inputs are
//! unchanged are the restore points the run made, and boot no VM. `--from STEP` makes
//! step STEP of each job (of JOB with `--job`) and every later step of its leg run
//! again even when unchanged.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The version of [`Invocation`]'s format.
pub const INVOCATION_VERSION: u32 = 1;

/// How a run was asked for: what `udos rerun` replays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invocation {
    /// [`INVOCATION_VERSION`] when written.
    pub version: u32,
    /// The directory `udos run` ran in (relative paths in `args` are from there).
    pub cwd: PathBuf,
    /// The run's attempt: 1 for a first run.
    pub attempt: u32,
    /// `udos run`'s flags, each secret's value removed ([`secret_names`]).
    pub args: serde_json::Value,
    /// The event payload `-e` named, as it was read.
    pub event: Option<serde_json::Value>,
}

/// Why a recorded invocation cannot be replayed.
#[derive(Debug, thiserror::Error)]
pub enum RerunError {
    /// Not JSON of this format.
    #[error("run {run}'s recorded invocation cannot be read by this udos: {why}")]
    Unreadable {
        /// The run.
        run: i64,
        /// serde's words.
        why: String,
    },
    /// Written by a newer udos.
    #[error(
        "run {run} was recorded by a newer udos (invocation format {version}): use a newer udos"
    )]
    Newer {
        /// The run.
        run: i64,
        /// Its format version.
        version: u32,
    },
}

impl Invocation {
    /// Reads the JSON the store holds for run `run`.
    pub fn parse(run: i64, json: &str) -> Result<Invocation, RerunError> {
        let inv: Invocation = serde_json::from_str(json).map_err(|e| RerunError::Unreadable {
            run,
            why: e.to_string(),
        })?;
        if inv.version > INVOCATION_VERSION {
            return Err(RerunError::Newer {
                run,
                version: inv.version,
            });
        }
        Ok(inv)
    }
}

/// `--secret NAME[=VALUE]` flags reduced to their names: a rerun takes each value from
/// the environment, as act does for a bare name. Values are never recorded.
pub fn secret_names(flags: &[String]) -> Vec<String> {
    flags
        .iter()
        .map(|f| f.split_once('=').map_or(f.as_str(), |(name, _)| name))
        .map(str::to_string)
        .collect()
}

/// `--from STEP [--job JOB]`: the step from which a rerun runs every step again,
/// whether or not its inputs changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RerunFrom {
    /// Only the legs of this job (`None`: every job).
    pub job: Option<String>,
    /// 1-based step number in the job.
    pub step: usize,
}

impl RerunFrom {
    /// Must step `step` of a leg of job `job_id` run again?
    pub fn forces(&self, job_id: &str, step: usize) -> bool {
        step >= self.step && self.job.as_deref().is_none_or(|j| j == job_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_recorded_by_name_only() {
        let flags = [
            "TOKEN=hunter2".to_string(),
            "FROM_ENV".into(),
            "K=a=b".into(),
        ];
        assert_eq!(secret_names(&flags), ["TOKEN", "FROM_ENV", "K"]);
    }

    #[test]
    fn from_forces_that_step_and_later_of_the_named_job_only() {
        let every = RerunFrom { job: None, step: 3 };
        assert!(!every.forces("build", 2));
        assert!(every.forces("build", 3) && every.forces("test", 7));
        let one = RerunFrom {
            job: Some("test".into()),
            step: 1,
        };
        assert!(one.forces("test", 1));
        assert!(!one.forces("build", 5));
    }

    #[test]
    fn an_invocation_round_trips_and_a_newer_or_broken_one_is_refused() {
        let inv = Invocation {
            version: INVOCATION_VERSION,
            cwd: "/src/app".into(),
            attempt: 2,
            args: serde_json::json!({"args": ["push"], "secret": ["TOKEN"]}),
            event: Some(serde_json::json!({"ref": "refs/heads/main"})),
        };
        let text = serde_json::to_string(&inv).unwrap();
        assert_eq!(Invocation::parse(4, &text).unwrap(), inv);
        let newer = text.replace(
            &format!("\"version\":{INVOCATION_VERSION}"),
            "\"version\":99",
        );
        let err = Invocation::parse(4, &newer).unwrap_err().to_string();
        assert!(err.contains("newer udos"), "{err}");
        let err = Invocation::parse(4, "{}").unwrap_err().to_string();
        assert!(err.contains("run 4"), "{err}");
    }
}
