//! The resolution of `meshtel render`'s flags and `--config` file into validated render options.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::cli::{
    parse_ratio, CollectorProtocol, FailStrategy, LogMode, Phase, RenderArgs, DEFAULT_COLLECTOR, DEFAULT_IMAGE,
};
use crate::istio_telemetry::CarriedOver;
use crate::render::{Api, CollectorAddress, Mode, RenderOptions};

/// Options a `--config` file may set, named like the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FileOptions {
    #[serde(rename = "pluginConfig")]
    plugin_config: Option<Value>,
    #[serde(default)]
    namespace: Vec<String>,
    gateway: Option<bool>,
    gateway_name: Option<String>,
    gateway_namespace: Option<String>,
    workload_label: Option<String>,
    mesh_wide: Option<bool>,
    collector: Option<String>,
    collector_protocol: Option<CollectorProtocol>,
    logs: Option<LogMode>,
    sampling: Option<f64>,
    traces: Option<bool>,
    metrics: Option<bool>,
    #[serde(default)]
    collector_header_from_env: Vec<String>,
    image: Option<String>,
    wasm_url: Option<String>,
    sha256: Option<String>,
    wasm_file: Option<PathBuf>,
    image_pull_secret: Option<String>,
    fail_strategy: Option<FailStrategy>,
    phase: Option<Phase>,
    priority: Option<i32>,
    api: Option<Api>,
    disable_istio_tracing: Option<bool>,
    collector_service_entry: Option<bool>,
    tcp: Option<bool>,
    name: Option<String>,
    root_namespace: Option<String>,
    cluster_domain: Option<String>,
}

fn read_file_options(path: &Path) -> Result<FileOptions, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--config: cannot read {}: {e}", path.display()))?;
    serde_norway::from_str(&text).map_err(|e| format!("--config {}: {e}", path.display()))
}

fn flag(on: bool, off: bool) -> Option<bool> {
    match (on, off) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
}

fn sha256_file(path: &Path) -> Result<String, String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).map_err(|e| format!("--wasm-file: cannot read {}: {e}", path.display()))?;
    Ok(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}

fn set(config: &mut Value, path: &[&str], value: Value) {
    let mut at = config;
    for key in &path[..path.len() - 1] {
        if !at.get(*key).is_some_and(Value::is_object) {
            at[*key] = json!({});
        }
        at = &mut at[*key];
    }
    at[path[path.len() - 1]] = value;
}

/// Resolve flags and the optional `--config` file into validated render options. A flag wins
/// over the file.
pub fn render_options(args: &RenderArgs) -> Result<RenderOptions, String> {
    let file = match &args.config {
        Some(p) => read_file_options(p)?,
        None => FileOptions::default(),
    };
    let root_namespace =
        args.root_namespace.clone().or(file.root_namespace.clone()).unwrap_or_else(|| "istio-system".into());
    let mode = mode(args, &file, &root_namespace)?;
    let mut plugin_config = file.plugin_config.clone().unwrap_or_else(|| json!({}));
    if !plugin_config.is_object() {
        return Err("--config: pluginConfig must be a mapping".into());
    }
    let carried = args
        .from_istio_telemetry
        .as_deref()
        .map(|p| carry_over(p, args.crds.as_deref(), &root_namespace))
        .transpose()?;
    if let Some(c) = &carried {
        c.apply_to(&mut plugin_config);
    }
    let collector = telemetry_settings(args, &file, &mode, &mut plugin_config)?;
    let (url, sha256, image_pull_secret) = module(args, &file)?;
    let host_env = header_env(args, &file, &mut plugin_config)?;
    let collector_service_entry = if args.collector_service_entry || file.collector_service_entry.unwrap_or(false) {
        Some(collector.clone().ok_or("--collector-service-entry needs --collector HOST:PORT")?)
    } else {
        None
    };
    let tcp = tcp(args, &file, &plugin_config)?;
    let name = args.name.clone().or(file.name.clone()).unwrap_or_else(|| "meshtel".into());
    if !crate::rules::is_dns_subdomain(&name) {
        return Err(format!("--name: {name:?} is not a valid resource name"));
    }
    let extra = match &carried {
        Some(c) if args.disable_istio_telemetry => c.disabling_istio(&root_namespace, &crate::render::labels()),
        _ => Vec::new(),
    };
    Ok(RenderOptions {
        mode,
        name,
        root_namespace,
        url,
        sha256,
        image_pull_secret,
        plugin_config,
        fail_strategy: args.fail_strategy.or(file.fail_strategy).unwrap_or(FailStrategy::FailOpen).as_str().into(),
        phase: args.phase.or(file.phase).unwrap_or(Phase::Stats).as_str().into(),
        priority: args.priority.or(file.priority).map(i64::from),
        api: args.api.or(file.api).unwrap_or(Api::Wasmplugin),
        disable_istio_tracing: args.disable_istio_tracing || file.disable_istio_tracing.unwrap_or(false),
        collector_service_entry,
        host_env,
        tcp,
        notes: carried.as_ref().map(|c| c.notes.clone()).unwrap_or_default(),
        extra,
    })
}

/// Where meshtel runs (the `Where` options).
fn mode(args: &RenderArgs, file: &FileOptions, root_namespace: &String) -> Result<Mode, String> {
    let namespaces = if args.namespaces.is_empty() { file.namespace.clone() } else { args.namespaces.clone() };
    let gateway = args.gateway || file.gateway.unwrap_or(false);
    let mesh_wide = args.mesh_wide || file.mesh_wide.unwrap_or(false);
    let workload_label = args.workload_label.clone().or(file.workload_label.clone());
    for ns in namespaces.iter().chain(args.gateway_namespace.iter()).chain(std::iter::once(root_namespace)) {
        if !crate::rules::is_dns_subdomain(ns) || ns.contains('.') || ns.len() > 63 {
            return Err(format!("{ns:?} is not a valid namespace name"));
        }
    }
    let waypoint_modes =
        usize::from(args.waypoint.is_some()) + usize::from(args.service.is_some()) + usize::from(args.all_waypoints);
    let mode = if waypoint_modes > 0 {
        waypoint_mode(args, &namespaces, gateway || mesh_wide || workload_label.is_some(), waypoint_modes)?
    } else {
        match (gateway, mesh_wide, &workload_label, namespaces.is_empty()) {
            (true, false, None, true) => Mode::Gateway {
                name: args.gateway_name.clone().or(file.gateway_name.clone()),
                namespace: args
                    .gateway_namespace
                    .clone()
                    .or(file.gateway_namespace.clone())
                    .unwrap_or_else(|| "istio-system".into()),
            },
            (true, ..) => {
                return Err("--gateway cannot be combined with --namespace, --workload-label or --mesh-wide".into())
            }
            (false, true, None, true) => Mode::MeshWide,
            (false, true, ..) => {
                return Err("--mesh-wide cannot be combined with --namespace or --workload-label".into())
            }
            (false, false, Some(label), _) => workload_label_mode(label, namespaces)?,
            (false, false, None, false) => Mode::Namespaces(namespaces),
            (false, false, None, true) if args.from_istio_telemetry.is_some() => Mode::MeshWide,
            (false, false, None, true) => {
                return Err(
                    "choose where meshtel runs: --namespace NS, --gateway, --workload-label KEY=VALUE, --mesh-wide, --waypoint NAME, --service NAME or --all-waypoints"
                        .into(),
                )
            }
        }
    };
    if gateway_name_without_gateway(args, &mode) {
        return Err("--gateway-name and --gateway-namespace need --gateway".into());
    }
    Ok(mode)
}

/// `--workload-label KEY=VALUE`, checked as Kubernetes checks a label.
fn workload_label_mode(label: &str, namespaces: Vec<String>) -> Result<Mode, String> {
    let (key, value) =
        label.split_once('=').ok_or_else(|| format!("--workload-label: expected KEY=VALUE, got {label:?}"))?;
    if !crate::rules::is_label_key(key) {
        return Err(format!("--workload-label: {key:?} is not a valid label key"));
    }
    if value.is_empty() || !crate::rules::is_label_value(value) || value.contains('*') {
        return Err(format!("--workload-label: {value:?} is not a valid label value"));
    }
    Ok(Mode::WorkloadLabel { key: key.into(), value: value.into(), namespaces })
}

/// Put the `Telemetry` options into `plugin_config` and check it with the filter's own parser
/// and CEL's grammar; the collector address, when one was given or defaulted.
fn telemetry_settings(
    args: &RenderArgs,
    file: &FileOptions,
    mode: &Mode,
    plugin_config: &mut Value,
) -> Result<Option<CollectorAddress>, String> {
    let cluster_domain = file.cluster_domain.clone().unwrap_or_else(|| "cluster.local".into());
    let collector_flag = args.collector.clone().or(file.collector.clone());
    let collector = match (&collector_flag, plugin_config.pointer("/collector/cluster")) {
        (Some(c), _) => Some(CollectorAddress::parse(c, &cluster_domain)?),
        (None, Some(_)) => None,
        (None, None) => Some(CollectorAddress::parse(DEFAULT_COLLECTOR, &cluster_domain)?),
    };
    if let Some(c) = &collector {
        set(plugin_config, &["collector", "cluster"], json!(c.cluster()));
        set(plugin_config, &["collector", "authority"], json!(c.authority()));
    }
    // Told, or else OTLP's well-known gRPC port decides (pluginConfig's own choice stands).
    let inferred = collector
        .as_ref()
        .filter(|c| c.port == 4317 && plugin_config.pointer("/collector/protocol").is_none())
        .map(|_| CollectorProtocol::Grpc);
    if let Some(p) = args.collector_protocol.or(file.collector_protocol).or(inferred) {
        let name = match p {
            CollectorProtocol::Http => "http",
            CollectorProtocol::Grpc => "grpc",
        };
        set(plugin_config, &["collector", "protocol"], json!(name));
    }
    match args.logs.or(file.logs) {
        Some(LogMode::Off) => set(plugin_config, &["logs", "enabled"], json!(false)),
        Some(mode) => {
            set(plugin_config, &["logs", "enabled"], json!(true));
            let mode = match mode {
                LogMode::Errors => "errors",
                LogMode::Sampled => "sampled",
                _ => "all",
            };
            set(plugin_config, &["logs", "mode"], json!(mode));
        }
        None => {}
    }
    if let Some(r) = args.sampling.or(file.sampling) {
        parse_ratio(&r.to_string()).map_err(|e| format!("--sampling: {e}"))?;
        set(plugin_config, &["traces", "sampling_ratio"], json!(r));
    }
    if let Some(t) = flag(args.traces, args.no_traces).or(file.traces) {
        set(plugin_config, &["traces", "enabled"], json!(t));
    }
    match (flag(args.metrics, args.no_metrics).or(file.metrics), mode) {
        (Some(m), _) => set(plugin_config, &["metrics", "enabled"], json!(m)),
        // A gateway typically traces only; its metrics come from Istio's own stats.
        (None, Mode::Gateway { .. }) if plugin_config.pointer("/metrics/enabled").is_none() => {
            set(plugin_config, &["metrics", "enabled"], json!(false))
        }
        _ => {}
    }
    let bytes = serde_json::to_vec(&plugin_config).map_err(|e| e.to_string())?;
    meshtel_filter::config::parse(&bytes).map_err(|e| format!("pluginConfig: {e}"))?;
    if let Some((field, reason)) = crate::cel::problems(plugin_config).into_iter().next() {
        return Err(format!("pluginConfig: {field}: {reason}"));
    }
    Ok(collector)
}

/// The module's URL, its pinned digest and the Secret it is pulled with.
fn module(args: &RenderArgs, file: &FileOptions) -> Result<(String, Option<String>, Option<String>), String> {
    let wasm_url = args.wasm_url.clone().or(file.wasm_url.clone());
    let image = args.image.clone().or(file.image.clone());
    let url = match (image, wasm_url.clone()) {
        (Some(_), Some(_)) => return Err("--image and --wasm-url are alternatives: give one".into()),
        (Some(i), None) => {
            if !i.starts_with("oci://") && i.contains("://") {
                return Err(format!("--image: expected oci://REGISTRY/REPO:TAG, got {i:?}"));
            }
            i
        }
        (None, Some(u)) => {
            if !(u.starts_with("http://") || u.starts_with("https://") || u.starts_with("file://")) {
                return Err(format!("--wasm-url: expected an http://, https:// or file:// URL, got {u:?}"));
            }
            u
        }
        (None, None) => DEFAULT_IMAGE.into(),
    };
    let wasm_file = args.wasm_file.clone().or(file.wasm_file.clone());
    let sha256 = match (args.sha256.clone().or(file.sha256.clone()), wasm_file) {
        (Some(_), Some(_)) => return Err("--sha256 and --wasm-file are alternatives: give one".into()),
        (Some(s), None) => {
            if !crate::rules::is_sha256(&s) {
                return Err(format!("--sha256: expected 64 lower-case hex characters, got {s:?}"));
            }
            Some(s)
        }
        (None, Some(path)) => {
            if wasm_url.is_none() {
                return Err("--wasm-file pins a module served at --wasm-url; for an oci:// image pin the digest `meshtel package` printed with --sha256".into());
            }
            Some(sha256_file(&path)?)
        }
        (None, None) => None,
    };
    let image_pull_secret = args.image_pull_secret.clone().or(file.image_pull_secret.clone());
    if let Some(secret) = &image_pull_secret {
        if !url.starts_with("oci://") {
            return Err("--image-pull-secret is for an oci:// image (--image), not --wasm-url".into());
        }
        if !crate::rules::is_dns_subdomain(secret) {
            return Err(format!("--image-pull-secret: {secret:?} is not a valid Secret name"));
        }
    }
    Ok((url, sha256, image_pull_secret))
}

/// `--collector-header-from-env HEADER=VAR`: the headers into `plugin_config`, and the variables
/// the WasmPlugin exposes to the filter.
fn header_env(args: &RenderArgs, file: &FileOptions, plugin_config: &mut Value) -> Result<Vec<String>, String> {
    let header_env =
        if args.header_env.is_empty() { file.collector_header_from_env.clone() } else { args.header_env.clone() };
    let mut host_env = Vec::new();
    for pair in &header_env {
        let (header, var) = pair
            .split_once('=')
            .ok_or_else(|| format!("--collector-header-from-env: expected HEADER=VAR, got {pair:?}"))?;
        set(plugin_config, &["collector", "headers_from_env", header], json!(var));
        if !host_env.contains(&var.to_string()) {
            host_env.push(var.to_string());
        }
    }
    if !header_env.is_empty() {
        let bytes = serde_json::to_vec(&plugin_config).map_err(|e| e.to_string())?;
        meshtel_filter::config::parse(&bytes).map_err(|e| format!("--collector-header-from-env: {e}"))?;
    }
    Ok(host_env)
}

/// Whether the network filter is rendered too: on wherever metrics are (Istio counts TCP
/// connections by default, and the network filter costs HTTP chains nothing measurable:
/// BENCHMARKS.md, "TCP network filter on an HTTP chain").
fn tcp(args: &RenderArgs, file: &FileOptions, plugin_config: &Value) -> Result<bool, String> {
    let metrics_on = plugin_config.pointer("/metrics/enabled") != Some(&json!(false));
    let asked = if args.no_tcp {
        Some(false)
    } else if args.tcp {
        Some(true)
    } else {
        file.tcp
    };
    if asked == Some(true) && !metrics_on {
        return Err("--tcp records Istio's TCP metrics: it needs metrics on (drop --no-metrics, or add --metrics with --gateway)".into());
    }
    Ok(asked.unwrap_or(metrics_on))
}

/// Read the Telemetry resources of `--from-istio-telemetry` (`-`: stdin).
fn carry_over(path: &Path, crds: Option<&Path>, root_namespace: &str) -> Result<CarriedOver, String> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).map_err(|e| format!("--from-istio-telemetry: stdin: {e}"))?
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| format!("--from-istio-telemetry: cannot read {}: {e}", path.display()))?
    };
    let schemas = crds.map(crate::schema::CrdSchemas::load).transpose()?;
    crate::istio_telemetry::read(&text, root_namespace, schemas.as_ref())
        .map_err(|e| format!("--from-istio-telemetry: {e}"))
}

/// The waypoint modes: Istio attaches a WasmPlugin to a waypoint only through `targetRefs`
/// (istio/istio `pilot/pkg/model/policyattachment.go`); a selector never reaches one.
fn waypoint_mode(args: &RenderArgs, namespaces: &[String], other: bool, count: usize) -> Result<Mode, String> {
    if count > 1 || other {
        return Err("--waypoint, --service and --all-waypoints exclude each other and the other modes".into());
    }
    if args.all_waypoints {
        if !namespaces.is_empty() {
            return Err("--all-waypoints attaches from the root namespace (--root-namespace), not --namespace".into());
        }
        return Ok(Mode::AllWaypoints);
    }
    let (flag, name) = match (&args.waypoint, &args.service) {
        (Some(n), _) => ("--waypoint", n.clone()),
        (_, Some(n)) => ("--service", n.clone()),
        _ => return Err("no waypoint mode".into()),
    };
    if !crate::rules::is_dns_subdomain(&name) || name.len() > 253 {
        return Err(format!("{flag}: {name:?} is not a valid resource name"));
    }
    let [namespace] = namespaces else {
        return Err(format!("{flag} needs exactly one --namespace (the {} namespace)", &flag[2..]));
    };
    Ok(if args.waypoint.is_some() {
        Mode::Waypoint { name, namespace: namespace.clone() }
    } else {
        Mode::Service { name, namespace: namespace.clone() }
    })
}

fn gateway_name_without_gateway(args: &RenderArgs, mode: &Mode) -> bool {
    (args.gateway_name.is_some() || args.gateway_namespace.is_some()) && !matches!(mode, Mode::Gateway { .. })
}
