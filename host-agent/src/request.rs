//! What `udos run` was asked, from act-style flags: secrets, variables, inputs, env
//! files, platforms, matrix picks and the event payload.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indexmap::IndexMap;
use udos_core::value::{Object, Value};

/// `K=V` (or `K:V` for `--matrix`): split at the first separator; the key must not be
/// empty.
pub fn key_value(text: &str, sep: char, flag: &str) -> Result<(String, String)> {
    match text.split_once(sep) {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => bail!("{flag} {text:?}: expected KEY{sep}VALUE"),
    }
}

/// A dotenv file (`--secret-file`, `--var-file`, `--env-file`): `NAME=value` lines,
/// quotes and `#` comments as dotenv has them.
pub fn read_dotenv(path: &Path, flag: &str) -> Result<IndexMap<String, String>> {
    let mut out = IndexMap::new();
    let iter = dotenvy::from_path_iter(path)
        .with_context(|| format!("{flag} {}: cannot read it", path.display()))?;
    for item in iter {
        let (k, v) =
            item.with_context(|| format!("{flag} {}: not a dotenv file", path.display()))?;
        out.insert(k, v);
    }
    Ok(out)
}

/// Secrets from `--secret NAME[=VALUE]` (a bare name takes its value from the
/// environment, as act does) and `--secret-file`; the flags win over the file.
pub fn secrets(
    flags: &[String],
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Object> {
    let mut out = Object::new();
    if let Some(f) = file {
        for (k, v) in read_dotenv(f, "--secret-file")? {
            out.insert(k, Value::String(v));
        }
    }
    for flag in flags {
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => {
                let v = env(flag).with_context(|| {
                    format!(
                        "--secret {flag}: no value given and ${flag} is not set in the environment"
                    )
                })?;
                (flag.clone(), v)
            }
        };
        check_name(&name, "--secret")?;
        out.insert(name, Value::String(value));
    }
    Ok(out)
}

/// `--var K=V` and `--var-file`; the flags win.
pub fn vars(flags: &[String], file: Option<&Path>) -> Result<Object> {
    let mut out = Object::new();
    if let Some(f) = file {
        for (k, v) in read_dotenv(f, "--var-file")? {
            out.insert(k, Value::String(v));
        }
    }
    for flag in flags {
        let (k, v) = key_value(flag, '=', "--var")?;
        check_name(&k, "--var")?;
        out.insert(k, Value::String(v));
    }
    Ok(out)
}

/// `--env-file`: below the workflow's own `env:`.
pub fn env_file(file: Option<&Path>) -> Result<IndexMap<String, Value>> {
    Ok(match file {
        Some(f) => read_dotenv(f, "--env-file")?
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect(),
        None => IndexMap::new(),
    })
}

/// `--input K=V`, as strings (the engine types them against the workflow's inputs).
pub fn inputs(flags: &[String]) -> Result<IndexMap<String, Value>> {
    let mut out = IndexMap::new();
    for flag in flags {
        let (k, v) = key_value(flag, '=', "--input")?;
        out.insert(k, Value::String(v));
    }
    Ok(out)
}

/// `-P LABEL=BASE`.
pub fn platforms(flags: &[String], known_bases: &[&str]) -> Result<Vec<(String, String)>> {
    flags
        .iter()
        .map(|f| {
            let (label, base) = key_value(f, '=', "-P")?;
            if !known_bases.contains(&base.as_str()) {
                bail!(
                    "-P {f}: unknown base `{base}` (bases: {})",
                    known_bases.join(", ")
                );
            }
            Ok((label, base))
        })
        .collect()
}

/// `--matrix K:V`.
pub fn matrix(flags: &[String]) -> Result<Vec<(String, String)>> {
    flags
        .iter()
        .map(|f| key_value(f, ':', "--matrix"))
        .collect()
}

/// `-e FILE`: the event payload, a JSON object.
pub fn event_payload(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("-e {}: cannot read the event payload", path.display()))?;
    let v =
        Value::from_json_str(&text).with_context(|| format!("-e {}: not JSON", path.display()))?;
    if v.as_object().is_none() {
        bail!(
            "-e {}: the event payload must be a JSON object",
            path.display()
        );
    }
    Ok(v)
}

fn check_name(name: &str, flag: &str) -> Result<()> {
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        bail!("{flag} {name:?}: a name is letters, digits and `_`, not starting with a digit");
    }
    Ok(())
}

/// Where the workflows are and which event runs them, from the positional arguments
/// (`udos run [EVENT] [WORKFLOW]`) and `-W`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The event, if named.
    pub event: Option<String>,
    /// A workflow file or a directory of workflows.
    pub workflows: PathBuf,
}

/// Reads the positionals: a path that exists or ends in `.yml`/`.yaml` is the workflow
/// (as `udos run FILE` always allowed), anything else the event.
pub fn target(positionals: &[String], w_flag: Option<&Path>) -> Result<Target> {
    let mut event = None;
    let mut workflow: Option<PathBuf> = None;
    for p in positionals {
        let looks_like_file = p.ends_with(".yml") || p.ends_with(".yaml") || p.contains('/');
        if looks_like_file || Path::new(p).exists() {
            if workflow.replace(PathBuf::from(p)).is_some() {
                bail!("two workflows given ({positionals:?}): give one, or a directory with -W");
            }
        } else if event.replace(p.clone()).is_some() {
            bail!("two events given ({positionals:?}): udos run [EVENT] [WORKFLOW]");
        }
    }
    let workflows = match (workflow, w_flag) {
        (Some(_), Some(_)) => bail!("give the workflow either as an argument or with -W, not both"),
        (Some(w), None) => w,
        (None, Some(w)) => w.to_path_buf(),
        (None, None) => PathBuf::from(".github/workflows"),
    };
    Ok(Target { event, workflows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positionals_are_an_event_and_a_workflow() {
        assert_eq!(
            target(&["workflow_dispatch".into(), "ci.yml".into()], None).unwrap(),
            Target {
                event: Some("workflow_dispatch".into()),
                workflows: "ci.yml".into()
            }
        );
        assert_eq!(
            target(&["workflows/demo.yml".into()], None).unwrap().event,
            None
        );
        let t = target(&[], Some(Path::new("wf"))).unwrap();
        assert_eq!(t.workflows, PathBuf::from("wf"));
        assert_eq!(
            target(&[], None).unwrap().workflows,
            PathBuf::from(".github/workflows")
        );
        assert!(target(&["push".into(), "pull_request".into()], None).is_err());
        assert!(target(&["a.yml".into()], Some(Path::new("b.yml"))).is_err());
    }

    #[test]
    fn secrets_come_from_flags_files_and_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s.env");
        std::fs::write(&f, "A=from-file\nB=\"multi\nline\"\n# comment\n").unwrap();
        let env = |k: &str| (k == "FROM_ENV").then(|| "env-value".to_string());
        let s = secrets(&["A=flag".into(), "FROM_ENV".into()], Some(&f), &env).unwrap();
        assert_eq!(s.get("A"), Some(&Value::str("flag")));
        assert_eq!(s.get("B"), Some(&Value::str("multi\nline")));
        assert_eq!(s.get("FROM_ENV"), Some(&Value::str("env-value")));
        let err = secrets(&["MISSING".into()], None, &env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("$MISSING"), "{err}");
        assert!(secrets(&["bad-name=x".into()], None, &env).is_err());
    }

    #[test]
    fn flags_with_a_bad_shape_say_what_they_expected() {
        assert!(key_value("novalue", '=', "--var")
            .unwrap_err()
            .to_string()
            .contains("KEY=VALUE"));
        assert_eq!(
            matrix(&["os:ubuntu".into()]).unwrap(),
            vec![("os".into(), "ubuntu".into())]
        );
        assert!(platforms(&["ubuntu-latest=nope".into()], &["default"]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let e = dir.path().join("e.json");
        std::fs::write(&e, "[1]").unwrap();
        assert!(event_payload(&e)
            .unwrap_err()
            .to_string()
            .contains("object"));
    }
}
