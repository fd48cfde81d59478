//! Fresh private keys for `private_key_jwt`, from `openssl genpkey`.

use tower_pg_session::oidc::{ClientKey, KeyAlg};

/// A fresh private key, PKCS#8 PEM, from `openssl genpkey` with `args`.
pub fn genpkey(args: &[&str]) -> String {
    let out = std::process::Command::new("openssl")
        .arg("genpkey")
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// A fresh 2048-bit RSA key.
pub fn rsa_pem() -> String {
    genpkey(&["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
}

/// A fresh P-256 key.
pub fn ec_pem() -> String {
    genpkey(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"])
}

/// A fresh key for `alg`.
pub fn key(alg: KeyAlg) -> ClientKey {
    let pem = if alg == KeyAlg::Es256 {
        ec_pem()
    } else {
        rsa_pem()
    };
    ClientKey::from_pem(&pem, alg).unwrap()
}

/// The public JWKS of `keys`, as registered at the provider.
pub fn jwks(keys: &[&ClientKey]) -> String {
    serde_json::json!({"keys": keys.iter().map(|k| k.public_jwk()).collect::<Vec<_>>()}).to_string()
}
