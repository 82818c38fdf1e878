#!/usr/bin/env python3
"""Build the shared peer-benchmark checkpoint: a random-weight Qwen3-MoE with the real architecture.

Shape: models/configs/qwen3-moe-1b/config.json (12 layers, hidden 1024, 16 q / 4 kv heads of 128, 64 experts
top-8 with moe_intermediate 320, q/k RMSNorm, untied lm_head), vocab cut to the 2048 ids of the
models/qwen3-moe-tiny tokenizer (2000 used, specials at 1991-1999; rows 2000-2047 are random and unused).
That is ~0.82B parameters (~0.16B active per token); f32 = 3.3 GB.

Writes, outside the repo by default:
  OUT/                       Hub-style checkpoint: sharded safetensors + model.safetensors.index.json,
                             per-expert tensors (mlp.experts.{e}.{gate,up,down}_proj.weight), older Hub config
                             keys (num_experts, rope_theta, max_window_layers, use_sliding_window) as
                             mistral.rs / older loaders need, tokenizer files copied from qwen3-moe-tiny, and a
                             generation_config.json without sampling defaults (so servers default to what the
                             request asks).
  OUT/../<name>-f32.gguf     GGUF f32 for llama.cpp (unless --no-gguf), made with llama.cpp's
                             convert_hf_to_gguf.py, pre-tokenizer forced to "qwen2" (the locally trained BPE has no
                             known pre-tokenizer hash; its split regex is Qwen2's).

Weights: N(0, 0.02^2) (config initializer_range), norms = 1, seeded (deterministic per --seed).
No transformers model is instantiated, so it needs only torch + safetensors (+ transformers for the GGUF step).

Usage (the /work/venv python has torch, transformers, safetensors):
  /work/venv/bin/python benches/peers/make_dummy_qwen3_moe.py \
      [--out /work/peers/ckpt/qwen3-moe-1b] [--dtype float32|bfloat16] [--llama-cpp /work/peers/llama.cpp]
      [--no-gguf] [--check]     # --check: reload with transformers and run a short greedy generate
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
SHAPE_CONFIG = REPO / "models/configs/qwen3-moe-1b/config.json"
TOKENIZER_DIR = REPO / "models/qwen3-moe-tiny"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]
VOCAB = 2048            # tokenizer ids 0..1999 (specials 1991..1999), padded to 2048
BOS, EOS = 1991, 1993   # <|endoftext|>, <|im_end|> (as in qwen3-moe-tiny)
SHARD_BYTES = 2 * 1024**3


def build_config(dtype: str) -> dict:
    cfg = json.loads(SHAPE_CONFIG.read_text())
    cfg.update(
        vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS,
        torch_dtype=dtype,
        max_position_embeddings=4096,
        # older Hub keys (transformers 5 would drop these; mistral.rs needs them)
        num_experts=cfg.get("num_experts", 64), rope_theta=cfg.get("rope_theta", 1e6),
        max_window_layers=cfg.get("max_window_layers", cfg["num_hidden_layers"]),
        use_sliding_window=False, sliding_window=None, rope_scaling=None,
    )
    cfg.pop("dtype", None)
    cfg.pop("num_local_experts", None)
    cfg.pop("rope_parameters", None)
    return cfg


def tensors_for(cfg: dict, dtype: torch.dtype, gen: torch.Generator):
    """Yield (name, tensor) in Hub naming, one tensor at a time."""
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    E, I = cfg["num_experts"], cfg["moe_intermediate_size"]
    std = cfg.get("initializer_range", 0.02)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float32) * std).to(dtype)

    def ones(n):
        return torch.ones(n, dtype=dtype)

    yield "model.embed_tokens.weight", rnd(V, H)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", ones(H)
        yield p + "self_attn.q_proj.weight", rnd(nh * hd, H)
        yield p + "self_attn.k_proj.weight", rnd(nkv * hd, H)
        yield p + "self_attn.v_proj.weight", rnd(nkv * hd, H)
        yield p + "self_attn.o_proj.weight", rnd(H, nh * hd)
        yield p + "self_attn.q_norm.weight", ones(hd)
        yield p + "self_attn.k_norm.weight", ones(hd)
        yield p + "post_attention_layernorm.weight", ones(H)
        assert not cfg.get("mlp_only_layers") and cfg.get("decoder_sparse_step", 1) == 1
        yield p + "mlp.gate.weight", rnd(E, H)
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            yield q + "gate_proj.weight", rnd(I, H)
            yield q + "up_proj.weight", rnd(I, H)
            yield q + "down_proj.weight", rnd(H, I)
    yield "model.norm.weight", ones(H)
    yield "lm_head.weight", rnd(V, H)


def write_checkpoint(out: Path, dtype_name: str, seed: int):
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    cfg = build_config(dtype_name)
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

    # vocab check: every tokenizer id must be < vocab_size
    tok = json.loads((out / "tokenizer.json").read_text())
    ids = list(tok["model"]["vocab"].values()) + [a["id"] for a in tok.get("added_tokens", [])]
    assert max(ids) < cfg["vocab_size"], (max(ids), cfg["vocab_size"])
    E, k = cfg["num_experts"], cfg["num_experts_per_tok"]
    H, I, L = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_hidden_layers"]
    active = n_params - L * (E - k) * 3 * H * I - cfg["vocab_size"] * H  # minus idle experts, embedding gather
    print(f"checkpoint {out}: {n_params / 1e9:.3f} B params ({total_bytes / 1e9:.2f} GB {dtype_name}), "
          f"~{active / 1e9:.3f} B read per decoded token; tokenizer max id {max(ids)} < vocab {cfg['vocab_size']}")


def write_gguf(ckpt: Path, llama_cpp: Path, outfile: Path):
    """Run llama.cpp's convert_hf_to_gguf.py with the pre-tokenizer forced to qwen2."""
    wrapper = (
        "import sys, runpy\n"
        f"sys.path.insert(0, {str(llama_cpp)!r})\n"
        "import conversion.base as b\n"
        "b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'\n"
        f"sys.argv = ['convert_hf_to_gguf.py', {str(ckpt)!r}, '--outfile', {str(outfile)!r}, '--outtype', 'f32']\n"
        f"runpy.run_path({str(llama_cpp / 'convert_hf_to_gguf.py')!r}, run_name='__main__')\n"
    )
    subprocess.run([sys.executable, "-c", wrapper], check=True, cwd=str(llama_cpp))
    print(f"gguf {outfile}: {outfile.stat().st_size / 1e9:.2f} GB")


def check_transformers(ckpt: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ids = tok("The Software is provided without warranty", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    print("transformers greedy:", out[0, ids.shape[1]:].tolist(), repr(tok.decode(out[0, ids.shape[1]:])))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("PEERS_CKPT", "/work/peers/ckpt/qwen3-moe-1b")))
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--llama-cpp", type=Path, default=Path(os.environ.get("LLAMA_CPP_DIR", "/work/peers/llama.cpp")))
    ap.add_argument("--gguf", type=Path, default=None, help="default: OUT/../<name>-f32.gguf")
    ap.add_argument("--no-gguf", action="store_true")
    ap.add_argument("--skip-weights", action="store_true", help="reuse an existing OUT (e.g. only redo the GGUF)")
    ap.add_argument("--check", action="store_true", help="reload with transformers and greedy-generate 8 tokens")
    a = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if not a.skip_weights:
        write_checkpoint(a.out, a.dtype, a.seed)
    if not a.no_gguf:
        write_gguf(a.out, a.llama_cpp, a.gguf or a.out.parent / f"{a.out.name}-f32.gguf")
    if a.check:
        check_transformers(a.out)


if __name__ == "__main__":
    main()
