//! CEL in a pluginConfig, checked before it reaches a proxy: every expression is parsed with the
//! cel-rust project's parser (`cel`, built from CEL's own ANTLR grammar), so that a syntax error
//! is refused at render and validate time with its position, not found by each proxy's
//! `expr_create` after the rollout.
//!
//! A parse is what Envoy's `expr_create` checks too (it builds no type environment): what passes
//! here compiles there, except a function Envoy's runtime does not have.

use serde_json::Value;

/// Every CEL expression of a pluginConfig: its field and the expression (`logs.filter`, the
/// UPSERT values of `metrics.overrides`, and the same in each of its `scopes`).
pub fn expressions(plugin_config: &Value) -> Vec<(String, &str)> {
    fn settings<'a>(at: &str, v: &'a Value) -> Vec<(String, &'a str)> {
        let mut found = Vec::new();
        if let Some(f) = v.pointer("/logs/filter").and_then(Value::as_str) {
            found.push((format!("{at}logs.filter"), f));
        }
        let overrides = v.pointer("/metrics/overrides").and_then(Value::as_array).into_iter().flatten();
        for (i, o) in overrides.enumerate() {
            let tags = o.get("tag_overrides").and_then(Value::as_object).into_iter().flatten();
            for (name, t) in tags {
                if let Some(e) = t.get("value").and_then(Value::as_str) {
                    found.push((format!("{at}metrics.overrides[{i}].tag_overrides.{name}.value"), e));
                }
            }
        }
        found
    }
    let mut out = settings("", plugin_config);
    let scopes = plugin_config.get("scopes").and_then(Value::as_array).into_iter().flatten();
    for (i, scope) in scopes.enumerate() {
        out.extend(settings(&format!("scopes[{i}]."), scope));
    }
    out
}

/// Parse `expression`; the parser's message with the line and column of each error otherwise.
pub fn check(expression: &str) -> Result<(), String> {
    // The parser is recursive: bound what it is given (meshtel's own limit is 4 KiB).
    if expression.len() > meshtel_filter::config::MAX_EXPRESSION_LEN {
        return Err(format!("longer than {} bytes", meshtel_filter::config::MAX_EXPRESSION_LEN));
    }
    // The grammar's parser recurses per nesting level: a thread with room for the deepest
    // expression the size limit lets through.
    let source = expression.to_string();
    let parsed = std::thread::Builder::new()
        .stack_size(PARSER_STACK)
        .spawn(move || {
            cel::parser::Parser::new().parse(&source).map(|_| ()).map_err(|errors| {
                errors.errors.iter().map(|e| format!("line {}, column {}: {}", e.pos.0, e.pos.1, e.msg)).collect()
            })
        })
        .map_err(|e| format!("cannot start the CEL parser: {e}"))?
        .join()
        .map_err(|_| "the CEL parser failed on it".to_string())?;
    parsed.map_err(|each: Vec<String>| format!("not a CEL expression: {} (in {:?})", each.join("; "), expression))
}

/// The parser thread's stack.
const PARSER_STACK: usize = 256 << 20;

/// The problems of a pluginConfig's expressions: `(field, reason)`.
pub fn problems(plugin_config: &Value) -> Vec<(String, String)> {
    expressions(plugin_config)
        .into_iter()
        .filter_map(|(field, e)| check(e).err().map(|reason| (field, reason)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_istio_users_write() {
        for e in [
            "response.code >= 400",
            "request.headers['x-debug'] == '1'",
            "has(request.headers.x_tenant) && request.host.startsWith('api.')",
            "string(destination.port)",
            "response.code >= 500 || response.flags != 0u",
        ] {
            assert_eq!(check(e), Ok(()), "{e}");
        }
    }

    #[test]
    fn refuses_a_syntax_error_with_its_position() {
        let e = check("response.code >>= 400").unwrap_err();
        assert!(e.starts_with("not a CEL expression: line 1, column "), "{e}");
        let e = check("request.headers['x'] ==").unwrap_err();
        assert!(e.contains("line 1, column"), "{e}");
        assert!(check(&"(".repeat(5000)).unwrap_err().contains("longer than 4096 bytes"));
        // As deep as the size limit allows: refused or not, never a crash.
        let deep = format!("{}1{}", "(".repeat(2000), ")".repeat(2000));
        let _ = check(&deep);
        assert!(check(&"[".repeat(4000)).is_err());
    }
}
