#!/usr/bin/env bash
# LoRA throughput: `ember bench throughput` (in-process, no HTTP) on one checkpoint with 0, 1, 8 and 32 distinct
# adapters of rank 8 and 64 mixed in the batch, each request given to the adapters in turn.
#
#   benches/lora/run.sh          # CKPT, OUT, sizes below can be overridden from the environment
#
# Adapters: random PEFT adapters on q/k/v/o of every layer (benches/lora/make_dummy_adapters.py). N distinct adapters
# are one directory registered N times under distinct ids (vLLM's `--lora-path` semantics): each is loaded
# separately, so memory traffic and compute are those of N different adapters.
# Run on an otherwise idle machine.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
EMBER=${EMBER:-$REPO/target/release/ember}
CKPT=${CKPT:-/work/peers/ckpt/qwen3-moe-1b}
ADAPTERS=${ADAPTERS:-/work/peers/lora-bench}
OUT=${OUT:-$REPO/benches/lora/out}
PY=${PY:-/work/venv/bin/python}
INPUT_LEN=${INPUT_LEN:-64} OUTPUT_LEN=${OUTPUT_LEN:-32} NUM_PROMPTS=${NUM_PROMPTS:-32}
RANKS=${RANKS:-8 64} COUNTS=${COUNTS:-1 8 32}
mkdir -p "$OUT"
for r in $RANKS; do
  [[ -d $ADAPTERS/r$r-0 ]] || "$PY" "$REPO/benches/lora/make_dummy_adapters.py" "$CKPT" "$ADAPTERS" --num 1 --rank "$r"
done
common=(bench throughput --model "$CKPT" --dtype float32 --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN"
  --num-prompts "$NUM_PROMPTS" --disable-detokenize --seed 0)
run() { # run NAME ARGS...
  local name=$1; shift
  echo "[lora] $name" >&2
  "$EMBER" "${common[@]}" "$@" --output-json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  grep -E "Output tokens/s|Distinct" "$OUT/$name.log" >&2
}
run base
run base-lora-enabled --enable-lora
for r in $RANKS; do
  for n in $COUNTS; do
    run "r$r-n$n" --enable-lora --max-loras "$n" --max-cpu-loras "$n" --max-lora-rank "$r" --lora-path "$ADAPTERS/r$r-0"
  done
done
"$PY" - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
base = json.load(open(os.path.join(out, "base.json")))["output_tokens_per_second"]
print("| adapters in the batch | rank | output tok/s | vs base |")
print("|---|---|---|---|")
for name in ["base", "base-lora-enabled"] + sorted(
    (f[:-5] for f in os.listdir(out) if f.startswith("r") and f.endswith(".json")),
    key=lambda n: (int(n.split("-")[0][1:]), int(n.split("-n")[1]))):
    j = json.load(open(os.path.join(out, name + ".json")))
    n = j.get("num_lora_adapters", 0)
    rank = j.get("lora_max_rank") or "-"
    label = {"base": "0 (LoRA off)", "base-lora-enabled": "0 (--enable-lora)"}.get(name, str(n))
    print(f"| {label} | {rank} | {j['output_tokens_per_second']:.2f} | {j['output_tokens_per_second'] / base:.3f} |")
PY
