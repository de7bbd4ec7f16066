//! Registry credentials found the way the container tools find them: explicit flags, else the
//! Docker config file (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`): the registry's
//! `credHelpers` entry, else the `credsStore`, else its `auths` entry
//! (docker/cli `cli/config/configfile/file.go`, `GetAuthConfig` and `GetCredentialsStore`).
//!
//! No secret is ever printed: [`Credentials`]' `Debug` and every error name the registry and
//! where the credentials came from, never their value.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

/// Docker Hub's key in config files and for credential helpers.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// Where a registry's credentials came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `--username` and `--password-stdin`.
    Flags,
    /// A credential helper, `docker-credential-<name>`.
    Helper(String),
    /// An `auths` entry of this Docker config file.
    ConfigFile(PathBuf),
    /// None found: anonymous.
    Anonymous,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Flags => write!(f, "--username/--password-stdin"),
            Source::Helper(name) => write!(f, "credential helper docker-credential-{name}"),
            Source::ConfigFile(path) => write!(f, "{}", path.display()),
            Source::Anonymous => write!(f, "anonymous"),
        }
    }
}

/// Credentials for one registry, and their source.
#[derive(Clone)]
pub struct Credentials {
    /// What oci-client authenticates with.
    pub auth: RegistryAuth,
    /// Where they came from.
    pub source: Source,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.auth {
            RegistryAuth::Anonymous => "anonymous",
            RegistryAuth::Basic(..) => "basic",
            RegistryAuth::Bearer(_) => "bearer",
        };
        f.debug_struct("Credentials").field("auth", &kind).field("source", &self.source).finish()
    }
}

impl Credentials {
    /// No credentials.
    pub fn anonymous() -> Self {
        Self { auth: RegistryAuth::Anonymous, source: Source::Anonymous }
    }

    /// A user name and a password read from stdin (`--password-stdin`), as `docker login` reads
    /// it: one trailing newline is not part of it.
    pub fn from_flags(username: &str, password: &str) -> Result<Self, String> {
        let password = password.strip_suffix('\n').map(|p| p.strip_suffix('\r').unwrap_or(p)).unwrap_or(password);
        if username.is_empty() || password.is_empty() {
            return Err("--username and --password-stdin: both must be non-empty".into());
        }
        Ok(Self { auth: RegistryAuth::Basic(username.into(), password.into()), source: Source::Flags })
    }
}

/// The Docker config file: `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`
/// (docker/cli `cli/config/config.go`, `Dir`).
pub fn docker_config_path(env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    match env("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        Some(dir) => Some(Path::new(&dir).join("config.json")),
        None => env("HOME").map(|home| Path::new(&home).join(".docker").join("config.json")),
    }
}

/// A registry's host as config files key it: no scheme, no path (docker/cli
/// `credentials.ConvertToHostname`); Docker Hub's names all become its one key.
pub fn registry_key(server: &str) -> String {
    let host = server.strip_prefix("https://").or_else(|| server.strip_prefix("http://")).unwrap_or(server);
    let host = host.split('/').next().unwrap_or(host);
    match host {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB_KEY.into(),
        other => other.into(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, AuthEntry>,
    #[serde(default)]
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: std::collections::BTreeMap<String, String>,
}

#[derive(Default, Deserialize)]
struct AuthEntry {
    /// base64 of `user:password`.
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
}

impl std::fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthEntry(..)")
    }
}

/// What a credential helper answers to `get` (docker/docker-credential-helpers
/// `credentials.Credentials`).
#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// The credentials the Docker config at `path` gives `registry` (a `host[:port]`); anonymous
/// when the file does not exist or names none for it.
pub fn from_docker_config(registry: &str, path: &Path) -> Result<Credentials, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Credentials::anonymous()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let config: ConfigFile = serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let key = registry_key(registry);
    let entry_key = config.auths.keys().find(|k| registry_key(k) == key).cloned();
    // A registry's own helper wins over the store, which wins over the file's entries.
    let helper = config
        .cred_helpers
        .iter()
        .find(|(k, _)| registry_key(k) == key)
        .map(|(k, h)| (h.clone(), k.clone()))
        .or_else(|| {
            config.creds_store.clone().filter(|s| !s.is_empty()).map(|s| (s, entry_key.clone().unwrap_or(key.clone())))
        });
    if let Some((helper, server)) = helper {
        if let Some((username, secret)) = run_helper(&helper, &server)? {
            let source = Source::Helper(helper);
            return basic_or_refuse(registry, username, secret, &source).map(|auth| Credentials { auth, source });
        }
    }
    let Some(entry) = entry_key.and_then(|k| config.auths.get(&k)) else { return Ok(Credentials::anonymous()) };
    let source = Source::ConfigFile(path.to_path_buf());
    let (username, password) = match (&entry.auth, &entry.username, &entry.password) {
        (Some(encoded), _, _) if !encoded.is_empty() => {
            let decoded = meshtel_filter::base64::decode(encoded.as_bytes())
                .and_then(|d| String::from_utf8(d).ok())
                .ok_or_else(|| format!("{}: auths[{registry}].auth is not base64 of user:password", path.display()))?;
            let (u, p) = decoded
                .split_once(':')
                .ok_or_else(|| format!("{}: auths[{registry}].auth is not base64 of user:password", path.display()))?;
            (u.to_string(), p.to_string())
        }
        (_, Some(u), Some(p)) => (u.clone(), p.clone()),
        _ if entry.identity_token.is_some() => ("<token>".into(), String::new()),
        _ => return Ok(Credentials::anonymous()),
    };
    basic_or_refuse(registry, username, password, &source).map(|auth| Credentials { auth, source })
}

/// Basic credentials, or a clear refusal of an identity token (an OAuth2 refresh token, which
/// oci-client cannot exchange).
fn basic_or_refuse(registry: &str, username: String, secret: String, source: &Source) -> Result<RegistryAuth, String> {
    if username == "<token>" {
        return Err(format!(
            "{registry}: {source} gives an identity token, which meshtel cannot use; log in with a user \
             name and password or token (--username U --password-stdin)"
        ));
    }
    Ok(RegistryAuth::Basic(username, secret))
}

/// `docker-credential-<helper> get` for `server`: `None` when it has no credentials for it.
fn run_helper(helper: &str, server: &str) -> Result<Option<(String, String)>, String> {
    let program = format!("docker-credential-{helper}");
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("credential helper {program} (named by the Docker config) cannot run: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading is judged by its answer below.
        let _ = stdin.write_all(server.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| format!("credential helper {program}: {e}"))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(if out.stdout.is_empty() { &out.stderr } else { &out.stdout }).to_string();
        // The helpers' own words for "nothing stored" (docker-credential-helpers
        // `credentials.errCredentialsNotFoundMessage`).
        if said.contains("credentials not found") {
            return Ok(None);
        }
        let first = said.lines().next().unwrap_or("").trim();
        return Err(format!("credential helper {program} failed for {server}: {first}"));
    }
    let answer: HelperAnswer = serde_json::from_slice(&out.stdout)
        .map_err(|_| format!("credential helper {program} answered {server} with something other than its JSON"))?;
    Ok(Some((answer.username, answer.secret)))
}

/// Whether a registry `host[:port]` is on the loopback interface (`localhost`, `127.0.0.0/8`,
/// `::1`), which Docker treats as insecure by default and tries over HTTPS, then plain HTTP.
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => registry
            .rsplit_once(':')
            .map_or(registry, |(h, port)| if port.parse::<u16>().is_ok() { h } else { registry }),
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_lose_scheme_and_path_and_docker_hub_has_one() {
        assert_eq!(registry_key("https://ghcr.io/v2/"), "ghcr.io");
        assert_eq!(registry_key("127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(registry_key("http://localhost:5000"), "localhost:5000");
        for hub in ["docker.io", "index.docker.io", "https://index.docker.io/v1/", "registry-1.docker.io"] {
            assert_eq!(registry_key(hub), DOCKER_HUB_KEY);
        }
    }

    #[test]
    fn loopback_is_localhost_127_8_and_ipv6_one() {
        for yes in ["localhost:5000", "127.0.0.1:5000", "127.3.2.1", "[::1]:5000", "LOCALHOST"] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in ["192.0.2.2:5000", "ghcr.io", "localhost.example.com:5000", "[2001:db8::1]:5000", "128.0.0.1"] {
            assert!(!is_loopback(no), "{no}");
        }
    }

    #[test]
    fn config_path_follows_docker_config_then_home() {
        fn env(docker_config: Option<&'static str>) -> impl Fn(&str) -> Option<String> {
            move |k: &str| match k {
                "DOCKER_CONFIG" => docker_config.map(str::to_string),
                "HOME" => Some("/home/u".into()),
                _ => None,
            }
        }
        assert_eq!(docker_config_path(env(Some("/etc/d"))), Some(PathBuf::from("/etc/d/config.json")));
        assert_eq!(docker_config_path(env(None)), Some(PathBuf::from("/home/u/.docker/config.json")));
        assert_eq!(docker_config_path(env(Some(""))), Some(PathBuf::from("/home/u/.docker/config.json")));
    }

    #[test]
    fn file_entries_give_basic_credentials_and_debug_hides_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        // base64("ci:s3cret")
        std::fs::write(&path, r#"{"auths":{"https://reg.example:5000":{"auth":"Y2k6czNjcmV0"},"other":{}}}"#).unwrap();
        let c = from_docker_config("reg.example:5000", &path).unwrap();
        assert!(matches!(&c.auth, RegistryAuth::Basic(u, p) if u == "ci" && p == "s3cret"));
        assert_eq!(c.source, Source::ConfigFile(path.clone()));
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(from_docker_config("nowhere.example", &path).unwrap().source, Source::Anonymous);
        assert_eq!(from_docker_config("x", &dir.path().join("missing.json")).unwrap().source, Source::Anonymous);
        std::fs::write(&path, r#"{"auths":{"reg.example:5000":{"auth":"bm9jb2xvbg=="}}}"#).unwrap();
        let e = from_docker_config("reg.example:5000", &path).unwrap_err();
        assert!(e.contains("not base64 of user:password"), "{e}");
        std::fs::write(&path, r#"{"auths":{"reg.example:5000":{"identitytoken":"t0k"}}}"#).unwrap();
        let e = from_docker_config("reg.example:5000", &path).unwrap_err();
        assert!(e.contains("identity token") && !e.contains("t0k"), "{e}");
        std::fs::write(&path, "{not json").unwrap();
        assert!(from_docker_config("reg.example:5000", &path).unwrap_err().starts_with(&path.display().to_string()));
    }

    #[test]
    fn a_missing_helper_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"credsStore":"meshtel-no-such-helper"}"#).unwrap();
        let e = from_docker_config("reg.example", &path).unwrap_err();
        assert!(e.contains("docker-credential-meshtel-no-such-helper"), "{e}");
    }

    #[test]
    fn flags_drop_one_trailing_newline() {
        let c = Credentials::from_flags("u", "p w\n").unwrap();
        assert!(matches!(&c.auth, RegistryAuth::Basic(_, p) if p == "p w"));
        let c = Credentials::from_flags("u", "p\r\n").unwrap();
        assert!(matches!(&c.auth, RegistryAuth::Basic(_, p) if p == "p"));
        assert!(Credentials::from_flags("u", "\n").is_err());
    }
}
