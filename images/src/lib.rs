//! udos-images: builds the guest image every step VM boots (kernel + initramfs carrying
//! `udos-init` as `/init`, `act` and the kernel modules), the default base layer (an erofs
//! root of busybox-static and bash-static), udos's own kernel (`build_kernel`), the Debian
//! base (mmdebstrap), bases imported from image tars, erofs layers in general and the
//! sparse ext4 upper disk of each VM.
//! Everything is content-addressed under `<state_dir>/images`; see `images/README.md`.

pub mod act;
pub mod apt;
pub mod base;
pub mod bases;
pub mod bounded;
pub mod build_kernel;
pub mod debian;
pub mod erofs;
pub mod import;
pub mod initramfs;
pub mod kernel;
pub mod store;
pub mod streamed;
mod util;

pub use bases::{BaseKind, BaseMeta, NamedBase};
pub use build_kernel::{
    BuiltKernel, KernelBuildOptions, KernelRecipe, KernelStatus, OwnKernel, CONFIG_FRAGMENT,
};
pub use debian::DebianOptions;
pub use erofs::{make_upper_disk, mkfs_erofs, mkfs_erofs_with, upper_template_path, ErofsOptions};
pub use store::{
    base_cmdline, BaseLayer, Image, ImageOptions, ImageStore, BASE_CMDLINE, DEFAULT_ACT_VERSION,
    IMAGE_FORMAT,
};
