#!/usr/bin/env python3
"""Build ember's tiny DeepSeek-V2 / DeepSeek-V2-Lite (MLA + softmax-routed MoE) test fixtures (deterministic, offline).

Produces, next to this file:
  deepseek-v2-lite-tiny/   DeepseekV2ForCausalLM shaped like deepseek-ai/DeepSeek-V2-Lite, scaled down: 3 layers
                           (layer 0 dense), 8 routed experts top-2, softmax scores, topk_method "greedy" (n_group 1),
                           2 shared experts, q_lora_rank null (plain q_proj), kv_lora 32, YaRN with mscale 0.707
  deepseek-v2-tiny/        the DeepSeek-V2 (236B) style: q_lora_rank 48, topk_method "group_limited_greedy"
                           (n_group 4, topk_group 2), top-3, routed_scaling_factor 4.0, plain RoPE (no scaling)

Tokenizer / tokenizer_config / generation_config are the Qwen ones built by make_tiny_models.py (copied from
qwen3-moe-tiny, which must exist). References are float32 transformers outputs (DeepseekV2ForCausalLM, eager
attention, eager experts) in the reference.json schema of make_tiny_deepseek.py (chat = []).

Usage:  /work/venv/bin/python models/make_tiny_deepseek_v2.py      (after make_tiny_models.py)
"""
import json
import math
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_tiny_models as mt  # noqa: E402
import make_tiny_deepseek as md  # noqa: E402   (copy_tokenizer, save, to_model_state_dict, make_reference)

INIT_STD = mt.INIT_STD
NORM_STD = mt.NORM_STD
MIN_GREEDY_MARGIN = 1e-2
MIN_ROUTER_MARGIN = 1e-4
MAX_SEED_TRIES = 400

# DeepSeek-V2-Lite's real mscale values (its factor is 40 / original 4096; scaled down here)
YARN_LITE = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 32, "beta_slow": 1,
             "mscale": 0.707, "mscale_all_dim": 0.707}

LITE_SHAPES = dict(
    hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=2, moe_intermediate_size=32, intermediate_size=128, n_group=1, topk_group=1,
    topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, num_attention_heads=4,
    num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
)
V2_SHAPES = dict(
    hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=3,
    n_shared_experts=2, moe_intermediate_size=32, intermediate_size=128, n_group=4, topk_group=2,
    topk_method="group_limited_greedy", norm_topk_prob=False, routed_scaling_factor=4.0, num_attention_heads=4,
    num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
)

# Key set of deepseek-ai/DeepSeek-V2-Lite's config.json (older Hub spelling), minus auto_map. DeepSeek-V2 (236B)'s
# config.json has the same keys plus "ep_size".
DEEPSEEK_V2_LITE_KEYS = [
    "architectures", "attention_bias", "attention_dropout", "aux_loss_alpha", "bos_token_id", "eos_token_id",
    "first_k_dense_replace", "hidden_act", "hidden_size", "initializer_range", "intermediate_size", "kv_lora_rank",
    "max_position_embeddings", "model_type", "moe_intermediate_size", "moe_layer_freq", "n_group",
    "n_routed_experts", "n_shared_experts", "norm_topk_prob", "num_attention_heads", "num_experts_per_tok",
    "num_hidden_layers", "num_key_value_heads", "pretraining_tp", "q_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "rms_norm_eps", "rope_scaling", "rope_theta", "routed_scaling_factor", "scoring_func",
    "seq_aux", "tie_word_embeddings", "topk_group", "topk_method", "torch_dtype", "transformers_version",
    "use_cache", "v_head_dim", "vocab_size",
]
DEEPSEEK_V2_KEYS = sorted(DEEPSEEK_V2_LITE_KEYS + ["ep_size"])

MODELS = [
    dict(name="deepseek-v2-lite-tiny", shapes=LITE_SHAPES, rope_theta=10000, rope_scaling=YARN_LITE,
         seed_base=7000, keys=DEEPSEEK_V2_LITE_KEYS),   # 7000: first seed tried, accepted
    dict(name="deepseek-v2-tiny", shapes=V2_SHAPES, rope_theta=10000, rope_scaling=None,
         seed_base=8000, keys=DEEPSEEK_V2_KEYS),        # 8003 was the first seed accepted
]

log = mt.log
write_json = mt.write_json


def make_config(spec, vocab_size, ids):
    from transformers import DeepseekV2Config
    rp = {"rope_type": "default", "rope_theta": float(spec["rope_theta"])}
    if spec["rope_scaling"]:
        rs = dict(spec["rope_scaling"])
        rp = {"rope_type": rs.pop("type"), "rope_theta": float(spec["rope_theta"]), **rs}
    cfg = DeepseekV2Config(**spec["shapes"], vocab_size=vocab_size, initializer_range=INIT_STD, rope_parameters=rp,
                           bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], dtype="bfloat16")
    cfg.architectures = ["DeepseekV2ForCausalLM"]
    return cfg


def build_model(cfg, seed, tok_size):
    from transformers import DeepseekV2ForCausalLM
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32,
                                               experts_implementation="eager")
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        md.randomize_parameters(model, gen)
        model.model.embed_tokens.weight[tok_size:] = 0
        model.lm_head.weight[tok_size:] = 0
    return model


class RouterRecorder:
    """Min gap at every routing decision of the softmax router (transformers DeepseekV2TopkRouter):
    greedy: between the k-th and (k+1)-th softmax score;
    group_limited_greedy: between the topk_group-th and (topk_group+1)-th group score (group score = max expert
    score in the group), and between the k-th and (k+1)-th score inside the selected groups (others masked to 0)."""

    def __init__(self, model, abort_below=None):
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
        self.abort_below = abort_below
        self.min_gap = math.inf
        self.min_group_gap = math.inf
        self.min_expert_gap = math.inf
        self.n_calls = 0
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, DeepseekV2TopkRouter)]

    def _hook(self, m, inputs, output):
        self.n_calls += 1
        logits, weights, idx = output
        s = logits.detach().float().softmax(dim=-1)
        E, k = m.num_experts, m.top_k
        if m.topk_method == "greedy":
            masked = s
        elif m.topk_method == "group_limited_greedy":
            ng, tg = m.num_group, m.topk_group
            gs = s.view(-1, ng, E // ng).max(dim=-1).values
            if ng > tg:
                t = gs.topk(tg + 1, dim=-1).values
                self.min_group_gap = min(self.min_group_gap, float((t[:, tg - 1] - t[:, tg]).min()))
            gidx = gs.topk(tg, dim=-1).indices
            gmask = torch.zeros_like(gs).scatter_(1, gidx, 1).bool()
            smask = gmask.unsqueeze(-1).expand(-1, ng, E // ng).reshape(-1, E)
            masked = s.masked_fill(~smask, 0.0)
        else:
            raise ValueError(m.topk_method)
        t = masked.topk(k + 1, dim=-1)
        self.min_expert_gap = min(self.min_expert_gap, float((t.values[:, k - 1] - t.values[:, k]).min()))
        self.min_gap = min(self.min_group_gap, self.min_expert_gap)
        # the router's own choice: same expert set, weights = unrenormalised softmax score * routed_scaling_factor
        assert torch.equal(idx.sort(dim=-1).values, t.indices[:, :k].sort(dim=-1).values)
        want = masked.gather(1, idx) * m.routed_scaling_factor
        assert torch.equal(weights, want), "router weights are not score * routed_scaling_factor"
        if self.abort_below is not None and self.min_gap <= self.abort_below:
            raise Reject()

    def close(self):
        for h in self.handles:
            h.remove()


class Reject(Exception):
    pass


@torch.no_grad()
def screen(model, prompt_ids):
    """Fast pre-check for the seed search: the same forwards as mt.run_prompt (longest prompt first), aborting at the
    first routing decision or greedy step under its margin. Only rejects; acceptance is decided by evaluate()."""
    rec = RouterRecorder(model, abort_below=MIN_ROUTER_MARGIN)
    try:
        for ids in sorted(prompt_ids, key=len, reverse=True):
            seq = list(ids)
            for _ in range(mt.GREEDY_STEPS):
                lp = torch.log_softmax(mt.logits_for(model, seq)[-1], dim=-1)
                top2 = torch.topk(lp, 2)
                if not float(top2.values[0] - top2.values[1]) > MIN_GREEDY_MARGIN:
                    return False
                seq.append(int(top2.indices[0]))
    except Reject:
        return False
    finally:
        rec.close()
    return True


def evaluate(model, prompt_ids):
    rec = RouterRecorder(model)
    try:
        results = [mt.run_prompt(model, ids) for ids in prompt_ids]
    finally:
        rec.close()
    assert rec.n_calls > 0
    return results, min(min(r["margins"]) for r in results), rec


def legacy_config(spec, v5):
    """transformers-5 config.json -> the older Hub spelling of deepseek-ai/DeepSeek-V2(-Lite)'s config.json."""
    d = {}
    rp = v5["rope_parameters"]
    assert rp["rope_theta"] == spec["rope_theta"]
    d["rope_theta"] = spec["rope_theta"]
    d["rope_scaling"] = dict(spec["rope_scaling"]) if spec["rope_scaling"] else None
    fixed = {"torch_dtype": "bfloat16", "moe_layer_freq": 1, "scoring_func": "softmax", "aux_loss_alpha": 0.001,
             "seq_aux": True, "ep_size": 1}
    for k in spec["keys"]:
        if k in ("rope_theta", "rope_scaling"):
            continue
        d[k] = fixed[k] if k in fixed else v5[k]
    return dict(sorted(d.items()))


def choose_seed(spec, cfg, tok_size, prompt_ids):
    for t in range(MAX_SEED_TRIES):
        seed = spec["seed_base"] + t
        model = build_model(cfg, seed, tok_size)
        if not screen(model, prompt_ids):
            log(f"  {spec['name']}: seed {seed}: rejected")
            continue
        _, m, rec = evaluate(model, prompt_ids)
        ok = m > MIN_GREEDY_MARGIN and rec.min_gap > MIN_ROUTER_MARGIN
        log(f"  {spec['name']}: seed {seed}: greedy {m:.5f} router {rec.min_gap:.3g} "
            f"(group {rec.min_group_gap:.3g}, expert {rec.min_expert_gap:.3g}){'  <- accepted' if ok else ''}")
        if ok:
            return seed, model
    raise SystemExit(f"no seed satisfied the margins for {spec['name']}")


README_BEGIN = "<!-- make_tiny_deepseek_v2.py: begin -->"
README_END = "<!-- make_tiny_deepseek_v2.py: end -->"


def write_readme_section(summary, versions):
    """Replace (or append) this script's section of README.md (run after make_tiny_models.py, which rewrites it)."""
    order = [m["name"] for m in MODELS]
    margins = "\n".join(
        f"| `{n}` | {summary[n]['seed']} | {summary[n]['margin']:.6f} | {summary[n]['router']:.6f} | "
        f"{'n/a (n_group 1)' if summary[n]['group'] == math.inf else format(summary[n]['group'], '.6f')} | "
        f"{summary[n]['expert']:.6f} |" for n in order)
    files = "\n".join(f"| `{n}/{f.name}` | {f.stat().st_size:,} |" for n in order
                      for f in sorted((HERE / n).iterdir()))
    text = f"""{README_BEGIN}
## DeepSeek-V2 / DeepSeek-V2-Lite checkpoints (`make_tiny_deepseek_v2.py`)

Built by `make_tiny_deepseek_v2.py` (run it **after** `make_tiny_models.py`, which rewrites this README and builds the
tokenizer): `DeepseekV2ForCausalLM` / `DeepseekV2Config` from transformers {versions['transformers']}, eager attention,
eager experts. MLA attention, **softmax** routing without bias, shared experts. Tokenizer, `tokenizer_config.json`
(Qwen3 chat template) and `generation_config.json` are copied from `qwen3-moe-tiny` (`reference.json` has
`"chat": []`). Weights bf16 (linear / embedding ~ N(0, {INIT_STD}^2), every RMSNorm incl. `q_a_layernorm` /
`kv_a_layernorm` ~ 1 + N(0, {NORM_STD}^2)); only parameters are generated (the rotary `inv_freq` buffers are
transformers' own). vocab_size 2048 (rows 2000.. zero). Single `model.safetensors` each, Hub layout (one tensor per
expert: `model.layers.{{l}}.mlp.experts.{{e}}.{{gate,up,down}}_proj.weight`). config.json uses the **older Hub spelling
of deepseek-ai/DeepSeek-V2-Lite's config.json** (`rope_theta`, `rope_scaling`, `torch_dtype`, `n_routed_experts`,
`moe_layer_freq: 1`, `topk_method`, `scoring_func: "softmax"`, `n_group`, `topk_group`, `aux_loss_alpha`,
`seq_aux`, ...; no `auto_map`); `deepseek-v2-tiny` additionally has `ep_size: 1`, as DeepSeek-V2 (236B)'s
config.json does (V2-Lite's has no `ep_size`).

| dir | details |
|---|---|
| `deepseek-v2-lite-tiny` | DeepSeek-V2-Lite style. hidden 64, 3 layers, `first_k_dense_replace: 1` (layer 0 dense MLP, intermediate 128); 8 routed experts **top-2**, `topk_method: "greedy"`, `n_group: 1`, `topk_group: 1`, `n_shared_experts: 2` (one shared MLP of width `moe_intermediate_size * n_shared_experts` = 64), `moe_intermediate_size: 32`, `norm_topk_prob: false`, `routed_scaling_factor: 1.0`; MLA: 4 heads, **`q_lora_rank: null`** (plain `self_attn.q_proj` [96, 64]), `kv_lora_rank: 32`, `qk_nope_head_dim: 16`, `qk_rope_head_dim: 8`, `v_head_dim: 16`; `rope_theta: 10000`, `rope_scaling: {json.dumps(YARN_LITE)}` (V2-Lite's real mscale values), max_position_embeddings 4096 |
| `deepseek-v2-tiny` | DeepSeek-V2 (236B) style. Same sizes, but **`q_lora_rank: 48`** (`q_a_proj` [48, 64], `q_a_layernorm` [48], `q_b_proj` [96, 48]); 8 routed experts **top-3**, **`topk_method: "group_limited_greedy"`, `n_group: 4`, `topk_group: 2`**, `n_shared_experts: 2`, `norm_topk_prob: false`, **`routed_scaling_factor: 4.0`** (real V2: 16 with 160 experts); `rope_theta: 10000`, **`rope_scaling: null`** (plain RoPE); `ep_size: 1` |

Tensor names are those of the DeepSeek-V3 fixtures above minus `mlp.gate.e_score_correction_bias` (V2 has no router
bias); shared experts `mlp.shared_experts.{{gate,up}}_proj.weight` [64, 64], `mlp.shared_experts.down_proj.weight` [64, 64].

RoPE (transformers `apply_rotary_emb`): only the `qk_rope_head_dim` = 8 slice of q and of `kv_a_proj_with_mqa`'s
last 8 outputs is rotated, as complex numbers over **adjacent pairs** (x0,x1),(x2,x3)... (interleaved, like
`rope_interleave: true` in V3). DeepSeek's own Hub code de-interleaves q_pe / k_pe and applies rotate_half, which
permutes q and k identically and gives the same attention scores. YaRN (lite only) as transformers computes it;
cos/sin `attention_factor` = mscale(4, 0.707) / mscale(4, 0.707) = 1.0; softmax scale
`qk_head_dim^-0.5 * mscale(4, mscale_all_dim)^2` with mscale(s, m) = 0.1 m ln(s) + 1 (= 24^-0.5 * 1.0980^2).
Without `rope_scaling` the scale is plain `qk_head_dim^-0.5`.

Routing (transformers `DeepseekV2TopkRouter`): scores = softmax(x W_gate^T) in fp32 over all experts.
`greedy`: plain top-k. `group_limited_greedy`: group score = **max** score in each group (V3 sums the top-2),
keep the `topk_group` best groups, scores outside them set to 0, top-k. Weights = the chosen **softmax scores,
not renormalised**, times `routed_scaling_factor`; plus the shared experts (unweighted). transformers ignores
`norm_topk_prob` for V2 (the router drops it; DeepSeek's Hub code would renormalise if it were true — it is false in
every real V2 config and here), `moe_layer_freq` (MoE on every layer >= `first_k_dense_replace`) and
`scoring_func`.

### reference.json

Same schema as `deepseek-v3-tiny/reference.json` (`chat: []`), with `min_router_group_margin` (gap between the
`topk_group`-th and next group score; null for `n_group: 1`), `min_router_expert_margin` (gap between the k-th and
(k+1)-th softmax score, inside the selected groups), `min_router_margin` = min of both, `architecture`,
`config_model_type`, `rope_parameters` (as transformers parsed them). Computed in float32 by
`DeepseekV2ForCausalLM.from_pretrained(dir, dtype=float32, attn_implementation="eager",
experts_implementation="eager")`, checked bit-identical to the in-memory model and to a fresh model loaded from the
per-expert tensors fused by hand (`load_state_dict`, strict). Seeds were searched so that greedy argmax (> 0.01) and
every routing decision (> 1e-4) are not decided by float noise:

| model | seed | min greedy margin | min router margin | min group margin | min expert margin |
|---|---|---|---|---|---|
{margins}

| file | bytes |
|---|---|
{files}
{README_END}
"""
    md.replace_readme_section(README_BEGIN, README_END, text)


def main():
    import safetensors
    import tokenizers
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, DeepseekV2ForCausalLM

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)
    versions = dict(transformers=transformers.__version__, torch=torch.__version__,
                    tokenizers=tokenizers.__version__, safetensors=safetensors.__version__)
    log("versions:", versions)
    hf_tok = AutoTokenizer.from_pretrained(str(md.TOK_SRC))
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
        sd = mt.hub_state_dict(model, cfg)            # bf16, experts split per expert
        assert not any("experts.gate_up_proj" in k or k.endswith("experts.down_proj") for k in sd)
        md.copy_tokenizer(d)
        md.save(sd, d)
        cfg.save_pretrained(str(d))
        v5 = json.loads((d / "config.json").read_text())
        cfg_json = legacy_config(spec, v5)
        write_json(d / "config.json", cfg_json)

        loaded = load_file(str(d / "model.safetensors"))
        assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
        assert all(v.dtype == torch.bfloat16 for v in loaded.values())

        # (a) transformers' own loader (config.json in the old spelling, per-expert tensors)
        reloaded, info = DeepseekV2ForCausalLM.from_pretrained(
            str(d), output_loading_info=True, dtype=torch.float32, attn_implementation="eager",
            experts_implementation="eager")
        reloaded.eval()
        bad = {k: v for k, v in info.items() if v}
        assert not bad, f"loading info: {info}"
        msd, rsd = model.state_dict(), reloaded.state_dict()
        assert set(msd) == set(rsd)
        for k in msd:
            assert rsd[k].dtype == torch.float32 and torch.equal(msd[k], rsd[k]), f"param mismatch {k}"
        for (n1, b1), (n2, b2) in zip(model.named_buffers(), reloaded.named_buffers()):
            assert n1 == n2 and torch.equal(b1, b2), f"buffer mismatch {n1}"
        rc = reloaded.config
        rp = dict(rc.rope_parameters)
        log("  reloaded rope_parameters:", rp)
        assert rp["rope_theta"] == spec["rope_theta"]
        if spec["rope_scaling"]:
            assert rp["rope_type"] == "yarn" and rp["factor"] == 4.0 and rp["mscale_all_dim"] == 0.707
        else:
            assert rp.get("rope_type", "default") == "default"
        for k, v in spec["shapes"].items():
            if k == "norm_topk_prob":
                continue          # DeepseekV2Config keeps it, the router ignores it
            assert getattr(rc, k) == v, (k, getattr(rc, k), v)
        for layer in reloaded.model.layers:
            att = layer.self_attn
            want = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
            want = want ** -0.5
            if spec["rope_scaling"]:
                ms = 0.1 * spec["rope_scaling"]["mscale_all_dim"] * math.log(spec["rope_scaling"]["factor"]) + 1.0
                want *= ms * ms
            assert abs(att.scaling - want) < 1e-12, (att.scaling, want)
        assert reloaded.model.rotary_emb.attention_scaling == 1.0

        # (b) hand-fused per-expert tensors -> fresh model (load_state_dict, strict)
        manual = build_model(cfg, seed + 1, tok_size)
        manual.load_state_dict(md.to_model_state_dict({k: v.float() for k, v in loaded.items()}, manual),
                               strict=True)
        manual.eval()

        results_mem, _, _ = evaluate(model, prompt_ids)
        results_man, _, _ = evaluate(manual, prompt_ids)
        results, margin, rec = evaluate(reloaded, prompt_ids)
        for other in (results_mem, results_man):
            for a, b in zip(other, results):
                for la, lb in zip(a["all_logits"], b["all_logits"]):
                    assert torch.equal(la, lb), "reloaded logits differ"
        assert margin > MIN_GREEDY_MARGIN and rec.min_gap > MIN_ROUTER_MARGIN
        extra = {"architecture": "DeepseekV2ForCausalLM", "config_model_type": "deepseek_v2",
                 "rope_parameters": rp}
        ref = md.make_reference(name, seed, results, margin, rec, hf_tok, prompt_ids, versions, ids, extra)
        write_json(d / "reference.json", ref, indent=1)
        summary[name] = dict(seed=seed, margin=margin, router=rec.min_gap, group=rec.min_group_gap,
                             expert=rec.min_expert_gap, config=cfg_json)
        log(f"  wrote {name}: seed {seed} margin {margin:.6f} router {rec.min_gap:.6f}")
        for f in sorted(d.iterdir()):
            assert f.stat().st_size < 1_000_000, f

    write_readme_section(summary, versions)
    log("done")


if __name__ == "__main__":
    main()
