//! Command-line interface: the commands and their flags ([`crate::options`] resolves `render`'s).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::render::Api;

/// Default module image: meshtel's release for this version.
pub const DEFAULT_IMAGE: &str = concat!("oci://ghcr.io/meshtel/meshtel-filter:", env!("CARGO_PKG_VERSION"));
/// Default collector: an OpenTelemetry Collector Service in the `observability` namespace.
pub const DEFAULT_COLLECTOR: &str = "otel-collector.observability:4318";

/// meshtel deploys OpenTelemetry tracing and Istio metrics into an Istio mesh as a Wasm filter.
#[derive(Debug, Parser)]
#[command(name = "meshtel", version, about, long_about = None, arg_required_else_help = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Render the Istio resources that deploy meshtel, ready for `kubectl apply -f -`.
    #[command(after_help = RENDER_EXAMPLES)]
    Render(Box<RenderArgs>),
    /// Check WasmPlugin and TrafficExtension YAML the way Istio would, and meshtel's pluginConfig.
    Validate(ValidateArgs),
    /// Package meshtel_filter.wasm as an OCI artifact Istio can pull, and optionally push it.
    Package(PackageArgs),
}

const RENDER_EXAMPLES: &str = "Examples:
  meshtel render --namespace shop | kubectl apply -f -
  meshtel render --gateway --collector otel-collector.observability:4318
  meshtel render --workload-label meshtel.io/trace=enabled --sampling 0.1";

/// `FAIL_OPEN` and friends.
/// The OTLP transport to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[value(rename_all = "lower")]
#[serde(rename_all = "lowercase")]
pub enum CollectorProtocol {
    /// OTLP/HTTP (protobuf), usually port 4318.
    Http,
    /// OTLP/gRPC, usually port 4317.
    Grpc,
}

/// Which requests get an access-log record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[value(rename_all = "lower")]
#[serde(rename_all = "lowercase")]
pub enum LogMode {
    /// Every request.
    All,
    /// Failed requests only (status >= 400, no response, or Envoy response flags).
    Errors,
    /// Requests whose trace is sampled.
    Sampled,
    /// No access logs.
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[value(rename_all = "SCREAMING_SNAKE_CASE")]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailStrategy {
    /// Requests go on without the filter if it cannot load (meshtel's default: telemetry never takes traffic down).
    FailOpen,
    /// Requests fail while the filter cannot load (Istio's default).
    FailClose,
    /// Reload the VM after a fatal error, failing open meanwhile (Istio >= 1.27).
    FailReload,
}

/// Filter chain phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[value(rename_all = "SCREAMING_SNAKE_CASE")]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Phase {
    /// Before Istio's authentication filters.
    Authn,
    /// Before Istio's authorization filters.
    Authz,
    /// Before Istio's stats filter (meshtel's default: it sees every request, denied ones included).
    Stats,
}

impl FailStrategy {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FailStrategy::FailOpen => "FAIL_OPEN",
            FailStrategy::FailClose => "FAIL_CLOSE",
            FailStrategy::FailReload => "FAIL_RELOAD",
        }
    }
}

impl Phase {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Phase::Authn => "AUTHN",
            Phase::Authz => "AUTHZ",
            Phase::Stats => "STATS",
        }
    }
}

/// `meshtel render`.
#[derive(Debug, Args, Default)]
pub struct RenderArgs {
    /// Run in every workload of this namespace (repeatable); with --workload-label, only there.
    #[arg(long = "namespace", value_name = "NS", help_heading = "Where")]
    pub namespaces: Vec<String>,
    /// Run in the ingress gateway only (selector `istio: ingressgateway`); traces only unless --metrics.
    #[arg(long, help_heading = "Where")]
    pub gateway: bool,
    /// With --gateway: attach to this Gateway API Gateway (targetRefs) instead of the label selector.
    #[arg(long, value_name = "NAME", help_heading = "Where")]
    pub gateway_name: Option<String>,
    /// With --gateway: the gateway's namespace [default: istio-system].
    #[arg(long, value_name = "NS", help_heading = "Where")]
    pub gateway_namespace: Option<String>,
    /// Run in workloads carrying this label, mesh-wide (or in the --namespace given).
    #[arg(long, value_name = "KEY=VALUE", help_heading = "Where")]
    pub workload_label: Option<String>,
    /// Run in every workload of the mesh.
    #[arg(long, help_heading = "Where")]
    pub mesh_wide: bool,
    /// Run in the ambient waypoint of this Gateway name, in the one --namespace given.
    #[arg(long, value_name = "NAME", help_heading = "Where")]
    pub waypoint: Option<String>,
    /// Run in the waypoints for this Service, in the one --namespace given (the Service's).
    #[arg(long, value_name = "NAME", help_heading = "Where")]
    pub service: Option<String>,
    /// Run in every ambient waypoint of the mesh (GatewayClass istio-waypoint, root namespace).
    #[arg(long, help_heading = "Where")]
    pub all_waypoints: bool,

    /// The collector Service, NAME.NAMESPACE:PORT or an FQDN [default: otel-collector.observability:4318].
    #[arg(long, value_name = "HOST:PORT", help_heading = "Telemetry")]
    pub collector: Option<String>,
    /// OTLP transport [default: grpc for port 4317, else http].
    #[arg(long, value_enum, value_name = "PROTOCOL", help_heading = "Telemetry")]
    pub collector_protocol: Option<CollectorProtocol>,
    /// Export an access log per request as OTLP logs: all, errors or sampled requests [default: off].
    #[arg(long, value_enum, value_name = "MODE", help_heading = "Telemetry")]
    pub logs: Option<LogMode>,
    /// Share of new traces sampled, 0 to 1 [default: 1].
    #[arg(long, value_name = "RATIO", value_parser = parse_ratio, help_heading = "Telemetry")]
    pub sampling: Option<f64>,
    /// Record and export spans [default].
    #[arg(long, overrides_with = "no_traces", help_heading = "Telemetry")]
    pub traces: bool,
    /// Do not trace.
    #[arg(long, help_heading = "Telemetry")]
    pub no_traces: bool,
    /// Record and export Istio metrics [default, except with --gateway].
    #[arg(long, overrides_with = "no_metrics", help_heading = "Telemetry")]
    pub metrics: bool,
    /// Do not record metrics.
    #[arg(long, help_heading = "Telemetry")]
    pub no_metrics: bool,
    /// Also render the network filter (type NETWORK, pluginName meshtel-tcp) for Istio's TCP
    /// metrics, istio_tcp_* [default, wherever metrics are on].
    #[arg(long, overrides_with = "no_tcp", help_heading = "Telemetry")]
    pub tcp: bool,
    /// Do not render the network filter.
    #[arg(long, help_heading = "Telemetry")]
    pub no_tcp: bool,
    /// Send HEADER to the collector with the value of the proxy's environment variable VAR
    /// (vmConfig.env with valueFrom HOST: credentials from a Secret, never inline; repeatable).
    #[arg(long = "collector-header-from-env", value_name = "HEADER=VAR", help_heading = "Telemetry")]
    pub header_env: Vec<String>,

    /// The module image [default: the meshtel release image of this version].
    #[arg(long, value_name = "oci://REF", conflicts_with = "wasm_url", help_heading = "Module")]
    pub image: Option<String>,
    /// The module over http(s):// or file:// instead of an image.
    #[arg(long, value_name = "URL", help_heading = "Module")]
    pub wasm_url: Option<String>,
    /// Pin the module (or, for an image, the digest `meshtel package` printed).
    #[arg(long, value_name = "HEX", conflicts_with = "wasm_file", help_heading = "Module")]
    pub sha256: Option<String>,
    /// Pin the module served at --wasm-url by hashing this local copy.
    #[arg(long, value_name = "PATH", help_heading = "Module")]
    pub wasm_file: Option<PathBuf>,
    /// Pull the image with this Secret (type kubernetes.io/dockerconfigjson, in the namespace of
    /// each rendered resource: Istio looks it up there).
    #[arg(long, value_name = "NAME", help_heading = "Module")]
    pub image_pull_secret: Option<String>,

    /// What happens to requests if the module cannot load [default: FAIL_OPEN].
    #[arg(long, value_enum, help_heading = "Istio")]
    pub fail_strategy: Option<FailStrategy>,
    /// Filter chain phase [default: STATS].
    #[arg(long, value_enum, help_heading = "Istio")]
    pub phase: Option<Phase>,
    /// Priority within the phase.
    #[arg(long, allow_negative_numbers = true, help_heading = "Istio")]
    pub priority: Option<i32>,
    /// Render a WasmPlugin, or Istio's newer TrafficExtension (Istio >= 1.30) [default: wasmplugin].
    #[arg(long, value_enum, help_heading = "Istio")]
    pub api: Option<Api>,
    /// Also render a Telemetry resource that turns off Istio's own span reporting for the same workloads.
    #[arg(long, help_heading = "Istio")]
    pub disable_istio_tracing: bool,
    /// Also render a ServiceEntry for a collector outside the mesh.
    #[arg(long, help_heading = "Istio")]
    pub collector_service_entry: bool,
    /// Resource name [default: meshtel].
    #[arg(long, help_heading = "Istio")]
    pub name: Option<String>,
    /// Istio's root namespace [default: istio-system].
    #[arg(long, value_name = "NS", help_heading = "Istio")]
    pub root_namespace: Option<String>,

    /// Carry over a mesh's Istio Telemetry resources (YAML documents, or `kubectl get telemetry
    /// -A -o yaml`; `-` reads stdin): mesh-wide, per namespace and per workload selector, merged as
    /// istiod merges them; what cannot be carried is listed as comments and on stderr. Without
    /// a `Where` option, meshtel runs mesh-wide.
    #[arg(long, value_name = "FILE", help_heading = "Coming from Istio's Telemetry API")]
    pub from_istio_telemetry: Option<PathBuf>,
    /// With --from-istio-telemetry: also render those resources again with Istio's own metrics
    /// and span reporting off (applying them replaces them), so that nothing is counted twice.
    #[arg(long, requires = "from_istio_telemetry", help_heading = "Coming from Istio's Telemetry API")]
    pub disable_istio_telemetry: bool,
    /// Check the Telemetry resources against these CRDs' OpenAPI schemas
    /// (e.g. `kubectl get crd telemetries.telemetry.istio.io -o yaml`).
    #[arg(
        long,
        value_name = "FILE",
        requires = "from_istio_telemetry",
        help_heading = "Coming from Istio's Telemetry API"
    )]
    pub crds: Option<PathBuf>,

    /// A YAML file with `pluginConfig:` (the whole filter config) and any of these options
    /// (same names, e.g. `sampling: 0.1`); flags win over the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Write to FILE instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// `meshtel validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// YAML files with WasmPlugin or TrafficExtension resources (other kinds are skipped).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Also validate against these CRDs' OpenAPI schemas
    /// (e.g. `kubectl get crd wasmplugins.extensions.istio.io -o yaml`).
    #[arg(long, value_name = "FILE")]
    pub crds: Option<PathBuf>,
}

/// `meshtel package`.
#[derive(Debug, Args)]
pub struct PackageArgs {
    /// The module to package.
    #[arg(value_name = "WASM", default_value = "target/wasm32-wasip1/release/meshtel_filter.wasm")]
    pub wasm: PathBuf,
    /// Write the artifact as an OCI image layout in this directory.
    #[arg(short, long, value_name = "DIR", default_value = "meshtel-oci")]
    pub output: PathBuf,
    /// Tag recorded in the layout.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    pub tag: String,
    /// Push the artifact to REGISTRY/REPO:TAG, with the credentials `docker login` stored
    /// (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`: credential helpers, credsStore,
    /// auths), or those of --username and --password-stdin.
    #[arg(long, value_name = "REGISTRY/REPO:TAG")]
    pub push: Option<String>,
    /// The user name to push as; the password (or token) comes from --password-stdin.
    #[arg(long, value_name = "USER", requires = "push")]
    pub username: Option<String>,
    /// Read the password (or token) for --username from stdin.
    #[arg(long, requires = "push")]
    pub password_stdin: bool,
    /// Talk plain HTTP to a registry off the loopback interface (loopback registries are tried
    /// over HTTPS, then plain HTTP, without it, as Docker does).
    #[arg(long)]
    pub insecure: bool,
    /// What to print: text, or JSON for scripts (digest, size, reference, render flags).
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

/// What `meshtel package` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "lower")]
pub enum Format {
    /// Lines for people.
    Text,
    /// One JSON object.
    Json,
}

pub(crate) fn parse_ratio(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|_| format!("not a number: {s:?}"))?;
    if !(0.0..=1.0).contains(&r) {
        return Err(format!("must be between 0 and 1, got {r}"));
    }
    Ok(r)
}
