//! The kernel command line: the host's only way to tell PID 1 what to do.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::Error;

/// Where act lives in the step root (`/udos/bin` bind-mounted at `/run/udos/bin`).
pub const DEFAULT_ACT: &str = "/run/udos/bin/act";
/// How long to wait for a virtio-blk serial to show up.
pub const DEFAULT_DEVICE_TIMEOUT: Duration = Duration::from_secs(5);
/// Grace between SIGTERM and SIGKILL.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3);

/// What PID 1 was booted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Run the step described by `/.actrc` (default).
    Step,
    /// Print `UDOS-PROBE-OK` and power off.
    Probe,
    /// Skip act; run a shell or the agent.
    Manager,
    /// A service VM: assemble the root, report `service up`, idle (reaping children)
    /// until SIGTERM, SIGINT or the power button, then shut down in order.
    Service,
}

/// A block device named by its virtio serial, or (harness, debugging) by a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Serial(String),
    /// A value starting with `/`: a device node or, in harness mode, a file or directory.
    Path(PathBuf),
}

impl Target {
    fn parse(value: &str) -> Self {
        if value.starts_with('/') {
            Target::Path(PathBuf::from(value))
        } else {
            Target::Serial(value.to_string())
        }
    }
}

/// The `udos.*` keys; everything else on the command line is ignored.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub mode: Mode,
    /// Lower layers, bottom first (as the host lists them).
    pub lowers: Vec<Target>,
    pub upper: Option<Target>,
    pub output: Option<Target>,
    pub timeout: Option<Duration>,
    pub grace: Duration,
    pub shell: bool,
    /// `udos.act=PATH`: act's path inside the step root (tests use a stand-in).
    pub act: PathBuf,
    /// `udos.devtimeout=SECS`: how long to wait for each device serial.
    pub device_timeout: Duration,
    /// Harness mode (`udos.root=DIR`): DIR is the step root as-is; see `root::prepare_harness`.
    pub root: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Step,
            lowers: Vec::new(),
            upper: None,
            output: None,
            timeout: None,
            grace: DEFAULT_GRACE,
            shell: false,
            act: PathBuf::from(DEFAULT_ACT),
            device_timeout: DEFAULT_DEVICE_TIMEOUT,
            root: None,
        }
    }
}

/// Parses a kernel command line (whitespace-separated, `"` quotes a value).
#[cfg(test)]
pub fn parse(cmdline: &str) -> Result<Config, Error> {
    let (cfg, error) = parse_lenient(cmdline);
    match error {
        Some(e) => Err(e),
        None => Ok(cfg),
    }
}

/// Like [`parse`], but keeps every key it could read next to the first bad one, so a
/// typo in `udos.timeout` still leaves PID 1 knowing where to seal the error record.
pub fn parse_lenient(cmdline: &str) -> (Config, Option<Error>) {
    let mut cfg = Config::default();
    let mut first_error = None;
    for word in split_words(cmdline) {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        if let Err(e) = apply(&mut cfg, key, value) {
            first_error.get_or_insert(e);
        }
    }
    (cfg, first_error)
}

fn apply(cfg: &mut Config, key: &str, value: &str) -> Result<(), Error> {
    let bad = |reason: &str| Error::Cmdline {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    };
    let secs = |value: &str| seconds(value).ok_or_else(|| bad("expected seconds"));
    match key {
        "udos.mode" => {
            cfg.mode = match value {
                "step" => Mode::Step,
                "probe" => Mode::Probe,
                "manager" => Mode::Manager,
                "service" => Mode::Service,
                _ => return Err(bad("expected step, probe, manager or service")),
            }
        }
        "udos.lowers" => {
            cfg.lowers = value
                .split(',')
                .filter(|s| !s.is_empty())
                .map(Target::parse)
                .collect()
        }
        "udos.upper" => cfg.upper = Some(Target::parse(value)),
        "udos.output" => cfg.output = Some(Target::parse(value)),
        "udos.timeout" => cfg.timeout = Some(secs(value)?),
        "udos.grace" => cfg.grace = secs(value)?,
        "udos.devtimeout" => cfg.device_timeout = secs(value)?,
        "udos.shell" => cfg.shell = matches!(value, "1" | "true" | "yes" | "on"),
        "udos.act" | "udos.root" if !value.starts_with('/') => {
            return Err(bad("expected an absolute path"))
        }
        "udos.act" => cfg.act = PathBuf::from(value),
        "udos.root" => cfg.root = Some(PathBuf::from(value)),
        _ => {}
    }
    Ok(())
}

/// Non-negative, finite seconds; fractions allowed (tests use short timeouts).
fn seconds(value: &str) -> Option<Duration> {
    let secs: f64 = value.parse().ok()?;
    Duration::try_from_secs_f64(secs).ok()
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

    #[test]
    fn parses_every_key_and_ignores_the_rest() {
        let cfg = parse(
            "console=ttyS0 quiet udos.mode=manager udos.lowers=udos-l0,udos-l1,udos-l2 \
             udos.upper=udos-up udos.output=/tmp/out udos.timeout=1.5 udos.grace=2 \
             udos.shell=1 udos.act=/bin/true udos.devtimeout=0.5 udos.root=\"/tmp/a b\" -- x",
        )
        .unwrap();
        assert_eq!(cfg.mode, Mode::Manager);
        assert_eq!(
            cfg.lowers,
            vec![
                Target::Serial("udos-l0".into()),
                Target::Serial("udos-l1".into()),
                Target::Serial("udos-l2".into())
            ]
        );
        assert_eq!(cfg.upper, Some(Target::Serial("udos-up".into())));
        assert_eq!(cfg.output, Some(Target::Path("/tmp/out".into())));
        assert_eq!(cfg.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(cfg.grace, Duration::from_secs(2));
        assert!(cfg.shell);
        assert_eq!(cfg.act, PathBuf::from("/bin/true"));
        assert_eq!(cfg.device_timeout, Duration::from_millis(500));
        assert_eq!(cfg.root, Some(PathBuf::from("/tmp/a b")));
    }

    #[test]
    fn service_mode() {
        let cfg = parse("udos.mode=service udos.lowers=udos-l0").unwrap();
        assert_eq!(cfg.mode, Mode::Service);
        assert_eq!(cfg.lowers, vec![Target::Serial("udos-l0".into())]);
        assert_eq!(cfg.upper, None);
        assert_eq!(cfg.output, None);
    }

    #[test]
    fn defaults() {
        let cfg = parse("console=ttyS0").unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn rejects_bad_values() {
        let err = parse("udos.timeout=soon").unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel command line: udos.timeout=soon: expected seconds"
        );
        assert!(parse("udos.mode=fast").is_err());
        assert!(parse("udos.grace=-1").is_err());
        assert!(parse("udos.act=act").is_err());
        let (cfg, err) = parse_lenient("udos.timeout=x udos.output=udos-out");
        assert!(err.is_some());
        assert_eq!(cfg.output, Some(Target::Serial("udos-out".into())));
    }
}
