//! `wsimil-dev`: parse flags, set up logging, hand over to the library.

use clap::Parser;
use std::io::IsTerminal;
use wsimil_dev::cli::{self, Cli, Command};

fn main() -> std::process::ExitCode {
    wsimil_coordinator::prepare_process();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("WSIMIL_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match Cli::parse().command {
        Command::BenchRead(args) => cli::bench_read(args),
        Command::MakeSlide(args) => cli::make_slide(args),
        Command::BenchTransmil(args) => cli::bench_transmil(args),
        Command::BenchEmbed(args) => cli::bench_embed(args),
        Command::IcmilTeacherCheck(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(cli::icmil_teacher_check(args))),
        Command::CheckDevice(args) => wsimil_coordinator::cli::check_device(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
