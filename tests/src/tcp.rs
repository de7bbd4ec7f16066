//! A TCP stand-in app, and meshtel as Istio's TCP chains carry it: the network filter in front
//! of `tcp_proxy`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use crate::envoy::Direction;

/// What the app puts before each chunk it answers: Istio's e2e TCP server answers `world\n`
/// with `hello world\n` (istio/proxy `test/envoye2e/driver/tcp.go`).
pub const GREETING: &[u8] = b"hello ";

/// A TCP server on 127.0.0.1 that answers every chunk it reads with [`GREETING`] and the chunk,
/// until the client closes.
pub struct TcpApp {
    /// Its port.
    pub port: u16,
}

impl TcpApp {
    /// Start it on a free port.
    pub fn start() -> TcpApp {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("its address").port();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                thread::spawn(move || answer(stream));
            }
        });
        TcpApp { port }
    }
}

fn answer(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&[GREETING, &buf[..n]].concat()).is_err() {
            break;
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// One exchange over a new connection to 127.0.0.1:`port`: send `payload`, read the answer
/// (`GREETING` + payload), close. Returns the bytes read.
pub fn exchange(port: u16, payload: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("the listener accepts");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("a timeout");
    s.write_all(payload).expect("the proxy takes the bytes");
    let mut answer = vec![0u8; GREETING.len() + payload.len()];
    s.read_exact(&mut answer).expect("the app answers through the proxy");
    answer
}

/// meshtel as the network filter: root id `meshtel-tcp`, what a WasmPlugin with `type: NETWORK`
/// and `pluginName: meshtel-tcp` gives.
pub fn network_filter(wasm: &Path, plugin_config: &Value) -> Value {
    json!({
        "name": "istio.meshtel-tcp",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm",
            "config": {
                "name": "istio-system.meshtel-tcp",
                "root_id": "meshtel-tcp",
                "vm_config": {
                    "vm_id": "meshtel",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": wasm.display().to_string()}},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": plugin_config.to_string(),
                },
                "failure_policy": "FAIL_OPEN",
            },
        },
    })
}

/// `set_filter_state` on the connection: `peer_not_found`, as Istio's metadata exchange leaves
/// it when it is done and found no peer (upstream Envoy has no exchange filter), shared with
/// the upstream connection for the client side.
pub fn exchange_done() -> Value {
    json!({
        "name": "envoy.filters.network.set_filter_state",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config",
            "on_new_connection": [{
                "object_key": "peer_not_found",
                "factory_key": "envoy.string",
                "format_string": {"text_format_source": {"inline_string": "true"}},
                "shared_with_upstream": "ONCE",
            }],
        },
    })
}

/// A listener shaped like Istio's TCP chains (istio/istio
/// `pilot/pkg/networking/core/networkfilter.go`, `buildCompleteNetworkFilters`): `filters`
/// (meshtel's network filter among them), then `tcp_proxy` to `cluster`.
pub fn tcp_listener(name: &str, port: u16, direction: Direction, cluster: &str, filters: Vec<Value>) -> Value {
    let mut chain = filters;
    chain.push(json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": name,
            "cluster": cluster,
        },
    }));
    json!({
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "enable_reuse_port": false,
        "traffic_direction": match direction { Direction::Inbound => "INBOUND", Direction::Outbound => "OUTBOUND" },
        "filter_chains": [{"filters": chain}],
    })
}
