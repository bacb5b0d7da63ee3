//! `wsimil-dev`: parse flags, set up logging, hand over to the library.

use clap::Parser;

#[global_allocator]
static ALLOC: wsimil_dev::alloc::Counting = wsimil_dev::alloc::Counting;
use wsimil_dev::cli::{self, Cli, Command};

fn main() -> std::process::ExitCode {
    wsimil_coordinator::prepare_process();
    wsimil_coordinator::init_logging();
    let result = match Cli::parse().command {
        Command::BenchRead(args) => cli::bench_read(args),
        Command::BenchRemote(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(cli::bench_remote(args))),
        Command::MakeSlide(args) => cli::make_slide(args),
        Command::BenchTransmil(args) => cli::bench_transmil(args),
        Command::BenchEmbed(args) => cli::bench_embed(args),
        Command::Features(args) => cli::features(args),
        Command::IcmilTeacherCheck(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(cli::icmil_teacher_check(args))),
        Command::MakeCohort(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(cli::make_cohort(args))),
        Command::BenchDecode(args) => cli::bench_decode(args),
        Command::StoreGet(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(cli::store_get(args))),
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
