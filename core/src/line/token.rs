//! Admission tokens: what an admitted client shows the issue route.
//!
//! A token names the event, the user, the ticket and the admission's
//! deadline, and carries an HMAC-SHA256 of them under a key only the api
//! knows (`--line-key`). The gate needs no store call: it recomputes the
//! MAC, so a token cannot be forged, moved to another user or event, or
//! extended. Form: `v1.<ticket uuid>.<deadline µs>.<mac hex>`.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use uuid::Uuid;

type HmacSha256 = Hmac<Sha256>;

/// Shortest signing key accepted (bytes).
pub const MIN_KEY_BYTES: usize = 16;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token at all.
    #[error("the admission token is malformed; use the token from your admitted ticket's poll")]
    Malformed,
    /// Signed for another user or event, or altered.
    #[error("the admission token is not valid for this user and event; join the line to get one")]
    Invalid,
    /// Past its deadline.
    #[error("the admission token expired; join the line again")]
    Expired,
}

/// A signing key.
#[derive(Clone)]
pub struct TokenKey(Vec<u8>);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// A key from its bytes; at least [`MIN_KEY_BYTES`].
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, String> {
        let bytes = bytes.into();
        if bytes.len() < MIN_KEY_BYTES {
            return Err(format!(
                "the line signing key must be at least {MIN_KEY_BYTES} bytes, got {}",
                bytes.len()
            ));
        }
        Ok(Self(bytes))
    }

    /// A random key (a single api process, tests, the demo): tokens it signs
    /// are valid only for this process.
    pub fn random() -> Self {
        let mut k = Vec::with_capacity(32);
        k.extend_from_slice(Uuid::new_v4().as_bytes());
        k.extend_from_slice(Uuid::new_v4().as_bytes());
        Self(k)
    }

    fn mac(&self, event_id: &str, user_id: &str, ticket: Uuid, deadline: u64) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        // Lengths first, so no two different tuples sign the same bytes.
        for part in [event_id.as_bytes(), user_id.as_bytes()] {
            m.update(&(part.len() as u64).to_be_bytes());
            m.update(part);
        }
        m.update(ticket.as_bytes());
        m.update(&deadline.to_be_bytes());
        m
    }

    /// The token admitting `user_id` to `event_id` with `ticket` until
    /// `deadline` (µs since the epoch).
    pub fn sign(&self, event_id: &str, user_id: &str, ticket: Uuid, deadline: u64) -> String {
        let tag = self
            .mac(event_id, user_id, ticket, deadline)
            .finalize()
            .into_bytes();
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        format!("v1.{}.{deadline}.{hex}", ticket.simple())
    }

    /// The ticket a token admits, if it was signed with this key for this
    /// user and event and `now` is before its deadline.
    pub fn verify(
        &self,
        token: &str,
        event_id: &str,
        user_id: &str,
        now: u64,
    ) -> Result<Uuid, TokenError> {
        let mut parts = token.trim().split('.');
        let (Some("v1"), Some(ticket), Some(deadline), Some(tag), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        let ticket = Uuid::parse_str(ticket).map_err(|_| TokenError::Malformed)?;
        let deadline: u64 = deadline.parse().map_err(|_| TokenError::Malformed)?;
        let tag = decode_hex(tag).ok_or(TokenError::Malformed)?;
        let want = self
            .mac(event_id, user_id, ticket, deadline)
            .finalize()
            .into_bytes();
        // Constant time: the time taken says nothing about how close a
        // guess came.
        if !bool::from(want.as_slice().ct_eq(&tag)) {
            return Err(TokenError::Invalid);
        }
        if now >= deadline {
            return Err(TokenError::Expired);
        }
        Ok(ticket)
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_admits_only_its_user_event_and_time() {
        let key = TokenKey::random();
        let t = Uuid::new_v4();
        let tok = key.sign("e1", "alice", t, 1_000);
        assert_eq!(key.verify(&tok, "e1", "alice", 999), Ok(t));
        assert_eq!(key.verify(&tok, "e1", "bob", 999), Err(TokenError::Invalid));
        assert_eq!(
            key.verify(&tok, "e2", "alice", 999),
            Err(TokenError::Invalid)
        );
        assert_eq!(
            key.verify(&tok, "e1", "alice", 1_000),
            Err(TokenError::Expired)
        );
        assert_eq!(
            TokenKey::random().verify(&tok, "e1", "alice", 999),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn an_extended_or_mangled_token_is_refused() {
        let key = TokenKey::random();
        let t = Uuid::new_v4();
        let tok = key.sign("e1", "alice", t, 1_000);
        let extended = tok.replace(".1000.", ".9999999.");
        assert_eq!(
            key.verify(&extended, "e1", "alice", 999),
            Err(TokenError::Invalid)
        );
        for bad in ["", "v1", "v2.x.1.00", &format!("{tok}.x"), "v1.nope.1.00"] {
            assert_eq!(
                key.verify(bad, "e1", "alice", 0),
                Err(TokenError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_short_key_is_refused() {
        assert!(TokenKey::new(b"short".to_vec()).is_err());
    }
}
