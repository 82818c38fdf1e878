#!/usr/bin/env python3
"""Single-stream latency of transformers generate() (fp32, CPU), same two-point method as vllm_latency.py:
  prefill tok/s = N / mean(lat(N, 1)),  decode tok/s = (M - 1) / (mean(lat(N, M)) - mean(lat(N, 1))).
"""
import argparse
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-iters", type=int, default=1)
    ap.add_argument("--num-iters-warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-token-id", type=int, default=1990)
    ap.add_argument("--output-json", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.max_token_id, (1, a.input_len), generator=g)

    def run(n):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=model.config.eos_token_id)
        return time.perf_counter() - t0, out[0, a.input_len:].tolist()

    res = {}
    for n in (1, a.output_len):
        for _ in range(a.num_iters_warmup):
            run(min(n, 4))
        lats = []
        for _ in range(a.num_iters):
            dt, toks = run(n)
            lats.append(dt)
        res[n] = (lats, toks)
    l1 = sum(res[1][0]) / len(res[1][0])
    lm = sum(res[a.output_len][0]) / len(res[a.output_len][0])
    out = {
        "engine": "transformers", "version": transformers.__version__, "torch": torch.__version__,
        "threads": a.threads, "input_len": a.input_len, "output_len": a.output_len,
        "latencies_out1": res[1][0], "latencies_outM": res[a.output_len][0],
        "avg_latency_out1": l1, "avg_latency_outM": lm,
        "prefill_tok_s": a.input_len / l1, "decode_tok_s": (a.output_len - 1) / (lm - l1),
        "greedy_tokens": res[a.output_len][1][:16],
    }
    json.dump(out, open(a.output_json, "w"), indent=2)
    print(json.dumps({k: out[k] for k in ("prefill_tok_s", "decode_tok_s", "greedy_tokens")}))


if __name__ == "__main__":
    main()
