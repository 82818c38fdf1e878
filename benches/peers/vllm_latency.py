#!/usr/bin/env python3
"""Single-stream latency of vLLM (offline `LLM`), measured like `vllm bench latency`.

Times generate() of one random N-token prompt for 1 output token (≈ prefill) and for M output tokens
(ignore_eos), K iterations each after warm-up, prefix caching off so every iteration prefills again.
  prefill tok/s = N / mean(lat(N, 1))
  decode  tok/s = (M - 1) / (mean(lat(N, M)) - mean(lat(N, 1)))
Writes JSON to --output-json. Run with the vLLM venv's python; VLLM_CPU_KVCACHE_SPACE sets the KV cache (GiB).
"""
import argparse
import json
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-iters", type=int, default=3)
    ap.add_argument("--num-iters-warmup", type=int, default=1)
    ap.add_argument("--max-token-id", type=int, default=1990, help="random prompt ids in [0, this)")
    ap.add_argument("--output-json", required=True)
    a = ap.parse_args()

    from vllm import LLM, SamplingParams
    import vllm

    llm = LLM(model=a.model, dtype=a.dtype, enforce_eager=True, enable_prefix_caching=False,
              max_model_len=max(a.input_len + a.output_len + 16, 512), seed=0)
    ids = np.random.default_rng(0).integers(0, a.max_token_id, size=a.input_len).tolist()
    prompt = {"prompt_token_ids": ids}

    def run(out_len):
        sp = SamplingParams(temperature=0.0, max_tokens=out_len, min_tokens=out_len, ignore_eos=True)
        t0 = time.perf_counter()
        out = llm.generate([prompt], sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        assert len(out[0].outputs[0].token_ids) == out_len
        return dt, out[0].outputs[0].token_ids

    res = {}
    for out_len in (1, a.output_len):
        for _ in range(a.num_iters_warmup):
            run(out_len)
        lats, toks = [], None
        for _ in range(a.num_iters):
            dt, toks = run(out_len)
            lats.append(dt)
        res[out_len] = (lats, list(toks))
    l1 = float(np.mean(res[1][0]))
    lm = float(np.mean(res[a.output_len][0]))
    out = {
        "engine": "vllm", "version": vllm.__version__, "input_len": a.input_len, "output_len": a.output_len,
        "latencies_out1": res[1][0], "latencies_outM": res[a.output_len][0],
        "avg_latency_out1": l1, "avg_latency_outM": lm,
        "prefill_tok_s": a.input_len / l1,
        "decode_tok_s": (a.output_len - 1) / (lm - l1),
        "greedy_tokens": res[a.output_len][1][:16],
    }
    json.dump(out, open(a.output_json, "w"), indent=2)
    print(json.dumps({k: out[k] for k in ("prefill_tok_s", "decode_tok_s", "greedy_tokens")}))


if __name__ == "__main__":
    main()
