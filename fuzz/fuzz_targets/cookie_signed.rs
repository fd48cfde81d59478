#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tower_pg_session::fuzz::cookie_signed(data));
