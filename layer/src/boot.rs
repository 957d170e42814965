//! The kernel command line: the host's only way to tell PID 1 what to do
//! (docs/pid1.md). One typed [`BootConfig`], rendered by the host and parsed by PID 1.
//!
//! Only the `udos.*` keys are ours; the host puts them after its own kernel parameters
//! (`console=ttyS0 quiet panic=-1 ...`). Parsing ignores every other key, and a bad
//! `udos.*` value does not lose the keys that did parse ([`BootConfig::parse_lenient`]):
//! PID 1 still needs the output device to seal the error record.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// virtio serial of the writable upper disk.
pub const SERIAL_UPPER: &str = "udos-upper";
/// virtio serial of the output device (docs/layer-format.md).
pub const SERIAL_OUTPUT: &str = "udos-out";
/// virtio serial of the read-only secrets device (docs/layer-format.md).
pub const SERIAL_SECRETS: &str = "udos-secrets";
/// The longest serial a virtio-blk device carries (`VIRTIO_BLK_ID_BYTES`): hypervisors
/// cut longer ones, and PID 1 would then never find the disk.
pub const MAX_SERIAL_LEN: usize = 20;

/// Where act lives in the step root (`/udos/bin` bind-mounted at `/run/udos/bin`).
pub const DEFAULT_ACT: &str = "/run/udos/bin/act";
/// How long PID 1 waits for a virtio-blk serial to show up.
pub const DEFAULT_DEVICE_TIMEOUT: Duration = Duration::from_secs(5);
/// Grace between SIGTERM and SIGKILL.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3);

/// virtio serial of lower layer `i` (0 is the bottom, the base layer).
pub fn lower_serial(i: usize) -> String {
    format!("udos-l{i}")
}

/// What PID 1 was booted for (`udos.mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Run the step described by `/.actrc` (default).
    #[default]
    Step,
    /// Print `UDOS-PROBE-OK` and power off.
    Probe,
    /// Skip act; run a shell or the agent.
    Manager,
    /// A service VM: assemble the root, report `service up`, idle (reaping children)
    /// until SIGTERM, SIGINT or the power button, then shut down in order.
    Service,
    /// A whole job in one VM: assemble the root, then run the steps the host sends
    /// over the channel ([`BootConfig::channel`], `job::JobMessage`) one at a time,
    /// and seal once at the end.
    Job,
}

impl Mode {
    /// The word on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Step => "step",
            Mode::Probe => "probe",
            Mode::Manager => "manager",
            Mode::Service => "service",
            Mode::Job => "job",
        }
    }
}

impl FromStr for Mode {
    type Err = ();

    fn from_str(word: &str) -> Result<Self, ()> {
        match word {
            "step" => Ok(Mode::Step),
            "probe" => Ok(Mode::Probe),
            "manager" => Ok(Mode::Manager),
            "service" => Ok(Mode::Service),
            "job" => Ok(Mode::Job),
            _ => Err(()),
        }
    }
}

/// A block device named by its virtio serial, or (harness, debugging) by a path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DeviceRef {
    /// `/sys/block/vd*/serial` carries this.
    Serial(String),
    /// A value starting with `/`: a device node or, in harness mode, a file or directory.
    Path(PathBuf),
}

impl DeviceRef {
    /// A serial device reference.
    pub fn serial(serial: impl Into<String>) -> Self {
        DeviceRef::Serial(serial.into())
    }

    fn parse(value: &str) -> Self {
        if value.starts_with('/') {
            DeviceRef::Path(PathBuf::from(value))
        } else {
            DeviceRef::Serial(value.to_string())
        }
    }
}

impl fmt::Display for DeviceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRef::Serial(s) => f.write_str(s),
            DeviceRef::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// `udos.net=ADDRESS/PREFIX,GATEWAY,DNS`: the guest's static IPv4 configuration. The
/// host's hypervisor driver puts the VM on a network with exactly these addresses
/// (`udos_vmm::Network`), and PID 1 configures the NIC with them; absent means no
/// network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetConfig {
    /// The guest's own address.
    pub address: Ipv4Addr,
    /// The prefix length of the guest's subnet (`/24`).
    pub prefix_len: u8,
    /// The default gateway; the host's named ports are reached at this address.
    pub gateway: Ipv4Addr,
    /// The one DNS server in the guest's `/etc/resolv.conf`.
    pub dns: Ipv4Addr,
}

impl NetConfig {
    /// What QEMU's user-mode network (slirp) uses: the guest at 10.0.2.15/24, the
    /// gateway (the host) at 10.0.2.2, its DNS forwarder at 10.0.2.3.
    pub const USER_MODE: NetConfig = NetConfig {
        address: Ipv4Addr::new(10, 0, 2, 15),
        prefix_len: 24,
        gateway: Ipv4Addr::new(10, 0, 2, 2),
        dns: Ipv4Addr::new(10, 0, 2, 3),
    };

    /// The subnet mask, e.g. 255.255.255.0 for `/24`.
    pub fn netmask(&self) -> Ipv4Addr {
        prefix_mask(self.prefix_len)
    }

    /// Whether the values can configure a NIC: a prefix of 1 to 30 bits, the gateway
    /// on the guest's subnet (the default route goes through it), and the address,
    /// gateway and DNS server distinct and none of them the subnet's network or
    /// broadcast address.
    pub fn check(&self) -> Result<(), &'static str> {
        if !(1..=30).contains(&self.prefix_len) {
            return Err("the prefix length must be 1 to 30");
        }
        let mask = u32::from(self.netmask());
        let net = u32::from(self.address) & mask;
        if u32::from(self.gateway) & mask != net {
            return Err("the gateway must be on the guest's subnet");
        }
        let special = [net, net | !mask];
        let addrs = [self.address, self.gateway, self.dns].map(u32::from);
        if addrs.iter().any(|a| special.contains(a)) {
            return Err("an address is the subnet's network or broadcast address");
        }
        if addrs[0] == addrs[1] || addrs[0] == addrs[2] || addrs[1] == addrs[2] {
            return Err("the address, gateway and DNS server must differ");
        }
        Ok(())
    }
}

fn prefix_mask(prefix_len: u8) -> Ipv4Addr {
    let bits = u32::from(prefix_len.min(32));
    Ipv4Addr::from(u32::MAX.checked_shl(32 - bits).unwrap_or(0))
}

impl fmt::Display for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{},{},{}",
            self.address, self.prefix_len, self.gateway, self.dns
        )
    }
}

impl FromStr for NetConfig {
    type Err = &'static str;

    /// `ADDRESS/PREFIX,GATEWAY,DNS`, checked with [`NetConfig::check`].
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        const SHAPE: &str = "expected ADDRESS/PREFIX,GATEWAY,DNS (IPv4)";
        let parts: Vec<&str> = value.split(',').collect();
        let [cidr, gateway, dns] = parts[..] else {
            return Err(SHAPE);
        };
        let (address, prefix) = cidr.split_once('/').ok_or(SHAPE)?;
        // u8's parser takes a leading '+'; the command line's form has digits only.
        let digits = !prefix.is_empty() && prefix.bytes().all(|b| b.is_ascii_digit());
        let config = NetConfig {
            address: address.parse().map_err(|_| SHAPE)?,
            prefix_len: prefix.parse().ok().filter(|_| digits).ok_or(SHAPE)?,
            gateway: gateway.parse().map_err(|_| SHAPE)?,
            dns: dns.parse().map_err(|_| SHAPE)?,
        };
        config.check()?;
        Ok(config)
    }
}

/// The `udos.*` keys of the kernel command line (docs/pid1.md has the table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// `udos.mode`.
    pub mode: Mode,
    /// `udos.lowers`: read-only input layers, bottom first (base, workspace, earlier
    /// steps' layers, and last the step's control layer).
    pub lowers: Vec<DeviceRef>,
    /// `udos.upper`: the writable upper disk (ext4), or in harness mode a directory.
    pub upper: Option<DeviceRef>,
    /// `udos.output`: the raw output device.
    pub output: Option<DeviceRef>,
    /// `udos.secrets`: the read-only secrets device (`secrets::StepSecrets`).
    pub secrets: Option<DeviceRef>,
    /// `udos.timeout`: act gets SIGTERM after this long.
    pub timeout: Option<Duration>,
    /// `udos.grace`: between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// `udos.shell=1`: manager mode starts `/bin/sh` on the console.
    pub shell: bool,
    /// `udos.act`: act's path inside the step root (tests use a stand-in).
    pub act: PathBuf,
    /// `udos.devtimeout`: how long to wait for each device serial.
    pub device_timeout: Duration,
    /// `udos.root`: harness mode (tests only): the step root as-is.
    pub root: Option<PathBuf>,
    /// `udos.net`: configure the NIC with these addresses; `None`: no network.
    pub net: Option<NetConfig>,
    /// `udos.channel`: the name of the virtio-console port job mode talks to the host
    /// on (`/sys/class/virtio-ports/*/name`); same rules as a serial.
    pub channel: Option<String>,
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            mode: Mode::Step,
            lowers: Vec::new(),
            upper: None,
            output: None,
            secrets: None,
            timeout: None,
            grace: DEFAULT_GRACE,
            shell: false,
            act: PathBuf::from(DEFAULT_ACT),
            device_timeout: DEFAULT_DEVICE_TIMEOUT,
            root: None,
            net: None,
            channel: None,
        }
    }
}

/// A `udos.*` value PID 1 cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kernel command line: {key}={value}: {reason}")]
pub struct CmdlineError {
    /// The key, e.g. `udos.timeout`.
    pub key: String,
    /// The value as written.
    pub value: String,
    /// What was expected.
    pub reason: &'static str,
}

/// A [`BootConfig`] value the kernel command line cannot carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot put {key}={value:?} on the kernel command line: {reason}")]
pub struct RenderError {
    /// The key, e.g. `udos.lowers`.
    pub key: &'static str,
    /// The offending value.
    pub value: String,
    /// Why it cannot be rendered.
    pub reason: &'static str,
}

impl BootConfig {
    /// The `udos.*` part of the command line: `udos.mode` always, every other key only
    /// when it differs from its default. Values with spaces are quoted. Fails on values
    /// that would not parse back the same: a serial that is empty, longer than
    /// [`MAX_SERIAL_LEN`] or not `[A-Za-z0-9._-]`; a path that is not absolute, not
    /// printable ASCII or contains `"` (or `,` in `udos.lowers`); a [`NetConfig`] that
    /// fails [`NetConfig::check`].
    pub fn render(&self) -> Result<String, RenderError> {
        let mut words = vec![format!("udos.mode={}", self.mode.as_str())];
        if !self.lowers.is_empty() {
            let mut list = Vec::new();
            for lower in &self.lowers {
                list.push(device_value("udos.lowers", lower)?);
            }
            words.push(pair("udos.lowers", &list.join(",")));
        }
        for (key, device) in [
            ("udos.upper", &self.upper),
            ("udos.output", &self.output),
            ("udos.secrets", &self.secrets),
        ] {
            if let Some(device) = device {
                words.push(pair(key, &device_value(key, device)?));
            }
        }
        if let Some(timeout) = self.timeout {
            words.push(pair("udos.timeout", &render_seconds(timeout)));
        }
        if self.grace != DEFAULT_GRACE {
            words.push(pair("udos.grace", &render_seconds(self.grace)));
        }
        if self.device_timeout != DEFAULT_DEVICE_TIMEOUT {
            words.push(pair(
                "udos.devtimeout",
                &render_seconds(self.device_timeout),
            ));
        }
        if self.shell {
            words.push("udos.shell=1".to_string());
        }
        if self.act != Path::new(DEFAULT_ACT) {
            words.push(pair("udos.act", &path_value("udos.act", &self.act)?));
        }
        if let Some(root) = &self.root {
            words.push(pair("udos.root", &path_value("udos.root", root)?));
        }
        if let Some(net) = &self.net {
            net.check().map_err(|reason| RenderError {
                key: "udos.net",
                value: net.to_string(),
                reason,
            })?;
            words.push(pair("udos.net", &net.to_string()));
        }
        if let Some(channel) = &self.channel {
            let port = DeviceRef::Serial(channel.clone());
            words.push(pair("udos.channel", &device_value("udos.channel", &port)?));
        }
        Ok(words.join(" "))
    }

    /// Parses a whole kernel command line (whitespace-separated, `"` quotes a value);
    /// the first bad `udos.*` value is an error.
    pub fn parse(cmdline: &str) -> Result<Self, CmdlineError> {
        match Self::parse_lenient(cmdline) {
            (config, None) => Ok(config),
            (_, Some(error)) => Err(error),
        }
    }

    /// Like [`BootConfig::parse`], but keeps every key it could read next to the first
    /// bad one, so a typo in `udos.timeout` still leaves PID 1 knowing where to seal
    /// the error record.
    pub fn parse_lenient(cmdline: &str) -> (Self, Option<CmdlineError>) {
        let mut config = BootConfig::default();
        let mut first_error = None;
        for word in split_words(cmdline) {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            if let Err(reason) = config.apply(key, value) {
                first_error.get_or_insert(CmdlineError {
                    key: key.to_string(),
                    value: value.to_string(),
                    reason,
                });
            }
        }
        (config, first_error)
    }

    fn apply(&mut self, key: &str, value: &str) -> Result<(), &'static str> {
        let secs = |value: &str| parse_seconds(value).ok_or("expected seconds");
        let absolute = |value: &str| {
            value
                .starts_with('/')
                .then(|| PathBuf::from(value))
                .ok_or("expected an absolute path")
        };
        match key {
            "udos.mode" => {
                self.mode = value
                    .parse()
                    .map_err(|()| "expected step, probe, manager, service or job")?
            }
            "udos.lowers" => {
                self.lowers = value
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(DeviceRef::parse)
                    .collect()
            }
            "udos.upper" => self.upper = Some(DeviceRef::parse(value)),
            "udos.output" => self.output = Some(DeviceRef::parse(value)),
            "udos.secrets" => self.secrets = Some(DeviceRef::parse(value)),
            "udos.timeout" => self.timeout = Some(secs(value)?),
            "udos.grace" => self.grace = secs(value)?,
            "udos.devtimeout" => self.device_timeout = secs(value)?,
            "udos.shell" => self.shell = matches!(value, "1" | "true" | "yes" | "on"),
            "udos.act" => self.act = absolute(value)?,
            "udos.root" => self.root = Some(absolute(value)?),
            "udos.net" => self.net = Some(value.parse()?),
            "udos.channel" => {
                let ok = !value.is_empty()
                    && value.len() <= MAX_SERIAL_LEN
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
                if !ok {
                    return Err("expected a port name [A-Za-z0-9._-], at most 20 bytes");
                }
                self.channel = Some(value.to_string());
            }
            _ => {}
        }
        Ok(())
    }
}

/// `key=value`, quoted when the value has a space (the kernel's own quoting).
fn pair(key: &str, value: &str) -> String {
    if value.contains(' ') {
        format!("{key}=\"{value}\"")
    } else {
        format!("{key}={value}")
    }
}

fn device_value(key: &'static str, device: &DeviceRef) -> Result<String, RenderError> {
    let bad = |value: &str, reason| RenderError {
        key,
        value: value.to_string(),
        reason,
    };
    match device {
        DeviceRef::Serial(serial) => {
            if serial.is_empty() || serial.len() > MAX_SERIAL_LEN {
                return Err(bad(serial, "a serial has 1 to 20 bytes"));
            }
            let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
            if !serial.chars().all(ok) {
                return Err(bad(serial, "a serial is made of [A-Za-z0-9._-]"));
            }
            Ok(serial.clone())
        }
        DeviceRef::Path(path) => {
            let value = path_value(key, path)?;
            if key == "udos.lowers" && value.contains(',') {
                return Err(bad(&value, "commas separate the lowers"));
            }
            Ok(value)
        }
    }
}

fn path_value(key: &'static str, path: &Path) -> Result<String, RenderError> {
    let value = path.to_str().unwrap_or_default().to_string();
    let reason = if !value.starts_with('/') {
        "expected an absolute path (and UTF-8)"
    } else if !value.chars().all(|c| matches!(c, ' '..='~') && c != '"') {
        "the kernel command line carries printable ASCII without '\"'"
    } else {
        return Ok(value);
    };
    Err(RenderError {
        key,
        value: path.display().to_string(),
        reason,
    })
}

/// Exact decimal seconds: `2`, `1.5`, `0.000000001` (nanoseconds at most).
fn render_seconds(d: Duration) -> String {
    match d.subsec_nanos() {
        0 => d.as_secs().to_string(),
        nanos => {
            let fraction = format!("{nanos:09}");
            format!("{}.{}", d.as_secs(), fraction.trim_end_matches('0'))
        }
    }
}

/// Non-negative decimal seconds, `DIGITS[.DIGITS]`; digits past nanoseconds are
/// dropped. Parsed exactly (no float), so rendering and parsing round-trip.
fn parse_seconds(value: &str) -> Option<Duration> {
    let (whole, fraction) = value.split_once('.').unwrap_or((value, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
        return None;
    }
    let secs = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let nanos = fraction
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(9)
        .fold(0u32, |n, b| n * 10 + u32::from(b - b'0'));
    Some(Duration::new(secs, nanos))
}

/// Splits like the kernel does: on whitespace, except inside double quotes.
fn split_words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn serial(s: &str) -> DeviceRef {
        DeviceRef::serial(s)
    }

    #[test]
    fn parses_every_key_and_ignores_the_rest() {
        let cfg = BootConfig::parse(
            "console=ttyS0 quiet udos.mode=manager udos.lowers=udos-l0,udos-l1,udos-l2 \
             udos.upper=udos-up udos.output=/tmp/out udos.secrets=udos-secrets \
             udos.timeout=1.5 udos.grace=2 udos.shell=1 udos.act=/bin/true \
             udos.devtimeout=0.5 udos.root=\"/tmp/a b\" udos.net=10.0.2.15/24,10.0.2.2,10.0.2.3 udos.channel=udos.ctl -- x",
        )
        .unwrap();
        let expected = BootConfig {
            mode: Mode::Manager,
            lowers: vec![serial("udos-l0"), serial("udos-l1"), serial("udos-l2")],
            upper: Some(serial("udos-up")),
            output: Some(DeviceRef::Path("/tmp/out".into())),
            secrets: Some(serial(SERIAL_SECRETS)),
            timeout: Some(Duration::from_millis(1500)),
            grace: Duration::from_secs(2),
            shell: true,
            act: PathBuf::from("/bin/true"),
            device_timeout: Duration::from_millis(500),
            root: Some(PathBuf::from("/tmp/a b")),
            net: Some(NetConfig::USER_MODE),
            channel: Some("udos.ctl".into()),
        };
        assert_eq!(cfg, expected);
    }

    #[test]
    fn job_mode_and_its_channel() {
        let cfg = BootConfig::parse("udos.mode=job udos.channel=udos.ctl").unwrap();
        assert_eq!(cfg.mode, Mode::Job);
        assert_eq!(cfg.channel.as_deref(), Some("udos.ctl"));
        assert_eq!(BootConfig::parse(&cfg.render().unwrap()).unwrap(), cfg);
        for bad in [
            "udos.channel=a,b",
            "udos.channel=",
            "udos.channel=a-port-name-over-20-bytes",
        ] {
            assert!(BootConfig::parse(bad).is_err(), "{bad}");
        }
        let bad = BootConfig {
            channel: Some("has space".into()),
            ..BootConfig::default()
        };
        assert!(bad.render().is_err());
    }

    #[test]
    fn service_mode_and_defaults() {
        let cfg = BootConfig::parse("udos.mode=service udos.lowers=udos-l0").unwrap();
        assert_eq!(cfg.mode, Mode::Service);
        assert_eq!(cfg.lowers, vec![serial("udos-l0")]);
        assert_eq!((cfg.upper, cfg.output, cfg.secrets), (None, None, None));
        assert_eq!(
            BootConfig::parse("console=ttyS0").unwrap(),
            BootConfig::default()
        );
    }

    #[test]
    fn rejects_bad_values_but_keeps_the_good_ones() {
        let err = BootConfig::parse("udos.timeout=soon").unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel command line: udos.timeout=soon: expected seconds"
        );
        for bad in [
            "udos.mode=fast",
            "udos.grace=-1",
            "udos.grace=.",
            "udos.grace=1e3",
            "udos.devtimeout=1.2.3",
            "udos.act=act",
            "udos.root=relative",
            "udos.net=10.0.2.15,10.0.2.2,10.0.2.3",
            "udos.net=10.0.2.15/24,10.0.2.2",
        ] {
            assert!(BootConfig::parse(bad).is_err(), "{bad}");
        }
        let (cfg, err) = BootConfig::parse_lenient("udos.timeout=x udos.output=udos-out");
        assert_eq!(err.map(|e| e.key), Some("udos.timeout".to_string()));
        assert_eq!(cfg.output, Some(serial(SERIAL_OUTPUT)));
    }

    #[test]
    fn seconds_are_exact_decimals() {
        assert_eq!(parse_seconds("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_seconds(".5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_seconds("3."), Some(Duration::from_secs(3)));
        assert_eq!(parse_seconds("0.0000000019"), Some(Duration::from_nanos(1)));
        assert_eq!(render_seconds(Duration::from_millis(1500)), "1.5");
        assert_eq!(render_seconds(Duration::from_nanos(1)), "0.000000001");
        assert_eq!(render_seconds(Duration::from_secs(60)), "60");
    }

    #[test]
    fn renders_what_the_host_boots_a_step_with() {
        let cfg = BootConfig {
            lowers: (0..3).map(|i| DeviceRef::Serial(lower_serial(i))).collect(),
            upper: Some(serial(SERIAL_UPPER)),
            output: Some(serial(SERIAL_OUTPUT)),
            secrets: Some(serial(SERIAL_SECRETS)),
            timeout: Some(Duration::from_secs(3600)),
            ..BootConfig::default()
        };
        assert_eq!(
            cfg.render().unwrap(),
            "udos.mode=step udos.lowers=udos-l0,udos-l1,udos-l2 udos.upper=udos-upper \
             udos.output=udos-out udos.secrets=udos-secrets udos.timeout=3600"
        );
        let harness = BootConfig {
            root: Some("/var/tmp/a b".into()),
            grace: Duration::from_millis(250),
            shell: true,
            ..BootConfig::default()
        };
        assert_eq!(
            harness.render().unwrap(),
            "udos.mode=step udos.grace=0.25 udos.shell=1 udos.root=\"/var/tmp/a b\""
        );
    }

    #[test]
    fn refuses_to_render_what_would_not_parse_back() {
        let with = |lowers: Vec<DeviceRef>| BootConfig {
            lowers,
            ..BootConfig::default()
        };
        for lowers in [
            vec![serial("")],
            vec![serial("a-serial-of-21-bytes!")],
            vec![serial("udos-l0,udos-l1")],
            vec![serial("has space")],
            vec![DeviceRef::Path("/a,b".into())],
            vec![DeviceRef::Path("relative".into())],
            vec![DeviceRef::Path("/quote\"d".into())],
            vec![DeviceRef::Path("/new\nline".into())],
        ] {
            let err = with(lowers.clone()).render().unwrap_err();
            assert_eq!(err.key, "udos.lowers", "{lowers:?}");
        }
        let long = "x".repeat(MAX_SERIAL_LEN);
        assert!(with(vec![serial(&long)]).render().is_ok());
        let act = BootConfig {
            act: PathBuf::from("/tab\there"),
            ..BootConfig::default()
        };
        assert_eq!(act.render().unwrap_err().key, "udos.act");
    }

    #[test]
    fn net_renders_and_parses_the_user_mode_addresses() {
        let cfg = BootConfig {
            net: Some(NetConfig::USER_MODE),
            ..BootConfig::default()
        };
        assert_eq!(
            cfg.render().unwrap(),
            "udos.mode=step udos.net=10.0.2.15/24,10.0.2.2,10.0.2.3"
        );
        assert_eq!(
            NetConfig::USER_MODE.netmask(),
            Ipv4Addr::new(255, 255, 255, 0)
        );
        assert_eq!(prefix_mask(1), Ipv4Addr::new(128, 0, 0, 0));
        assert_eq!(prefix_mask(30), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(BootConfig::parse("console=ttyS0").unwrap().net, None);
    }

    #[test]
    fn net_values_that_cannot_configure_a_nic_are_refused() {
        for (value, why) in [
            ("10.0.2.15/24,10.0.2.2", "expected ADDRESS/PREFIX"),
            (
                "10.0.2.15/24,10.0.2.2,10.0.2.3,10.0.2.4",
                "expected ADDRESS/PREFIX",
            ),
            ("10.0.2.15,10.0.2.2,10.0.2.3", "expected ADDRESS/PREFIX"),
            ("10.0.2.15/+24,10.0.2.2,10.0.2.3", "expected ADDRESS/PREFIX"),
            ("10.0.2.15/24,10.0.2.2,dns", "expected ADDRESS/PREFIX"),
            ("::1/24,10.0.2.2,10.0.2.3", "expected ADDRESS/PREFIX"),
            ("10.0.2.15/31,10.0.2.14,10.0.2.3", "prefix length"),
            ("10.0.2.15/0,10.0.2.2,10.0.2.3", "prefix length"),
            ("10.0.2.15/24,10.0.3.2,10.0.2.3", "gateway must be on"),
            ("10.0.2.15/24,10.0.2.15,10.0.2.3", "must differ"),
            ("10.0.2.15/24,10.0.2.2,10.0.2.2", "must differ"),
            ("10.0.2.255/24,10.0.2.2,10.0.2.3", "broadcast"),
            ("10.0.2.15/24,10.0.2.0,10.0.2.3", "broadcast"),
        ] {
            let err = BootConfig::parse(&format!("udos.net={value}")).unwrap_err();
            assert_eq!(err.key, "udos.net");
            assert!(err.reason.contains(why), "{value}: {}", err.reason);
        }
        // A DNS server off the subnet is fine: it is routed through the gateway.
        let off = "udos.net=192.168.7.10/24,192.168.7.1,9.9.9.9";
        assert_eq!(
            BootConfig::parse(off).unwrap().net.unwrap().dns,
            Ipv4Addr::new(9, 9, 9, 9)
        );
        let bad = BootConfig {
            net: Some(NetConfig {
                prefix_len: 32,
                ..NetConfig::USER_MODE
            }),
            ..BootConfig::default()
        };
        assert_eq!(bad.render().unwrap_err().key, "udos.net");
    }

    fn arb_path() -> impl Strategy<Value = PathBuf> {
        // Printable ASCII without '"' and ',' (a ',' is refused in lowers).
        "/[ !#-+\\--~]{0,24}".prop_map(PathBuf::from)
    }

    fn arb_device() -> impl Strategy<Value = DeviceRef> {
        prop_oneof![
            "[A-Za-z0-9._-]{1,20}".prop_map(DeviceRef::Serial),
            arb_path().prop_map(DeviceRef::Path),
        ]
    }

    fn arb_duration() -> impl Strategy<Value = Duration> {
        (0u64..=u64::from(u32::MAX), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n))
    }

    /// Valid configurations: a host part of each address inside the subnet.
    fn arb_net() -> impl Strategy<Value = NetConfig> {
        (
            any::<u32>(),
            1u8..=30,
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
        )
            .prop_map(|(net, prefix_len, a, g, d)| {
                let mask = u32::from(prefix_mask(prefix_len));
                let hosts = !mask - 1; // usable host numbers: 1..=hosts
                let host = |n: u32, k: u32| (net & mask) | (1 + (n.wrapping_add(k)) % hosts);
                NetConfig {
                    address: host(a, 0).into(),
                    prefix_len,
                    gateway: host(g, 1).into(),
                    dns: host(d, 2).into(),
                }
            })
            .prop_filter("distinct addresses", |n| n.check().is_ok())
    }

    prop_compose! {
        fn arb_config()(
            mode in prop_oneof![Just(Mode::Step), Just(Mode::Probe), Just(Mode::Manager), Just(Mode::Service), Just(Mode::Job)],
            lowers in prop::collection::vec(arb_device(), 0..6),
            upper in prop::option::of(arb_device()),
            output in prop::option::of(arb_device()),
            secrets in prop::option::of(arb_device()),
            timeout in prop::option::of(arb_duration()),
            grace in arb_duration(),
            shell in any::<bool>(),
            act in arb_path(),
            device_timeout in arb_duration(),
            root in prop::option::of(arb_path()),
            net in prop::option::of(arb_net()),
            channel in prop::option::of("[A-Za-z0-9._-]{1,20}"),
        ) -> BootConfig {
            BootConfig { mode, lowers, upper, output, secrets, timeout, grace, shell, act,
                         device_timeout, root, net, channel }
        }
    }

    proptest! {
        #[test]
        fn render_then_parse_gives_the_same_config(cfg in arb_config()) {
            let rendered = cfg.render().unwrap();
            let cmdline = format!("console=ttyS0 quiet panic=-1 {rendered} -- init args");
            prop_assert_eq!(BootConfig::parse(&cmdline).unwrap(), cfg);
        }
    }
}
