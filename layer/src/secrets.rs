//! The secrets device (docs/layer-format.md, "The secrets device"): the step's secret
//! values, handed to PID 1 on a read-only block device that lives only as long as the
//! VM, never in a layer.
//!
//! ```text
//! 0   8   magic "UDOSSEC1"
//! 8   4   version 1          (little-endian)
//! 12  4   flags 0
//! 16  8   JSON length
//! 24  32  SHA-256 of the JSON
//! 56  ..  the JSON, then zeros up to a multiple of 512 bytes
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::mask::Masker;

/// First 8 bytes of the device.
pub const SECRETS_MAGIC: &[u8; 8] = b"UDOSSEC1";
/// The format version this crate writes and reads.
pub const SECRETS_VERSION: u32 = 1;
/// Bytes before the JSON.
pub const SECRETS_HEADER_LEN: usize = 56;
/// The largest JSON a reader accepts.
pub const MAX_SECRETS_JSON: u64 = 1 << 20;
/// The encoding is padded to a multiple of this (a block device's sector).
pub const SECRETS_BLOCK: usize = 512;

/// What the host gives one step: secrets for act (`${{ secrets.NAME }}`) and further
/// values to mask (earlier steps' `add-mask`s). `Debug` shows names, never values.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSecrets {
    /// NAME -> value; names are `[A-Za-z_][A-Za-z0-9_]*`.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// More values to hide from the console.
    #[serde(default)]
    pub masks: Vec<String>,
}

impl fmt::Debug for StepSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepSecrets")
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .field("masks", &self.masks.len())
            .finish()
    }
}

/// Why a secrets device cannot be used. No variant carries a secret value.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// Reading the device failed.
    #[error("read: {0}")]
    Io(#[source] std::io::Error),
    /// The device ends before the header or the JSON does.
    #[error("truncated: the device ends before the {0}")]
    Truncated(&'static str),
    /// Not `UDOSSEC1`.
    #[error("bad magic (not a udos secrets device)")]
    BadMagic,
    /// A version other than [`SECRETS_VERSION`].
    #[error("unsupported version {0}")]
    BadVersion(u32),
    /// Reserved flags that are not 0.
    #[error("unsupported flags {0:#x}")]
    BadFlags(u32),
    /// The JSON is larger than [`MAX_SECRETS_JSON`].
    #[error("JSON of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// The length in the header (or of the encoding).
        len: u64,
        /// [`MAX_SECRETS_JSON`].
        max: u64,
    },
    /// The JSON does not match its SHA-256.
    #[error("checksum mismatch")]
    Checksum,
    /// The JSON is not a `StepSecrets` (where, never what: the text holds secrets).
    #[error("bad JSON ({kind}) at line {line} column {column}")]
    Json {
        /// syntax, data or eof.
        kind: &'static str,
        /// Where it went wrong.
        line: usize,
        /// Where it went wrong.
        column: usize,
    },
    /// A secret name outside `[A-Za-z_][A-Za-z0-9_]*`.
    #[error("bad secret name {0:?}: expected [A-Za-z_][A-Za-z0-9_]*")]
    BadName(String),
    /// A value with a NUL byte, which cannot be passed to act as an argument.
    #[error("the value of secret {0} contains a NUL byte")]
    NulInValue(String),
}

impl From<serde_json::Error> for SecretsError {
    fn from(e: serde_json::Error) -> Self {
        use serde_json::error::Category;
        SecretsError::Json {
            kind: match e.classify() {
                Category::Io => "io",
                Category::Syntax => "syntax",
                Category::Data => "data",
                Category::Eof => "eof",
            },
            line: e.line(),
            column: e.column(),
        }
    }
}

/// Whether `name` is `[A-Za-z_][A-Za-z0-9_]*`.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl StepSecrets {
    /// Checks what the guest checks: names, NUL bytes.
    pub fn validate(&self) -> Result<(), SecretsError> {
        for (name, value) in &self.secrets {
            if !valid_name(name) {
                // Long garbage names would flood the console: show the start only.
                return Err(SecretsError::BadName(name.chars().take(64).collect()));
            }
            if value.contains('\0') {
                return Err(SecretsError::NulInValue(name.clone()));
            }
        }
        Ok(())
    }

    /// The device contents (host side), padded to a multiple of [`SECRETS_BLOCK`].
    pub fn encode(&self) -> Result<Vec<u8>, SecretsError> {
        self.validate()?;
        let json = serde_json::to_vec(self)?;
        let len = json.len() as u64;
        if len > MAX_SECRETS_JSON {
            return Err(SecretsError::TooLarge {
                len,
                max: MAX_SECRETS_JSON,
            });
        }
        let mut out = Vec::with_capacity(SECRETS_HEADER_LEN + json.len() + SECRETS_BLOCK);
        out.extend_from_slice(SECRETS_MAGIC);
        out.extend_from_slice(&SECRETS_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&Sha256::digest(&json));
        out.extend_from_slice(&json);
        out.resize(out.len().div_ceil(SECRETS_BLOCK) * SECRETS_BLOCK, 0);
        Ok(out)
    }

    /// Decodes a device image (guest side). Bytes after the JSON are ignored.
    pub fn decode(bytes: &[u8]) -> Result<Self, SecretsError> {
        Self::read_from(bytes)
    }

    /// Reads and decodes from a device, reading no more than the header and the JSON
    /// (at most [`MAX_SECRETS_JSON`] bytes).
    pub fn read_from(mut reader: impl Read) -> Result<Self, SecretsError> {
        let mut header = [0u8; SECRETS_HEADER_LEN];
        read_exact(&mut reader, &mut header, "header")?;
        let le32 =
            |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap_or_default());
        if &header[..8] != SECRETS_MAGIC {
            return Err(SecretsError::BadMagic);
        }
        match (le32(8), le32(12)) {
            (SECRETS_VERSION, 0) => {}
            (SECRETS_VERSION, flags) => return Err(SecretsError::BadFlags(flags)),
            (version, _) => return Err(SecretsError::BadVersion(version)),
        }
        let len = u64::from_le_bytes(header[16..24].try_into().unwrap_or_default());
        if len > MAX_SECRETS_JSON {
            return Err(SecretsError::TooLarge {
                len,
                max: MAX_SECRETS_JSON,
            });
        }
        // `len` is at most 1 MiB here, so the cast and the allocation are bounded.
        let mut json = vec![0u8; len as usize];
        read_exact(&mut reader, &mut json, "end of the JSON")?;
        if Sha256::digest(&json)[..] != header[24..56] {
            return Err(SecretsError::Checksum);
        }
        let secrets: StepSecrets = serde_json::from_slice(&json)?;
        secrets.validate()?;
        Ok(secrets)
    }

    /// act's arguments for the secrets: `--secret NAME=VALUE` for each.
    pub fn act_args(&self) -> Vec<String> {
        self.secrets
            .iter()
            .flat_map(|(name, value)| ["--secret".to_string(), format!("{name}={value}")])
            .collect()
    }

    /// A masker for everything this hides: each secret (and each line of a multi-line
    /// one) and each of [`StepSecrets::masks`].
    pub fn masker(&self) -> Masker {
        let mut masker = Masker::new();
        for value in self.secrets.values() {
            masker.add_secret(value);
        }
        for value in &self.masks {
            masker.add_secret(value);
        }
        masker
    }
}

fn read_exact(
    reader: &mut impl Read,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), SecretsError> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => SecretsError::Truncated(what),
        _ => SecretsError::Io(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StepSecrets {
        StepSecrets {
            secrets: BTreeMap::from([
                ("TOKEN".to_string(), "tok-123".to_string()),
                ("_KEY_2".to_string(), "line one\nline two\n".to_string()),
                ("EMPTY".to_string(), String::new()),
            ]),
            masks: vec!["from-an-earlier-step".to_string()],
        }
    }

    #[test]
    fn round_trip_and_layout() {
        let bytes = sample().encode().unwrap();
        assert_eq!(bytes.len() % SECRETS_BLOCK, 0);
        assert_eq!(&bytes[..8], b"UDOSSEC1");
        assert_eq!(bytes[8..12], 1u32.to_le_bytes());
        assert_eq!(bytes[12..16], [0; 4]);
        let len = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
        let json = &bytes[56..56 + len];
        assert_eq!(&bytes[24..56], &Sha256::digest(json)[..]);
        assert!(bytes[56 + len..].iter().all(|&b| b == 0), "zero padding");
        let back: serde_json::Value = serde_json::from_slice(json).unwrap();
        assert_eq!(back["secrets"]["TOKEN"], "tok-123");
        assert_eq!(StepSecrets::decode(&bytes).unwrap(), sample());
        // A device larger than the encoding (rounded up by the host) reads the same.
        let mut device = bytes.clone();
        device.resize(bytes.len() + 4096, 0);
        assert_eq!(StepSecrets::read_from(&device[..]).unwrap(), sample());
    }

    #[test]
    fn refuses_a_bad_header() {
        let good = sample().encode().unwrap();
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            StepSecrets::decode(&bad),
            Err(SecretsError::BadMagic)
        ));
        let mut bad = good.clone();
        bad[8] = 2;
        assert!(matches!(
            StepSecrets::decode(&bad),
            Err(SecretsError::BadVersion(2))
        ));
        let mut bad = good.clone();
        bad[12] = 1;
        assert!(matches!(
            StepSecrets::decode(&bad),
            Err(SecretsError::BadFlags(1))
        ));
        assert!(matches!(
            StepSecrets::decode(&good[..40]),
            Err(SecretsError::Truncated("header"))
        ));
        assert!(matches!(
            StepSecrets::decode(&good[..60]),
            Err(SecretsError::Truncated(_))
        ));
        assert!(matches!(
            StepSecrets::decode(&[0; 512]),
            Err(SecretsError::BadMagic)
        ));
    }

    #[test]
    fn refuses_a_bad_checksum() {
        let mut bytes = sample().encode().unwrap();
        // Flip one byte of a secret value inside the JSON.
        let at = bytes.windows(7).position(|w| w == b"tok-123").unwrap();
        bytes[at] ^= 1;
        let err = StepSecrets::decode(&bytes).unwrap_err();
        assert!(matches!(err, SecretsError::Checksum), "{err}");
    }

    #[test]
    fn refuses_oversize_json_without_reading_it() {
        let mut header = Vec::from(&SECRETS_MAGIC[..]);
        header.extend_from_slice(&1u32.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&(MAX_SECRETS_JSON + 1).to_le_bytes());
        header.extend_from_slice(&[0; 32]);
        let err = StepSecrets::decode(&header).unwrap_err();
        assert!(matches!(err, SecretsError::TooLarge { len, .. } if len == MAX_SECRETS_JSON + 1));
        let huge = StepSecrets {
            secrets: BTreeMap::from([("BIG".to_string(), "x".repeat(1 << 20))]),
            masks: Vec::new(),
        };
        assert!(matches!(huge.encode(), Err(SecretsError::TooLarge { .. })));
    }

    /// An encoding of arbitrary JSON, checksum and all.
    fn with_json(json: &[u8]) -> Vec<u8> {
        let mut out = Vec::from(&SECRETS_MAGIC[..]);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&Sha256::digest(json));
        out.extend_from_slice(json);
        out
    }

    #[test]
    fn refuses_bad_names_both_ways() {
        for name in ["", "1ABC", "A-B", "A B", "É", "A=B"] {
            let s = StepSecrets {
                secrets: BTreeMap::from([(name.to_string(), "v".to_string())]),
                masks: Vec::new(),
            };
            assert!(
                matches!(s.encode(), Err(SecretsError::BadName(_))),
                "{name:?}"
            );
            let json = serde_json::to_vec(&s).unwrap();
            let err = StepSecrets::decode(&with_json(&json)).unwrap_err();
            assert!(matches!(err, SecretsError::BadName(_)), "{name:?}: {err}");
        }
        for name in ["A", "_", "a_B_9", "_1"] {
            assert!(valid_name(name), "{name}");
        }
    }

    #[test]
    fn refuses_nul_in_values() {
        let s = StepSecrets {
            secrets: BTreeMap::from([("A".to_string(), "x\0y".to_string())]),
            masks: Vec::new(),
        };
        assert!(matches!(s.encode(), Err(SecretsError::NulInValue(n)) if n == "A"));
    }

    #[test]
    fn json_errors_never_quote_the_json() {
        let json = br#"{"secrets":{"A":"hunter2"},"masks":"hunter2"}"#;
        let err = StepSecrets::decode(&with_json(json)).unwrap_err();
        assert!(
            matches!(err, SecretsError::Json { kind: "data", .. }),
            "{err}"
        );
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = StepSecrets::decode(&with_json(br#"{"secrets":{},"extra":1}"#)).unwrap_err();
        assert!(matches!(err, SecretsError::Json { .. }), "{err}");
        let err = StepSecrets::decode(&with_json(b"{\"secrets\":")).unwrap_err();
        assert!(
            matches!(err, SecretsError::Json { kind: "eof", .. }),
            "{err}"
        );
    }

    #[test]
    fn act_args_and_masker() {
        let s = sample();
        assert_eq!(
            s.act_args(),
            [
                "--secret",
                "EMPTY=",
                "--secret",
                "TOKEN=tok-123",
                "--secret",
                "_KEY_2=line one\nline two\n"
            ]
        );
        let m = s.masker();
        assert_eq!(
            m.mask("tok-123 | line two | from-an-earlier-step | EMPTY"),
            "*** | *** | *** | EMPTY"
        );
        let debug = format!("{s:?}");
        assert!(
            debug.contains("TOKEN") && !debug.contains("tok-123"),
            "{debug}"
        );
    }
}
