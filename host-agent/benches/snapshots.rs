//! Layer snapshots, old path against new, in the same run: N small layers written by
//! one `restic backup` each (the CLI engine) and through one long-lived repository
//! handle (rustic_core). Prints the per-layer time, the one-off costs (repository
//! creation and key derivation, which the new path pays on the snapshot thread while
//! the first VM boots) and the end-of-run wait for the last layer, which is on a run's
//! critical path. Figures, not assertions: run `cargo bench -p udos-host-agent --bench
//! snapshots`.

use std::path::Path;
use std::time::{Duration, Instant};

use udos_host_agent::repository::{Engine, LayerRepository};
use udos_host_agent::restic::{Password, Repo, Tags};

const LAYERS: usize = 10;
/// What the issue asks of the host per step on the critical path (initialised repository).
const TARGET_MS: f64 = 100.0;

fn small_layer(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(dir.join("etc/step"), format!("step {n}\n")).unwrap();
    std::fs::create_dir_all(dir.join("usr/lib")).unwrap();
    let blob: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8 ^ n as u8)
        .collect();
    std::fs::write(dir.join("usr/lib/lib.so"), blob).unwrap();
}

fn tags(n: usize) -> Tags {
    Tags::default()
        .with("udos", "layer")
        .with("run", 1)
        .with("step", n)
        .with("layer", format!("bench{n}"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One path's figures.
struct Figures {
    /// Creating the repository and deriving the key (the CLI: `restic init`).
    setup: f64,
    per_layer: Vec<f64>,
}

impl Figures {
    fn print(&self, name: &str) {
        let layers: Vec<String> = self.per_layer.iter().map(|t| format!("{t:.0}")).collect();
        println!(
            "{name:>6}: setup {:>5.0} ms | per layer median {:>5.0} ms, min {:>5.0} | end-of-run wait (last layer) {:>5.0} ms | layers [{}]",
            self.setup,
            median(self.per_layer.clone()),
            self.per_layer.iter().copied().fold(f64::MAX, f64::min),
            self.per_layer.last().copied().unwrap_or_default(),
            layers.join(" ")
        );
    }
}

fn cli(root: &Path) -> Figures {
    let repo = Repo {
        engine: Engine::Cli,
        ..Repo::new(
            root.join("cli-repo").display().to_string(),
            Password::Env("bench".into()),
        )
    };
    let t = Instant::now();
    repo.ensure_initialized().unwrap();
    let setup = ms(t.elapsed());
    let per_layer = (0..LAYERS)
        .map(|n| {
            let layer = root.join(format!("layer{n}"));
            let t = Instant::now();
            repo.backup_full(&layer, &tags(n)).unwrap();
            ms(t.elapsed())
        })
        .collect();
    Figures { setup, per_layer }
}

fn rustic(root: &Path) -> Figures {
    let t = Instant::now();
    let handle =
        LayerRepository::open(&root.join("rustic-repo"), &Password::Env("bench".into())).unwrap();
    let setup = ms(t.elapsed());
    let per_layer = (0..LAYERS)
        .map(|n| {
            let layer = root.join(format!("layer{n}"));
            let t = Instant::now();
            handle.backup(&layer, &tags(n)).unwrap();
            ms(t.elapsed())
        })
        .collect();
    Figures { setup, per_layer }
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    for n in 0..LAYERS {
        small_layer(&tmp.path().join(format!("layer{n}")), n);
    }
    println!("{LAYERS} small layers (2 files, 64 KiB), fresh repositories, same run:");
    let old = cli(tmp.path());
    old.print("cli");
    let new = rustic(tmp.path());
    new.print("rustic");
    let last = |f: &Figures| f.per_layer.last().copied().unwrap_or_default();
    println!(
        "per layer: cli/rustic = {:.1}x | end-of-run wait: {:.0} ms -> {:.0} ms ({:.1}x; target: host overhead per step <= {TARGET_MS:.0} ms) | key derivation on the critical path: cli every layer, rustic never (setup {:.0} ms on the snapshot thread)",
        median(old.per_layer.clone()) / median(new.per_layer.clone()),
        last(&old),
        last(&new),
        last(&old) / last(&new),
        new.setup
    );
}
