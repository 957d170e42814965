//! Everything that can stop PID 1 from running the step. Each variant carries the
//! syscall's context, so the console line says exactly what broke and why.

use std::io;
use std::path::PathBuf;

use nix::errno::Errno;

/// A failure before or while running the step; it becomes a record with `status: error`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `mount(2)` failed. (`src`, not `source`: thiserror reserves that name.)
    #[error("mount {src} on {} ({fstype}): {error}", target.display())]
    Mount {
        src: String,
        target: PathBuf,
        fstype: String,
        error: Errno,
    },

    /// `mount(2)` with `MS_MOVE` failed.
    #[error("move mount {} to {}: {error}", from.display(), to.display())]
    MoveMount {
        from: PathBuf,
        to: PathBuf,
        error: Errno,
    },

    /// A filesystem operation PID 1 needs (mkdir, read, open) failed.
    #[error("{op} {}: {error}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        error: io::Error,
    },

    /// Another syscall failed (`chroot`, `chdir`, `signalfd`, ...).
    #[error("{call}: {error}")]
    Syscall { call: &'static str, error: Errno },

    /// A kernel module listed in `/udos/modules` (or one it depends on) did not load.
    #[error("load module {name}: {error}")]
    ModuleLoad { name: String, error: String },

    /// No `/sys/block/vd*/serial` carried this serial within the device timeout.
    #[error("{role} device {serial} not found")]
    DeviceNotFound { role: &'static str, serial: String },

    /// A `udos.*` key on the kernel command line has a value PID 1 cannot use.
    #[error(transparent)]
    Cmdline(#[from] udos_layer::boot::CmdlineError),

    /// Step mode without any `udos.lowers` and without `udos.root`.
    #[error("no udos.lowers on the kernel command line: no root to run the step in")]
    NoLowers,

    /// The secrets device (`udos.secrets`) cannot be read or decoded.
    #[error("secrets device {}: {error}", device.display())]
    Secrets {
        device: PathBuf,
        error: udos_layer::SecretsError,
    },

    /// act's binary is not there (exec gave `ENOENT`).
    #[error("act not found at {}", path.display())]
    ActNotFound { path: PathBuf },

    /// exec of act (or the manager-mode program) failed for another reason.
    #[error("start {}: {error}", path.display())]
    Spawn { path: PathBuf, error: io::Error },

    /// The thread bringing the network up ended without an answer.
    #[error("network thread: {0}")]
    NetworkThread(String),

    /// `udos.net` is set but no Ethernet interface appeared.
    #[error("udos.net is set but no network interface appeared within {waited:?} (is virtio_net in /udos/modules?)")]
    NoNetworkInterface { waited: std::time::Duration },

    /// An interface or route ioctl failed while configuring the network.
    #[error("network: {call} on {iface}: {error}")]
    NetIoctl {
        call: &'static str,
        iface: String,
        error: Errno,
    },

    /// `udos.net` in harness mode, where PID 1 shares the host's network.
    #[error("udos.net does not apply in harness mode (udos.root): it would configure the host's interfaces")]
    NetInHarness,

    /// The step root's `/etc` is not a directory, so it cannot get a `resolv.conf`.
    #[error("the step root's /etc is not a directory: no place for resolv.conf")]
    EtcNotADirectory,

    /// Job mode: the channel to the host failed, or the host sent what PID 1 refuses.
    #[error("job channel: {0}")]
    Channel(String),

    /// Job mode without `udos.channel`.
    #[error("udos.mode=job needs udos.channel (the host's port)")]
    NoChannel,

    /// Manager mode with neither a shell requested nor an agent in the image.
    #[error("no /.actrc and no agent: nothing to run")]
    NothingToRun,
}

impl Error {
    /// Shorthand for [`Error::Io`].
    pub fn io(op: &'static str, path: impl Into<PathBuf>, error: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            error,
        }
    }
}
