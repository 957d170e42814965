//! Test fixtures: Debian's cloud kernel (downloaded once into a shared cache), a
//! static busybox, and a hand-written newc initramfs whose /init is a shell script.
#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

/// The package used when `apt-cache` cannot resolve `linux-image-cloud-amd64`.
const DEFAULT_KERNEL_PKG: &str = "linux-image-6.1.0-56-cloud-amd64";

/// `UDOS_TEST_CACHE`, default `/tmp/udos-test-cache` (shared with other crates' tests).
pub fn cache_dir() -> PathBuf {
    let d = std::env::var_os("UDOS_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/udos-test-cache"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The current cloud kernel package, as `linux-image-cloud-amd64` depends on it.
fn kernel_package() -> String {
    if let Ok(p) = std::env::var("UDOS_TEST_KERNEL_PKG") {
        return p;
    }
    let out = Command::new("apt-cache")
        .args(["depends", "linux-image-cloud-amd64"])
        .output();
    if let Ok(out) = out {
        let text = String::from_utf8_lossy(&out.stdout);
        for l in text.lines() {
            if let Some(p) = l.trim().strip_prefix("Depends: ") {
                if p.starts_with("linux-image-") {
                    return p.trim().to_string();
                }
            }
        }
    }
    DEFAULT_KERNEL_PKG.to_string()
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The extracted kernel package: `(root, release)` with `root/boot/vmlinuz-<release>`
/// and `root/lib/modules/<release>/`. Downloaded with `apt-get download` and
/// unpacked with `dpkg -x` once, under a lock, published by an atomic rename.
pub fn kernel_tree() -> &'static (PathBuf, String) {
    static TREE: OnceLock<(PathBuf, String)> = OnceLock::new();
    TREE.get_or_init(|| {
        let pkg = kernel_package();
        let cache = cache_dir();
        let root = cache.join(&pkg);
        let lock_file = File::create(cache.join(format!(".{pkg}.lock"))).unwrap();
        let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .unwrap();
        if !root.join("boot").is_dir() {
            let tmp = cache.join(format!(".{pkg}.tmp.{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).unwrap();
            run(Command::new("apt-get")
                .args(["download", "-q", &pkg])
                .current_dir(&tmp));
            let deb = std::fs::read_dir(&tmp)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.extension().is_some_and(|x| x == "deb"))
                .expect("apt-get download left no .deb");
            let x = tmp.join("root");
            run(Command::new("dpkg").arg("-x").arg(&deb).arg(&x));
            std::fs::rename(&x, &root).unwrap();
            let _ = std::fs::remove_dir_all(&tmp);
        }
        let release = pkg.trim_start_matches("linux-image-").to_string();
        assert!(
            root.join("boot")
                .join(format!("vmlinuz-{release}"))
                .is_file(),
            "no kernel in {}",
            root.display()
        );
        (root, release)
    })
}

/// The bzImage. QEMU microvm boots it through its firmware (qboot).
pub fn kernel() -> PathBuf {
    let (root, release) = kernel_tree();
    root.join("boot").join(format!("vmlinuz-{release}"))
}

fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()? {
        let p = e.ok()?.path();
        if p.is_dir() {
            if let Some(f) = find_module(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|f| f == name) {
            return Some(p);
        }
    }
    None
}

/// True if the ELF file has no program interpreter (a static binary).
fn is_static_elf(bytes: &[u8]) -> bool {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        o + 4 <= bytes.len() && u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap()) != 3
    })
}

/// Debian's static busybox (`busybox-static`).
pub fn busybox() -> Vec<u8> {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        if let Ok(b) = std::fs::read(p) {
            if is_static_elf(&b) {
                return b;
            }
        }
    }
    panic!("a static busybox is needed at /bin/busybox: apt-get install -y busybox-static");
}

/// A newc ("070701") cpio archive, written by hand.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn header(&mut self, name: &str, mode: u32, size: usize, rdev: (u32, u32)) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            size as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.header(name, 0o040755, 0, (0, 0));
        self
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.header(name, 0o100000 | mode, data.len(), (0, 0));
        self.out.extend_from_slice(data);
        self.pad();
        self
    }

    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) -> &mut Self {
        self.header(name, 0o020600, 0, (major, minor));
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.header("TRAILER!!!", 0, 0, (0, 0));
        while !self.out.len().is_multiple_of(512) {
            self.out.push(0);
        }
        self.out
    }
}

/// The test PID 1. Behaviour by kernel command line:
/// - `udos.mode=probe`: prints `UDOS-PROBE-OK` and powers off (like udos-init);
/// - `test.sleep`: prints `SLEEPING` and sleeps forever;
/// - else: loads the virtio modules, waits for `test.disks=N` block devices, prints
///   `UDOS-TEST-BOOTED`, one `SERIAL <serial>` line per disk, `UDOS-TEST-DONE`, and
///   powers off.
pub const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
CMDLINE="$(cat /proc/cmdline)"
case "$CMDLINE" in *udos.mode=probe*) echo UDOS-PROBE-OK; poweroff -f;; esac
case "$CMDLINE" in *test.sleep*) echo SLEEPING; while true; do sleep 1000; done;; esac
for m in virtio_ring virtio virtio_mmio virtio_blk; do insmod /lib/modules/$m.ko; done
want=0
for w in $CMDLINE; do case "$w" in test.disks=*) want="${w#test.disks=}";; esac; done
i=0
while [ "$(ls -d /sys/block/vd* 2>/dev/null | wc -l)" -lt "$want" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
echo UDOS-TEST-BOOTED
for f in /sys/block/vd*/serial; do [ -e "$f" ] && echo "SERIAL $(cat $f)"; done
echo UDOS-TEST-DONE
poweroff -f
"#;

/// The test initramfs (built once per test process).
pub fn initramfs() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let (root, release) = kernel_tree();
        let mods = root.join("lib/modules").join(release);
        let mut c = Cpio::default();
        for d in ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"] {
            c.dir(d);
        }
        c.char_dev("dev/console", 5, 1);
        c.file("bin/busybox", 0o755, &busybox());
        for m in ["virtio_ring", "virtio", "virtio_mmio", "virtio_blk"] {
            let p = find_module(&mods, &format!("{m}.ko"))
                .unwrap_or_else(|| panic!("{m}.ko not found under {}", mods.display()));
            c.file(
                &format!("lib/modules/{m}.ko"),
                0o644,
                &std::fs::read(p).unwrap(),
            );
        }
        c.file("init", 0o755, INIT.as_bytes());
        let bytes = c.finish();
        // Content-addressed in the shared cache, published by rename.
        use sha2::Digest;
        let id = hex::encode(&sha2::Sha256::digest(&bytes)[..8]);
        let p = cache_dir().join(format!("udos-vmm-test-initramfs-{id}.cpio"));
        if !p.is_file() {
            let tmp = p.with_extension(format!("tmp.{}", std::process::id()));
            let mut f = File::create(&tmp).unwrap();
            f.write_all(&bytes).unwrap();
            std::fs::rename(&tmp, &p).unwrap();
        }
        p
    })
    .clone()
}

/// A zero-filled raw disk of `mib` MiB.
pub fn raw_disk(path: &Path, mib: u64) {
    let f = File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
}

/// Generous limits: TCG boots take ~2 s alone, much more with other tests beside.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether `pid` is a live (non-zombie) process whose command line mentions `needle`.
pub fn process_alive_with(pid: u32, needle: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat.rsplit(')').next().unwrap_or("").trim_start();
    if state.starts_with('Z') {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(needle))
        .unwrap_or(false)
}

/// Cuts the ELF vmlinux out of a bzImage whose payload is LZ4 (legacy frame), like
/// the kernel's scripts/extract-vmlinux; needs the `lz4` CLI (test-only).
pub fn extract_vmlinux(bzimage: &Path, dir: &Path) -> PathBuf {
    let data = std::fs::read(bzimage).unwrap();
    let magic = [0x02, 0x21, 0x4c, 0x18];
    let out = dir.join("vmlinux");
    for (i, w) in data.windows(4).enumerate() {
        if w != magic {
            continue;
        }
        let payload = dir.join("payload.lz4");
        std::fs::write(&payload, &data[i..]).unwrap();
        // lz4 complains about the trailing bytes after the frame; the output is whole.
        let _ = std::process::Command::new("lz4")
            .args(["-d", "-c", "-q"])
            .arg(&payload)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("lz4 (apt-get install lz4)");
        if std::fs::read(&out).is_ok_and(|b| b.starts_with(b"\x7fELF")) {
            return out;
        }
    }
    panic!("no LZ4 ELF payload in {}", bzimage.display());
}
