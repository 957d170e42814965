//! udos-images: builds the guest image every step VM boots (kernel + initramfs carrying
//! `udos-init` as `/init`, `act` and the kernel modules), the default base layer (an erofs
//! root of busybox-static and bash-static), the Debian base (mmdebstrap), bases imported
//! from image tars, erofs layers in general and the sparse ext4 upper disk of each VM.
//! Everything is content-addressed under `<state_dir>/images`; see `images/README.md`.

pub mod act;
pub mod apt;
pub mod base;
pub mod bases;
pub mod bounded;
pub mod debian;
pub mod erofs;
pub mod import;
pub mod initramfs;
pub mod kernel;
pub mod store;
mod util;

pub use bases::{BaseKind, BaseMeta, NamedBase};
pub use debian::DebianOptions;
pub use erofs::{make_upper_disk, mkfs_erofs, mkfs_erofs_with, upper_template_path, ErofsOptions};
pub use store::{
    base_cmdline, BaseLayer, Image, ImageOptions, ImageStore, BASE_CMDLINE, DEFAULT_ACT_VERSION,
    IMAGE_FORMAT,
};
