//! Importing a base from an image tar the user already has: an OCI image layout
//! (`index.json`, `oci-layout`, `blobs/`), what `docker save` writes (`manifest.json`
//! naming the layers), or a plain root filesystem tar. Any of them may be gzip- or
//! zstd-compressed as a whole, and so may each layer.
//!
//! Everything in the file is untrusted. Its own members are only looked up by name
//! (never extracted); each layer goes through [`udos_layer::unpack`] (relative paths
//! only, no `..`, links never followed, bounded sizes and entries, no device nodes),
//! which also turns OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`) into overlay form, and
//! is then merged onto the tree with [`udos_layer::apply`] (whiteouts delete, opaque
//! directories replace), in the order the manifest gives. Blobs named by a digest are
//! checked against it, and each layer against the image config's `diff_ids` when the
//! config lists them.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use udos_layer::{ApplyError, SealError, UnpackError, UnpackLimits};

use skip_root::SkipRootEntry;

/// Bounds on an imported image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportLimits {
    /// Bounds on each layer (its `max_total_bytes` is also capped by what is left of
    /// [`ImportLimits::max_total_bytes`]).
    pub layer: UnpackLimits,
    /// The uncompressed size of all layers together.
    pub max_total_bytes: u64,
    /// Most layers.
    pub max_layers: usize,
    /// Largest JSON document read (index, manifest, config).
    pub max_json_bytes: u64,
    /// Most members of the image tar itself.
    pub max_archive_entries: u64,
}

impl Default for ImportLimits {
    /// 64 GiB in all, 256 layers, 16 MiB of JSON, 1 000 000 members.
    fn default() -> Self {
        ImportLimits {
            layer: UnpackLimits::default(),
            max_total_bytes: 64 << 30,
            max_layers: 256,
            max_json_bytes: 16 << 20,
            max_archive_entries: 1_000_000,
        }
    }
}

/// What kind of tar an import was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageLayout {
    /// An OCI image layout (`index.json`).
    Oci,
    /// `docker save` (`manifest.json` with `Layers`).
    DockerSave,
    /// A plain root filesystem tar.
    RootfsTar,
}

impl std::fmt::Display for ImageLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            ImageLayout::Oci => "OCI image layout",
            ImageLayout::DockerSave => "docker-save image",
            ImageLayout::RootfsTar => "plain rootfs tar",
        })
    }
}

/// What [`assemble_tree`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assembled {
    /// The tar's layout.
    pub layout: ImageLayout,
    /// Layers applied.
    pub layers: usize,
    /// Uncompressed bytes of all layers.
    pub bytes: u64,
    /// Whiteouts and opaque directories the layers applied.
    pub whiteouts: u64,
}

/// Why an import was refused.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Reading or writing a file failed.
    #[error("cannot {op} {path}: {cause}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        cause: io::Error,
    },
    /// The file is not a tar we can read.
    #[error("{path} is not a readable tar: {reason}")]
    Archive {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The image's index, manifest or config is wrong.
    #[error("{layout}: {reason}")]
    Layout {
        /// The layout being read.
        layout: ImageLayout,
        /// What is wrong.
        reason: String,
    },
    /// A blob or layer the manifest names is not in the tar.
    #[error("{layout}: {what} `{path}` is not in the archive")]
    Missing {
        /// The layout being read.
        layout: ImageLayout,
        /// `layer 2 of 3`, `manifest`, `config`.
        what: String,
        /// Its path in the archive.
        path: String,
    },
    /// A blob's content does not hash to its name.
    #[error(
        "{what} `{path}` does not match its digest (expected {expected}, got sha256:{actual})"
    )]
    Digest {
        /// `layer 2 of 3`, `manifest`, ...
        what: String,
        /// Its path in the archive.
        path: String,
        /// The digest it should have.
        expected: String,
        /// What it hashes to.
        actual: String,
    },
    /// A compression we do not read.
    #[error("{what} is {kind}-compressed, which udos does not read: decompress it first")]
    Compression {
        /// What.
        what: String,
        /// The compression.
        kind: &'static str,
    },
    /// A layer was refused (escaping path, device node, limit, ...).
    #[error("layer {index} of {count}: {cause}")]
    Layer {
        /// 1-based.
        index: usize,
        /// Layers in all.
        count: usize,
        /// Why.
        cause: UnpackError,
    },
    /// Applying a layer onto the tree failed.
    #[error("layer {index} of {count}: applying it: {cause}")]
    Apply {
        /// 1-based.
        index: usize,
        /// Layers in all.
        count: usize,
        /// Why.
        cause: ApplyError,
    },
    /// A limit of [`ImportLimits`] was exceeded.
    #[error("the image exceeds {limit}: {value} > {max}")]
    Limit {
        /// The limit's name.
        limit: &'static str,
        /// The value seen.
        value: u64,
        /// The limit.
        max: u64,
    },
    /// Hashing the assembled tree failed.
    #[error("hashing the imported tree: {0}")]
    TreeHash(SealError),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImportError {
    let path = path.to_path_buf();
    move |cause| ImportError::Io { op, path, cause }
}

/// Whole-stream compression, by magic number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
    Xz,
    Bzip2,
}

fn sniff(head: &[u8]) -> Compression {
    match head {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => Compression::Xz,
        [b'B', b'Z', b'h', ..] => Compression::Bzip2,
        _ => Compression::None,
    }
}

/// `src`, decompressed as its first bytes say.
fn decompressed<'a>(
    mut src: impl Read + 'a,
    what: &str,
) -> Result<Box<dyn Read + 'a>, ImportError> {
    let mut head = [0u8; 6];
    let mut got = 0;
    while got < head.len() {
        match src.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(ImportError::Archive {
                    path: PathBuf::from(what),
                    reason: e.to_string(),
                })
            }
        }
    }
    let whole = io::Cursor::new(head[..got].to_vec()).chain(src);
    match sniff(&head[..got]) {
        Compression::None => Ok(Box::new(whole)),
        Compression::Gzip => Ok(Box::new(flate2::read::MultiGzDecoder::new(whole))),
        Compression::Zstd => {
            let d = zstd::stream::read::Decoder::new(whole).map_err(|e| ImportError::Archive {
                path: PathBuf::from(what),
                reason: format!("zstd: {e}"),
            })?;
            Ok(Box::new(d))
        }
        Compression::Xz => Err(ImportError::Compression {
            what: what.to_string(),
            kind: "xz",
        }),
        Compression::Bzip2 => Err(ImportError::Compression {
            what: what.to_string(),
            kind: "bzip2",
        }),
    }
}

/// A member's bytes, read by position (no shared file offset).
struct At<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends inside a member",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// A member of the image tar: where its bytes are.
#[derive(Clone, Copy, Debug)]
struct Span {
    offset: u64,
    size: u64,
}

/// The image tar's members by normalized path: regular files, and links (symbolic or
/// hard) to other members, which `docker save` writes for a layer two images share.
struct ArchiveIndex {
    files: HashMap<String, Span>,
    links: HashMap<String, String>,
}

/// A member path in canonical form (`a/b`), or `None` if it leaves the archive.
fn normalize(path: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    (!out.is_empty()).then(|| out.join("/"))
}

impl ArchiveIndex {
    fn read(file: &File, path: &Path, limits: &ImportLimits) -> Result<ArchiveIndex, ImportError> {
        let bad = |e: io::Error| ImportError::Archive {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let mut ar = tar::Archive::new(file);
        let mut idx = ArchiveIndex {
            files: HashMap::new(),
            links: HashMap::new(),
        };
        let mut count = 0u64;
        for entry in ar.entries_with_seek().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            count += 1;
            if count > limits.max_archive_entries {
                return Err(ImportError::Limit {
                    limit: "max_archive_entries",
                    value: count,
                    max: limits.max_archive_entries,
                });
            }
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let Some(name) = normalize(&name) else {
                continue;
            };
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    idx.links.remove(&name);
                    idx.files.insert(
                        name,
                        Span {
                            offset: entry.raw_file_position(),
                            size: entry.size(),
                        },
                    );
                }
                kind @ (tar::EntryType::Symlink | tar::EntryType::Link) => {
                    let target = entry
                        .link_name_bytes()
                        .map(|l| String::from_utf8_lossy(&l).into_owned())
                        .unwrap_or_default();
                    // A symlink is relative to its directory, a hardlink to the root.
                    let joined = match (kind, name.rsplit_once('/')) {
                        (tar::EntryType::Symlink, Some((dir, _))) => format!("{dir}/{target}"),
                        _ => target,
                    };
                    if let Some(t) = normalize(&joined) {
                        idx.files.remove(&name);
                        idx.links.insert(name, t);
                    }
                }
                _ => {}
            }
        }
        Ok(idx)
    }

    /// The member at `path`, following links (at most 8).
    fn find(&self, path: &str) -> Option<Span> {
        let mut cur = normalize(path)?;
        for _ in 0..=8 {
            if let Some(s) = self.files.get(&cur) {
                return Some(*s);
            }
            cur = self.links.get(&cur)?.clone();
        }
        None
    }

    fn has(&self, path: &str) -> bool {
        self.find(path).is_some()
    }
}

/// The image tar, opened and indexed.
struct Archive<'a> {
    file: File,
    index: ArchiveIndex,
    layout: ImageLayout,
    limits: &'a ImportLimits,
}

/// `sha256:<64 hex>` to its hex, or why not.
fn sha256_of_digest(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()))
    .then_some(hex)
}

impl Archive<'_> {
    fn reader(&self, span: Span) -> At<'_> {
        At {
            file: &self.file,
            pos: span.offset,
            end: span.offset + span.size,
        }
    }

    fn member(&self, what: &str, path: &str) -> Result<Span, ImportError> {
        self.index.find(path).ok_or_else(|| ImportError::Missing {
            layout: self.layout,
            what: what.to_string(),
            path: path.to_string(),
        })
    }

    /// Checks a member against `expected` (`sha256:...`).
    fn verify(&self, what: &str, path: &str, expected: &str) -> Result<(), ImportError> {
        let span = self.member(what, path)?;
        let Some(want) = sha256_of_digest(expected) else {
            return Err(self.layout_err(format!("{what} has an unsupported digest {expected:?}")));
        };
        let mut h = Sha256::new();
        io::copy(&mut self.reader(span), &mut HashWriter(&mut h))
            .map_err(io_err("read", Path::new(path)))?;
        let actual = hex::encode(h.finalize());
        if actual != want {
            return Err(ImportError::Digest {
                what: what.to_string(),
                path: path.to_string(),
                expected: expected.to_string(),
                actual,
            });
        }
        Ok(())
    }

    /// A JSON member, bounded.
    fn json<T: for<'de> Deserialize<'de>>(&self, what: &str, path: &str) -> Result<T, ImportError> {
        let span = self.member(what, path)?;
        if span.size > self.limits.max_json_bytes {
            return Err(ImportError::Limit {
                limit: "max_json_bytes",
                value: span.size,
                max: self.limits.max_json_bytes,
            });
        }
        let mut buf = Vec::new();
        self.reader(span)
            .read_to_end(&mut buf)
            .map_err(io_err("read", Path::new(path)))?;
        serde_json::from_slice(&buf).map_err(|e| self.layout_err(format!("{what} `{path}`: {e}")))
    }

    /// A blob named by its digest: its path, checked.
    fn blob(&self, what: &str, digest: &str) -> Result<String, ImportError> {
        let Some(hex) = sha256_of_digest(digest) else {
            return Err(self.layout_err(format!("{what} has an unsupported digest {digest:?}")));
        };
        let path = format!("blobs/sha256/{hex}");
        self.verify(what, &path, digest)?;
        Ok(path)
    }

    fn layout_err(&self, reason: String) -> ImportError {
        ImportError::Layout {
            layout: self.layout,
            reason,
        }
    }
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Deserialize)]
struct DockerManifestEntry {
    #[serde(rename = "Config", default)]
    config: Option<String>,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// An OCI index or manifest (which one is told by its fields).
#[derive(Deserialize)]
struct OciDocument {
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
}

#[derive(Deserialize, Default)]
struct ImageConfig {
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// A layer to apply: its member path and, when the config says, the digest of its
/// uncompressed tar.
struct LayerRef {
    path: String,
    diff_id: Option<String>,
}

/// The image's own architecture name for this host.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Which manifest of an index to use: the one for linux on this host's architecture,
/// else the only one there is (attestations are not images).
fn pick_manifest(
    manifests: &[Descriptor],
    layout: ImageLayout,
) -> Result<&Descriptor, ImportError> {
    let images: Vec<&Descriptor> = manifests
        .iter()
        .filter(|d| {
            d.annotations
                .get("vnd.docker.reference.type")
                .map(String::as_str)
                != Some("attestation-manifest")
        })
        .collect();
    let native = images.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == host_arch())
    });
    match (native, images.as_slice()) {
        (Some(d), _) => Ok(d),
        (None, [only]) => Ok(only),
        (None, []) => Err(ImportError::Layout {
            layout,
            reason: "the index lists no image".into(),
        }),
        (None, several) => Err(ImportError::Layout {
            layout,
            reason: format!(
                "the index lists {} images and none is for linux/{}: {}",
                several.len(),
                host_arch(),
                several
                    .iter()
                    .map(|d| d
                        .platform
                        .as_ref()
                        .map(|p| format!("{}/{}", p.os, p.architecture))
                        .unwrap_or_else(|| "(no platform)".into()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

fn diff_ids(
    ar: &Archive<'_>,
    config_path: Option<&str>,
    layers: usize,
) -> Result<Vec<Option<String>>, ImportError> {
    let config: ImageConfig = match config_path {
        Some(p) if ar.index.has(p) => ar.json("config", p)?,
        _ => ImageConfig::default(),
    };
    let ids = config.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    if ids.is_empty() {
        return Ok(vec![None; layers]);
    }
    if ids.len() != layers {
        return Err(ar.layout_err(format!(
            "the config lists {} layer digests (diff_ids) for {layers} layers",
            ids.len()
        )));
    }
    Ok(ids.into_iter().map(Some).collect())
}

fn docker_layers(ar: &Archive<'_>) -> Result<Vec<LayerRef>, ImportError> {
    let entries: Vec<DockerManifestEntry> = ar.json("manifest", "manifest.json")?;
    let entry = match entries.as_slice() {
        [only] => only,
        [] => return Err(ar.layout_err("manifest.json lists no image".into())),
        several => {
            return Err(ar.layout_err(format!(
                "manifest.json lists {} images ({}): save one image per tar",
                several.len(),
                several
                    .iter()
                    .flat_map(|e| e.repo_tags.clone().unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    };
    let count = entry.layers.len();
    let ids = diff_ids(ar, entry.config.as_deref(), count)?;
    let mut out = Vec::with_capacity(count);
    for (i, (path, diff_id)) in entry.layers.iter().zip(ids).enumerate() {
        let what = format!("layer {} of {count}", i + 1);
        ar.member(&what, path)?;
        // Newer docker names layers by digest: check them.
        if let Some(hex) = path.strip_prefix("blobs/sha256/") {
            ar.verify(&what, path, &format!("sha256:{hex}"))?;
        }
        out.push(LayerRef {
            path: path.clone(),
            diff_id,
        });
    }
    Ok(out)
}

fn oci_layers(ar: &Archive<'_>) -> Result<Vec<LayerRef>, ImportError> {
    let mut doc: OciDocument = ar.json("index", "index.json")?;
    // An index may point at another index (multi-platform images): follow it.
    for _ in 0..4 {
        let Some(manifests) = &doc.manifests else {
            break;
        };
        let chosen = pick_manifest(manifests, ar.layout)?;
        let what = if chosen.media_type.contains("index") || chosen.media_type.contains("list") {
            "index"
        } else {
            "manifest"
        };
        let path = ar.blob(what, &chosen.digest)?;
        doc = ar.json(what, &path)?;
    }
    let Some(layers) = doc.layers else {
        return Err(ar.layout_err("no image manifest with layers found".into()));
    };
    let count = layers.len();
    let config_path = match &doc.config {
        Some(c) => Some(ar.blob("config", &c.digest)?),
        None => None,
    };
    let ids = diff_ids(ar, config_path.as_deref(), count)?;
    let mut out = Vec::with_capacity(count);
    for (i, (d, diff_id)) in layers.iter().zip(ids).enumerate() {
        let path = ar.blob(&format!("layer {} of {count}", i + 1), &d.digest)?;
        out.push(LayerRef { path, diff_id });
    }
    Ok(out)
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// One layer to apply: where its bytes come from and what it should hash to.
struct LayerInput<'a, R> {
    src: R,
    /// For messages: its path in the image tar, or the file.
    what: &'a str,
    /// `sha256:...` of its uncompressed tar, from the image config.
    diff_id: Option<&'a str>,
    /// 1-based index and the number of layers.
    index: usize,
    count: usize,
}

/// Unpacks one (possibly compressed) layer stream into `scratch` and applies it onto
/// `tree`.
fn apply_layer<R: Read>(
    layer: LayerInput<'_, R>,
    scratch: &Path,
    tree: &Path,
    limits: &UnpackLimits,
    done: &mut Assembled,
) -> Result<(), ImportError> {
    let (index, count) = (layer.index, layer.count);
    let mut hashing = Hashing {
        inner: decompressed(layer.src, layer.what)?,
        hasher: Sha256::new(),
    };
    let dir = scratch.join(format!("layer-{index}"));
    std::fs::create_dir(&dir).map_err(io_err("create", &dir))?;
    // unpack reads its stream to the end, so `hashing` sees the whole layer tar.
    let summary =
        udos_layer::unpack(SkipRootEntry::new(&mut hashing), &dir, limits).map_err(|cause| {
            ImportError::Layer {
                index,
                count,
                cause,
            }
        })?;
    if let Some(want) = layer.diff_id {
        let actual = hex::encode(std::mem::take(&mut hashing.hasher).finalize());
        if sha256_of_digest(want) != Some(actual.as_str()) {
            return Err(ImportError::Digest {
                what: format!("layer {index} of {count}"),
                path: layer.what.to_string(),
                expected: want.to_string(),
                actual,
            });
        }
    }
    let stats = udos_layer::apply(&dir, tree).map_err(|cause| ImportError::Apply {
        index,
        count,
        cause,
    })?;
    std::fs::remove_dir_all(&dir).map_err(io_err("remove", &dir))?;
    done.layers += 1;
    done.bytes += summary.bytes;
    done.whiteouts += stats.whiteouts + stats.opaque_dirs;
    Ok(())
}

/// The tar at `file` decompressed into `scratch` when it is compressed as a whole
/// (an image layout needs random access), else the file itself.
fn plain_tar(file: &Path, scratch: &Path, limits: &ImportLimits) -> Result<PathBuf, ImportError> {
    let mut f = File::open(file).map_err(io_err("open", file))?;
    let mut head = [0u8; 6];
    let n = f.read(&mut head).map_err(io_err("read", file))?;
    if sniff(&head[..n]) == Compression::None {
        return Ok(file.to_path_buf());
    }
    let out = scratch.join("image.tar");
    let src = decompressed(
        File::open(file).map_err(io_err("open", file))?,
        &file.display().to_string(),
    )?;
    let mut dst = File::create(&out).map_err(io_err("create", &out))?;
    let max = limits.max_total_bytes;
    let copied = io::copy(&mut src.take(max.saturating_add(1)), &mut dst)
        .map_err(io_err("decompress", file))?;
    if copied > max {
        return Err(ImportError::Limit {
            limit: "max_total_bytes",
            value: copied,
            max,
        });
    }
    Ok(out)
}

/// Which layout the indexed tar has: `docker save`'s `manifest.json` (with `Layers`),
/// an OCI `index.json` with its `oci-layout`, else a plain root filesystem.
fn detect(ar: &Archive<'_>) -> ImageLayout {
    if ar.index.has("manifest.json")
        && ar
            .json::<Vec<DockerManifestEntry>>("manifest", "manifest.json")
            .is_ok()
    {
        return ImageLayout::DockerSave;
    }
    if ar.index.has("index.json") && ar.index.has("oci-layout") {
        return ImageLayout::Oci;
    }
    ImageLayout::RootfsTar
}

/// Builds the root an image tar describes into `tree` (an existing, empty directory),
/// using `scratch` (an existing directory, emptied of what it adds) for the layers.
/// On error, `tree` holds part of the result: discard it.
pub fn assemble_tree(
    file: &Path,
    scratch: &Path,
    tree: &Path,
    limits: &ImportLimits,
    progress: &dyn Fn(&str),
) -> Result<Assembled, ImportError> {
    let tar_path = plain_tar(file, scratch, limits)?;
    let f = File::open(&tar_path).map_err(io_err("open", &tar_path))?;
    let index = ArchiveIndex::read(&f, file, limits)?;
    let mut ar = Archive {
        file: f,
        index,
        layout: ImageLayout::RootfsTar,
        limits,
    };
    ar.layout = detect(&ar);
    let mut done = Assembled {
        layout: ar.layout,
        layers: 0,
        bytes: 0,
        whiteouts: 0,
    };
    let layers = match ar.layout {
        ImageLayout::DockerSave => docker_layers(&ar)?,
        ImageLayout::Oci => oci_layers(&ar)?,
        ImageLayout::RootfsTar => {
            progress(&format!("{}: a plain rootfs tar", file.display()));
            let src = File::open(&tar_path).map_err(io_err("open", &tar_path))?;
            let what = file.display().to_string();
            let layer = LayerInput {
                src,
                what: &what,
                diff_id: None,
                index: 1,
                count: 1,
            };
            apply_layer(layer, scratch, tree, &layer_limits(limits, 0), &mut done)?;
            return Ok(done);
        }
    };
    if layers.len() > limits.max_layers {
        return Err(ImportError::Limit {
            limit: "max_layers",
            value: layers.len() as u64,
            max: limits.max_layers as u64,
        });
    }
    let count = layers.len();
    progress(&format!(
        "{}: {} with {count} layers",
        file.display(),
        ar.layout
    ));
    for (i, l) in layers.iter().enumerate() {
        let span = ar.member("layer", &l.path)?;
        progress(&format!(
            "applying layer {} of {count} ({} bytes)",
            i + 1,
            span.size
        ));
        let layer = LayerInput {
            src: ar.reader(span),
            what: &l.path,
            diff_id: l.diff_id.as_deref(),
            index: i + 1,
            count,
        };
        apply_layer(
            layer,
            scratch,
            tree,
            &layer_limits(limits, done.bytes),
            &mut done,
        )?;
    }
    Ok(done)
}

/// A layer's limits, its total capped by what the image has left.
fn layer_limits(limits: &ImportLimits, used: u64) -> UnpackLimits {
    UnpackLimits {
        max_total_bytes: limits
            .layer
            .max_total_bytes
            .min(limits.max_total_bytes.saturating_sub(used)),
        ..limits.layer.clone()
    }
}

/// The tree's content address: the SHA-256 of its layer tar (as PID 1 would seal it:
/// names sorted, modes, owners, mtimes, links).
pub fn tree_id(tree: &Path) -> Result<String, ImportError> {
    let mut h = Sha256::new();
    udos_layer::write_layer_tar(tree, HashWriter(&mut h), &udos_layer::SealLimits::default())
        .map_err(ImportError::TreeHash)?;
    Ok(hex::encode(h.finalize()))
}

/// Names the built-in bases have; an import cannot take them.
pub const RESERVED_BASE_NAMES: &[&str] = &["default", "minimal", "debian"];

/// Why a base name is refused, if it is.
pub fn check_base_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        });
    if !ok {
        return Err(format!(
            "invalid base name {name:?}: use 1 to 64 of a-z, 0-9, `.`, `_`, `-`, starting with a letter or digit"
        ));
    }
    if RESERVED_BASE_NAMES.contains(&name) {
        return Err(format!(
            "`{name}` is a built-in base: give another name with --name"
        ));
    }
    Ok(())
}

/// The name an import gets by default: the file's name without `.tar` (and a
/// compression suffix), lowercased, other characters turned into `-`.
pub fn default_base_name(file: &Path) -> String {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let mut stem = name.as_str();
    for suffix in [".gz", ".tgz", ".zst", ".tzst", ".tar", ".oci"] {
        stem = stem.strip_suffix(suffix).unwrap_or(stem);
    }
    stem.chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect::<String>()
        .trim_start_matches(['.', '_', '-'])
        .to_string()
}

mod skip_root;
#[cfg(test)]
mod tests;
