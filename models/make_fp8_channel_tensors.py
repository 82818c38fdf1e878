#!/usr/bin/env python3
"""Build the online-FP8 fixture (deterministic, offline): random bf16 weights quantized per output channel to
torch.float8_e4m3fn, with torch's own rounding, as vLLM's dynamic per-channel/per-token FP8 kernel computes it:

  scale = max(absmax(row) / 448, 1 / (448 * 512))        (f32, one per output row)
  q     = clamp(w / scale, -448, 448).to(float8_e4m3fn)    (round to nearest even, subnormals kept)
  w'    = q.float() * scale

  quantized-tensors/fp8-channel.safetensors   per layer `layer<i>.*`: `weight` (bf16 [out, in]), `weight_scale`
                                              (f32 [out, 1]), `qweight` (float8_e4m3fn), `dequantized` (f32)
  qwen3-moe-tiny/online-fp8-reference.json    transformers fp32 logprobs of fixed tokens (each reference prompt
                                              and its greedy continuation, teacher-forced) with every attention,
                                              MLP and expert projection replaced by w' (router, embeddings, norms
                                              and lm_head untouched, as vLLM's online FP8); unquantized; and
                                              unquantized with keys (after q/k norm and rope) and values rounded
                                              to e4m3 as an fp8 KV cache of scale 1.0 stores them (`fp8_kv_cache`),
                                              and the same in e5m2 (`fp8_e5m2_kv_cache`, saturating at 57344)

Rows span nine orders of magnitude, one row is zero and one holds a single large outlier, so the e4m3 codes run
through subnormals, every exponent and the saturation bound.

Usage:  python models/make_fp8_channel_tensors.py   (torch, transformers)
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
OUT = HERE / "quantized-tensors" / "fp8-channel.safetensors"
SEED = 20240611
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def quantize(w):
    w32 = w.float()
    amax = w32.abs().amax(dim=1, keepdim=True)
    scale = torch.clamp(amax / FP8_MAX, min=1.0 / (FP8_MAX * 512))
    q = (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale, q.float() * scale


def main():
    gen = torch.Generator().manual_seed(SEED)
    tensors = {}
    for i, (o, n) in enumerate([(48, 64), (33, 100), (256, 96)]):
        mag = torch.logspace(-6, 3, o).unsqueeze(1)
        w = torch.randn(o, n, generator=gen) * mag
        w[1] = 0.0
        w[2, 5] = 1e4
        w = w.to(torch.bfloat16)
        q, scale, deq = quantize(w)
        tensors.update({f"layer{i}.weight": w, f"layer{i}.weight_scale": scale.contiguous(),
                        f"layer{i}.qweight": q.contiguous(), f"layer{i}.dequantized": deq.contiguous()})
    OUT.parent.mkdir(exist_ok=True)
    save_file(tensors, str(OUT), metadata={"torch": torch.__version__, "seed": str(SEED)})
    print(f"wrote {OUT}")
    model_reference("qwen3-moe-tiny")


def with_fp8_kv_cache(model, run, fp8=torch.float8_e4m3fn):
    """`run()` with Qwen3-MoE's cached keys and values saturated and rounded to `fp8` (e4m3 or
    e5m2, scale 1.0), as vLLM's cache writes saturate (`__NV_SATFINITE`)."""
    import transformers.models.qwen3_moe.modeling_qwen3_moe as qwen3_moe

    fp8_max = torch.finfo(fp8).max

    def round_fp8(x):
        return x.clamp(-fp8_max, fp8_max).to(fp8).to(x.dtype)

    rope = qwen3_moe.apply_rotary_pos_emb

    def rope_then_round_k(q, k, *args, **kwargs):
        q, k = rope(q, k, *args, **kwargs)
        return q, round_fp8(k)

    qwen3_moe.apply_rotary_pos_emb = rope_then_round_k
    hooks = [layer.self_attn.v_proj.register_forward_hook(lambda _m, _i, out: round_fp8(out))
             for layer in model.model.layers]
    try:
        return run()
    finally:
        qwen3_moe.apply_rotary_pos_emb = rope
        for hook in hooks:
            hook.remove()


def model_reference(name):
    from transformers import AutoModelForCausalLM
    model_dir = HERE / name
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ref = json.loads((model_dir / "reference.json").read_text())
    sequences = [p["token_ids"] + p["greedy"]["token_ids"] for p in ref["prompts"]]

    def logprobs():
        out = []
        for s in sequences:
            with torch.no_grad():
                lp = model(torch.tensor([s])).logits.float().log_softmax(-1)[0]
            out.append([lp[i, s[i + 1]].item() for i in range(len(s) - 1)])
        return out

    unquantized = logprobs()
    fp8_kv_cache = with_fp8_kv_cache(model, logprobs)
    fp8_e5m2_kv_cache = with_fp8_kv_cache(model, logprobs, torch.float8_e5m2)
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not path.endswith(("lm_head", "mlp.gate")):
            module.weight.data = quantize(module.weight.data)[2]
    for path, param in model.named_parameters():
        if ".experts." in path and param.dim() == 3:  # fused experts, [experts, out, in]
            param.data = torch.stack([quantize(w)[2] for w in param.data])
    out = model_dir / "online-fp8-reference.json"
    out.write_text(json.dumps({"model": name, "dtype": "float32", "torch_version": torch.__version__,
                               "sequences": sequences, "unquantized": unquantized,
                               "fp8_kv_cache": fp8_kv_cache, "fp8_e5m2_kv_cache": fp8_e5m2_kv_cache,
                               "online_fp8": logprobs()}) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
