#!/usr/bin/env python3
"""Copy a Hub-layout Qwen3-MoE checkpoint with its routed experts stacked, for mistral.rs.

    stack_experts.py SRC_DIR DST_DIR

mistral.rs 0.8 on CPU loads Qwen3-MoE experts only stacked, in the input-major layout
(`mlp.experts.gate_up_proj` [E, H, 2I], gate columns first, and `mlp.experts.down_proj` [E, I, H]: it
says "expected [64, 320, 1024]" for down_proj; note transformers 5 fuses them the other way round,
[E, 2I, H] and [E, H, I]); the Hub layout has one tensor per expert (`mlp.experts.{e}.gate_proj.weight`). Values are copied bit for
bit, so every engine still runs the same weights. Other files (config, tokenizer) are copied as they are.
"""
import json
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def main():
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    expert = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")
    plain, experts = {}, defaultdict(dict)
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                m = expert.fullmatch(key)
                if m:
                    experts[m[1]][(int(m[2]), m[3])] = f.get_tensor(key)
                else:
                    plain[key] = f.get_tensor(key)
    index, shard_no = {}, 0
    for prefix, parts in sorted(experts.items()):
        n = 1 + max(e for e, _ in parts)
        plain[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, "gate")], parts[(e, "up")]], 0).t() for e in range(n)]
        )
        plain[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down")].t() for e in range(n)])
    # Shards of about 2 GB, layer by layer.
    shard, size = {}, 0
    names = sorted(plain)
    shards = []
    for key in names:
        shard[key] = plain[key].contiguous()
        size += plain[key].numel() * plain[key].element_size()
        if size > 2 * 1024**3:
            shards.append(shard)
            shard, size = {}, 0
    if shard:
        shards.append(shard)
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, dst / name, metadata={"format": "pt"})
        index.update({k: name for k in tensors})
    json.dump({"metadata": {}, "weight_map": index}, open(dst / "model.safetensors.index.json", "w"), indent=1)
    print(f"{len(experts)} expert layers stacked; {len(index)} tensors in {len(shards)} shards at {dst}")


if __name__ == "__main__":
    main()
