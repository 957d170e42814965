//! `udos-hostile-init`: a **hostile PID 1, for tests only**. It stands in for
//! `udos-init` in a step VM and, instead of running the step, writes a crafted sealed
//! output (docs/layer-format.md) so the host's read-back can be tested against what a
//! compromised guest could really write: another layer's id, setuid-root files,
//! escaping paths, oversized claims.
//!
//! It is never part of the production image: only `scripts/test` builds it, and the
//! image builder embeds it only when a test points `UDOS_INIT` at it
//! (`host-agent/tests/hostile.rs`, which finds it through `UDOS_HOSTILE_INIT`).
//!
//! **Choosing the attack.** The test's git repository holds `.udos-hostile` at its
//! root (so the workspace layer has `workspace/.udos-hostile`). Line `k` (blank lines
//! and `#` comments skipped) is the scenario of step `k`; the step number comes from
//! the control layer's `.udos/context.json`. Scenarios (see [`scenario::Scenario`]):
//!
//! ```text
//! adopt <64 hex>          valid stream, header names that (existing) layer as its id
//! setuid                  honest layer: root-owned 04755/02755 copies of this binary
//! escape-dotdot <name>    member ../../(...)/tmp/<name>
//! escape-absolute <name>  member /tmp/<name>
//! escape-symlink <name>   symlink hostile-link -> /tmp, then hostile-link/<name>
//! oversized-layer-len     header layer_len past the end of the device
//! oversized-file          a member claiming 1 TiB
//! too-many-entries        1,000,001 members (the host's default max_entries + 1)
//! ```
//!
//! The record always says the user's step (act id `_udos_step`: give the test's steps
//! no `id:`) succeeded, so whatever the host accepts becomes that step's layer.
//! `udos.mode=probe` prints `UDOS-PROBE-OK` like `udos-init`.
//!
//! **Not PID 1** (a setuid copy run on the host): prints `euid=<n> uid=<n>` and exits,
//! which is how a test sees whether such a copy would have run as root.

mod forge;
mod guest;
mod scenario;

use std::fs;
use std::path::Path;

use nix::sys::reboot::{reboot, RebootMode};
use nix::unistd::{geteuid, getpid, getuid, sync};

use crate::forge::Claims;
use crate::guest::{Cmdline, GuestError};
use crate::scenario::{Scenario, ScenarioError, HOST_MAX_ENTRIES};

/// Everything that can stop this PID 1 from staging its attack.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error(transparent)]
    Forge(#[from] forge::ForgeError),
    #[error("cannot build the layer's tree in /tmp: {0}")]
    Tree(std::io::Error),
}

fn say(line: &str) {
    println!("udos-hostile-init: {line}");
}

fn main() {
    if getpid().as_raw() != 1 {
        println!("euid={} uid={}", geteuid(), getuid());
        return;
    }
    say("THIS IS THE HOSTILE TEST PID 1, NOT udos-init");
    match std::panic::catch_unwind(run) {
        Ok(Ok(done)) => say(&done),
        Ok(Err(e)) => say(&format!("error: {e}")),
        Err(_) => say("panicked"),
    }
    sync();
    let _ = reboot(RebootMode::RB_POWER_OFF);
    // Only reached if reboot failed; PID 1 must not exit.
    loop {
        std::thread::park();
    }
}

fn run() -> Result<String, Error> {
    guest::mount_api_filesystems()?;
    let path = Path::new("/proc/cmdline");
    let text = fs::read_to_string(path).map_err(|source| GuestError::Io {
        op: "read",
        path: path.into(),
        source,
    })?;
    let cmdline = Cmdline::parse(&text);
    if cmdline.mode.as_deref() == Some("probe") {
        println!("UDOS-PROBE-OK");
        return Ok("probe".into());
    }
    let loaded = guest::load_modules()?;
    say(&format!("loaded modules: {}", loaded.join(" ")));
    let output = cmdline
        .output
        .as_deref()
        .ok_or_else(|| GuestError::Missing("no udos.output on the command line".into()))?;
    let output = guest::device_by_serial(output)?;
    let (text, step) = guest::read_scenario(&cmdline.lowers)?;
    let scenario = scenario::for_step(&text, step)?;
    say(&format!("step {step}: staging `{scenario}`"));
    stage(&scenario, &output)?;
    Ok(format!("sealed `{scenario}` on {}", output.display()))
}

/// Writes the scenario's sealed output.
fn stage(scenario: &Scenario, device: &Path) -> Result<(), Error> {
    let mut record = forge::success_record();
    let honest = Claims::default();
    match scenario {
        Scenario::Adopt { layer } => {
            let upper = Path::new("/tmp/hostile-upper");
            fs::create_dir_all(upper.join("hostile")).map_err(Error::Tree)?;
            fs::write(
                upper.join("hostile/adopted.txt"),
                "not the layer it claims to be\n",
            )
            .map_err(Error::Tree)?;
            let claims = Claims {
                layer_sha256: Some(*layer),
                layer_len: None,
            };
            forge::write_output(device, &mut record, claims, |out| {
                forge::honest_layer(upper, out)
            })?;
        }
        Scenario::Setuid => {
            let upper = Path::new("/tmp/hostile-upper");
            forge::setuid_tree(upper, Path::new("/init")).map_err(Error::Tree)?;
            forge::write_output(device, &mut record, honest, |out| {
                forge::honest_layer(upper, out)
            })?;
        }
        Scenario::EscapeDotdot { name } => crafted(device, &forge::escape_dotdot(name))?,
        Scenario::EscapeAbsolute { name } => crafted(device, &forge::escape_absolute(name))?,
        Scenario::EscapeSymlink { name } => crafted(device, &forge::escape_symlink(name))?,
        Scenario::OversizedFile => crafted(device, &forge::oversized_file())?,
        Scenario::OversizedLayerLen => {
            let size = forge::device_size(device).map_err(|source| GuestError::Io {
                op: "measure",
                path: device.into(),
                source,
            })?;
            let claims = Claims {
                layer_sha256: None,
                layer_len: Some(size),
            };
            forge::write_output(device, &mut record, claims, |out| {
                forge::crafted_layer(&[], out)
            })?;
        }
        Scenario::TooManyEntries => {
            forge::write_output(device, &mut record, honest, |out| {
                forge::many_entries(HOST_MAX_ENTRIES + 1, out)
            })?;
        }
    }
    Ok(())
}

/// An honest header over crafted members.
fn crafted(device: &Path, blocks: &[[u8; 512]]) -> Result<(), Error> {
    let mut record = forge::success_record();
    forge::write_output(device, &mut record, Claims::default(), |out| {
        forge::crafted_layer(blocks, out)
    })?;
    Ok(())
}
