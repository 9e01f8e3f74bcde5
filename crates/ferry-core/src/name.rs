//! [`Name`]: the one grammar for every name an operator or a peer gives —
//! nodes, volumes, shares, workloads — checked once where it enters, so that
//! every place a name becomes a path holds a value that cannot climb out of
//! its directory.
//!
//! Grammar: `[a-z0-9][a-z0-9._-]{0,63}`. No `/`, no NUL, no leading `.` (so
//! never `.` or `..`), no leading `-` (never read as an option by a hook or a
//! tool), no `@` (`disk0@test` names a volume's test overlay), no upper case
//! (two names that differ only in case would be one directory on a
//! case-insensitive filesystem and two in ferry).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest name, in bytes.
pub const NAME_BYTES_MAX: usize = 64;

/// Why a string is not a [`Name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid name {name:?}: {reason} (a name is 1-{NAME_BYTES_MAX} characters from a-z 0-9 . _ -, starting with a letter or digit)")]
pub struct NameError {
    pub name: String,
    pub reason: &'static str,
}

/// A checked name. It can only be built by [`Name::parse`] (or by
/// deserializing, which calls it), so holding one proves the grammar holds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Name(String);

impl Name {
    pub fn parse(s: &str) -> Result<Name, NameError> {
        let bad = |reason| {
            Err(NameError {
                name: s.chars().take(NAME_BYTES_MAX * 2).collect(),
                reason,
            })
        };
        let Some(first) = s.bytes().next() else {
            return bad("it is empty");
        };
        if s.len() > NAME_BYTES_MAX {
            return bad("it is too long");
        }
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return bad("it must start with a-z or 0-9");
        }
        if s.bytes().any(|b| b.is_ascii_uppercase()) {
            return bad("upper case is not allowed");
        }
        if !s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        }) {
            return bad("it holds a character outside a-z 0-9 . _ -");
        }
        Ok(Name(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::str::FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Name, NameError> {
        Name::parse(s)
    }
}

impl TryFrom<String> for Name {
    type Error = NameError;
    fn try_from(s: String) -> Result<Name, NameError> {
        Name::parse(&s)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Name, D::Error> {
        let s = String::deserialize(d)?;
        Name::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for Name {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_ref()
    }
}

impl AsRef<std::path::Path> for Name {
    fn as_ref(&self) -> &std::path::Path {
        self.0.as_ref()
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl PartialEq<Name> for String {
    fn eq(&self, other: &Name) -> bool {
        self == &other.0
    }
}

impl PartialEq<Name> for str {
    fn eq(&self, other: &Name) -> bool {
        self == other.0
    }
}

/// Hashes and compares as its text, so maps keyed by `Name` are looked up
/// with a `&str`.
impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_grammar() {
        for ok in ["a", "0", "db-1", "disk_0.raw", "a.b", &"x".repeat(64)] {
            assert_eq!(Name::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/a",
            "-a",
            ".a",
            "_a",
            "a@test",
            "A",
            "dB",
            "a b",
            "a\0b",
            "é",
            "a\n",
            &"x".repeat(65),
        ] {
            assert!(Name::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn deserializing_checks() {
        assert!(serde_json::from_str::<Name>("\"../../q\"").is_err());
        assert_eq!(serde_json::from_str::<Name>("\"q\"").unwrap(), "q");
    }

    proptest! {
        /// Whatever is accepted is one path component that stays put.
        #[test]
        fn accepted_names_are_single_components(s in "\\PC{0,70}") {
            if let Ok(n) = Name::parse(&s) {
                let p = std::path::Path::new(n.as_str());
                prop_assert_eq!(p.components().count(), 1);
                prop_assert!(matches!(p.components().next(), Some(std::path::Component::Normal(_))));
                prop_assert!(!s.contains(['/', '\0', '@']));
            }
        }
    }
}
