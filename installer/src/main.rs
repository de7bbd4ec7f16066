//! `meshtel`: render, validate and package what deploys meshtel's filter into Istio.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use meshtel::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Render(args) => render(&args),
        Command::Validate(args) => match meshtel::validate::validate_files(&args.files, args.crds.as_deref()) {
            Ok(n) => {
                println!("ok: {n} resource(s) valid");
                Ok(())
            }
            Err(lines) => Err(lines.join("\n")),
        },
        Command::Package(args) => meshtel::package::run(&args).map(|summary| println!("{summary}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn render(args: &meshtel::cli::RenderArgs) -> Result<(), String> {
    let opts = meshtel::options::render_options(args)?;
    for note in &opts.notes {
        eprintln!("from Istio's Telemetry: {note}");
    }
    let yaml = meshtel::render::render(&opts)?;
    match &args.output {
        Some(path) => std::fs::write(path, yaml).map_err(|e| format!("-o {}: {e}", path.display())),
        None => std::io::stdout().write_all(yaml.as_bytes()).map_err(|e| format!("stdout: {e}")),
    }
}
