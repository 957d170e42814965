//! Builds (or finds) the guest image and the base layer, printing progress and timings.
//!
//! cargo run --release -p udos-images --example build_image -- STATE_DIR INIT_BINARY [KERNEL]

use std::path::PathBuf;
use std::time::Instant;

use udos_images::{ImageOptions, ImageStore};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(state), Some(init)) = (args.next(), args.next()) else {
        eprintln!("usage: build_image STATE_DIR INIT_BINARY [KERNEL]");
        std::process::exit(2);
    };
    let mut opts = ImageOptions::new(PathBuf::from(init));
    opts.kernel = args.next().map(PathBuf::from);
    let store = ImageStore::new(&PathBuf::from(state));
    let t0 = Instant::now();
    let progress = |m: &str| eprintln!("[{:6.2}s] {m}", t0.elapsed().as_secs_f64());
    let t = Instant::now();
    let img = store.ensure_image(&opts, &progress)?;
    eprintln!("ensure_image: {:.3}s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let base = store.ensure_base_layer(&progress)?;
    eprintln!("ensure_base_layer: {:.3}s", t.elapsed().as_secs_f64());
    println!("image {}", img.id);
    println!("  vmlinux   {}", img.vmlinux.display());
    if let Some(bz) = &img.kernel_bzimage {
        println!("  bzImage   {}", bz.display());
    }
    println!(
        "  initramfs {} ({} KiB)",
        img.initramfs.display(),
        std::fs::metadata(&img.initramfs)?.len() / 1024
    );
    println!("  kernel    {} (pvh: {})", img.kernel_release, img.pvh);
    println!("base layer {}", base.id);
    println!("  erofs     {}", base.erofs.display());
    Ok(())
}
