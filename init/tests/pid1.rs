//! udos-init as PID 1 of a PID + mount namespace (harness mode; needs root), observed
//! through its console and the sealed output file.

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::Duration;

use common::Harness;
use udos_layer::{ActResult, RecordStatus, StepSecrets};

const LIMIT: Duration = Duration::from_secs(90);

fn workflow(steps: &str) -> String {
    format!("on: push\njobs:\n  udos:\n    runs-on: ubuntu-latest\n    steps:\n{steps}")
}

#[test]
fn happy_path_collects_outputs_env_and_the_layer() {
    let h = Harness::new();
    h.workflow(&workflow(
        r#"      - id: build
        run: |
          mkdir -p /workspace/out
          echo built > /workspace/out/result.txt
          echo "artifact=out/result.txt" >> "$GITHUB_OUTPUT"
          echo "BUILD_MODE=release" >> "$GITHUB_ENV"
          echo /opt/tools/bin >> "$GITHUB_PATH"
      - id: check
        run: |
          test "$BUILD_MODE" = release
          echo "saw $(cat /workspace/out/result.txt)"
          echo checked > /workspace/checked.txt
          echo "ok=yes" >> "$GITHUB_OUTPUT"
          echo "version_check=${ACT_DISABLE_VERSION_CHECK:-on}" >> "$GITHUB_OUTPUT"
"#,
    ));
    let done = h.spawn(&h.cmdline("")).wait(LIMIT);
    done.assert_powered_off();
    assert_eq!(done.result(), "success");
    let console = done.console();
    assert!(
        console.contains("  | saw built"),
        "raw output is shown: {console}"
    );
    assert!(
        !console.contains("\"stepID\""),
        "JSON is rendered, not dumped"
    );

    let sealed = h.sealed();
    let r = &sealed.record;
    assert_eq!(r.status, RecordStatus::Success, "{r:?}");
    assert_eq!(r.error, None);
    assert_eq!(r.act_exit_code, Some(0));
    let ids: Vec<&str> = r.steps.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["build", "check"]);
    let build = r.step("build").unwrap();
    assert_eq!(build.result, ActResult::Success);
    assert_eq!(
        build.outputs.get("artifact").map(String::as_str),
        Some("out/result.txt")
    );
    assert_eq!(
        build.env.get("BUILD_MODE").map(String::as_str),
        Some("release")
    );
    assert_eq!(build.path, ["/opt/tools/bin"]);
    let check = r.step("check").unwrap();
    assert_eq!(check.result, ActResult::Success);
    assert_eq!(check.outputs.get("ok").map(String::as_str), Some("yes"));
    // act is told not to fetch its notices from the internet.
    assert_eq!(
        check.outputs.get("version_check").map(String::as_str),
        Some("1")
    );
    assert!(check.env.is_empty());
    for key in ["init_to_act", "act", "seal", "mount"] {
        assert!(
            r.timings_ms.contains_key(key),
            "timings_ms.{key} missing: {:?}",
            r.timings_ms
        );
    }

    // The layer holds what the step wrote, and nothing of act's HOME or /tmp (tmpfs).
    assert_eq!(
        sealed.file("workspace/out/result.txt").as_deref(),
        Some("built\n")
    );
    assert_eq!(
        sealed.file("workspace/checked.txt").as_deref(),
        Some("checked\n")
    );
    let paths: Vec<String> = sealed.files().into_iter().map(|(p, _)| p).collect();
    assert!(
        paths
            .iter()
            .all(|p| !p.starts_with("run/") && !p.starts_with("tmp/")),
        "{paths:?}"
    );
    assert_eq!(r.layer.entries as usize, tar_entries(&sealed.layer));
}

fn tar_entries(layer: &[u8]) -> usize {
    tar::Archive::new(layer).entries().unwrap().count()
}

#[test]
fn orphans_are_reaped() {
    let h = Harness::new();
    h.workflow(&workflow(
        r#"      - id: orphans
        run: |
          (sleep 0.2 &) ; (true &)
          for i in 1 2 3; do (sleep 0.1 &); done
          sleep 1
          # Zombies whose parent is PID 1: orphans that init failed to reap.
          z=0
          for f in /proc/[0-9]*/status; do
            if grep -q '^State:.*Z' "$f" 2>/dev/null && grep -q '^PPid:[[:space:]]*1$' "$f" 2>/dev/null; then
              z=$((z+1))
            fi
          done
          echo "zombies=$z" >> "$GITHUB_OUTPUT"
"#,
    ));
    let done = h.spawn(&h.cmdline("")).wait(LIMIT);
    done.assert_powered_off();
    let r = h.sealed().record;
    assert_eq!(r.status, RecordStatus::Success, "{r:?}");
    let step = r.step("orphans").unwrap();
    // Seen from inside the step, after the orphans exited: PID 1 reaped them all.
    assert_eq!(
        step.outputs.get("zombies").map(String::as_str),
        Some("0"),
        "{step:?}"
    );
    let reaped = done
        .lines
        .iter()
        .find_map(|(_, l)| {
            l.strip_prefix("udos-init: reaped ")?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    assert!(
        reaped >= 5,
        "expected >= 5 orphans reaped, got {reaped}: {}",
        done.console()
    );
}

#[test]
fn sigterm_is_forwarded_to_act_and_the_step_still_seals() {
    let h = Harness::new();
    h.workflow(&workflow(
        r#"      - id: wait
        run: |
          echo STEP-READY
          sleep 60
"#,
    ));
    let running = h.spawn(&h.cmdline(""));
    assert!(
        running.wait_for_line("STEP-READY", Duration::from_secs(30)),
        "step never started"
    );
    running.signal(libc::SIGTERM);
    let sent = std::time::Instant::now();
    let done = running.wait(LIMIT);
    done.assert_powered_off();
    let console = done.console();
    assert!(
        console.contains("udos-init: forwarding SIGTERM to act"),
        "{console}"
    );
    // act reacted (it cancels the job on SIGTERM) long before the 60 s step would end.
    assert!(
        done.ended - sent < Duration::from_secs(20),
        "took {:?}",
        done.ended - sent
    );
    let r = h.sealed().record;
    assert_eq!(r.status, RecordStatus::Failure, "{r:?}");
    assert_ne!(r.act_exit_code, Some(0));
    assert_eq!(r.step("wait").map(|s| s.result), Some(ActResult::Failure));
    assert_eq!(done.result(), "failure");
}

#[test]
fn process_ignoring_sigterm_is_killed_after_the_grace_period() {
    let h = Harness::new();
    h.workflow(&workflow(
        r#"      - id: stubborn
        run: |
          setsid sh -c "trap '' TERM; exec sleep 1000" </dev/null >/dev/null 2>&1 &
          # Once sleep runs, its SIGTERM is ignored (SIG_IGN survives exec).
          for i in $(seq 100); do pgrep -x sleep >/dev/null && break; sleep 0.05; done
          echo left a stubborn process behind
"#,
    ));
    let done = h.spawn(&h.cmdline("udos.grace=1")).wait(LIMIT);
    done.assert_powered_off();
    let console = done.console();
    assert!(
        console.contains("processes left after the 1.0 s grace period: SIGKILL"),
        "{console}"
    );
    let shutdown = done
        .line_time("udos-init: shutdown")
        .expect("shutdown line");
    let took = done.ended - shutdown;
    assert!(
        took >= Duration::from_millis(950),
        "SIGKILL came before the grace period: {took:?}"
    );
    assert!(
        took < Duration::from_secs(4),
        "shutdown took {took:?} (grace 1 s)"
    );
    let r = h.sealed().record;
    assert_eq!(r.status, RecordStatus::Success, "{r:?}");
}

#[test]
fn failing_step_is_a_failure_record() {
    let h = Harness::new();
    h.workflow(&workflow(
        r#"      - id: ok
        run: echo fine
      - id: boom
        run: exit 3
"#,
    ));
    let done = h.spawn(&h.cmdline("")).wait(LIMIT);
    done.assert_powered_off();
    assert_eq!(done.result(), "failure");
    let r = h.sealed().record;
    assert_eq!(r.status, RecordStatus::Failure, "{r:?}");
    assert_eq!(r.act_exit_code, Some(1));
    assert_eq!(r.error, None);
    assert_eq!(r.step("ok").map(|s| s.result), Some(ActResult::Success));
    assert_eq!(r.step("boom").map(|s| s.result), Some(ActResult::Failure));
}

#[test]
fn missing_act_is_an_error_record() {
    let h = Harness::new();
    h.workflow(&workflow("      - id: never\n        run: true\n"));
    let done = h.spawn(&h.cmdline("udos.act=/nonexistent")).wait(LIMIT);
    done.assert_powered_off();
    assert_eq!(done.result(), "error");
    assert!(
        done.console()
            .contains("udos-init: error: act not found at /nonexistent"),
        "{}",
        done.console()
    );
    let r = h.sealed().record;
    assert_eq!(r.status, RecordStatus::Error);
    assert_eq!(r.error.as_deref(), Some("act not found at /nonexistent"));
    assert_eq!(r.act_exit_code, None);
    assert!(r.steps.is_empty());
}

#[test]
fn a_missing_layer_or_upper_device_is_an_error_record_naming_it() {
    // Step mode (no udos.root): PID 1 mounts /proc, /sys, /dev... in its namespace and
    // looks for the disks' virtio serials, which no disk has. The layers and the upper
    // are looked up in one scan; the error still says which one is missing (the layer
    // of the second case is a path, found at once).
    for (devices, missing) in [
        ("udos.lowers=udos-nope", "layer device udos-nope not found"),
        (
            "udos.lowers=/dev/null udos.upper=udos-up-nope",
            "upper device udos-up-nope not found",
        ),
    ] {
        let h = Harness::new();
        let cmdline = format!(
            "console=ttyS0 {devices} udos.devtimeout=1 udos.output={}",
            h.output.display()
        );
        let done = h.spawn(&cmdline).wait(LIMIT);
        done.assert_powered_off();
        assert_eq!(done.result(), "error");
        assert!(
            done.console()
                .contains(&format!("udos-init: error: {missing}")),
            "{}",
            done.console()
        );
        let sealed = h.sealed();
        assert_eq!(sealed.record.status, RecordStatus::Error);
        assert_eq!(sealed.record.error.as_deref(), Some(missing));
        assert!(sealed.layer.is_empty());
    }
}

#[test]
fn timeout_terminates_act_and_fails_the_step() {
    let h = Harness::new();
    h.workflow(&workflow("      - id: slow\n        run: sleep 60\n"));
    let done = h
        .spawn(&h.cmdline("udos.timeout=2 udos.grace=1"))
        .wait(LIMIT);
    done.assert_powered_off();
    assert!(done.ended - done.started < Duration::from_secs(20));
    assert!(
        done.console().contains("step timed out: SIGTERM to act"),
        "{}",
        done.console()
    );
    let r = h.sealed().record;
    assert_eq!(r.status, RecordStatus::Failure, "{r:?}");
    assert_eq!(r.error.as_deref(), Some("step timed out after 2 s"));
}

#[test]
fn probe_mode_prints_ok_and_powers_off() {
    let h = Harness::new();
    let done = h.spawn(&h.cmdline("udos.mode=probe")).wait(LIMIT);
    assert_eq!(
        done.status.signal(),
        Some(libc::SIGINT),
        "{}",
        done.console()
    );
    assert!(done.console().contains("UDOS-PROBE-OK"));
}

#[test]
fn bad_command_line_value_still_seals_an_error_record() {
    let h = Harness::new();
    h.workflow(&workflow("      - id: never\n        run: true\n"));
    let done = h.spawn(&h.cmdline("udos.timeout=soon")).wait(LIMIT);
    done.assert_powered_off();
    let r = h.sealed().record;
    assert_eq!(r.status, RecordStatus::Error);
    assert_eq!(
        r.error.as_deref(),
        Some("kernel command line: udos.timeout=soon: expected seconds")
    );
}

#[test]
fn a_network_in_harness_mode_is_an_error_record_not_the_hosts_interfaces() {
    let h = Harness::new();
    h.workflow(&workflow("      - id: never\n        run: true\n"));
    let done = h
        .spawn(&h.cmdline("udos.net=10.0.2.15/24,10.0.2.2,10.0.2.3"))
        .wait(LIMIT);
    done.assert_powered_off();
    let r = h.sealed().record;
    assert_eq!(r.status, RecordStatus::Error);
    assert!(
        r.error.as_deref().unwrap_or("").contains("harness mode"),
        "{r:?}"
    );
    assert!(r.steps.is_empty(), "act ran: {r:?}");
}

#[test]
fn manager_mode_without_shell_or_agent_has_nothing_to_run() {
    let h = Harness::new();
    // An .actrc is there, but manager mode skips act.
    h.workflow(&workflow("      - id: never\n        run: true\n"));
    let done = h.spawn(&h.cmdline("udos.mode=manager")).wait(LIMIT);
    done.assert_powered_off();
    assert!(!done.console().contains("act started"));
    let r = h.sealed().record;
    assert_eq!(r.status, RecordStatus::Error);
    assert_eq!(
        r.error.as_deref(),
        Some("no /.actrc and no agent: nothing to run")
    );
}

#[test]
fn manager_mode_shell_runs_on_the_console() {
    let h = Harness::new();
    // stdin is /dev/null here, so the shell reads EOF and exits 0 at once.
    let done = h
        .spawn(&h.cmdline("udos.mode=manager udos.shell=1"))
        .wait(LIMIT);
    done.assert_powered_off();
    assert!(
        done.console()
            .contains("udos-init: /bin/sh exited: exit code 0"),
        "{}",
        done.console()
    );
    let r = h.sealed().record;
    assert_eq!(r.status, RecordStatus::Success);
    assert_eq!(r.act_exit_code, None);
}

#[test]
fn service_mode_stays_up_until_sigterm_then_shuts_down_in_order() {
    let h = Harness::new();
    // An .actrc is there, but service mode never runs act.
    h.workflow(&workflow("      - id: never\n        run: true\n"));
    let running = h.spawn(&h.cmdline("udos.mode=service"));
    assert!(
        running.wait_for_line("udos-init: service up", Duration::from_secs(30)),
        "the service never came up"
    );
    // SIGHUP does not stop it; it idles.
    running.signal(libc::SIGHUP);
    assert!(running.wait_for_line("udos-init: ignoring SIGHUP", Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(500));
    assert!(running.init_pid().is_some(), "PID 1 went away on its own");
    running.signal(libc::SIGTERM);
    let sent = std::time::Instant::now();
    let done = running.wait(LIMIT);
    done.assert_powered_off();
    assert!(done.ended - sent < Duration::from_secs(10));
    let console = done.console();
    assert!(!console.contains("act started"), "{console}");
    assert!(
        console.contains("udos-init: service stopping on SIGTERM"),
        "{console}"
    );
    assert!(
        console.contains("shutdown: SIGTERM to all processes"),
        "{console}"
    );
    assert_eq!(done.result(), "success");
    let r = h.sealed().record;
    assert_eq!(r.status, RecordStatus::Success, "{r:?}");
    assert!(r.timings_ms.contains_key("service"), "{:?}", r.timings_ms);
}

#[test]
fn service_mode_stops_on_sigint_too() {
    let h = Harness::new();
    let running = h.spawn(&h.cmdline("udos.mode=service"));
    assert!(running.wait_for_line("udos-init: service up", Duration::from_secs(30)));
    running.signal(libc::SIGINT);
    let done = running.wait(LIMIT);
    done.assert_powered_off();
    assert!(done
        .console()
        .contains("udos-init: service stopping on SIGINT"));
}

// ---- secrets, masking, summaries, quiet helper steps ----

const TOKEN: &str = "tok-s3cr3t-value";
const KEY_LINES: [&str; 2] = ["key-line-one", "key-line-two"];
const EARLIER_MASK: &str = "earlier-mask-v";
const ADDED_MASK: &str = "added-mask-v";

fn step_secrets(pairs: &[(&str, String)]) -> StepSecrets {
    StepSecrets {
        secrets: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        masks: vec![EARLIER_MASK.to_string()],
    }
}

/// Writes the encoded secrets next to the step root (like the memfd the host uses).
fn secrets_file(h: &Harness, secrets: &StepSecrets) -> PathBuf {
    let path = h.dir.path().join("secrets.img");
    std::fs::write(&path, secrets.encode().unwrap()).unwrap();
    path
}

/// A stand-in act that records its argv (NUL-separated, in the step root) and prints
/// what act 0.2.89 prints for a step that shows its secrets, registers a mask and
/// writes a summary, after a quiet helper step.
const FAKE_ACT_WITH_SECRETS: &str = r##"#!/bin/bash
printf '%s\0' "$@" > /act-argv
cat <<'LOG'
{"level":"info","msg":"⭐ Run Main udos setup","step":"HELPER-STEP-FIELD","stepID":["udos-setup"]}
{"level":"info","msg":"HELPER-NOISE\n","raw_output":true,"stepID":["udos-setup"]}
{"level":"info","msg":"  ✅  Success - Main udos setup","stepID":["udos-setup"],"stepResult":"success"}
{"level":"info","msg":"token is tok-s3cr3t-value\n","raw_output":true,"step":"echo STEP-FIELD tok-s3cr3t-value","stepID":["use"]}
{"level":"info","msg":"key-line-one\n","raw_output":true,"stepID":["use"]}
{"level":"info","msg":"key-line-two\n","raw_output":true,"stepID":["use"]}
{"level":"info","msg":"earlier: earlier-mask-v\n","raw_output":true,"stepID":["use"]}
{"arg":"added-mask-v","command":"add-mask","level":"info","msg":"  ⚙  ***","stepID":["use"]}
{"level":"info","msg":"now added-mask-v\n","raw_output":true,"stepID":["use"]}
{"command":"summary","content":"# Summary with added-mask-v\n","level":"info","msg":"  ⚙  Summary - # Summary with added-mask-v\n","stepID":["use"]}
{"level":"info","msg":"  ✅  Success - Main use","stepID":["use"],"stepResult":"success"}
not JSON: tok-s3cr3t-value
LOG
echo "stderr: key-line-two" >&2
"##;

fn assert_hidden(console: &str, values: &[&str]) {
    for value in values {
        assert!(
            !console.contains(value),
            "{value:?} is on the console:\n{console}"
        );
    }
}

#[test]
fn secrets_reach_act_as_arguments_and_never_the_console() {
    let mut h = Harness::new();
    h.fake_act(FAKE_ACT_WITH_SECRETS);
    let key = format!("{}\n{}\n", KEY_LINES[0], KEY_LINES[1]);
    let secrets = secrets_file(
        &h,
        &step_secrets(&[("TOKEN", TOKEN.to_string()), ("KEY", key.clone())]),
    );
    let done = h
        .spawn(&h.cmdline(&format!("udos.secrets={}", secrets.display())))
        .wait(LIMIT);
    done.assert_powered_off();
    assert_eq!(done.result(), "success");

    // The stand-in wrote its argv into the step root (so into the layer: that is the
    // stand-in's doing; PID 1 writes no secret anywhere).
    let argv = std::fs::read(h.upper.join("act-argv")).expect("fake act ran");
    let argv: Vec<String> = argv
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert_eq!(
        argv,
        [
            "--json".to_string(),
            "--secret".into(),
            format!("KEY={key}"),
            "--secret".into(),
            format!("TOKEN={TOKEN}"),
        ]
    );

    let console = done.console();
    assert_hidden(
        &console,
        &[
            TOKEN,
            KEY_LINES[0],
            KEY_LINES[1],
            EARLIER_MASK,
            ADDED_MASK,
            "STEP-FIELD",
            "HELPER-NOISE",
            "udos setup",
        ],
    );
    for shown in [
        "  | token is ***",
        "  | earlier: ***",
        "  | now ***",
        "not JSON: ***",
        "stderr: ***",
        "udos-init: 2 secret(s) for act, 1 more value(s) to mask",
    ] {
        assert!(console.contains(shown), "{shown:?} missing:\n{console}");
    }

    let r = h.sealed().record;
    assert_eq!(r.status, RecordStatus::Success, "{r:?}");
    let ids: Vec<&str> = r.steps.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["udos-setup", "use"]);
    let step = r.step("use").unwrap();
    assert_eq!(step.masks, [ADDED_MASK]);
    assert_eq!(step.summary.as_deref(), Some("# Summary with ***\n"));
    assert_eq!(r.step("udos-setup").unwrap().result, ActResult::Success);
}

#[test]
fn a_failing_helper_step_shows_its_lines() {
    let mut h = Harness::new();
    h.fake_act(
        r#"#!/bin/sh
cat <<'LOG'
{"level":"info","msg":"HELPER-NOISE\n","raw_output":true,"stepID":["udos-setup"]}
{"level":"info","msg":"  ❌  Failure - Main udos setup","stepID":["udos-setup"],"stepResult":"failure"}
LOG
exit 1
"#,
    );
    let done = h.spawn(&h.cmdline("")).wait(LIMIT);
    done.assert_powered_off();
    let console = done.console();
    assert!(console.contains("  | HELPER-NOISE"), "{console}");
    assert!(console.contains("Failure - Main udos setup"), "{console}");
    let r = h.sealed().record;
    assert_eq!(r.step("udos-setup").unwrap().result, ActResult::Failure);
}

#[test]
fn a_corrupt_secrets_device_is_an_error_record() {
    let mut h = Harness::new();
    h.fake_act("#!/bin/sh\necho ACT-RAN\n");
    let path = secrets_file(&h, &step_secrets(&[("TOKEN", TOKEN.to_string())]));
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(TOKEN.len())
        .position(|w| w == TOKEN.as_bytes())
        .unwrap();
    bytes[at] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let done = h
        .spawn(&h.cmdline(&format!("udos.secrets={}", path.display())))
        .wait(LIMIT);
    done.assert_powered_off();
    assert_eq!(done.result(), "error");
    let console = done.console();
    assert!(!console.contains("ACT-RAN"), "act must not run: {console}");
    assert!(!console.contains("act started"), "{console}");
    let r = h.sealed().record;
    assert_eq!(r.status, RecordStatus::Error);
    assert_eq!(
        r.error,
        Some(format!(
            "secrets device {}: checksum mismatch",
            path.display()
        ))
    );
    assert!(r.steps.is_empty());
}

#[test]
fn a_missing_secrets_device_is_an_error_record() {
    let mut h = Harness::new();
    h.fake_act("#!/bin/sh\necho ACT-RAN\n");
    let done = h
        .spawn(&h.cmdline("udos.secrets=udos-nope udos.devtimeout=0.3"))
        .wait(LIMIT);
    done.assert_powered_off();
    assert!(!done.console().contains("ACT-RAN"), "{}", done.console());
    let r = h.sealed().record;
    assert_eq!(r.status, RecordStatus::Error);
    assert_eq!(
        r.error.as_deref(),
        Some("secrets device udos-nope not found")
    );
}

#[test]
fn real_act_gets_the_secrets_and_the_console_is_masked() {
    let h = Harness::new();
    h.workflow(&workflow(
        r##"      - id: udos-setup
        run: echo HELPER-NOISE
      - id: use
        run: |
          echo "single ${{ secrets.S }}"
          echo "multi ${{ secrets.M }}"
          echo "earlier: earlier-mask-v"
          echo "::add-mask::added-mask-v"
          echo "now added-mask-v"
          echo "# sum added-mask-v" >> "$GITHUB_STEP_SUMMARY"
          test "${{ secrets.S }}" = "s1ngle-secret-v" && echo "ok=yes" >> "$GITHUB_OUTPUT"
"##,
    ));
    let (single, lines) = ("s1ngle-secret-v", ["multi-line-one", "multi-line-two"]);
    let secrets = secrets_file(
        &h,
        &step_secrets(&[
            ("S", single.to_string()),
            ("M", format!("{}\n{}", lines[0], lines[1])),
        ]),
    );
    let done = h
        .spawn(&h.cmdline(&format!("udos.secrets={}", secrets.display())))
        .wait(LIMIT);
    done.assert_powered_off();
    assert_eq!(done.result(), "success", "{}", done.console());
    let console = done.console();
    assert_hidden(
        &console,
        &[
            single,
            lines[0],
            lines[1],
            EARLIER_MASK,
            ADDED_MASK,
            "HELPER-NOISE",
        ],
    );
    for shown in [
        "  | single ***",
        "  | multi ***",
        "  | ***",
        "  | earlier: ***",
        "  | now ***",
    ] {
        assert!(console.contains(shown), "{shown:?} missing:\n{console}");
    }

    let sealed = h.sealed();
    let r = &sealed.record;
    assert_eq!(r.status, RecordStatus::Success, "{r:?}");
    let step = r.step("use").unwrap();
    assert_eq!(
        step.outputs.get("ok").map(String::as_str),
        Some("yes"),
        "act resolved secrets.S"
    );
    assert_eq!(step.masks, [ADDED_MASK]);
    assert_eq!(step.summary.as_deref(), Some("# sum ***\n"));
    // Nothing of the secrets landed in the step's layer (act's home is on /run).
    for value in [single, lines[0], lines[1]] {
        assert!(
            !sealed
                .layer
                .windows(value.len())
                .any(|w| w == value.as_bytes()),
            "{value:?} is in the layer: {:?}",
            sealed
                .files()
                .into_iter()
                .map(|(p, _)| p)
                .collect::<Vec<_>>()
        );
    }
}

/// The stand-in act reads a workspace file itself (act's own reads are not the step's),
/// then runs the step: it reads `a.txt`, `c.txt` through a symlink to the workspace
/// (as act's scratch workspace is), and `d.txt`, which it then deletes; lists `dir`;
/// writes `new.txt` and reads it back; never opens `b.txt`.
const FAKE_ACT_READING: &str = r#"#!/bin/sh
read -r own < /workspace/act-own.txt
ln -s /workspace /run/udos/home/scratch
sh -c '
  cat /workspace/a.txt /run/udos/home/scratch/c.txt /workspace/d.txt > /dev/null
  rm /workspace/d.txt
  ls /workspace/dir > /dev/null
  echo new > /workspace/new.txt
  cat /workspace/new.txt > /dev/null
  cat /opt/udos/act > /dev/null
'
"#;

fn workspace_files(h: &Harness) {
    let ws = h.base.join("workspace");
    std::fs::create_dir_all(ws.join("dir")).unwrap();
    for f in ["a.txt", "b.txt", "c.txt", "d.txt", "act-own.txt", "dir/x"] {
        std::fs::write(ws.join(f), f).unwrap();
    }
}

#[test]
fn the_record_lists_the_workspace_files_and_dirs_the_step_opened() {
    let mut h = Harness::new();
    workspace_files(&h);
    h.fake_act(FAKE_ACT_READING);
    let done = h.spawn(&h.cmdline("")).wait(LIMIT);
    done.assert_powered_off();
    assert_eq!(done.result(), "success", "{}", done.console());
    let r = h.sealed().record;
    let reads = r.reads.expect("a read set");
    // Files the step created count too (the host finds them absent from its input).
    assert_eq!(reads.files, ["a.txt", "c.txt", "d.txt", "new.txt"]);
    assert_eq!(reads.dirs, ["dir"]);
    assert!(!reads.truncated);
    let console = done.console();
    assert!(
        console.contains("udos-init: read 4 file(s) and 1 dir(s) under /workspace"),
        "{console}"
    );
}

#[test]
fn without_fanotify_reads_are_null_and_the_step_runs() {
    let mut h = Harness::new();
    workspace_files(&h);
    h.fake_act(FAKE_ACT_READING);
    h.deny_fanotify = true;
    let done = h.spawn(&h.cmdline("")).wait(LIMIT);
    done.assert_powered_off();
    assert_eq!(done.result(), "success", "{}", done.console());
    let r = h.sealed().record;
    assert_eq!(r.status, RecordStatus::Success, "{r:?}");
    assert_eq!(r.reads, None);
    let console = done.console();
    assert!(
        console.contains(
            "udos-init: warning: cannot record what the step reads (fanotify_init: ENOSYS"
        ),
        "{console}"
    );
}

#[test]
fn real_act_records_the_step_reads_but_not_its_own() {
    let h = Harness::new();
    workspace_files(&h);
    h.workflow(&workflow(
        r#"      - id: read
        run: |
          cat /workspace/a.txt
          ls /workspace/dir
"#,
    ));
    let done = h.spawn(&h.cmdline("")).wait(LIMIT);
    done.assert_powered_off();
    assert_eq!(done.result(), "success", "{}", done.console());
    let reads = h.sealed().record.reads.expect("a read set");
    assert_eq!(reads.files, ["a.txt"], "{reads:?}");
    assert_eq!(reads.dirs, ["dir"], "{reads:?}");
}

#[test]
fn reads_of_processes_act_left_behind_count_until_they_are_gone() {
    let mut h = Harness::new();
    workspace_files(&h);
    // The leftover reads b.txt only when shutdown's SIGTERM reaches it, after act exited.
    h.fake_act(
        r#"#!/bin/sh
setsid sh -c 'trap "cat /workspace/b.txt > /dev/null; exit 0" TERM; echo > /run/udos/home/ready; while :; do sleep 0.05; done' </dev/null >/dev/null 2>&1 &
while [ ! -e /run/udos/home/ready ]; do sleep 0.01; done
"#,
    );
    let done = h.spawn(&h.cmdline("")).wait(LIMIT);
    done.assert_powered_off();
    assert_eq!(done.result(), "success", "{}", done.console());
    let reads = h.sealed().record.reads.expect("a read set");
    assert_eq!(reads.files, ["b.txt"], "{}", done.console());
}
