//! Signed intent: an ed25519 signature over `b"udos-intent-v1\n" + intent_hash`
//! (the hash's 64 hex digits as ASCII). Keys and signatures travel as hex.

use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

/// The domain-separation prefix of the signed message.
pub const INTENT_PREFIX: &[u8] = b"udos-intent-v1\n";

/// Why a key or signature is refused.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The key text is not 64 hex digits or not a valid ed25519 point.
    #[error("not an ed25519 key (expected 64 hex digits): {0}")]
    Key(String),
    /// The key file could not be read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The signature is not 128 hex digits.
    #[error("signature is not 128 hex digits")]
    Malformed,
    /// The signature does not verify with the configured key.
    #[error("signature does not match intent {0} under the configured intent key")]
    Mismatch(String),
}

/// The exact bytes that are signed for an intent hash.
pub fn intent_message(intent_hash: &str) -> Vec<u8> {
    let mut m = INTENT_PREFIX.to_vec();
    m.extend_from_slice(intent_hash.as_bytes());
    m
}

fn hex32(text: &str) -> Result<[u8; 32], SignError> {
    let t = text.trim();
    let bytes = hex::decode(t).map_err(|e| SignError::Key(e.to_string()))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| SignError::Key(format!("{} bytes, want 32", b.len())))
}

/// An ed25519 public key from 64 hex digits.
pub fn parse_verifying_key(hex_text: &str) -> Result<VerifyingKey, SignError> {
    VerifyingKey::from_bytes(&hex32(hex_text)?).map_err(|e| SignError::Key(e.to_string()))
}

/// An ed25519 public key from a file holding 64 hex digits.
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, SignError> {
    let text = std::fs::read_to_string(path).map_err(|source| SignError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_verifying_key(&text)
}

/// An ed25519 signing key from its 32-byte seed as 64 hex digits.
pub fn parse_signing_key(hex_text: &str) -> Result<SigningKey, SignError> {
    Ok(SigningKey::from_bytes(&hex32(hex_text)?))
}

/// An ed25519 signing key from a file holding its seed as 64 hex digits.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, SignError> {
    let text = std::fs::read_to_string(path).map_err(|source| SignError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_signing_key(&text)
}

/// The public key of a signing key, hex.
pub fn public_hex(key: &SigningKey) -> String {
    hex::encode(key.verifying_key().to_bytes())
}

/// Sign an intent hash: 128 hex digits.
pub fn sign_intent(key: &SigningKey, intent_hash: &str) -> String {
    hex::encode(key.sign(&intent_message(intent_hash)).to_bytes())
}

/// Check a signature (hex) over an intent hash.
pub fn verify_intent(
    key: &VerifyingKey,
    intent_hash: &str,
    signature_hex: &str,
) -> Result<(), SignError> {
    let bytes = hex::decode(signature_hex.trim()).map_err(|_| SignError::Malformed)?;
    let bytes: [u8; 64] = bytes.try_into().map_err(|_| SignError::Malformed)?;
    let sig = Signature::from_bytes(&bytes);
    key.verify(&intent_message(intent_hash), &sig)
        .map_err(|_| SignError::Mismatch(intent_hash.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_then_verify() {
        let key = parse_signing_key(&"07".repeat(32)).unwrap();
        let public = parse_verifying_key(&public_hex(&key)).unwrap();
        let hash = "ab".repeat(32);
        let sig = sign_intent(&key, &hash);
        assert_eq!(sig.len(), 128);
        verify_intent(&public, &hash, &sig).unwrap();
        assert!(matches!(
            verify_intent(&public, &"cd".repeat(32), &sig),
            Err(SignError::Mismatch(_))
        ));
        assert!(matches!(
            verify_intent(&public, &hash, "zz"),
            Err(SignError::Malformed)
        ));
        assert!(parse_verifying_key("1234").is_err());
    }
}
