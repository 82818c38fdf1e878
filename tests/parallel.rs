//! Tensor, expert and data parallelism through the real `ember serve` (ranks are threads over
//! the in-process collectives backend): for every family's tiny checkpoint, TP 2 and 4, EP 2
//! and 4, and DP 2 and 4 (with and without EP) give the logprobs of one rank (fp32, 1e-4) and
//! of transformers, prompt and greedy, with requests batched together; layouts a model cannot
//! take are one-line errors.

mod common;

use std::collections::BTreeMap;

use common::{reference_of, serve_error, Server};
use serde_json::{json, Value};

/// Largest |sharded − one rank| on a logprob (fp32).
const RANK_TOL: f64 = 1e-4;
/// Largest |ember − transformers| on a logprob, as in http_api.rs.
const REFERENCE_TOL: f64 = 1e-3;

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap_or(f64::NAN))
        .collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .filter(|(x, y)| !(x.is_nan() && y.is_nan()))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Per reference prompt: echoed prompt logprobs, then greedy token ids and logprobs; the
/// greedy requests are sent together so the engine batches them.
fn answers(server: &Server, name: &str) -> Vec<(Vec<f64>, Value, Vec<f64>)> {
    answers_of(server, name, &reference_of(name))
}

/// [`answers`] of model `name` (a base model or an adapter) for the prompts of `reference`.
fn answers_of(server: &Server, name: &str, reference: &Value) -> Vec<(Vec<f64>, Value, Vec<f64>)> {
    let prompts: Vec<Value> = reference["prompts"].as_array().unwrap()[1..4].to_vec();
    std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                scope.spawn(move || {
                    let (status, echo) = server.post(
                        "/v1/completions",
                        &json!({"model": name, "prompt": p["token_ids"], "echo": true,
                                "logprobs": 1, "max_tokens": 0}),
                    );
                    assert_eq!(status, 200, "{echo}");
                    let steps = p["greedy"]["token_ids"].as_array().unwrap().len();
                    let (status, greedy) = server.post(
                        "/v1/completions",
                        &json!({"model": name, "prompt": p["token_ids"], "temperature": 0,
                                "ignore_eos": true, "logprobs": 1, "max_tokens": steps,
                                "return_token_ids": true}),
                    );
                    assert_eq!(status, 200, "{greedy}");
                    let c = &greedy["choices"][0];
                    (
                        floats(&echo["choices"][0]["logprobs"]["token_logprobs"]),
                        c["token_ids"].clone(),
                        floats(&c["logprobs"]["token_logprobs"]),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// `ember:moe_expert_tokens_total` by `{layer, expert}` labels, and the per-rank totals of an
/// expert-parallel server.
fn expert_load(server: &Server) -> (BTreeMap<String, f64>, Vec<f64>) {
    let metrics = server.metrics();
    let experts = metrics
        .iter()
        .filter(|(k, _)| k.starts_with("ember:moe_expert_tokens_total{"))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    let ranks = (0..)
        .map_while(|r| {
            metrics
                .get(&format!("ember:ep_rank_tokens_total{{rank=\"{r}\"}}"))
                .copied()
        })
        .collect();
    (experts, ranks)
}

/// The `layer` label of a `/metrics` sample's name.
fn layer_label(key: &str) -> &str {
    key.split("layer=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no layer label in {key}"))
}

/// Answers from [`answers_of`] against transformers' reference: greedy tokens equal, prompt and
/// greedy logprobs within [`REFERENCE_TOL`].
fn assert_matches_reference(
    what: &str,
    answers: &[(Vec<f64>, Value, Vec<f64>)],
    reference: &Value,
) {
    for (i, (prompt, ids, greedy)) in answers.iter().enumerate() {
        let p = &reference["prompts"][i + 1];
        let diff = max_diff(prompt, &floats(&p["prompt_logprobs"]));
        assert!(diff <= REFERENCE_TOL, "{what}: prompt {diff}");
        assert_eq!(ids, &p["greedy"]["token_ids"], "{what}");
        let diff = max_diff(greedy, &floats(&p["greedy"]["logprobs"]));
        assert!(diff <= REFERENCE_TOL, "{what}: greedy {diff}");
    }
}

fn check_family(name: &str, layouts: &[&[&str]]) {
    let reference = reference_of(name);
    let server = Server::start_model(name, &[]);
    let one = answers(&server, name);
    let (one_load, _) = expert_load(&server);
    drop(server);
    assert_matches_reference(name, &one, &reference);
    for flags in layouts {
        let server = Server::start_model(name, flags);
        let sharded = answers(&server, name);
        // The same tokens reach the same experts however the model is split.
        let (load, ranks) = expert_load(&server);
        assert_eq!(load, one_load, "{name} {flags:?}: tokens per expert");
        if flags.contains(&"--enable-expert-parallel") {
            // Every rank holds experts: the tensor-parallel size times the data-parallel one.
            let size = |flag: &str| {
                flags
                    .iter()
                    .position(|f| *f == flag)
                    .map_or(1, |i| flags[i + 1].parse::<usize>().unwrap())
            };
            let world = size("--tensor-parallel-size") * size("--data-parallel-size");
            assert_eq!(ranks.len(), world, "{name} {flags:?}: ranks in /metrics");
            assert_eq!(ranks.iter().sum::<f64>(), load.values().sum::<f64>());
            // Copies per expert: one each, plus the redundant ones, in every MoE layer.
            let redundant: f64 = flags
                .iter()
                .position(|f| *f == "--num-redundant-experts")
                .map_or(0.0, |i| flags[i + 1].parse().unwrap());
            let mut copies: BTreeMap<String, f64> = BTreeMap::new();
            for (key, v) in server.metrics() {
                if let Some(labels) = key.strip_prefix("ember:moe_expert_replicas{") {
                    assert!(v >= 1.0, "{name} {flags:?}: {key} {v}");
                    *copies.entry(layer_label(labels).to_string()).or_default() += v;
                }
            }
            let experts = (load.len() / copies.len().max(1)) as f64;
            assert!(
                !copies.is_empty(),
                "{name} {flags:?}: no ember:moe_expert_replicas"
            );
            for (layer, total) in &copies {
                assert_eq!(
                    *total,
                    experts + redundant,
                    "{name} {flags:?}: layer {layer}"
                );
            }
        }
        for ((p1, ids1, g1), (pn, idsn, gn)) in one.iter().zip(&sharded) {
            assert_eq!(ids1, idsn, "{name} {flags:?}: greedy tokens");
            let diff = max_diff(p1, pn).max(max_diff(g1, gn));
            assert!(diff <= RANK_TOL, "{name} {flags:?}: max |Δ logprob| {diff}");
        }
    }
}

const TP: [&[&str]; 2] = [
    &["--tensor-parallel-size", "2"],
    &["--tensor-parallel-size", "4"],
];
/// TP 2/4, EP 2/4, and EP 4 with 4 redundant expert copies re-placed (EPLB) before every step.
const TP_AND_EP: [&[&str]; 5] = [
    &["--tensor-parallel-size", "2"],
    &["--tensor-parallel-size", "4"],
    &["--tensor-parallel-size", "2", "--enable-expert-parallel"],
    &["--tensor-parallel-size", "4", "--enable-expert-parallel"],
    &[
        "--tensor-parallel-size",
        "4",
        "--enable-expert-parallel",
        "--enable-eplb",
        "--num-redundant-experts",
        "4",
        "--eplb-step-interval",
        "1",
        "--eplb-window-size",
        "1",
    ],
];

/// Data parallelism: each rank serves its own requests over its own KV cache (the three
/// concurrent prompts land on different ranks; under expert parallelism a rank with none runs a
/// placeholder token), the routed experts partitioned over the ranks with expert parallelism,
/// also with redundant copies re-placed before every step (EPLB); and replicas that are each
/// tensor-parallel over two ranks.
const DP: [&[&str]; 6] = [
    &["--data-parallel-size", "2"],
    // Two replicas, each tensor-parallel over two ranks, and with the experts partitioned
    // over all four ranks.
    &["--data-parallel-size", "2", "--tensor-parallel-size", "2"],
    &[
        "--data-parallel-size",
        "2",
        "--tensor-parallel-size",
        "2",
        "--enable-expert-parallel",
    ],
    &["--data-parallel-size", "2", "--enable-expert-parallel"],
    &["--data-parallel-size", "4", "--enable-expert-parallel"],
    &[
        "--data-parallel-size",
        "4",
        "--enable-expert-parallel",
        "--enable-eplb",
        "--num-redundant-experts",
        "4",
        "--eplb-step-interval",
        "1",
        "--eplb-window-size",
        "1",
    ],
];

#[test]
fn qwen3_dense_tensor_parallel_matches_one_rank() {
    check_family("qwen3-tiny", &TP);
}

#[test]
fn data_parallel_ranks_match_one_rank_for_every_family() {
    check_family(
        "qwen3-tiny",
        &[
            &["--data-parallel-size", "2"],
            &["--data-parallel-size", "2", "--tensor-parallel-size", "2"],
        ],
    );
    check_family("qwen3-moe-tiny", &DP);
    check_family("deepseek-v3-tiny", &DP);
    check_family("kimi-k2-tiny", &DP);
}

/// Every MoE layer sees every token: per layer, the experts' counts add up to the same total,
/// top-k times the tokens run.
fn check_load_is_per_token(name: &str, top_k: f64) {
    let server = Server::start_model(name, &[]);
    answers(&server, name);
    let (load, _) = expert_load(&server);
    let mut per_layer: BTreeMap<String, f64> = BTreeMap::new();
    for (key, v) in &load {
        *per_layer.entry(layer_label(key).to_string()).or_default() += v;
    }
    let totals: Vec<f64> = per_layer.values().copied().collect();
    assert!(!totals.is_empty() && totals[0] > 0.0, "{name}: {load:?}");
    assert!(
        totals.iter().all(|&t| t == totals[0]),
        "{name}: {per_layer:?}"
    );
    assert_eq!(totals[0] % top_k, 0.0, "{name}: {per_layer:?}");
}

#[test]
fn expert_load_counts_each_token_top_k_times_per_layer() {
    check_load_is_per_token("qwen3-moe-tiny", 2.0);
    check_load_is_per_token("deepseek-v3-tiny", 2.0);
}

#[test]
fn qwen3_moe_tensor_and_expert_parallel_match_one_rank() {
    check_family("qwen3-moe-tiny", &TP_AND_EP);
}

#[test]
fn deepseek_v3_tensor_and_expert_parallel_match_one_rank() {
    check_family("deepseek-v3-tiny", &TP_AND_EP);
}

#[test]
fn kimi_k2_tensor_and_expert_parallel_match_one_rank() {
    check_family("kimi-k2-tiny", &TP_AND_EP);
}

/// LoRA adapters on a sharded model: under tensor parallelism each rank applies its part of
/// every adapted projection (its columns of B, or its rows of A as a partial sum); under expert
/// parallelism a token's rows carry their step index to the experts' owner, which applies the
/// token's adapter. Both match transformers+peft.
#[test]
fn lora_adapters_under_tensor_and_expert_parallelism_match_transformers_and_peft() {
    let ep = "--enable-expert-parallel";
    for (base, adapter, layouts) in [
        (
            "qwen3-tiny",
            "qwen3-tiny-all-r16",
            &[&["2"][..], &["4"]][..],
        ),
        (
            "deepseek-v3-tiny",
            "deepseek-v3-tiny-mla",
            &[&["2"][..], &["4"], &["4", ep]],
        ),
        (
            "qwen3-moe-tiny",
            "qwen3-moe-tiny-experts",
            &[&["2"][..], &["2", ep], &["4", ep]],
        ),
    ] {
        check_lora_layouts(base, adapter, "--tensor-parallel-size", layouts);
    }
}

/// LoRA adapters on data-parallel ranks: each rank applies its own sequences' adapters, and
/// under expert parallelism the experts' owners apply the adapter of each row they receive.
#[test]
fn lora_adapters_on_data_parallel_ranks_match_transformers_and_peft() {
    let ep = "--enable-expert-parallel";
    for (base, adapter) in [
        ("deepseek-v3-tiny", "deepseek-v3-tiny-mla"),
        ("qwen3-moe-tiny", "qwen3-moe-tiny-experts"),
    ] {
        check_lora_layouts(
            base,
            adapter,
            "--data-parallel-size",
            &[&["2"][..], &["2", ep]],
        );
    }
}

/// Serves `adapter` over `base` under `size_flag` and each layout's value and flags, against
/// transformers+peft.
fn check_lora_layouts(base: &str, adapter: &str, size_flag: &str, layouts: &[&[&str]]) {
    let dir = common::model_dir(&format!("lora/{adapter}"));
    let module = format!("a={}", dir.display());
    let reference = reference_of(&format!("lora/{adapter}"));
    for layout in layouts {
        let mut flags = vec![
            "--enable-lora",
            "--max-lora-rank",
            "16",
            "--lora-modules",
            &module,
            size_flag,
        ];
        flags.extend(layout.iter().copied());
        let server = Server::start_model(base, &flags);
        let got = answers_of(&server, "a", &reference);
        assert_matches_reference(
            &format!("{adapter} {size_flag} {layout:?}"),
            &got,
            &reference,
        );
    }
}

#[test]
fn layouts_a_model_cannot_take_are_clear_errors() {
    // 4 attention heads do not split over 3 ranks.
    let err = serve_error("qwen3-tiny", &["--tensor-parallel-size", "3"]);
    assert!(err.contains("does not split evenly over 3 ranks"), "{err}");
    let err = serve_error("qwen3-tiny", &["--tensor-parallel-size", "0"]);
    assert!(err.contains("at least 1"), "{err}");
    let err = serve_error("qwen3-tiny", &["--data-parallel-size", "0"]);
    assert!(err.contains("at least 1"), "{err}");
    // 8 experts do not split over 2 replicas of 3 ranks.
    let err = serve_error(
        "qwen3-moe-tiny",
        &[
            "-t",
            "3",
            "--data-parallel-size",
            "2",
            "--enable-expert-parallel",
        ],
    );
    assert!(err.contains("split evenly over"), "{err}");
    // 8 experts do not split over 3 data-parallel ranks.
    let err = serve_error(
        "qwen3-moe-tiny",
        &["--data-parallel-size", "3", "--enable-expert-parallel"],
    );
    assert!(err.contains("do not split evenly over 3"), "{err}");
    let err = serve_error(
        "qwen3-moe-tiny",
        &["-t", "2", "--num-redundant-experts", "2"],
    );
    assert!(err.contains("needs --enable-eplb"), "{err}");
    let err = serve_error("qwen3-moe-tiny", &["-t", "2", "--enable-eplb"]);
    assert!(
        err.contains("--enable-eplb needs --enable-expert-parallel"),
        "{err}"
    );
    let eplb = ["-t", "2", "--enable-expert-parallel", "--enable-eplb"];
    let window = ["--eplb-step-interval", "10", "--eplb-window-size", "20"];
    let err = serve_error("qwen3-moe-tiny", &[&eplb[..], &window[..]].concat());
    assert!(
        err.contains("--eplb-window-size 20 is longer than"),
        "{err}"
    );
    // 8 experts plus 2 copies do not split over 4 ranks.
    let ep = [
        "-t",
        "4",
        "--enable-expert-parallel",
        "--enable-eplb",
        "--num-redundant-experts",
        "2",
    ];
    let err = serve_error("qwen3-moe-tiny", &ep);
    assert!(err.contains("do not split evenly over 4"), "{err}");
}

/// A rank that fails mid-run (injected with `EMBER_FAULT_INJECT`, rank 1 at its second step)
/// ends the request in flight with the reason, and `ember serve` exits non-zero naming the
/// rank instead of hanging.
#[test]
fn a_rank_failure_ends_the_request_and_stops_the_server_with_the_reason() {
    check_rank_failure(&["--tensor-parallel-size", "2", "--enable-expert-parallel"]);
    // Replicas meeting in the experts: rank 1 fails in its replica's group, and the other
    // replica, waiting in the experts' group, must return too.
    check_rank_failure(&[
        "--data-parallel-size",
        "2",
        "--tensor-parallel-size",
        "2",
        "--enable-expert-parallel",
    ]);
}

fn check_rank_failure(flags: &[&str]) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["serve", "--model"])
        .arg(common::model_dir("qwen3-moe-tiny"))
        .args(["--dtype", "float32", "--host", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args(flags)
        .env("EMBER_FAULT_INJECT", "1:2")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ember serve");
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(|l| l.ok())
            .collect::<Vec<_>>()
            .join("\n")
    });
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http
        .get(format!("{base}/health"))
        .send()
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(Instant::now() < deadline, "ember serve did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Step 1 prefills, step 2 (the first decode) fails on rank 1.
    let body = json!({"model": "qwen3-moe-tiny", "prompt": [1, 2, 3, 4], "max_tokens": 8});
    let r = http
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .expect("the request in flight gets an answer before the server stops");
    let status = r.status().as_u16();
    let text = r.text().unwrap_or_default();
    assert!(
        status >= 500 && text.contains("rank 1 failed"),
        "{status} {text}"
    );
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline + Duration::from_secs(60) {
            let _ = child.kill();
            panic!("ember serve kept running after its rank failed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = log.join().unwrap();
    assert!(!exit.success(), "exit {exit:?}\n{text}");
    assert!(
        text.contains("the engine stopped")
            && text.contains("rank 1 failed")
            && text.contains("fault injected by EMBER_FAULT_INJECT"),
        "{text}"
    );
}
