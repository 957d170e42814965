//! Does KVM really run our kernel here, and which hypervisor to use.
//!
//! `/dev/kvm` existing proves little: on a kvm-pvm host (a VM without nested VT-x/SVM)
//! it only runs PVM-aware guests, and a stock kernel dies or hangs. So the probe boots
//! the very kernel and initramfs the steps will use, with `udos.mode=probe` (PID 1
//! prints [`PROBE_MARKER`] and powers off), under KVM, and believes only the marker.
//! The probe runs under the hypervisor that will run the steps ([`probe_kvm_with`]):
//! QEMU and cloud-hypervisor use KVM differently, and one booting says little about the
//! other. The verdict is cached in a file per hypervisor, keyed by the host's boot id
//! and the kernel's SHA-256, so it is paid once per host boot, kernel and hypervisor.

use std::fs::OpenOptions;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Accel, CloudHypervisor, Hypervisor, HypervisorChoice, Qemu, VmExit, VmSpec, VmmError};

/// What udos-init prints in `udos.mode=probe` before powering off.
pub const PROBE_MARKER: &str = "UDOS-PROBE-OK";
/// How long the probe VM may take (a KVM guest reaches PID 1 in well under a second).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
/// Overrides [`PROBE_TIMEOUT`] (seconds).
pub const PROBE_TIMEOUT_ENV: &str = "UDOS_KVM_PROBE_TIMEOUT";
const KVM_DEVICE: &str = "/dev/kvm";
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// What the KVM probe boots, and where its verdict is cached.
#[derive(Clone, Debug)]
pub struct ProbeInput {
    /// The step kernel.
    pub kernel: PathBuf,
    /// The udos initramfs (its PID 1 understands `udos.mode=probe`).
    pub initramfs: PathBuf,
    /// The cache file (JSON); its directory is created if missing.
    pub cache: PathBuf,
}

/// The probe's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmVerdict {
    pub works: bool,
    /// The hypervisor that ran the probe (empty when none could).
    #[serde(default)]
    pub hypervisor: String,
    /// Why, in a sentence (the probe VM's outcome, or why no probe ran).
    pub reason: String,
    pub boot_id: String,
    pub kernel_sha256: String,
    /// `(size, mtime in ns, inode)` of the kernel when it was hashed: when these still
    /// match, the kernel is not hashed again.
    #[serde(default)]
    pub kernel_stat: Option<(u64, i128, u64)>,
    /// How long the probe VM took.
    pub probe_ms: u64,
    /// Whether this came from the cache file.
    #[serde(skip)]
    pub cached: bool,
}

/// Whether KVM boots `probe.kernel` to the udos probe marker under QEMU (cached).
pub fn kvm_works(probe: &ProbeInput) -> bool {
    probe_kvm(probe).works
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn file_stat(path: &Path) -> Option<(u64, i128, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.size(),
        m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        m.ino(),
    ))
}

fn not_cached(reason: String) -> KvmVerdict {
    KvmVerdict {
        works: false,
        hypervisor: String::new(),
        reason,
        boot_id: String::new(),
        kernel_sha256: String::new(),
        kernel_stat: None,
        probe_ms: 0,
        cached: false,
    }
}

fn probe_timeout() -> Duration {
    std::env::var(PROBE_TIMEOUT_ENV)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map(Duration::from_secs)
        .unwrap_or(PROBE_TIMEOUT)
}

/// Runs (or reads from the cache) the KVM probe under QEMU, or under cloud-hypervisor
/// where QEMU is missing. Never fails: any problem is a `works: false` verdict with its
/// reason.
pub fn probe_kvm(probe: &ProbeInput) -> KvmVerdict {
    match Qemu::find(Accel::Kvm) {
        Ok(q) => probe_kvm_with(&q, probe),
        Err(qe) => match CloudHypervisor::find() {
            Ok(ch) => probe_kvm_with(&ch, probe),
            Err(_) => not_cached(format!("no hypervisor to probe KVM with: {qe}")),
        },
    }
}

/// Where the verdict of `hypervisor` is cached: `probe.cache` for QEMU, a sibling
/// with the hypervisor's name in it for the others (`kvm-probe.cloud-hypervisor.json`).
pub fn cache_path(probe: &ProbeInput, hypervisor: &str) -> PathBuf {
    if hypervisor == "qemu" {
        return probe.cache.clone();
    }
    let stem = probe
        .cache
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match probe.cache.extension() {
        Some(ext) => format!("{stem}.{hypervisor}.{}", ext.to_string_lossy()),
        None => format!("{stem}.{hypervisor}"),
    };
    probe.cache.with_file_name(name)
}

/// [`probe_kvm`] under `hv` (with KVM): whether KVM works for this hypervisor.
pub fn probe_kvm_with(hv: &dyn Hypervisor, probe: &ProbeInput) -> KvmVerdict {
    let cache = cache_path(probe, hv.name());
    if let Err(e) = OpenOptions::new().read(true).write(true).open(KVM_DEVICE) {
        return not_cached(format!("cannot open {KVM_DEVICE}: {e}"));
    }
    let boot_id = match std::fs::read_to_string(BOOT_ID) {
        Ok(s) => s.trim().to_string(),
        Err(e) => return not_cached(format!("cannot read {BOOT_ID}: {e}")),
    };
    let kernel_stat = file_stat(&probe.kernel);
    let cached: Option<KvmVerdict> = std::fs::read_to_string(&cache)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .filter(|v: &KvmVerdict| v.boot_id == boot_id);
    let hit = |mut v: KvmVerdict| {
        v.cached = true;
        tracing::debug!(works = v.works, reason = v.reason, "KVM probe (cached)");
        v
    };
    // Same boot, same kernel file untouched: no need to hash it again.
    if let Some(v) = cached.as_ref() {
        if kernel_stat.is_some() && v.kernel_stat == kernel_stat {
            return hit(v.clone());
        }
    }
    let kernel_sha256 = match sha256_file(&probe.kernel) {
        Ok(h) => h,
        Err(e) => {
            return not_cached(format!(
                "cannot read the kernel {}: {e}",
                probe.kernel.display()
            ))
        }
    };
    if let Some(mut v) = cached {
        if v.kernel_sha256 == kernel_sha256 {
            v.kernel_stat = kernel_stat;
            let _ = write_cache(&cache, &v);
            return hit(v);
        }
    }
    let started = Instant::now();
    let (works, reason) = run_probe(hv, probe);
    let verdict = KvmVerdict {
        works,
        hypervisor: hv.name().to_string(),
        reason,
        boot_id,
        kernel_sha256,
        kernel_stat,
        probe_ms: started.elapsed().as_millis() as u64,
        cached: false,
    };
    tracing::info!(
        works,
        hypervisor = hv.name(),
        reason = verdict.reason,
        ms = verdict.probe_ms,
        "KVM probe"
    );
    if let Err(e) = write_cache(&cache, &verdict) {
        tracing::warn!("cannot cache the KVM probe in {}: {e}", cache.display());
    }
    verdict
}

fn write_cache(path: &Path, v: &KvmVerdict) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(v).expect("serializable"))?;
    std::fs::rename(&tmp, path)
}

fn probe_runtime_dir() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "udos-kvm-probe-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

fn run_probe(hv: &dyn Hypervisor, probe: &ProbeInput) -> (bool, String) {
    let rt = probe_runtime_dir();
    let seen = Arc::new(AtomicBool::new(false));
    let last = Arc::new(std::sync::Mutex::new(String::new()));
    let (s2, l2) = (seen.clone(), last.clone());
    let mut spec = VmSpec::new("kvm-probe", &probe.kernel, &probe.initramfs, &rt);
    spec.cmdline = "console=ttyS0 quiet panic=-1 udos.mode=probe".into();
    spec.memory_mib = 256;
    spec.timeout = probe_timeout();
    spec.console = Some(Box::new(move |line: &str| {
        if line.contains(PROBE_MARKER) {
            s2.store(true, Ordering::Relaxed);
        }
        if !line.trim().is_empty() {
            *l2.lock().unwrap_or_else(|p| p.into_inner()) = line.trim().to_string();
        }
    }));
    let result = hv.run(spec);
    let out = match result {
        Err(e) => (
            false,
            format!("{} could not start the probe VM: {e}", hv.name()),
        ),
        Ok(o) => {
            let in_log = std::fs::read_to_string(&o.console_log)
                .map(|s| s.contains(PROBE_MARKER))
                .unwrap_or(false);
            if seen.load(Ordering::Relaxed) || in_log {
                (
                    true,
                    format!(
                        "{} with KVM booted the kernel to {PROBE_MARKER} in {} ms",
                        hv.name(),
                        o.wall.as_millis()
                    ),
                )
            } else {
                let last = last.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let mut why = match &o.exit {
                    VmExit::TimedOut => format!("no {PROBE_MARKER} within {:?}", o.wall),
                    other => format!("no {PROBE_MARKER}; the probe VM {other}"),
                };
                if !last.is_empty() {
                    why.push_str(&format!("; last console line: {last}"));
                }
                (false, format!("{} with KVM: {why}", hv.name()))
            }
        }
    };
    let _ = std::fs::remove_dir_all(&rt);
    out
}

/// A hypervisor picked by [`choose`], and why, in a sentence for the user (for
/// `auto`, also why cloud-hypervisor was not taken).
pub struct Selection {
    pub hypervisor: Box<dyn Hypervisor>,
    pub why: String,
}

/// Picks the hypervisor for `--hypervisor` (see [`choose`]).
pub fn select(
    choice: HypervisorChoice,
    probe: &ProbeInput,
) -> Result<Box<dyn Hypervisor>, VmmError> {
    choose(choice, probe).map(|s| s.hypervisor)
}

/// Picks the hypervisor for `--hypervisor`, each KVM check made by the hypervisor
/// in question:
///
/// - `auto`: cloud-hypervisor if it is installed and KVM runs the kernel under it;
///   else QEMU with KVM if KVM runs the kernel under QEMU; else QEMU with TCG.
/// - `qemu`: QEMU, with KVM if it works, else TCG.
/// - `cloud-hypervisor`: cloud-hypervisor, or an error saying how to install it, or
///   why KVM cannot run the kernel under it.
pub fn choose(choice: HypervisorChoice, probe: &ProbeInput) -> Result<Selection, VmmError> {
    let selection = match choice {
        HypervisorChoice::Qemu => qemu(probe, "qemu")?,
        HypervisorChoice::CloudHypervisor => {
            let ch = CloudHypervisor::find()?;
            let kvm = probe_kvm_with(&ch, probe);
            if !kvm.works {
                return Err(VmmError::KvmUnavailable {
                    what: "cloud-hypervisor",
                    reason: format!("{}; use --hypervisor qemu (TCG) instead", kvm.reason),
                });
            }
            Selection {
                hypervisor: Box::new(ch),
                why: kvm.reason,
            }
        }
        HypervisorChoice::Auto => match CloudHypervisor::find() {
            Err(e) => {
                tracing::info!("auto: not using cloud-hypervisor: {e}");
                qemu(probe, "auto: cloud-hypervisor is not installed")?
            }
            Ok(ch) => {
                let kvm = probe_kvm_with(&ch, probe);
                if kvm.works {
                    Selection {
                        hypervisor: Box::new(ch),
                        why: format!("auto: {}", kvm.reason),
                    }
                } else {
                    // Installed, so wanted: say loudly why it is not used.
                    tracing::warn!(
                        "auto: cloud-hypervisor is installed but not used: {}",
                        kvm.reason
                    );
                    qemu(
                        probe,
                        &format!(
                            "auto: cloud-hypervisor is installed but KVM cannot run the kernel under it ({})",
                            kvm.reason
                        ),
                    )?
                }
            }
        },
    };
    tracing::info!(
        choice = %choice,
        hypervisor = selection.hypervisor.describe(),
        why = selection.why,
        "hypervisor selected"
    );
    Ok(selection)
}

/// QEMU, with KVM if its probe boots the kernel, else TCG; `why` starts with `lead`.
fn qemu(probe: &ProbeInput, lead: &str) -> Result<Selection, VmmError> {
    let q = Qemu::find(Accel::Kvm)?;
    let kvm = probe_kvm_with(&q, probe);
    let accel = if kvm.works { Accel::Kvm } else { Accel::Tcg };
    Ok(Selection {
        hypervisor: Box::new(Qemu::with_binary(q.binary(), accel)),
        why: format!("{lead}; {}", kvm.reason),
    })
}
