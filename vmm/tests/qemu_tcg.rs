//! Real boots of Debian's cloud kernel under QEMU microvm with TCG.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use udos_vmm::{layout, Accel, Disk, Hypervisor, Qemu, VmExit, VmOutcome, VmSpec};

fn qemu() -> Qemu {
    Qemu::find(Accel::Tcg).expect("qemu-system-x86_64 (apt-get install qemu-system-x86)")
}

type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

fn spec_with_lines(name: &str, dir: &Path, extra_cmdline: &str) -> (VmSpec, Lines) {
    let lines: Lines = Arc::new(Mutex::new(Vec::new()));
    let l2 = lines.clone();
    let mut spec = VmSpec::new(name, kernel(), initramfs(), dir.join("vm"));
    spec.cmdline = format!("console=ttyS0 quiet panic=-1 {extra_cmdline}");
    spec.memory_mib = 256;
    spec.timeout = BOOT_TIMEOUT;
    spec.console = Some(Box::new(move |l: &str| {
        l2.lock().unwrap().push((Instant::now(), l.to_string()));
    }));
    (spec, lines)
}

fn texts(lines: &Lines) -> Vec<String> {
    lines
        .lock()
        .unwrap()
        .iter()
        .map(|(_, l)| l.clone())
        .collect()
}

fn boot_two_disks(name: &str, dir: &Path) -> (VmOutcome, Lines) {
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    raw_disk(&a, 1);
    raw_disk(&b, 2);
    let (mut spec, lines) = spec_with_lines(name, dir, "test.disks=2");
    spec.disks = vec![Disk::read_only(&a, "udos-a"), Disk::writable(&b, "udos-b")];
    let outcome = qemu().run(spec).expect("qemu runs");
    (outcome, lines)
}

fn assert_booted(outcome: &VmOutcome, lines: &Lines) {
    let got = texts(lines);
    assert_eq!(
        outcome.exit,
        VmExit::PoweredOff,
        "console: {got:#?}\nstderr: {}",
        std::fs::read_to_string(&outcome.hypervisor_log).unwrap_or_default()
    );
    assert!(got.iter().any(|l| l == "UDOS-TEST-BOOTED"), "{got:#?}");
    let mut serials: Vec<&str> = got
        .iter()
        .filter_map(|l| l.strip_prefix("SERIAL "))
        .collect();
    serials.sort();
    assert_eq!(serials, ["udos-a", "udos-b"], "{got:#?}");
    assert!(got.iter().any(|l| l == "UDOS-TEST-DONE"));
    let log = std::fs::read_to_string(&outcome.console_log).unwrap();
    assert!(log.contains("UDOS-TEST-BOOTED") && log.contains("SERIAL udos-b"));
    assert!(outcome.first_console_line_after.is_some());
    assert!(!process_alive_with(outcome.pid, "qemu"));
}

#[test]
fn boots_with_two_disks_and_streams_the_console_live() {
    let dir = tempfile::tempdir().unwrap();
    let (outcome, lines) = boot_two_disks("two-disks", dir.path());
    assert_booted(&outcome, &lines);
    // Lines arrive while the VM runs, not in one batch at the end.
    let l = lines.lock().unwrap();
    let first = l.first().unwrap().0;
    let end = outcome.boot_started + outcome.wall;
    assert!(first < end, "the first line arrived only after QEMU exited");
    let rt = dir.path().join("vm");
    assert!(rt.join(layout::CONSOLE_LOG).is_file());
    assert!(rt.join(layout::HYPERVISOR_STDERR).is_file());
    assert!(rt.join(layout::COMMAND).is_file());
    assert!(
        !rt.join(layout::PID_FILE).exists(),
        "the pid file outlived the VM"
    );
    println!(
        "TCG boot: first console line after {:?}, powered off after {:?}",
        outcome.first_console_line_after.unwrap(),
        outcome.wall
    );
}

#[test]
fn a_hanging_guest_is_killed_at_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spec, lines) = spec_with_lines("sleeper", dir.path(), "test.sleep");
    let timeout = Duration::from_secs(8);
    spec.timeout = timeout;
    let t0 = Instant::now();
    let outcome = qemu().run(spec).unwrap();
    let took = t0.elapsed();
    assert_eq!(outcome.exit, VmExit::TimedOut, "{:?}", texts(&lines));
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(10),
        "{took:?}"
    );
    assert!(!process_alive_with(outcome.pid, "qemu"), "qemu survived");
    assert_eq!(
        outcome.console_log,
        dir.path().join("vm").join(layout::CONSOLE_LOG)
    );
    let stderr = std::fs::read_to_string(&outcome.hypervisor_log).unwrap();
    assert!(stderr.contains("timeout"), "{stderr}");
    // Under heavy load the guest may not have reached PID 1 in 8 s; when it did, the
    // marker is in the log.
    if texts(&lines).iter().any(|l| l == "SLEEPING") {
        assert!(std::fs::read_to_string(&outcome.console_log)
            .unwrap()
            .contains("SLEEPING"));
    }
}

#[test]
fn two_vms_run_in_parallel() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let t0 = Instant::now();
    let handles: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let p = d.path().to_path_buf();
            std::thread::spawn(move || boot_two_disks(&format!("par{i}"), &p))
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (outcome, lines) in &results {
        assert_booted(outcome, lines);
    }
    // They overlapped in time.
    let (a, b) = (&results[0].0, &results[1].0);
    let (a_end, b_end) = (a.boot_started + a.wall, b.boot_started + b.wall);
    assert!(a.boot_started < b_end && b.boot_started < a_end);
    println!(
        "two parallel TCG VMs: {:?} and {:?}, {:?} in all",
        a.wall,
        b.wall,
        t0.elapsed()
    );
}

#[test]
fn a_running_guest_is_stopped_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, lines) = spec_with_lines("stoppable", dir.path(), "test.sleep");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let vm = std::thread::spawn(move || qemu().run_until(spec, &flag));
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while !texts(&lines).iter().any(|l| l.contains("SLEEPING")) {
        assert!(
            Instant::now() < deadline,
            "never booted: {:?}",
            texts(&lines)
        );
        assert!(!vm.is_finished(), "ended early: {:?}", texts(&lines));
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid_file = dir.path().join("vm").join(layout::PID_FILE);
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let t0 = Instant::now();
    stop.store(true, std::sync::atomic::Ordering::Release);
    let outcome = vm.join().unwrap().unwrap();
    assert_eq!(outcome.exit, VmExit::Stopped);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(!process_alive_with(pid, "qemu"), "qemu {pid} survived");
    assert!(!pid_file.exists());
}

#[test]
fn a_qemu_failure_is_a_crash_with_its_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("not-a-kernel");
    std::fs::write(&bogus, vec![0x5a; 4096]).unwrap();
    let mut spec = VmSpec::new("bogus", &bogus, initramfs(), dir.path().join("vm"));
    spec.timeout = Duration::from_secs(60);
    let outcome = qemu().run(spec).unwrap();
    match &outcome.exit {
        VmExit::Crashed { code, detail, .. } => {
            assert_eq!(*code, Some(1));
            assert!(detail.contains("kernel"), "{detail}");
        }
        other => panic!("expected a crash, got {other:?}"),
    }
    assert!(outcome.wall < Duration::from_secs(30));
}

#[test]
fn a_second_vm_on_the_same_runtime_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spec, _) = spec_with_lines("first", dir.path(), "test.sleep");
    spec.timeout = Duration::from_secs(5);
    let (spec2, _) = spec_with_lines("second", dir.path(), "test.sleep");
    let first = std::thread::spawn(move || qemu().run(spec));
    let pid_file = dir.path().join("vm").join(layout::PID_FILE);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pid_file.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let err = qemu().run(spec2).unwrap_err();
    assert!(err.to_string().contains("already in use"), "{err}");
    assert_eq!(first.join().unwrap().unwrap().exit, VmExit::TimedOut);
}

const HELPER_ENV: &str = "UDOS_VMM_TEST_HOLD_DIR";

/// Not a test by itself: run by `no_orphan_when_the_host_process_is_killed` in a
/// child process, which it then SIGKILLs.
#[test]
#[ignore = "helper process for no_orphan_when_the_host_process_is_killed"]
fn helper_hold_a_vm() {
    let Some(dir) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let (mut spec, _) = spec_with_lines("held", Path::new(&dir), "test.sleep");
    spec.timeout = Duration::from_secs(300);
    let _ = qemu().run(spec);
}

#[test]
fn no_orphan_when_the_host_process_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_hold_a_vm", "--ignored", "--nocapture"])
        .env(HELPER_ENV, dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid_file = dir.path().join("vm").join(layout::PID_FILE);
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let qemu_pid: u32 = loop {
        if let Ok(s) = std::fs::read_to_string(&pid_file) {
            if let Ok(p) = s.trim().parse() {
                break p;
            }
        }
        assert!(Instant::now() < deadline, "the helper never started qemu");
        assert!(child.try_wait().unwrap().is_none(), "the helper exited");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(process_alive_with(qemu_pid, "qemu"));
    child.kill().unwrap(); // SIGKILL: no unwinding, no Drop
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive_with(qemu_pid, "qemu") {
        assert!(
            Instant::now() < deadline,
            "qemu {qemu_pid} outlived its host process"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
