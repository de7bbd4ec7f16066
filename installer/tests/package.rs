//! `meshtel package`: an OCI image layout Istio can pull, and a push to a real registry
//! (Debian's `docker-registry` on 127.0.0.1) pulled back and compared by digest.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::Value;
use sha2::{Digest, Sha256};

const LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";

fn meshtel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshtel")).args(args).output().expect("run meshtel")
}

/// A temporary directory removed when the test ends.
fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("meshtel-pkg-").tempdir().unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A small valid module with some content.
fn module(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut wasm = b"\0asm\x01\0\0\0".to_vec();
    // A custom section named "meshtel" with a payload, so that the bytes are not trivial.
    wasm.extend([0, 12, 7]);
    wasm.extend(b"meshtel");
    wasm.extend(b"test");
    let path = dir.join("plugin.wasm");
    std::fs::write(&path, &wasm).unwrap();
    (path, wasm)
}

fn printed_digest(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout);
    out.lines().find_map(|l| l.strip_prefix("sha256: ")).expect("a printed digest").to_string()
}

#[test]
fn writes_an_oci_image_layout_of_the_wasm_artifact() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let (wasm_path, wasm) = module(dir);
    let layout = dir.join("oci");
    let o = meshtel(&["package", wasm_path.to_str().unwrap(), "-o", layout.to_str().unwrap(), "--tag", "1.2.3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let digest = printed_digest(&o);

    let read_json = |p: PathBuf| -> Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    assert_eq!(read_json(layout.join("oci-layout"))["imageLayoutVersion"], "1.0.0");
    let index = read_json(layout.join("index.json"));
    let entry = &index["manifests"][0];
    assert_eq!(entry["digest"], format!("sha256:{digest}"));
    assert_eq!(entry["annotations"]["org.opencontainers.image.ref.name"], "1.2.3");
    let blob = |d: &str| layout.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    let manifest_bytes = std::fs::read(blob(&digest)).unwrap();
    assert_eq!(sha256(&manifest_bytes), digest, "the printed digest is the manifest's");
    let manifest: Value = serde_json::from_slice(&manifest_bytes).unwrap();
    assert_eq!(manifest["config"]["mediaType"], "application/vnd.module.wasm.config.v1+json");
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "Istio expects a single layer");
    assert_eq!(layers[0]["mediaType"], LAYER);
    assert_eq!(std::fs::read(blob(layers[0]["digest"].as_str().unwrap())).unwrap(), wasm);
}

#[test]
fn refuses_missing_and_non_wasm_files() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let o = meshtel(&["package", "/nonexistent.wasm", "-o", dir.join("x").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent.wasm"));
    let not_wasm = dir.join("notes.txt");
    std::fs::write(&not_wasm, "hello").unwrap();
    let o = meshtel(&["package", not_wasm.to_str().unwrap(), "-o", dir.join("y").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a WebAssembly module"));
    assert!(!dir.join("y").exists(), "nothing written");
}

struct Registry(Child, u16);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Debian's `docker-registry` on a free loopback port, or `None` outside CI when it is not installed.
fn registry(dir: &Path) -> Option<Registry> {
    let bin = Path::new("/usr/bin/docker-registry");
    if !bin.exists() {
        assert!(std::env::var_os("CI").is_none(), "CI must install Debian's docker-registry (see .ci/run)");
        eprintln!("skipping: /usr/bin/docker-registry is not installed (apt-get install docker-registry)");
        return None;
    }
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let child =
        Command::new(bin).arg("serve").arg(&config).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let registry = Registry(child, port);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the registry did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(registry)
}

#[test]
fn pushes_to_a_real_registry_and_pulls_back_the_same_digest() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let Some(registry) = registry(dir) else { return };
    let (wasm_path, wasm) = module(dir);
    let reference = format!("127.0.0.1:{}/meshtel/meshtel-filter:test", registry.1);
    let o = meshtel(&[
        "package",
        wasm_path.to_str().unwrap(),
        "-o",
        dir.join("oci").to_str().unwrap(),
        "--push",
        &reference,
        "--insecure",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let digest = printed_digest(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("--image oci://{reference} --sha256 {digest}")));

    let client = Client::new(ClientConfig { protocol: ClientProtocol::Http, ..Default::default() });
    let image: Reference = reference.parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let pulled = runtime.block_on(client.pull(&image, &RegistryAuth::Anonymous, vec![LAYER])).unwrap();
    assert_eq!(pulled.digest.as_deref(), Some(format!("sha256:{digest}").as_str()));
    assert_eq!(pulled.layers.len(), 1);
    assert_eq!(pulled.layers[0].data.as_ref(), wasm.as_slice(), "the module comes back byte for byte");
}
