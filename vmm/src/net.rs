//! The guest's network: a virtio-net NIC behind QEMU's user-mode network (slirp) or a
//! TAP device ([`NetBackend`], `net_tap`), with the hypervisor run inside a network
//! namespace of its own that `pasta` (Debian's `passt` package) connects to the host.
//!
//! Why the namespace: slirp alone maps its gateway address to the host's loopback, every
//! port, so a step could reach every service of the host. Inside the namespace the
//! gateway maps to the namespace's own loopback, where nothing listens except what pasta
//! forwards (`-T PORT`: the namespace's `127.0.0.1:PORT` to the host's), and outbound
//! connections leave through pasta's sockets on the host (NAT egress). pasta copies the
//! host's address and routes into the namespace; the host's other local addresses get
//! reject routes there, since pasta would otherwise connect to them on the host's
//! behalf. Each VM has its own namespace, so VMs never see each other.
//!
//! The namespace is bind-mounted at `net/netns` in the VM's runtime directory: pasta,
//! which runs as root but drops its capabilities before it opens the namespace, cannot
//! open `/proc/<pid>/ns/net` of a process with more capabilities than itself, but can
//! open a bind-mounted namespace file (what `ip netns add` makes).

use std::ffi::OsString;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use crate::process::{file_tail, Proc};
use crate::VmmError;

/// Environment variable naming the pasta binary (default: `pasta` in PATH).
pub const PASTA_ENV: &str = "UDOS_PASTA";
const PASTA_BIN: &str = "pasta";

/// How long pasta may take to configure the namespace and bind the forwarded ports.
pub const PASTA_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// File names inside the VM's runtime directory ([`crate::VmSpec::runtime_dir`]).
pub mod layout {
    /// The directory holding what belongs to the VM's network. pasta's pid, command
    /// line and output are `net/hypervisor.pid`, `net/hypervisor.cmd` and
    /// `net/pasta.log` (the helper process follows the hypervisor's layout).
    pub const NET_DIR: &str = "net";
    /// The VM's network namespace, bind-mounted while the VM runs.
    pub const NETNS: &str = "netns";
    /// pasta's stdout and stderr.
    pub const PASTA_LOG: &str = "pasta.log";
}

/// How the guest's NIC is joined to the VM's namespace. Both are behind the same pasta
/// and give the guest the same network (addresses, egress, DNS, host ports).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum NetBackend {
    /// QEMU's user-mode network (slirp) inside the namespace. QEMU's default.
    #[default]
    UserMode,
    /// A TAP device in the namespace with forwarding and nftables rules (`net_tap`):
    /// what cloud-hypervisor uses; QEMU uses it when asked ([`crate::Qemu::with_net_backend`]).
    Tap,
}

/// The guest's network: a virtio-net NIC with NAT egress, on a network of its own.
///
/// The addresses are the guest's static configuration, which the host also passes to
/// PID 1 (`udos_layer::boot::NetConfig`, `udos.net=`); they must be the ones slirp
/// serves, which the TAP backend serves too (the host builds both from
/// `NetConfig::USER_MODE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    /// TCP ports on the host's loopback that the guest reaches at `gateway:PORT`.
    /// Nothing else of the host is reachable from the guest.
    pub host_ports: Vec<u16>,
    /// The guest's own address.
    pub address: Ipv4Addr,
    /// The prefix length of the guest's subnet.
    pub prefix_len: u8,
    /// The guest's default gateway (slirp's host address).
    pub gateway: Ipv4Addr,
    /// Where slirp answers DNS, forwarding to the host's resolvers.
    pub dns: Ipv4Addr,
}

impl Network {
    /// The subnet's network address, e.g. 10.0.2.0 for 10.0.2.15/24.
    pub fn subnet(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) & mask(self.prefix_len))
    }

    /// The subnet's mask, e.g. 255.255.255.0 for /24.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix_len))
    }

    /// What slirp needs: a prefix of 1 to 30 bits, the gateway and DNS on the guest's
    /// subnet, the three addresses distinct; each host port named once, none zero.
    pub(crate) fn check(&self) -> Result<(), String> {
        if !(1..=30).contains(&self.prefix_len) {
            return Err(format!("prefix length {} is not 1..=30", self.prefix_len));
        }
        let m = mask(self.prefix_len);
        let on_subnet = |a: Ipv4Addr| u32::from(a) & m == u32::from(self.subnet());
        if !on_subnet(self.gateway) || !on_subnet(self.dns) {
            return Err(format!(
                "the gateway {} and DNS {} must be on the guest's subnet {}/{} (slirp serves both)",
                self.gateway,
                self.dns,
                self.subnet(),
                self.prefix_len
            ));
        }
        if self.address == self.gateway || self.address == self.dns || self.gateway == self.dns {
            return Err("the address, gateway and DNS must differ".into());
        }
        let mut ports = self.host_ports.clone();
        ports.sort_unstable();
        if ports.first() == Some(&0) {
            return Err("host port 0 is not a port".into());
        }
        if ports.windows(2).any(|w| w[0] == w[1]) {
            return Err(format!("a host port is named twice: {:?}", self.host_ports));
        }
        Ok(())
    }

    /// QEMU's `-netdev` and `-device` arguments: slirp with our addresses, IPv4 only,
    /// or the namespace's TAP; and a virtio-mmio NIC on it.
    pub(crate) fn qemu_args(&self, backend: NetBackend) -> [String; 4] {
        let (netdev, device) = match backend {
            NetBackend::UserMode => (
                format!(
                    "user,id=net0,net={}/{},host={},dns={},dhcpstart={},ipv6=off",
                    self.subnet(),
                    self.prefix_len,
                    self.gateway,
                    self.dns,
                    self.address
                ),
                "virtio-net-device,netdev=net0".to_string(),
            ),
            NetBackend::Tap => (
                format!(
                    "tap,id=net0,ifname={},script=no,downscript=no",
                    crate::net_tap::TAP_NAME
                ),
                format!(
                    "virtio-net-device,netdev=net0,mac={}",
                    crate::net_tap::GUEST_MAC
                ),
            ),
        };
        ["-netdev".into(), netdev, "-device".into(), device]
    }

    /// pasta's arguments: configure `netns` like the host (`--config-net`, IPv4 only),
    /// keep the gateway off the host (`--no-map-gw`), forward nothing into the
    /// namespace, and forward exactly the named TCP ports out to the host's loopback.
    fn pasta_args(&self, netns: &Path) -> Vec<OsString> {
        let mut ports = self.host_ports.clone();
        ports.sort_unstable();
        let out = if ports.is_empty() {
            "none".to_string()
        } else {
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut a: Vec<OsString> = [
            "--foreground",
            "--quiet",
            // As root, pasta would switch to nobody, who may not enter a namespace
            // owned by root's user namespace; it still drops its capabilities.
            "--runas",
            "0",
            "--config-net",
            "--no-map-gw",
            "--ipv4-only",
            "--tcp-ports",
            "none",
            "--udp-ports",
            "none",
            "--udp-ns",
            "none",
            "--tcp-ns",
            &out,
            // udos removes the namespace itself and kills pasta with the VM.
            "--no-netns-quit",
            "--netns",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        a.push(netns.as_os_str().to_owned());
        a
    }
}

fn mask(prefix_len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0)
}

/// A running network for one VM: its namespace and the pasta that connects it. Dropping
/// it kills pasta and removes the namespace.
pub(crate) struct Attached {
    // Field order is drop order: pasta goes before its namespace.
    pasta: Proc,
    ns: Namespace,
}

impl Attached {
    /// Creates the namespace under `runtime_dir/net/`, starts pasta on it and waits (up
    /// to [`PASTA_READY_TIMEOUT`]) until the namespace has its default route and every
    /// named port is listened on; then blocks the host's other addresses in it, and
    /// for [`NetBackend::Tap`] sets up the TAP and its rules (`net_tap::setup`).
    pub(crate) fn start(
        net: &Network,
        runtime_dir: &Path,
        backend: NetBackend,
    ) -> Result<Attached, VmmError> {
        let attached = Self::start_with(&find_pasta()?, net, runtime_dir)?;
        if backend == NetBackend::Tap {
            crate::net_tap::setup(&attached.ns, net)?;
        }
        Ok(attached)
    }

    fn start_with(
        pasta_bin: &Path,
        net: &Network,
        runtime_dir: &Path,
    ) -> Result<Attached, VmmError> {
        let dir = runtime_dir.join(layout::NET_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| VmmError::io("creating", &dir, e))?;
        let ns = Namespace::create(&dir.join(layout::NETNS))?;
        let log_path = dir.join(layout::PASTA_LOG);
        let log = File::create(&log_path).map_err(|e| VmmError::io("creating", &log_path, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| VmmError::io("opening", &log_path, e))?;
        let args = net.pasta_args(&ns.path);
        let mut pasta = Proc::spawn(pasta_bin, &args, &dir, |c| {
            c.stdout(log).stderr(log2);
        })?;
        wait_ready(&ns, &mut pasta, pasta_bin, &log_path, &net.host_ports)?;
        let host_addrs = host_local_ipv4()?;
        ns.enter(|| reject_routes(&host_addrs))?
            .map_err(|e| network_error(format!("blocking the host's addresses: {e}")))?;
        warn_if_loopback_resolver();
        Ok(Attached { pasta, ns })
    }

    /// The namespace, for the hypervisor to `setns` into before it starts.
    pub(crate) fn netns_fd(&self) -> RawFd {
        self.ns.raw_fd()
    }

    /// Ends the network after the VM: if pasta died while the VM ran (the guest lost
    /// its network), says so in `log`; then kills pasta and removes the namespace.
    pub(crate) fn finish(mut self, log: &Path) {
        if let Ok(Some(status)) = self.pasta.try_wait() {
            let dir = self.ns.path.parent().unwrap_or(Path::new("."));
            crate::process::note(
                log,
                &format!(
                    "pasta (the VM's network) exited while the VM ran ({status}): {}",
                    pasta_log_tail(&dir.join(layout::PASTA_LOG))
                ),
            );
        }
    }
}

fn network_error(detail: String) -> VmmError {
    VmmError::Network { detail }
}

/// pasta through `UDOS_PASTA` or PATH.
fn find_pasta() -> Result<PathBuf, VmmError> {
    if let Some(p) = std::env::var_os(PASTA_ENV) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(VmmError::NotInstalled {
                what: "pasta",
                hint: format!("{PASTA_ENV}={} is not a file", p.display()),
            })
        };
    }
    crate::find_in_path(PASTA_BIN).ok_or_else(|| VmmError::NotInstalled {
        what: "pasta",
        hint: format!(
            "{PASTA_BIN} is not in PATH; a VM with a network needs it (Debian: apt-get install passt) or set {PASTA_ENV}"
        ),
    })
}

/// Polls the namespace until pasta has configured it; fails at once when pasta exits.
fn wait_ready(
    ns: &Namespace,
    pasta: &mut Proc,
    binary: &Path,
    log: &Path,
    ports: &[u16],
) -> Result<(), VmmError> {
    let deadline = Instant::now() + PASTA_READY_TIMEOUT;
    loop {
        if let Some(status) = pasta
            .try_wait()
            .map_err(|e| VmmError::io("waiting for", binary, e))?
        {
            return Err(VmmError::EarlyExit {
                binary: binary.to_path_buf(),
                status: status.to_string(),
                detail: pasta_log_tail(log),
            });
        }
        if ns.enter(|| namespace_ready(ports))? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(network_error(format!(
                "pasta did not set up the VM's network within {PASTA_READY_TIMEOUT:?}: {}",
                pasta_log_tail(log)
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// pasta's output without the lines about syslog (pasta tries it when it has no tty).
fn pasta_log_tail(log: &Path) -> String {
    file_tail(log, 4096)
        .lines()
        .filter(|l| !l.contains("to syslog"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// In the namespace: a default route exists and each port is listened on.
fn namespace_ready(ports: &[u16]) -> bool {
    let route = std::fs::read_to_string("/proc/thread-self/net/route").unwrap_or_default();
    let tcp = std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap_or_default();
    has_default_route(&route) && ports.iter().all(|p| listens_on(&tcp, *p))
}

/// `/proc/net/route`: a line whose destination and mask are 0.
fn has_default_route(table: &str) -> bool {
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 7 && f[1] == "00000000" && f[7] == "00000000"
    })
}

/// `/proc/net/tcp`: a socket in state LISTEN (`0A`) on `port` (local address
/// `HEXADDR:HEXPORT`).
fn listens_on(table: &str, port: u16) -> bool {
    let want = format!(":{port:04X}");
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
    })
}

/// The host's local IPv4 destinations outside 127/8, as `(address, prefix length)`:
/// every `LOCAL` entry of the calling thread's routing tables, which covers each
/// interface address and also local ranges (`ip route add local 10.9.0.0/16 dev lo`).
fn host_local_ipv4() -> Result<Vec<(Ipv4Addr, u8)>, VmmError> {
    let path = "/proc/thread-self/net/fib_trie";
    let text =
        std::fs::read_to_string(path).map_err(|e| VmmError::io("reading", Path::new(path), e))?;
    Ok(local_entries(&text))
}

/// Parses `/proc/net/fib_trie`: a `|-- ADDRESS` line, then one `/LEN SCOPE TYPE` line
/// per route to that address.
fn local_entries(fib_trie: &str) -> Vec<(Ipv4Addr, u8)> {
    let mut out = Vec::new();
    let mut addr: Option<Ipv4Addr> = None;
    for line in fib_trie.lines().map(str::trim) {
        if let Some(a) = line.strip_prefix("|-- ") {
            addr = a.parse().ok();
            continue;
        }
        let (Some(a), Some(rest)) = (addr, line.strip_prefix('/')) else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let len = words.next().and_then(|l| l.parse::<u8>().ok());
        if let (Some(len), Some("LOCAL")) = (len, words.nth(1)) {
            if !a.is_loopback() && len <= 32 && !out.contains(&(a, len)) {
                out.push((a, len));
            }
        }
    }
    out
}

/// The kernel's `struct rtentry` (`<linux/route.h>`), for `SIOCADDRT`.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is the C idiom.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// In the calling thread's namespace: a reject route (`ip route add unreachable
/// ADDR/LEN`) per destination, so a connection there fails with `EHOSTUNREACH`.
fn reject_routes(addrs: &[(Ipv4Addr, u8)]) -> std::io::Result<()> {
    if addrs.is_empty() {
        return Ok(());
    }
    // SAFETY: plain socket(2); the result is checked and owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    for &(addr, len) in addrs {
        let host = if len == 32 { libc::RTF_HOST } else { 0 };
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr_v4(Ipv4Addr::from(u32::from(addr) & mask(len))),
            rt_gateway: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
            rt_genmask: sockaddr_v4(Ipv4Addr::from(mask(len))),
            rt_flags: libc::RTF_UP | libc::RTF_REJECT | host,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: std::ptr::null_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        // SAFETY: SIOCADDRT reads one `struct rtentry`, which `rt` is, laid out as C.
        let rc = unsafe { libc::ioctl(sock.as_fd().as_raw_fd(), libc::SIOCADDRT, &mut rt) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(std::io::Error::new(e.kind(), format!("{addr}/{len}: {e}")));
            }
        }
    }
    Ok(())
}

/// slirp forwards DNS to the nameservers of the host's `/etc/resolv.conf`, from inside
/// the namespace, where the host's loopback is not: a resolver there (systemd-resolved's
/// 127.0.0.53) cannot answer the guest.
fn warn_if_loopback_resolver() {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let servers: Vec<Ipv4Addr> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    if !servers.is_empty() && servers.iter().all(Ipv4Addr::is_loopback) {
        tracing::warn!(
            "the host's resolvers ({servers:?}) are on its loopback, which VMs cannot reach: DNS will not work in the guest"
        );
    }
}

/// A network namespace bind-mounted on a file (as `ip netns add` does), with an open
/// descriptor for `setns`. Dropping it unmounts and removes the file; the namespace
/// ends once nothing else (pasta, QEMU) is in it, and with it its TAP and rules.
pub(crate) struct Namespace {
    path: PathBuf,
    fd: OwnedFd,
}

impl Namespace {
    pub(crate) fn create(path: &Path) -> Result<Namespace, VmmError> {
        remove_stale(path);
        File::create(path).map_err(|e| VmmError::io("creating", path, e))?;
        let target = path.to_path_buf();
        // unshare(CLONE_NEWNET) moves only the calling thread: a helper thread that
        // ends right after its namespace is pinned by the bind mount.
        let made = std::thread::spawn(move || -> nix::Result<()> {
            unshare(CloneFlags::CLONE_NEWNET)?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        })
        .join()
        .map_err(|_| network_error("the namespace thread panicked".into()))?;
        if let Err(e) = made {
            let _ = std::fs::remove_file(path);
            return Err(network_error(format!(
                "creating a network namespace at {}: {e} (a VM with a network needs root)",
                path.display()
            )));
        }
        let fd = File::open(path)
            .map(OwnedFd::from)
            .map_err(|e| VmmError::io("opening the network namespace", path, e));
        match fd {
            Ok(fd) => Ok(Namespace {
                path: path.to_path_buf(),
                fd,
            }),
            Err(e) => {
                remove_stale(path);
                Err(e)
            }
        }
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Runs `f` on a helper thread inside the namespace.
    pub(crate) fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, VmmError> {
        let fd = self.fd.as_fd();
        std::thread::scope(|s| {
            s.spawn(|| -> Result<T, VmmError> {
                setns(fd, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| network_error(format!("entering the VM's namespace: {e}")))?;
                Ok(f())
            })
            .join()
            .map_err(|_| network_error("a thread in the VM's namespace panicked".into()))?
        })
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        remove_stale(&self.path);
    }
}

/// Unmounts (if mounted) and removes a namespace file, e.g. one left by a host process
/// that was killed.
fn remove_stale(path: &Path) {
    let _ = umount2(path, MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(path);
}

/// For QEMU's `pre_exec`: enter the namespace `fd` (async-signal-safe: one syscall).
pub(crate) fn enter_in_child(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: setns(2) on a descriptor the parent keeps open across the fork.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user_mode(ports: &[u16]) -> Network {
        Network {
            host_ports: ports.to_vec(),
            address: Ipv4Addr::new(10, 0, 2, 15),
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            dns: Ipv4Addr::new(10, 0, 2, 3),
        }
    }

    #[test]
    fn qemu_gets_slirp_with_our_addresses_and_a_virtio_nic() {
        let n = user_mode(&[]);
        assert_eq!(n.subnet(), Ipv4Addr::new(10, 0, 2, 0));
        assert_eq!(
            n.qemu_args(NetBackend::UserMode),
            [
                "-netdev",
                "user,id=net0,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3,dhcpstart=10.0.2.15,ipv6=off",
                "-device",
                "virtio-net-device,netdev=net0",
            ]
        );
        assert_eq!(
            n.qemu_args(NetBackend::Tap),
            [
                "-netdev",
                "tap,id=net0,ifname=udos0,script=no,downscript=no",
                "-device",
                "virtio-net-device,netdev=net0,mac=52:54:00:12:34:56",
            ]
        );
    }

    #[test]
    fn pasta_forwards_exactly_the_named_ports() {
        let args = |n: &Network| {
            n.pasta_args(Path::new("/rt/net/netns"))
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let none = args(&user_mode(&[]));
        assert!(none.contains("--no-map-gw"), "{none}");
        assert!(
            none.contains("--tcp-ports none --udp-ports none --udp-ns none --tcp-ns none"),
            "{none}"
        );
        assert!(none.ends_with("--netns /rt/net/netns"), "{none}");
        let two = args(&user_mode(&[5432, 80]));
        assert!(two.contains("--tcp-ns 80,5432 "), "{two}");
    }

    #[test]
    fn check_refuses_what_slirp_or_pasta_cannot_do() {
        user_mode(&[1, 65535]).check().unwrap();
        assert!(user_mode(&[0]).check().unwrap_err().contains("port 0"));
        assert!(user_mode(&[80, 80]).check().unwrap_err().contains("twice"));
        let mut n = user_mode(&[]);
        n.dns = Ipv4Addr::new(8, 8, 8, 8);
        assert!(n.check().unwrap_err().contains("subnet"));
        let mut n = user_mode(&[]);
        n.gateway = n.address;
        assert!(n.check().unwrap_err().contains("differ"));
        let mut n = user_mode(&[]);
        n.prefix_len = 31;
        assert!(n.check().unwrap_err().contains("prefix"));
    }

    #[test]
    fn proc_tables_are_read_right() {
        let route =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert!(!has_default_route(route));
        let with_default =
            format!("{route}eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n");
        assert!(has_default_route(&with_default));
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
                   1: 0100007F:0050 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n";
        assert!(listens_on(tcp, 8080));
        assert!(
            !listens_on(tcp, 80),
            "an established socket is not a listener"
        );
        assert!(!listens_on(tcp, 0x90));
    }

    /// Real: a namespace of its own (root), a reject route in it, seen by the kernel.
    #[test]
    fn reject_routes_make_addresses_unreachable_in_a_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let ns = Namespace::create(&dir.path().join("netns")).unwrap();
        let blocked = Ipv4Addr::new(192, 0, 2, 77);
        let (table, connect) = ns
            .enter(|| {
                reject_routes(&[
                    (blocked, 32),
                    (blocked, 32),
                    (Ipv4Addr::new(10, 9, 8, 7), 16),
                ])
                .unwrap();
                let table = std::fs::read_to_string("/proc/thread-self/net/route").unwrap();
                let connect = std::net::TcpStream::connect_timeout(
                    &(blocked, 9).into(),
                    Duration::from_secs(2),
                );
                (table, connect)
            })
            .unwrap();
        // 192.0.2.77 is 4D0200C0 in the table; RTF_UP|RTF_HOST|RTF_REJECT = 0x0205.
        let has = |dst: &str, flags: &str, mask: &str| {
            table.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 7 && f[1] == dst && f[3] == flags && f[7] == mask
            })
        };
        assert!(has("4D0200C0", "0205", "FFFFFFFF"), "{table}");
        assert!(has("0000090A", "0201", "0000FFFF"), "10.9.0.0/16: {table}");
        let err = connect.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EHOSTUNREACH), "{err}");
        // The host's own table is untouched.
        let host = std::fs::read_to_string("/proc/net/route").unwrap();
        assert!(!host.contains("4D0200C0"), "{host}");
        let path = ns.path.clone();
        drop(ns);
        assert!(!path.exists(), "the namespace file outlived its owner");
    }

    /// Real pasta on a real namespace, no VM: what `start` promises is in place, and
    /// dropping it removes everything.
    #[test]
    fn start_connects_the_namespace_and_blocks_the_hosts_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let net = Attached::start(&user_mode(&[port]), dir.path(), NetBackend::UserMode).unwrap();
        let (route, tcp, ns_inode) = net
            .ns
            .enter(|| {
                let read = |f: &str| std::fs::read_to_string(format!("/proc/thread-self/net/{f}"));
                let inode = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
                (read("route").unwrap(), read("tcp").unwrap(), inode)
            })
            .unwrap();
        assert!(has_default_route(&route), "{route}");
        assert!(listens_on(&tcp, port), "pasta forwards {port}: {tcp}");
        for (addr, len) in host_local_ipv4().unwrap() {
            let dst = format!("{:08X}", u32::from(addr).to_be());
            let line = route
                .lines()
                .find(|l| l.split_whitespace().nth(1) == Some(dst.as_str()))
                .unwrap_or_else(|| panic!("no route for {addr}/{len}: {route}"));
            let flags = u16::from_str_radix(line.split_whitespace().nth(3).unwrap(), 16).unwrap();
            assert_ne!(flags & libc::RTF_REJECT, 0, "{line}");
        }
        let host_inode = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        assert_ne!(ns_inode, host_inode, "the VM's namespace is the host's");

        let pasta = net.pasta.pid();
        let netns = net.ns.path.clone();
        assert!(std::fs::read_to_string(format!("/proc/{pasta}/cmdline"))
            .unwrap()
            .contains("--no-map-gw"));
        net.finish(&dir.path().join("notes"));
        assert!(!netns.exists(), "the namespace file outlived the network");
        let stat = std::fs::read_to_string(format!("/proc/{pasta}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty(),
            "pasta {pasta} outlived the network: {stat}"
        );
        assert!(
            !dir.path().join("notes").exists(),
            "pasta did not die early"
        );
    }

    #[test]
    fn a_pasta_that_fails_is_an_early_exit_with_its_words_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("pasta");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'Failed to send 58 bytes to syslog' >&2\n\
             echo \"Couldn't open network namespace $(eval echo \\${$#})\" >&2\nexit 1\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let rt = dir.path().join("rt");
        let err = match Attached::start_with(&fake, &user_mode(&[]), &rt) {
            Err(e) => e,
            Ok(_) => panic!("a pasta that exits 1 gave a network"),
        };
        let VmmError::EarlyExit { status, detail, .. } = &err else {
            panic!("{err}");
        };
        assert!(status.contains('1'), "{status}");
        assert_eq!(
            detail,
            &format!(
                "Couldn't open network namespace {}",
                rt.join("net/netns").display()
            )
        );
        assert!(
            !rt.join("net/netns").exists(),
            "the namespace outlived the failure"
        );
    }

    #[test]
    fn only_drivers_with_networking_accept_a_network() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let mut spec = crate::VmSpec::new("t", &f, &f, dir.path().join("rt"));
        spec.network = Some(user_mode(&[8080]));
        spec.validate_with_network().unwrap();
        let err = spec.validate().unwrap_err();
        assert!(matches!(err, VmmError::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("gives VMs no network"), "{err}");
        spec.network = Some(user_mode(&[8080, 8080]));
        let err = spec.validate_with_network().unwrap_err();
        assert!(err.to_string().contains("named twice"), "{err}");
    }

    #[test]
    fn local_destinations_come_from_fib_trie() {
        let trie = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n\
                    +-- 127.0.0.0/8 2 0 2\n           |-- 127.0.0.0\n              /8 host LOCAL\n\
                    |-- 127.0.0.1\n              /32 host LOCAL\n\
                    |-- 192.0.2.0\n              /24 link UNICAST\n\
                    |-- 192.0.2.2\n              /32 host LOCAL\n\
                    |-- 192.0.2.255\n           /32 link BROADCAST\n\
                    |-- 10.9.0.0\n              /16 host LOCAL\n\
                    Local:\n           |-- 192.0.2.2\n              /32 host LOCAL\n";
        assert_eq!(
            local_entries(trie),
            [
                (Ipv4Addr::new(192, 0, 2, 2), 32),
                (Ipv4Addr::new(10, 9, 0, 0), 16)
            ]
        );
        // This host's real table parses, and loopback never shows.
        let real = host_local_ipv4().unwrap();
        assert!(real.iter().all(|(a, _)| !a.is_loopback()), "{real:?}");
    }
}
