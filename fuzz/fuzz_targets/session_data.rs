#![no_main]

libfuzzer_sys::fuzz_target!(|text: &str| tower_pg_session::fuzz::session_data(text));
