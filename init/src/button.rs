//! The power button, for service mode: the ACPI button driver reports a press as a
//! `KEY_POWER` key event on an input device (`/dev/input/event*`, with `evdev`). PID 1
//! watches every event device it finds and treats a press as a request to shut down.
//! Kernels or images without `button`/`evdev` simply have no such device; SIGTERM and
//! SIGINT (Ctrl-Alt-Del) still work.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `EV_KEY` in `linux/input-event-codes.h`.
const EV_KEY: u16 = 0x01;
/// `KEY_POWER`.
const KEY_POWER: u16 = 116;
/// `struct input_event` on 64-bit Linux: `struct timeval` (16 bytes), type, code, value.
const EVENT_SIZE: usize = 24;

/// Whether a buffer of raw `input_event`s holds a power-button press.
pub fn has_power_press(buf: &[u8]) -> bool {
    buf.chunks_exact(EVENT_SIZE).any(|e| {
        let ty = u16::from_ne_bytes([e[16], e[17]]);
        let code = u16::from_ne_bytes([e[18], e[19]]);
        let value = i32::from_ne_bytes([e[20], e[21], e[22], e[23]]);
        ty == EV_KEY && code == KEY_POWER && value == 1
    })
}

/// The open event devices.
#[derive(Debug, Default)]
pub struct Buttons {
    devices: Vec<File>,
}

impl Buttons {
    /// Opens every `/dev/input/event*` (non-blocking); none is fine.
    pub fn open(dev_input: &Path) -> Buttons {
        let mut devices = Vec::new();
        let Ok(entries) = std::fs::read_dir(dev_input) else {
            return Buttons { devices };
        };
        for e in entries.flatten() {
            if !e.file_name().to_string_lossy().starts_with("event") {
                continue;
            }
            if let Ok(f) = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(e.path())
            {
                devices.push(f);
            }
        }
        Buttons { devices }
    }

    /// How many devices are watched.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// The fds to poll.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.devices.iter().map(|f| f.as_fd()).collect()
    }

    /// Reads what device `i` has; true on a power-button press.
    pub fn pressed(&mut self, i: usize) -> bool {
        let Some(f) = self.devices.get_mut(i) else {
            return false;
        };
        let mut buf = [0u8; EVENT_SIZE * 32];
        let mut seen = false;
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => seen |= has_power_press(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ty: u16, code: u16, value: i32) -> Vec<u8> {
        let mut e = vec![0u8; 16];
        e.extend_from_slice(&ty.to_ne_bytes());
        e.extend_from_slice(&code.to_ne_bytes());
        e.extend_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn only_a_power_key_press_counts() {
        let mut buf = event(0, 0, 0); // EV_SYN
        buf.extend(event(EV_KEY, KEY_POWER, 0)); // release
        buf.extend(event(EV_KEY, 30, 1)); // KEY_A
        assert!(!has_power_press(&buf));
        buf.extend(event(EV_KEY, KEY_POWER, 1));
        assert!(has_power_press(&buf));
        assert!(Buttons::open(Path::new("/nonexistent")).len() == 0);
    }
}
