//! What went wrong with an action, in kinds a client can act on, each with
//! its HTTP status.

use serde::{Deserialize, Serialize};

/// The kind of an action's failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request itself is wrong: a field, a name, a value (400).
    BadInput,
    /// No or an unknown credential (401).
    Unauthorized,
    /// A credential without the role (403).
    Forbidden,
    /// A name that does not exist here (404).
    NotFound,
    /// The thing is not in a state that allows the action, e.g. a cutover
    /// of a migration that is not ready (409).
    Conflict,
    /// The request body is over `api.body_bytes_max` (413).
    TooLarge,
    /// A peer the action needs did not answer (503).
    Unavailable,
    /// Anything else (500).
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadInput => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::TooLarge => 413,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
        }
    }
}

/// An action's failure: its kind and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ActionError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ActionError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ActionError {
        ActionError {
            kind,
            message: message.into(),
        }
    }
    pub fn bad_input(m: impl Into<String>) -> ActionError {
        ActionError::new(ErrorKind::BadInput, m)
    }
    pub fn not_found(m: impl Into<String>) -> ActionError {
        ActionError::new(ErrorKind::NotFound, m)
    }
    pub fn conflict(m: impl Into<String>) -> ActionError {
        ActionError::new(ErrorKind::Conflict, m)
    }
    pub fn unavailable(m: impl Into<String>) -> ActionError {
        ActionError::new(ErrorKind::Unavailable, m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_their_statuses() {
        assert_eq!(ActionError::conflict("x").kind.status(), 409);
        assert_eq!(ErrorKind::TooLarge.status(), 413);
        assert_eq!(
            serde_json::to_string(&ErrorKind::BadInput).unwrap(),
            "\"bad-input\""
        );
    }
}
