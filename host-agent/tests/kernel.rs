//! udos's own kernel: `udos kernel build` compiles it from Debian's linux-source-6.1
//! (once: then it is cached), images pick it up by themselves, and a workflow runs on
//! it under QEMU/TCG with no module loaded.
//!
//! The build takes about 16 minutes on 2 busy cores the first time. It happens in a state
//! dir of its own (`$UDOS_KERNEL_TEST_STATE`, default under the cargo target dir, kept
//! between runs), so the other VM tests keep booting Debian's cloud kernel.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn state_dir() -> PathBuf {
    std::env::var_os("UDOS_KERNEL_TEST_STATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("udos-kernel-state"))
}

fn udos(args: &[&str]) -> Output {
    common::udos_in(Command::new(env!("CARGO_BIN_EXE_udos")), &state_dir(), args)
}

fn ok_json(args: &[&str]) -> Value {
    let out = udos(args);
    assert!(out.status.success(), "udos {} failed", args.join(" "));
    common::json(&out)
}

fn image_json(image_id: &str) -> Value {
    let path = state_dir().join("images").join(image_id).join("image.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

const WORKFLOW: &str = r#"
on: push
jobs:
  kernel:
    runs-on: ubuntu-latest
    steps:
      - id: probe
        run: |
          echo "release=$(uname -r)" >> "$GITHUB_OUTPUT"
          if [ -e /proc/modules ]; then echo "modules=yes"; else echo "modules=none"; fi >> "$GITHUB_OUTPUT"
          echo "root=$(grep ' / ' /proc/mounts | cut -d' ' -f3 | tr '\n' ' ')" >> "$GITHUB_OUTPUT"
          echo "filesystems=$(grep -o -w -e erofs -e overlay -e ext4 /proc/filesystems | sort | tr '\n' ' ')" >> "$GITHUB_OUTPUT"
          if [ -c /dev/vsock ]; then echo "vsock=yes" >> "$GITHUB_OUTPUT"; fi
          if [ -e /sys/class/net/eth0 ]; then echo "nic=yes" >> "$GITHUB_OUTPUT"; fi
          cat input.txt > made-on-our-kernel.txt
      - id: next
        run: echo "read=$(cat made-on-our-kernel.txt)" >> "$GITHUB_OUTPUT"
"#;

fn output<'a>(step: &'a Value, key: &str) -> &'a str {
    step["outputs"][key].as_str().unwrap_or_default()
}

#[test]
fn the_built_kernel_is_cached_picked_up_by_images_and_runs_a_workflow() {
    // 1. Build (or find) the kernel.
    let k = ok_json(&["kernel", "build", "--json"]);
    let vmlinux = k["vmlinux"].as_str().unwrap().to_string();
    let release = k["release"].as_str().unwrap().to_string();
    eprintln!(
        "FIGURES kernel {} {release}: {} ({} bytes), timings {}",
        k["id"], k["status"], k["vmlinux_bytes"], k["timings_ms"]
    );
    assert!(Path::new(&vmlinux).is_file(), "{vmlinux}");
    assert!(release.ends_with("-udos"), "{release}");
    assert_eq!(k["pvh"], true);

    // 2. The same recipe again is the same kernel, from the cache.
    let again = udos(&["kernel", "build", "--json"]);
    assert!(again.status.success());
    let again_json = common::json(&again);
    assert_eq!(again_json["id"], k["id"]);
    assert_eq!(again_json["status"], "cached");
    assert!(
        !String::from_utf8_lossy(&again.stderr).contains("compiling"),
        "a cached kernel is not compiled again"
    );

    // 3. The image boots it without being told, with no modules; naming the file with
    //    --kernel gives the very same image.
    let image = ok_json(&["image", "build", "--json"]);
    let image_id = image["image_id"].as_str().unwrap();
    assert_eq!(image["kernel_release"].as_str(), Some(release.as_str()));
    let manifest = image_json(image_id);
    assert_eq!(
        manifest["kernel_origin"].as_str(),
        Some(format!("udos-kernel:{}", k["id"].as_str().unwrap()).as_str())
    );
    assert_eq!(manifest["modules"], serde_json::json!([]));
    let named = ok_json(&["image", "build", "--kernel", &vmlinux, "--json"]);
    assert_eq!(named["image_id"].as_str(), Some(image_id));

    // 4. A workflow on it, under QEMU (TCG here): every built-in driver at work
    //    (virtio-mmio disks, erofs lowers, ext4 upper, overlay root, the NIC, vsock).
    let (_dir, wf) = common::repo(WORKFLOW, &[("input.txt", "from the workspace\n")]);
    let wf = wf.to_str().unwrap();
    let report = ok_json(&["run", "--json", "--no-cache", "--hypervisor", "qemu", wf]);
    assert_eq!(report["status"], "success", "{report:#}");
    assert_eq!(report["image_id"].as_str(), Some(image_id));
    let steps = report["jobs"][0]["steps"].as_array().unwrap();
    let probe = &steps[0];
    assert_eq!(output(probe, "release"), release);
    assert_eq!(output(probe, "modules"), "none");
    assert!(output(probe, "root").contains("overlay"), "{probe:#}");
    assert_eq!(output(probe, "filesystems").trim(), "erofs ext4 overlay");
    assert_eq!(output(probe, "vsock"), "yes");
    assert_eq!(output(probe, "nic"), "yes");
    assert_eq!(output(&steps[1], "read"), "from the workspace");
    let console = std::fs::read_to_string(probe["console_log"].as_str().unwrap()).unwrap();
    assert!(
        !console.contains("module(s) in"),
        "PID 1 loaded modules: {console}"
    );
    assert!(
        console.contains("fanotify"),
        "PID 1 records the step's reads on this kernel: {console}"
    );
    eprintln!(
        "FIGURES steps on udos's kernel: {} / {}",
        probe["phases_ms"], steps[1]["phases_ms"]
    );
}
