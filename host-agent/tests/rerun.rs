//! `udos rerun` end to end, in real VMs (QEMU; TCG here): a failed run rerun reuses
//! the steps before the failure (no VM), runs the rest as the next attempt, with its
//! secrets by name from the environment; `--from` runs an unchanged step again; the
//! recorded invocation holds no secret value. Needs what e2e.rs needs (scripts/test
//! provides it).

use std::process::{Command, Output};

use serde_json::Value;

mod common;
use common::{json, repo, serial, state_dir, udos_in};

const FOUR: &str = r#"
on: push
jobs:
  four:
    runs-on: ubuntu-latest
    steps:
      - run: echo one > one.txt
      - run: echo two > two.txt
      - run: test "$TOKEN" = good
        env:
          TOKEN: ${{ secrets.TOKEN }}
      - run: test "$GITHUB_RUN_ATTEMPT" -ge 2 && cat one.txt two.txt > all.txt
"#;

/// `udos ARGS` with `TOKEN` set to `token` in its environment (or unset).
fn udos(args: &[&str], token: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_udos"));
    match token {
        Some(t) => cmd.env("TOKEN", t),
        None => cmd.env_remove("TOKEN"),
    };
    udos_in(cmd, &state_dir(), args)
}

/// (status, cached?) of each step of the only leg.
fn steps(report: &Value) -> Vec<(String, bool)> {
    report["jobs"][0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["status"].as_str().unwrap().to_string(),
                !s["cached_from"].is_null(),
            )
        })
        .collect()
}

fn st(status: &str, cached: bool) -> (String, bool) {
    (status.to_string(), cached)
}

#[test]
fn a_failed_run_reruns_from_the_failure_with_its_secrets_by_name() {
    let _g = serial();
    let (_dir, wf) = repo(FOUR, &[]);
    let wf = wf.to_str().unwrap();
    let quiet = ["--json", "--no-console"];

    let out = udos(
        &[
            &["run", "--hypervisor", "qemu", "-s", "TOKEN=wrong-s3cret"][..],
            &quiet[..],
            &[wf],
        ]
        .concat(),
        None,
    );
    let first = json(&out);
    assert_eq!(out.status.code(), Some(1), "{first:#}");
    assert_eq!(
        steps(&first),
        [
            st("success", false),
            st("success", false),
            st("failure", false),
            st("skipped", false)
        ]
    );
    let run1 = first["run_id"].as_i64().unwrap().to_string();

    // The run's record names the secret, never its value.
    let db = rusqlite::Connection::open(state_dir().join("udos.db")).unwrap();
    let recorded: String = db
        .query_row("SELECT invocation FROM runs WHERE id = ?1", [&run1], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(
        recorded.contains("TOKEN") && !recorded.contains("wrong-s3cret"),
        "{recorded}"
    );

    // Without the secret in the environment: a setup error naming it.
    let out = udos(&[&["rerun", &run1][..], &quiet[..]].concat(), None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TOKEN"));

    // Steps 1 and 2 are the first run's restore points; 3 and 4 run, as attempt 2.
    let out = udos(&[&["rerun", &run1][..], &quiet[..]].concat(), Some("good"));
    let second = json(&out);
    assert_eq!(out.status.code(), Some(0), "{second:#}");
    assert_eq!(
        steps(&second),
        [
            st("success", true),
            st("success", true),
            st("success", false),
            st("success", false)
        ]
    );
    assert_eq!(
        second["jobs"][0]["steps"][1]["cached_from"]["run_id"],
        first["run_id"]
    );

    // `--from 2`: step 2 runs again although nothing it depends on changed.
    let run2 = second["run_id"].as_i64().unwrap().to_string();
    let out = udos(
        &[&["rerun", &run2, "--from", "2"][..], &quiet[..]].concat(),
        Some("good"),
    );
    let third = json(&out);
    assert_eq!(out.status.code(), Some(0), "{third:#}");
    assert_eq!(
        steps(&third),
        [
            st("success", true),
            st("success", false),
            st("success", false),
            st("success", false)
        ]
    );

    let out = udos(&["rerun", "999999"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no run 999999"));
}
