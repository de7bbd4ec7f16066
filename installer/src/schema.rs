//! Validation against the OpenAPI v3 schemas of the user's installed Istio CRDs.
//!
//! The schemas are Kubernetes "structural schemas": objects that do not preserve unknown fields
//! are closed (as `kubectl apply` with strict field validation treats them), and `nullable`
//! admits null. CEL rules (`x-kubernetes-validations`) are not run here; [`crate::rules`] has them.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::rules::Problem;

/// Compiled schemas by `(apiVersion, kind)`.
pub struct CrdSchemas {
    validators: HashMap<(String, String), jsonschema::Validator>,
}

fn structural(schema: &mut Value) {
    let Some(obj) = schema.as_object_mut() else { return };
    if obj.get("nullable").and_then(Value::as_bool) == Some(true) {
        if let Some(t) = obj.get("type").cloned() {
            obj.insert("type".into(), json!([t, "null"]));
        }
    }
    let preserve = obj.get("x-kubernetes-preserve-unknown-fields").and_then(Value::as_bool) == Some(true);
    if obj.contains_key("properties") && !obj.contains_key("additionalProperties") && !preserve {
        obj.insert("additionalProperties".into(), json!(false));
    }
    for (key, child) in obj.iter_mut() {
        match key.as_str() {
            "properties" | "patternProperties" => {
                if let Some(props) = child.as_object_mut() {
                    props.values_mut().for_each(structural);
                }
            }
            "items" | "additionalProperties" | "not" => structural(child),
            "allOf" | "anyOf" | "oneOf" => {
                if let Some(list) = child.as_array_mut() {
                    list.iter_mut().for_each(structural);
                }
            }
            _ => {}
        }
    }
}

impl CrdSchemas {
    /// Load every CustomResourceDefinition in a YAML file (documents, or a `List` of them).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("--crds: cannot read {}: {e}", path.display()))?;
        let docs = crate::yaml::yaml_documents(&text).map_err(|e| format!("--crds {}: {e}", path.display()))?;
        let mut crds = Vec::new();
        for doc in docs {
            match doc.get("kind").and_then(Value::as_str) {
                Some("CustomResourceDefinition") => crds.push(doc),
                Some("List") | Some("CustomResourceDefinitionList") => {
                    crds.extend(doc.get("items").and_then(Value::as_array).cloned().unwrap_or_default())
                }
                _ => {}
            }
        }
        let mut validators = HashMap::new();
        for crd in crds {
            let group = crd.pointer("/spec/group").and_then(Value::as_str).unwrap_or_default();
            let kind = crd.pointer("/spec/names/kind").and_then(Value::as_str).unwrap_or_default();
            for version in crd.pointer("/spec/versions").and_then(Value::as_array).into_iter().flatten() {
                let name = version.get("name").and_then(Value::as_str).unwrap_or_default();
                let Some(schema) = version.pointer("/schema/openAPIV3Schema") else { continue };
                let mut schema = schema.clone();
                // Every object carries these beside its CRD-specific properties.
                if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
                    props.entry("apiVersion").or_insert(json!({"type": "string"}));
                    props.entry("kind").or_insert(json!({"type": "string"}));
                    props
                        .entry("metadata")
                        .or_insert(json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
                }
                structural(&mut schema);
                let validator = jsonschema::validator_for(&schema)
                    .map_err(|e| format!("--crds: the schema of {kind} {group}/{name} does not compile: {e}"))?;
                validators.insert((format!("{group}/{name}"), kind.to_string()), validator);
            }
        }
        if validators.is_empty() {
            return Err(format!("--crds {}: no CustomResourceDefinition with a schema found", path.display()));
        }
        Ok(Self { validators })
    }

    /// Problems of `resource` under its CRD schema; `None` when the file had no CRD for its kind.
    pub fn check(&self, resource: &Value) -> Option<Vec<Problem>> {
        let api = resource.get("apiVersion").and_then(Value::as_str)?;
        let kind = resource.get("kind").and_then(Value::as_str)?;
        let validator = self.validators.get(&(api.to_string(), kind.to_string()))?;
        Some(
            validator
                .iter_errors(resource)
                .map(|e| {
                    let pointer = e.instance_path().to_string();
                    let path = pointer.trim_start_matches('/').replace('/', ".");
                    Problem::new(if path.is_empty() { "." } else { &path }, format!("schema: {e}"))
                })
                .collect(),
        )
    }
}
