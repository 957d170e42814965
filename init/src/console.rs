//! The console: PID 1's stdout, which the kernel points at `/dev/console`.
//!
//! Writes never fail loudly: a console that went away must not stop the step from
//! being sealed, and `println!` would panic on a write error.

use std::io::Write;
use std::os::fd::{AsRawFd, IntoRawFd};

/// Writes one line to the console, ignoring errors.
pub fn line(text: &str) {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// `udos-init: ...` on the console.
macro_rules! info {
    ($($arg:tt)*) => {
        $crate::console::line(&format!("udos-init: {}", format_args!($($arg)*)))
    };
}

/// `udos-init: warning: ...` on the console: something is off but the step goes on.
macro_rules! warning {
    ($($arg:tt)*) => {
        $crate::console::line(&format!("udos-init: warning: {}", format_args!($($arg)*)))
    };
}

/// `udos-init: error: ...` on the console: the step cannot succeed.
macro_rules! error {
    ($($arg:tt)*) => {
        $crate::console::line(&format!("udos-init: error: {}", format_args!($($arg)*)))
    };
}

pub(crate) use {error, info, warning};

/// Makes sure fds 0, 1 and 2 exist. The kernel opens `/dev/console` for init when the
/// initramfs has that node; if it did not, open it now that devtmpfs is mounted.
pub fn ensure_stdio() {
    let stdout_ok = nix::fcntl::fcntl(std::io::stdout().as_raw_fd(), nix::fcntl::F_GETFD).is_ok();
    if stdout_ok {
        return;
    }
    let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    // Raw fd: if it landed on 0..=2 itself, dropping it would close a standard fd.
    let raw = console.into_raw_fd();
    for fd in 0..3 {
        if fd != raw {
            // SAFETY: dup2 of an fd we own onto a standard fd number.
            unsafe { libc::dup2(raw, fd) };
        }
    }
    if raw > 2 {
        // SAFETY: `raw` is ours (from into_raw_fd) and no longer used.
        unsafe { libc::close(raw) };
    }
}
