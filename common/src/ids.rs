//! Typed identifiers. Every id that becomes part of a storage key or a NATS subject is validated
//! once, at construction, so the rest of the code can splice it into paths without re-checking.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Why a string was refused as an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("empty id")]
    Empty,
    #[error("id {0:?} is longer than 128 characters")]
    TooLong(String),
    #[error("id {0:?} may only hold letters, digits, '.', '_' and '-', and may not start with '.' or '-'")]
    Unsafe(String),
}

/// True when `s` is safe as a single path segment on every object store and file system we write
/// to, and as a token of a NATS subject: ASCII letters, digits, `.`, `_`, `-`; not starting with `.`
/// or `-` (no hidden files, no flags, no `..`).
pub fn check_safe_name(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > 128 {
        return Err(IdError::TooLong(s.to_string()));
    }
    let ok_chars = s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok_chars || s.starts_with('.') || s.starts_with('-') {
        return Err(IdError::Unsafe(s.to_string()));
    }
    Ok(())
}

macro_rules! safe_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check_safe_name(&s)?;
                Ok(Self(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

safe_id!(
    /// A slide of the cohort, as named in the manifest; also its file stem in the store.
    SlideId
);
safe_id!(
    /// One run of the pipeline over a cohort: its training outputs live under `runs/<run>/`.
    RunId
);
safe_id!(
    /// Content address of a patch-grid configuration (patch size, magnification, tissue params).
    TilingId
);
safe_id!(
    /// Content address of an embedder: architecture, weights and preprocessing. ICMIL rounds mint
    /// new ones.
    EmbedderId
);
safe_id!(
    /// A trained model in the store (`models/<id>/`): a run's fold models, its final model, an
    /// imported checkpoint.
    ModelId
);
safe_id!(
    /// Deterministic id of a job: the same work always gets the same id, so a re-plan deduplicates.
    JobId
);

/// A short, stable content hash: the first 12 hex digits of SHA-256 over the parts, each
/// length-prefixed so that `["ab","c"]` and `["a","bc"]` differ.
pub fn content_hash<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(&h.finalize()[..6])
}

/// The full SHA-256 of `bytes` in hex: how weights files are named (publishers list it too).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_names_accept_typical_slide_ids() {
        for s in ["TCGA-A1-A0SB-01Z-00-DX1", "slide_01", "a.b.c", "X"] {
            assert!(SlideId::new(s).is_ok(), "{s}");
        }
    }

    #[test]
    fn unsafe_names_are_refused_with_the_reason() {
        assert_eq!(SlideId::new(""), Err(IdError::Empty));
        for s in ["../x", "a/b", ".hidden", "-flag", "sp ace", "é", "a\\b", "x*y"] {
            assert!(matches!(SlideId::new(s), Err(IdError::Unsafe(_))), "{s}");
        }
        assert!(matches!(SlideId::new("a".repeat(129)), Err(IdError::TooLong(_))));
    }

    #[test]
    fn ids_round_trip_through_serde_and_refuse_bad_input() {
        let id = SlideId::new("s1").unwrap();
        let j = serde_json::to_string(&id).unwrap();
        assert_eq!(j, "\"s1\"");
        assert_eq!(serde_json::from_str::<SlideId>(&j).unwrap(), id);
        assert!(serde_json::from_str::<SlideId>("\"../etc\"").is_err());
    }

    #[test]
    fn content_hash_is_stable_and_separates_parts() {
        let a = content_hash([b"ab".as_slice(), b"c"]);
        let b = content_hash([b"a".as_slice(), b"bc"]);
        assert_ne!(a, b);
        assert_eq!(a, content_hash([b"ab".as_slice(), b"c"]));
        assert_eq!(a.len(), 12);
    }

    #[test]
    fn sha256_hex_is_the_standard_digest() {
        // sha256("abc"), FIPS 180-2's example.
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
