//! Shared helpers of the udos-images integration tests: the shared download cache, the
//! static test init, and a QEMU microvm runner with a hard timeout.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use udos_images::ImageStore;

/// Downloads and built images shared by all tests (`UDOS_TEST_CACHE`, default
/// `/tmp/udos-test-cache`), so nothing is downloaded twice.
pub fn cache_dir() -> PathBuf {
    let d = std::env::var_os("UDOS_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/udos-test-cache"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn store() -> ImageStore {
    ImageStore::new(&cache_dir().join("state"))
}

pub fn progress_printer() -> impl Fn(&str) {
    let t0 = Instant::now();
    move |m: &str| eprintln!("[{:7.2}s] {m}", t0.elapsed().as_secs_f64())
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Compiles tests/fixtures/test_init.c statically (once per source version).
pub fn test_init() -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/test_init.c");
    let text = std::fs::read(&src).unwrap();
    let h = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        h.finish()
    };
    let out = cache_dir().join(format!("test-init-{h:016x}"));
    if !out.is_file() {
        let tmp = out.with_extension("tmp");
        let st = Command::new("gcc")
            .args(["-static", "-O2", "-Wall", "-o"])
            .arg(&tmp)
            .arg(&src)
            .status()
            .expect("run gcc (needed to build the static test init)");
        assert!(st.success(), "gcc -static failed for {}", src.display());
        std::fs::rename(&tmp, &out).unwrap();
    }
    out
}

pub struct Drive<'a> {
    pub file: &'a Path,
    pub serial: &'a str,
    pub readonly: bool,
}

pub struct Boot {
    pub console: String,
    /// QEMU exited by itself (guest powered off) before the timeout.
    pub exited: bool,
    /// Wall time from spawning QEMU to the marker line.
    pub to_marker: Option<Duration>,
    pub total: Duration,
}

/// Boots `kernel` + `initrd` under `qemu-system-x86_64 -M microvm -accel tcg`, waits for
/// QEMU to exit, killing it after `timeout`. Records when a line containing `marker` shows.
pub fn boot_microvm(
    kernel: &Path,
    initrd: &Path,
    append: &str,
    drives: &[Drive],
    marker: &str,
    timeout: Duration,
) -> Boot {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm", "-accel", "tcg", "-m", "512", "-smp", "1"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(append)
        .args(["-nographic", "-no-reboot"]);
    for (i, d) in drives.iter().enumerate() {
        let ro = if d.readonly { ",readonly=on" } else { "" };
        cmd.arg("-drive").arg(format!(
            "id=d{i},file={},format=raw,if=none{ro}",
            d.file.display()
        ));
        cmd.arg("-device")
            .arg(format!("virtio-blk-device,drive=d{i},serial={}", d.serial));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("spawn qemu-system-x86_64");
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let tx2 = tx.clone();
    let r1 = std::thread::spawn(move || {
        for l in BufReader::new(out).split(b'\n').map_while(Result::ok) {
            let _ = tx.send((Instant::now(), String::from_utf8_lossy(&l).into_owned()));
        }
    });
    let r2 = std::thread::spawn(move || {
        for l in BufReader::new(err).split(b'\n').map_while(Result::ok) {
            let _ = tx2.send((
                Instant::now(),
                format!("[qemu stderr] {}", String::from_utf8_lossy(&l)),
            ));
        }
    });
    let mut exited = false;
    loop {
        if child.try_wait().unwrap().is_some() {
            exited = true;
            break;
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let total = t0.elapsed();
    let _ = r1.join();
    let _ = r2.join();
    let mut console = String::new();
    let mut to_marker = None;
    for (t, l) in rx.try_iter() {
        if to_marker.is_none() && l.contains(marker) {
            to_marker = Some(t.duration_since(t0));
        }
        console.push_str(l.trim_end_matches('\r'));
        console.push('\n');
    }
    Boot {
        console,
        exited,
        to_marker,
        total,
    }
}
