//! The end of every boot: no process left, output sealed, filesystems down, power off.

use std::path::Path;
use std::time::Duration;

use nix::sys::reboot::{reboot, RebootMode};
use nix::unistd::sync;
use udos_layer::boot::DeviceRef;
use udos_layer::StepRecord;

use crate::console::{self, info, warning};
use crate::mounts::Mounts;
use crate::reads::Watch;
use crate::reaper::{terminate_all, Reaper};
use crate::report;

/// `sync`, then `reboot(RB_POWER_OFF)`. Never returns: if the kernel refuses, PID 1
/// sleeps forever (exiting would panic the kernel and lose the console).
///
/// In a child PID namespace (the test harness) the kernel turns this reboot into the
/// death of the namespace's init by SIGINT, which is how the harness sees "powered off".
pub fn power_off() -> ! {
    sync();
    info!("power off");
    let Err(e) = reboot(RebootMode::RB_POWER_OFF);
    warning!("reboot(RB_POWER_OFF): {e}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Prints the outcome line: the last one before the power-off notice, for humans.
pub fn result_line(status: &str) {
    console::line(&format!("UDOS-RESULT {status}"));
}

/// What shutdown needs from the rest of PID 1.
pub struct Shutdown<'a> {
    pub reaper: &'a mut Reaper,
    pub mounts: &'a mut Mounts,
    pub grace: Duration,
    pub output: Option<&'a DeviceRef>,
    pub upper: Option<&'a Path>,
    pub device_timeout: Duration,
    /// The watch on what the step opens: it also sees processes act left behind, so it
    /// is read to its end only once they are gone.
    pub reads: Option<Watch>,
}

impl Shutdown<'_> {
    /// SIGTERM every process, wait up to the grace period, SIGKILL the rest, reap; seal
    /// the output; sync; unmount in reverse order. Power-off is left to the caller.
    pub fn run(self, mut record: StepRecord) {
        info!("shutdown: SIGTERM to all processes");
        terminate_all(self.reaper, self.grace);
        if self.reaper.orphans > 0 {
            info!("reaped {} orphaned process(es)", self.reaper.orphans);
        }
        if let Some(watch) = self.reads {
            record.reads = Some(watch.finish());
        }
        let sealed = report::seal(self.output, self.upper, &mut record, self.device_timeout);
        sync();
        self.mounts.unmount_all();
        sync();
        let status = if sealed {
            report::status_word(record.status)
        } else {
            "error"
        };
        result_line(status);
    }
}
