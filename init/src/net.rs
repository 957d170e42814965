//! The guest's network (`udos.net=ADDRESS/PREFIX,GATEWAY,DNS`): `lo` and the NIC up
//! with the host's static addresses and a default route, by ioctl (no `ip` in the
//! initramfs); and the files the step needs to use it (`/etc/resolv.conf`, and
//! `/etc/hosts` when the root has none), in a small read-only layer PID 1 stacks on top
//! of the step's lowers, so they are never part of the step's own layer.

use std::ffi::CString;
use std::fs;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use udos_layer::boot::NetConfig;

use crate::error::Error;
use crate::mounts::{mkdir_p, Mounts};

/// Where the network's files for the step root are assembled (a tmpfs, read-only once
/// written); the step sees it there too.
pub const NET_LAYER: &str = "/run/udos/net";
/// `ARPHRD_ETHER` in `/sys/class/net/*/type`.
const ARPHRD_ETHER: &str = "1";
const POLL: Duration = Duration::from_millis(10);
/// What the step's root gets when it has no `/etc/hosts`: names for loopback.
const HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";

/// Brings up `lo` and the NIC (waiting up to `timeout` for it to appear) with `cfg`'s
/// address and a default route. Returns the NIC's name.
pub fn configure(cfg: &NetConfig, timeout: Duration) -> Result<String, Error> {
    let iface = wait_for_interface(Path::new("/sys/class/net"), timeout)?;
    let sock = Sock::new()?;
    sock.up("lo")?;
    sock.set_address(&iface, cfg.address, cfg.netmask())?;
    sock.up(&iface)?;
    sock.add_default_route(&iface, cfg.gateway)?;
    Ok(iface)
}

/// `resolv.conf` naming the one DNS server.
pub fn resolv_conf(cfg: &NetConfig) -> String {
    format!("nameserver {}\n", cfg.dns)
}

fn wait_for_interface(sys_class_net: &Path, timeout: Duration) -> Result<String, Error> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(name) = pick_interface(sys_class_net) {
            return Ok(name);
        }
        if Instant::now() >= deadline {
            return Err(Error::NoNetworkInterface { waited: timeout });
        }
        sleep(POLL);
    }
}

/// The Ethernet interface with the lowest index (the VM has one NIC).
pub fn pick_interface(sys_class_net: &Path) -> Option<String> {
    let read = |p: PathBuf| fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    fs::read_dir(sys_class_net)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let dir = sys_class_net.join(&name);
            (read(dir.join("type"))? == ARPHRD_ETHER).then_some(())?;
            let index: u32 = read(dir.join("ifindex"))?.parse().ok()?;
            Some((index, name))
        })
        .min()
        .map(|(_, name)| name)
}

/// An `AF_INET` datagram socket for the interface and route ioctls.
pub struct Sock(OwnedFd);

impl Sock {
    pub fn new() -> Result<Sock, Error> {
        // SAFETY: plain socket(2); the result is checked, then owned.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(Error::Syscall {
                call: "socket(AF_INET)",
                error: Errno::last(),
            });
        }
        // SAFETY: `fd` is fresh and owned by nothing else.
        Ok(Sock(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ioctl<T>(&self, request: libc::c_ulong, arg: &mut T) -> Result<(), Errno> {
        // SAFETY: every caller passes the struct its request reads or writes.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), request, arg as *mut T) };
        Errno::result(rc).map(drop)
    }

    /// `ip link set NAME up`.
    pub fn up(&self, name: &str) -> Result<(), Error> {
        let mut req = ifreq(name)?;
        let fail = |call, error| net_error(call, name, error);
        self.ioctl(libc::SIOCGIFFLAGS, &mut req)
            .map_err(|e| fail("SIOCGIFFLAGS", e))?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        self.ioctl(libc::SIOCSIFFLAGS, &mut req)
            .map_err(|e| fail("SIOCSIFFLAGS", e))
    }

    /// `ip addr add ADDRESS/MASK dev NAME`.
    pub fn set_address(&self, name: &str, address: Ipv4Addr, mask: Ipv4Addr) -> Result<(), Error> {
        for (request, call, value) in [
            (libc::SIOCSIFADDR, "SIOCSIFADDR", address),
            (libc::SIOCSIFNETMASK, "SIOCSIFNETMASK", mask),
        ] {
            let mut req = ifreq(name)?;
            req.ifr_ifru.ifru_addr = sockaddr_v4(value);
            self.ioctl(request, &mut req)
                .map_err(|e| net_error(call, name, e))?;
        }
        Ok(())
    }

    /// `ip route add default via GATEWAY dev NAME`.
    pub fn add_default_route(&self, name: &str, gateway: Ipv4Addr) -> Result<(), Error> {
        let dev = CString::new(name).map_err(|_| net_error("SIOCADDRT", name, Errno::EINVAL))?;
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr_v4(gateway),
            rt_genmask: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
            rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            // The kernel only reads the name; `dev` outlives the call.
            rt_dev: dev.as_ptr().cast_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        self.ioctl(libc::SIOCADDRT, &mut rt)
            .map_err(|e| net_error("SIOCADDRT default route", name, e))
    }
}

fn net_error(call: &'static str, iface: &str, error: Errno) -> Error {
    Error::NetIoctl {
        call,
        iface: iface.to_string(),
        error,
    }
}

fn ifreq(name: &str) -> Result<libc::ifreq, Error> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(net_error("ifreq", name, Errno::EINVAL));
    }
    // SAFETY: ifreq is plain old data; all zeroes is a valid (empty) request.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
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

/// The kernel's `struct rtentry` (`<linux/route.h>`; glibc's libc crate lacks it).
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

/// Builds the network's layer at `dir` for the root mounted at `merged`: `etc/resolv.conf`,
/// `etc/hosts` if `merged` has none, and the root and `etc` directories with the
/// owner, mode and times `merged` gives them (the topmost lower decides a merged
/// directory's attributes, so ours must not change them).
pub fn build_layer(cfg: &NetConfig, merged: &Path, dir: &Path) -> Result<(), Error> {
    let etc = dir.join("etc");
    let merged_etc = merged.join("etc");
    let etc_meta = match fs::symlink_metadata(&merged_etc) {
        Ok(m) if m.is_dir() => Some(m),
        Ok(_) => return Err(Error::EtcNotADirectory),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io("stat", merged_etc, e)),
    };
    mkdir_p(&etc, 0o755)?;
    write_file(&etc.join("resolv.conf"), &resolv_conf(cfg))?;
    if fs::symlink_metadata(merged_etc.join("hosts")).is_err() {
        write_file(&etc.join("hosts"), HOSTS)?;
    }
    // Last: writing into a directory changes its times.
    if let Some(meta) = etc_meta {
        copy_attributes(&meta, &etc)?;
    }
    let root_meta = fs::metadata(merged).map_err(|e| Error::io("stat", merged, e))?;
    copy_attributes(&root_meta, dir)
}

/// Mounts a small tmpfs at [`NET_LAYER`], builds the layer in it and makes it read-only.
pub fn mount_layer(cfg: &NetConfig, merged: &Path, mounts: &mut Mounts) -> Result<PathBuf, Error> {
    let dir = PathBuf::from(NET_LAYER);
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mounts.mount("tmpfs", &dir, "tmpfs", flags, Some("mode=0755,size=64k"))?;
    build_layer(cfg, merged, &dir)?;
    mount(
        None::<&str>,
        &dir,
        None::<&str>,
        flags | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|error| Error::Mount {
        src: "tmpfs".into(),
        target: dir.clone(),
        fstype: "remount,ro".into(),
        error,
    })?;
    Ok(dir)
}

fn write_file(path: &Path, text: &str) -> Result<(), Error> {
    fs::write(path, text).map_err(|e| Error::io("write", path, e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
        .map_err(|e| Error::io("chmod", path, e))
}

/// Owner, mode and access/modification times of `meta` onto the directory `to`.
fn copy_attributes(meta: &fs::Metadata, to: &Path) -> Result<(), Error> {
    std::os::unix::fs::chown(to, Some(meta.uid()), Some(meta.gid()))
        .map_err(|e| Error::io("chown", to, e))?;
    fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(|e| Error::io("chmod", to, e))?;
    let atime = TimeSpec::new(meta.atime(), meta.atime_nsec());
    let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    utimensat(None, to, &atime, &mtime, UtimensatFlags::NoFollowSymlink).map_err(|error| {
        Error::Syscall {
            call: "utimensat",
            error,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_iface(sys: &Path, name: &str, kind: &str, index: u32) {
        let d = sys.join(name);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("type"), format!("{kind}\n")).unwrap();
        fs::write(d.join("ifindex"), format!("{index}\n")).unwrap();
    }

    #[test]
    fn the_nic_is_the_first_ethernet_interface() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path();
        assert_eq!(pick_interface(sys), None);
        fake_iface(sys, "lo", "772", 1);
        assert_eq!(pick_interface(sys), None, "loopback is not a NIC");
        fake_iface(sys, "eth1", "1", 3);
        fake_iface(sys, "eth0", "1", 2);
        assert_eq!(pick_interface(sys).as_deref(), Some("eth0"));
        let err = wait_for_interface(&sys.join("missing"), Duration::from_millis(30)).unwrap_err();
        assert!(err.to_string().contains("no network interface"), "{err}");
    }

    #[test]
    fn the_layer_has_resolv_conf_and_keeps_the_roots_attributes() {
        let dir = tempfile::tempdir().unwrap();
        let merged = dir.path().join("merged");
        fs::create_dir_all(merged.join("etc")).unwrap();
        fs::set_permissions(merged.join("etc"), fs::Permissions::from_mode(0o750)).unwrap();
        std::os::unix::fs::chown(merged.join("etc"), Some(12), Some(34)).unwrap();
        let old = TimeSpec::new(1_000_000, 5);
        utimensat(
            None,
            &merged.join("etc"),
            &old,
            &old,
            UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        fs::set_permissions(&merged, fs::Permissions::from_mode(0o711)).unwrap();
        let layer = dir.path().join("layer");
        fs::create_dir(&layer).unwrap();
        build_layer(&NetConfig::USER_MODE, &merged, &layer).unwrap();

        assert_eq!(
            fs::read_to_string(layer.join("etc/resolv.conf")).unwrap(),
            "nameserver 10.0.2.3\n"
        );
        assert_eq!(fs::read_to_string(layer.join("etc/hosts")).unwrap(), HOSTS);
        let etc = fs::metadata(layer.join("etc")).unwrap();
        assert_eq!((etc.mode() & 0o7777, etc.uid(), etc.gid()), (0o750, 12, 34));
        assert_eq!((etc.mtime(), etc.mtime_nsec()), (1_000_000, 5));
        assert_eq!(fs::metadata(&layer).unwrap().mode() & 0o7777, 0o711);
    }

    #[test]
    fn a_root_with_hosts_keeps_it_and_one_without_etc_gets_one() {
        let dir = tempfile::tempdir().unwrap();
        let merged = dir.path().join("merged");
        fs::create_dir_all(merged.join("etc")).unwrap();
        fs::write(merged.join("etc/hosts"), "10.1.1.1 mine\n").unwrap();
        let layer = dir.path().join("layer");
        fs::create_dir(&layer).unwrap();
        build_layer(&NetConfig::USER_MODE, &merged, &layer).unwrap();
        assert!(
            !layer.join("etc/hosts").exists(),
            "the root's own hosts stays visible"
        );

        let bare = dir.path().join("bare");
        fs::create_dir(&bare).unwrap();
        let layer2 = dir.path().join("layer2");
        fs::create_dir(&layer2).unwrap();
        build_layer(&NetConfig::USER_MODE, &bare, &layer2).unwrap();
        assert!(layer2.join("etc/resolv.conf").is_file());

        let odd = dir.path().join("odd");
        fs::create_dir(&odd).unwrap();
        fs::write(odd.join("etc"), "not a directory").unwrap();
        let err = build_layer(&NetConfig::USER_MODE, &odd, &layer2).unwrap_err();
        assert!(matches!(err, Error::EtcNotADirectory), "{err}");
    }

    /// Real ioctls, in a network namespace of this test's own (root): `lo` gets the
    /// address and the default route, as a NIC would.
    #[test]
    fn ioctls_configure_an_interface_in_a_private_namespace() {
        let got = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let sock = Sock::new().unwrap();
            sock.up("lo").unwrap();
            let cfg = NetConfig::USER_MODE;
            sock.set_address("lo", cfg.address, cfg.netmask()).unwrap();
            sock.add_default_route("lo", cfg.gateway).unwrap();
            let missing = sock.up("nonesuch0").unwrap_err().to_string();
            let route = fs::read_to_string("/proc/thread-self/net/route").unwrap();
            let trie = fs::read_to_string("/proc/thread-self/net/fib_trie").unwrap();
            (route, trie, missing)
        })
        .join()
        .unwrap();
        let (route, trie, missing) = got;
        // Default route: destination 0, gateway 10.0.2.2 (0202000A), flags UP|GATEWAY.
        assert!(
            route.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 7
                    && f[0] == "lo"
                    && f[1] == "00000000"
                    && f[2] == "0202000A"
                    && f[3] == "0003"
            }),
            "{route}"
        );
        // The address, and the /24 mask: the broadcast route is 10.0.2.255, where the
        // address alone (a class A default) would give 10.255.255.255.
        assert!(trie.contains("|-- 10.0.2.15\n"), "{trie}");
        assert!(trie.contains("|-- 10.0.2.255\n"), "{trie}");
        assert!(!trie.contains("|-- 10.255.255.255\n"), "{trie}");
        assert!(missing.contains("SIOCGIFFLAGS on nonesuch0"), "{missing}");
    }
}
