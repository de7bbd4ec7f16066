//! YAML streams as users have them: several documents, empty ones skipped.

use serde::Deserialize;
use serde_json::Value;

/// Split a YAML stream into documents (empty documents skipped).
pub fn yaml_documents(text: &str) -> Result<Vec<Value>, String> {
    let mut docs = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc).map_err(|e| format!("document {}: not valid YAML: {e}", i + 1))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}
