#!/usr/bin/env python3
"""Build the DeepSeek-V3 peer-benchmark checkpoint: a random-weight DeepSeek-V3 with the real architecture.

Shape: models/configs/deepseek-v3-1b/config.json (12 layers, hidden 1024, layer 0 dense (intermediate 3072), then
MoE: 64 routed experts top-8 in 8 groups (topk_group 4), sigmoid + e_score_correction_bias (noaux_tc),
routed_scaling_factor 2.5, 1 shared expert, moe_intermediate 320; MLA: 16 heads, q_lora 384, kv_lora 256,
qk_nope 64 + qk_rope 32, v 64; YaRN factor 4 over 4096; untied lm_head), vocab cut to the 2048 ids of the
models/qwen3-moe-tiny tokenizer (as make_dummy_qwen3_moe.py; bos/eos are its <|endoftext|>/<|im_end|>).
That is ~0.75B parameters (~0.14B active per token); f32 = 3.0 GB. No MTP layer (num_nextn_predict_layers 0).

Writes, outside the repo by default:
  OUT/                       Hub-style checkpoint: sharded safetensors + model.safetensors.index.json, per-expert
                             tensors (mlp.experts.{e}.{gate,up,down}_proj.weight), mlp.gate.weight,
                             mlp.gate.e_score_correction_bias (float32, as DeepSeek stores it), mlp.shared_experts.*,
                             MLA tensors (q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm,
                             kv_b_proj, o_proj); config.json with the key set of deepseek-ai/DeepSeek-V3's own
                             config.json (older Hub spelling: rope_scaling {"type": "yarn", ...}, rope_theta,
                             n_routed_experts, num_nextn_predict_layers, scoring_func, topk_method, ... minus
                             auto_map / quantization_config); tokenizer files and generation_config.json as
                             make_dummy_qwen3_moe.py writes them.
  OUT/../<name>-f32.gguf     GGUF f32 for llama.cpp (unless --no-gguf), llama.cpp's convert_hf_to_gguf.py with the
                             pre-tokenizer forced to "qwen2" (make_dummy_qwen3_moe.write_gguf).

Peers on this shape (2026-11): ember, transformers and llama.cpp give the same greedy tokens. vLLM CPU 0.32 cannot
run it (its CPU MLA decode kernel takes only kv_lora_rank + qk_rope_head_dim = 512 + 64); mistral.rs 0.8.1 on CPU
cannot either (its CPU attention assumes v_head_dim == qk_nope_head_dim + qk_rope_head_dim, and it needs the experts
stacked by stack_experts.py). A shape all five run:
  --override '{"kv_lora_rank": 512, "qk_rope_head_dim": 64, "v_head_dim": 128}'

Weights: N(0, 0.02^2) (config initializer_range), norms = 1, e_score_correction_bias ~ N(0, 0.01^2), seeded.
No transformers model is instantiated to build it (torch + safetensors only; transformers for the GGUF step).

Usage (the /work/venv python has torch, transformers, safetensors):
  /work/venv/bin/python benches/peers/make_dummy_deepseek_v3.py \\
      [--out /work/peers/ckpt/deepseek-v3-1b] [--dtype float32|bfloat16] [--llama-cpp /work/peers/llama.cpp]
      [--no-gguf] [--skip-weights] [--override JSON] [--check [--check-json F]]
  --check: reload with DeepseekV3ForCausalLM (fp32, eager attention) and greedy-generate 16 tokens from
           PROMPT (its token ids are printed, and written with the output ids to --check-json).
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_dummy_qwen3_moe import (  # noqa: E402  shared conventions of the peer checkpoints
    BOS, EOS, REPO, SHARD_BYTES, TOKENIZER_DIR, TOKENIZER_FILES, VOCAB, write_gguf,
)

SHAPE_CONFIG = REPO / "models/configs/deepseek-v3-1b/config.json"
BIAS_STD = 0.01         # e_score_correction_bias: small next to the spread of the sigmoid scores (~0.14)
PROMPT = "The Software is provided without warranty"

# Key set of deepseek-ai/DeepSeek-V3's config.json (older Hub spelling), minus auto_map / quantization_config
# (same list as models/make_tiny_deepseek.py).
DEEPSEEK_V3_KEYS = [
    "architectures", "attention_bias", "attention_dropout", "aux_loss_alpha", "bos_token_id", "eos_token_id",
    "ep_size", "first_k_dense_replace", "hidden_act", "hidden_size", "initializer_range", "intermediate_size",
    "kv_lora_rank", "max_position_embeddings", "model_type", "moe_intermediate_size", "moe_layer_freq", "n_group",
    "n_routed_experts", "n_shared_experts", "norm_topk_prob", "num_attention_heads", "num_experts_per_tok",
    "num_hidden_layers", "num_key_value_heads", "num_nextn_predict_layers", "pretraining_tp", "q_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "rms_norm_eps", "rope_scaling", "rope_theta", "routed_scaling_factor",
    "scoring_func", "seq_aux", "tie_word_embeddings", "topk_group", "topk_method", "torch_dtype",
    "transformers_version", "use_cache", "v_head_dim", "vocab_size",
]


def build_config(dtype: str, override: dict | None = None) -> dict:
    shape = json.loads(SHAPE_CONFIG.read_text())
    shape.update(override or {})
    cfg = dict(
        # DeepSeek-V3's defaults for what the shape config leaves out
        attention_bias=False, attention_dropout=0.0, aux_loss_alpha=0.001, ep_size=1, hidden_act="silu",
        initializer_range=0.02, pretraining_tp=1, seq_aux=True, use_cache=True, transformers_version="4.33.1",
    )
    cfg.update(shape)
    cfg.update(
        vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, torch_dtype=dtype,
        num_nextn_predict_layers=0,   # no MTP layer
    )
    assert cfg["rope_scaling"]["type"] == "yarn" and cfg["topk_method"] == "noaux_tc"
    assert cfg["scoring_func"] == "sigmoid" and cfg["moe_layer_freq"] == 1
    missing = set(DEEPSEEK_V3_KEYS) - set(cfg)
    assert not missing, missing
    return {k: cfg[k] for k in DEEPSEEK_V3_KEYS}


def tensors_for(cfg: dict, dtype: torch.dtype, gen: torch.Generator):
    """Yield (name, tensor) in Hub naming, one tensor at a time."""
    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    nh = cfg["num_attention_heads"]
    qr, kvr = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    E, I, Id = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["intermediate_size"]
    Is = I * cfg["n_shared_experts"]
    std = cfg["initializer_range"]

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float32) * std).to(dtype)

    def ones(n):
        return torch.ones(n, dtype=dtype)

    def mlp(prefix, inter):
        yield prefix + "gate_proj.weight", rnd(inter, H)
        yield prefix + "up_proj.weight", rnd(inter, H)
        yield prefix + "down_proj.weight", rnd(H, inter)

    yield "model.embed_tokens.weight", rnd(V, H)
    for i in range(L):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        yield p + "input_layernorm.weight", ones(H)
        yield a + "q_a_proj.weight", rnd(qr, H)
        yield a + "q_a_layernorm.weight", ones(qr)
        yield a + "q_b_proj.weight", rnd(nh * (dn + dr), qr)
        yield a + "kv_a_proj_with_mqa.weight", rnd(kvr + dr, H)
        yield a + "kv_a_layernorm.weight", ones(kvr)
        yield a + "kv_b_proj.weight", rnd(nh * (dn + dv), kvr)
        yield a + "o_proj.weight", rnd(H, nh * dv)
        yield p + "post_attention_layernorm.weight", ones(H)
        if i < cfg["first_k_dense_replace"]:
            yield from mlp(p + "mlp.", Id)
            continue
        yield p + "mlp.gate.weight", rnd(E, H)
        yield p + "mlp.gate.e_score_correction_bias", \
            torch.randn(E, generator=gen, dtype=torch.float32) * BIAS_STD   # float32 always, as DeepSeek ships it
        for e in range(E):
            yield from mlp(f"{p}mlp.experts.{e}.", I)
        yield from mlp(p + "mlp.shared_experts.", Is)
    yield "model.norm.weight", ones(H)
    yield "lm_head.weight", rnd(V, H)


def param_counts(cfg: dict, n_params: int):
    """(total, active per token): active = all weights but the embedding table and the routed experts a token
    does not choose (ember's ModelConfig::num_active_parameters convention, models/configs/README.md)."""
    H, I = cfg["hidden_size"], cfg["moe_intermediate_size"]
    E, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    moe_layers = cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    return n_params, n_params - moe_layers * (E - k) * 3 * H * I - cfg["vocab_size"] * H


def write_checkpoint(out: Path, dtype_name: str, seed: int, override: dict | None = None):
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    cfg = build_config(dtype_name, override)
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("model*.safetensors*"):
        f.unlink()
    gen = torch.Generator().manual_seed(seed)

    shards, cur, cur_bytes, total_bytes, n_params = [], {}, 0, 0, 0
    for name, t in tensors_for(cfg, dtype, gen):
        nb = t.numel() * t.element_size()
        if cur and cur_bytes + nb > SHARD_BYTES:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[name] = t.contiguous()
        cur_bytes += nb
        total_bytes += nb
        n_params += t.numel()
    shards.append(cur)

    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
        print(f"  wrote {fname} ({len(shard)} tensors)", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total_bytes, "total_parameters": n_params},
         "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS, "eos_token_id": [EOS, BOS], "pad_token_id": BOS}, indent=2) + "\n")
    for f in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / f, out / f)

    tok = json.loads((out / "tokenizer.json").read_text())
    ids = list(tok["model"]["vocab"].values()) + [a["id"] for a in tok.get("added_tokens", [])]
    assert max(ids) < cfg["vocab_size"], (max(ids), cfg["vocab_size"])
    total, active = param_counts(cfg, n_params)
    print(f"checkpoint {out}: {total / 1e9:.3f} B params ({total_bytes / 1e9:.2f} GB {dtype_name}), "
          f"~{active / 1e9:.3f} B active (read per decoded token); tokenizer max id {max(ids)} < vocab "
          f"{cfg['vocab_size']}")


def check_transformers(ckpt: Path, max_new_tokens: int, json_out: Path | None):
    """Greedy reference: DeepseekV3ForCausalLM, fp32, eager attention, from the token ids of PROMPT."""
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()
    prompt_ids = tok(PROMPT).input_ids
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, ids.shape[1]:].tolist()
    # greedy margin (top-1 minus top-2 logit) per step: small ones are where other engines may pick differently
    margins = [float(s[0].topk(2).values.diff().abs()) for s in out.scores]
    res = {"prompt": PROMPT, "prompt_ids": prompt_ids, "output_ids": new, "text": tok.decode(new),
           "min_greedy_margin": min(margins), "greedy_margins": margins}
    print("transformers greedy:", json.dumps(res))
    if json_out:
        json_out.write_text(json.dumps(res, indent=2) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path,
                    default=Path(os.environ.get("PEERS_CKPT", "/work/peers/ckpt/deepseek-v3-1b")))
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--llama-cpp", type=Path, default=Path(os.environ.get("LLAMA_CPP_DIR", "/work/peers/llama.cpp")))
    ap.add_argument("--gguf", type=Path, default=None, help="default: OUT/../<name>-f32.gguf")
    ap.add_argument("--no-gguf", action="store_true")
    ap.add_argument("--override", type=json.loads, default=None,
                    help='JSON merged over the shape config, e.g. \'{"num_hidden_layers": 3}\' (for probing peers)')
    ap.add_argument("--skip-weights", action="store_true", help="reuse an existing OUT (e.g. only redo the GGUF)")
    ap.add_argument("--check", action="store_true", help="reload with transformers and greedy-generate")
    ap.add_argument("--check-tokens", type=int, default=16)
    ap.add_argument("--check-json", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if not a.skip_weights:
        write_checkpoint(a.out, a.dtype, a.seed, a.override)
    if not a.no_gguf:
        write_gguf(a.out, a.llama_cpp, a.gguf or a.out.parent / f"{a.out.name}-f32.gguf")
    if a.check:
        check_transformers(a.out, a.check_tokens, a.check_json)


if __name__ == "__main__":
    main()
