//! Any pluginConfig bytes: a config or an error naming a field, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = meshtel_filter::config::parse(data) {
        assert!(!e.field.is_empty());
    }
});
