//! `meshtel package`: the module as an OCI artifact in the layout Istio pulls.

use crate::cli::PackageArgs;

/// Package (and optionally push) the module; returns a summary to print.
pub fn run(_args: &PackageArgs) -> Result<String, String> {
    Err("not yet".into())
}
