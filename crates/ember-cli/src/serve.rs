//! `ember serve`: load the model, start the engine, serve the HTTP API.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use ember_engine::Engine;
use ember_server::reasoning_parser::ReasoningFormat;
use ember_server::tool_parser::ToolCallFormat;
use ember_server::{AppState, ParserChoice, ServerConfig};

use crate::args::{parse_lora_module, LoraModule, ModelArgs};

/// Flags of `ember serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Names clients use in `model` (default: the model directory's name, or the Hub id).
    #[arg(long, num_args = 1..)]
    pub served_model_name: Vec<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer <KEY>` on the API routes.
    #[arg(long, env = "EMBER_API_KEY")]
    pub api_key: Option<String>,
    /// LoRA adapters to load at start (needs --enable-lora), each `name=path` or
    /// '{"name": "sql", "path": "/adapters/sql", "base_model_name": "..."}'; requests use the
    /// name as `model`.
    #[arg(long, num_args = 1.., value_parser = parse_lora_module)]
    pub lora_modules: Vec<LoraModule>,
    /// How tool calls are read from the output: hermes (Qwen3), deepseek_v3, deepseek_v31,
    /// kimi_k2, none, or auto (from the model's chat template and model_type).
    #[arg(long, default_value = "auto", value_parser = parse_tool_call_parser)]
    pub tool_call_parser: ParserChoice<ToolCallFormat>,
    /// How thinking is split from the answer into reasoning_content: think (`<think>` tags;
    /// also qwen3, deepseek_r1, deepseek_v3, kimi_k2), none, or auto (on when the chat
    /// template knows `</think>`).
    #[arg(long, default_value = "auto", value_parser = parse_reasoning_parser)]
    pub reasoning_parser: ParserChoice<ReasoningFormat>,
}

/// `auto`, `none`, or a name `known` accepts.
fn parse_parser<T>(
    value: &str,
    known: fn(&str) -> Option<T>,
    names: &str,
) -> Result<ParserChoice<T>, String> {
    match value {
        "auto" => Ok(ParserChoice::Auto),
        "none" => Ok(ParserChoice::Off),
        name => known(name)
            .map(ParserChoice::Use)
            .ok_or_else(|| format!("unknown parser {name:?}; expected auto, none, {names}")),
    }
}

fn parse_tool_call_parser(value: &str) -> Result<ParserChoice<ToolCallFormat>, String> {
    parse_parser(
        value,
        ToolCallFormat::from_name,
        "hermes, deepseek_v3, deepseek_v31 or kimi_k2",
    )
}

fn parse_reasoning_parser(value: &str) -> Result<ParserChoice<ReasoningFormat>, String> {
    parse_parser(
        value,
        ReasoningFormat::from_name,
        "think, qwen3, deepseek_r1, deepseek_v3 or kimi_k2",
    )
}

/// Registers one adapter of --lora-modules; an error names it, so a bad one stops the start.
fn load_lora_module(state: &AppState, module: &LoraModule) -> Result<()> {
    let served = state.served_model_names();
    if let Some(base) = &module.base_model_name {
        if !served.contains(base) {
            bail!(
                "--lora-modules {:?}: base_model_name {base:?} is not a served model name ({}); \
                 drop it or add it with --served-model-name",
                module.name,
                served.join(", ")
            );
        }
    }
    state
        .load_lora_adapter(&module.name, &module.path)
        .map_err(|e| {
            anyhow!(
                "--lora-modules {:?} ({}): {e}",
                module.name,
                module.path.display()
            )
        })?;
    Ok(())
}

/// Runs the server until SIGINT/SIGTERM.
pub fn run(args: ServeArgs) -> Result<()> {
    if !args.lora_modules.is_empty() && !args.model.lora.enable_lora {
        bail!("--lora-modules needs --enable-lora");
    }
    let engine_config = args.model.engine_config()?;
    let model_name = args.model.model_name();
    let loaded = ember_models::load_model(&args.model.load_options()?)?;
    let mut served_model_names = if !args.served_model_name.is_empty() {
        args.served_model_name.clone()
    } else if Path::new(&model_name).is_dir() {
        Vec::new()
    } else {
        vec![model_name.clone()]
    };
    // ServerConfig names the model after model_dir when no name is given; keep the model's name
    // when the tokenizer comes from elsewhere.
    if served_model_names.is_empty() && args.model.tokenizer.is_some() {
        let dir_name = loaded
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        served_model_names.push(dir_name.unwrap_or_else(|| model_name.clone()));
    }
    let config = ServerConfig {
        served_model_names,
        api_key: args.api_key.clone(),
        model_dir: args.model.tokenizer_dir(&loaded.dir),
        model_type: loaded.config.family.model_type().into(),
        tool_call_parser: args.tool_call_parser,
        reasoning_parser: args.reasoning_parser,
    };
    let engine = Engine::start(loaded, engine_config)?;
    let engine_failure = engine.failure_probe();
    let state = AppState::new(config, engine)?;
    for module in &args.lora_modules {
        load_lora_module(&state, module)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| {
                format!("cannot listen on {addr}; is the port in use? pick another with --port")
            })?;
        tracing::info!("serving on http://{addr}");
        let failure = Arc::new(engine_failure);
        let watch = failure.clone();
        // A sharded model whose rank failed cannot run again: shut down instead of erroring forever.
        let stopped = async move {
            while watch().is_none() {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        };
        ember_server::serve_or_stop(listener, state, stopped)
            .await
            .context("server failed")?;
        match failure() {
            Some(reason) => bail!("the engine stopped: {reason}"),
            None => Ok(()),
        }
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied())).map(|c| c.serve)
    }

    #[test]
    fn lora_modules_are_space_separated_or_repeated_in_both_forms() {
        let args = parse(&[
            "--enable-lora",
            "--lora-modules",
            "a=/x",
            r#"{"name": "b", "path": "/y"}"#,
            "--port",
            "9000",
            "--lora-modules",
            "c=/z",
        ])
        .unwrap();
        let names: Vec<&str> = args.lora_modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(args.lora_modules[1].path, std::path::PathBuf::from("/y"));
        assert_eq!(args.port, 9000);
        assert!(args.model.lora.enable_lora);
        let e = parse(&["--lora-modules", "a=/x", "nameless"])
            .err()
            .unwrap();
        assert!(e.to_string().contains("expected name=path"), "{e}");
    }

    #[test]
    fn lora_modules_without_enable_lora_stop_before_loading_anything() {
        let args = parse(&["--lora-modules", "a=/x", "--model", "/no/such/model"]).unwrap();
        let e = run(args).unwrap_err().to_string();
        assert_eq!(e, "--lora-modules needs --enable-lora");
    }
}
