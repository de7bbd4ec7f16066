//! Tracing custom tags, as Istio's Telemetry API defines them (`spec.tracing[].customTags`):
//! a span attribute whose value is a literal, an environment variable of the proxy, or a request
//! header, the last two with a default.
//!
//! Istio renders them as Envoy's tracing `custom_tags` (istio/istio
//! `pilot/pkg/networking/core/tracing.go`, `buildCustomTags`), and Envoy sets a tag only when its
//! value is not empty (envoyproxy/envoy `source/common/tracing/custom_tag_impl.cc`,
//! `CustomTagBase::applySpan`): a header that is absent and has no default adds nothing.

use crate::config::fields::Fields;
use crate::config::ConfigError;
use crate::headers::Headers;
use crate::quote::{name as quoted_name, quote};
use crate::traces::span::{truncate, MAX_ATTRIBUTE_LEN};

/// Most custom tags.
pub const MAX_CUSTOM_TAGS: usize = 32;

/// Where a custom tag's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagSource {
    /// A fixed value (an environment tag becomes one once the proxy's environment is read).
    Literal(String),
    /// A variable of the proxy's environment (exposed to the VM: `vmConfig.env`), or `default`.
    Environment {
        /// The variable.
        name: String,
        /// Used when the variable is unset.
        default: String,
    },
    /// A request header (its first value), or `default`.
    Header {
        /// The header, lower case.
        name: String,
        /// Used when the request has no such header.
        default: String,
    },
}

/// One custom tag: the span attribute `name` and where its value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomTag {
    /// The attribute's key.
    pub name: String,
    /// Its value's source.
    pub source: TagSource,
}

/// Read `traces.custom_tags`: an object of tag name to `{"literal": {"value": V}}`,
/// `{"environment": {"name": N, "default_value": D}}` or `{"header": {"name": H,
/// "default_value": D}}`.
pub(crate) fn read(f: &Fields<'_>) -> Result<Vec<CustomTag>, ConfigError> {
    let Some(tags) = f.map("custom_tags")? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (name, value) in tags.entries() {
        let path = tags.path(name);
        if name.is_empty() || name.len() > 256 {
            return Err(ConfigError::new(&path, "a tag name is 1 to 256 bytes"));
        }
        if out.len() >= MAX_CUSTOM_TAGS {
            return Err(ConfigError::new(&f.path("custom_tags"), format!("at most {MAX_CUSTOM_TAGS} tags")));
        }
        let tag = Fields::new(&path, value, &["literal", "environment", "header"])?;
        let literal = tag.object("literal", &["value"])?;
        let environment = tag.object("environment", &["name", "default_value"])?;
        let header = tag.object("header", &["name", "default_value"])?;
        let source = match (literal, environment, header) {
            (Some(l), None, None) => TagSource::Literal(required(&l, "value")?),
            (None, Some(e), None) => TagSource::Environment {
                name: required(&e, "name")?,
                default: e.string("default_value")?.unwrap_or_default(),
            },
            (None, None, Some(h)) => {
                let header = required(&h, "name")?;
                if !crate::config::is_header_name(&header) {
                    return Err(ConfigError::new(
                        &h.path("name"),
                        format!("{} is not a lower-case header name", quote(&header)),
                    ));
                }
                TagSource::Header { name: header, default: h.string("default_value")?.unwrap_or_default() }
            }
            _ => {
                return Err(ConfigError::new(&path, "exactly one of `literal`, `environment`, `header`"));
            }
        };
        out.push(CustomTag { name: name.clone(), source });
    }
    Ok(out)
}

/// Refuse a header tag that names a `sensitive` header: it would record it on every span.
pub(crate) fn refuse_sensitive(tags: &[CustomTag], sensitive: &[String]) -> Result<(), ConfigError> {
    for t in tags {
        if let TagSource::Header { name, .. } = &t.source {
            if sensitive.contains(name) {
                return Err(ConfigError::new(
                    &format!("traces.custom_tags.{}.header.name", t.name),
                    format!("{} is sensitive and can never be recorded", quoted_name(name)),
                ));
            }
        }
    }
    Ok(())
}

fn required(f: &Fields<'_>, name: &str) -> Result<String, ConfigError> {
    f.string(name)?.ok_or_else(|| ConfigError::new(&f.path(name), "is required"))
}

/// Turn environment tags into literals with `env` (the proxy's environment, read once at
/// configure time); a tag whose value and default are both empty is dropped.
pub fn resolve_environment(tags: &mut Vec<CustomTag>, env: impl Fn(&str) -> Option<String>) {
    for tag in tags.iter_mut() {
        if let TagSource::Environment { name, default } = &tag.source {
            let value = env(name).filter(|v| !v.is_empty()).unwrap_or_else(|| default.clone());
            tag.source = TagSource::Literal(value);
        }
    }
    tags.retain(|t| !matches!(&t.source, TagSource::Literal(v) if v.is_empty()));
}

/// The tags' values for a request with these headers, as span attributes; empty ones left out.
pub fn values(tags: &[CustomTag], headers: Headers<'_>) -> Vec<(String, String)> {
    tags.iter()
        .filter_map(|t| {
            let value = match &t.source {
                TagSource::Literal(v) => v.clone(),
                TagSource::Header { name, default } => headers
                    .first(name)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .filter(|v| !v.is_empty())
                    .map_or_else(|| default.clone(), |v| truncate(v, MAX_ATTRIBUTE_LEN)),
                // Resolved at configure time; unresolved, it has no value.
                TagSource::Environment { .. } => String::new(),
            };
            (!value.is_empty()).then(|| (t.name.clone(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::headers::HeaderPairs;

    fn parse(tags: &str) -> Result<Vec<CustomTag>, String> {
        let json = format!(r#"{{"collector":{{"cluster":"outbound|4318||c"}},"traces":{{"custom_tags":{tags}}}}}"#);
        config::parse(json.as_bytes()).map(|c| c.traces.custom_tags).map_err(|e| e.to_string())
    }

    #[test]
    fn reads_istios_three_kinds_of_tag() {
        let tags = parse(
            r#"{"zone":{"literal":{"value":"east"}},
                "pod":{"environment":{"name":"POD_NAME","default_value":"unknown"}},
                "user":{"header":{"name":"x-user"}}}"#,
        )
        .unwrap();
        assert_eq!(
            tags,
            [
                CustomTag {
                    name: "pod".into(),
                    source: TagSource::Environment { name: "POD_NAME".into(), default: "unknown".into() }
                },
                CustomTag {
                    name: "user".into(),
                    source: TagSource::Header { name: "x-user".into(), default: String::new() }
                },
                CustomTag { name: "zone".into(), source: TagSource::Literal("east".into()) },
            ]
        );
        assert_eq!(parse("{}").unwrap(), []);
    }

    #[test]
    fn refuses_what_istio_or_meshtel_would_not_take_naming_the_field() {
        for (tags, want) in [
            (r#"{"a":{"literal":{"value":"x"},"header":{"name":"x"}}}"#, "traces.custom_tags.a: exactly one of"),
            (r#"{"a":{}}"#, "traces.custom_tags.a: exactly one of"),
            (r#"{"a":{"header":{}}}"#, "traces.custom_tags.a.header.name: is required"),
            (r#"{"a":{"header":{"name":"X-User"}}}"#, "traces.custom_tags.a.header.name: \"X-User\" is not"),
            (
                r#"{"a":{"header":{"name":"authorization"}}}"#,
                "traces.custom_tags.a.header.name: authorization is sensitive",
            ),
            (r#"{"a":{"literal":{"value":"x","extra":1}}}"#, "traces.custom_tags.a.literal.extra: unknown field"),
            (r#"{"a":"x"}"#, "traces.custom_tags.a: invalid type"),
            (r#"[]"#, "traces.custom_tags: invalid type"),
        ] {
            let e = parse(tags).unwrap_err();
            assert!(e.starts_with(want), "{tags}: {e}");
        }
        let many: Vec<String> =
            (0..=MAX_CUSTOM_TAGS).map(|i| format!(r#""t{i:02}":{{"literal":{{"value":"v"}}}}"#)).collect();
        assert!(parse(&format!("{{{}}}", many.join(","))).unwrap_err().contains("at most 32 tags"));
    }

    #[test]
    fn environment_tags_are_read_once_and_headers_per_request_with_their_defaults() {
        let mut tags = parse(
            r#"{"pod":{"environment":{"name":"POD_NAME","default_value":"unknown"}},
                "node":{"environment":{"name":"NODE_NAME"}},
                "user":{"header":{"name":"x-user","default_value":"anonymous"}},
                "tenant":{"header":{"name":"x-tenant"}},
                "zone":{"literal":{"value":"east"}}}"#,
        )
        .unwrap();
        resolve_environment(&mut tags, |var| (var == "POD_NAME").then(|| "ratings-v1-x".to_string()));
        assert_eq!(tags.len(), 4, "NODE_NAME unset and no default: no tag");
        let with = HeaderPairs::from_pairs(&[("x-user", "alice"), ("x-tenant", "t1")]);
        let got = values(&tags, with.view());
        let want = [("pod", "ratings-v1-x"), ("tenant", "t1"), ("user", "alice"), ("zone", "east")];
        assert_eq!(got, want.map(|(k, v)| (k.to_string(), v.to_string())));
        let without = HeaderPairs::from_pairs(&[(":path", "/")]);
        let got = values(&tags, without.view());
        let want = [("pod", "ratings-v1-x"), ("user", "anonymous"), ("zone", "east")];
        assert_eq!(got, want.map(|(k, v)| (k.to_string(), v.to_string())), "x-tenant absent, no default");
        resolve_environment(&mut tags, |_| None);
        assert_eq!(tags.len(), 4, "resolved once: literals now");
    }
}
