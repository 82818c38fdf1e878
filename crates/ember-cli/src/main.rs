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
    /// CPU threads for the model's work: one pool shared by every kernel, candle's GEMMs and the
    /// tokenizer (default: every core this process may use).
    #[arg(long, global = true)]
    threads: Option<usize>,
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

/// Sizes the one CPU thread pool (rayon's global pool, which ember's kernels, candle's GEMMs and
/// the tokenizer all use) to `threads`, or to every core this process may use. `RAYON_NUM_THREADS`
/// is set too: without it candle works the count out again on every matmul, reading and parsing
/// /proc/cpuinfo each time (on the demo model that was half of a decode step). Called first
/// thing, while the process has one thread.
fn size_thread_pool(threads: Option<usize>) -> anyhow::Result<usize> {
    let threads = match threads {
        Some(0) => anyhow::bail!("--threads 0: pass at least 1"),
        Some(n) => n,
        None => match std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            Some(n) if n > 0 => n,
            _ => candle_core::utils::get_num_threads(),
        },
    };
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("ember-cpu-{i}"))
        .build_global()
        .map_err(|e| anyhow::anyhow!("cannot start {threads} CPU threads: {e}"))?;
    Ok(threads)
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = size_thread_pool(cli.threads) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
