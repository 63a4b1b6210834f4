use std::process::ExitCode;

use clap::Parser;
use webhook_worker::cli::{self, Cli, Command};
use webhook_worker::telemetry;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = match telemetry::init(cli.config.log_format) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("webhook-worker: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // The worker's error also goes to its log (JSON for a log pipeline); a command's only to
    // the terminal.
    let service = matches!(cli.command, None | Some(Command::Run));
    let code = match cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if service {
                tracing::error!("{e:#}");
            }
            eprintln!("webhook-worker: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Spans still buffered are exported before the process ends.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    code
}
