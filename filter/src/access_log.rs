//! Access logs: one record per request (or per failed or sampled request, per `logs.mode`),
//! carrying Istio's access-log fields and the request's trace and span ids. Plain data captured on
//! the request path, encoded as OTLP log records only at flush time.

use std::fmt::Write as _;

use crate::config::LogMode;
use crate::traces::propagation::TraceDecision;
use crate::traces::span::{Completion, RequestInfo};

/// A finished request's access-log record, ready to be queued for export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLog {
    /// The request's trace and span ids; `None` when tracing is off.
    pub trace: Option<TraceDecision>,
    /// Start time, nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// Request facts.
    pub request: RequestInfo,
    /// Completion facts.
    pub completion: Completion,
}

/// OTLP severity of an access-log record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// 1xx-3xx.
    Info,
    /// 4xx.
    Warn,
    /// 5xx, or no response at all.
    Error,
}

impl Severity {
    /// `SeverityNumber` of logs.proto.
    pub fn number(self) -> i32 {
        match self {
            Severity::Info => 9,
            Severity::Warn => 13,
            Severity::Error => 17,
        }
    }

    /// `severity_text`.
    pub fn text(self) -> &'static str {
        match self {
            Severity::Info => "INFO",
            Severity::Warn => "WARN",
            Severity::Error => "ERROR",
        }
    }
}

/// Whether a request starting now may get a log record: in `sampled` mode only if its trace is
/// sampled. Decided at the start so that the request path captures what the record needs.
pub fn wanted(mode: LogMode, sampled: bool) -> bool {
    mode != LogMode::Sampled || sampled
}

/// Whether a finished request gets its record: in `errors` mode only failed requests (status 400
/// and above, no response, or Envoy response flags set).
pub fn keep(mode: LogMode, c: &Completion) -> bool {
    mode != LogMode::Errors || c.status_code == 0 || c.status_code >= 400 || has_flags(c)
}

fn has_flags(c: &Completion) -> bool {
    !c.response_flags.is_empty() && c.response_flags != "-"
}

impl AccessLog {
    /// Duration of the request in milliseconds.
    pub fn duration_ms(&self) -> u64 {
        self.completion.end_unix_nanos.saturating_sub(self.start_unix_nanos) / 1_000_000
    }

    /// Severity by status: 5xx or no response is an error, 4xx a warning.
    pub fn severity(&self) -> Severity {
        match self.completion.status_code {
            0 | 500.. => Severity::Error,
            400..=499 => Severity::Warn,
            _ => Severity::Info,
        }
    }

    /// The log body: one line in the order of Istio's default access-log format,
    /// `"GET /path HTTP/1.1" 200 - 0 512 3 "curl/8" "request-id" "authority" "upstream" cluster`
    /// (`-` for what is unknown; no query string).
    pub fn summary(&self) -> String {
        let (r, c) = (&self.request, &self.completion);
        let dash = |v: Option<&str>| v.filter(|v| !v.is_empty()).unwrap_or("-").to_string();
        let mut line = String::with_capacity(160);
        let _ = write!(
            line,
            "\"{} {} {}\" {} {} {} {} {} \"{}\" \"{}\" \"{}\" \"{}\" {}",
            dash(Some(&r.method)),
            dash(Some(&r.path)),
            dash(c.protocol.as_deref()),
            c.status_code,
            dash(Some(&c.response_flags)),
            c.bytes_received,
            c.bytes_sent,
            self.duration_ms(),
            dash(r.user_agent.as_deref()),
            dash(r.request_id.as_deref()),
            dash(Some(&r.authority)),
            dash(c.upstream_host.as_deref()),
            dash(c.upstream_cluster.as_deref()),
        );
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(code: u32, flags: &str) -> Completion {
        Completion { status_code: code, response_flags: flags.into(), ..Default::default() }
    }

    #[test]
    fn modes_pick_requests() {
        assert!(wanted(LogMode::All, false));
        assert!(wanted(LogMode::Errors, false));
        assert!(!wanted(LogMode::Sampled, false));
        assert!(wanted(LogMode::Sampled, true));
        assert!(keep(LogMode::All, &completion(200, "-")));
        assert!(!keep(LogMode::Errors, &completion(200, "-")));
        assert!(!keep(LogMode::Errors, &completion(302, "-")));
        assert!(keep(LogMode::Errors, &completion(404, "-")));
        assert!(keep(LogMode::Errors, &completion(503, "UF")));
        assert!(keep(LogMode::Errors, &completion(0, "DC")));
        assert!(keep(LogMode::Errors, &completion(200, "DI")));
    }

    #[test]
    fn severity_by_status() {
        let log = |code| AccessLog {
            trace: None,
            start_unix_nanos: 0,
            request: RequestInfo::default(),
            completion: completion(code, "-"),
        };
        assert_eq!(log(200).severity(), Severity::Info);
        assert_eq!(log(302).severity(), Severity::Info);
        assert_eq!(log(404).severity(), Severity::Warn);
        assert_eq!(log(503).severity(), Severity::Error);
        assert_eq!(log(0).severity(), Severity::Error);
        assert_eq!((Severity::Error.number(), Severity::Error.text()), (17, "ERROR"));
    }

    #[test]
    fn summary_reads_like_istios_access_log() {
        let log = AccessLog {
            trace: None,
            start_unix_nanos: 1_000_000,
            request: RequestInfo {
                method: "GET".into(),
                path: "/items".into(),
                authority: "shop:8080".into(),
                user_agent: Some("curl/8".into()),
                request_id: Some("r-1".into()),
                ..Default::default()
            },
            completion: Completion {
                end_unix_nanos: 4_500_000,
                status_code: 200,
                response_flags: "-".into(),
                protocol: Some("HTTP/1.1".into()),
                upstream_host: Some("10.0.0.2:8080".into()),
                upstream_cluster: Some("inbound|8080||".into()),
                bytes_received: 0,
                bytes_sent: 512,
                ..Default::default()
            },
        };
        assert_eq!(
            log.summary(),
            r#""GET /items HTTP/1.1" 200 - 0 512 3 "curl/8" "r-1" "shop:8080" "10.0.0.2:8080" inbound|8080||"#
        );
        let empty =
            AccessLog { trace: None, start_unix_nanos: 0, request: Default::default(), completion: completion(0, "") };
        assert_eq!(empty.summary(), r#""- - -" 0 - 0 0 0 "-" "-" "-" "-" -"#);
    }
}
