//! `meshtel package`: an OCI image layout Istio can pull, and a push to a real registry
//! (Debian's `docker-registry` on 127.0.0.1) pulled back and compared by digest.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
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

/// A running registry and the port it serves.
struct Registry(Child, u16);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The user and password of the registries started with basic auth.
const USER: &str = "ci-pusher";
const PASSWORD: &str = "Sup3r-s3cret-Pa55";

/// How a test registry authenticates.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// Not at all.
    None,
    /// htpasswd basic auth of [`USER`].
    Basic,
    /// Bearer tokens from the [`TokenServer`] on this port, which checks [`USER`]'s password.
    Token(u16),
}

/// Debian's `docker-registry` on a free port of `addr` (`127.0.0.1` or `0.0.0.0`) with `auth`;
/// `None` outside CI when it is not installed.
fn start_registry(dir: &Path, addr: &str, auth: Auth) -> Option<Registry> {
    let bin = Path::new("/usr/bin/docker-registry");
    if !bin.exists() {
        assert!(std::env::var_os("CI").is_none(), "CI must install Debian's docker-registry (see .ci/run)");
        eprintln!("skipping: /usr/bin/docker-registry is not installed (apt-get install docker-registry)");
        return None;
    }
    let port = TcpListener::bind((addr, 0)).unwrap().local_addr().unwrap().port();
    let mut config = format!(
        "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\nhttp:\n  addr: {addr}:{port}\n",
        dir.join("data").display()
    );
    match auth {
        Auth::None => {}
        Auth::Basic => {
            // The registry reads bcrypt entries only (distribution `registry/auth/htpasswd`).
            let htpasswd = dir.join("htpasswd");
            std::fs::write(&htpasswd, format!("{USER}:{}\n", bcrypt::hash(PASSWORD, 5).unwrap())).unwrap();
            config.push_str(&format!("auth:\n  htpasswd: {{realm: meshtel-test, path: {}}}\n", htpasswd.display()));
        }
        Auth::Token(port) => config.push_str(&format!(
            "auth:\n  token:\n    realm: http://127.0.0.1:{port}/token\n    service: {TOKEN_SERVICE}\n    \
             issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
            dir.join("token-cert.pem").display()
        )),
    }
    let file = dir.join("registry.yml");
    std::fs::write(&file, config).unwrap();
    let child = Command::new(bin).arg("serve").arg(&file).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let registry = Registry(child, port);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the registry did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(registry)
}

fn registry(dir: &Path) -> Option<Registry> {
    start_registry(dir, "127.0.0.1", Auth::None)
}

const TOKEN_SERVICE: &str = "meshtel-test-registry";
const TOKEN_ISSUER: &str = "meshtel-test-issuer";

/// A token server as the registry's token auth expects one (distribution
/// `registry/auth/token`): `GET /token?service=..&scope=repository:NAME:ACTIONS` with basic
/// auth answers an ES256 JWT granting those actions, its certificate in `x5c` and in the
/// registry's `rootcertbundle`; wrong credentials get 401. Counts the tokens it issued.
struct TokenServer {
    port: u16,
    issued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TokenServer {
    fn start(dir: &Path) -> TokenServer {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["meshtel-token-issuer".to_string()]).unwrap().self_signed(&key).unwrap();
        std::fs::write(dir.join("token-cert.pem"), cert.pem()).unwrap();
        let rng = ring::rand::SystemRandom::new();
        let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &rng,
        )
        .unwrap();
        let x5c = base64::engine::general_purpose::STANDARD.encode(cert.der());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let issued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = issued.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut stream = stream;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && std::io::Read::read(&mut stream, &mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let expected = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
                let authorized =
                    head.lines().any(|l| l.eq_ignore_ascii_case(&format!("authorization: Basic {expected}")));
                let scope = path
                    .split(['?', '&'])
                    .find_map(|kv| kv.strip_prefix("scope="))
                    .unwrap_or("")
                    .replace("%3A", ":")
                    .replace("%2F", "/")
                    .replace("%2C", ",");
                let (status, body) = match scope.splitn(3, ':').collect::<Vec<_>>()[..] {
                    ["repository", name, actions] if authorized => {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
                        let url = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
                        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "x5c": [x5c]});
                        let claims = serde_json::json!({
                            "iss": TOKEN_ISSUER, "sub": USER, "aud": TOKEN_SERVICE,
                            "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("t{now}"),
                            "access": [{"type": "repository", "name": name, "actions": actions.split(',').collect::<Vec<_>>()}],
                        });
                        let signing_input =
                            format!("{}.{}", url(header.to_string().as_bytes()), url(claims.to_string().as_bytes()));
                        let signature = signer.sign(&rng, signing_input.as_bytes()).unwrap();
                        let token = format!("{signing_input}.{}", url(signature.as_ref()));
                        ("200 OK", serde_json::json!({"token": token, "expires_in": 300}).to_string())
                    }
                    _ => (
                        "401 Unauthorized",
                        r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#.to_string(),
                    ),
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = std::io::Write::write_all(&mut stream, answer.as_bytes());
            }
        });
        TokenServer { port, issued }
    }

    fn issued(&self) -> usize {
        self.issued.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// `meshtel` with its environment under the test's control: `DOCKER_CONFIG` and `HOME` in
/// `dir` (never the developer's own credentials), `PATH` led by `dir/bin`, and `stdin`.
fn meshtel_in(dir: &Path, args: &[&str], stdin: &str) -> Output {
    let path = format!("{}:{}", dir.join("bin").display(), std::env::var("PATH").unwrap_or_default());
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshtel"))
        .args(args)
        .env("DOCKER_CONFIG", dir.join("docker"))
        .env("HOME", dir)
        .env("PATH", path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run meshtel");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!all.contains(PASSWORD), "a credential in the output: {all}");
    out
}

fn write_docker_config(dir: &Path, config: &Value) {
    std::fs::create_dir_all(dir.join("docker")).unwrap();
    std::fs::write(dir.join("docker/config.json"), config.to_string()).unwrap();
}

/// `meshtel package --push reference` from `dir` (no --insecure: the registry is on loopback).
fn push_from(dir: &Path, reference: &str, extra: &[&str], stdin: &str) -> Output {
    let (wasm, _) = module(dir);
    let mut args = vec!["package", wasm.to_str().unwrap(), "-o"];
    let layout = dir.join("oci");
    args.push(layout.to_str().unwrap());
    args.extend(["--push", reference]);
    args.extend(extra);
    meshtel_in(dir, &args, stdin)
}

/// The module pulled back with the test's credentials: its manifest digest and bytes.
fn pull(reference: &str, auth: RegistryAuth) -> Result<(String, Vec<u8>), String> {
    let client = Client::new(ClientConfig { protocol: ClientProtocol::Http, ..Default::default() });
    let image: Reference = reference.parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let pulled = runtime.block_on(client.pull(&image, &auth, vec![LAYER])).map_err(|e| e.to_string())?;
    Ok((pulled.digest.unwrap_or_default(), pulled.layers[0].data.to_vec()))
}

fn basic() -> RegistryAuth {
    RegistryAuth::Basic(USER.into(), PASSWORD.into())
}

fn assert_pushed(o: &Output, reference: &str, via: &str) {
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}{out}", String::from_utf8_lossy(&o.stderr));
    let digest = printed_digest(o);
    assert!(out.contains(&format!("pushed oci://{reference} over plain HTTP ({via})")), "{out}");
    assert!(out.contains(&format!("render with: --image oci://{reference} --sha256 {digest}")), "{out}");
    let (pulled, bytes) = pull(reference, basic()).unwrap();
    assert_eq!(pulled, format!("sha256:{digest}"), "pulled back by the printed digest");
    assert!(bytes.starts_with(b"\0asm"));
}

#[test]
fn pushes_with_the_docker_config_file() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let Some(registry) = start_registry(dir, "127.0.0.1", Auth::Basic) else { return };
    let host = format!("127.0.0.1:{}", registry.1);
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    // Keyed with a scheme, as `docker login` writes some registries.
    write_docker_config(
        dir,
        &serde_json::json!({"auths": {format!("http://{host}"): {"auth": auth}, "other.example": {}}}),
    );
    let reference = format!("{host}/team/meshtel-filter:1");
    let o = push_from(dir, &reference, &[], "");
    assert_pushed(&o, &reference, &dir.join("docker/config.json").display().to_string());
}

#[test]
fn pushes_with_a_credential_helper() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let Some(registry) = start_registry(dir, "127.0.0.1", Auth::Basic) else { return };
    let host = format!("127.0.0.1:{}", registry.1);
    // A helper speaking the protocol (docker/docker-credential-helpers): `get`, the server on
    // stdin, JSON on stdout; "credentials not found" for any other server.
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let helper = bin.join("docker-credential-meshteltest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread -r server\necho \"$server\" >> {log}\n\
             if [ \"$server\" = \"{host}\" ]; then\n  printf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}' \"$server\"\n\
             else\n  echo 'credentials not found in native keychain'; exit 1\nfi\n",
            log = dir.join("helper.log").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // The registry's own helper (credHelpers), then the store (credsStore) for every registry.
    for (n, config) in [
        serde_json::json!({"credHelpers": {&host: "meshteltest"}, "credsStore": "meshtel-absent"}),
        serde_json::json!({"credsStore": "meshteltest"}),
    ]
    .into_iter()
    .enumerate()
    {
        write_docker_config(dir, &config);
        let reference = format!("{host}/team/meshtel-filter:{n}");
        let o = push_from(dir, &reference, &[], "");
        assert_pushed(&o, &reference, "credential helper docker-credential-meshteltest");
    }
    assert_eq!(std::fs::read_to_string(dir.join("helper.log")).unwrap(), format!("{host}\n{host}\n"));
}

#[test]
fn pushes_with_username_and_password_stdin_and_prints_json() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let Some(registry) = start_registry(dir, "127.0.0.1", Auth::Basic) else { return };
    let reference = format!("127.0.0.1:{}/team/meshtel-filter:json", registry.1);
    let o = push_from(
        dir,
        &reference,
        &["--username", USER, "--password-stdin", "--format", "json"],
        &format!("{PASSWORD}\n"),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let digest = v["digest"].as_str().unwrap().to_string();
    assert_eq!(v["reference"], reference.as_str());
    assert_eq!(v["credentials"], "--username/--password-stdin");
    assert_eq!(v["plainHttp"], true);
    assert!(v["size"].as_u64().unwrap() > 0 && v["module"]["size"].as_u64().unwrap() > 0);
    let hex = digest.strip_prefix("sha256:").unwrap();
    assert_eq!(v["render"], format!("--image oci://{reference} --sha256 {hex}"));
    assert_eq!(pull(&reference, basic()).unwrap().0, digest);
    // Without a push, the same object without a reference.
    let (wasm, _) = module(dir);
    let o = meshtel_in(
        dir,
        &["package", wasm.to_str().unwrap(), "-o", dir.join("l").to_str().unwrap(), "--format", "json"],
        "",
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["digest"].as_str(), &v["reference"]), (Some(digest.as_str()), &Value::Null));
}

#[test]
fn wrong_or_missing_credentials_are_refused_in_one_line_and_nothing_is_pushed() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let Some(registry) = start_registry(dir, "127.0.0.1", Auth::Basic) else { return };
    let host = format!("127.0.0.1:{}", registry.1);
    let reference = format!("{host}/team/meshtel-filter:bad");
    let wrong = format!("{PASSWORD}-not");
    let o = push_from(dir, &reference, &["--username", USER, "--password-stdin"], &wrong);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(&format!(
            "registry {host} refused the credentials from --username/--password-stdin (401 Unauthorized)"
        )),
        "{err}"
    );
    assert!(!err.contains(&wrong) && !String::from_utf8_lossy(&o.stdout).contains(&wrong));
    // No Docker config: anonymous, and told how to log in.
    let o = push_from(dir, &reference, &[], "");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("refused an anonymous push (401 Unauthorized): log in (docker login {host})")),
        "{err}"
    );
    // Nothing of either attempt reached the registry: no manifest, not a blob, not an upload.
    let e = pull(&reference, basic()).unwrap_err();
    assert!(e.contains("manifest unknown"), "{e}");
    let storage = dir.join("data/docker/registry/v2");
    for kept in ["blobs", "repositories"] {
        assert!(!storage.join(kept).exists(), "the registry kept {kept} of a refused push");
    }
    let o = push_from(dir, &reference, &["--username", USER, "--password-stdin"], PASSWORD);
    assert_pushed(&o, &reference, "--username/--password-stdin");
    assert!(storage.join("blobs").exists() && storage.join("repositories").exists(), "where a push lands");
    // A password on the command line is not a thing.
    let o = push_from(dir, &reference, &["--username", USER], "");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--username needs --password-stdin"));
}

#[test]
fn pushes_to_a_token_auth_registry_through_the_bearer_challenge() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let tokens = TokenServer::start(dir);
    let Some(registry) = start_registry(dir, "127.0.0.1", Auth::Token(tokens.port)) else { return };
    let host = format!("127.0.0.1:{}", registry.1);
    let reference = format!("{host}/team/meshtel-filter:token");
    // Wrong password: the token server refuses, and so does the push, in one line.
    let o = push_from(dir, &reference, &["--username", USER, "--password-stdin"], "wrong");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(&format!("registry {host} refused the credentials from --username/--password-stdin (401")),
        "{err}"
    );
    assert_eq!(tokens.issued(), 0);
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    write_docker_config(dir, &serde_json::json!({"auths": {&host: {"auth": auth}}}));
    let o = push_from(dir, &reference, &[], "");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}{out}", String::from_utf8_lossy(&o.stderr));
    assert!(tokens.issued() >= 1, "the push went through the token server");
    let client = Client::new(ClientConfig { protocol: ClientProtocol::Http, ..Default::default() });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let image: Reference = reference.parse().unwrap();
    let pulled = runtime.block_on(client.pull(&image, &basic(), vec![LAYER])).unwrap();
    assert_eq!(pulled.digest.unwrap(), format!("sha256:{}", printed_digest(&o)));
}

/// This machine's address off the loopback interface, if it has one (no packet is sent: a UDP
/// socket's connect only picks the route).
fn outside_address() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.254:9").ok()?;
    Some(socket.local_addr().ok()?.ip()).filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

#[test]
fn a_plain_http_registry_off_loopback_needs_insecure() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let Some(ip) = outside_address() else {
        eprintln!("skipping: no address off the loopback interface");
        return;
    };
    let Some(registry) = start_registry(dir, "0.0.0.0", Auth::None) else { return };
    let host = format!("{ip}:{}", registry.1);
    let reference = format!("{host}/team/meshtel-filter:1");
    let o = push_from(dir, &reference, &[], "");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains(&format!("registry {host}: no HTTPS answer")) && err.contains("add --insecure"), "{err}");
    let o = push_from(dir, &reference, &["--insecure"], "");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
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
