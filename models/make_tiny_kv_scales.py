#!/usr/bin/env python3
"""Build the fp8-KV-cache-scale fixtures (deterministic, offline): a tiny checkpoint's weights plus the
`k_scale`/`v_scale` tensors an FP8 checkpoint ships for its KV cache, and transformers' fp32 logprobs with
the cache holding `e4m3(x / scale) * scale`, as vLLM's fp8 cache does with checkpoint scales.

  qwen3-tiny-kv-scales/        qwen3-tiny + `model.layers.N.self_attn.{k_scale,v_scale}` as compressed-tensors
                               stores them: per key/value head ([num_key_value_heads]) on even layers, one
                               per tensor ([]) on odd ones; layer 1 in ModelOpt's names instead
                               (`self_attn.k_proj.k_scale`, `self_attn.v_proj.v_scale`).
  deepseek-v3-tiny-kv-scales/  deepseek-v3-tiny + `self_attn.k_scale` per layer: one scale for the cached MLA
                               row (latent and rope key), as vLLM's MLA cache uses it.

Scales are calibrated as llm-compressor's min-max observer does, amax / 448 over the reference sequences,
times a per-head factor (x1 .. x16) so that the heads' values land on different parts of the e4m3 grid.
Each dir's kv-scales-reference.json holds, per reference sequence (prompt + greedy continuation,
teacher-forced), the logprobs with the scaled fp8 cache (`fp8_scaled`) and with scale 1.0 (`fp8_unit`,
what a loader that ignored the scales would match).

Usage:  python models/make_tiny_kv_scales.py   (torch, transformers, safetensors)
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DynamicCache

HERE = Path(__file__).resolve().parent
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def e4m3(x, scale):
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


def run_with_cache_hook(model, sequences, hook):
    """Teacher-forced logprobs of `sequences`, with `hook(layer, key, value) -> (key, value)` applied to what
    each layer writes into (and reads back from) its cache."""
    original = DynamicCache.update

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        key_states, value_states = hook(layer_idx, key_states, value_states)
        return original(self, key_states, value_states, layer_idx, *args, **kwargs)

    DynamicCache.update = update
    try:
        out = []
        for s in sequences:
            with torch.no_grad():
                logits = model(torch.tensor([s]), past_key_values=DynamicCache(), use_cache=True).logits
            lp = logits.float().log_softmax(-1)[0]
            out.append([lp[i, s[i + 1]].item() for i in range(len(s) - 1)])
        return out
    finally:
        DynamicCache.update = original


def build(base, name, scale_names):
    src, dst = HERE / base, HERE / name
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref = json.loads((src / "reference.json").read_text())
    sequences = [p["token_ids"] + p["greedy"]["token_ids"] for p in ref["prompts"]]
    # Calibrate: amax of what each layer caches, per head (dim 1: key/value heads, 1 for MLA).
    amax = {}

    def observe(layer, k, v):
        ka, va = k.abs().amax(dim=(0, 2, 3)), v.abs().amax(dim=(0, 2, 3))
        old = amax.get(layer)
        amax[layer] = (ka, va) if old is None else (torch.maximum(old[0], ka), torch.maximum(old[1], va))
        return k, v

    run_with_cache_hook(model, sequences, observe)
    factors = torch.tensor([1.0, 16.0, 4.0, 2.0])
    scales = {}
    for layer, (ka, va) in sorted(amax.items()):
        heads = ka.numel()
        k = ka / FP8_MAX * factors[:heads].roll(layer)
        v = va / FP8_MAX * factors[:heads].roll(layer + 1)
        if scale_names == "mla":
            # One scale for the whole cached row: the larger part's, with headroom x1.5.
            s = (torch.maximum(k.max(), v.max()) * 1.5).reshape(())
            scales[layer] = (s, s)
        elif layer % 2 == 1:
            scales[layer] = (k.max().reshape(()), v.max().reshape(()))
        else:
            scales[layer] = (k, v)

    def broadcast(s, x):
        return s.reshape(1, -1, 1, 1) if s.dim() == 1 else s

    def scaled(layer, k, v):
        ks, vs = scales[layer]
        return e4m3(k, broadcast(ks, k)), e4m3(v, broadcast(vs, v))

    def unit(layer, k, v):
        return e4m3(k, 1.0), e4m3(v, 1.0)

    fp8_scaled = run_with_cache_hook(model, sequences, scaled)
    fp8_unit = run_with_cache_hook(model, sequences, unit)

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("reference.json", "*-reference.json", "lora"))
    tensors = load_file(str(src / "model.safetensors"))
    for layer, (ks, vs) in scales.items():
        p = f"model.layers.{layer}.self_attn"
        if scale_names == "mla":
            tensors[f"{p}.k_scale"] = ks.clone()
        elif layer == 1:
            tensors[f"{p}.k_proj.k_scale"], tensors[f"{p}.v_proj.v_scale"] = ks.clone(), vs.clone()
        else:
            tensors[f"{p}.k_scale"], tensors[f"{p}.v_scale"] = ks.clone(), vs.clone()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "kv-scales-reference.json").write_text(json.dumps({
        "model": name, "base": base, "dtype": "float32", "torch_version": torch.__version__,
        "sequences": sequences,
        "scales": {str(l): [ks.flatten().tolist(), vs.flatten().tolist()] for l, (ks, vs) in scales.items()},
        "fp8_scaled": fp8_scaled, "fp8_unit": fp8_unit}) + "\n")
    diff = max(abs(a - b) for x, y in zip(fp8_scaled, fp8_unit) for a, b in zip(x, y))
    print(f"wrote {dst}: max |scaled - unit| {diff:.4f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    build("qwen3-tiny", "qwen3-tiny-kv-scales", "gqa")
    build("deepseek-v3-tiny", "deepseek-v3-tiny-kv-scales", "mla")
