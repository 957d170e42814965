//! VMs with a network, booted for real under QEMU/TCG with the real PID 1 (the static
//! `udos-init`: `$UDOS_INIT`, else the one `scripts/setup` builds in this target dir).
//! The guest runs in manager mode; its "agent" is a busybox script (the probe below)
//! that tries what a step could try and prints `PROBE ...` lines on the console. The
//! host side runs real TCP servers on its loopback and counts who connects.
//!
//! Each check runs on both network backends: QEMU's slirp and the TAP backend
//! (cloud-hypervisor's network, which cannot boot here, proven under QEMU/TCG).

mod common;

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use udos_vmm::{
    layout, net_layout, Accel, CloudHypervisor, Disk, Hypervisor, NetBackend, Network, Qemu,
    VmExit, VmSpec, TAP_NAME,
};

/// Modules the guest loads (`/udos/modules`); depmod adds their dependencies' order.
const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "overlay",
    "erofs",
];
/// Every module file the initramfs carries (the list above and its dependencies).
const MODULE_FILES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "overlay",
    "libcrc32c",
    "erofs",
];
/// cloud-hypervisor's devices are virtio-pci: its guest also loads these.
const PCI_MODULES: &[&str] = &["virtio_pci"];
const PCI_MODULE_FILES: &[&str] = &[
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
];

/// What the host renders for `udos_layer::boot::NetConfig::USER_MODE` (`udos.net=`).
const UDOS_NET: &str = "udos.net=10.0.2.15/24,10.0.2.2,10.0.2.3";

/// The guest's agent. Parameters come from the kernel command line:
/// `probe.tcp=PORT,...` connect to the gateway on each port; `probe.hostaddrs=A,...`
/// and `probe.hostports=P,...` connect to each of those addresses on each of those
/// ports; `probe.sleep` sleeps.
const PROBE: &str = r#"#!/bin/sh
B=/bin/busybox
arg() { for w in $($B cat /proc/cmdline); do case "$w" in "$1="*) echo "${w#*=}" | $B tr , ' ';; esac; done; }
if $B grep -q probe.sleep /proc/cmdline; then echo "PROBE sleeping"; exec $B sleep 3600; fi
one() { $B tr '\n' ' ' | $B sed 's/ *$//'; }
echo "PROBE ifaces $($B ls /sys/class/net | one)"
echo "PROBE resolv $($B cat /etc/resolv.conf 2>&1 | one)"
echo "PROBE hosts $($B grep -c localhost /etc/hosts 2>&1)"
echo "PROBE netlayer-write $( (echo x > /run/udos/net/etc/resolv.conf) 2>&1 | one)"
for p in $(arg probe.tcp); do
  echo "PROBE tcp $p $($B timeout 15 $B nc -w 3 10.0.2.2 $p </dev/null 2>&1 | one)"
done
for a in $(arg probe.hostaddrs); do
  for p in $(arg probe.hostports); do
    echo "PROBE hostaddr $a:$p $($B timeout 15 $B nc -w 3 $a $p </dev/null 2>&1 | one)"
  done
done
echo "PROBE dns $($B timeout 20 $B nslookup example.com 2>&1 | one)"
echo "PROBE upper $($B ls -A /run/udos/upperfs/upper 2>&1 | one)"
echo "PROBE end"
"#;

fn qemu(backend: NetBackend) -> Qemu {
    Qemu::find(Accel::Tcg)
        .expect("qemu-system-x86_64 (apt-get install qemu-system-x86)")
        .with_net_backend(backend)
}

/// After a QEMU VM: its network is gone ([`assert_namespace_gone`]), and QEMU's NIC
/// was on the backend asked for.
fn assert_network_gone(name: &str, rt: &Path, backend: NetBackend) {
    assert_namespace_gone(name, rt);
    let cmd = std::fs::read_to_string(rt.join(layout::COMMAND)).unwrap();
    let netdev = match backend {
        NetBackend::UserMode => "\nuser,id=net0,",
        NetBackend::Tap => "\ntap,id=net0,ifname=udos0,",
    };
    assert!(cmd.contains(netdev), "{name}: {cmd}");
}

/// After a VM: its namespace is unmounted and gone, and no TAP is left in the host.
fn assert_namespace_gone(name: &str, rt: &Path) {
    let ns = rt.join(net_layout::NET_DIR).join(net_layout::NETNS);
    assert!(!ns.exists(), "{name}: the namespace outlived the VM");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&*ns.to_string_lossy()),
        "{name}: the namespace is still mounted: {mounts}"
    );
    assert!(
        !Path::new("/sys/class/net").join(TAP_NAME).exists(),
        "{name}: a TAP {TAP_NAME} is in the host"
    );
}

/// The static udos-init: `$UDOS_INIT`, else what `scripts/setup` builds next to this
/// test binary's target dir.
fn udos_init() -> PathBuf {
    if let Some(p) = std::env::var_os("UDOS_INIT") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    // <target>/debug/deps/network-<hash>
    let target = exe.ancestors().nth(3).unwrap();
    let p = target.join("x86_64-unknown-linux-gnu/release/udos-init");
    assert!(
        p.is_file(),
        "no static udos-init at {}: set UDOS_INIT or build it with \
         RUSTFLAGS='-C target-feature=+crt-static' cargo build --release -p udos-init \
         --target x86_64-unknown-linux-gnu",
        p.display()
    );
    p
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|f| f == name) {
            return Some(p);
        }
    }
    None
}

/// Adds `dir` (relative names under `prefix`) to the archive, directories first.
fn add_tree(c: &mut Cpio, dir: &Path, prefix: &str) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = format!("{prefix}/{}", e.file_name().to_string_lossy());
        if e.path().is_dir() {
            c.dir(&name);
            add_tree(c, &e.path(), &name);
        } else {
            c.file(&name, 0o644, &std::fs::read(e.path()).unwrap());
        }
    }
}

/// An initramfs like `udos image build` makes: udos-init as `/init`, the modules with
/// depmod's `modules.dep`, and `/udos/modules` (with the virtio-pci ones if `pci`).
fn initramfs(dir: &Path, pci: bool) -> PathBuf {
    let pick = |base: &[&'static str], extra: &[&'static str]| -> Vec<&'static str> {
        let extra = if pci { extra } else { &[] };
        base.iter().chain(extra).copied().collect()
    };
    let (load, files) = (
        pick(GUEST_MODULES, PCI_MODULES),
        pick(MODULE_FILES, PCI_MODULE_FILES),
    );
    let (root, release) = kernel_tree();
    let mods = root.join("lib/modules").join(release);
    let tree = dir.join("modroot");
    let rel_dir = tree.join("lib/modules").join(release);
    for m in &files {
        let src = find_file(&mods, &format!("{m}.ko")).unwrap_or_else(|| panic!("{m}.ko"));
        let dst = rel_dir.join(src.strip_prefix(&mods).unwrap());
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(&src, &dst).unwrap();
    }
    std::fs::copy(
        mods.join("modules.builtin"),
        rel_dir.join("modules.builtin"),
    )
    .unwrap();
    run(Command::new("depmod").arg("-b").arg(&tree).arg(release));

    let mut c = Cpio::default();
    for d in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "udos",
        "lib",
        "lib/modules",
    ] {
        c.dir(d);
    }
    c.char_dev("dev/console", 5, 1);
    c.file("init", 0o755, &std::fs::read(udos_init()).unwrap());
    c.file(
        "udos/modules",
        0o644,
        format!("{}\n", load.join("\n")).as_bytes(),
    );
    c.dir(&format!("lib/modules/{release}"));
    add_tree(&mut c, &rel_dir, &format!("lib/modules/{release}"));
    let path = dir.join("initramfs.cpio");
    std::fs::write(&path, c.finish()).unwrap();
    path
}

/// The step root: busybox, the probe as `/sbin/udos-agent`, an empty `/etc` (no
/// `resolv.conf`, no `hosts`), as an erofs image.
fn lower(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    for d in ["bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let bb = root.join("bin/busybox");
    std::fs::write(&bb, busybox()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bb, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    let agent = root.join("sbin/udos-agent");
    std::fs::write(&agent, PROBE).unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let img = dir.join("lower.erofs");
    run(Command::new("mkfs.erofs").arg(&img).arg(&root));
    img
}

/// A fresh ext4 upper disk.
fn upper(dir: &Path) -> PathBuf {
    let img = dir.join("upper.ext4");
    raw_disk(&img, 32);
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
    img
}

/// Shared per test process: the initramfs and the lower (the upper is per VM).
struct Guest {
    initramfs: PathBuf,
    lower: PathBuf,
    _dir: tempfile::TempDir,
}

fn guest(pci: bool) -> &'static Guest {
    static G: [std::sync::OnceLock<Guest>; 2] =
        [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
    G[usize::from(pci)].get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        Guest {
            initramfs: initramfs(dir.path(), pci),
            lower: lower(dir.path()),
            _dir: dir,
        }
    })
}

type Lines = Arc<Mutex<Vec<String>>>;

/// A VM of the probe guest; `network` and the probe's parameters as given.
fn spec(name: &str, dir: &Path, network: Option<Network>, probe: &str) -> (VmSpec, Lines) {
    spec_for(false, name, dir, network, probe)
}

/// [`spec`] for QEMU (`pci` false) or cloud-hypervisor (`pci` true: virtio-pci).
fn spec_for(
    pci: bool,
    name: &str,
    dir: &Path,
    network: Option<Network>,
    probe: &str,
) -> (VmSpec, Lines) {
    let g = guest(pci);
    let lines: Lines = Arc::default();
    let l2 = lines.clone();
    let mut spec = VmSpec::new(name, kernel(), &g.initramfs, dir.join("vm"));
    let net_key = if network.is_some() { UDOS_NET } else { "" };
    spec.cmdline = format!(
        "console=ttyS0 quiet panic=-1 udos.mode=manager udos.lowers=udos-l0 \
         udos.upper=udos-upper {net_key} {probe}"
    );
    spec.memory_mib = 256;
    spec.timeout = BOOT_TIMEOUT;
    spec.disks = vec![
        Disk::read_only(&g.lower, "udos-l0"),
        Disk::writable(upper(dir), "udos-upper"),
    ];
    spec.network = network;
    spec.console = Some(Box::new(move |l: &str| {
        l2.lock().unwrap().push(l.to_string())
    }));
    (spec, lines)
}

fn user_mode(host_ports: &[u16]) -> Network {
    Network {
        host_ports: host_ports.to_vec(),
        address: Ipv4Addr::new(10, 0, 2, 15),
        prefix_len: 24,
        gateway: Ipv4Addr::new(10, 0, 2, 2),
        dns: Ipv4Addr::new(10, 0, 2, 3),
    }
}

/// The probe's result lines, `PROBE <key> <rest>`, by key (`tcp 1234`, `ifaces`, ...).
struct Probe(Vec<String>);

impl Probe {
    fn of(lines: &Lines) -> Probe {
        Probe(lines.lock().unwrap().clone())
    }

    fn get(&self, key: &str) -> &str {
        let prefix = format!("PROBE {key}");
        self.0
            .iter()
            .find_map(|l| {
                l.strip_prefix(&prefix)
                    .filter(|r| r.is_empty() || r.starts_with(' '))
            })
            .map(str::trim)
            .unwrap_or_else(|| panic!("no `{prefix}` line in {:#?}", self.0))
    }
}

/// A TCP server on the host's loopback (or every address) that answers each
/// connection with its token and counts connections.
struct Server {
    port: u16,
    token: String,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Server {
    fn start(addr: Ipv4Addr, tag: &str) -> Server {
        let listener = TcpListener::bind((addr, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let token = format!("udos-{tag}-{}-{port}", std::process::id());
        let (hits, stop) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (h, s, t) = (hits.clone(), stop.clone(), token.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        h.fetch_add(1, Ordering::AcqRel);
                        let _ = conn.write_all(format!("{t}\n").as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Server {
            port,
            token,
            hits,
            stop,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::Acquire)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// The host's own IPv4 addresses (not loopback), from `/proc/net/fib_trie`.
fn host_addresses() -> Vec<Ipv4Addr> {
    let trie = std::fs::read_to_string("/proc/net/fib_trie").unwrap();
    let mut out = Vec::new();
    let mut last = None;
    for l in trie.lines().map(str::trim) {
        if let Some(a) = l.strip_prefix("|-- ") {
            last = a.parse::<Ipv4Addr>().ok();
        } else if l == "/32 host LOCAL" {
            if let Some(a) = last.filter(|a| !a.is_loopback() && !out.contains(a)) {
                out.push(a);
            }
        }
    }
    out
}

/// The host's default gateway, from `/proc/net/route`: pasta would map it to the
/// host's loopback without `--no-map-gw`.
fn host_gateway() -> Option<Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/route").unwrap();
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000")
            .then(|| u32::from_str_radix(f[2], 16).ok())
            .flatten()
            .map(|g| Ipv4Addr::from(u32::from_be(g)))
    })
}

/// Whether the host's first resolver answers a query at all (any answer counts: this
/// machine may have no internet, so NXDOMAIN or SERVFAIL are as good as an address).
fn host_resolver_answers() -> bool {
    let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let Some(server) = conf
        .lines()
        .find_map(|l| l.trim().strip_prefix("nameserver"))
        .and_then(|v| v.trim().parse::<Ipv4Addr>().ok())
    else {
        return false;
    };
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    // id 0x5544, recursion desired, one question: example.com IN A.
    let mut q = vec![0x55, 0x44, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["example", "com"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    if sock.send_to(&q, (server, 53)).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(sock.recv(&mut buf), Ok(n) if n >= 12 && buf[..2] == [0x55, 0x44])
}

fn assert_powered_off(name: &str, exit: &VmExit, lines: &Lines, hv_log: &Path) {
    assert_eq!(
        *exit,
        VmExit::PoweredOff,
        "{name}: {:#?}\n{}",
        lines.lock().unwrap(),
        std::fs::read_to_string(hv_log).unwrap_or_default()
    );
}

/// Refused connections are what slirp gives for a port nothing listens on in the VM's
/// namespace; a reject route gives "No route to host".
fn refused(out: &str) -> bool {
    out.contains("Connection refused") || out.contains("No route to host")
}

/// Not reached: refused, or (an address beyond the host, e.g. its real gateway, that
/// drops the packet) timed out. The servers' counters say nothing reached the host.
fn blocked(out: &str) -> bool {
    refused(out) || out.contains("timed out")
}

#[test]
fn two_networked_vms_reach_only_the_host_ports_they_name() {
    two_networked_vms(NetBackend::UserMode);
}

#[test]
fn two_networked_vms_on_taps_reach_only_the_host_ports_they_name() {
    two_networked_vms(NetBackend::Tap);
}

fn two_networked_vms(backend: NetBackend) {
    // The host's services: two named by one VM each, one that nobody names, and one on
    // every address (a database listening on 0.0.0.0).
    let for_a = Server::start(Ipv4Addr::LOCALHOST, "a");
    let for_b = Server::start(Ipv4Addr::LOCALHOST, "b");
    let unnamed = Server::start(Ipv4Addr::LOCALHOST, "unnamed");
    let everywhere = Server::start(Ipv4Addr::UNSPECIFIED, "everywhere");
    let mut addrs = host_addresses();
    assert!(!addrs.is_empty(), "the host has no address but loopback");
    addrs.extend(host_gateway());
    let addrs: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let tcp = format!("{},{},{}", for_a.port, for_b.port, unnamed.port);
    let probe = format!(
        "probe.tcp={tcp},{} probe.hostports={},{} probe.hostaddrs={}",
        everywhere.port,
        everywhere.port,
        unnamed.port,
        addrs.join(",")
    );
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let vms: Vec<_> = [("net-a", for_a.port), ("net-b", for_b.port)]
        .into_iter()
        .zip(&dirs)
        .map(|((name, port), dir)| {
            let (spec, lines) = spec(name, dir.path(), Some(user_mode(&[port])), &probe);
            let handle = std::thread::spawn(move || qemu(backend).run(spec));
            (name, lines, handle)
        })
        .collect();
    let results: Vec<_> = vms
        .into_iter()
        .map(|(name, lines, h)| (name, lines, h.join().unwrap().expect("qemu runs")))
        .collect();
    for (name, lines, outcome) in &results {
        assert_powered_off(name, &outcome.exit, lines, &outcome.hypervisor_log);
    }
    let (a, b) = (&results[0].2, &results[1].2);
    assert!(
        a.boot_started < b.boot_started + b.wall && b.boot_started < a.boot_started + a.wall,
        "the two VMs did not run at the same time"
    );

    for ((name, lines, outcome), (mine, other)) in
        results.iter().zip([(&for_a, &for_b), (&for_b, &for_a)])
    {
        let p = Probe::of(lines);
        println!("{name}: {:#?}", p.0);
        assert_eq!(p.get("ifaces"), "eth0 lo", "{name}");
        assert_eq!(p.get("resolv"), "nameserver 10.0.2.3", "{name}");
        assert_eq!(
            p.get("hosts"),
            "2",
            "{name}: /etc/hosts from the network layer"
        );
        assert!(
            p.get("netlayer-write").contains("Read-only file system"),
            "{name}: {}",
            p.get("netlayer-write")
        );
        assert_eq!(p.get(&format!("tcp {}", mine.port)), mine.token, "{name}");
        for closed in [other.port, unnamed.port, everywhere.port] {
            let out = p.get(&format!("tcp {closed}"));
            assert!(refused(out), "{name}: port {closed}: {out}");
        }
        for a in &addrs {
            for port in [everywhere.port, unnamed.port] {
                let out = p.get(&format!("hostaddr {a}:{port}"));
                assert!(blocked(out), "{name}: {a}:{port}: {out}");
            }
        }
        // resolv.conf and hosts came from PID 1's network layer, not the step's own.
        assert_eq!(p.get("upper"), "", "{name}: the step's layer is not empty");
        let log = std::fs::read_to_string(&outcome.console_log).unwrap();
        assert!(
            log.contains("network: eth0 10.0.2.15/24 via 10.0.2.2, DNS 10.0.2.3"),
            "{log}"
        );
        assert_network_gone(name, outcome.console_log.parent().unwrap(), backend);
    }
    assert_eq!(for_a.hits(), 1, "only VM a connected to its port, once");
    assert_eq!(for_b.hits(), 1, "only VM b connected to its port, once");
    assert_eq!(unnamed.hits(), 0, "a port nobody named was reached");
    assert_eq!(
        everywhere.hits(),
        0,
        "a service on the host's addresses was reached"
    );

    // DNS: 10.0.2.3 (slirp's forwarder, or the TAP's DNAT to the host's resolver)
    // answers whenever the host's resolver does.
    let host_dns = host_resolver_answers();
    for (name, lines, _) in &results {
        let dns = Probe::of(lines).get("dns").to_string();
        println!("{name}: nslookup example.com: {dns} (host resolver answers: {host_dns})");
        assert!(dns.contains("10.0.2.3"), "{name}: {dns}");
        if host_dns {
            assert!(
                !dns.contains("timed out") && (dns.contains("can't find") || dns.contains("Name:")),
                "{name}: no DNS answer through 10.0.2.3: {dns}"
            );
        }
    }
    println!(
        "two networked TCG VMs ({backend:?}): {:?} and {:?}",
        results[0].2.wall, results[1].2.wall
    );
}

#[test]
fn without_a_network_the_guest_has_no_nic() {
    without_a_network(NetBackend::UserMode);
}

#[test]
fn without_a_network_the_guest_has_no_nic_on_the_tap_backend() {
    without_a_network(NetBackend::Tap);
}

fn without_a_network(backend: NetBackend) {
    let dir = tempfile::tempdir().unwrap();
    let (spec, lines) = spec("no-net", dir.path(), None, "probe.tcp=1");
    let outcome = qemu(backend).run(spec).expect("qemu runs");
    assert_powered_off("no-net", &outcome.exit, &lines, &outcome.hypervisor_log);
    let p = Probe::of(&lines);
    assert_eq!(p.get("ifaces"), "lo");
    assert!(
        p.get("resolv").contains("No such file"),
        "{}",
        p.get("resolv")
    );
    assert!(refused(p.get("tcp 1")) || p.get("tcp 1").contains("unreachable"));
    let cmd = std::fs::read_to_string(dir.path().join("vm").join(layout::COMMAND)).unwrap();
    assert!(!cmd.contains("-netdev"), "{cmd}");
    assert!(!dir.path().join("vm").join(net_layout::NET_DIR).exists());
}

const HELPER_ENV: &str = "UDOS_VMM_TEST_NET_HOLD_DIR";
/// `tap` for the TAP backend, else slirp.
const HELPER_BACKEND_ENV: &str = "UDOS_VMM_TEST_NET_HOLD_BACKEND";

/// Not a test by itself: run by `no_orphan_pasta_when_the_host_process_is_killed` in a
/// child process, which it then SIGKILLs.
#[test]
#[ignore = "helper process for no_orphan_pasta_when_the_host_process_is_killed"]
fn helper_hold_a_networked_vm() {
    let Some(dir) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let backend = match std::env::var(HELPER_BACKEND_ENV).as_deref() {
        Ok("tap") => NetBackend::Tap,
        _ => NetBackend::UserMode,
    };
    let (mut spec, _) = spec("held", Path::new(&dir), Some(user_mode(&[])), "probe.sleep");
    spec.timeout = Duration::from_secs(300);
    let _ = qemu(backend).run(spec);
}

fn read_pid(path: &Path, deadline: Instant, child: &mut std::process::Child) -> u32 {
    loop {
        if let Some(p) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return p;
        }
        assert!(Instant::now() < deadline, "no {}", path.display());
        assert!(child.try_wait().unwrap().is_none(), "the helper exited");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `nsenter --net=NS program args...`: its stdout, or the failure.
fn in_namespace(ns: &Path, program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .arg(program)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

#[test]
fn no_orphan_pasta_when_the_host_process_is_killed() {
    no_orphan_pasta(NetBackend::UserMode);
}

#[test]
fn no_orphan_pasta_when_the_host_process_of_a_tap_vm_is_killed() {
    no_orphan_pasta(NetBackend::Tap);
}

fn no_orphan_pasta(backend: NetBackend) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_hold_a_networked_vm",
            "--ignored",
            "--nocapture",
        ])
        .env(HELPER_ENV, dir.path())
        .env(
            HELPER_BACKEND_ENV,
            if backend == NetBackend::Tap {
                "tap"
            } else {
                "user"
            },
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let rt = dir.path().join("vm");
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let qemu_pid = read_pid(&rt.join(layout::PID_FILE), deadline, &mut child);
    let pasta_pid = read_pid(
        &rt.join(net_layout::NET_DIR).join(layout::PID_FILE),
        deadline,
        &mut child,
    );
    assert!(process_alive_with(qemu_pid, "qemu"));
    assert!(process_alive_with(pasta_pid, "no-map-gw"));
    let ns = rt.join(net_layout::NET_DIR).join(net_layout::NETNS);
    if backend == NetBackend::Tap {
        // QEMU's NIC is on the namespace's TAP, and the rules are loaded there only.
        let link = in_namespace(&ns, "ip", &["-o", "link", "show", TAP_NAME]).unwrap();
        assert!(link.contains(TAP_NAME), "{link}");
        let table = in_namespace(&ns, "nft", &["list", "table", "inet", "udos"]).unwrap();
        assert!(table.contains("masquerade"), "{table}");
        assert!(!Path::new("/sys/class/net").join(TAP_NAME).exists());
    }
    child.kill().unwrap(); // SIGKILL: no unwinding, no Drop
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive_with(qemu_pid, "qemu") || process_alive_with(pasta_pid, "no-map-gw") {
        assert!(
            Instant::now() < deadline,
            "qemu {qemu_pid} or pasta {pasta_pid} outlived their host process"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The killed host could not unmount its namespace: detach it so the directory goes
    // (its TAP and rules go with it: they never were in the host).
    let _ = nix::mount::umount2(&ns, nix::mount::MntFlags::MNT_DETACH);
    assert!(!Path::new("/sys/class/net").join(TAP_NAME).exists());
}

/// cloud-hypervisor's own network path, end to end: one VM on the TAP reaches the
/// port it names and no other, DNS answers, and everything is gone afterwards.
#[test]
#[ignore = "needs a KVM host where cloud-hypervisor boots"]
fn cloud_hypervisor_vm_reaches_its_host_port_through_the_tap() {
    let ch = CloudHypervisor::find().expect("cloud-hypervisor (UDOS_CLOUD_HYPERVISOR)");
    let mine = Server::start(Ipv4Addr::LOCALHOST, "ch");
    let unnamed = Server::start(Ipv4Addr::LOCALHOST, "unnamed");
    let dir = tempfile::tempdir().unwrap();
    let probe = format!("probe.tcp={},{}", mine.port, unnamed.port);
    let (mut spec, lines) = spec_for(
        true,
        "ch-net",
        dir.path(),
        Some(user_mode(&[mine.port])),
        &probe,
    );
    spec.kernel = extract_vmlinux(&kernel(), dir.path());
    let outcome = ch.run(spec).expect("cloud-hypervisor runs");
    assert_powered_off("ch-net", &outcome.exit, &lines, &outcome.hypervisor_log);
    let p = Probe::of(&lines);
    assert_eq!(p.get("ifaces"), "eth0 lo");
    assert_eq!(p.get(&format!("tcp {}", mine.port)), mine.token);
    let out = p.get(&format!("tcp {}", unnamed.port));
    assert!(refused(out) || out.contains("timed out"), "{out}");
    assert!(p.get("dns").contains("10.0.2.3"), "{}", p.get("dns"));
    assert_eq!((mine.hits(), unnamed.hits()), (1, 0));
    let rt = outcome.console_log.parent().unwrap();
    let config = std::fs::read_to_string(rt.join(layout::VM_CONFIG)).unwrap();
    assert!(config.contains("\"tap\": \"udos0\""), "{config}");
    assert_namespace_gone("ch-net", rt);
}
