#![no_main]

libfuzzer_sys::fuzz_target!(|text: &str| tower_pg_session::fuzz::logout_token(text));
