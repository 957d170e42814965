//! The cluster side of `udos`: the master (`udos master serve`), the worker agent
//! (`udos agent`) and the CLI that talks to the master (`udos publish`, `udos status`,
//! `udos diff-generations`). Contract: docs/master-api.md.
//!
//! - [`agent`]: the worker loop: poll the assignment, reconcile, heartbeat;
//! - [`executor`]: what runs the instances ([`executor::Executor`]; in VMs:
//!   [`executor::VmExecutor`]);
//! - [`checkout`]: a workflow run's own worktree at its published commit;
//! - [`cli`]: the subcommands' arguments and their implementations.

pub mod agent;
pub mod checkout;
pub mod cli;
pub mod executor;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use udos_core::desired::DesiredSpec;
use udos_core::wire::InstanceState;

/// Write JSON to `path` atomically (temporary file, then rename).
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)?;
    write_atomic(path, &bytes, 0o644)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|f| f.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Write a secret (a token) to `path`, readable by its owner only (0600).
pub fn write_secret(path: &Path, secret: &str) -> Result<()> {
    write_atomic(path, format!("{secret}\n").as_bytes(), 0o600)
}

/// `snake_case` name of an instance state.
pub fn state_name(s: InstanceState) -> &'static str {
    match s {
        InstanceState::Starting => "starting",
        InstanceState::Running => "running",
        InstanceState::Succeeded => "succeeded",
        InstanceState::Failed => "failed",
        InstanceState::Stopping => "stopping",
    }
}

/// `k=v,k2=v2` → labels.
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            bail!("label `{item}` is not key=value");
        };
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() {
            bail!("label `{item}` has an empty key");
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SpecsDoc {
    List(Vec<DesiredSpec>),
    Wrapped { specs: Vec<DesiredSpec> },
}

/// The desired state a publisher sends: JSON or YAML, either a list of specs or
/// `{ "specs": [...] }` (what `nix eval .#orchestrator.vms --json` prints).
pub fn parse_specs(text: &str) -> Result<Vec<DesiredSpec>> {
    let doc: SpecsDoc = match serde_json::from_str(text) {
        Ok(d) => d,
        Err(json_err) => match serde_yaml_ng::from_str(text) {
            Ok(d) => d,
            Err(yaml_err) => {
                let looks_json = text.trim_start().starts_with(['{', '[']);
                if looks_json {
                    bail!("not a list of specs or {{\"specs\": [...]}}: {json_err}");
                }
                bail!("not a list of specs or `specs:` (YAML): {yaml_err}");
            }
        },
    };
    Ok(match doc {
        SpecsDoc::List(v) | SpecsDoc::Wrapped { specs: v } => v,
    })
}

/// Total memory of this machine, MiB (`/proc/meminfo`).
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse() {
        let l = parse_labels("zone=a, kvm=true,,").unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l["zone"], "a");
        assert!(parse_labels("zone").is_err());
        assert!(parse_labels("=a").is_err());
        assert!(parse_labels("").unwrap().is_empty());
    }

    #[test]
    fn specs_parse_from_json_or_yaml_list_or_wrapped() {
        let json = r#"[{"id":"web","hash":"00112233445566778899","kind":"service","image":"default","replicas":2,"resources":{"cpu_millis":250,"memory_mib":128}}]"#;
        assert_eq!(parse_specs(json).unwrap()[0].id, "web");
        let wrapped = format!("{{\"specs\": {json}}}");
        assert_eq!(parse_specs(&wrapped).unwrap().len(), 1);
        let yaml = "specs:\n  - id: ci\n    hash: '00112233445566778899'\n    kind: workflow_run\n    workflow: .github/workflows/ci.yml\n";
        let s = parse_specs(yaml).unwrap();
        assert_eq!(s[0].id, "ci");
        assert!(parse_specs("{\"specs\": 3}").is_err());
        assert!(parse_specs("- nope: [").is_err());
    }

    #[test]
    fn secrets_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/token");
        write_secret(&p, "abc").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "abc\n");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
