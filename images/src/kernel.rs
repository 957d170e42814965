//! The guest kernel: where it comes from (Debian's cloud kernel by default, or a file the
//! user names), turning a bzImage into the ELF `vmlinux` that PVH loaders need, and picking
//! the kernel modules the initramfs carries.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Debian's metapackage that always depends on the current cloud kernel.
pub const DEBIAN_CLOUD_METAPACKAGE: &str = "linux-image-cloud-amd64";

/// Modules udos needs on both hypervisors (QEMU microvm: virtio-mmio over ACPI;
/// cloud-hypervisor: virtio-pci). Their dependencies are added from `modules.dep`
/// (virtio, virtio_ring, virtio_pci_legacy_dev, virtio_pci_modern_dev, libcrc32c,
/// vmw_vsock_virtio_transport_common, ...). Built-in ones are skipped.
pub const WANTED_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_pci",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_blk",
    // The NIC of VMs with a network (`udos.net`); brings failover and net_failover.
    "virtio_net",
    // Job mode's host channel (`udos run --per job`): a virtio-console port.
    "virtio_console",
    "overlay",
    "libcrc32c",
    "erofs",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

/// Of [`WANTED_MODULES`], those that must exist (as a module or built in). The others are
/// helpers that some kernel versions do not have (virtio_pci_*_dev appeared in 5.16).
pub const REQUIRED_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "overlay",
    "erofs",
    "vsock",
    "vmw_vsock_virtio_transport",
];

const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
const MAX_VMLINUX: usize = 512 << 20;

/// What kind of kernel file this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Elf,
}

pub fn detect_format(bytes: &[u8]) -> Result<KernelFormat> {
    if bytes.len() > 0x260 && &bytes[0x202..0x206] == b"HdrS" {
        Ok(KernelFormat::BzImage)
    } else if bytes.starts_with(b"\x7fELF") {
        Ok(KernelFormat::Elf)
    } else {
        bail!("neither a bzImage (no HdrS boot header) nor an ELF vmlinux")
    }
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// The kernel release (`uname -r`) stored in a bzImage's boot header.
pub fn release_from_bzimage(bytes: &[u8]) -> Option<String> {
    if bytes.len() < 0x210 || &bytes[0x202..0x206] != b"HdrS" {
        return None;
    }
    let ptr = le16(bytes, 0x20e) as usize;
    if ptr == 0 {
        return None;
    }
    let start = ptr + 0x200;
    let s = bytes.get(start..(start + 256).min(bytes.len()))?;
    first_token(s)
}

/// The kernel release found in an ELF vmlinux's `Linux version ...` banner.
pub fn release_from_elf(bytes: &[u8]) -> Option<String> {
    let needle = b"Linux version ";
    let mut from = 0;
    while let Some(i) = find(&bytes[from..], needle) {
        let at = from + i + needle.len();
        if bytes.get(at).is_some_and(|c| c.is_ascii_digit()) {
            return first_token(&bytes[at..(at + 256).min(bytes.len())]);
        }
        from = at;
    }
    None
}

fn first_token(s: &[u8]) -> Option<String> {
    let end = s
        .iter()
        .position(|&c| c == b' ' || c == 0 || c == b'\n')
        .unwrap_or(s.len());
    let t = std::str::from_utf8(&s[..end]).ok()?;
    (!t.is_empty()).then(|| t.to_string())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Extracts the ELF vmlinux from a bzImage: locates the compressed payload through the
/// boot header (`payload_offset`/`payload_length`), decompresses it (LZ4 legacy, as
/// Debian builds it, or zstd) and trims it to the ELF's own extent (the x86 build appends
/// relocation data after the ELF).
pub fn extract_vmlinux(bz: &[u8]) -> Result<Vec<u8>> {
    if detect_format(bz)? != KernelFormat::BzImage {
        bail!("not a bzImage");
    }
    let version = le16(bz, 0x206);
    if version < 0x208 {
        bail!("boot protocol {version:#x} too old: no payload_offset field (need 2.08+)");
    }
    let setup_sects = match bz[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let pm_start = (setup_sects + 1) * 512;
    let off = le32(bz, 0x248) as usize;
    let len = le32(bz, 0x24c) as usize;
    let start = pm_start + off;
    let payload = bz
        .get(start..start + len)
        .with_context(|| format!("payload {start:#x}+{len:#x} lies outside the bzImage"))?;
    let raw = match payload {
        [0x02, 0x21, 0x4c, 0x18, ..] => lz4_legacy_decompress(payload)?,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => zstd_payload(payload)?,
        [0x1f, 0x8b, ..] => bail!("bzImage payload is gzip: not supported, pass an ELF vmlinux"),
        [0xfd, b'7', b'z', b'X', b'Z', ..] => {
            bail!("bzImage payload is xz: not supported, pass an ELF vmlinux")
        }
        [b'B', b'Z', b'h', ..] => {
            bail!("bzImage payload is bzip2: not supported, pass an ELF vmlinux")
        }
        [0x5d, 0x00, ..] => bail!("bzImage payload is lzma: not supported, pass an ELF vmlinux"),
        [0x89, b'L', b'Z', b'O', ..] => {
            bail!("bzImage payload is lzo: not supported, pass an ELF vmlinux")
        }
        _ if payload.starts_with(b"\x7fELF") => payload.to_vec(),
        _ => bail!(
            "unknown bzImage payload compression (magic {:02x?})",
            &payload[..payload.len().min(6)]
        ),
    };
    if !raw.starts_with(b"\x7fELF") {
        bail!("decompressed bzImage payload is not an ELF file");
    }
    let end = elf_extent(&raw)?;
    let mut raw = raw;
    raw.truncate(end);
    Ok(raw)
}

/// Decompresses the kernel's LZ4 "legacy" stream: magic `0x184C2102`, then blocks of
/// `[u32 LE compressed size][block]`, each at most 8 MiB decompressed. The kernel build
/// appends the decompressed size as a final u32 LE, which is checked when present.
pub fn lz4_legacy_decompress(data: &[u8]) -> Result<Vec<u8>> {
    if data.len() < 4 || le32(data, 0) != LZ4_LEGACY_MAGIC {
        bail!("not an LZ4 legacy stream");
    }
    let mut out: Vec<u8> = Vec::new();
    let mut pos = 4;
    let mut trailer: Option<u32> = None;
    while pos < data.len() {
        let rest = data.len() - pos;
        if rest < 4 {
            bail!("LZ4 legacy stream: {rest} stray bytes at the end");
        }
        let v = le32(data, pos);
        if rest == 4 {
            trailer = Some(v);
            break;
        }
        pos += 4;
        if v == LZ4_LEGACY_MAGIC {
            continue; // concatenated streams
        }
        let size = v as usize;
        let block = data.get(pos..pos + size).with_context(|| {
            format!("LZ4 legacy block of {size} bytes at {pos:#x} is truncated")
        })?;
        pos += size;
        let at = out.len();
        if at + LZ4_LEGACY_BLOCK > MAX_VMLINUX {
            bail!("decompressed kernel exceeds {} MiB", MAX_VMLINUX >> 20);
        }
        out.resize(at + LZ4_LEGACY_BLOCK, 0);
        let n = lz4_flex::block::decompress_into(block, &mut out[at..])
            .map_err(|e| anyhow::anyhow!("LZ4 block at {:#x}: {e}", pos - size))?;
        out.truncate(at + n);
    }
    if let Some(t) = trailer {
        if t as usize != out.len() {
            bail!(
                "LZ4 legacy stream decompressed to {} bytes but its trailer says {t}",
                out.len()
            );
        }
    }
    Ok(out)
}

fn zstd_payload(payload: &[u8]) -> Result<Vec<u8>> {
    // zstd frame followed by the 4-byte size trailer.
    let body = &payload[..payload.len().saturating_sub(4)];
    let mut dec = zstd::stream::read::Decoder::new(body)?.single_frame();
    let mut out = Vec::new();
    (&mut dec)
        .take(MAX_VMLINUX as u64)
        .read_to_end(&mut out)
        .context("zstd payload")?;
    Ok(out)
}

/// End of the ELF64 file's own content: the furthest of the program headers, section
/// headers, segments and (non-NOBITS) sections.
pub fn elf_extent(elf: &[u8]) -> Result<usize> {
    if elf.len() < 64 || !elf.starts_with(b"\x7fELF") {
        bail!("not an ELF file");
    }
    if elf[4] != 2 || elf[5] != 1 {
        bail!("not a little-endian ELF64 file");
    }
    let phoff = le64(elf, 0x20) as usize;
    let shoff = le64(elf, 0x28) as usize;
    let phentsize = le16(elf, 0x36) as usize;
    let phnum = le16(elf, 0x38) as usize;
    let shentsize = le16(elf, 0x3a) as usize;
    let shnum = le16(elf, 0x3c) as usize;
    let mut end = 64usize;
    end = end.max(phoff + phnum * phentsize);
    end = end.max(shoff + shnum * shentsize);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let p = elf
            .get(ph..ph + 56)
            .context("program header outside the file")?;
        let off = le64(p, 8) as usize;
        let filesz = le64(p, 32) as usize;
        end = end.max(off + filesz);
    }
    for i in 0..shnum {
        let sh = shoff + i * shentsize;
        let s = elf
            .get(sh..sh + 64)
            .context("section header outside the file")?;
        let ty = le32(s, 4);
        if ty == 8 {
            continue; // SHT_NOBITS
        }
        let off = le64(s, 24) as usize;
        let size = le64(s, 32) as usize;
        end = end.max(off + size);
    }
    if end > elf.len() {
        bail!(
            "ELF file is truncated ({end} bytes needed, {} present)",
            elf.len()
        );
    }
    Ok(end)
}

/// Whether the ELF carries the Xen `PHYS32_ENTRY` note (type 18), i.e. can be booted
/// through PVH (cloud-hypervisor, QEMU with an ELF kernel).
pub fn has_pvh_note(elf: &[u8]) -> bool {
    let Ok(_) = elf_extent(elf) else { return false };
    let phoff = le64(elf, 0x20) as usize;
    let phentsize = le16(elf, 0x36) as usize;
    let phnum = le16(elf, 0x38) as usize;
    for i in 0..phnum {
        let p = &elf[phoff + i * phentsize..phoff + i * phentsize + 56];
        if le32(p, 0) != 4 {
            continue; // PT_NOTE
        }
        let off = le64(p, 8) as usize;
        let size = le64(p, 32) as usize;
        let Some(notes) = elf.get(off..off + size) else {
            continue;
        };
        let mut q = 0;
        while q + 12 <= notes.len() {
            let namesz = le32(notes, q) as usize;
            let descsz = le32(notes, q + 4) as usize;
            let ty = le32(notes, q + 8);
            let name_at = q + 12;
            let name = notes.get(name_at..name_at + namesz).unwrap_or(&[]);
            if ty == 18 && name.starts_with(b"Xen") {
                return true;
            }
            q = name_at + namesz.div_ceil(4) * 4 + descsz.div_ceil(4) * 4;
        }
    }
    false
}

/// The host's TSC frequency in kHz, from `/proc/cpuinfo` (`cpu MHz`, trusted only when
/// the TSC is constant: `constant_tsc` or `tsc_known_freq`). Under TCG the guest's TSC
/// runs at the host's rate, and a guest that has to calibrate it against the PIT fails
/// to when the host is busy, then hangs in early boot: pass it as `tsc_early_khz=`.
pub fn host_tsc_khz() -> Option<u64> {
    parse_cpuinfo_tsc_khz(&fs::read_to_string("/proc/cpuinfo").ok()?)
}

fn parse_cpuinfo_tsc_khz(cpuinfo: &str) -> Option<u64> {
    let mut mhz = None;
    let mut constant = false;
    for line in cpuinfo.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        match k.trim() {
            "cpu MHz" if mhz.is_none() => mhz = v.trim().parse::<f64>().ok(),
            "flags" => {
                constant = v
                    .split_whitespace()
                    .any(|f| f == "constant_tsc" || f == "tsc_known_freq");
                break;
            }
            _ => {}
        }
    }
    let khz = (mhz? * 1000.0).round();
    (constant && (100_000.0..100_000_000.0).contains(&khz)).then_some(khz as u64)
}

/// A module directory (`.../lib/modules/<release>`) and what `modules.dep` /
/// `modules.builtin` say about it.
pub struct ModuleTree {
    pub dir: PathBuf,
    pub release: String,
    /// normalized name -> (path relative to `dir`, dependency paths as listed)
    pub dep: BTreeMap<String, (String, Vec<String>)>,
    pub builtin: BTreeSet<String>,
}

/// One module to put in the initramfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedModule {
    pub name: String,
    /// Path relative to `lib/modules/<release>/`.
    pub rel_path: String,
}

/// `virtio-blk`, `kernel/drivers/block/virtio_blk.ko` -> `virtio_blk`.
pub fn module_name(s: &str) -> String {
    let base = s.rsplit('/').next().unwrap_or(s);
    let base = match base.find(".ko") {
        Some(i) => &base[..i],
        None => base,
    };
    base.replace('-', "_")
}

impl ModuleTree {
    /// Reads `<dir>/modules.dep` and (if present) `<dir>/modules.builtin`.
    pub fn load(dir: &Path) -> Result<Self> {
        let release = dir
            .file_name()
            .and_then(|s| s.to_str())
            .context("module directory has no name")?
            .to_string();
        let dep_path = dir.join("modules.dep");
        let text = fs::read_to_string(&dep_path).with_context(|| {
            format!(
                "read {} (run `depmod -b ROOT {release}` on it)",
                dep_path.display()
            )
        })?;
        let mut dep = BTreeMap::new();
        for line in text.lines() {
            let Some((m, rest)) = line.split_once(':') else {
                continue;
            };
            let m = m.trim();
            if m.is_empty() {
                continue;
            }
            let deps = rest.split_whitespace().map(str::to_string).collect();
            dep.insert(module_name(m), (m.to_string(), deps));
        }
        let builtin = match fs::read_to_string(dir.join("modules.builtin")) {
            Ok(t) => t
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(module_name)
                .collect(),
            Err(_) => BTreeSet::new(),
        };
        Ok(ModuleTree {
            dir: dir.to_path_buf(),
            release,
            dep,
            builtin,
        })
    }

    /// The modules to load for `wanted`, dependencies first (a valid load order), built-ins
    /// skipped. Names in `required` must be present as a module or built in.
    pub fn plan(&self, wanted: &[&str], required: &[&str]) -> Result<Vec<PlannedModule>> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for w in wanted {
            let name = module_name(w);
            if self.builtin.contains(&name) {
                continue;
            }
            if !self.dep.contains_key(&name) {
                if required.iter().any(|r| module_name(r) == name) {
                    bail!(
                        "kernel module {name} is neither built in nor present in {}",
                        self.dir.display()
                    );
                }
                continue;
            }
            self.visit(&name, &mut seen, &mut order, 0)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<PlannedModule>,
        depth: usize,
    ) -> Result<()> {
        if depth > 64 {
            bail!("module dependency chain too deep at {name} (cycle in modules.dep?)");
        }
        if seen.contains(name) {
            return Ok(());
        }
        let (path, deps) = self
            .dep
            .get(name)
            .with_context(|| format!("modules.dep has no entry for dependency {name}"))?;
        // modules.dep lists dependencies for modprobe, which loads them last-to-first.
        for d in deps.iter().rev() {
            let dn = module_name(d);
            if !self.builtin.contains(&dn) {
                self.visit(&dn, seen, order, depth + 1)?;
            }
        }
        if seen.insert(name.to_string()) {
            order.push(PlannedModule {
                name: name.to_string(),
                rel_path: path.clone(),
            });
        }
        Ok(())
    }
}

/// Resolves a user-given module directory: either `.../lib/modules/<release>` itself, or a
/// root holding `lib/modules/<release>` (then `release` picks the subdirectory).
pub fn resolve_modules_dir(given: &Path, release: &str) -> Result<PathBuf> {
    let looks_like_rel = |p: &Path| p.join("modules.dep").is_file() || p.join("kernel").is_dir();
    if looks_like_rel(given) {
        return Ok(given.to_path_buf());
    }
    for cand in [
        given.join(release),
        given.join("lib/modules").join(release),
        given.join("usr/lib/modules").join(release),
    ] {
        if looks_like_rel(&cand) {
            return Ok(cand);
        }
    }
    bail!(
        "{} holds no modules for kernel {release} (expected modules.dep in it, in <dir>/{release} or in <dir>/lib/modules/{release})",
        given.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lz4_legacy_round_trip() {
        let a: Vec<u8> = (0..(9u32 << 20))
            .map(|i| (i % 251) as u8 ^ (i >> 13) as u8)
            .collect();
        let mut s = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in a.chunks(LZ4_LEGACY_BLOCK) {
            let c = lz4_flex::block::compress(chunk);
            s.extend_from_slice(&(c.len() as u32).to_le_bytes());
            s.extend_from_slice(&c);
        }
        s.extend_from_slice(&(a.len() as u32).to_le_bytes());
        assert_eq!(lz4_legacy_decompress(&s).unwrap(), a);
        // Bad trailer is caught.
        let n = s.len();
        s[n - 1] ^= 1;
        assert!(lz4_legacy_decompress(&s).is_err());
        assert!(lz4_legacy_decompress(b"nope").is_err());
    }

    #[test]
    fn cpuinfo_tsc() {
        let ci = "processor\t: 0\ncpu MHz\t\t: 2596.142\nflags\t\t: fpu tsc constant_tsc\n";
        assert_eq!(parse_cpuinfo_tsc_khz(ci), Some(2_596_142));
        assert_eq!(
            parse_cpuinfo_tsc_khz("cpu MHz : 2596.1\nflags : fpu tsc\n"),
            None
        );
        assert_eq!(parse_cpuinfo_tsc_khz("flags : constant_tsc\n"), None);
    }

    #[test]
    fn names() {
        assert_eq!(
            module_name("kernel/drivers/block/virtio_blk.ko"),
            "virtio_blk"
        );
        assert_eq!(module_name("virtio-blk"), "virtio_blk");
        assert_eq!(module_name("kernel/fs/erofs/erofs.ko.xz"), "erofs");
    }

    #[test]
    fn plan_orders_dependencies_first() {
        let dir = tempfile::tempdir().unwrap();
        let rel = dir.path().join("6.1.0-test");
        fs::create_dir_all(&rel).unwrap();
        fs::write(
            rel.join("modules.dep"),
            "kernel/a/virtio_blk.ko: kernel/a/virtio.ko kernel/a/virtio_ring.ko\n\
             kernel/a/virtio.ko: kernel/a/virtio_ring.ko\n\
             kernel/a/virtio_ring.ko:\n\
             kernel/a/erofs.ko: kernel/a/libcrc32c.ko\n\
             kernel/a/libcrc32c.ko:\n",
        )
        .unwrap();
        fs::write(
            rel.join("modules.builtin"),
            "kernel/fs/overlayfs/overlay.ko\n",
        )
        .unwrap();
        let t = ModuleTree::load(&rel).unwrap();
        let p = t
            .plan(
                &["virtio_blk", "overlay", "erofs", "nonexistent"],
                &["virtio_blk", "overlay"],
            )
            .unwrap();
        let names: Vec<_> = p.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            ["virtio_ring", "virtio", "virtio_blk", "libcrc32c", "erofs"]
        );
        assert!(t.plan(&["missing"], &["missing"]).is_err());
    }
}
