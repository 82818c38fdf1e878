//! `ember`: serve MoE language models behind the OpenAI/Fireworks API, or run one prompt.

mod args;
mod bench;
mod generate;
mod offline_bench;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ember",
    version,
    about = "Serve Mixture-of-Experts LLMs behind the OpenAI/Fireworks API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the OpenAI-compatible HTTP server.
    Serve(serve::ServeArgs),
    /// Run one prompt and print the completion with its prefill and decode speed.
    Generate(generate::GenerateArgs),
    /// Benchmark a server or the engine.
    Bench(bench::BenchArgs),
}

/// Fixes candle's CPU thread count for the process. Without `RAYON_NUM_THREADS` candle works it
/// out again on every matmul, reading and parsing /proc/cpuinfo each time: on the demo model
/// that was half of a decode step. Set first thing, while the process has one thread.
fn pin_cpu_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var(
            "RAYON_NUM_THREADS",
            candle_core::utils::get_num_threads().to_string(),
        );
    }
}

fn main() {
    pin_cpu_thread_count();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
