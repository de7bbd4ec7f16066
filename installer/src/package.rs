//! `meshtel package`: the module as an OCI artifact in the layout Istio pulls (the Wasm OCI
//! artifact variant: one `application/vnd.module.wasm.content.layer.v1+wasm` layer with a
//! `application/vnd.module.wasm.config.v1+json` config), written as an OCI image layout and
//! optionally pushed with `oci-client`.

use std::collections::BTreeMap;
use std::path::Path;

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{ImageIndexEntry, OciImageIndex, OciImageManifest, OCI_IMAGE_MEDIA_TYPE};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

use crate::cli::PackageArgs;

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

/// Push the artifact to `reference`; returns the digest the registry reports for it.
pub fn push(artifact: &Artifact, reference: &str, insecure: bool) -> Result<String, String> {
    let reference: Reference =
        reference.parse().map_err(|e| format!("--push: {reference:?} is not an image reference: {e}"))?;
    let client = Client::new(ClientConfig {
        protocol: if insecure { ClientProtocol::Http } else { ClientProtocol::Https },
        ..Default::default()
    });
    let auth = RegistryAuth::Anonymous;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the I/O runtime: {e}"))?;
    runtime.block_on(async {
        client
            .push(
                &reference,
                std::slice::from_ref(&artifact.layer),
                artifact.config.clone(),
                &auth,
                Some(artifact.manifest.clone()),
            )
            .await
            .map_err(|e| format!("push to {reference} failed: {e}"))?;
        client
            .fetch_manifest_digest(&reference, &auth)
            .await
            .map_err(|e| format!("pushed, but reading back {reference} failed: {e}"))
    })
}

/// Package (and optionally push) the module; returns a summary to print.
pub fn run(args: &PackageArgs) -> Result<String, String> {
    let wasm = std::fs::read(&args.wasm).map_err(|e| format!("{}: {e}", args.wasm.display()))?;
    let artifact = Artifact::new(wasm).map_err(|e| format!("{}: {e}", args.wasm.display()))?;
    artifact.write_layout(&args.output, &args.tag)?;
    let digest = artifact.digest();
    let mut summary = format!("wrote OCI image layout {} (tag {})\nsha256: {digest}", args.output.display(), args.tag);
    if let Some(reference) = &args.push {
        let pushed = push(&artifact, reference, args.insecure)?;
        if pushed != format!("sha256:{digest}") {
            return Err(format!("the registry reports {pushed} for {reference}, expected sha256:{digest}"));
        }
        summary
            .push_str(&format!("\npushed oci://{reference}\nrender with: --image oci://{reference} --sha256 {digest}"));
    }
    Ok(summary)
}
