//! Session ids and the signed cookie that carries them.
//!
//! The cookie value is `<id>.<tag>`: the id is 24 bytes from the OS CSPRNG in
//! base64url (192 bits), the tag is HMAC-SHA256 of the id under the first
//! signing key, base64url without padding. Any key of the list verifies, so a
//! new key can be put first while the old ones still accept existing cookies.

use std::fmt;

use base64::{
    engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD},
    Engine,
};
use hmac::{Hmac, Mac};
use http::{header, HeaderMap, HeaderValue};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rand::{rngs::OsRng, RngCore};
use sha2::{Digest, Sha256};

use crate::error::ConfigError;

type HmacSha256 = Hmac<Sha256>;

/// Minimum signing key length: HMAC-SHA256 keys shorter than its 256-bit
/// output weaken it.
pub(crate) const MIN_KEY_LEN: usize = 32;

/// Cookie values longer than this are not even parsed: no value this crate
/// writes comes close, and a huge one is an attack or a mix-up.
const MAX_COOKIE_VALUE: usize = 512;

/// Random bytes in a session id.
const ID_BYTES: usize = 24;

/// The keys that sign and verify session cookies. The first signs; all verify.
///
/// ```
/// use tower_pg_session::SigningKeys;
/// let keys = SigningKeys::new(["a new key of at least 32 bytes......", "the previous key, still accepted....."])?;
/// assert!(SigningKeys::new(["short"]).is_err());
/// # Ok::<(), tower_pg_session::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct SigningKeys {
    keys: Vec<HmacSha256>,
}

impl fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKeys([redacted; {}])", self.keys.len())
    }
}

impl SigningKeys {
    /// Builds the key list; each key is at least 32 bytes.
    ///
    /// # Errors
    /// [`ConfigError::NoKeys`] for an empty list, [`ConfigError::KeyTooShort`]
    /// naming the position of a short key.
    pub fn new<I, K>(keys: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = K>,
        K: AsRef<[u8]>,
    {
        let mut out = Vec::new();
        for (index, key) in keys.into_iter().enumerate() {
            let key = key.as_ref();
            if key.len() < MIN_KEY_LEN {
                return Err(ConfigError::KeyTooShort {
                    index,
                    len: key.len(),
                    min: MIN_KEY_LEN,
                });
            }
            out.push(HmacSha256::new_from_slice(key).map_err(|_| ConfigError::NoKeys)?);
        }
        if out.is_empty() {
            return Err(ConfigError::NoKeys);
        }
        Ok(Self { keys: out })
    }

    /// A fresh random key list, for tests and throwaway demos: cookies do not
    /// survive a restart with it.
    #[must_use]
    pub fn generate() -> Self {
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        Self {
            keys: vec![HmacSha256::new_from_slice(&key).unwrap_or_else(|_| unreachable!())],
        }
    }

    /// A random 256-bit secret as text (base64url), for throwaway demos.
    #[must_use]
    pub fn generate_secret() -> String {
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        URL_SAFE_NO_PAD.encode(key)
    }

    fn tag(&self, id: &str) -> String {
        let mut mac = self.keys[0].clone();
        mac.update(id.as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// Constant-time check of `tag` against every key; the position of the
    /// key that signed it.
    fn verify(&self, id: &str, tag: &[u8]) -> Option<usize> {
        verify_with(&self.keys, id, tag)
    }
}

/// The secrets of express-session's signed cookie (`s:<sid>.<signature>`),
/// for sharing sessions with an Express app: the first signs, all verify,
/// the same rotation rule as express-session's `secret` array.
///
/// ```
/// use tower_pg_session::ExpressSecrets;
/// let secrets = ExpressSecrets::new(["new secret", "old secret"])?;
/// # Ok::<(), tower_pg_session::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct ExpressSecrets {
    keys: Vec<HmacSha256>,
}

impl fmt::Debug for ExpressSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ExpressSecrets([redacted; {}])", self.keys.len())
    }
}

impl ExpressSecrets {
    /// The secrets as the Express app has them (any length, as express-session
    /// accepts; use long random ones).
    ///
    /// # Errors
    /// [`ConfigError::NoKeys`] for an empty list or an empty secret.
    pub fn new<I, K>(secrets: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = K>,
        K: AsRef<[u8]>,
    {
        let keys = secrets
            .into_iter()
            .map(|k| {
                let k = k.as_ref();
                if k.is_empty() {
                    return Err(ConfigError::NoKeys);
                }
                HmacSha256::new_from_slice(k).map_err(|_| ConfigError::NoKeys)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(ConfigError::NoKeys);
        }
        Ok(Self { keys })
    }
}

/// How the cookie value carries the id.
#[derive(Debug, Clone)]
pub(crate) enum Codec {
    /// `<id>.<base64url HMAC>`.
    Signed(SigningKeys),
    /// express-session's `s:<sid>.<base64 HMAC without padding>`, URL-encoded.
    Express(ExpressSecrets),
}

fn verify_with(keys: &[HmacSha256], id: &str, tag: &[u8]) -> Option<usize> {
    keys.iter().position(|key| {
        let mut mac = key.clone();
        mac.update(id.as_bytes());
        mac.verify_slice(tag).is_ok()
    })
}

/// A verified cookie's id, and whether a key other than the first signed it
/// (the cookie is then re-signed on this response).
pub(crate) type Verified = (SessionId, bool);

/// A session id taken from a verified cookie or freshly generated.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct SessionId(String);

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", self.log_id())
    }
}

impl SessionId {
    pub(crate) fn generate() -> Self {
        let mut bytes = [0u8; ID_BYTES];
        OsRng.fill_bytes(&mut bytes);
        Self(URL_SAFE_NO_PAD.encode(bytes))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The key the row is stored under: the id itself, or its SHA-256 so that a
    /// copy of the table holds no usable session id.
    pub(crate) fn storage_key(&self, hashed: bool) -> String {
        if hashed {
            crate::hex::encode(&Sha256::digest(self.0.as_bytes()))
        } else {
            self.0.clone()
        }
    }

    /// A short digest that identifies the session in logs without revealing it.
    pub(crate) fn log_id(&self) -> String {
        crate::hex::encode(&Sha256::digest(self.0.as_bytes())[..6])
    }

    /// Ids this crate or a peer could have written: base64url, 22 to 64 chars.
    fn plausible(id: &str) -> bool {
        (22..=64).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }
}

/// The `SameSite` attribute of the session cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SameSite {
    /// Sent on top-level navigations from other sites, the default: needed for
    /// the return from an identity provider.
    Lax,
    /// Never sent on cross-site requests.
    Strict,
    /// Sent on every request; requires `Secure`.
    None,
}

/// How the session cookie is named, scoped and flagged.
#[derive(Debug, Clone)]
pub(crate) struct CookieConfig {
    pub(crate) name: String,
    pub(crate) host_prefix: bool,
    pub(crate) domain: Option<String>,
    pub(crate) path: String,
    pub(crate) secure: bool,
    pub(crate) same_site: SameSite,
    pub(crate) persistent: bool,
    pub(crate) codec: Codec,
}

impl CookieConfig {
    pub(crate) fn new(codec: Codec) -> Self {
        let name = match codec {
            Codec::Signed(_) => "session",
            Codec::Express(_) => "connect.sid",
        };
        Self {
            name: name.to_owned(),
            host_prefix: false,
            domain: None,
            path: "/".to_owned(),
            secure: true,
            same_site: SameSite::Lax,
            persistent: true,
            codec,
        }
    }

    /// The name as sent, with the `__Host-` prefix when enabled.
    pub(crate) fn full_name(&self) -> String {
        if self.host_prefix {
            format!("__Host-{}", self.name)
        } else {
            self.name.clone()
        }
    }

    /// The attribute combinations browsers refuse, named by their setters.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        const PREFIX: &str = "with_host_prefix";
        const INSECURE: &str = "with_insecure_http_cookie";
        if self.host_prefix && self.domain.is_some() {
            let reason = "the __Host- prefix forbids a Domain";
            return Err(ConfigError::conflict(&[PREFIX, "with_domain"], reason));
        }
        if self.host_prefix && !self.secure {
            let reason = "the __Host- prefix requires Secure";
            return Err(ConfigError::conflict(&[PREFIX, INSECURE], reason));
        }
        if self.same_site == SameSite::None && !self.secure {
            let reason = "SameSite=None requires Secure";
            return Err(ConfigError::conflict(&["with_same_site", INSECURE], reason));
        }
        Ok(())
    }

    /// The verified session id of the request, if any. Values that are
    /// malformed, oversized or fail verification are ignored, as if absent.
    pub(crate) fn read(&self, headers: &HeaderMap, name: &str) -> Option<Verified> {
        let mut seen_invalid = false;
        // Each pair on its own: a cookie that is not UTF-8 or not a cookie
        // at all (another app's, a sibling domain's) hides nothing else.
        let pairs = headers
            .get_all(header::COOKIE)
            .iter()
            .flat_map(|h| h.as_bytes().split(|b| *b == b';'))
            .filter_map(|pair| std::str::from_utf8(pair).ok())
            .filter_map(|pair| cookie::Cookie::parse(pair).ok());
        for pair in pairs.filter(|c| c.name() == name) {
            match self.verify_value(pair.value_trimmed()) {
                Some(id) => return Some(id),
                None => seen_invalid = true,
            }
        }
        if seen_invalid {
            crate::metrics::failure("bad_cookie");
            // Worth a line: a secret or cookie-name mismatch between two apps
            // sharing sessions shows up here first.
            tracing::info!(
                cookie = name,
                "session cookie failed verification (wrong secret or malformed); starting a new session"
            );
        }
        None
    }

    fn verify_value(&self, value: &str) -> Option<Verified> {
        if value.len() > MAX_COOKIE_VALUE {
            return None;
        }
        match &self.codec {
            Codec::Signed(keys) => {
                let (id, tag) = value.rsplit_once('.')?;
                if !SessionId::plausible(id) {
                    return None;
                }
                let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
                let by = keys.verify(id, &tag)?;
                Some((SessionId(id.to_owned()), by > 0))
            }
            Codec::Express(secrets) => {
                let decoded = percent_decode(value)?;
                let (id, tag) = decoded.strip_prefix("s:")?.rsplit_once('.')?;
                if !SessionId::plausible(id) {
                    return None;
                }
                // Exactly cookie-signature's form: no `=` padding.
                let tag = STANDARD_NO_PAD.decode(tag).ok()?;
                let by = verify_with(&secrets.keys, id, &tag)?;
                Some((SessionId(id.to_owned()), by > 0))
            }
        }
    }

    /// `Set-Cookie` carrying `id`, valid for `max_age_secs` when persistent.
    pub(crate) fn set(&self, name: &str, id: &SessionId, max_age_secs: i64) -> HeaderValue {
        let value = match &self.codec {
            Codec::Signed(keys) => format!("{}.{}", id.as_str(), keys.tag(id.as_str())),
            Codec::Express(secrets) => {
                let mut mac = secrets.keys[0].clone();
                mac.update(id.as_str().as_bytes());
                let tag = STANDARD_NO_PAD.encode(mac.finalize().into_bytes());
                // As the `cookie` module writes it: encodeURIComponent.
                percent_encode(&format!("s:{}.{tag}", id.as_str()))
            }
        };
        let max_age = self.persistent.then_some(max_age_secs.max(0));
        self.header(name, &value, max_age)
    }

    /// `Set-Cookie` that makes the browser drop the cookie.
    pub(crate) fn remove(&self, name: &str) -> HeaderValue {
        self.header(name, "", Some(0))
    }

    fn header(&self, name: &str, value: &str, max_age: Option<i64>) -> HeaderValue {
        let mut built = cookie::Cookie::build((name, value))
            .path(self.path.as_str())
            .http_only(true)
            .secure(self.secure)
            .same_site(match self.same_site {
                SameSite::Lax => cookie::SameSite::Lax,
                SameSite::Strict => cookie::SameSite::Strict,
                SameSite::None => cookie::SameSite::None,
            });
        if let Some(domain) = &self.domain {
            built = built.domain(domain.as_str());
        }
        if let Some(age) = max_age {
            built = built.max_age(time::Duration::seconds(age));
        }
        // Every part was validated when configured or generated by us.
        HeaderValue::from_str(&built.build().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// What JavaScript's `encodeURIComponent` leaves as it is.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// JavaScript's `encodeURIComponent`, as express-session writes its cookie.
fn percent_encode(s: &str) -> String {
    utf8_percent_encode(s, URI_COMPONENT).to_string()
}

/// Percent-decoding as the `cookie` module does; `None` for non-UTF-8. (A
/// malformed escape stays as it is, and then fails verification.)
fn percent_decode(s: &str) -> Option<String> {
    percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

/// Cookie names are RFC 6265 tokens.
pub(crate) fn check_cookie_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    ok.then_some(())
        .ok_or_else(|| ConfigError::InvalidCookieName(name.to_owned()))
}

pub(crate) fn check_domain(domain: &str) -> Result<(), ConfigError> {
    let ok = !domain.is_empty()
        && domain.len() <= 253
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    ok.then_some(())
        .ok_or_else(|| ConfigError::InvalidCookieDomain(domain.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(keys: &[&str]) -> CookieConfig {
        CookieConfig::new(Codec::Signed(SigningKeys::new(keys).expect("keys")))
    }

    fn express(secrets: &[&str]) -> CookieConfig {
        CookieConfig::new(Codec::Express(
            ExpressSecrets::new(secrets).expect("secrets"),
        ))
    }

    #[test]
    fn express_session_cookies() {
        // Computed with cookie-signature's sign("abcdefghijklmnopqrstuvwxyz012345", "keyboard cat").
        let c = express(&["keyboard cat"]);
        let id = SessionId("abcdefghijklmnopqrstuvwxyz012345".into());
        let value = value_of(&c.set("connect.sid", &id, 60));
        assert_eq!(
            value,
            "s%3Aabcdefghijklmnopqrstuvwxyz012345.2T3g1YIBqofc0ViEUEt59cUq%2Ba6Wlfi59xfb4RQsxSQ"
        );
        let read = |v: &str, c: &CookieConfig| {
            c.read(&request_with(&format!("connect.sid={v}")), "connect.sid")
                .map(|v| v.0)
        };
        assert_eq!(read(&value, &c), Some(id.clone()));
        // Unencoded works too; rotation: the old secret still verifies.
        let raw = percent_decode(&value).expect("decodes");
        assert_eq!(read(&raw, &c), Some(id.clone()));
        assert_eq!(
            read(&value, &express(&["new secret", "keyboard cat"])),
            Some(id.clone())
        );
        assert_eq!(read(&value, &express(&["another"])), None);
        assert_eq!(read("s%3Aabc.def", &c), None);
        // express-session never pads its signature, nor accepts padding.
        assert_eq!(read(&format!("{value}%3D"), &c), None);
        assert_eq!(read(&format!("{raw}="), &c), None);
        assert_eq!(read(&format!("{raw}=="), &c), None);
        assert_eq!(read("%ZZ", &c), None);
        assert_eq!(
            read(&value.replacen("s%3A", "", 1), &c),
            None,
            "the s: prefix is required"
        );
    }

    fn request_with(cookie: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(cookie).expect("header"),
        );
        h
    }

    fn value_of(set_cookie: &HeaderValue) -> String {
        let s = set_cookie.to_str().expect("ascii");
        let (pair, _) = s.split_once(';').expect("attributes");
        pair.split_once('=').expect("pair").1.to_owned()
    }

    const K1: &str = "k1-0123456789abcdef0123456789abcdef";
    const K2: &str = "k2-0123456789abcdef0123456789abcdef";

    #[test]
    fn ids_are_192_bit_base64url() {
        let a = SessionId::generate();
        let b = SessionId::generate();
        assert_eq!(a.as_str().len(), 32);
        assert_ne!(a, b);
        assert!(SessionId::plausible(a.as_str()));
        assert_eq!(a.storage_key(true).len(), 64);
        assert_eq!(a.storage_key(false), a.as_str());
        assert!(!format!("{a:?}").contains(a.as_str()));
    }

    #[test]
    fn round_trip_and_rotation() {
        let id = SessionId::generate();
        let old = config(&[K1]);
        let cookie = value_of(&old.set("session", &id, 60));
        // The old key alone, then the old key behind a new one: both accept.
        assert_eq!(
            old.read(&request_with(&format!("session={cookie}")), "session")
                .map(|v| v.0),
            Some(id.clone())
        );
        let rotated = config(&[K2, K1]);
        assert_eq!(
            rotated
                .read(&request_with(&format!("a=b; session={cookie}")), "session")
                .map(|v| v.0),
            Some(id.clone())
        );
        // Verified by a key other than the first: marked for re-signing.
        let rotated_read = rotated.read(&request_with(&format!("session={cookie}")), "session");
        assert_eq!(rotated_read.map(|v| v.1), Some(true));
        assert_eq!(
            old.read(&request_with(&format!("session={cookie}")), "session")
                .map(|v| v.1),
            Some(false)
        );
        // Once the old key is dropped, its cookies are refused.
        assert_eq!(
            config(&[K2])
                .read(&request_with(&format!("session={cookie}")), "session")
                .map(|v| v.0),
            None
        );
        // New cookies are signed by the first key.
        let fresh = value_of(&rotated.set("session", &id, 60));
        assert_eq!(
            config(&[K2])
                .read(&request_with(&format!("session={fresh}")), "session")
                .map(|v| v.0),
            Some(id)
        );
    }

    #[test]
    fn bad_values_are_ignored() {
        let c = config(&[K1]);
        let id = SessionId::generate();
        let good = value_of(&c.set("session", &id, 60));
        let (raw_id, tag) = good.rsplit_once('.').expect("dot");
        let mut flipped = tag.as_bytes().to_vec();
        flipped[3] = if flipped[3] == b'A' { b'B' } else { b'A' };
        let other = SessionId::generate();
        for bad in [
            String::new(),
            raw_id.to_owned(),
            format!("{raw_id}."),
            format!("{raw_id}.{}", String::from_utf8(flipped).expect("ascii")),
            format!("{}.{tag}", other.as_str()),
            format!("{raw_id}x.{tag}"),
            format!("{raw_id}.{tag}{}", "A".repeat(600)),
            "../../etc/passwd.abc".to_owned(),
            format!("{raw_id}';--.{tag}"),
        ] {
            assert_eq!(
                c.read(&request_with(&format!("session={bad}")), "session")
                    .map(|v| v.0),
                None,
                "{bad}"
            );
        }
        // A forged cookie before the real one does not hide it.
        let both = format!("session=forged.AAAA; session={good}");
        assert_eq!(
            c.read(&request_with(&both), "session").map(|v| v.0),
            Some(id)
        );
    }

    #[test]
    fn attributes_default_to_secure() {
        let c = config(&[K1]);
        let s = c.set("session", &SessionId::generate(), 3600);
        let s = s.to_str().expect("ascii");
        for attr in [
            "Path=/",
            "HttpOnly",
            "Secure",
            "SameSite=Lax",
            "Max-Age=3600",
        ] {
            assert!(s.contains(attr), "{s}");
        }
        let gone = c.remove("session");
        assert!(gone.to_str().expect("ascii").contains("Max-Age=0"));
    }

    #[test]
    fn host_prefix_rules() {
        let mut c = config(&[K1]);
        c.host_prefix = true;
        assert!(c.validate().is_ok());
        assert_eq!(c.full_name(), "__Host-session");
        c.domain = Some("example.com".into());
        assert!(c.validate().is_err());
        c.domain = None;
        c.secure = false;
        assert!(c.validate().is_err());
    }

    #[test]
    fn names_and_keys_are_checked() {
        assert!(check_cookie_name("connect.sid").is_ok());
        assert!(check_cookie_name("a b").is_err());
        assert!(check_cookie_name("a;b").is_err());
        assert!(check_domain("example.com").is_ok());
        assert!(check_domain("example.com; x").is_err());
        let err = SigningKeys::new([K1, "short"]).expect_err("short");
        assert!(matches!(
            err,
            ConfigError::KeyTooShort {
                index: 1,
                len: 5,
                ..
            }
        ));
        assert!(SigningKeys::new(Vec::<&str>::new()).is_err());
        assert!(!format!("{:?}", SigningKeys::new([K1]).expect("ok")).contains("k1"));
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    fn id() -> impl Strategy<Value = SessionId> {
        "[A-Za-z0-9_-]{22,64}".prop_map(SessionId)
    }

    fn cookie(c: &CookieConfig, name: &str, value: &str) -> Option<Verified> {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("{name}={value}")).ok()?,
        );
        c.read(&h, name)
    }

    fn value_of(set_cookie: &HeaderValue) -> String {
        let s = set_cookie.to_str().expect("ascii");
        let pair = s.split(';').next().expect("a pair");
        pair.split_once('=').expect("name=value").1.to_owned()
    }

    proptest! {
        #[test]
        fn signed_cookies_verify_under_their_key_only(
            id in id(),
            key in "[ -~]{32,64}",
            other in "[ -~]{32,64}",
            flip in any::<prop::sample::Index>(),
        ) {
            let c = CookieConfig::new(Codec::Signed(SigningKeys::new([&key]).expect("key")));
            let value = value_of(&c.set("session", &id, 60));
            prop_assert_eq!(cookie(&c, "session", &value), Some((id.clone(), false)));
            if other != key {
                let o = CookieConfig::new(Codec::Signed(SigningKeys::new([&other]).expect("key")));
                prop_assert_eq!(cookie(&o, "session", &value), None);
            }
            // Any one character changed (to another of the alphabet) fails.
            let mut bytes = value.into_bytes();
            let i = flip.index(bytes.len());
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let tampered = String::from_utf8(bytes).expect("ascii");
            prop_assert_eq!(cookie(&c, "session", &tampered), None);
        }

        #[test]
        fn express_cookies_round_trip_as_express_session_writes_them(
            id in id(),
            secret in "\\PC{1,40}",
        ) {
            let c = CookieConfig::new(Codec::Express(ExpressSecrets::new([&secret]).expect("secret")));
            let value = value_of(&c.set("connect.sid", &id, 60));
            prop_assert!(value.starts_with("s%3A"));
            prop_assert!(!value.contains('='), "never padded: {}", value);
            prop_assert_eq!(cookie(&c, "connect.sid", &value), Some((id.clone(), false)));
            let raw = percent_decode(&value).expect("decodes");
            prop_assert_eq!(cookie(&c, "connect.sid", &raw), Some((id, false)));
        }

        #[test]
        fn percent_encoding_round_trips(s in "\\PC*") {
            let encoded = percent_encode(&s);
            prop_assert!(encoded.is_ascii());
            prop_assert_eq!(percent_decode(&encoded), Some(s));
        }
    }
}
