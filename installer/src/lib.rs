//! meshtel's installer: renders, validates and packages the Istio resources that deploy the filter.

pub mod cel;
pub mod cli;
pub mod credentials;
pub mod istio_telemetry;
pub mod model;
pub mod options;
pub mod package;
pub mod render;
pub mod rules;
pub mod schema;
pub mod validate;
pub mod yaml;
