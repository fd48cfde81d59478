//! Authorization requests between the redirect to a provider and its
//! callback, kept in the session: the guard's logins and the vault's account
//! connections share this machinery.
//!
//! Each pending request is one reserved session key derived from its state
//! (a digest: the lookup leaks nothing about the state), sealed whole for
//! that key, so it survives another tab's session id change. At the callback
//! it is taken once (row lock, read, delete), the state compared in constant
//! time, and its expiry checked; `return_to` was kept only as a local path.

use openidconnect::{CsrfToken, PkceCodeChallenge};
use serde_json::{value::RawValue, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::{
    client::constant_eq,
    record::{self, safe_return_to, PendingLogin, Stored},
    step_up::StepUp,
};
use crate::{
    crypto::Keyring,
    session::{reserved, Session, SessionError},
};

/// One kind of pending request: where it lives in the session and what its
/// records are sealed for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Flow {
    prefix: &'static str,
    field: &'static str,
}

/// The guard's logins.
pub(crate) const LOGIN: Flow = Flow {
    prefix: reserved::PENDING_PREFIX,
    field: "oidc.login",
};

/// The vault's account connections.
pub(crate) const CONNECT: Flow = Flow {
    prefix: reserved::CONNECT_PREFIX,
    field: "vault.connect",
};

/// The field the pending request stored under session key `key` is sealed
/// for, if `key` is one.
pub(crate) fn field_of(key: &str) -> Option<&'static str> {
    [LOGIN, CONNECT]
        .into_iter()
        .find(|flow| key.starts_with(flow.prefix))
        .map(|flow| flow.field)
}

/// Why a callback's state was refused.
#[derive(Debug)]
pub(crate) enum PendingError {
    /// The session could not be read or written.
    Session(SessionError),
    /// A record that does not serialize (it always does: strings).
    Unsealable(serde_json::Error),
    /// The stored record does not open (edited, moved, retired key).
    Tampered,
    /// No pending request of this browser has that state, or it was used.
    Unknown,
    /// The pending request expired.
    Expired,
}

/// What a started request sends to the provider.
pub(crate) struct Started {
    pub(crate) state: CsrfToken,
    pub(crate) challenge: PkceCodeChallenge,
}

/// What a pending request is bound to besides its state and verifier.
#[derive(Default)]
pub(crate) struct Bound {
    /// A login's nonce.
    pub(crate) nonce: String,
    /// A connection's user.
    pub(crate) user: String,
    /// A connection's integration.
    pub(crate) integration: String,
    /// A login's issuer.
    pub(crate) iss: String,
    /// A login's DPoP private key.
    pub(crate) dpop: Option<String>,
    /// What a login asks of the provider beyond a plain login.
    pub(crate) step_up: StepUp,
}

/// Limits on a flow's pending requests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) ttl: std::time::Duration,
    pub(crate) max_pending: usize,
}

fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// A callback's query parameters, each at most once; `Err` names the one
/// given twice.
pub(crate) fn callback_params(query: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in openidconnect::url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(format!("parameter {k:?} given twice"));
        }
        out.push((k.into_owned(), v.into_owned()));
    }
    Ok(out)
}

impl Flow {
    /// The session key of the request started with `state`.
    pub(crate) fn key(self, state: &str) -> String {
        let digest = Sha256::digest(state.as_bytes());
        let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}{hex}", self.prefix)
    }

    /// Records a new pending request (after dropping expired ones, and the
    /// oldest beyond the cap): a fresh state and PKCE verifier, what it is
    /// `bound` to, and `return_to` if it is a local path.
    pub(crate) async fn start(
        self,
        session: &Session,
        keys: &Keyring,
        limits: Limits,
        bound: Bound,
        return_to: Option<&str>,
    ) -> Result<Started, PendingError> {
        self.prune(session, keys, limits.max_pending).await?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let state = CsrfToken::new_random();
        let key = self.key(state.secret());
        let ttl = i64::try_from(limits.ttl.as_millis()).unwrap_or(i64::MAX);
        let record = PendingLogin {
            state: state.secret().clone(),
            nonce: bound.nonce,
            user: bound.user,
            integration: bound.integration,
            iss: bound.iss,
            dpop: bound.dpop,
            acr_values: bound.step_up.acr_values,
            max_age: bound.step_up.max_age.map(|d| d.as_secs()),
            pkce: verifier.secret().clone(),
            return_to: safe_return_to(return_to),
            exp_ms: now_ms().saturating_add(ttl),
            started_ns: OffsetDateTime::now_utc().unix_timestamp_nanos() as i64,
        };
        let sealed = record::seal_pending(keys, &key, self.field, &record)
            .map_err(PendingError::Unsealable)?;
        session
            .insert_reserved(&key, &sealed)
            .await
            .map_err(PendingError::Session)?;
        Ok(Started { state, challenge })
    }

    /// Drops expired (or unreadable) pending requests, then the oldest
    /// until fewer than `max` remain.
    async fn prune(
        self,
        session: &Session,
        keys: &Keyring,
        max: usize,
    ) -> Result<(), PendingError> {
        let now = now_ms();
        let mut pending = Vec::new();
        for key in session.keys().await.map_err(PendingError::Session)? {
            if !key.starts_with(self.prefix) {
                continue;
            }
            let raw: Option<Box<RawValue>> = session.get(&key).await.ok().flatten();
            match record::open_pending(keys, &key, self.field, raw.as_deref()) {
                Stored::Opened { record: p, .. } if p.exp_ms > now => {
                    pending.push((p.started_ns, key));
                }
                _ => {
                    let _ = session.remove_reserved::<Value>(&key).await;
                }
            }
        }
        pending.sort();
        while pending.len() >= max.max(1) {
            let (_, key) = pending.remove(0);
            let _ = session.remove_reserved::<Value>(&key).await;
        }
        Ok(())
    }

    /// Consumes the pending request named by `state` before anything else
    /// is checked, so that a callback can succeed once.
    pub(crate) async fn take(
        self,
        session: &Session,
        keys: &Keyring,
        state: &str,
    ) -> Result<PendingLogin, PendingError> {
        let key = self.key(state);
        let raw: Option<Box<RawValue>> = session
            .take_once_reserved(&key)
            .await
            .map_err(PendingError::Session)?;
        let pending = match record::open_pending(keys, &key, self.field, raw.as_deref()) {
            Stored::Opened { record, .. } => record,
            Stored::Absent => return Err(PendingError::Unknown),
            Stored::Clear | Stored::Tampered => return Err(PendingError::Tampered),
        };
        if !constant_eq(&pending.state, state) {
            return Err(PendingError::Unknown);
        }
        if pending.exp_ms <= now_ms() {
            return Err(PendingError::Expired);
        }
        Ok(pending)
    }

    /// Consumes the pending request of `state`, if any, unread: the
    /// provider answered it with an error.
    pub(crate) async fn discard(self, session: &Session, state: &str) {
        let _ = session.take_once_reserved::<Value>(&self.key(state)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hide_the_state_and_name_their_flow() {
        let k = LOGIN.key("some-state");
        assert!(k.starts_with(reserved::PENDING_PREFIX));
        assert!(!k.contains("some-state"));
        assert_ne!(k, LOGIN.key("other-state"));
        let c = CONNECT.key("some-state");
        assert!(c.starts_with(reserved::CONNECT_PREFIX));
        assert!(reserved::is_reserved(&c, &[]));
    }
}
