//! The opaque handle administrators see for a session: the first 8 bytes of
//! the SHA-256 of its storage key, in hex. The session computes it for its
//! own row, admin statements find rows by it in SQL; both come from here,
//! and `tests/session.rs` checks that they agree.

use sha2::{Digest, Sha256};

/// Hex digits in a handle.
const HANDLE_LEN: usize = 16;

/// The handle of the row stored under `storage_key`.
pub(crate) fn handle(storage_key: &str) -> String {
    Sha256::digest(storage_key.as_bytes())[..HANDLE_LEN / 2]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// SQL computing the handle of the row whose storage key is `column`.
pub(crate) fn handle_sql(column: &str) -> String {
    format!("left(encode(sha256(convert_to({column}, 'UTF8')), 'hex'), {HANDLE_LEN})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_is_16_hex_digits_of_the_keys_sha256() {
        // printf abc | sha256sum: ba7816bf8f01cfea414140de5dae2223…
        assert_eq!(handle("abc"), "ba7816bf8f01cfea");
        assert_eq!(
            handle_sql("sid"),
            "left(encode(sha256(convert_to(sid, 'UTF8')), 'hex'), 16)"
        );
    }
}
