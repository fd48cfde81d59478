//! Property tests of the sealed-token envelope, through the public API:
//! whatever is sealed opens to itself under the same binding, and under no
//! other binding, key, or altered envelope.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use tower_pg_session::crypto::{Aad, EncryptionKey, Keyring};

fn keyring() -> impl Strategy<Value = (Keyring, Keyring)> {
    (any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(a, b)| {
        let (a, b) = (EncryptionKey::from_bytes(a), EncryptionKey::from_bytes(b));
        // The current key first; the old one still opens what it sealed.
        (Keyring::from(b.clone()), Keyring::new(vec![a, b]).unwrap())
    })
}

proptest! {
    #[test]
    fn seal_then_open_round_trips(
        (old, rotated) in keyring(),
        plaintext in prop::collection::vec(any::<u8>(), 0..512),
        session in "\\PC{0,64}",
        field in "[a-z_]{1,16}",
    ) {
        let aad = Aad { session: &session, field: &field };
        let sealed = old.seal(&plaintext, &aad);
        let opened = old.open(&sealed, &aad).unwrap();
        prop_assert_eq!(opened.plaintext(), &plaintext[..]);
        prop_assert!(!opened.needs_reseal());
        // After a rotation it still opens, and asks to be sealed anew.
        let opened = rotated.open(&sealed, &aad).unwrap();
        prop_assert_eq!(opened.plaintext(), &plaintext[..]);
        prop_assert!(opened.needs_reseal());
        // Bound to its session and field.
        let moved = format!("{session}x");
        let elsewhere = Aad { session: &moved, field: &field };
        prop_assert!(old.open(&sealed, &elsewhere).is_err());
        let other_field = Aad { session: &session, field: "other" };
        prop_assert!(old.open(&sealed, &other_field).is_err());
    }

    #[test]
    fn an_altered_envelope_never_opens(
        (old, _) in keyring(),
        plaintext in prop::collection::vec(any::<u8>(), 0..64),
        at in any::<prop::sample::Index>(),
        to in "[A-Za-z0-9_-]",
    ) {
        let aad = Aad { session: "s", field: "access_token" };
        let sealed = old.seal(&plaintext, &aad);
        let i = at.index(sealed.len());
        let mut altered = sealed.clone();
        altered.replace_range(i..=i, &to);
        prop_assume!(altered != sealed);
        // The last character may carry unused bits: those decode the same
        // or are refused as non-canonical; no altered envelope opens.
        prop_assert!(old.open(&altered, &aad).is_err());
    }
}
