//! Bearer tokens: reading token files, generating worker tokens, hashing.

use std::path::Path;

use sha2::{Digest, Sha256};

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Unreadable.
    #[error("cannot read token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Empty (after trimming whitespace) or containing whitespace or control characters.
    #[error("token file {0} must hold one token: non-empty, no spaces or control characters")]
    Malformed(String),
}

/// Read a token file: its content without surrounding whitespace.
pub fn read_token_file(path: &Path) -> Result<String, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(TokenError::Malformed(path.display().to_string()));
    }
    Ok(token.to_string())
}

/// sha256 of a token: what the master keeps and compares.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A fresh random token: 32 bytes from the OS, hex.
pub fn generate_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_files_trimmed() {
        let a = generate_token().unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, generate_token().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "  secret\n").unwrap();
        assert_eq!(read_token_file(&f).unwrap(), "secret");
        std::fs::write(&f, "\n").unwrap();
        assert!(matches!(read_token_file(&f), Err(TokenError::Malformed(_))));
        assert_eq!(hash_token("x"), hash_token("x"));
    }
}
