#!/usr/bin/env python3
"""Random PEFT LoRA adapters for a model directory, for LoRA throughput benchmarks.

    make_dummy_adapters.py MODEL_DIR OUT_DIR --num 32 --rank 8 [--targets q_proj,k_proj,v_proj,o_proj]

Writes OUT_DIR/r{rank}-{i}/adapter_config.json and adapter_model.safetensors (PEFT's layout, see
models/lora/FORMAT.md) for every decoder layer's targeted projections, shapes taken from
MODEL_DIR/config.json (Qwen3 / Qwen3-MoE attention and dense MLP projections). Values are random
normals scaled so that each adapter changes a projection's output by a few percent, as a trained
adapter does; the weights mean nothing, only their shapes and cost. Needs numpy and safetensors.
"""
import argparse
import json
import os

import numpy as np
from safetensors.numpy import save_file


def projection_shapes(cfg):
    """[in, out] of each projection name in one decoder layer."""
    h = cfg["hidden_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    d = cfg.get("head_dim") or h // heads
    inter = cfg.get("intermediate_size", 4 * h)
    return {
        "q_proj": ("self_attn", h, heads * d),
        "k_proj": ("self_attn", h, kv * d),
        "v_proj": ("self_attn", h, kv * d),
        "o_proj": ("self_attn", heads * d, h),
        "gate_proj": ("mlp", h, inter),
        "up_proj": ("mlp", h, inter),
        "down_proj": ("mlp", inter, h),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--num", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = json.load(open(os.path.join(args.model_dir, "config.json")))
    shapes = projection_shapes(cfg)
    targets = args.targets.split(",")
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise SystemExit(f"unknown targets {unknown}; known: {sorted(shapes)}")
    if cfg.get("model_type") == "qwen3_moe" and set(targets) & {"gate_proj", "up_proj", "down_proj"}:
        raise SystemExit("Qwen3-MoE layers have no dense MLP: target attention projections only")
    rng = np.random.default_rng(args.seed)
    r, alpha = args.rank, 2 * args.rank
    for i in range(args.num):
        tensors = {}
        for layer in range(cfg["num_hidden_layers"]):
            for name in targets:
                block, fan_in, fan_out = shapes[name]
                key = f"base_model.model.model.layers.{layer}.{block}.{name}"
                # A keeps |x Aᵀ| near |x| / sqrt(in) per rank; B is small so the delta stays a few
                # percent of a base output, as with a trained adapter.
                a = rng.standard_normal((r, fan_in), dtype=np.float32) / np.sqrt(fan_in)
                b = rng.standard_normal((fan_out, r), dtype=np.float32) * (0.03 / np.sqrt(r) / 2)
                tensors[f"{key}.lora_A.weight"] = a
                tensors[f"{key}.lora_B.weight"] = b
        out = os.path.join(args.out_dir, f"r{r}-{i}")
        os.makedirs(out, exist_ok=True)
        save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
        json.dump(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": alpha,
                "use_rslora": False,
                "target_modules": targets,
                "bias": "none",
                "fan_in_fan_out": False,
                "modules_to_save": None,
                "base_model_name_or_path": os.path.basename(os.path.abspath(args.model_dir)),
            },
            open(os.path.join(out, "adapter_config.json"), "w"),
            indent=2,
        )
    print(f"wrote {args.num} adapters of rank {r} on {targets} to {args.out_dir}")


if __name__ == "__main__":
    main()
