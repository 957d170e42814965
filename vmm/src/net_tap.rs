//! The TAP backend of the guest's network (cloud-hypervisor's, and QEMU's when asked
//! for): inside the VM's namespace (`net`), which pasta joins to the host as for slirp,
//! a TAP device [`TAP_NAME`] carries the gateway and DNS addresses, the namespace
//! routes, and nftables rules in it give the guest what slirp gives:
//!
//! - egress: the guest's subnet is masqueraded out through pasta's interface;
//! - DNS: `dns:53` (UDP and TCP) is DNATed to the host's resolver;
//! - host ports: `gateway:PORT` is DNATed to the namespace's `127.0.0.1:PORT`, where
//!   pasta's `--tcp-ns PORT` listens (`route_localnet` on the TAP allows that), and
//!   SNATed to come from `127.0.0.1`: pasta forwards only connections from loopback
//!   (from another source it accepts and then never passes data: measured);
//! - nothing else from the TAP reaches the namespace's own addresses (refused, as
//!   slirp refuses: a TCP reset, else ICMP), and nothing new enters the guest.
//!
//! Everything lives in the namespace, so it goes when the namespace goes.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use wait_timeout::ChildExt;

use crate::net::{enter_in_child, Namespace, Network};
use crate::VmmError;

/// The TAP device in the VM's namespace; the hypervisor opens it by this name.
pub const TAP_NAME: &str = "udos0";
/// The guest NIC's MAC address (QEMU's default; each VM is alone on its link).
pub const GUEST_MAC: &str = "52:54:00:12:34:56";
/// The most one `ip` or `nft` run may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// The nftables table udos loads into the namespace.
const TABLE: &str = "udos";

/// Creates the TAP, its addresses, forwarding and the rules in `ns`.
pub(crate) fn setup(ns: &Namespace, net: &Network) -> Result<(), VmmError> {
    let ip = find_tool("ip", "iproute2")?;
    let nft = find_tool("nft", "nftables")?;
    let fd = ns.raw_fd();
    let gw = format!("{}/{}", net.gateway, net.prefix_len);
    let dns = format!("{}/32", net.dns);
    for args in [
        &["tuntap", "add", "dev", TAP_NAME, "mode", "tap"][..],
        &["addr", "add", &gw, "dev", TAP_NAME],
        // The guest must find the DNS address on its link: the TAP answers ARP for it.
        &["addr", "add", &dns, "dev", TAP_NAME],
        &["link", "set", TAP_NAME, "up"],
    ] {
        run_in(fd, &ip, args, None)?;
    }
    ns.enter(sysctls)?
        .map_err(|e| tap_error(format!("setting the namespace's sysctls: {e}")))?;
    run_in(fd, &nft, &["-f", "-"], Some(&ruleset(net, host_resolver())))
}

/// In the namespace: route, accept `127.0.0.1` as a destination from the TAP (the
/// DNAT to pasta's listeners), no IPv6 on the TAP.
fn sysctls() -> std::io::Result<()> {
    let set = |key: &str, value: &str| std::fs::write(format!("/proc/sys/net/{key}"), value);
    set("ipv4/ip_forward", "1")?;
    set(&format!("ipv4/conf/{TAP_NAME}/route_localnet"), "1")?;
    match set(&format!("ipv6/conf/{TAP_NAME}/disable_ipv6"), "1") {
        // A kernel without IPv6 has no such key, and no IPv6 to disable.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The nftables ruleset for `net`; `resolver` is where DNS goes (none: no DNS).
pub(crate) fn ruleset(net: &Network, resolver: Option<Ipv4Addr>) -> String {
    let (tap, gw, dns) = (TAP_NAME, net.gateway, net.dns);
    let subnet = format!("{}/{}", net.subnet(), net.prefix_len);
    let mut pre = String::new();
    if let Some(r) = resolver {
        for proto in ["udp", "tcp"] {
            pre.push_str(&format!(
                "    iifname \"{tap}\" ip daddr {dns} {proto} dport 53 dnat ip to {r}:53\n"
            ));
        }
    }
    if !net.host_ports.is_empty() {
        let ports: Vec<String> = net.host_ports.iter().map(u16::to_string).collect();
        pre.push_str(&format!(
            "    iifname \"{tap}\" ip daddr {gw} tcp dport {{ {} }} dnat ip to 127.0.0.1\n",
            ports.join(", ")
        ));
    }
    format!(
        "table inet {TABLE} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
{pre}  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {subnet} oifname != \"{tap}\" masquerade
  }}
  chain input_nat {{
    type nat hook input priority 100; policy accept;
    iifname \"{tap}\" ip daddr 127.0.0.1 snat ip to 127.0.0.1
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname \"{tap}\" ct status dnat accept
    iifname \"{tap}\" meta l4proto tcp reject with tcp reset
    iifname \"{tap}\" reject
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    iifname \"{tap}\" ip saddr {subnet} accept
    oifname \"{tap}\" ct state established,related accept
  }}
}}
"
    )
}

/// The first IPv4 nameserver of the host's `/etc/resolv.conf` that the namespace can
/// reach (not loopback), as slirp would forward to.
fn host_resolver() -> Option<Ipv4Addr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    first_resolver(&text)
}

fn first_resolver(resolv_conf: &str) -> Option<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|v| v.trim().parse::<Ipv4Addr>().ok())
        .find(|a| !a.is_loopback())
}

fn tap_error(detail: String) -> VmmError {
    VmmError::Network {
        detail: format!("TAP network: {detail}"),
    }
}

/// `name` in PATH or the usual sbin directories (a non-login root shell may lack them).
fn find_tool(name: &'static str, package: &str) -> Result<PathBuf, VmmError> {
    crate::find_in_path(name)
        .or_else(|| {
            ["/usr/sbin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| VmmError::NotInstalled {
            what: name,
            hint: format!("a TAP network needs it (Debian: apt-get install {package})"),
        })
}

/// Runs `program args` inside the namespace `ns` with `input` on its stdin, for at
/// most [`COMMAND_TIMEOUT`]; a non-zero exit is an error with its stderr.
fn run_in(ns: RawFd, program: &Path, args: &[&str], input: Option<&str>) -> Result<(), VmmError> {
    let shown = format!("{} {}", program.display(), args.join(" "));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setns(2) only, async-signal-safe, on a descriptor the caller keeps open.
    unsafe {
        cmd.pre_exec(move || enter_in_child(ns));
    }
    let mut child = cmd.spawn().map_err(|e| VmmError::Spawn {
        binary: program.to_path_buf(),
        args: args.join(" "),
        source: e,
    })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A ruleset is far below a pipe's buffer; an error shows in the exit status.
        let _ = stdin.write_all(text.as_bytes());
    }
    let status = child
        .wait_timeout(COMMAND_TIMEOUT)
        .map_err(|e| VmmError::io("waiting for", program, e))?;
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(tap_error(format!(
            "`{shown}` did not finish within {COMMAND_TIMEOUT:?}"
        )));
    };
    if status.success() {
        return Ok(());
    }
    let mut err = String::new();
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    Err(tap_error(format!(
        "`{shown}` failed ({status}): {}",
        err.trim()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(ports: &[u16]) -> Network {
        Network {
            host_ports: ports.to_vec(),
            address: Ipv4Addr::new(10, 0, 2, 15),
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            dns: Ipv4Addr::new(10, 0, 2, 3),
        }
    }

    #[test]
    fn the_ruleset_forwards_dns_and_exactly_the_named_ports() {
        let r = ruleset(&net(&[5432, 80]), Some(Ipv4Addr::new(192, 0, 2, 53)));
        assert!(
            r.contains("ip daddr 10.0.2.3 udp dport 53 dnat ip to 192.0.2.53:53"),
            "{r}"
        );
        assert!(
            r.contains("ip daddr 10.0.2.3 tcp dport 53 dnat ip to 192.0.2.53:53"),
            "{r}"
        );
        assert!(
            r.contains("ip daddr 10.0.2.2 tcp dport { 5432, 80 } dnat ip to 127.0.0.1"),
            "{r}"
        );
        assert!(
            r.contains("iifname \"udos0\" ip daddr 127.0.0.1 snat ip to 127.0.0.1"),
            "{r}"
        );
        assert!(
            r.contains("ip saddr 10.0.2.0/24 oifname != \"udos0\" masquerade"),
            "{r}"
        );
        assert!(r.contains("iifname \"udos0\" reject"), "{r}");
        let bare = ruleset(&net(&[]), None);
        assert!(!bare.contains("dnat ip to"), "{bare}");
    }

    #[test]
    fn the_resolver_is_the_first_one_off_loopback() {
        let conf = "# x\nnameserver 127.0.0.53\nnameserver ::1\nnameserver 10.255.255.53\nnameserver 9.9.9.9\n";
        assert_eq!(first_resolver(conf), Some(Ipv4Addr::new(10, 255, 255, 53)));
        assert_eq!(first_resolver("nameserver 127.0.0.1\n"), None);
    }

    /// Real: a namespace of its own (root), the TAP and rules set up in it by `ip` and
    /// `nft`, seen from inside; the host has no such device; all gone with the
    /// namespace.
    #[test]
    fn setup_builds_the_tap_and_rules_in_the_namespace_only() {
        let dir = tempfile::tempdir().unwrap();
        let ns = Namespace::create(&dir.path().join("netns")).unwrap();
        setup(&ns, &net(&[8080])).unwrap();
        let (links, addrs, forward) = ns
            .enter(|| {
                let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
                (
                    read("/proc/thread-self/net/dev"),
                    read("/proc/thread-self/net/fib_trie"),
                    read("/proc/sys/net/ipv4/ip_forward"),
                )
            })
            .unwrap();
        assert!(links.contains(&format!("{TAP_NAME}:")), "{links}");
        assert!(
            addrs.contains("10.0.2.2") && addrs.contains("10.0.2.3"),
            "{addrs}"
        );
        assert_eq!(forward.trim(), "1");
        let nft = find_tool("nft", "nftables").unwrap();
        let out = Command::new("nsenter")
            .arg(format!("--net={}", dir.path().join("netns").display()))
            .arg(&nft)
            .args(["list", "table", "inet", TABLE])
            .output()
            .unwrap();
        let listed = String::from_utf8_lossy(&out.stdout);
        assert!(
            listed.contains("tcp dport 8080 dnat ip to 127.0.0.1"),
            "{listed}"
        );
        assert!(
            !Path::new("/sys/class/net").join(TAP_NAME).exists(),
            "the TAP is in the host"
        );
        drop(ns);
        assert!(!Path::new("/sys/class/net").join(TAP_NAME).exists());
    }

    #[test]
    fn a_failing_command_is_an_error_with_its_words() {
        let dir = tempfile::tempdir().unwrap();
        let ns = Namespace::create(&dir.path().join("netns")).unwrap();
        let ip = find_tool("ip", "iproute2").unwrap();
        let err = run_in(ns.raw_fd(), &ip, &["link", "set", "nosuchdev", "up"], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nosuchdev") && err.contains("failed"), "{err}");
    }
}
