//! The proxy-wasm glue: the only code that talks to the host.

mod host;
mod http;
mod root;
mod tcp;

proxy_wasm::main! {{
    // Also installs the SDK's panic hook, which logs a panic at Critical before the VM aborts.
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|id| Box::new(root::Root::new(id)));
}}
