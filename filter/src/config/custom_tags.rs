//! Tracing custom tags as configured (`traces.custom_tags`, Istio's `tracing[].customTags`):
//! read and checked here; applied to spans by [`crate::traces::custom_tags`].

use super::error::ConfigError;
use super::fields::{is_header_name, Fields};
use crate::quote::{name as quoted_name, quote};

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
                if !is_header_name(&header) {
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
