//! The sealed-output header (docs/layer-format.md, "Sealed output on the device").
//!
//! The header occupies the first [`HEADER_SIZE`] bytes of the output device. Only its
//! first [`HEADER_FIELDS_LEN`] bytes carry data; the rest is zero. All integers are
//! little-endian.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `UDOSOUT1` |
//! | 8 | 4 | format version, `1` |
//! | 12 | 4 | flags, `0` |
//! | 16 | 8 | `layer_offset` (4096) |
//! | 24 | 8 | `layer_len` |
//! | 32 | 32 | `layer_sha256` |
//! | 64 | 8 | `record_offset` |
//! | 72 | 8 | `record_len` |
//! | 80 | 32 | `record_sha256` |
//! | 112 | 32 | `header_sha256` = SHA-256 of bytes 0..112 |

use sha2::{Digest, Sha256};

/// Magic bytes at offset 0 of a sealed output device.
pub const MAGIC: [u8; 8] = *b"UDOSOUT1";
/// Version of the sealed-output format this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the header block (the layer starts right after it).
pub const HEADER_SIZE: u64 = 4096;
/// Alignment of the layer and the record on the device.
pub const ALIGN: u64 = 4096;
/// Offset of the layer tar on the device (always [`HEADER_SIZE`]).
pub const LAYER_OFFSET: u64 = HEADER_SIZE;
/// Bytes of the header that carry fields (0..144); the rest of the block is zero.
pub const HEADER_FIELDS_LEN: usize = 144;
/// Bytes covered by `header_sha256` (0..112).
pub const HEADER_HASHED_LEN: usize = 112;

/// The decoded fields of a sealed-output header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedHeader {
    /// Format version (`1`).
    pub version: u32,
    /// Reserved flags (`0`).
    pub flags: u32,
    /// Byte offset of the layer tar (always 4096).
    pub layer_offset: u64,
    /// Length of the layer tar in bytes (0 when there is no layer).
    pub layer_len: u64,
    /// SHA-256 of the layer tar bytes (the layer id).
    pub layer_sha256: [u8; 32],
    /// Byte offset of the step record JSON.
    pub record_offset: u64,
    /// Length of the step record JSON.
    pub record_len: u64,
    /// SHA-256 of the step record JSON bytes.
    pub record_sha256: [u8; 32],
}

/// Why a header block could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderDecodeError {
    /// The field bytes are all zero: nothing was ever sealed on this device.
    AllZero,
    /// The magic is not `UDOSOUT1`; carries the 8 bytes found.
    BadMagic([u8; 8]),
    /// `header_sha256` does not match bytes 0..112.
    Checksum {
        /// The checksum stored in the header.
        stored: [u8; 32],
        /// The checksum computed over bytes 0..112.
        computed: [u8; 32],
    },
    /// The block is shorter than [`HEADER_FIELDS_LEN`].
    Short(usize),
}

/// Rounds `n` up to the next multiple of [`ALIGN`]; `None` on overflow.
pub fn align_up(n: u64) -> Option<u64> {
    n.checked_add(ALIGN - 1).map(|v| v & !(ALIGN - 1))
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = buf.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

fn get<const N: usize>(buf: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = buf.get(at..at + N) {
        out.copy_from_slice(src);
    }
    out
}

impl SealedHeader {
    /// Encodes the header into a full [`HEADER_SIZE`]-byte block, computing
    /// `header_sha256`.
    pub fn encode(&self) -> Vec<u8> {
        let mut block = vec![0u8; HEADER_SIZE as usize];
        put(&mut block, 0, &MAGIC);
        put(&mut block, 8, &self.version.to_le_bytes());
        put(&mut block, 12, &self.flags.to_le_bytes());
        put(&mut block, 16, &self.layer_offset.to_le_bytes());
        put(&mut block, 24, &self.layer_len.to_le_bytes());
        put(&mut block, 32, &self.layer_sha256);
        put(&mut block, 64, &self.record_offset.to_le_bytes());
        put(&mut block, 72, &self.record_len.to_le_bytes());
        put(&mut block, 80, &self.record_sha256);
        let digest = Sha256::digest(block.get(..HEADER_HASHED_LEN).unwrap_or_default());
        put(&mut block, HEADER_HASHED_LEN, &digest);
        block
    }

    /// Decodes and verifies (magic, `header_sha256`) a header block. Version, flags
    /// and the layout are *not* checked here: see [`crate::output::read_output`].
    pub fn decode(block: &[u8]) -> Result<Self, HeaderDecodeError> {
        let fields = block
            .get(..HEADER_FIELDS_LEN)
            .ok_or(HeaderDecodeError::Short(block.len()))?;
        if fields.iter().all(|b| *b == 0) {
            return Err(HeaderDecodeError::AllZero);
        }
        let magic: [u8; 8] = get(fields, 0);
        if magic != MAGIC {
            return Err(HeaderDecodeError::BadMagic(magic));
        }
        let stored: [u8; 32] = get(fields, HEADER_HASHED_LEN);
        let computed: [u8; 32] =
            Sha256::digest(fields.get(..HEADER_HASHED_LEN).unwrap_or_default()).into();
        if stored != computed {
            return Err(HeaderDecodeError::Checksum { stored, computed });
        }
        Ok(Self {
            version: u32::from_le_bytes(get(fields, 8)),
            flags: u32::from_le_bytes(get(fields, 12)),
            layer_offset: u64::from_le_bytes(get(fields, 16)),
            layer_len: u64::from_le_bytes(get(fields, 24)),
            layer_sha256: get(fields, 32),
            record_offset: u64::from_le_bytes(get(fields, 64)),
            record_len: u64::from_le_bytes(get(fields, 72)),
            record_sha256: get(fields, 80),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let h = SealedHeader {
            version: 1,
            flags: 0,
            layer_offset: 4096,
            layer_len: 10240,
            layer_sha256: [7; 32],
            record_offset: 16384,
            record_len: 321,
            record_sha256: [9; 32],
        };
        let block = h.encode();
        assert_eq!(block.len(), 4096);
        assert_eq!(&block[..8], b"UDOSOUT1");
        assert_eq!(&block[16..24], &4096u64.to_le_bytes());
        assert_eq!(&block[112..144], Sha256::digest(&block[..112]).as_slice());
        assert!(block[144..].iter().all(|b| *b == 0));
        assert_eq!(SealedHeader::decode(&block), Ok(h));
    }

    #[test]
    fn decode_errors() {
        assert_eq!(
            SealedHeader::decode(&[0u8; 4096]),
            Err(HeaderDecodeError::AllZero)
        );
        let mut block = SealedHeader {
            version: 1,
            flags: 0,
            layer_offset: 4096,
            layer_len: 0,
            layer_sha256: [0; 32],
            record_offset: 4096,
            record_len: 1,
            record_sha256: [0; 32],
        }
        .encode();
        block[30] ^= 1;
        assert!(matches!(
            SealedHeader::decode(&block),
            Err(HeaderDecodeError::Checksum { .. })
        ));
        block[0] = b'X';
        assert!(matches!(
            SealedHeader::decode(&block),
            Err(HeaderDecodeError::BadMagic(_))
        ));
        assert_eq!(
            SealedHeader::decode(&block[..10]),
            Err(HeaderDecodeError::Short(10))
        );
    }

    #[test]
    fn align() {
        assert_eq!(align_up(0), Some(0));
        assert_eq!(align_up(1), Some(4096));
        assert_eq!(align_up(4096), Some(4096));
        assert_eq!(align_up(4097), Some(8192));
        assert_eq!(align_up(u64::MAX), None);
    }
}
