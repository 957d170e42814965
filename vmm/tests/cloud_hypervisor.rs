//! cloud-hypervisor through its REST API. Skipped (with a printed SKIP line) when the
//! binary is not found: it is not packaged by Debian; build it from source and put it
//! in PATH or set UDOS_CLOUD_HYPERVISOR.
//!
//! On kvm-pvm hosts (like the build machines) a stock Linux guest cannot boot under
//! cloud-hypervisor, so these tests boot tiny hand-made PVH "kernels" (a few bytes of
//! 32-bit code that print a line on the serial port, then power off through
//! cloud-hypervisor's ACPI shutdown port or halt forever). That still covers the whole
//! driver: the API sequence, the serial console file and its live tail, the exit on
//! guest power-off, the timeout path (`vm.shutdown` / `vmm.shutdown` / SIGKILL) and
//! process cleanup. A last test runs the real Debian kernel and only checks that the
//! driver ends it cleanly, whatever KVM does with it.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use udos_vmm::{layout, CloudHypervisor, Disk, Hypervisor, VmExit, VmSpec, VmmError};

fn ch() -> Option<CloudHypervisor> {
    match CloudHypervisor::find() {
        Ok(c) if Path::new("/dev/kvm").exists() => Some(c),
        Ok(_) => {
            println!("SKIP: cloud-hypervisor needs /dev/kvm");
            None
        }
        Err(_) => {
            println!("SKIP: cloud-hypervisor not found (set UDOS_CLOUD_HYPERVISOR)");
            None
        }
    }
}

/// How a PVH stub ends after printing its message.
#[derive(Clone, Copy)]
enum End {
    /// `hlt` for ever.
    Halt,
    /// S5 on cloud-hypervisor's ACPI shutdown port (0x600): a clean power-off.
    PowerOff,
    /// Jumps into unbacked guest-physical memory: KVM cannot fetch the code and
    /// reports an internal error; cloud-hypervisor logs `VCPU generated error` and
    /// exits with code 0.
    VcpuError,
    /// `ud2` without an IDT: a triple fault, which cloud-hypervisor answers with a
    /// reset (and boots the guest again).
    TripleFault,
}

/// A minimal ELF64 with a Xen PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`) whose
/// 32-bit code writes `message` to COM1, then ends as `end` says.
fn pvh_kernel(path: &Path, message: &str, end: End) {
    const LOAD: u32 = 0x10_0000;
    const CODE_OFF: usize = 0x200;
    let mut code: Vec<u8> = Vec::new();
    let msg_at_patch = 1; // imm32 of `mov esi, msg`
    code.extend_from_slice(&[0xBE, 0, 0, 0, 0]); // 0: mov esi, msg
    code.extend_from_slice(&[0x66, 0xBA, 0xF8, 0x03]); // 5: mov dx, 0x3f8
    code.push(0xAC); // 9: lodsb
    code.extend_from_slice(&[0x84, 0xC0]); // 10: test al, al
    code.extend_from_slice(&[0x74, 0x03]); // 12: jz 17
    code.push(0xEE); // 14: out dx, al
    code.extend_from_slice(&[0xEB, 0xF8]); // 15: jmp 9
    match end {
        End::Halt => {}
        End::PowerOff => {
            code.extend_from_slice(&[0x66, 0xBA, 0x00, 0x06]); // mov dx, 0x600
            code.extend_from_slice(&[0xB0, 0x34]); // mov al, (5 << 2) | (1 << 5)
            code.push(0xEE); // out dx, al
        }
        End::VcpuError => {
            code.push(0xB8); // mov eax, 0xd0000000
            code.extend_from_slice(&0xD000_0000u32.to_le_bytes());
            code.extend_from_slice(&[0xFF, 0xE0]); // jmp eax
        }
        End::TripleFault => code.extend_from_slice(&[0x0F, 0x0B]), // ud2
    }
    code.extend_from_slice(&[0xF4, 0xEB, 0xFD]); // hlt; jmp hlt
    let msg_addr = LOAD + code.len() as u32;
    code[msg_at_patch..msg_at_patch + 4].copy_from_slice(&msg_addr.to_le_bytes());
    code.extend_from_slice(message.as_bytes());
    code.push(0);

    let mut f = vec![0u8; CODE_OFF];
    let put16 = |f: &mut Vec<u8>, o: usize, v: u16| f[o..o + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |f: &mut Vec<u8>, o: usize, v: u32| f[o..o + 4].copy_from_slice(&v.to_le_bytes());
    let put64 = |f: &mut Vec<u8>, o: usize, v: u64| f[o..o + 8].copy_from_slice(&v.to_le_bytes());
    // ELF header.
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // version
    put16(&mut f, 16, 2); // ET_EXEC
    put16(&mut f, 18, 62); // EM_X86_64
    put32(&mut f, 20, 1);
    put64(&mut f, 24, LOAD as u64); // e_entry
    put64(&mut f, 32, 64); // e_phoff
    put16(&mut f, 52, 64); // e_ehsize
    put16(&mut f, 54, 56); // e_phentsize
    put16(&mut f, 56, 2); // e_phnum
                          // The note: namesz 4, descsz 4, type 18, "Xen\0", entry.
    let note_off = 64 + 2 * 56;
    put32(&mut f, note_off, 4);
    put32(&mut f, note_off + 4, 4);
    put32(&mut f, note_off + 8, 18);
    f[note_off + 12..note_off + 16].copy_from_slice(b"Xen\0");
    put32(&mut f, note_off + 16, LOAD);
    // PT_LOAD.
    let ph = 64;
    put32(&mut f, ph, 1);
    put32(&mut f, ph + 4, 5); // R+X
    put64(&mut f, ph + 8, CODE_OFF as u64);
    put64(&mut f, ph + 16, LOAD as u64);
    put64(&mut f, ph + 24, LOAD as u64);
    put64(&mut f, ph + 32, code.len() as u64);
    put64(&mut f, ph + 40, code.len() as u64);
    put64(&mut f, ph + 48, 0x1000);
    // PT_NOTE.
    let ph = 64 + 56;
    put32(&mut f, ph, 4);
    put32(&mut f, ph + 4, 4);
    put64(&mut f, ph + 8, note_off as u64);
    put64(&mut f, ph + 32, 20);
    put64(&mut f, ph + 40, 20);
    put64(&mut f, ph + 48, 4);
    f.extend_from_slice(&code);
    std::fs::write(path, f).unwrap();
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    initramfs: PathBuf,
    disk: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let initramfs = root.join("initramfs");
    std::fs::write(&initramfs, vec![0u8; 512]).unwrap();
    let disk = root.join("disk.img");
    raw_disk(&disk, 1);
    Fixture {
        _dir: dir,
        root,
        initramfs,
        disk,
    }
}

type Lines = Arc<Mutex<Vec<String>>>;

fn spec(fx: &Fixture, kernel: &Path, name: &str) -> (VmSpec, Lines) {
    let lines: Lines = Arc::new(Mutex::new(Vec::new()));
    let l2 = lines.clone();
    let mut s = VmSpec::new(name, kernel, &fx.initramfs, fx.root.join(name));
    s.memory_mib = 128;
    s.timeout = Duration::from_secs(30);
    s.disks = vec![Disk::writable(&fx.disk, "udos-a")];
    s.console = Some(Box::new(move |l: &str| {
        l2.lock().unwrap().push(l.to_string())
    }));
    (s, lines)
}

fn gone(pid: u32) -> bool {
    !process_alive_with(pid, "cloud-hypervisor")
}

/// Our child `pid` has been reaped (waitpid knows no such child).
fn reaped(pid: u32) -> bool {
    matches!(
        waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)),
        Err(nix::errno::Errno::ECHILD)
    )
}

/// Live processes whose command line mentions `dir` (a VMM of that runtime dir).
fn processes_in(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| process_alive_with(pid, &needle))
        .collect()
}

/// What a finished run must leave: no process, no socket, no lock, no FIFO, no pid.
fn assert_cleaned_up(rt: &Path) {
    for name in [
        layout::API_SOCKET,
        "api.sock.lock",
        "serial.fifo",
        layout::PID_FILE,
    ] {
        assert!(!rt.join(name).exists(), "{name} left in {}", rt.display());
    }
    assert_eq!(processes_in(rt), Vec::<u32>::new(), "processes left behind");
}

fn wait_for_line(lines: &Lines, needle: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !lines.lock().unwrap().iter().any(|l| l.contains(needle)) {
        assert!(Instant::now() < deadline, "no {needle:?} on the console");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGSTOPs a process; on drop, if the driver left it unreaped, continues and kills
/// it so a failing test leaves nothing behind.
struct Frozen(u32);

impl Frozen {
    fn new(pid: u32) -> Frozen {
        kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !reaped(self.0) {
            let pid = Pid::from_raw(self.0 as i32);
            let _ = kill(pid, Signal::SIGCONT);
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

fn hypervisor_pid(rt: &Path) -> u32 {
    std::fs::read_to_string(rt.join(layout::PID_FILE))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Runs `spec` on a thread; returns the join handle and a receiver that gets a
/// message when the run returns (so a test can give up on a run that hangs).
type Running = (
    std::thread::JoinHandle<Result<udos_vmm::VmOutcome, VmmError>>,
    std::sync::mpsc::Receiver<()>,
);

fn run_in_thread(ch: &CloudHypervisor, spec: VmSpec, halt: Arc<AtomicBool>) -> Running {
    let (tx, rx) = std::sync::mpsc::channel();
    let ch = ch.clone();
    let h = std::thread::spawn(move || {
        let r = ch.run_until(spec, &halt);
        let _ = tx.send(());
        r
    });
    (h, rx)
}

#[test]
fn api_lifecycle_create_boot_info_shutdown_delete() {
    let Some(ch) = ch() else { return };
    let fx = fixture();
    let kernel = fx.root.join("halt.elf");
    pvh_kernel(&kernel, "UDOS-PVH-HALT\n", End::Halt);
    let (spec, _) = spec(&fx, &kernel, "lifecycle");
    let rt = spec.runtime_dir.clone();
    let mut vmm = ch.start_vmm(&rt).unwrap();
    let pid = vmm.pid();
    assert!(rt.join(layout::API_SOCKET).exists());
    let ping = vmm.ping().unwrap();
    assert!(ping["version"].is_string(), "{ping}");
    println!("cloud-hypervisor {}", ping["version"]);

    // No VM yet.
    assert!(vmm.info().is_err());
    let config = CloudHypervisor::vm_config(&spec, &rt.join(layout::CONSOLE_LOG));
    vmm.create(&config).unwrap();
    assert_eq!(vmm.state().unwrap(), "Created");
    let info = vmm.info().unwrap();
    assert_eq!(info["config"]["memory"]["size"], 128u64 << 20);
    assert_eq!(info["config"]["disks"][0]["serial"], "udos-a");
    assert_eq!(info["config"]["console"]["mode"], "Off");
    assert_eq!(info["config"]["serial"]["mode"], "File");

    vmm.boot().unwrap();
    assert_eq!(vmm.state().unwrap(), "Running");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(rt.join(layout::CONSOLE_LOG))
        .unwrap_or_default()
        .contains("UDOS-PVH-HALT")
    {
        assert!(Instant::now() < deadline, "no serial output from the guest");
        std::thread::sleep(Duration::from_millis(20));
    }

    vmm.shutdown().unwrap();
    // After vm.shutdown the VM is gone but its config stays: state is Created again.
    assert_eq!(vmm.state().unwrap(), "Created");
    vmm.delete().unwrap();
    assert!(vmm.info().is_err(), "vm.info after vm.delete");
    vmm.shutdown_vmm().unwrap();
    let status = vmm.wait_for(Duration::from_secs(10)).unwrap();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    drop(vmm);
    assert!(gone(pid));
    assert!(!rt.join(layout::API_SOCKET).exists());
}

#[test]
fn guest_power_off_ends_the_run_with_its_console() {
    let Some(ch) = ch() else { return };
    let fx = fixture();
    let kernel = fx.root.join("poweroff.elf");
    pvh_kernel(&kernel, "UDOS-PVH-OK\nsecond line\n", End::PowerOff);
    let (spec, lines) = spec(&fx, &kernel, "poweroff");
    let rt = spec.runtime_dir.clone();
    let outcome = ch.run(spec).unwrap();
    assert_eq!(
        outcome.exit,
        VmExit::PoweredOff,
        "{}",
        std::fs::read_to_string(&outcome.hypervisor_log).unwrap_or_default()
    );
    assert_eq!(*lines.lock().unwrap(), ["UDOS-PVH-OK", "second line"]);
    let log = std::fs::read_to_string(&outcome.console_log).unwrap();
    assert!(log.contains("UDOS-PVH-OK"));
    assert!(outcome.first_console_line_after.is_some());
    assert!(gone(outcome.pid));
    assert!(reaped(outcome.pid));
    assert_cleaned_up(&rt);
    println!(
        "cloud-hypervisor PVH stub: first line after {:?}, exit after {:?}",
        outcome.first_console_line_after.unwrap(),
        outcome.wall
    );
}

#[test]
fn a_hanging_guest_is_stopped_at_the_timeout() {
    let Some(ch) = ch() else { return };
    let fx = fixture();
    let kernel = fx.root.join("halt.elf");
    pvh_kernel(&kernel, "UDOS-PVH-HALT\n", End::Halt);
    let (mut spec, lines) = spec(&fx, &kernel, "hang");
    spec.timeout = Duration::from_secs(3);
    let rt = spec.runtime_dir.clone();
    let t0 = Instant::now();
    let outcome = ch.run(spec).unwrap();
    assert_eq!(outcome.exit, VmExit::TimedOut);
    assert!(
        t0.elapsed() < Duration::from_secs(3 + 8),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(*lines.lock().unwrap(), ["UDOS-PVH-HALT"]);
    assert!(gone(outcome.pid));
    let notes = outcome
        .hypervisor_log
        .with_file_name(layout::HYPERVISOR_STDERR);
    let log = std::fs::read_to_string(notes).unwrap();
    assert!(log.contains("vm.shutdown, vmm.shutdown"), "{log}");
    assert_cleaned_up(&rt);
    // Nothing polls the API while the VM runs (each request is a line in its log).
    let ch_log =
        String::from_utf8_lossy(&std::fs::read(&outcome.hypervisor_log).unwrap()).into_owned();
    assert!(!ch_log.contains("VmInfo"), "vm.info was polled:\n{ch_log}");
    // The API stop is normally enough; SIGKILL is only the fallback.
    println!(
        "stopped {}",
        if log.contains("SIGKILL") {
            "with SIGKILL"
        } else {
            "through the API"
        }
    );
}

#[test]
fn an_invalid_config_is_an_api_error_and_leaves_nothing() {
    let Some(ch) = ch() else { return };
    let fx = fixture();
    let not_elf = fx.root.join("not-a-kernel");
    std::fs::write(&not_elf, vec![0x90u8; 4096]).unwrap();
    let (spec, _) = spec(&fx, &not_elf, "bad");
    let rt = spec.runtime_dir.clone();
    let err = ch.run(spec).unwrap_err();
    println!("expected error: {err}");
    assert!(matches!(err, udos_vmm::VmmError::Api { .. }), "{err}");
    assert!(!rt.join(layout::PID_FILE).exists());
    assert!(!rt.join(layout::API_SOCKET).exists());
}

#[test]
fn a_vcpu_error_is_a_crash_not_a_power_off() {
    let Some(ch) = ch() else { return };
    let fx = fixture();
    let kernel = fx.root.join("vcpu-error.elf");
    pvh_kernel(&kernel, "UDOS-PVH-CRASH\n", End::VcpuError);
    let (spec, lines) = spec(&fx, &kernel, "vcpuerr");
    let rt = spec.runtime_dir.clone();
    let outcome = ch.run(spec).unwrap();
    let VmExit::Crashed { detail, .. } = &outcome.exit else {
        panic!("a vCPU error reported as {}", outcome.exit);
    };
    assert!(detail.contains("VCPU generated error"), "{detail}");
    assert!(outcome.wall < Duration::from_secs(10), "{:?}", outcome.wall);
    assert_eq!(*lines.lock().unwrap(), ["UDOS-PVH-CRASH"]);
    assert!(reaped(outcome.pid));
    assert_cleaned_up(&rt);
    println!("vCPU error: {}", outcome.exit);
}

#[test]
fn a_guest_reset_is_a_crash_and_not_a_reboot_loop() {
    let Some(ch) = ch() else { return };
    let fx = fixture();
    let kernel = fx.root.join("triple-fault.elf");
    pvh_kernel(&kernel, "UDOS-PVH-RESET\n", End::TripleFault);
    let (spec, lines) = spec(&fx, &kernel, "reset");
    let rt = spec.runtime_dir.clone();
    let outcome = ch.run(spec).unwrap();
    let VmExit::Crashed { detail, .. } = &outcome.exit else {
        panic!("a triple fault reported as {}", outcome.exit);
    };
    assert!(
        detail.contains("triple-faulted") || detail.contains("VM reset event"),
        "{detail}"
    );
    // Ended at the first reset, not at the 30 s timeout after thousands of reboots.
    assert!(outcome.wall < Duration::from_secs(10), "{:?}", outcome.wall);
    let boots = lines.lock().unwrap().len();
    assert!((1..=3).contains(&boots), "booted {boots} times");
    assert!(reaped(outcome.pid));
    assert_cleaned_up(&rt);
    println!("reset after {boots} boot(s): {}", outcome.exit);
}

/// The margin a test allows past a bound: scheduling on a busy 2-core host.
const MARGIN: Duration = Duration::from_millis(1500);

#[test]
fn a_stopped_vmm_cannot_stretch_the_timeout() {
    let Some(ch) = ch() else { return };
    let fx = fixture();
    let kernel = fx.root.join("halt.elf");
    pvh_kernel(&kernel, "UDOS-PVH-HALT\n", End::Halt);
    let (mut spec, lines) = spec(&fx, &kernel, "sigstop");
    let timeout = Duration::from_secs(3);
    spec.timeout = timeout;
    let rt = spec.runtime_dir.clone();
    let t0 = Instant::now();
    let (run, done) = run_in_thread(&ch, spec, Arc::new(AtomicBool::new(false)));
    wait_for_line(&lines, "UDOS-PVH-HALT", Duration::from_secs(10));
    let pid = hypervisor_pid(&rt);
    let frozen = Frozen::new(pid);
    // The deadline, plus the 1 s a VMM gets to answer `vm.shutdown`, plus a margin.
    let bound = timeout + Duration::from_secs(1) + MARGIN;
    let returned = done.recv_timeout(bound + Duration::from_secs(20)).is_ok();
    let took = t0.elapsed();
    drop(frozen);
    assert!(returned, "run_until did not return");
    let outcome = run.join().unwrap().unwrap();
    assert_eq!(outcome.exit, VmExit::TimedOut);
    assert!(took < bound, "returned after {took:?}, bound {bound:?}");
    assert!(reaped(pid));
    assert_cleaned_up(&rt);
    let notes = std::fs::read_to_string(rt.join(layout::HYPERVISOR_STDERR)).unwrap();
    assert!(
        notes.contains("cloud-hypervisor is not responding; SIGKILL"),
        "{notes}"
    );
    println!("stopped VMM: run_until returned after {took:?}");
}

#[test]
fn a_stop_request_is_honoured_while_the_vmm_is_stopped() {
    let Some(ch) = ch() else { return };
    let fx = fixture();
    let kernel = fx.root.join("halt.elf");
    pvh_kernel(&kernel, "UDOS-PVH-HALT\n", End::Halt);
    let (mut spec, lines) = spec(&fx, &kernel, "sigstop-halt");
    spec.timeout = Duration::from_secs(120);
    let rt = spec.runtime_dir.clone();
    let halt = Arc::new(AtomicBool::new(false));
    let (run, done) = run_in_thread(&ch, spec, halt.clone());
    wait_for_line(&lines, "UDOS-PVH-HALT", Duration::from_secs(10));
    let pid = hypervisor_pid(&rt);
    let frozen = Frozen::new(pid);
    // Long enough for any API call the driver makes meanwhile to be stuck.
    std::thread::sleep(Duration::from_millis(1500));
    let asked = Instant::now();
    halt.store(true, Ordering::Release);
    let returned = done.recv_timeout(Duration::from_secs(40)).is_ok();
    let took = asked.elapsed();
    drop(frozen);
    assert!(returned, "run_until did not return");
    let outcome = run.join().unwrap().unwrap();
    assert_eq!(outcome.exit, VmExit::Stopped);
    assert!(took < MARGIN, "the stop took {took:?}");
    assert!(reaped(pid));
    assert_cleaned_up(&rt);
    println!("stop request honoured after {took:?}");
}

/// A cloud-hypervisor whose API socket exists and listens but which is stopped
/// (SIGSTOP) before it can answer: connections land in the backlog and are never
/// answered. Made deterministic by a small Python front: it creates the listening
/// socket, stops itself, and (if ever continued) execs cloud-hypervisor on that socket
/// (`--api-socket fd=N`). Stopping cloud-hypervisor itself once its socket appears
/// races with the driver's first ping.
fn freezing_wrapper(fx: &Fixture, ch: &CloudHypervisor) -> CloudHypervisor {
    use std::os::unix::fs::PermissionsExt;
    let script = fx.root.join("frozen-cloud-hypervisor");
    std::fs::write(
        &script,
        format!(
            r#"#!/usr/bin/python3
import os, signal, socket, sys
args = sys.argv[1:]
i = args.index("--api-socket") + 1
s = socket.socket(socket.AF_UNIX)
s.bind(args[i][len("path="):])
s.listen(16)
os.set_inheritable(s.fileno(), True)
args[i] = "fd=%d" % s.fileno()
os.kill(os.getpid(), signal.SIGSTOP)
os.execv({real:?}, [{real:?}] + args)
"#,
            real = ch.binary().display().to_string()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    CloudHypervisor::with_binary(script)
}

#[test]
fn the_readiness_wait_is_bounded_when_the_vmm_does_not_answer() {
    let Some(ch) = ch() else { return };
    let fx = fixture();
    let frozen = freezing_wrapper(&fx, &ch);
    let kernel = fx.root.join("halt.elf");
    pvh_kernel(&kernel, "UDOS-PVH-HALT\n", End::Halt);
    let (spec, _) = spec(&fx, &kernel, "frozen-ready");
    let rt = spec.runtime_dir.clone();
    let t0 = Instant::now();
    let (run, done) = run_in_thread(&frozen, spec, Arc::new(AtomicBool::new(false)));
    // The readiness wait is 10 s, the ping included.
    let bound = Duration::from_secs(10) + MARGIN;
    let returned = done.recv_timeout(bound + Duration::from_secs(30)).is_ok();
    let took = t0.elapsed();
    let pids = processes_in(&rt);
    for p in &pids {
        let _ = kill(Pid::from_raw(*p as i32), Signal::SIGCONT);
        let _ = kill(Pid::from_raw(*p as i32), Signal::SIGKILL);
    }
    assert!(returned, "run_until did not return");
    let err = run.join().unwrap().unwrap_err();
    println!("expected error after {took:?}: {err}");
    assert!(
        matches!(&err, VmmError::Api { endpoint, .. } if endpoint == "vmm.ping"),
        "{err}"
    );
    assert!(err.to_string().contains("not responding"), "{err}");
    assert!(took < bound, "returned after {took:?}");
    assert_eq!(pids, Vec::<u32>::new(), "processes left behind");
    assert_cleaned_up(&rt);
}

#[test]
fn a_stop_request_during_startup_is_honoured() {
    let Some(ch) = ch() else { return };
    let fx = fixture();
    let frozen = freezing_wrapper(&fx, &ch);
    let kernel = fx.root.join("halt.elf");
    pvh_kernel(&kernel, "UDOS-PVH-HALT\n", End::Halt);
    let (spec, _) = spec(&fx, &kernel, "frozen-halt");
    let rt = spec.runtime_dir.clone();
    let halt = Arc::new(AtomicBool::new(false));
    let (run, done) = run_in_thread(&frozen, spec, halt.clone());
    std::thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    halt.store(true, Ordering::Release);
    let returned = done.recv_timeout(Duration::from_secs(40)).is_ok();
    let took = asked.elapsed();
    let pids = processes_in(&rt);
    for p in &pids {
        let _ = kill(Pid::from_raw(*p as i32), Signal::SIGCONT);
        let _ = kill(Pid::from_raw(*p as i32), Signal::SIGKILL);
    }
    assert!(returned, "run_until did not return");
    let outcome = run.join().unwrap().unwrap();
    assert_eq!(outcome.exit, VmExit::Stopped);
    assert!(took < MARGIN, "the stop took {took:?}");
    assert_eq!(pids, Vec::<u32>::new(), "processes left behind");
    assert_cleaned_up(&rt);
}

#[test]
fn the_debian_kernel_run_ends_cleanly_whatever_kvm_does() {
    // On kvm-pvm a stock kernel dies in the instruction emulator or hangs: this checks
    // only that the driver reports an outcome and leaves no process. Where KVM is
    // real, the guest reaches PID 1 and powers off.
    let Some(ch) = ch() else { return };
    let fx = fixture();
    let vmlinux = extract_vmlinux(&kernel(), &fx.root);
    let (mut spec, lines) = spec(&fx, &vmlinux, "debian");
    spec.initramfs = initramfs();
    spec.cmdline = "console=ttyS0 quiet panic=-1 udos.mode=probe".into();
    spec.memory_mib = 256;
    spec.timeout = Duration::from_secs(15);
    let outcome = ch.run(spec).unwrap();
    let got = lines.lock().unwrap().clone();
    println!(
        "debian kernel under cloud-hypervisor: {} ({} console lines)",
        outcome.exit,
        got.len()
    );
    if got.iter().any(|l| l.contains("UDOS-PROBE-OK")) {
        assert_eq!(outcome.exit, VmExit::PoweredOff);
    }
    assert!(gone(outcome.pid));
}
