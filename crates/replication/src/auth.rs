//! The shared secret of the replication link and its HMAC-SHA256 proofs.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Minimum length of a shared secret in bytes.
pub const MIN_KEY_LEN: usize = 32;
/// Maximum length of a key file read (anything larger is surely not a key file).
pub const MAX_KEY_LEN: usize = 4096;

type HmacSha256 = Hmac<Sha256>;

/// Errors loading a key.
#[derive(Debug, thiserror::Error)]
pub enum AuthKeyError {
    #[error("cannot read auth key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "auth key file {path} is accessible by group or others (mode {mode:04o}); \
         restrict it with chmod 600"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("auth key is {len} bytes; at least {MIN_KEY_LEN} are required")]
    TooShort { len: usize },
    #[error("auth key file {path} is larger than {MAX_KEY_LEN} bytes")]
    TooLong { path: PathBuf },
}

/// A shared secret. Its bytes are never printed.
#[derive(Clone)]
pub struct AuthKey(Vec<u8>);

impl fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthKey({} bytes, redacted)", self.0.len())
    }
}

impl AuthKey {
    /// A key from bytes; at least [`MIN_KEY_LEN`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<AuthKey, AuthKeyError> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(AuthKeyError::TooShort { len: bytes.len() });
        }
        Ok(AuthKey(bytes.to_vec()))
    }

    /// Reads a key file. The whole content is the key (raw bytes; a trailing newline
    /// is part of it, so both sides must use the same file content). The file must
    /// not be accessible by group or others (`mode & 0o077 == 0`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<AuthKey, AuthKeyError> {
        let path = path.as_ref();
        let io_err = |source| AuthKeyError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = fs::metadata(path).map_err(io_err)?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(AuthKeyError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        if meta.len() > MAX_KEY_LEN as u64 {
            return Err(AuthKeyError::TooLong {
                path: path.to_owned(),
            });
        }
        let bytes = fs::read(path).map_err(io_err)?;
        if bytes.len() > MAX_KEY_LEN {
            return Err(AuthKeyError::TooLong {
                path: path.to_owned(),
            });
        }
        AuthKey::from_bytes(&bytes)
    }

    fn mac(&self, label: &[u8], transcript: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length.
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        m.update(&(transcript.len() as u64).to_le_bytes());
        m.update(transcript);
        m
    }

    /// The proof `HMAC-SHA256(key, label || len(transcript) as u64 LE || transcript)`.
    pub fn prove(&self, label: &[u8], transcript: &[u8]) -> [u8; 32] {
        self.mac(label, transcript).finalize().into_bytes().into()
    }

    /// Verifies a proof in constant time.
    pub fn verify(&self, label: &[u8], transcript: &[u8], proof: &[u8]) -> bool {
        self.mac(label, transcript).verify_slice(proof).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("twinvm-repl-auth-{}-{name}", std::process::id()));
        let _ = fs::remove_file(&dir);
        dir
    }

    fn write(path: &Path, content: &[u8], mode: u32) {
        fs::write(path, content).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn file_ok() {
        let p = tmp("ok");
        write(&p, &[7u8; 32], 0o600);
        let k = AuthKey::from_file(&p).unwrap();
        assert_eq!(format!("{k:?}"), "AuthKey(32 bytes, redacted)");
        write(&p, &[7u8; 40], 0o400);
        AuthKey::from_file(&p).unwrap();
        fs::remove_file(&p).unwrap();
    }

    #[test]
    fn file_too_short() {
        let p = tmp("short");
        write(&p, &[7u8; 31], 0o600);
        let e = AuthKey::from_file(&p).unwrap_err();
        assert!(matches!(e, AuthKeyError::TooShort { len: 31 }), "{e}");
        fs::remove_file(&p).unwrap();
    }

    #[test]
    fn file_readable_by_others_refused() {
        for mode in [0o644, 0o640, 0o604, 0o660, 0o601] {
            let p = tmp("perm");
            write(&p, &[7u8; 32], mode);
            let e = AuthKey::from_file(&p).unwrap_err();
            assert!(matches!(e, AuthKeyError::Permissions { .. }), "{e}");
            assert!(e.to_string().contains("chmod 600"), "{e}");
            fs::remove_file(&p).unwrap();
        }
    }

    #[test]
    fn file_missing() {
        let e = AuthKey::from_file("/nonexistent/twinvm.key").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/twinvm.key"), "{e}");
    }

    #[test]
    fn prove_verify() {
        let k = AuthKey::from_bytes(&[1u8; 32]).unwrap();
        let other = AuthKey::from_bytes(&[2u8; 32]).unwrap();
        let p = k.prove(b"a", b"transcript");
        assert!(k.verify(b"a", b"transcript", &p));
        assert!(!k.verify(b"b", b"transcript", &p));
        assert!(!k.verify(b"a", b"transcripT", &p));
        assert!(!other.verify(b"a", b"transcript", &p));
        assert!(!k.verify(b"a", b"transcript", &p[..31]));
        // Label and transcript are separated by a length, so they cannot be shifted.
        assert_ne!(k.prove(b"ab", b"c"), k.prove(b"a", b"bc"));
    }
}
