#!/usr/bin/env bash
# gpu-check.sh — everything only a GPU can show, in one run on the device machine (one H100/H200,
# no Rust, no network), from the repo root with .gpu/ carried (scripts/gpu-prepare.sh makes it):
#
#   device run: command "bash scripts/gpu-check.sh", carry [".gpu"], timeout_s 540
#
# Steps, each logged to $OUT/gpu-check.log and each allowed to fail without stopping the rest:
#   1. nvidia-smi; the GPU's copy bandwidth through torch (the bound single-stream decode is a share of)
#   2. ember-kernels' tests: every kernel against its CPU reference on fresh random inputs
#   3. ember-engine's CUDA tests: the tiny checkpoints on CUDA against transformers (f32, bf16), cache sizing
#   4. ember bench latency on a dummy-weight Qwen3-30B-A3B (real shape, bf16), batch 1 and 10, with
#      candle's attention, with ember's paged attention kernel, with all of ember's kernels (that,
#      the fused MoE and the layer kernels) eagerly and with decode steps as CUDA graphs, and with
#      those over online FP8 weights (W8A16, W8A8)
#   5. ember serve on that model (EMBER_GPU_SERVE_FLAGS, default all of ember's kernels, so decode
#      graphs) + ember bench serve, 2048 in / 1024 out at concurrency 10 (shortened with
#      EMBER_GPU_PROMPTS), results JSON to $OUT
# EMBER_GPU_STEPS="1 2 3" runs a subset.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
STEPS=${EMBER_GPU_STEPS:-"1 2 3 4 5"}
PROMPTS=${EMBER_GPU_PROMPTS:-20}
exec > >(tee -a "$LOG") 2>&1
echo "gpu-check: $(date -u +%FT%TZ) commit $(cat .gpu/commit 2>/dev/null || echo '?')"

BIN=/tmp/ember-gpu
mkdir -p "$BIN"
for f in .gpu/*.xz; do xz -dc "$f" > "$BIN/$(basename "$f" .xz)"; done
chmod +x "$BIN"/*
# The tests read models/ through the absolute paths they were built at.
root=$(cat .gpu/build-root)
if [ "$root" != "$PWD" ] && [ ! -e "$root/models" ]; then
    mkdir -p "$(dirname "$root")" && ln -sfn "$PWD" "$root"
fi
# The CUDA 13 runtime libraries the binary links: the toolkit's, else the Python wheels'.
libdirs=""
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10; do
    p=$(ldconfig -p | awk -v l="$lib" '$1 == l {print $NF; exit}')
    [ -z "$p" ] && p=$(find /usr/local/cuda*/ /opt /usr/lib -name "$lib" 2>/dev/null | head -1)
    [ -n "$p" ] && libdirs="$libdirs:$(dirname "$p")" || echo "gpu-check: $lib not found"
done
# NCCL, which ember opens at run time for ranks on several GPUs: torch's wheel brings one.
nccl=$(ldconfig -p | awk '$1 == "libnccl.so.2" {print $NF; exit}')
[ -z "$nccl" ] && nccl=$(find $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null) /usr/local/cuda*/ /usr/lib -name libnccl.so.2 2>/dev/null | head -1)
[ -n "$nccl" ] && export EMBER_NCCL_LIBRARY="$nccl" || echo "gpu-check: libnccl.so.2 not found (the NCCL tests skip)"
echo "EMBER_NCCL_LIBRARY=${EMBER_NCCL_LIBRARY:-}"
export LD_LIBRARY_PATH="${libdirs#:}:${LD_LIBRARY_PATH:-}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
export RUST_BACKTRACE=1
step() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
run() { echo; echo "=== $* ($(date -u +%T))"; "$@"; echo "=== rc $? for $1"; }

if step 1; then
    run nvidia-smi
    run python3 - <<'PY'
import torch
x = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(10):
    y.copy_(x)
end.record()
torch.cuda.synchronize()
s = start.elapsed_time(end) / 1e3 / 10
print(f"{torch.cuda.get_device_name()}: device-to-device copy {2 * x.numel() / s / 1e12:.2f} TB/s "
      f"(read + write, 4 GiB, mean of 10)")
PY
fi
if step 2; then
    for t in "$BIN"/test-*; do
        [ "$(basename "$t")" = test-cuda ] && continue
        run "$t" --test-threads 1 --nocapture
    done
fi
if step 3; then
    run "$BIN/test-cuda" --test-threads 1 --nocapture
fi
MODEL=models/configs/qwen3-30b-a3b
TOK=models/qwen3-moe-tiny
if step 4; then
    # attention, MoE and layer kernels, weights (auto: bf16; fp8: online FP8, quantized at load on
    # the host, slower to start) and the FP8 GEMM; the batch sizes last (FP8 at 10 only, for its
    # throughput beside bf16's).
    # The last column: eager (--enforce-eager) or graphs (decode steps as CUDA graphs where the
    # backends allow: all of ember's kernels).
    for backends in "tensor experts candle auto w8a16 eager 1 10" "ember experts candle auto w8a16 eager 1 10" \
        "ember fused ember auto w8a16 eager 1 10" "ember fused ember auto w8a16 graphs 1 10" \
        "ember fused ember fp8 w8a16 graphs 10" "ember fused ember fp8 w8a8 graphs 10"; do
        read -r attention moe layer quant fp8 mode sizes <<< "$backends"
        eager=""
        [ "$mode" = eager ] && eager="--enforce-eager"
        for bs in $sizes; do
            run "$BIN/ember" bench latency --model "$MODEL" --load-format dummy --tokenizer "$TOK" \
                --device cuda --dtype bfloat16 --attention-backend "$attention" --moe-backend "$moe" --layer-kernels "$layer" \
                --quantization "$quant" --fp8-gemm "$fp8" $eager --batch-size "$bs" --input-len 2048 --output-len 128 \
                --num-iters-warmup 1 --num-iters 3
        done
    done
fi
if step 5; then
    # shellcheck disable=SC2086 # the flags split into words
    "$BIN/ember" serve --model "$MODEL" --load-format dummy --tokenizer "$TOK" --device cuda \
        --dtype bfloat16 --port 8000 --max-model-len 4096 \
        ${EMBER_GPU_SERVE_FLAGS:---attention-backend ember --moe-backend fused --layer-kernels ember} \
        > "$OUT/serve.log" 2>&1 &
    server=$!
    for _ in $(seq 1 180); do
        curl -sf localhost:8000/v1/models > /dev/null && break
        kill -0 $server 2>/dev/null || break
        sleep 1
    done
    run "$BIN/ember" bench serve --base-url http://127.0.0.1:8000 --model qwen3-30b-a3b --tokenizer "$TOK" \
        --dataset-name random --random-input-len 2048 --random-output-len 1024 --num-prompts "$PROMPTS" \
        --max-concurrency 10 --request-rate inf --ignore-eos --save-result --result-dir "$OUT" \
        --result-filename bench-serve.json
    kill $server 2>/dev/null
    wait $server 2>/dev/null
    tail -20 "$OUT/serve.log"
fi
echo "gpu-check: done $(date -u +%T)"
