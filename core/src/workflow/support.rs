//! The support table: every key of a workflow file, and whether udos implements it,
//! accepts and ignores it (saying so), or refuses it (naming it).
//!
//! The parser walks each mapping against its table, so a key is never dropped
//! silently, and `docs/workflows.md` lists the same keys with the same status (a test
//! reads the doc and compares).

/// What udos does with a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Implemented as GitHub does.
    Supported,
    /// Accepted; it has no effect in udos, and the run says so.
    Ignored(&'static str),
    /// The workflow is refused with this reason.
    Refused(&'static str),
}

/// One key of one mapping.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// The key as written in YAML.
    pub name: &'static str,
    /// What udos does with it.
    pub support: Support,
}

const fn ok(name: &'static str) -> Key {
    Key {
        name,
        support: Support::Supported,
    }
}

const fn ignored(name: &'static str, why: &'static str) -> Key {
    Key {
        name,
        support: Support::Ignored(why),
    }
}

const fn refused(name: &'static str, why: &'static str) -> Key {
    Key {
        name,
        support: Support::Refused(why),
    }
}

const NO_TOKEN: &str = "udos gives steps no GITHUB_TOKEN, so there is nothing to scope";
const NO_DOCKER: &str = "udos runs steps in micro-VMs without Docker";

/// Top level of a workflow file.
pub const WORKFLOW: &[Key] = &[
    ok("name"),
    ok("run-name"),
    ok("on"),
    ok("env"),
    ok("defaults"),
    ok("jobs"),
    ignored("permissions", NO_TOKEN),
    ignored(
        "concurrency",
        "a local run has no other runs of the group to cancel or wait for",
    ),
];

/// A job that runs steps.
pub const JOB: &[Key] = &[
    ok("name"),
    ok("needs"),
    ok("if"),
    ok("runs-on"),
    ok("env"),
    ok("defaults"),
    ok("outputs"),
    ok("steps"),
    ok("strategy"),
    ok("continue-on-error"),
    ok("timeout-minutes"),
    ignored("permissions", NO_TOKEN),
    ignored(
        "concurrency",
        "a local run has no other runs of the group to cancel or wait for",
    ),
    ignored(
        "environment",
        "deployment environments (protection rules, environment secrets) do not exist locally",
    ),
    refused("container", NO_DOCKER),
    refused("services", NO_DOCKER),
    refused(
        "snapshot",
        "custom runner images are made with `udos image`, not from a job",
    ),
];

/// A job that calls a reusable workflow (`uses:` on the job).
pub const CALL_JOB: &[Key] = &[
    ok("name"),
    ok("uses"),
    ok("with"),
    ok("secrets"),
    ok("needs"),
    ok("if"),
    ok("strategy"),
    ignored("permissions", NO_TOKEN),
    ignored(
        "concurrency",
        "a local run has no other runs of the group to cancel or wait for",
    ),
];

/// A step.
pub const STEP: &[Key] = &[
    ok("id"),
    ok("name"),
    ok("if"),
    ok("run"),
    ok("shell"),
    ok("working-directory"),
    ok("uses"),
    ok("with"),
    ok("env"),
    ok("continue-on-error"),
    ok("timeout-minutes"),
];

/// `strategy:`.
pub const STRATEGY: &[Key] = &[ok("matrix"), ok("fail-fast"), ok("max-parallel")];

/// `defaults:` (workflow and job).
pub const DEFAULTS: &[Key] = &[ok("run")];

/// `defaults.run:`.
pub const DEFAULTS_RUN: &[Key] = &[ok("shell"), ok("working-directory")];

/// Every table, with the path it applies to, for the docs test and error messages.
pub const TABLES: &[(&str, &[Key])] = &[
    ("", WORKFLOW),
    ("jobs.<job_id>", JOB),
    ("jobs.<job_id> (reusable workflow call)", CALL_JOB),
    ("jobs.<job_id>.steps[*]", STEP),
    ("jobs.<job_id>.strategy", STRATEGY),
    ("defaults", DEFAULTS),
    ("defaults.run", DEFAULTS_RUN),
];

/// The contexts expressions can read, and whether udos provides them.
pub const CONTEXTS: &[(&str, Support)] = &[
    ("github", Support::Supported),
    ("env", Support::Supported),
    ("vars", Support::Supported),
    ("secrets", Support::Supported),
    ("inputs", Support::Supported),
    ("matrix", Support::Supported),
    ("strategy", Support::Supported),
    ("needs", Support::Supported),
    ("steps", Support::Supported),
    ("job", Support::Supported),
    ("jobs", Support::Supported),
    ("runner", Support::Supported),
];

/// Looks `key` up in `table`.
pub fn lookup(table: &[Key], key: &str) -> Option<Support> {
    table.iter().find(|k| k.name == key).map(|k| k.support)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/workflows.md lists every key of every table with the same status word, so
    /// the document stays true when the table changes.
    #[test]
    fn the_docs_list_every_key_with_its_status() {
        let doc = include_str!("../../../docs/workflows.md");
        for (path, table) in TABLES {
            for key in *table {
                let word = match key.support {
                    Support::Supported => "supported",
                    Support::Ignored(_) => "ignored",
                    Support::Refused(_) => "refused",
                };
                let full = if path.is_empty() {
                    key.name.to_string()
                } else {
                    format!(
                        "{}.{}",
                        path.trim_end_matches(" (reusable workflow call)"),
                        key.name
                    )
                };
                let row = doc
                    .lines()
                    .find(|l| l.starts_with('|') && l.contains(&format!("`{full}`")))
                    .unwrap_or_else(|| panic!("docs/workflows.md has no row for `{full}`"));
                assert!(
                    row.to_lowercase().contains(word),
                    "docs/workflows.md says something else than `{word}` for `{full}`: {row}"
                );
            }
        }
        for (name, _) in CONTEXTS {
            assert!(
                doc.contains(&format!("| `{name}`")),
                "docs/workflows.md does not list the `{name}` context"
            );
        }
    }
}
