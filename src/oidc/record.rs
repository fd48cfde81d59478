//! What the guard keeps in the session: pending logins and the logged-in
//! user, each sealed as a whole.
//!
//! Everything the guard trusts (identity, claims, groups, nonce, expiry,
//! tokens; a pending login's state, nonce, PKCE verifier and `return_to`)
//! is one AES-256-GCM envelope ([`crate::crypto`]). The login record is
//! bound to the session's storage key and its field, so that a record edited,
//! moved from another session, or left from before the login's id change
//! does not open. A pending login is bound to its own key, which is derived
//! from its state: it must survive the id change of another tab's login.
//! The keys are reserved ([`crate::session::reserved`]): application code
//! cannot write them, and what is found there anyway (an older version's
//! records in the clear, or hostile data) is never trusted.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{value::RawValue, Map, Value};

use super::{client::Tokens, step_up::StepUp};
pub(crate) use crate::session::reserved::USER_KEY;
use crate::{
    crypto::{Aad, Keyring},
    session::{SealContext, Session, SessionError},
};

/// A login (or an account connection) between the redirect to the provider
/// and the callback.
#[derive(Serialize, Deserialize)]
pub(crate) struct PendingLogin {
    pub(crate) state: String,
    /// Empty for a connection: no ID token to match it against.
    #[serde(default)]
    pub(crate) nonce: String,
    /// A connection's user (the login's `sub`); empty for a login.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) user: String,
    /// A connection's integration; empty for a login.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) integration: String,
    /// The issuer a login was started with: only its callback completes it
    /// (mix-up defence when an application has several providers).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) iss: String,
    /// A login's `acr_values`: the ID token's `acr` must be one of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) acr_values: Vec<String>,
    /// A login's `max_age`, seconds: the ID token's `auth_time` must show it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_age: Option<u64>,
    /// A login's DPoP private key (see [`super::dpop`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) dpop: Option<String>,
    /// The PKCE verifier.
    pub(crate) pkce: String,
    pub(crate) return_to: String,
    /// Unix milliseconds after which the callback is refused.
    pub(crate) exp_ms: i64,
    /// When it started, unix nanoseconds: the oldest goes first past the cap.
    pub(crate) started_ns: i64,
}

/// The logged-in user with the provider's tokens.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct LoginRecord {
    pub(crate) sub: String,
    pub(crate) iss: String,
    pub(crate) claims: Map<String, Value>,
    pub(crate) groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) sid: Option<String>,
    /// The login's nonce: a refreshed ID token that carries one must match it.
    pub(crate) nonce: String,
    /// Access token.
    pub(crate) at: String,
    /// Refresh token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) rt: Option<String>,
    /// ID token (the `id_token_hint` of logout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) idt: Option<String>,
    /// Access token expiry, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) exp: Option<i64>,
    /// The DPoP private key the tokens are bound to (see [`super::dpop`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) dpop: Option<String>,
}

impl PendingLogin {
    /// What the login asked of the provider beyond a plain login.
    pub(crate) fn step_up(&self) -> StepUp {
        StepUp {
            acr_values: self.acr_values.clone(),
            max_age: self.max_age.map(std::time::Duration::from_secs),
        }
    }
}

impl LoginRecord {
    /// The record after a refresh: the one place refreshed tokens are
    /// applied. Providers without rotation (Cognito) send no new refresh
    /// token, so the old one stays; a refreshed ID token (already checked
    /// against this login) brings its claims and groups.
    pub(crate) fn refreshed(mut self, tokens: Tokens) -> Self {
        self.at = tokens.access_token;
        if let Some(rt) = tokens.refresh_token {
            self.rt = Some(rt);
        }
        if let Some(idt) = tokens.id_token {
            self.idt = Some(idt);
        }
        if let Some(claims) = tokens.claims {
            self.groups = groups_of(&claims);
            self.claims = claims;
        }
        self.exp = tokens.expires_at;
        self
    }
}

/// What was found under one of the guard's keys.
pub(crate) enum Stored<T> {
    /// Nothing.
    Absent,
    /// A sealed record that opened; `reseal` when sealed under a key that
    /// no longer seals.
    Opened { record: T, reseal: bool },
    /// Not a sealed value at all: a record of a version that kept it in the
    /// clear, or data written by someone else. Never trusted.
    Clear,
    /// A sealed value that does not open here: edited, moved from another
    /// session or key, or sealed under a retired key.
    Tampered,
}

/// The login record, sealed for the session of `context`.
pub(crate) fn seal_login(
    keys: &Keyring,
    context: &SealContext,
    record: &LoginRecord,
) -> Result<String, serde_json::Error> {
    seal(keys, &context.aad(USER_KEY), record)
}

/// Opens the login record of the session of `context`.
pub(crate) fn open_login(
    keys: &Keyring,
    context: &SealContext,
    stored: Option<&RawValue>,
) -> Stored<LoginRecord> {
    open(keys, &context.aad(USER_KEY), stored)
}

/// Reads and opens the session's login record: the one place that does.
pub(crate) async fn load_login(
    keys: &Keyring,
    session: &Session,
) -> Result<Stored<LoginRecord>, SessionError> {
    let raw: Option<Box<RawValue>> = session.get(USER_KEY).await?;
    if raw.is_none() {
        return Ok(Stored::Absent);
    }
    let context = session.seal_context().await?;
    Ok(open_login(keys, &context, raw.as_deref()))
}

/// Seals `record` for the session and stores it, with the identity columns
/// that per-user and back-channel logout look up.
pub(crate) async fn store_login(
    keys: &Keyring,
    session: &Session,
    record: &LoginRecord,
) -> Result<(), StoreLoginError> {
    let context = session.seal_context().await?;
    let sealed = seal_login(keys, &context, record)?;
    session.insert_reserved(USER_KEY, &sealed).await?;
    session
        .record_identity(&record.sub, record.sid.as_deref())
        .await?;
    Ok(())
}

/// Why [`store_login`] failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreLoginError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("login record does not serialize: {0}")]
    Serialize(#[from] serde_json::Error),
}

/// A pending login or connection, sealed for its own `key` and its flow's
/// `field`.
pub(crate) fn seal_pending(
    keys: &Keyring,
    key: &str,
    field: &str,
    pending: &PendingLogin,
) -> Result<String, serde_json::Error> {
    seal(
        keys,
        &Aad {
            session: key,
            field,
        },
        pending,
    )
}

/// Opens the pending login or connection stored under `key` for `field`.
pub(crate) fn open_pending(
    keys: &Keyring,
    key: &str,
    field: &str,
    stored: Option<&RawValue>,
) -> Stored<PendingLogin> {
    open(
        keys,
        &Aad {
            session: key,
            field,
        },
        stored,
    )
}

fn seal<T: Serialize>(
    keys: &Keyring,
    aad: &Aad<'_>,
    record: &T,
) -> Result<String, serde_json::Error> {
    let plain = zeroize::Zeroizing::new(serde_json::to_vec(record)?);
    Ok(keys.seal(&plain, aad))
}

fn open<T: DeserializeOwned>(
    keys: &Keyring,
    aad: &Aad<'_>,
    stored: Option<&RawValue>,
) -> Stored<T> {
    let Some(stored) = stored else {
        return Stored::Absent;
    };
    let Ok(sealed) = serde_json::from_str::<&str>(stored.get()) else {
        return Stored::Clear;
    };
    let Ok(opened) = keys.open(sealed, aad) else {
        return Stored::Tampered;
    };
    // Authentic yet unreadable only if the format changed under the same key.
    match serde_json::from_slice(opened.plaintext()) {
        Ok(record) => Stored::Opened {
            record,
            reseal: opened.needs_reseal(),
        },
        Err(_) => Stored::Tampered,
    }
}

/// What [`reseal_entry`] did with one session key's value.
pub(crate) enum Resealed {
    /// Not one of the guard's sealed values: left alone, not counted.
    NotSealed,
    /// Already sealed under the keyring's first key.
    Current,
    /// Sealed anew under the first key: the value to store instead.
    Sealed(Box<RawValue>),
    /// Does not open under any key of the keyring: left as it is.
    Unreadable,
}

/// Seals the value stored under the guard's session key `key` again under
/// the keyring's first key, with the same binding it was sealed with: the
/// session's storage key for the login record, its own key for a pending
/// login. The plaintext is not parsed, so any version of a record moves.
pub(crate) fn reseal_entry(
    keys: &Keyring,
    storage_key: &str,
    key: &str,
    stored: &RawValue,
) -> Resealed {
    let aad = if key == USER_KEY {
        Aad {
            session: storage_key,
            field: USER_KEY,
        }
    } else if let Some(field) = super::pending::field_of(key) {
        Aad {
            session: key,
            field,
        }
    } else {
        return Resealed::NotSealed;
    };
    let Ok(sealed) = serde_json::from_str::<&str>(stored.get()) else {
        // Records in the clear are never trusted, so never sealed either.
        return Resealed::NotSealed;
    };
    let Ok(opened) = keys.open(sealed, &aad) else {
        return Resealed::Unreadable;
    };
    if !opened.needs_reseal() {
        return Resealed::Current;
    }
    let again = keys.seal(opened.plaintext(), &aad);
    match serde_json::value::to_raw_value(&again) {
        Ok(raw) => Resealed::Sealed(raw),
        Err(_) => Resealed::Unreadable,
    }
}

/// Groups from `cognito:groups` (Cognito) or `groups` (Keycloak with a group mapper, others).
pub(crate) fn groups_of(claims: &Map<String, Value>) -> Vec<String> {
    ["cognito:groups", "groups"]
        .iter()
        .find_map(|k| claims.get(*k).and_then(Value::as_array))
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Keeps only same-origin relative paths: `/a/b?c` stays; `//evil`,
/// `/\evil`, absolute URLs, `javascript:` and anything with control
/// characters become `/`.
pub(crate) fn safe_return_to(raw: Option<&str>) -> String {
    let Some(raw) = raw else {
        return "/".to_owned();
    };
    let ok = raw.starts_with('/')
        && !raw.starts_with("//")
        && !raw.starts_with("/\\")
        && !raw.contains('\\')
        && !raw.chars().any(|c| c.is_control() || c.is_whitespace())
        && raw.len() <= 2048;
    if ok {
        raw.to_owned()
    } else {
        "/".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_to_keeps_only_local_paths() {
        for (given, kept) in [
            (Some("/app/page?x=1#y"), "/app/page?x=1#y"),
            (Some("//evil.example"), "/"),
            (Some("/\\evil.example"), "/"),
            (Some("https://evil.example/"), "/"),
            (Some("javascript:alert(1)"), "/"),
            (Some("/ok\r\nSet-Cookie: x"), "/"),
            (Some("/a\\b"), "/"),
            (Some(""), "/"),
            (None, "/"),
        ] {
            assert_eq!(safe_return_to(given), kept, "{given:?}");
        }
    }

    fn login(sub: &str) -> LoginRecord {
        LoginRecord {
            sub: sub.to_owned(),
            iss: "https://idp.example".to_owned(),
            claims: Map::new(),
            groups: vec!["users".to_owned()],
            sid: None,
            nonce: "n".to_owned(),
            at: "access".to_owned(),
            rt: Some("refresh".to_owned()),
            idt: None,
            exp: Some(1),
            dpop: None,
        }
    }

    fn ctx(key: &str) -> SealContext {
        SealContext::new(key.to_owned())
    }

    fn raw(v: &str) -> Box<RawValue> {
        serde_json::value::to_raw_value(v).expect("a string serializes")
    }

    #[test]
    fn a_login_record_opens_only_where_it_was_sealed() {
        let keys = Keyring::generate();
        let sealed = raw(&seal_login(&keys, &ctx("sid-a"), &login("alice")).expect("seals"));
        match open_login(&keys, &ctx("sid-a"), Some(&sealed)) {
            Stored::Opened { record, reseal } => {
                assert_eq!(record.sub, "alice");
                assert_eq!(record.rt.as_deref(), Some("refresh"));
                assert!(!reseal);
            }
            _ => panic!("does not open"),
        }
        // Another session, another field, another keyring.
        assert!(matches!(
            open_login(&keys, &ctx("sid-b"), Some(&sealed)),
            Stored::Tampered
        ));
        assert!(matches!(
            open_pending(&keys, "sid-a", "oidc.login", Some(&sealed)),
            Stored::Tampered
        ));
        assert!(matches!(
            open_login(&Keyring::generate(), &ctx("sid-a"), Some(&sealed)),
            Stored::Tampered
        ));
        assert!(matches!(
            open_login(&keys, &ctx("sid-a"), None),
            Stored::Absent
        ));
    }

    #[test]
    fn records_in_the_clear_are_never_trusted() {
        let keys = Keyring::generate();
        let clear = serde_json::value::to_raw_value(&login("admin")).expect("serializes");
        assert!(matches!(
            open_login(&keys, &ctx("sid"), Some(&clear)),
            Stored::Clear
        ));
        for junk in ["null", "42", "[]", "{}", "\"not sealed\""] {
            let junk = RawValue::from_string(junk.to_owned()).expect("JSON");
            assert!(
                !matches!(
                    open_login(&keys, &ctx("sid"), Some(&junk)),
                    Stored::Opened { .. }
                ),
                "{junk}"
            );
        }
    }

    #[test]
    fn records_sealed_under_a_retired_key_open_and_ask_for_a_reseal() {
        use crate::crypto::EncryptionKey;
        let (old, new) = (EncryptionKey::generate(), EncryptionKey::generate());
        let before = Keyring::new(vec![old.clone()]).expect("one key");
        let after = Keyring::new(vec![new, old]).expect("two keys");
        let sealed = raw(&seal_login(&before, &ctx("sid"), &login("alice")).expect("seals"));
        assert!(matches!(
            open_login(&after, &ctx("sid"), Some(&sealed)),
            Stored::Opened { reseal: true, .. }
        ));
    }

    #[test]
    fn reseal_moves_records_to_the_first_key_with_their_binding() {
        use crate::crypto::EncryptionKey;
        let (old, new) = (EncryptionKey::generate(), EncryptionKey::generate());
        let before = Keyring::new(vec![old.clone()]).expect("one key");
        let after = Keyring::new(vec![new.clone(), old]).expect("two keys");
        let only_new = Keyring::new(vec![new]).expect("one key");
        let login_value = raw(&seal_login(&before, &ctx("sid"), &login("alice")).expect("seals"));
        let Resealed::Sealed(again) = reseal_entry(&after, "sid", USER_KEY, &login_value) else {
            panic!("not resealed");
        };
        assert!(matches!(
            open_login(&only_new, &ctx("sid"), Some(&again)),
            Stored::Opened { reseal: false, .. }
        ));
        assert!(matches!(
            reseal_entry(&after, "sid", USER_KEY, &again),
            Resealed::Current
        ));
        // Bound to another session: does not open, so it is not moved.
        assert!(matches!(
            reseal_entry(&after, "other", USER_KEY, &login_value),
            Resealed::Unreadable
        ));
        let pending = PendingLogin {
            state: "st".into(),
            nonce: "n".into(),
            pkce: "v".into(),
            return_to: "/".into(),
            exp_ms: 1,
            started_ns: 1,
            user: String::new(),
            integration: String::new(),
            iss: String::new(),
            acr_values: Vec::new(),
            max_age: None,
            dpop: None,
        };
        let key = super::super::pending::LOGIN.key("st");
        let stored = raw(&seal_pending(&before, &key, "oidc.login", &pending).expect("seals"));
        let Resealed::Sealed(again) = reseal_entry(&after, "sid", &key, &stored) else {
            panic!("not resealed");
        };
        assert!(matches!(
            open_pending(&only_new, &key, "oidc.login", Some(&again)),
            Stored::Opened { .. }
        ));
        let clear = serde_json::value::to_raw_value(&login("admin")).expect("serializes");
        assert!(matches!(
            reseal_entry(&after, "sid", USER_KEY, &clear),
            Resealed::NotSealed
        ));
        assert!(matches!(
            reseal_entry(&after, "sid", "count", &login_value),
            Resealed::NotSealed
        ));
    }
}
