//! `wsimil`: parse flags, set up logging, hand over to the library.

use clap::Parser;
use wsimil_coordinator::cli::{self, Cli, Command};

fn main() -> std::process::ExitCode {
    wsimil_coordinator::prepare_process();
    wsimil_coordinator::init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => tokio_main(cli::run(*args)),
        Command::Coordinator(args) if args.nats.url.is_none() => Err(anyhow::anyhow!("coordinator needs --nats URL")),
        Command::Coordinator(args) => tokio_main(cli::run(*args)),
        Command::Worker(args) => tokio_main(cli::worker(*args)),
        Command::Status(args) => tokio_main(cli::status(args)),
        Command::RetryFailed(args) => tokio_main(cli::retry_failed(args)),
        Command::CheckDevice(args) => cli::check_device(args),
        Command::DemoCohort(args) => cli::demo_cohort(args),
        Command::ImportBags(args) => tokio_main(cli::import_bags(args)),
        Command::ImportClam(args) => tokio_main(cli::import_clam(args)),
        Command::Predict(args) => tokio_main(cli::predict(*args)),
        Command::ExportModel(args) => tokio_main(cli::export_model(args)),
        Command::ExportFeatures(args) => tokio_main(cli::export_features(args)),
        Command::Report(args) => tokio_main(cli::report(args)),
        Command::ImportModel(args) => tokio_main(cli::import_model(*args)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn tokio_main(f: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(f)
}
