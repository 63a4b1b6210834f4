use std::process::ExitCode;

use clap::Parser;
use webhook_worker::cli::{self, Cli};
use webhook_worker::logging;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.config.log_format);
    match cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("webhook-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}
