//! `ember bench`: load generators. `serve` drives a running OpenAI-compatible server and
//! reports vLLM's serving metrics.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

/// Flags of `ember bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

/// The benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Load-test an OpenAI-compatible endpoint (ember, vLLM, SGLang, Fireworks) as `vllm bench serve` does.
    // Boxed: its many flags would make every other variant as large.
    Serve(Box<ember_bench::args::ServeArgs>),
    /// Offline: many requests through the engine in-process, as fast as it goes, with the
    /// engine's time per step split by phase.
    Throughput(crate::offline_bench::ThroughputArgs),
    /// Offline: prefill and per-token decode latency of one fixed batch.
    Latency(crate::offline_bench::LatencyArgs),
}

/// Runs the chosen benchmark; fails when no request succeeded.
pub fn run(args: BenchArgs) -> Result<()> {
    match args.command {
        BenchCommand::Serve(serve) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let result = runtime.block_on(ember_bench::serve::run(*serve))?;
            if result.completed == 0 {
                let first = result.errors.iter().find(|e| !e.is_empty());
                bail!(
                    "all {} requests failed; the first error: {}",
                    result.failed,
                    first.map_or("(none recorded)", String::as_str)
                );
            }
            Ok(())
        }
        BenchCommand::Throughput(args) => crate::offline_bench::run_throughput(args),
        BenchCommand::Latency(args) => crate::offline_bench::run_latency(args),
    }
}
