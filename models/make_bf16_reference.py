#!/usr/bin/env python3
"""Build the bf16 fixture (deterministic, offline): transformers' logprobs of fixed tokens (each reference prompt
and its greedy continuation, teacher-forced) with the checkpoint computed in bfloat16, as a CPU serving it in its
stored dtype does (weights, activations and each op's output rounded to bf16), beside the same in float32.
  <model>/bf16-reference.json   {"sequences", "bfloat16": [[logprob of token i+1 | tokens ..i]], "float32": [...]}
The logits are widened to f32 before the log-softmax in both.
Usage:  python models/make_bf16_reference.py   (torch, transformers)
"""
import json
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).resolve().parent


def logprobs(model, sequences):
    out = []
    for s in sequences:
        with torch.no_grad():
            lp = model(torch.tensor([s])).logits.float().log_softmax(-1)[0]
        out.append([lp[i, s[i + 1]].item() for i in range(len(s) - 1)])
    return out


def model_reference(name):
    from transformers import AutoModelForCausalLM
    model_dir = HERE / name
    ref = json.loads((model_dir / "reference.json").read_text())
    sequences = [p["token_ids"] + p["greedy"]["token_ids"] for p in ref["prompts"]]
    result = {"model": name, "torch_version": torch.__version__,
              "transformers_version": transformers.__version__, "sequences": sequences}
    for dtype, key in [(torch.bfloat16, "bfloat16"), (torch.float32, "float32")]:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        result[key] = logprobs(model, sequences)
    out = model_dir / "bf16-reference.json"
    out.write_text(json.dumps(result) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    torch.manual_seed(0)
    for name in ["qwen3-moe-tiny", "qwen3-tiny"]:
        model_reference(name)
