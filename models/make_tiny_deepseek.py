#!/usr/bin/env python3
"""Build ember's tiny DeepSeek-V3 / Kimi-K2 (MLA + sigmoid/noaux_tc MoE) test fixtures (deterministic, offline).

Produces, next to this file:
  deepseek-v3-tiny/             DeepseekV3ForCausalLM, 3 layers (layer 0 dense), 8 routed experts top-2 in 4 groups
                                (topk_group 2), 1 shared expert, q_lora 48 / kv_lora 32, interleaved RoPE, YaRN,
                                non-zero e_score_correction_bias (fp32), plus a fake MTP layer (model.layers.3.*)
  kimi-k2-tiny/                 same classes, model_type rewritten to "kimi_k2": q_lora_rank null (plain q_proj),
                                n_group 1, 2 dense layers first, no YaRN, v_head_dim != qk_nope_head_dim
  deepseek-v3-fp8-tiny/         deepseek-v3-tiny weights stored as DeepSeek's block FP8 (e4m3 + weight_scale_inv)
  deepseek-v3-fp8-ue8m0-tiny/   same, scale_fmt "ue8m0" (every weight_scale_inv is a power of two)

Tokenizer / tokenizer_config / generation_config are the Qwen ones built by make_tiny_models.py (copied from
qwen3-moe-tiny, which must exist). References are float32 transformers outputs in the reference.json schema of
make_tiny_models.py (chat = []).

Usage:  /work/venv/bin/python models/make_tiny_deepseek.py      (after make_tiny_models.py)
"""
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_tiny_models as mt  # noqa: E402

TOK_SRC = HERE / "qwen3-moe-tiny"
INIT_STD = mt.INIT_STD
NORM_STD = mt.NORM_STD
BIAS_STD = 0.1                   # e_score_correction_bias ~ N(0, 0.1^2), stored float32 (as DeepSeek does)
MIN_GREEDY_MARGIN = 1e-2
MIN_ROUTER_MARGIN = 1e-4
MAX_SEED_TRIES = 300
FP8_MAX = 448.0
BLOCK = 128

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}

V3_SHAPES = dict(
    hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, moe_intermediate_size=32, intermediate_size=128, n_group=4, topk_group=2,
    norm_topk_prob=True, routed_scaling_factor=2.5, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48,
    kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, rope_interleave=True,
    max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
)
KIMI_SHAPES = dict(
    hidden_size=64, num_hidden_layers=4, first_k_dense_replace=2, n_routed_experts=8, num_experts_per_tok=3,
    n_shared_experts=1, moe_intermediate_size=32, intermediate_size=128, n_group=1, topk_group=1,
    norm_topk_prob=True, routed_scaling_factor=2.827, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
    kv_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, rope_interleave=True,
    max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
)

MODELS = [
    dict(name="deepseek-v3-tiny", shapes=V3_SHAPES, rope_theta=10000.0, rope_scaling=YARN, seed_base=5250,   # search started at 5000; 5250 was the first seed accepted
        
         model_type="deepseek_v3", mtp=True, fp8_variants=[("deepseek-v3-fp8-tiny", None),
                                                          ("deepseek-v3-fp8-ue8m0-tiny", "ue8m0")]),
    dict(name="kimi-k2-tiny", shapes=KIMI_SHAPES, rope_theta=50000.0, rope_scaling=None, seed_base=6000,
         model_type="kimi_k2", mtp=False, fp8_variants=[]),
]

# Key set of deepseek-ai/DeepSeek-V3's config.json (older Hub spelling), minus auto_map / quantization_config.
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

log = mt.log
write_json = mt.write_json


def is_norm(name):
    return name.endswith("norm.weight")


def make_config(spec, vocab_size, ids):
    from transformers import DeepseekV3Config
    rp = {"rope_type": "default", "rope_theta": spec["rope_theta"]}
    if spec["rope_scaling"]:
        rs = dict(spec["rope_scaling"])
        rp = {"rope_type": rs.pop("type"), "rope_theta": spec["rope_theta"], **rs}
    cfg = DeepseekV3Config(**spec["shapes"], vocab_size=vocab_size, initializer_range=INIT_STD, rope_parameters=rp,
                           bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                           num_mtp_layers=1 if spec["mtp"] else 0, dtype="bfloat16")
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    return cfg


def randomize_parameters(model, gen):
    """Every parameter, in name order, from `gen`: RMSNorm weights ~ 1 + N(0, NORM_STD^2), the rest ~ N(0,
    INIT_STD^2), rounded to bf16 (buffers such as RoPE's inv_freq are left as transformers computes them)."""
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        v = (1.0 + NORM_STD * torch.randn(p.shape, generator=gen)) if is_norm(name) \
            else INIT_STD * torch.randn(p.shape, generator=gen)
        p.copy_(v.to(torch.bfloat16).to(torch.float32))


def build_model(cfg, seed, tok_size):
    from transformers import DeepseekV3ForCausalLM
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32,
                                               experts_implementation="eager")
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        randomize_parameters(model, gen)
        for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
            if name.endswith("e_score_correction_bias"):
                b.copy_(BIAS_STD * torch.randn(b.shape, generator=gen))      # fp32, not bf16-rounded
        model.model.embed_tokens.weight[tok_size:] = 0
        model.lm_head.weight[tok_size:] = 0
    return model


class RouterRecorder:
    """Min gap at every routing decision of the sigmoid + bias (noaux_tc) router: between the topk_group-th and
    (topk_group+1)-th group score (when n_group > topk_group) and between the k-th and (k+1)-th biased expert score
    inside the selected groups."""

    def __init__(self, model):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
        self.min_gap = math.inf
        self.min_group_gap = math.inf
        self.min_expert_gap = math.inf
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, DeepseekV3TopkRouter)]

    def _hook(self, m, inputs, output):
        logits = output[0].detach().float()
        s = logits.sigmoid() + m.e_score_correction_bias.float()
        ng, E, k, tg = m.num_group, m.num_experts, m.top_k, m.topk_group
        gs = s.view(-1, ng, E // ng).topk(2, dim=-1)[0].sum(-1)
        if ng > tg:
            t = gs.topk(tg + 1, dim=-1).values
            self.min_group_gap = min(self.min_group_gap, float((t[:, tg - 1] - t[:, tg]).min()))
        gidx = gs.topk(tg, dim=-1).indices
        gmask = torch.zeros_like(gs).scatter_(1, gidx, 1).bool()
        smask = gmask.unsqueeze(-1).expand(-1, ng, E // ng).reshape(-1, E)
        masked = s.masked_fill(~smask, float("-inf"))
        t = masked.topk(k + 1, dim=-1).values
        self.min_expert_gap = min(self.min_expert_gap, float((t[:, k - 1] - t[:, k]).min()))
        self.min_gap = min(self.min_group_gap, self.min_expert_gap)

    def close(self):
        for h in self.handles:
            h.remove()


def evaluate(model, prompt_ids):
    rec = RouterRecorder(model)
    try:
        results = [mt.run_prompt(model, ids) for ids in prompt_ids]
    finally:
        rec.close()
    return results, min(min(r["margins"]) for r in results), rec


# ------------------------------------------------------------------ FP8 -------------------------------------------

def fp8_quantize(w, scale_fmt=None):
    """Block-wise (128x128) e4m3 quantisation: returns (fp8 weight, float32 scale_inv [ceil(o/128), ceil(i/128)]),
    with w ~= fp8.float() * scale_inv (per block)."""
    o, i = w.shape
    bo, bi = -(-o // BLOCK), -(-i // BLOCK)
    wf = w.float()
    pad = torch.zeros(bo * BLOCK, bi * BLOCK)
    pad[:o, :i] = wf
    blocks = pad.view(bo, BLOCK, bi, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        scale = torch.pow(2.0, torch.ceil(torch.log2(scale)))
    scale = scale.to(torch.float32)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.reshape(bo * BLOCK, bi * BLOCK)[:o, :i].to(torch.float8_e4m3fn).contiguous()
    return q, scale


def fp8_dequantize(q, scale):
    o, i = q.shape
    s = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:o, :i]
    return q.float() * s


def is_fp8_target(name):
    """Linear weights of decoder layers (attention and MLP / expert projections); not embeddings, norms, router."""
    if not (name.startswith("model.layers.") and name.endswith(".weight")):
        return False
    if is_norm(name) or name.endswith("mlp.gate.weight"):
        return False
    return name.endswith("_proj.weight") or name.endswith("proj_with_mqa.weight")


def quantize_state_dict(sd, scale_fmt):
    out, deq = {}, {}
    for k, v in sd.items():
        if is_fp8_target(k):
            q, s = fp8_quantize(v, scale_fmt)
            out[k] = q
            out[k[: -len("weight")] + "weight_scale_inv"] = s
            deq[k] = fp8_dequantize(q, s)
        else:
            out[k] = v
    return out, deq


# ------------------------------------------------------------------ state dicts -----------------------------------

def hub_state_dict(model, cfg):
    sd = mt.hub_state_dict(model, cfg)            # bf16, experts split per expert
    for k in list(sd):
        if k.endswith("e_score_correction_bias"):
            sd[k] = model.state_dict()[k].detach().float().contiguous().clone()
    return sd


def mtp_tensors(cfg, seed, base_sd):
    """A few tensors of a DeepSeek-style MTP layer at index num_hidden_layers (loaders must skip them)."""
    n, h = cfg.num_hidden_layers, cfg.hidden_size
    g = torch.Generator().manual_seed(seed + 777)
    p = f"model.layers.{n}."
    moe = f"model.layers.{cfg.num_hidden_layers - 1}."
    rnd = lambda *s: (INIT_STD * torch.randn(*s, generator=g)).to(torch.bfloat16)          # noqa: E731
    nrm = lambda *s: (1 + NORM_STD * torch.randn(*s, generator=g)).to(torch.bfloat16)      # noqa: E731
    out = {
        p + "enorm.weight": nrm(h),
        p + "hnorm.weight": nrm(h),
        p + "eh_proj.weight": rnd(h, 2 * h),
        p + "shared_head.norm.weight": nrm(h),
        p + "input_layernorm.weight": nrm(h),
        p + "self_attn.kv_a_proj_with_mqa.weight": rnd(*base_sd[moe + "self_attn.kv_a_proj_with_mqa.weight"].shape),
        p + "mlp.gate.weight": rnd(*base_sd[moe + "mlp.gate.weight"].shape),
        p + "mlp.gate.e_score_correction_bias": BIAS_STD * torch.randn(cfg.n_routed_experts, generator=g),
        p + "mlp.experts.0.gate_proj.weight": rnd(*base_sd[moe + "mlp.experts.0.gate_proj.weight"].shape),
        p + "mlp.shared_experts.down_proj.weight": rnd(*base_sd[moe + "mlp.shared_experts.down_proj.weight"].shape),
    }
    return {k: v.contiguous() for k, v in out.items()}


def to_model_state_dict(hub_sd, model):
    """Hub-layout tensors (fp32) -> transformers state dict (fused experts)."""
    msd = model.state_dict()
    out = {}
    for k in msd:
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            E = msd[k].shape[0]
            out[k] = torch.stack([torch.cat([hub_sd[f"{pre}{e}.gate_proj.weight"], hub_sd[f"{pre}{e}.up_proj.weight"]])
                                  for e in range(E)])
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            out[k] = torch.stack([hub_sd[f"{pre}{e}.down_proj.weight"] for e in range(msd[k].shape[0])])
        else:
            out[k] = hub_sd[k]
    return {k: v.float() for k, v in out.items()}


# ------------------------------------------------------------------ config ----------------------------------------

def legacy_config(spec, cfg, v5, fp8_scale_fmt=None, fp8=False):
    d = {}
    rp = v5["rope_parameters"]
    d["rope_theta"] = rp["rope_theta"]
    d["rope_scaling"] = dict(spec["rope_scaling"]) if spec["rope_scaling"] else None
    for k in DEEPSEEK_V3_KEYS:
        if k in ("rope_theta", "rope_scaling"):
            continue
        if k == "torch_dtype":
            d[k] = "bfloat16"
        elif k == "model_type":
            d[k] = spec["model_type"]
        elif k == "num_nextn_predict_layers":
            d[k] = 1 if spec["mtp"] else 0
        elif k == "moe_layer_freq":
            d[k] = 1
        elif k == "topk_method":
            d[k] = "noaux_tc"
        elif k == "scoring_func":
            d[k] = "sigmoid"
        elif k == "aux_loss_alpha":
            d[k] = 0.001
        elif k == "seq_aux":
            d[k] = True
        elif k == "ep_size":
            d[k] = 1
        else:
            d[k] = v5[k]
    if spec["model_type"] == "deepseek_v3":
        d["rope_interleave"] = True       # Kimi's config.json has no rope_interleave key (default: interleaved)
    if fp8:
        qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}
        if fp8_scale_fmt:
            qc["scale_fmt"] = fp8_scale_fmt
        d["quantization_config"] = qc
    return dict(sorted(d.items()))


# ------------------------------------------------------------------ main ------------------------------------------

def choose_seed(spec, cfg, tok_size, prompt_ids):
    for t in range(MAX_SEED_TRIES):
        seed = spec["seed_base"] + t
        model = build_model(cfg, seed, tok_size)
        _, m, rec = evaluate(model, prompt_ids)
        ok = m > MIN_GREEDY_MARGIN and rec.min_gap > MIN_ROUTER_MARGIN
        extra = {}
        if ok and spec["fp8_variants"]:
            sd = hub_state_dict(model, cfg)
            for vname, fmt in spec["fp8_variants"]:
                _, deq = quantize_state_dict(sd, fmt)
                qm = build_model(cfg, seed, tok_size)
                qm.load_state_dict(to_model_state_dict({**sd, **deq}, qm), strict=True)
                _, qmarg, qrec = evaluate(qm, prompt_ids)
                extra[vname] = (qmarg, qrec.min_gap)
                ok = ok and qmarg > MIN_GREEDY_MARGIN and qrec.min_gap > MIN_ROUTER_MARGIN
        log(f"  {spec['name']}: seed {seed}: greedy {m:.5f} router {rec.min_gap:.3g} "
            f"(group {rec.min_group_gap:.3g}, expert {rec.min_expert_gap:.3g}) fp8 {extra}"
            f"{'  <- accepted' if ok else ''}")
        if ok:
            return seed, model
    raise SystemExit(f"no seed satisfied the margins for {spec['name']}")


def make_reference(name, seed, results, margin, rec, hf_tok, prompt_ids, versions, ids, extra):
    prompts_out = []
    for text, pid, r in zip(mt.PROMPTS, prompt_ids, results):
        prompts_out.append({
            "text": text, "token_ids": pid,
            "prompt_logprobs": r["prompt_logprobs"], "prompt_top_logprobs": r["prompt_top_logprobs"],
            "greedy": {"token_ids": r["greedy_ids"], "logprobs": r["greedy_logprobs"], "top_logprobs": r["greedy_top"],
                       "text": hf_tok.decode(r["greedy_ids"], skip_special_tokens=False)},
        })
    ref = {"model": name, "dtype": "float32", "transformers_version": versions["transformers"],
           "torch_version": versions["torch"], "min_greedy_margin": margin, "min_router_margin": rec.min_gap,
           "min_router_group_margin": None if rec.min_group_gap == math.inf else rec.min_group_gap,
           "min_router_expert_margin": rec.min_expert_gap,
           "seed": seed, "greedy_steps": mt.GREEDY_STEPS, "special_token_ids": ids}
    ref.update(extra)
    ref["prompts"] = prompts_out
    ref["chat"] = []
    return ref


def copy_tokenizer(d):
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(TOK_SRC / f, d / f)
    jinja = d / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()


def save(sd, d):
    from safetensors.torch import save_file
    for old in list(d.glob("model*.safetensors")) + list(d.glob("model.safetensors.index.json")):
        old.unlink()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


def replace_readme_section(begin, end, text):
    """Drop the README.md section between the `begin` and `end` markers (if any) and append `text` (which carries
    the markers itself): each fixture script owns one section."""
    path = HERE / "README.md"
    cur = path.read_text(encoding="utf-8")
    if begin in cur and end in cur:
        a = cur.index(begin)
        b = cur.index(end) + len(end) + 1
        cur = cur[:a] + cur[b:]
    path.write_text(cur.rstrip("\n") + "\n\n" + text, encoding="utf-8")


README_BEGIN = "<!-- make_tiny_deepseek.py: begin -->"
README_END = "<!-- make_tiny_deepseek.py: end -->"


def write_readme_section(summary, versions):
    """Replace (or append) the DeepSeek section of README.md. make_tiny_models.py rewrites README.md from scratch,
    so run this script after it."""
    order = ["deepseek-v3-tiny", "deepseek-v3-fp8-tiny", "deepseek-v3-fp8-ue8m0-tiny", "kimi-k2-tiny"]
    margins = "\n".join(
        f"| `{n}` | {summary[n]['seed']} | {summary[n]['margin']:.6f} | {summary[n]['router']:.6f} | "
        f"{'n/a (n_group 1)' if summary[n]['group'] == math.inf else format(summary[n]['group'], '.6f')} | "
        f"{summary[n]['expert']:.6f} |" for n in order)
    files = []
    for n in order:
        for f in sorted((HERE / n).iterdir()):
            files.append(f"| `{n}/{f.name}` | {f.stat().st_size:,} |")
    files = "\n".join(files)
    text = f"""{README_BEGIN}
## DeepSeek-V3 / Kimi-K2 checkpoints (`make_tiny_deepseek.py`)

Built by `make_tiny_deepseek.py` (run it **after** `make_tiny_models.py`, which rewrites this README and builds the
tokenizer): `DeepseekV3ForCausalLM` / `DeepseekV3Config` from transformers {versions['transformers']}, eager attention,
eager experts. MLA attention, sigmoid + `e_score_correction_bias` ("noaux_tc") group-limited routing, shared expert.
Tokenizer, `tokenizer_config.json` (Qwen3 chat template, `Qwen2Tokenizer`) and `generation_config.json` are copied
from `qwen3-moe-tiny` (no DeepSeek/Kimi chat template; `reference.json` has `"chat": []`).
Weights bf16 (linear / embedding ~ N(0, {INIT_STD}^2), every RMSNorm incl. `q_a_layernorm` / `kv_a_layernorm`
~ 1 + N(0, {NORM_STD}^2)), except `mlp.gate.e_score_correction_bias`, stored **float32** (as DeepSeek ships it),
~ N(0, {BIAS_STD}^2), non-zero. vocab_size 2048 (rows 2000.. zero). Single `model.safetensors` each.
config.json uses the **older Hub spelling of DeepSeek-V3's config.json** (same key set: `rope_theta`,
`rope_scaling`, `torch_dtype`, `n_routed_experts`, `moe_layer_freq`, `topk_method`, `scoring_func`,
`num_nextn_predict_layers`, `ep_size`, `aux_loss_alpha`, `seq_aux`, ...).

| dir | details |
|---|---|
| `deepseek-v3-tiny` | `model_type: deepseek_v3`; hidden 64, 3 layers, `first_k_dense_replace: 1` (layer 0 dense MLP, intermediate 128), `moe_layer_freq: 1`; 8 routed experts top-2, `n_group: 4`, `topk_group: 2`, `n_shared_experts: 1`, `moe_intermediate_size: 32`, `norm_topk_prob: true`, `routed_scaling_factor: 2.5`; MLA: 4 heads, `q_lora_rank: 48`, `kv_lora_rank: 32`, `qk_nope_head_dim: 16`, `qk_rope_head_dim: 8`, `v_head_dim: 16`, `rope_interleave: true`; `rope_theta: 10000`, `rope_scaling: {json.dumps(YARN)}`, max_position_embeddings 4096. `num_nextn_predict_layers: 1` and the file holds a few tensors of a fake **MTP layer `model.layers.3.*`** (`enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, `input_layernorm`, `self_attn.kv_a_proj_with_mqa`, `mlp.gate.weight`, `mlp.gate.e_score_correction_bias`, `mlp.experts.0.gate_proj`, `mlp.shared_experts.down_proj`) that a loader must skip; the reference ignores it (transformers reports them as unexpected keys) |
| `deepseek-v3-fp8-tiny` | the `deepseek-v3-tiny` weights in DeepSeek's block-FP8 layout: `quantization_config: {{"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}}`. Every decoder-layer linear weight (`q_a_proj`, `q_b_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`, `o_proj`, dense `mlp.{{gate,up,down}}_proj`, `mlp.experts.{{e}}.*`, `mlp.shared_experts.*`, and the MTP layer's `eh_proj` / projections) is `float8_e4m3fn` with `<name>.weight_scale_inv` float32 `[ceil(out/128), ceil(in/128)]` (here always `[1, 1]`: every tiny matrix is a single block), scale = block amax / 448, so `W ~= fp8 * scale_inv`. Embeddings, norms, router `mlp.gate.weight`, `e_score_correction_bias`, `lm_head` stay bf16 / fp32 |
| `deepseek-v3-fp8-ue8m0-tiny` | same, with `"scale_fmt": "ue8m0"` inside `quantization_config` (as DeepSeek-V3.1): every `weight_scale_inv` is a power of two, `2^ceil(log2(amax / 448))` |
| `kimi-k2-tiny` | `model_type: "kimi_k2"` (transformers has no kimi_k2: built and evaluated with the DeepseekV3 classes, then config.json's `model_type` rewritten; `architectures: ["DeepseekV3ForCausalLM"]` as Kimi ships). 4 layers, `first_k_dense_replace: 2`; 8 routed experts **top-3**, `n_group: 1`, `topk_group: 1`, 1 shared expert, `routed_scaling_factor: 2.827`; MLA with **`q_lora_rank: null`** (plain `self_attn.q_proj`, no `q_a_layernorm`), `kv_lora_rank: 48`, `qk_nope_head_dim: 16`, `qk_rope_head_dim: 8`, **`v_head_dim: 24`** (!= qk_nope_head_dim); `rope_theta: 50000`, `rope_scaling: null`, no `rope_interleave` key (Kimi's config.json has none; the DeepSeek-V3 code and transformers' default are interleaved); `num_nextn_predict_layers: 0` |

Tensor names (one MoE layer of `deepseek-v3-tiny`, shapes [out, in]): `self_attn.q_a_proj` [48, 64], `self_attn.q_a_layernorm` [48],
`self_attn.q_b_proj` [96, 48] (4 heads x (16 nope + 8 rope)), `self_attn.kv_a_proj_with_mqa` [40, 64] (32 latent + 8 rope),
`self_attn.kv_a_layernorm` [32], `self_attn.kv_b_proj` [128, 32] (4 heads x (16 k_nope + 16 v)), `self_attn.o_proj` [64, 64],
`mlp.gate.weight` [8, 64], `mlp.gate.e_score_correction_bias` [8] (F32), `mlp.experts.{{0..7}}.{{gate,up}}_proj.weight` [32, 64],
`mlp.experts.{{e}}.down_proj.weight` [64, 32], `mlp.shared_experts.{{gate,up}}_proj.weight` [32, 64], `mlp.shared_experts.down_proj.weight` [64, 32],
`input_layernorm`, `post_attention_layernorm` [64] (all `model.layers.{{l}}.` + name + `.weight` unless noted).

RoPE: only the `qk_rope_head_dim` = 8 slice is rotated, **interleaved** pairs (x0,x1),(x2,x3)... . YaRN as transformers computes
it: `inv_freq` from `factor`, `beta_fast` / `beta_slow`, `original_max_position_embeddings`, correction range truncated
(floor/ceil, `truncate` default true); cos/sin `attention_factor` = mscale(4, mscale) / mscale(4, mscale_all_dim) = 1.0; the
softmax scale is `qk_head_dim^-0.5 * mscale(4, mscale_all_dim)^2` with mscale(s, m) = 0.1 m ln(s) + 1 (DeepSeek's rule).

Routing (transformers `DeepseekV3TopkRouter`): scores = sigmoid(x W_gate^T) in fp32; choice scores = scores + bias; group
score = sum of the top-2 choice scores in each group; keep the `topk_group` best groups; top-k experts by choice score
among them; weights = **unbiased** sigmoid scores of the chosen experts, normalised to sum 1 (`norm_topk_prob`), times
`routed_scaling_factor`; plus the shared expert (unweighted).

### reference.json

Same schema as above (`chat: []`), plus `min_router_group_margin` (gap between the `topk_group`-th and next group score;
null when `n_group == topk_group`, here kimi), `min_router_expert_margin` (gap between the k-th and (k+1)-th biased
score inside the selected groups), `min_router_margin` = min of both, `architecture`, `config_model_type`,
`rope_parameters` (as transformers parsed them), `note`, and `ignored_tensors` (MTP layer) where relevant.
`deepseek-v3-tiny` and `kimi-k2-tiny`: `from_pretrained(dir, dtype=float32, attn_implementation="eager",
experts_implementation="eager")` (kimi via a temporary copy whose `model_type` is `deepseek_v3`), checked bit-identical to
the in-memory model. **FP8 references** are computed in float32 from the **dequantized** weights: for each fp8 tensor,
`W = fp8.float() * weight_scale_inv` repeated over its 128x128 block (edge blocks cropped), everything else as stored,
loaded into a fresh `DeepseekV3ForCausalLM` (`load_state_dict`, strict) — not from the original bf16 weights. The script
checks that dequantizing the saved file reproduces the weights used for the seed search, and that each dequantized weight is
within 7% (of the matrix amax) of its bf16 original.
Variants `topk_method: greedy` / `scoring_func: softmax` (DeepSeek-V2-Lite routing) are **not** built:
transformers' `DeepseekV3TopkRouter` implements only sigmoid + noaux_tc.

Seeds were searched so that greedy argmax (> 0.01) and every routing decision (> 1e-4) are not decided by float noise; the
FP8 variants share `deepseek-v3-tiny`'s seed and the seed was only accepted if their dequantized models pass too:

| model | seed | min greedy margin | min router margin | min group margin | min expert margin |
|---|---|---|---|---|---|
{margins}

| file | bytes |
|---|---|
{files}
{README_END}
"""
    replace_readme_section(README_BEGIN, README_END, text)


def main():
    import safetensors
    import tokenizers
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)
    versions = dict(transformers=transformers.__version__, torch=torch.__version__,
                    tokenizers=tokenizers.__version__, safetensors=safetensors.__version__)
    log("versions:", versions)
    hf_tok = AutoTokenizer.from_pretrained(str(TOK_SRC))
    tok_size = len(hf_tok)
    vocab_size = (tok_size + 63) // 64 * 64
    ids = {t: hf_tok.convert_tokens_to_ids(t) for t in mt.SPECIAL_TOKENS + mt.EXTRA_ADDED_TOKENS}
    prompt_ids = [hf_tok.encode(t, add_special_tokens=False) for t in mt.PROMPTS]
    log("prompt lengths", [len(p) for p in prompt_ids])

    summary = {}
    for spec in MODELS:
        name = spec["name"]
        d = HERE / name
        d.mkdir(exist_ok=True)
        log(f"== {name}")
        cfg = make_config(spec, vocab_size, ids)
        seed, model = choose_seed(spec, cfg, tok_size, prompt_ids)
        sd = hub_state_dict(model, cfg)
        assert sd[f"model.layers.{cfg.num_hidden_layers - 1}.mlp.gate.e_score_correction_bias"].abs().min() > 0
        mtp = mtp_tensors(cfg, seed, sd) if spec["mtp"] else {}
        full = {**sd, **mtp}
        copy_tokenizer(d)
        save(full, d)
        cfg.save_pretrained(str(d))
        v5 = json.loads((d / "config.json").read_text())
        cfg_json = legacy_config(spec, cfg, v5)
        write_json(d / "config.json", cfg_json)

        loaded = load_file(str(d / "model.safetensors"))
        assert set(loaded) == set(full) and all(torch.equal(loaded[k], full[k]) for k in full)
        assert all(v.dtype == (torch.float32 if k.endswith("e_score_correction_bias") else torch.bfloat16)
                   for k, v in loaded.items())

        # reload with transformers (model_type rewritten back to deepseek_v3 for kimi, in a temp copy)
        load_dir = d
        tmp = None
        if spec["model_type"] != "deepseek_v3":
            import tempfile
            tmp = tempfile.TemporaryDirectory(prefix="ember-kimi-")
            load_dir = Path(tmp.name)
            for f in d.iterdir():
                shutil.copyfile(f, load_dir / f.name)
            write_json(load_dir / "config.json", dict(cfg_json, model_type="deepseek_v3"))
        reloaded, info = DeepseekV3ForCausalLM.from_pretrained(
            str(load_dir), output_loading_info=True, dtype=torch.float32, attn_implementation="eager",
            experts_implementation="eager")
        reloaded.eval()
        unexpected = set(info.get("unexpected_keys") or [])
        # (transformers reports the MTP expert under its fused in-memory name, mlp.experts.gate_up_proj)
        mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
        assert all(k.startswith(mtp_prefix) for k in unexpected) and bool(unexpected) == bool(mtp), unexpected
        bad = {k: v for k, v in info.items() if v and k not in ("error_msgs", "unexpected_keys")}
        assert not bad and not info.get("error_msgs"), f"loading info: {info}"
        msd, rsd = model.state_dict(), reloaded.state_dict()
        assert set(msd) == set(rsd)
        for k in msd:
            assert rsd[k].dtype == torch.float32 and torch.equal(msd[k], rsd[k]), f"param mismatch {k}"
        for (n1, b1), (n2, b2) in zip(model.named_buffers(), reloaded.named_buffers()):
            assert n1 == n2 and torch.equal(b1, b2), f"buffer mismatch {n1}"
        rc = reloaded.config
        rp = rc.rope_parameters
        log("  reloaded rope_parameters:", rp)
        assert rp["rope_theta"] == spec["rope_theta"]
        if spec["rope_scaling"]:
            assert rp["rope_type"] == "yarn" and rp["factor"] == 4.0
        else:
            assert rp.get("rope_type", "default") == "default"
        for k, v in spec["shapes"].items():
            assert getattr(rc, k) == v, (k, getattr(rc, k), v)
        if tmp:
            tmp.cleanup()

        results_mem, m_mem, _ = evaluate(model, prompt_ids)
        results, margin, rec = evaluate(reloaded, prompt_ids)
        for a, b in zip(results_mem, results):
            for la, lb in zip(a["all_logits"], b["all_logits"]):
                assert torch.equal(la, lb), "reloaded logits differ from the in-memory model"
        extra = {"architecture": "DeepseekV3ForCausalLM", "config_model_type": spec["model_type"],
                 "rope_parameters": {k: v for k, v in rp.items()}}
        if spec["model_type"] != "deepseek_v3":
            extra["note"] = ("transformers has no kimi_k2 model type: built and evaluated with DeepseekV3ForCausalLM "
                             "/ DeepseekV3Config (model_type deepseek_v3), then config.json's model_type was "
                             "rewritten to kimi_k2")
        if mtp:
            extra["ignored_tensors"] = sorted(mtp)
            extra["note"] = (f"model.layers.{cfg.num_hidden_layers}.* is a fake MTP (num_nextn_predict_layers) layer; "
                             "the reference ignores it")
        write_json(d / "reference.json", make_reference(name, seed, results, margin, rec, hf_tok, prompt_ids,
                                                        versions, ids, extra), indent=1)
        summary[name] = dict(seed=seed, margin=margin, router=rec.min_gap, group=rec.min_group_gap,
                             expert=rec.min_expert_gap, config=cfg_json)
        log(f"  wrote {name}: seed {seed} margin {margin:.6f} router {rec.min_gap:.6f}")

        # ---------------- FP8 variants ----------------
        for vname, fmt in spec["fp8_variants"]:
            vd = HERE / vname
            vd.mkdir(exist_ok=True)
            log(f"== {vname}")
            qsd, deq = quantize_state_dict(sd, fmt)
            qmtp, _ = quantize_state_dict(mtp, fmt)
            qfull = {**qsd, **qmtp}
            copy_tokenizer(vd)
            save(qfull, vd)
            vcfg = legacy_config(spec, cfg, v5, fp8_scale_fmt=fmt, fp8=True)
            write_json(vd / "config.json", vcfg)
            ql = load_file(str(vd / "model.safetensors"))
            assert set(ql) == set(qfull)
            n_fp8 = 0
            hub_deq = {}
            for k, v in ql.items():
                if k.endswith("weight_scale_inv"):
                    continue
                if v.dtype == torch.float8_e4m3fn:
                    n_fp8 += 1
                    s = ql[k[: -len("weight")] + "weight_scale_inv"]
                    assert s.dtype == torch.float32 and list(s.shape) == [-(-v.shape[0] // BLOCK),
                                                                          -(-v.shape[1] // BLOCK)]
                    if fmt == "ue8m0":
                        assert torch.equal(s, torch.pow(2.0, torch.log2(s).round()))
                    hub_deq[k] = fp8_dequantize(v, s)
                    # dequantised weight approximates the bf16 original
                    orig = full[k].float()
                    err = (hub_deq[k] - orig).abs().max() / orig.abs().max()
                    assert err < 0.07, (k, float(err))
                else:
                    assert is_norm(k) or k.endswith(("mlp.gate.weight", "e_score_correction_bias")) or \
                        k in ("model.embed_tokens.weight", "lm_head.weight"), k
                    hub_deq[k] = v.float()
            qm = build_model(cfg, seed, tok_size)
            qm.load_state_dict(to_model_state_dict(hub_deq, qm), strict=True)
            qm.eval()
            # same as the in-memory dequantisation used during the seed search
            for k, v in deq.items():
                assert torch.equal(hub_deq[k], v)
            qres, qmargin, qrec = evaluate(qm, prompt_ids)
            qextra = dict(extra)
            qextra["note"] = ("reference computed in float32 from the DEQUANTIZED weights: for every float8_e4m3fn "
                              "tensor W, W_fp32 = W.float() * weight_scale_inv repeated over each 128x128 block "
                              "(ragged edge blocks cropped); all other tensors as stored (bf16 -> fp32, "
                              "e_score_correction_bias fp32). The MTP layer model.layers."
                              f"{cfg.num_hidden_layers}.* is ignored.")
            qextra["quantization_config"] = vcfg["quantization_config"]
            qextra["fp8_tensor_count"] = n_fp8
            if qmtp:
                qextra["ignored_tensors"] = sorted(qmtp)
            write_json(vd / "reference.json", make_reference(vname, seed, qres, qmargin, qrec, hf_tok, prompt_ids,
                                                             versions, ids, qextra), indent=1)
            summary[vname] = dict(seed=seed, margin=qmargin, router=qrec.min_gap, group=qrec.min_group_gap,
                                  expert=qrec.min_expert_gap, config=vcfg, n_fp8=n_fp8)
            log(f"  wrote {vname}: {n_fp8} fp8 tensors, margin {qmargin:.6f} router {qrec.min_gap:.6f}")

    write_readme_section(summary, versions)
    log("done")


if __name__ == "__main__":
    main()
