//! The host's side of the output device: verify and read a sealed output (untrusted).
//!
//! [`read_output`] checks the header (magic, version, flags, `header_sha256`, layout,
//! lengths against [`ReadLimits`] and the file size), then reads and verifies the step
//! record. The layer itself is only read on demand: [`SealedOutput::layer_reader`]
//! gives a reader bounded to the layer bytes, [`SealedOutput::unpack_layer`] unpacks it
//! and checks its SHA-256 against the header, [`SealedOutput::verify_layer`] only
//! checks the SHA-256.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::format::{
    align_up, HeaderDecodeError, SealedHeader, FORMAT_VERSION, HEADER_SIZE, LAYER_OFFSET,
};
use crate::record::{StepRecord, RECORD_VERSION};
use crate::unpack::{unpack, UnpackError, UnpackLimits, UnpackSummary};

/// Bounds on what the host accepts from a sealed output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadLimits {
    /// Largest `layer_len` accepted.
    pub max_layer_len: u64,
    /// Largest `record_len` accepted (the record is read into memory).
    pub max_record_len: u64,
}

impl Default for ReadLimits {
    /// 64 GiB of layer, 16 MiB of record.
    fn default() -> Self {
        Self {
            max_layer_len: 64 << 30,
            max_record_len: 16 << 20,
        }
    }
}

/// A verified sealed output: the header and the record checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedOutput {
    /// The step record (checksum and version verified).
    pub record: StepRecord,
    /// The layer id from the header: SHA-256 of the layer tar, 64 lowercase hex digits.
    /// Not verified until the layer is read ([`Self::unpack_layer`],
    /// [`Self::verify_layer`]).
    pub layer_id: String,
    /// Offset of the layer tar on the device (4096).
    pub layer_offset: u64,
    /// Length of the layer tar (`0`: no layer).
    pub layer_len: u64,
    /// Offset of the record JSON.
    pub record_offset: u64,
    /// Length of the record JSON.
    pub record_len: u64,
}

/// Why a sealed output was refused. [`OutputError::means_not_sealed`] tells the
/// "guest did not seal" cases apart from a damaged or hostile one.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The file could not be opened.
    #[error("cannot open output device {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Reading the file failed.
    #[error("cannot {op} output device {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The header block is all zeros: the guest never sealed (crash, hang, power loss).
    #[error("guest did not seal: the header of output device {path} is all zeros")]
    NotSealed {
        /// The file.
        path: PathBuf,
    },
    /// The file is smaller than the 4096-byte header.
    #[error("output device {path} is {size} bytes, smaller than the 4096-byte header")]
    TooSmall {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The magic is not `UDOSOUT1`.
    #[error("output device header has bad magic {found:?} (expected \"UDOSOUT1\")")]
    BadMagic {
        /// The first 8 bytes, escaped.
        found: String,
    },
    /// The header checksum does not match.
    #[error("output device header checksum mismatch: stored {stored}, computed {computed}")]
    HeaderChecksum {
        /// Checksum stored in the header (hex).
        stored: String,
        /// Checksum of bytes 0..112 (hex).
        computed: String,
    },
    /// The format version is not one this crate reads.
    #[error("output device has format version {version}; this host reads version 1")]
    UnsupportedVersion {
        /// The version found.
        version: u32,
    },
    /// Reserved flags are set.
    #[error("output device header has reserved flags set: {flags:#x}")]
    UnsupportedFlags {
        /// The flags found.
        flags: u32,
    },
    /// Offsets or lengths do not follow the layout of docs/layer-format.md.
    #[error("output device header has a bad layout: {reason}")]
    BadLayout {
        /// What is wrong.
        reason: String,
    },
    /// `layer_len` is over [`ReadLimits::max_layer_len`].
    #[error("layer_len {len} is over the limit max_layer_len = {max}")]
    LayerTooLarge {
        /// `layer_len` from the header.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// `record_len` is over [`ReadLimits::max_record_len`].
    #[error("record_len {len} is over the limit max_record_len = {max}")]
    RecordTooLarge {
        /// `record_len` from the header.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The layer or the record extends past the end of the file (a truncated device).
    #[error("the {what} at offset {offset}, {len} bytes, extends beyond the end of the output device ({size} bytes): truncated?")]
    OutOfBounds {
        /// `layer` or `record`.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The file size.
        size: u64,
    },
    /// The record bytes do not match `record_sha256`.
    #[error(
        "step record checksum mismatch: header says {expected}, record bytes hash to {actual}"
    )]
    RecordChecksum {
        /// From the header (hex).
        expected: String,
        /// Of the bytes read (hex).
        actual: String,
    },
    /// The record is not valid step-record JSON.
    #[error("step record is not valid JSON: {source}")]
    RecordJson {
        /// The parse error.
        source: serde_json::Error,
    },
    /// The record has a version this crate does not read.
    #[error("step record has version {version}; this host reads version 1")]
    RecordVersion {
        /// The version found.
        version: u32,
    },
    /// The layer bytes do not match `layer_sha256`. Whatever was unpacked from them
    /// must be discarded.
    #[error("layer checksum mismatch: header says {expected}, layer bytes hash to {actual}")]
    LayerChecksum {
        /// The layer id from the header.
        expected: String,
        /// Of the bytes read.
        actual: String,
    },
    /// Unpacking the layer failed.
    #[error("cannot unpack the layer: {0}")]
    Unpack(#[from] UnpackError),
}

impl OutputError {
    /// Whether this error means *the guest did not seal* (docs/layer-format.md): the
    /// header is missing or does not verify. Errors after a verified header (record
    /// checksum, layout, limits) mean a damaged or hostile output instead.
    pub fn means_not_sealed(&self) -> bool {
        matches!(
            self,
            Self::NotSealed { .. }
                | Self::TooSmall { .. }
                | Self::BadMagic { .. }
                | Self::HeaderChecksum { .. }
        )
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> OutputError + 'a {
    move |source| OutputError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Reads and verifies the sealed output in `path` (a block device or an image file).
///
/// Checks, before trusting anything: the header magic, version and flags, its
/// `header_sha256`; `layer_offset` = 4096, `record_offset` = `layer_offset + layer_len`
/// rounded up to 4096; lengths within `limits` and within the file size; then the
/// record's SHA-256, JSON and version. An all-zero header gives
/// [`OutputError::NotSealed`]. The layer bytes are not read (see
/// [`SealedOutput::unpack_layer`]).
pub fn read_output(path: &Path, limits: &ReadLimits) -> Result<SealedOutput, OutputError> {
    let file = File::open(path).map_err(|source| OutputError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let size = (&file)
        .seek(SeekFrom::End(0))
        .map_err(io_err(path, "seek"))?;
    if size < HEADER_SIZE {
        return Err(OutputError::TooSmall {
            path: path.to_path_buf(),
            size,
        });
    }
    let mut block = vec![0u8; HEADER_SIZE as usize];
    file.read_exact_at(&mut block, 0)
        .map_err(io_err(path, "read the header of"))?;
    let h = SealedHeader::decode(&block).map_err(|e| match e {
        HeaderDecodeError::AllZero => OutputError::NotSealed {
            path: path.to_path_buf(),
        },
        HeaderDecodeError::BadMagic(found) => OutputError::BadMagic {
            found: found.escape_ascii().to_string(),
        },
        HeaderDecodeError::Checksum { stored, computed } => OutputError::HeaderChecksum {
            stored: hex::encode(stored),
            computed: hex::encode(computed),
        },
        HeaderDecodeError::Short(n) => OutputError::TooSmall {
            path: path.to_path_buf(),
            size: n as u64,
        },
    })?;
    if h.version != FORMAT_VERSION {
        return Err(OutputError::UnsupportedVersion { version: h.version });
    }
    if h.flags != 0 {
        return Err(OutputError::UnsupportedFlags { flags: h.flags });
    }
    if h.layer_offset != LAYER_OFFSET {
        return Err(OutputError::BadLayout {
            reason: format!("layer_offset is {}, expected 4096", h.layer_offset),
        });
    }
    if h.layer_len > limits.max_layer_len {
        return Err(OutputError::LayerTooLarge {
            len: h.layer_len,
            max: limits.max_layer_len,
        });
    }
    let layer_end = h.layer_offset.checked_add(h.layer_len);
    if layer_end.is_none_or(|end| end > size) {
        return Err(OutputError::OutOfBounds {
            what: "layer",
            offset: h.layer_offset,
            len: h.layer_len,
            size,
        });
    }
    let expected_record = layer_end.and_then(align_up);
    if expected_record != Some(h.record_offset) {
        return Err(OutputError::BadLayout {
            reason: format!(
                "record_offset is {}, expected layer_offset + layer_len rounded up to 4096",
                h.record_offset
            ),
        });
    }
    if h.record_len == 0 {
        return Err(OutputError::BadLayout {
            reason: "record_len is 0".to_string(),
        });
    }
    if h.record_len > limits.max_record_len {
        return Err(OutputError::RecordTooLarge {
            len: h.record_len,
            max: limits.max_record_len,
        });
    }
    if h.record_offset
        .checked_add(h.record_len)
        .is_none_or(|end| end > size)
    {
        return Err(OutputError::OutOfBounds {
            what: "record",
            offset: h.record_offset,
            len: h.record_len,
            size,
        });
    }
    let record_len = usize::try_from(h.record_len).map_err(|_| OutputError::RecordTooLarge {
        len: h.record_len,
        max: limits.max_record_len,
    })?;
    let mut json = vec![0u8; record_len];
    file.read_exact_at(&mut json, h.record_offset)
        .map_err(io_err(path, "read the record of"))?;
    let actual: [u8; 32] = Sha256::digest(&json).into();
    if actual != h.record_sha256 {
        return Err(OutputError::RecordChecksum {
            expected: hex::encode(h.record_sha256),
            actual: hex::encode(actual),
        });
    }
    let record: StepRecord =
        serde_json::from_slice(&json).map_err(|source| OutputError::RecordJson { source })?;
    if record.version != RECORD_VERSION {
        return Err(OutputError::RecordVersion {
            version: record.version,
        });
    }
    Ok(SealedOutput {
        record,
        layer_id: hex::encode(h.layer_sha256),
        layer_offset: h.layer_offset,
        layer_len: h.layer_len,
        record_offset: h.record_offset,
        record_len: h.record_len,
    })
}

impl SealedOutput {
    /// A reader over exactly the layer bytes of `path` (the same file given to
    /// [`read_output`]), bounded with [`Read::take`]. The bytes are not verified:
    /// hash them while reading ([`unpack`] does, see [`Self::unpack_layer`]).
    pub fn layer_reader(&self, path: &Path) -> io::Result<io::Take<File>> {
        let mut file = File::open(path)?;
        file.seek(SeekFrom::Start(self.layer_offset))?;
        Ok(file.take(self.layer_len))
    }

    /// Checks that `actual` (hex SHA-256 of the layer bytes) is this output's layer id.
    pub fn check_layer_id(&self, actual: &str) -> Result<(), OutputError> {
        if actual.eq_ignore_ascii_case(&self.layer_id) {
            Ok(())
        } else {
            Err(OutputError::LayerChecksum {
                expected: self.layer_id.clone(),
                actual: actual.to_string(),
            })
        }
    }

    /// Reads the whole layer and checks its SHA-256 against the header.
    pub fn verify_layer(&self, path: &Path) -> Result<(), OutputError> {
        let mut reader = self
            .layer_reader(path)
            .map_err(io_err(path, "open the layer of"))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(path, "read the layer of")(e)),
            };
            hasher.update(buf.get(..n).unwrap_or_default());
            total += n as u64;
        }
        if total != self.layer_len {
            return Err(OutputError::OutOfBounds {
                what: "layer",
                offset: self.layer_offset,
                len: self.layer_len,
                size: self.layer_offset.saturating_add(total),
            });
        }
        self.check_layer_id(&hex::encode(hasher.finalize()))
    }

    /// Unpacks the layer into the empty directory `target` (see [`unpack`]) and checks
    /// the SHA-256 of the bytes read against the header. On
    /// [`OutputError::LayerChecksum`] the target holds unverified content: discard it.
    pub fn unpack_layer(
        &self,
        path: &Path,
        target: &Path,
        limits: &UnpackLimits,
    ) -> Result<UnpackSummary, OutputError> {
        let reader = self
            .layer_reader(path)
            .map_err(io_err(path, "open the layer of"))?;
        let summary = unpack(reader, target, limits)?;
        if summary.bytes != self.layer_len {
            return Err(OutputError::OutOfBounds {
                what: "layer",
                offset: self.layer_offset,
                len: self.layer_len,
                size: self.layer_offset.saturating_add(summary.bytes),
            });
        }
        self.check_layer_id(&summary.layer_id)?;
        Ok(summary)
    }
}
