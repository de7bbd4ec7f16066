//! Any pluginConfig bytes: a config or an error naming a field, never a panic, and an error
//! that fits one log line whatever the input's size.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = meshtel_filter::config::parse(data) {
        assert!(!e.field.is_empty());
        let text = e.to_string();
        assert!(text.len() <= meshtel_filter::config::MAX_ERROR_LEN, "{} bytes: {}", text.len(), &text[..200]);
    }
});
