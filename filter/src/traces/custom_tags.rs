//! Tracing custom tags, as Istio's Telemetry API defines them (`spec.tracing[].customTags`):
//! a span attribute whose value is a literal, an environment variable of the proxy, or a request
//! header, the last two with a default.
//!
//! Istio renders them as Envoy's tracing `custom_tags` (istio/istio
//! `pilot/pkg/networking/core/tracing.go`, `buildCustomTags`), and Envoy sets a tag only when its
//! value is not empty (envoyproxy/envoy `source/common/tracing/custom_tag_impl.cc`,
//! `CustomTagBase::applySpan`): a header that is absent and has no default adds nothing.

pub use crate::config::custom_tags::{CustomTag, TagSource};
use crate::headers::Headers;
use crate::traces::span::{truncate, MAX_ATTRIBUTE_LEN};

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
        let many: Vec<String> = (0..=crate::config::custom_tags::MAX_CUSTOM_TAGS)
            .map(|i| format!(r#""t{i:02}":{{"literal":{{"value":"v"}}}}"#))
            .collect();
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
