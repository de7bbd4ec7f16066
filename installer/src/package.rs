//! `meshtel package`: the module as an OCI artifact in the layout Istio pulls (the Wasm OCI
//! artifact variant: one `application/vnd.module.wasm.content.layer.v1+wasm` layer with a
//! `application/vnd.module.wasm.config.v1+json` config), written as an OCI image layout and
//! optionally pushed with `oci-client`, with the credentials the container tools would use
//! (`credentials.rs`).

use std::collections::BTreeMap;
use std::path::Path;

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{ImageIndexEntry, OciImageIndex, OciImageManifest, OCI_IMAGE_MEDIA_TYPE};
use oci_client::RegistryOperation;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

use crate::cli::{Format, PackageArgs};
use crate::credentials::{self, Credentials, Source};

/// Media type of the module layer Istio looks for.
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
/// Media type of the artifact's config.
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.module.wasm.config.v1+json";

/// The artifact: its parts and the manifest that ties them.
pub struct Artifact {
    /// The module layer.
    pub layer: ImageLayer,
    /// The config blob.
    pub config: Config,
    /// The manifest.
    pub manifest: OciImageManifest,
    /// The manifest as serialized (and pushed).
    pub manifest_bytes: Vec<u8>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

impl Artifact {
    /// Build the artifact of a module.
    pub fn new(wasm: Vec<u8>) -> Result<Self, String> {
        if !wasm.starts_with(b"\0asm") {
            return Err("not a WebAssembly module (no \\0asm header)".into());
        }
        let title: BTreeMap<String, String> =
            [("org.opencontainers.image.title".to_string(), "plugin.wasm".to_string())].into();
        let layer = ImageLayer::new(wasm, WASM_LAYER_MEDIA_TYPE.into(), Some(title));
        let config = Config::new(b"{}".to_vec(), WASM_CONFIG_MEDIA_TYPE.into(), None);
        let annotations: BTreeMap<String, String> = [
            ("org.opencontainers.image.title".to_string(), "meshtel-filter".to_string()),
            ("org.opencontainers.image.version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ]
        .into();
        let manifest = OciImageManifest::build(std::slice::from_ref(&layer), &config, Some(annotations));
        // Canonical JSON, byte for byte what oci-client pushes, so that the layout and the
        // registry agree on the digest.
        let mut manifest_bytes = Vec::new();
        let mut ser =
            serde_json::Serializer::with_formatter(&mut manifest_bytes, olpc_cjson::CanonicalFormatter::new());
        serde::Serialize::serialize(&manifest, &mut ser).map_err(|e| e.to_string())?;
        Ok(Self { layer, config, manifest, manifest_bytes })
    }

    /// The manifest digest (`sha256:...` without the prefix): what WasmPlugin `sha256` pins.
    pub fn digest(&self) -> String {
        sha256_hex(&self.manifest_bytes)
    }

    /// Write the artifact as an OCI image layout directory tagged `tag`.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> Result<(), String> {
        let blobs = dir.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).map_err(|e| format!("{}: {e}", blobs.display()))?;
        let write =
            |name: &Path, bytes: &[u8]| std::fs::write(name, bytes).map_err(|e| format!("{}: {e}", name.display()));
        for blob in [self.layer.data.as_ref(), self.config.data.as_ref(), self.manifest_bytes.as_slice()] {
            write(&blobs.join(sha256_hex(blob)), blob)?;
        }
        write(&dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let index = OciImageIndex {
            schema_version: 2,
            media_type: None,
            manifests: vec![ImageIndexEntry {
                media_type: OCI_IMAGE_MEDIA_TYPE.into(),
                digest: format!("sha256:{}", self.digest()),
                size: self.manifest_bytes.len() as i64,
                platform: None,
                annotations: Some([("org.opencontainers.image.ref.name".to_string(), tag.to_string())].into()),
                artifact_type: None,
            }],
            artifact_type: None,
            annotations: None,
        };
        write(&dir.join("index.json"), &serde_json::to_vec(&index).map_err(|e| e.to_string())?)
    }
}

/// How the artifact went to the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// The manifest digest the registry reports, `sha256:...`.
    pub digest: String,
    /// Whether it went over plain HTTP.
    pub plain_http: bool,
}

/// The protocols to try, in order: `--insecure` means plain HTTP; a loopback registry gets
/// HTTPS, then plain HTTP, as Docker does; any other HTTPS only.
fn protocols(registry: &str, insecure: bool) -> Vec<ClientProtocol> {
    if insecure {
        vec![ClientProtocol::Http]
    } else if credentials::is_loopback(registry) {
        vec![ClientProtocol::Https, ClientProtocol::Http]
    } else {
        vec![ClientProtocol::Https]
    }
}

/// Push the artifact to `reference` with `creds`; returns what the registry reports.
pub fn push(artifact: &Artifact, reference: &Reference, insecure: bool, creds: &Credentials) -> Result<Pushed, String> {
    let registry = reference.resolve_registry().to_string();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the I/O runtime: {e}"))?;
    let tries = protocols(&registry, insecure);
    runtime.block_on(async {
        for (i, protocol) in tries.iter().enumerate() {
            let plain_http = matches!(protocol, ClientProtocol::Http);
            let client = Client::new(ClientConfig { protocol: protocol.clone(), ..Default::default() });
            // The registry's first answer (its /v2/ challenge, a token exchange) tells whether it
            // speaks this protocol, before anything is sent.
            match client.auth(reference, &creds.auth, RegistryOperation::Push).await {
                Err(OciDistributionError::RequestError(_)) if i + 1 < tries.len() => continue,
                Err(e) => return Err(describe(&e, reference, creds, plain_http, insecure)),
                Ok(_) => {}
            }
            client
                .push(
                    reference,
                    std::slice::from_ref(&artifact.layer),
                    artifact.config.clone(),
                    &creds.auth,
                    Some(artifact.manifest.clone()),
                )
                .await
                .map_err(|e| describe(&e, reference, creds, plain_http, insecure))?;
            let digest = client.fetch_manifest_digest(reference, &creds.auth).await.map_err(|e| {
                format!("pushed, but reading back: {}", describe(&e, reference, creds, plain_http, insecure))
            })?;
            return Ok(Pushed { digest, plain_http });
        }
        Err(format!("registry {registry}: no protocol to try"))
    })
}

/// One line saying which registry refused and why, naming where the credentials came from and
/// never what they are.
fn describe(
    e: &OciDistributionError,
    reference: &Reference,
    creds: &Credentials,
    plain_http: bool,
    insecure: bool,
) -> String {
    let registry = reference.resolve_registry();
    let repository = reference.repository();
    let source = &creds.source;
    let refused = |status: &str| {
        match source {
        Source::Anonymous => format!(
            "registry {registry} refused an anonymous push ({status}): log in (docker login {registry}), or give --username U --password-stdin"
        ),
        _ => format!("registry {registry} refused the credentials from {source} ({status})"),
    }
    };
    let denied = || {
        format!("registry {registry} denied a push to {repository} (403 Forbidden) with the credentials from {source}")
    };
    let unknown = || {
        format!("registry {registry} does not know the repository {repository} (NAME_UNKNOWN): create it first, or check its name")
    };
    match e {
        OciDistributionError::RequestError(r) if !plain_http && !insecure => {
            // The innermost cause says what happened (a TLS record that is plain HTTP, a refusal).
            let mut cause: &dyn std::error::Error = r;
            while let Some(inner) = cause.source() {
                cause = inner;
            }
            let hint =
                if credentials::is_loopback(registry) { "" } else { "; if it serves plain HTTP, add --insecure" };
            format!("registry {registry}: no HTTPS answer ({cause}){hint}")
        }
        OciDistributionError::RequestError(r) => format!("registry {registry}: no answer over HTTP ({r})"),
        OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => {
            refused("401 Unauthorized")
        }
        OciDistributionError::ServerError { code: 401, .. } => refused("401 Unauthorized"),
        OciDistributionError::ServerError { code: 403, .. } => denied(),
        OciDistributionError::ServerError { code: 404, .. } => unknown(),
        OciDistributionError::ServerError { code, message, .. } => {
            format!("registry {registry} answered {code}: {}", message.lines().next().unwrap_or("").trim())
        }
        OciDistributionError::RegistryError { envelope, .. } => {
            let first = envelope.errors.first();
            match first.map(|e| &e.code) {
                Some(OciErrorCode::Unauthorized) => refused("401 Unauthorized"),
                Some(OciErrorCode::Denied) => denied(),
                Some(OciErrorCode::NameUnknown) => unknown(),
                _ => format!(
                    "registry {registry} refused the push: {}",
                    first.map_or_else(|| "no reason given".into(), |e| format!("{:?}: {}", e.code, e.message))
                ),
            }
        }
        other => format!("push to {reference} failed: {other}"),
    }
}

/// The credentials for `registry`: from the flags when given, else the Docker config.
fn credentials_for(args: &PackageArgs, registry: &str) -> Result<Credentials, String> {
    match (&args.username, args.password_stdin) {
        (Some(username), true) => {
            let mut password = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut password)
                .map_err(|e| format!("--password-stdin: cannot read stdin: {e}"))?;
            Credentials::from_flags(username, &password)
        }
        (Some(_), false) => {
            Err("--username needs --password-stdin: a password is never taken on the command line".into())
        }
        (None, true) => Err("--password-stdin needs --username".into()),
        (None, false) => match credentials::docker_config_path(|k| std::env::var(k).ok()) {
            Some(path) => credentials::from_docker_config(registry, &path),
            None => Ok(Credentials::anonymous()),
        },
    }
}

/// Package (and optionally push) the module; returns what to print.
pub fn run(args: &PackageArgs) -> Result<String, String> {
    let reference = match &args.push {
        Some(r) => Some(r.parse::<Reference>().map_err(|e| format!("--push: {r:?} is not an image reference: {e}"))?),
        None => None,
    };
    // Credentials are found (and stdin read) before anything is written.
    let creds = match &reference {
        Some(r) => Some(credentials_for(args, r.resolve_registry())?),
        None => None,
    };
    let wasm = std::fs::read(&args.wasm).map_err(|e| format!("{}: {e}", args.wasm.display()))?;
    let artifact = Artifact::new(wasm).map_err(|e| format!("{}: {e}", args.wasm.display()))?;
    artifact.write_layout(&args.output, &args.tag)?;
    let digest = artifact.digest();
    let pushed = match (&reference, &creds) {
        (Some(r), Some(c)) => {
            let pushed = push(&artifact, r, args.insecure, c)?;
            if pushed.digest != format!("sha256:{digest}") {
                return Err(format!("the registry reports {} for {r}, expected sha256:{digest}", pushed.digest));
            }
            Some(pushed)
        }
        _ => None,
    };
    let pushed_to = args.push.as_deref().filter(|_| pushed.is_some());
    let render_flags = pushed_to.map(|r| format!("--image oci://{r} --sha256 {digest}"));
    if args.format == Format::Json {
        let summary = serde_json::json!({
            "layout": args.output.display().to_string(),
            "tag": args.tag,
            "mediaType": oci_client::manifest::OCI_IMAGE_MEDIA_TYPE,
            "digest": format!("sha256:{digest}"),
            "size": artifact.manifest_bytes.len(),
            "module": {"digest": format!("sha256:{}", sha256_hex(&artifact.layer.data)), "size": artifact.layer.data.len()},
            "reference": pushed_to,
            "plainHttp": pushed.as_ref().map(|p| p.plain_http),
            "credentials": creds.as_ref().filter(|_| pushed.is_some()).map(|c| c.source.to_string()),
            "render": render_flags,
        });
        return serde_json::to_string_pretty(&summary).map_err(|e| e.to_string());
    }
    let mut summary = format!("wrote OCI image layout {} (tag {})\nsha256: {digest}", args.output.display(), args.tag);
    if let (Some(r), Some(p), Some(c), Some(flags)) = (pushed_to, &pushed, &creds, &render_flags) {
        let over = if p.plain_http { " over plain HTTP" } else { "" };
        summary.push_str(&format!("\npushed oci://{r}{over} ({})\nrender with: {flags}", c.source));
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_client::errors::{OciEnvelope, OciError};

    fn registry_error(code: OciErrorCode) -> OciDistributionError {
        let error = OciError { code, message: "from the registry".into(), detail: serde_json::Value::Null };
        OciDistributionError::RegistryError { envelope: OciEnvelope { errors: vec![error] }, url: "u".into() }
    }

    #[test]
    fn refusals_say_which_registry_refused_why_and_whose_credentials_in_one_line() {
        let reference: Reference = "registry.example.com/team/meshtel-filter:1".parse().unwrap();
        let file = Credentials {
            auth: oci_client::secrets::RegistryAuth::Basic("u".into(), "hunter2".into()),
            source: Source::ConfigFile("/home/u/.docker/config.json".into()),
        };
        let server = |code| OciDistributionError::ServerError { code, url: "u".into(), message: "no\nmore".into() };
        for (e, creds, expect) in [
            (server(401), &file, "registry registry.example.com refused the credentials from /home/u/.docker/config.json (401 Unauthorized)"),
            (registry_error(OciErrorCode::Unauthorized), &file, "refused the credentials from /home/u/.docker/config.json (401 Unauthorized)"),
            (server(401), &Credentials::anonymous(), "refused an anonymous push (401 Unauthorized): log in (docker login registry.example.com)"),
            (server(403), &file, "registry registry.example.com denied a push to team/meshtel-filter (403 Forbidden)"),
            (registry_error(OciErrorCode::Denied), &file, "denied a push to team/meshtel-filter (403 Forbidden)"),
            (registry_error(OciErrorCode::NameUnknown), &file, "does not know the repository team/meshtel-filter (NAME_UNKNOWN)"),
            (server(404), &file, "(NAME_UNKNOWN): create it first"),
            (server(500), &file, "registry registry.example.com answered 500: no"),
        ] {
            let line = describe(&e, &reference, creds, false, false);
            assert!(line.contains(expect), "{line}");
            assert_eq!(line.lines().count(), 1, "{line}");
            assert!(!line.contains("hunter2"));
        }
    }

    #[test]
    fn loopback_registries_try_https_then_http_and_others_https_unless_insecure() {
        let names = |r: &str, insecure| protocols(r, insecure).iter().map(|p| format!("{p:?}")).collect::<Vec<_>>();
        assert_eq!(names("127.0.0.1:5000", false), ["Https", "Http"]);
        assert_eq!(names("localhost:5000", false), ["Https", "Http"]);
        assert_eq!(names("ghcr.io", false), ["Https"]);
        assert_eq!(names("192.0.2.2:5000", true), ["Http"]);
    }
}
