//! Encryption at rest for OAuth 2.0 / OpenID Connect tokens (access, refresh
//! and ID tokens) kept inside session data.
//!
//! Tokens are sealed with AES-256-GCM under the first key of a [`Keyring`] and
//! opened with whichever key of the ring sealed them. Each sealed value is bound
//! to the session and the field it is stored in ([`Aad`]), so a value copied to
//! another session or another field fails to open.
//!
//! # Usage
//!
//! ```
//! use tower_pg_session::crypto::{Aad, Keyring};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Comma-separated base64 keys, e.g. from an environment variable or a secret
//! // store: the first one seals, every one opens. Make your own keys with
//! // `openssl rand -base64 32`; never use these example keys.
//! let keyring = Keyring::from_base64_list(
//!     "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=, ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=",
//! )?;
//!
//! let aad = Aad { session: "the session's storage key", field: "access_token" };
//! let sealed: String = keyring.seal(b"ya29.an-access-token", &aad);
//!
//! let opened = keyring.open(&sealed, &aad)?;
//! assert_eq!(opened.plaintext(), b"ya29.an-access-token");
//! assert!(!opened.needs_reseal()); // sealed under the current (first) key
//!
//! // The same value moved to another field (or another session) does not open.
//! let elsewhere = Aad { session: "the session's storage key", field: "refresh_token" };
//! assert!(keyring.open(&sealed, &elsewhere).is_err());
//! # Ok(())
//! # }
//! ```
//!
//! # Envelope format (version 1)
//!
//! A sealed value is the unpadded base64url encoding (RFC 4648 §5) of:
//!
//! | bytes      | content                                                    |
//! |------------|------------------------------------------------------------|
//! | `0`        | format version, `0x01`                                     |
//! | `1..5`     | [`KeyId`] of the sealing key                               |
//! | `5..17`    | 96-bit nonce, fresh from the operating system's CSPRNG     |
//! | `17..n-16` | AES-256-GCM ciphertext, as long as the plaintext           |
//! | `n-16..n`  | 128-bit GCM authentication tag                             |
//!
//! The associated data authenticated with each value (never stored) is the
//! context string `b"tower-pg-session/token/v1"`, then the length of
//! [`Aad::session`] in bytes as a big-endian `u64`, its UTF-8 bytes, the length of
//! [`Aad::field`] as a big-endian `u64` and its UTF-8 bytes. The length
//! prefixes make the encoding unambiguous: `("ab", "c")` and `("a", "bc")`
//! authenticate different data.
//!
//! Invariants and limits:
//!
//! - The version byte, key id and nonce are not secret; they are covered by the
//!   tag only indirectly (a changed key id or nonce selects a different key or
//!   keystream, so the tag check fails; a changed version byte is refused).
//! - The envelope hides the plaintext's content, not its length.
//! - Nonces are random 96-bit values and MUST be unique per message under a
//!   given key: a repeated (key, nonce) pair reveals the XOR of the two
//!   plaintexts and lets an attacker forge tags under that key. With random
//!   nonces, NIST SP 800-38D (§8.3) caps the number of encryptions under one
//!   key at 2^32; keep every key far below that (each call to
//!   [`Keyring::seal`] is one encryption) and rotate keys well before it.
//!
//! # Key rotation
//!
//! 1. Put the new key first and keep the old ones after it:
//!    `new, old`. Values are now sealed under `new`; values sealed under `old`
//!    still open, and [`Opened::needs_reseal`] says so, so that the caller seals
//!    them again under the new key on its next write.
//! 2. Once no stored value can still be sealed under `old` (every session that
//!    held one has been written again or has expired), remove `old`. Values it
//!    sealed no longer open.
//!
//! Key ids are derived from the key bytes, not from positions, so the list can
//! be reordered freely.
//!
//! Because a value is bound to the session's storage key, a value must be
//! opened with the old [`Aad`] and sealed again with the new one whenever the
//! session's storage key changes (a new session id, or switching between hashed
//! and plain ids).

use std::{fmt, str::FromStr};

use aes_gcm::{
    aead::{AeadInPlace, KeyInit},
    Aes256Gcm, Nonce, Tag,
};
use base64::{
    alphabet,
    engine::{
        general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD},
        DecodePaddingMode,
    },
    Engine as _,
};
use rand::{rngs::OsRng, RngCore};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Length of an [`EncryptionKey`] in bytes.
const KEY_LEN: usize = 32;
/// Version byte of the envelope format documented in the module docs.
const VERSION: u8 = 0x01;
/// Length of a [`KeyId`] in bytes.
const KEY_ID_LEN: usize = 4;
/// Length of the GCM nonce in bytes (96 bits).
const NONCE_LEN: usize = 12;
/// Length of the GCM tag in bytes (128 bits).
const TAG_LEN: usize = 16;
/// Version, key id and nonce.
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;
/// Domain separation for key ids, so they never equal any other hash of the key.
const KEY_ID_PREFIX: &[u8] = b"tower-pg-session key id\0";
/// Context string at the start of the associated data.
const AAD_CONTEXT: &[u8] = b"tower-pg-session/token/v1";

/// Base64 decoding of keys: padding optional, but if present it must be right.
const KEY_B64_CONFIG: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const KEY_B64_STANDARD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, KEY_B64_CONFIG);
const KEY_B64_URL_SAFE: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, KEY_B64_CONFIG);

/// A 256-bit AES-GCM key for sealing tokens.
///
/// The bytes are overwritten with zeros when the key is dropped. `Debug`
/// prints `EncryptionKey([redacted])`; there is deliberately no `PartialEq`
/// (compare [`EncryptionKey::id`] instead).
#[derive(Clone)]
pub struct EncryptionKey([u8; KEY_LEN]);

impl EncryptionKey {
    /// Parses a key from base64: the standard or the URL-safe alphabet, with or
    /// without `=` padding, surrounding whitespace ignored. It must decode to
    /// exactly 32 bytes.
    ///
    /// # Errors
    ///
    /// [`KeyError::NotBase64`] if the text is not base64, and
    /// [`KeyError::WrongLength`] if it does not decode to 32 bytes. Neither
    /// error contains any part of the input.
    pub fn from_base64(encoded: &str) -> Result<Self, KeyError> {
        Self::parse(encoded.trim(), None)
    }

    /// Makes a key from raw bytes.
    ///
    /// The key zeroizes its own copy on drop; zeroizing `bytes` wherever they
    /// came from is up to the caller.
    #[must_use]
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// Generates a new random key from the operating system's CSPRNG.
    ///
    /// # Panics
    ///
    /// If the operating system's random number generator fails.
    #[must_use]
    pub fn generate() -> Self {
        let mut key = Self([0; KEY_LEN]);
        OsRng.fill_bytes(&mut key.0);
        key
    }

    /// The raw key bytes.
    ///
    /// # Security Warning
    ///
    /// This exposes the secret key material. Anyone who learns it can read
    /// every token sealed under it and forge sealed values that open. Do not
    /// log, print, serialize or store the bytes, and do not copy them out of
    /// the returned reference: copies are not zeroized.
    #[must_use]
    pub fn secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The key's id: the first 4 bytes of SHA-256 over
    /// `b"tower-pg-session key id\0"` followed by the key bytes.
    #[must_use]
    pub fn id(&self) -> KeyId {
        let digest = Sha256::new()
            .chain_update(KEY_ID_PREFIX)
            .chain_update(self.0)
            .finalize();
        KeyId([digest[0], digest[1], digest[2], digest[3]])
    }

    /// Decodes an already trimmed key; `index` is its position in a list.
    fn parse(encoded: &str, index: Option<usize>) -> Result<Self, KeyError> {
        // Reserve enough up front that decoding never reallocates and leaves a
        // copy of the key in freed memory; the buffer is zeroized on drop.
        let mut decoded = Zeroizing::new(Vec::with_capacity(base64::decoded_len_estimate(
            encoded.len(),
        )));
        if KEY_B64_STANDARD.decode_vec(encoded, &mut decoded).is_err() {
            decoded.clear();
            KEY_B64_URL_SAFE
                .decode_vec(encoded, &mut decoded)
                .map_err(|_| KeyError::NotBase64 { index })?;
        }
        if decoded.len() != KEY_LEN {
            return Err(KeyError::WrongLength {
                index,
                len: decoded.len(),
            });
        }
        let mut key = Self([0; KEY_LEN]);
        key.0.copy_from_slice(&decoded);
        Ok(key)
    }
}

impl Drop for EncryptionKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for EncryptionKey {}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey([redacted])")
    }
}

impl FromStr for EncryptionKey {
    type Err = KeyError;

    /// Same as [`EncryptionKey::from_base64`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_base64(s)
    }
}

/// A 4-byte identifier of an [`EncryptionKey`], stored in each sealed value to
/// pick the key that opens it.
///
/// Derived from the key bytes ([`EncryptionKey::id`]), so it does not depend on
/// the key's position in a [`Keyring`]. It is not secret. `Display` and `Debug`
/// show it as 8 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId([u8; KEY_ID_LEN]);

impl KeyId {
    /// The id's bytes, as stored in the envelope.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; KEY_ID_LEN] {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::hex::encode(&self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// Where a sealed value lives; authenticated with it, never stored in it.
///
/// `Debug` leaves out `session`, which may be the session id itself.
#[derive(Clone, Copy)]
pub struct Aad<'a> {
    /// The session's storage key (the key its row is stored under).
    pub session: &'a str,
    /// The name of the field inside the session data, e.g. `"access_token"`.
    pub field: &'a str,
}

impl Aad<'_> {
    /// The unambiguous byte encoding described in the module docs.
    fn encode(&self) -> Vec<u8> {
        let (session, field) = (self.session.as_bytes(), self.field.as_bytes());
        let mut out = Vec::with_capacity(AAD_CONTEXT.len() + 16 + session.len() + field.len());
        out.extend_from_slice(AAD_CONTEXT);
        // usize is at most 64 bits on every supported target: lossless.
        out.extend_from_slice(&(session.len() as u64).to_be_bytes());
        out.extend_from_slice(session);
        out.extend_from_slice(&(field.len() as u64).to_be_bytes());
        out.extend_from_slice(field);
        out
    }
}

impl fmt::Debug for Aad<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Aad")
            .field("session", &format_args!("[redacted]"))
            .field("field", &self.field)
            .finish()
    }
}

/// The keys that seal and open tokens: the first key seals, every key opens.
///
/// Never empty, and no two keys share a [`KeyId`]. `Debug` shows only the key
/// ids. See the module docs for the envelope format and for key rotation.
#[derive(Clone)]
pub struct Keyring {
    /// Never empty; the first entry seals.
    keys: Vec<(KeyId, EncryptionKey)>,
}

impl Keyring {
    /// Builds a keyring. The first key seals new values; all of them open.
    ///
    /// # Errors
    ///
    /// [`KeyError::Empty`] if `keys` is empty, and
    /// [`KeyError::DuplicateKeyId`] if two keys have the same id (the same key
    /// listed twice).
    pub fn new(keys: Vec<EncryptionKey>) -> Result<Self, KeyError> {
        if keys.is_empty() {
            return Err(KeyError::Empty);
        }
        let keys: Vec<(KeyId, EncryptionKey)> = keys.into_iter().map(|k| (k.id(), k)).collect();
        for (second, (id, _)) in keys.iter().enumerate() {
            if let Some(first) = keys[..second].iter().position(|(other, _)| other == id) {
                return Err(KeyError::DuplicateKeyId {
                    first,
                    second,
                    id: *id,
                });
            }
        }
        Ok(Self { keys })
    }

    /// Parses a comma-separated list of base64 keys (each as in
    /// [`EncryptionKey::from_base64`]; whitespace around each key is ignored)
    /// and builds a keyring from them, in order.
    ///
    /// # Errors
    ///
    /// [`KeyError::Empty`] if the list is empty or blank;
    /// [`KeyError::NotBase64`] or [`KeyError::WrongLength`] for a bad key (also
    /// an empty entry, as in `"a,,b"`), with its 0-based `index` in the list;
    /// [`KeyError::DuplicateKeyId`] if a key is listed twice.
    pub fn from_base64_list(list: &str) -> Result<Self, KeyError> {
        if list.trim().is_empty() {
            return Err(KeyError::Empty);
        }
        let keys = list
            .split(',')
            .enumerate()
            .map(|(index, encoded)| EncryptionKey::parse(encoded.trim(), Some(index)))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(keys)
    }

    /// A keyring of one fresh random key, for tests and throwaway demos:
    /// what it seals does not survive a restart.
    #[must_use]
    pub fn generate() -> Self {
        Self::from(EncryptionKey::generate())
    }

    /// The id of the key that seals: the first one.
    #[must_use]
    pub fn current_key_id(&self) -> KeyId {
        self.keys[0].0
    }

    /// The ids of all keys, in order; the first one seals.
    #[must_use]
    pub fn key_ids(&self) -> impl ExactSizeIterator<Item = KeyId> + '_ {
        self.keys.iter().map(|(id, _)| *id)
    }

    /// Encrypts and authenticates `plaintext` under the first key, bound to
    /// `aad`, with a fresh random 96-bit nonce from the operating system's
    /// CSPRNG. Returns the envelope described in the module docs, as unpadded
    /// base64url: `ceil((33 + plaintext.len()) * 4 / 3)` characters, safe in
    /// JSON strings, URLs and cookies.
    ///
    /// Sealing the same plaintext twice gives different results. Each call
    /// counts towards the per-key limit in the module docs (far below 2^32
    /// seals per key).
    ///
    /// # Panics
    ///
    /// If the operating system's random number generator fails, or if
    /// `plaintext` or the encoded `aad` is longer than AES-GCM allows (64 GiB).
    #[must_use]
    pub fn seal(&self, plaintext: &[u8], aad: &Aad<'_>) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        URL_SAFE_NO_PAD.encode(self.seal_envelope(plaintext, aad, &nonce))
    }

    /// [`Keyring::seal`] with a caller-chosen nonce, for known-answer tests.
    #[cfg(test)]
    fn seal_with_nonce(&self, plaintext: &[u8], aad: &Aad<'_>, nonce: &[u8; NONCE_LEN]) -> String {
        URL_SAFE_NO_PAD.encode(self.seal_envelope(plaintext, aad, nonce))
    }

    /// The binary envelope.
    fn seal_envelope(&self, plaintext: &[u8], aad: &Aad<'_>, nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
        let (id, key) = &self.keys[0];
        // Exact capacity: the plaintext copied in below is encrypted in place
        // and never left behind by a reallocation.
        let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
        out.push(VERSION);
        out.extend_from_slice(&id.0);
        out.extend_from_slice(nonce);
        out.extend_from_slice(plaintext);
        let tag = Aes256Gcm::new(key.secret().into())
            .encrypt_in_place_detached(
                Nonce::from_slice(nonce),
                &aad.encode(),
                &mut out[HEADER_LEN..],
            )
            .expect("AES-GCM encryption fails only for inputs over 64 GiB");
        out.extend_from_slice(&tag);
        out
    }

    /// Authenticates and decrypts a value made by [`Keyring::seal`] with the
    /// key whose id it carries, checking that it was sealed with the same `aad`.
    ///
    /// [`Opened::needs_reseal`] is true if that key is not the first one, so
    /// that the caller seals the plaintext again on its next write.
    ///
    /// # Errors
    ///
    /// [`CryptoError`] if the value is not unpadded base64url, is too short,
    /// has an unknown version, names a key not in this keyring, was sealed with
    /// another `aad`, or was altered in any way. The error does not say which.
    pub fn open(&self, sealed: &str, aad: &Aad<'_>) -> Result<Opened, CryptoError> {
        // Decrypted in place: the buffer ends up holding the plaintext, and is
        // zeroized on drop (spare capacity included).
        let mut data = Zeroizing::new(Vec::new());
        URL_SAFE_NO_PAD
            .decode_vec(sealed, &mut data)
            .map_err(|_| CryptoError::new(Reason::NotBase64))?;
        if data.len() < HEADER_LEN + TAG_LEN {
            return Err(CryptoError::new(Reason::Truncated));
        }
        if data[0] != VERSION {
            return Err(CryptoError::new(Reason::UnknownVersion));
        }
        let id = KeyId([data[1], data[2], data[3], data[4]]);
        let (index, (_, key)) = self
            .keys
            .iter()
            .enumerate()
            .find(|(_, (known, _))| *known == id)
            .ok_or_else(|| CryptoError::new(Reason::UnknownKeyId))?;
        let nonce = *Nonce::from_slice(&data[1 + KEY_ID_LEN..HEADER_LEN]);
        let tag_start = data.len() - TAG_LEN;
        let tag = *Tag::from_slice(&data[tag_start..]);
        Aes256Gcm::new(key.secret().into())
            .decrypt_in_place_detached(
                &nonce,
                &aad.encode(),
                &mut data[HEADER_LEN..tag_start],
                &tag,
            )
            .map_err(|_| CryptoError::new(Reason::Unauthentic))?;
        data.truncate(tag_start);
        data.drain(..HEADER_LEN);
        Ok(Opened {
            plaintext: data,
            needs_reseal: index != 0,
        })
    }
}

impl From<EncryptionKey> for Keyring {
    /// A keyring of one key.
    fn from(key: EncryptionKey) -> Self {
        Self {
            keys: vec![(key.id(), key)],
        }
    }
}

impl FromStr for Keyring {
    type Err = KeyError;

    /// Same as [`Keyring::from_base64_list`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_base64_list(s)
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("key_ids", &KeyIds(self))
            .finish()
    }
}

/// `Debug` of a keyring's ids as a list of hex strings.
struct KeyIds<'a>(&'a Keyring);

impl fmt::Debug for KeyIds<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.key_ids().map(|id| id.to_string()))
            .finish()
    }
}

/// SQL giving the key id (8 hex digits, as [`KeyId`] displays it) a sealed
/// value was sealed under, read from the envelope's header: the first 8
/// base64url characters of `expr` (a text expression) decode to the version
/// byte, the 4-byte key id and a nonce byte; `'malformed'` for anything else.
pub(crate) fn key_id_sql(expr: &str) -> String {
    format!(
        "CASE WHEN {expr} ~ '^[A-Za-z0-9_-]{{8}}' THEN encode(substring(decode(\
           translate(left({expr}, 8), '-_', '+/'), 'base64') FROM 2 FOR 4), 'hex') \
         ELSE 'malformed' END"
    )
}

/// A value opened by [`Keyring::open`].
///
/// The plaintext is zeroized on drop; `Debug` shows only its length.
pub struct Opened {
    plaintext: Zeroizing<Vec<u8>>,
    needs_reseal: bool,
}

impl Opened {
    /// The decrypted bytes.
    #[must_use]
    pub fn plaintext(&self) -> &[u8] {
        &self.plaintext
    }

    /// The decrypted bytes, still zeroized on drop.
    #[must_use]
    pub fn into_plaintext(self) -> Zeroizing<Vec<u8>> {
        self.plaintext
    }

    /// Whether the value was sealed under a key other than the keyring's
    /// current (first) key. If so, seal the plaintext again on the next write,
    /// so that the old key can eventually be retired.
    #[must_use]
    pub fn needs_reseal(&self) -> bool {
        self.needs_reseal
    }
}

impl fmt::Debug for Opened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opened")
            .field(
                "plaintext",
                &format_args!("[redacted; {} bytes]", self.plaintext.len()),
            )
            .field("needs_reseal", &self.needs_reseal)
            .finish()
    }
}

/// A sealed value could not be opened.
///
/// Deliberately opaque: the message and `Debug` are the same whatever check
/// failed (malformed encoding, truncation, unknown version, unknown key id,
/// wrong associated data, altered bytes), so the error tells an attacker
/// nothing about which one.
#[derive(thiserror::Error)]
#[error("token decryption failed")]
pub struct CryptoError {
    reason: Reason,
}

impl CryptoError {
    fn new(reason: Reason) -> Self {
        Self { reason }
    }

    /// Which check failed, for server-side logs only; never show it to clients.
    #[allow(dead_code, reason = "for callers' logs; tests use the field")]
    pub(crate) fn reason(&self) -> &'static str {
        match self.reason {
            Reason::NotBase64 => "not unpadded base64url",
            Reason::Truncated => "too short",
            Reason::UnknownVersion => "unknown envelope version",
            Reason::UnknownKeyId => "unknown key id",
            Reason::Unauthentic => "authentication failed",
        }
    }
}

impl fmt::Debug for CryptoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CryptoError").finish_non_exhaustive()
    }
}

/// Why [`Keyring::open`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    NotBase64,
    Truncated,
    UnknownVersion,
    UnknownKeyId,
    Unauthentic,
}

/// An encryption key or keyring was rejected. Messages never contain key
/// material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The text is not base64 in the standard or URL-safe alphabet (with
    /// correct or no padding).
    #[error("encryption key{} is not valid base64", Position(*index))]
    NotBase64 {
        /// 0-based position of the key in a comma-separated list (0 is the key
        /// that seals), or `None` for a single key.
        index: Option<usize>,
    },
    /// The base64 decodes to a number of bytes other than 32.
    #[error("encryption key{} decodes to {len} bytes; exactly 32 are required", Position(*index))]
    WrongLength {
        /// 0-based position of the key in a comma-separated list (0 is the key
        /// that seals), or `None` for a single key.
        index: Option<usize>,
        /// The number of bytes it decodes to.
        len: usize,
    },
    /// No keys were given.
    #[error("no encryption keys given; at least one is required")]
    Empty,
    /// Two keys have the same [`KeyId`]: the same key is listed twice.
    #[error(
        "encryption keys {first} and {second} have the same key id {id}; remove the duplicate"
    )]
    DuplicateKeyId {
        /// 0-based position of the first of the two.
        first: usize,
        /// 0-based position of the second.
        second: usize,
        /// Their id.
        id: KeyId,
    },
}

/// Formats an optional list position as `" 2"` or nothing.
struct Position(Option<usize>);

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(index) => write!(f, " {index}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE};

    use super::*;

    use crate::hex::encode as hex;

    fn unhex(s: &str) -> Vec<u8> {
        assert_eq!(s.len() % 2, 0, "odd-length hex");
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("test vector hex"))
            .collect()
    }

    fn key(hex_key: &str) -> EncryptionKey {
        EncryptionKey(unhex(hex_key).try_into().expect("32-byte test key"))
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn unb64(s: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD
            .decode(s)
            .expect("sealed value is base64url")
    }

    const AAD: Aad<'static> = Aad {
        session: "sess-1",
        field: "access_token",
    };

    struct Vector {
        key: &'static str,
        nonce: &'static str,
        session: &'static str,
        field: &'static str,
        plaintext: &'static [u8],
        key_id: &'static str,
        envelope: &'static str,
    }

    /// Computed independently with Python's `cryptography` (AESGCM) and
    /// `hashlib`, following the format in the module docs.
    const VECTORS: &[Vector] = &[
        Vector {
            key: "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
            nonce: "cafebabefacedbaddecaf888",
            session: "sess-1",
            field: "access_token",
            plaintext: b"ya29.example-access-token",
            key_id: "f2dffde9",
            envelope: "01f2dffde9cafebabefacedbaddecaf888\
                       f3c2921f841f377a2b7b31b8567cea5c6853b37cab76011120\
                       492dde6c0f3132ab8964b8552776bcb6",
        },
        // Empty plaintext, empty session and field: header and tag only.
        Vector {
            key: "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
            nonce: "cafebabefacedbaddecaf888",
            session: "",
            field: "",
            plaintext: b"",
            key_id: "860c538f",
            envelope: "01860c538fcafebabefacedbaddecaf888\
                       54c286bcb45eecbf2d9eb3c8ce093d84",
        },
        // Non-ASCII session (lengths count UTF-8 bytes), longer plaintext.
        Vector {
            key: "4242424242424242424242424242424242424242424242424242424242424242",
            nonce: "000000000000000000000000",
            session: "s\u{eb}ssion-\u{fc}",
            field: "refresh_token",
            plaintext: b"1//0gAbCdEfGhIjKlMnOpQrStUvWxYz-0123456789_abcdefghijklmnopqrstuvwxyz",
            key_id: "a3182b58",
            envelope: "01a3182b58000000000000000000000000\
                       c59dd0c93bcde7a4fd0a2d4859c2df1abdb3883d487bd9e8b86d98aae6576118\
                       8f647948fd4e027fc8b5866065eecd994af6f75cc91971bfb86b0429659a6058\
                       cd104510e7d9b793408f0d88\
                       267dfb7a193c41ca70",
        },
        // As the first, another field: same ciphertext (same key and nonce),
        // different tag. (Nonce reuse is only acceptable in a test vector.)
        Vector {
            key: "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
            nonce: "cafebabefacedbaddecaf888",
            session: "sess-1",
            field: "id_token",
            plaintext: b"ya29.example-access-token",
            key_id: "f2dffde9",
            envelope: "01f2dffde9cafebabefacedbaddecaf888\
                       f3c2921f841f377a2b7b31b8567cea5c6853b37cab76011120\
                       a174056f2d4092530b756df9cfcff399",
        },
    ];

    #[test]
    fn known_answer_vectors() {
        for (i, v) in VECTORS.iter().enumerate() {
            let expected: String = v.envelope.split_whitespace().collect();
            let k = key(v.key);
            assert_eq!(k.id().to_string(), v.key_id, "vector {i}: key id");
            let ring = Keyring::from(k);
            let aad = Aad {
                session: v.session,
                field: v.field,
            };
            let nonce: [u8; NONCE_LEN] = unhex(v.nonce).try_into().expect("12-byte nonce");
            let sealed = ring.seal_with_nonce(v.plaintext, &aad, &nonce);
            assert_eq!(hex(&unb64(&sealed)), expected, "vector {i}: envelope");
            assert_eq!(
                unb64(&sealed).len(),
                HEADER_LEN + v.plaintext.len() + TAG_LEN
            );
            let opened = ring.open(&sealed, &aad).expect("vector opens");
            assert_eq!(opened.plaintext(), v.plaintext, "vector {i}: round trip");
            assert!(!opened.needs_reseal());
            // The pinned hex also opens (independent of seal_with_nonce).
            let opened = ring
                .open(&b64(&unhex(&expected)), &aad)
                .expect("pinned envelope opens");
            assert_eq!(opened.plaintext(), v.plaintext);
        }
    }

    #[test]
    fn known_answer_string() {
        let ring = Keyring::from(key(VECTORS[0].key));
        let nonce: [u8; NONCE_LEN] = unhex(VECTORS[0].nonce).try_into().expect("nonce");
        assert_eq!(
            ring.seal_with_nonce(VECTORS[0].plaintext, &AAD, &nonce),
            "AfLf_enK_rq--s7brd7K-IjzwpIfhB83eit7MbhWfOpcaFOzfKt2AREgSS3ebA8xMquJZLhVJ3a8tg"
        );
    }

    #[test]
    fn aad_encoding_is_pinned_and_unambiguous() {
        let aad = Aad {
            session: "ab",
            field: "c",
        };
        assert_eq!(
            hex(&aad.encode()),
            "746f7765722d70672d73657373696f6e2f746f6b656e2f7631\
             0000000000000002 6162 0000000000000001 63"
                .split_whitespace()
                .collect::<String>()
        );
        let other = Aad {
            session: "a",
            field: "bc",
        };
        assert_ne!(aad.encode(), other.encode());
    }

    #[test]
    fn round_trip() {
        let ring = Keyring::from(EncryptionKey::generate());
        let long = vec![0xa5u8; 10_000];
        let inputs: [&[u8]; 5] = [
            b"",
            b"x",
            "t\u{f6}ken \u{2603}".as_bytes(),
            &long,
            &[0u8; 64],
        ];
        for plaintext in inputs {
            let sealed = ring.seal(plaintext, &AAD);
            let envelope_len = HEADER_LEN + plaintext.len() + TAG_LEN;
            assert_eq!(sealed.len(), (envelope_len * 4).div_ceil(3));
            assert!(sealed
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
            let opened = ring.open(&sealed, &AAD).expect("opens");
            assert_eq!(opened.plaintext(), plaintext);
            assert!(!opened.needs_reseal());
            assert_eq!(&opened.into_plaintext()[..], plaintext);
        }
    }

    #[test]
    fn nonces_are_fresh() {
        let ring = Keyring::from(EncryptionKey::generate());
        let a = unb64(&ring.seal(b"same", &AAD));
        let b = unb64(&ring.seal(b"same", &AAD));
        assert_ne!(a[1 + KEY_ID_LEN..HEADER_LEN], b[1 + KEY_ID_LEN..HEADER_LEN]);
        assert_ne!(a, b);
    }

    #[test]
    fn rotation() {
        let old = EncryptionKey::generate();
        let new = EncryptionKey::generate();
        let old_ring = Keyring::from(old.clone());
        let rotated = Keyring::new(vec![new.clone(), old.clone()]).expect("two keys");
        assert_eq!(rotated.current_key_id(), new.id());
        assert_eq!(
            rotated.key_ids().collect::<Vec<_>>(),
            vec![new.id(), old.id()]
        );

        // Sealed under the old key: opens, and asks to be sealed again.
        let by_old = old_ring.seal(b"refresh", &AAD);
        let opened = rotated.open(&by_old, &AAD).expect("old key still opens");
        assert_eq!(opened.plaintext(), b"refresh");
        assert!(opened.needs_reseal());

        // Re-sealed under the ring: the new key, no further re-seal.
        let resealed = rotated.seal(opened.plaintext(), &AAD);
        assert_eq!(&unb64(&resealed)[1..5], new.id().as_bytes());
        let opened = rotated.open(&resealed, &AAD).expect("new key opens");
        assert!(!opened.needs_reseal());

        // Ids come from the bytes, so reordering keeps old values readable.
        let reordered = Keyring::new(vec![old.clone(), new.clone()]).expect("two keys");
        assert!(reordered
            .open(&resealed, &AAD)
            .expect("reordered")
            .needs_reseal());
        assert!(!reordered
            .open(&by_old, &AAD)
            .expect("reordered")
            .needs_reseal());

        // Old key retired: its values no longer open.
        let retired = Keyring::from(new);
        let err = retired.open(&by_old, &AAD).expect_err("old key removed");
        assert_eq!(err.reason, Reason::UnknownKeyId);
        assert!(retired.open(&resealed, &AAD).is_ok());
    }

    /// Every failure looks the same from outside.
    fn assert_opaque(err: &CryptoError) {
        assert_eq!(err.to_string(), "token decryption failed");
        assert_eq!(format!("{err:?}"), "CryptoError { .. }");
        assert!(std::error::Error::source(err).is_none());
    }

    #[test]
    fn every_flipped_byte_fails() {
        let ring = Keyring::from(key(VECTORS[0].key));
        let sealed = unb64(&ring.seal(b"an access token", &AAD));
        for pos in 0..sealed.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut tampered = sealed.clone();
                tampered[pos] ^= mask;
                let err = ring
                    .open(&b64(&tampered), &AAD)
                    .expect_err("tampered value must not open");
                assert_opaque(&err);
                let expected = match pos {
                    0 => Reason::UnknownVersion,
                    1..=4 => Reason::UnknownKeyId,
                    _ => Reason::Unauthentic, // nonce, ciphertext, tag
                };
                assert_eq!(err.reason, expected, "byte {pos} ^ {mask:#04x}");
            }
        }
    }

    #[test]
    fn key_id_of_another_key_in_the_ring_fails() {
        let a = EncryptionKey::generate();
        let b = EncryptionKey::generate();
        let ring = Keyring::new(vec![a, b.clone()]).expect("two keys");
        let mut sealed = unb64(&ring.seal(b"token", &AAD));
        sealed[1..5].copy_from_slice(b.id().as_bytes());
        let err = ring.open(&b64(&sealed), &AAD).expect_err("wrong key");
        assert_eq!(err.reason, Reason::Unauthentic);
    }

    #[test]
    fn truncated_and_extended_values_fail() {
        let ring = Keyring::from(EncryptionKey::generate());
        let sealed = unb64(&ring.seal(b"token", &AAD));
        for len in 0..sealed.len() {
            let err = ring
                .open(&b64(&sealed[..len]), &AAD)
                .expect_err("truncated value must not open");
            assert_opaque(&err);
            let expected = if len < HEADER_LEN + TAG_LEN {
                Reason::Truncated
            } else {
                Reason::Unauthentic
            };
            assert_eq!(err.reason, expected, "length {len}");
        }
        let mut extended = sealed.clone();
        extended.push(0);
        assert!(ring.open(&b64(&extended), &AAD).is_err());
        // Truncating the text itself.
        let text = b64(&sealed);
        for len in 0..text.len() {
            assert_opaque(&ring.open(&text[..len], &AAD).expect_err("truncated text"));
        }
    }

    #[test]
    fn malformed_text_fails() {
        let ring = Keyring::from(EncryptionKey::generate());
        let sealed = ring.seal(b"token", &AAD);
        let bytes = unb64(&sealed);
        let cases = [
            String::new(),
            "!!!!".to_owned(),
            "not base64 at all".to_owned(),
            format!("{sealed} "),
            format!(" {sealed}"),
            format!("{sealed}="),
            URL_SAFE.encode(&bytes), // padded (if the length needs padding)
            STANDARD.encode(&bytes),
            STANDARD_NO_PAD.encode(&bytes),
            format!("{sealed}A"), // invalid length / trailing bits
        ];
        for case in cases {
            if case == sealed {
                continue; // an encoding that happens to coincide
            }
            let err = ring.open(&case, &AAD).expect_err("malformed must not open");
            assert_opaque(&err);
        }
        let err = ring.open("", &AAD).expect_err("empty");
        assert_eq!(err.reason, Reason::Truncated);
        let err = ring.open("!!!!", &AAD).expect_err("not base64");
        assert_eq!(err.reason, Reason::NotBase64);
    }

    #[test]
    fn wrong_aad_fails() {
        let ring = Keyring::from(EncryptionKey::generate());
        let session = "row-key-1";
        let sealed = ring.seal(
            b"token",
            &Aad {
                session,
                field: "access_token",
            },
        );
        let wrong = [
            Aad {
                session: "row-key-2",
                field: "access_token",
            },
            Aad {
                session,
                field: "refresh_token",
            },
            Aad {
                session,
                field: "id_token",
            },
            Aad {
                session: "",
                field: "access_token",
            },
            Aad {
                session: "row-key-1access_token",
                field: "",
            },
            Aad {
                session: "access_token",
                field: session,
            },
        ];
        for aad in wrong {
            let err = ring.open(&sealed, &aad).expect_err("wrong AAD must fail");
            assert_opaque(&err);
            assert_eq!(err.reason, Reason::Unauthentic, "{aad:?}");
        }
    }

    #[test]
    fn unknown_key_id_fails() {
        let sealed = Keyring::from(EncryptionKey::generate()).seal(b"token", &AAD);
        let other = Keyring::from(EncryptionKey::generate());
        let err = other.open(&sealed, &AAD).expect_err("unknown key");
        assert_opaque(&err);
        assert_eq!(err.reason, Reason::UnknownKeyId);
    }

    #[test]
    fn parse_key_encodings() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0xfb);
        let id = EncryptionKey(bytes).id();
        for encoded in [
            STANDARD.encode(bytes),
            STANDARD_NO_PAD.encode(bytes),
            URL_SAFE.encode(bytes),
            URL_SAFE_NO_PAD.encode(bytes),
            format!("  {}\n", STANDARD.encode(bytes)),
        ] {
            let k = EncryptionKey::from_base64(&encoded).expect("valid key");
            assert_eq!(k.secret(), &bytes, "{encoded}");
            assert_eq!(k.id(), id);
            assert_eq!(encoded.parse::<EncryptionKey>().expect("FromStr").id(), id);
        }
    }

    #[test]
    fn parse_key_errors() {
        let short = STANDARD.encode([7u8; 31]);
        let long = STANDARD.encode([7u8; 33]);
        let cases = [
            (
                short.as_str(),
                "encryption key decodes to 31 bytes; exactly 32 are required",
            ),
            (
                long.as_str(),
                "encryption key decodes to 33 bytes; exactly 32 are required",
            ),
            (
                "",
                "encryption key decodes to 0 bytes; exactly 32 are required",
            ),
            ("this is not base64!", "encryption key is not valid base64"),
            // Mixed alphabets, wrong padding.
            (
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaG+wd_h8=",
                "encryption key is not valid base64",
            ),
            (
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8==",
                "encryption key is not valid base64",
            ),
        ];
        for (input, message) in cases {
            let err = EncryptionKey::from_base64(input).expect_err("invalid key");
            assert_eq!(err.to_string(), message, "{input:?}");
            if !input.is_empty() {
                assert!(!err.to_string().contains(input));
                assert!(!format!("{err:?}").contains(input));
            }
        }
        assert!(matches!(
            EncryptionKey::from_base64(&short),
            Err(KeyError::WrongLength {
                index: None,
                len: 31
            })
        ));
        assert!(matches!(
            EncryptionKey::from_base64("%%%%"),
            Err(KeyError::NotBase64 { index: None })
        ));
    }

    #[test]
    fn parse_keyring() {
        let a = STANDARD.encode([1u8; 32]);
        let b = URL_SAFE_NO_PAD.encode([2u8; 32]);
        let c = STANDARD_NO_PAD.encode([3u8; 32]);
        let ring = Keyring::from_base64_list(&format!(" {a} ,{b},\n{c}\n")).expect("three keys");
        let ids: Vec<KeyId> = ring.key_ids().collect();
        assert_eq!(
            ids,
            vec![
                EncryptionKey([1; 32]).id(),
                EncryptionKey([2; 32]).id(),
                EncryptionKey([3; 32]).id()
            ]
        );
        assert_eq!(ring.current_key_id(), ids[0]);
        let parsed: Keyring = a.parse().expect("FromStr");
        assert_eq!(parsed.current_key_id(), ids[0]);
    }

    #[test]
    fn parse_keyring_errors() {
        let a = STANDARD.encode([1u8; 32]);
        let b = STANDARD.encode([2u8; 32]);
        let short = STANDARD.encode([2u8; 31]);

        let err = Keyring::from_base64_list(&format!("{a},not-base64!,{b}")).expect_err("bad");
        assert!(matches!(err, KeyError::NotBase64 { index: Some(1) }));
        assert_eq!(err.to_string(), "encryption key 1 is not valid base64");

        let err = Keyring::from_base64_list(&format!("{a}, {short}")).expect_err("short");
        assert!(matches!(
            err,
            KeyError::WrongLength {
                index: Some(1),
                len: 31
            }
        ));
        assert_eq!(
            err.to_string(),
            "encryption key 1 decodes to 31 bytes; exactly 32 are required"
        );

        for empty in ["", "   ", "\n"] {
            assert!(matches!(
                Keyring::from_base64_list(empty),
                Err(KeyError::Empty)
            ));
        }
        assert!(matches!(Keyring::new(Vec::new()), Err(KeyError::Empty)));
        assert_eq!(
            KeyError::Empty.to_string(),
            "no encryption keys given; at least one is required"
        );

        for list in [format!("{a},,{b}"), format!("{a},{b},")] {
            let err = Keyring::from_base64_list(&list).expect_err("empty entry");
            assert!(
                matches!(err, KeyError::WrongLength { len: 0, .. }),
                "{list}"
            );
        }

        let err = Keyring::from_base64_list(&format!("{a},{b},{a}")).expect_err("duplicate");
        let id = EncryptionKey([1; 32]).id();
        assert!(matches!(
            err,
            KeyError::DuplicateKeyId { first: 0, second: 2, id: dup } if dup == id
        ));
        assert_eq!(
            err.to_string(),
            format!("encryption keys 0 and 2 have the same key id {id}; remove the duplicate")
        );
        let err = Keyring::new(vec![EncryptionKey([9; 32]), EncryptionKey([9; 32])])
            .expect_err("duplicate");
        assert!(matches!(
            err,
            KeyError::DuplicateKeyId {
                first: 0,
                second: 1,
                ..
            }
        ));
    }

    /// The ways the key bytes could show up in text.
    fn renderings(bytes: &[u8; 32]) -> Vec<String> {
        vec![
            hex(bytes),
            hex(bytes).to_uppercase(),
            STANDARD.encode(bytes),
            STANDARD_NO_PAD.encode(bytes),
            URL_SAFE_NO_PAD.encode(bytes),
            format!("{bytes:?}"),
            format!("{:?}", &bytes[..8])
                .trim_end_matches(']')
                .to_owned(),
        ]
    }

    #[test]
    fn debug_never_shows_key_material() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(89) ^ 0x5c);
        let k = EncryptionKey(bytes);
        let id = k.id();
        assert_eq!(format!("{k:?}"), "EncryptionKey([redacted])");
        let ring = Keyring::new(vec![k, EncryptionKey([0x11; 32])]).expect("two keys");
        let debug = format!("{ring:?}");
        assert_eq!(
            debug,
            format!(
                "Keyring {{ key_ids: [\"{id}\", \"{}\"] }}",
                EncryptionKey([0x11; 32]).id()
            )
        );
        let pretty = format!("{ring:#?}");
        for secret in renderings(&bytes)
            .into_iter()
            .chain(renderings(&[0x11; 32]))
        {
            assert!(!debug.contains(&secret), "{debug} contains {secret}");
            assert!(!pretty.contains(&secret), "{pretty} contains {secret}");
        }
        assert_eq!(format!("{id:?}"), format!("KeyId({id})"));
        assert_eq!(id.to_string().len(), 8);
    }

    #[test]
    fn debug_never_shows_plaintext_or_session() {
        let ring = Keyring::from(EncryptionKey::generate());
        let aad = Aad {
            session: "secret-session-id",
            field: "access_token",
        };
        let opened = ring
            .open(&ring.seal(b"secret-token", &aad), &aad)
            .expect("opens");
        let debug = format!("{opened:?}");
        assert_eq!(
            debug,
            "Opened { plaintext: [redacted; 12 bytes], needs_reseal: false }"
        );
        let debug = format!("{aad:?}");
        assert!(!debug.contains("secret-session-id"));
        assert!(debug.contains("access_token"));
    }

    #[test]
    fn generated_keys_differ() {
        let a = EncryptionKey::generate();
        let b = EncryptionKey::generate();
        assert_ne!(a.secret(), b.secret());
        assert_ne!(a.secret(), &[0; 32]);
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn reasons_are_distinct_for_logs() {
        let reasons = [
            Reason::NotBase64,
            Reason::Truncated,
            Reason::UnknownVersion,
            Reason::UnknownKeyId,
            Reason::Unauthentic,
        ]
        .map(|r| CryptoError::new(r).reason());
        for (i, a) in reasons.iter().enumerate() {
            assert!(reasons[i + 1..].iter().all(|b| a != b));
        }
    }
}
