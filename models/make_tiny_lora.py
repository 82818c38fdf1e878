#!/usr/bin/env python3
"""Build ember's tiny PEFT LoRA adapter fixtures (deterministic, offline) on the tiny base checkpoints.

Produces, under models/lora/ (run AFTER make_tiny_models.py and make_tiny_deepseek.py):
  qwen3-tiny-attn-r8/            qwen3-tiny, q/k/v/o_proj, r 8, alpha 16 (tensors stored float32)
  qwen3-tiny-mlp-r4-rslora/      qwen3-tiny, gate/up/down_proj, r 4, alpha 8, use_rslora, rank/alpha_pattern
  qwen3-tiny-all-r16/            qwen3-tiny, all linear layers via a regex target_modules string, r 16
  qwen3-moe-tiny-experts/        qwen3-moe-tiny, q/v_proj + fused experts via target_parameters (peft ParamWrapper)
  deepseek-v3-tiny-mla/          deepseek-v3-tiny, MLA projections + shared experts + layer-0 dense MLP, r 8
  FORMAT.md                      tensor names / shapes / config fields / math of every adapter

Every adapter is created with peft (LoraConfig + get_peft_model + save_pretrained), so the directory holds exactly
what peft writes: adapter_config.json + adapter_model.safetensors. peft initialises lora_B to zero; here both A and
B are overwritten with seeded N(0, std^2) values rounded to bf16. Next to each: reference.json (float32 transformers
+ peft outputs, the base models' reference.json schema, plus base_model / mean_abs_delta_vs_base / adapter fields),
computed from the SAVED files (PeftModel.from_pretrained on a fresh base) and checked bit-identical to the in-memory
model; the LoRA math documented in FORMAT.md is checked independently by merging the saved tensors by hand.

Usage:  /work/venv/bin/python models/make_tiny_lora.py      (needs `pip install peft`; written for peft 0.21.2)
"""
import contextlib
import copy
import json
import math
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # peft's save_pretrained otherwise probes the Hub for the base config

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_tiny_deepseek as ds  # noqa: E402
import make_tiny_models as mt  # noqa: E402

OUT = HERE / "lora"
MIN_GREEDY_MARGIN = 1e-2
MIN_ROUTER_MARGIN = 1e-4
MIN_MEAN_ABS_DELTA = 0.05
MAX_SEED_TRIES = 200
MAX_ADAPTER_BYTES = 200_000
MERGE_TOL = 2e-3                 # hand-merged (W + s*B@A) vs peft (unmerged) logits, max abs difference

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
MLA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]

ADAPTERS = [
    dict(name="qwen3-tiny-attn-r8", base="qwen3-tiny", kind="dense", seed_base=20000, rel=0.1,
         save_dtype=torch.float32,
         config=dict(r=8, lora_alpha=16, target_modules=ATTN)),
    dict(name="qwen3-tiny-mlp-r4-rslora", base="qwen3-tiny", kind="dense", seed_base=21000, rel=0.1,
         save_dtype=torch.bfloat16,
         config=dict(r=4, lora_alpha=8, use_rslora=True, target_modules=MLP,
                     rank_pattern={"layers.1.mlp.down_proj": 2}, alpha_pattern={"layers.1.mlp.down_proj": 3})),
    dict(name="qwen3-tiny-all-r16", base="qwen3-tiny", kind="dense", seed_base=22000, rel=0.1,
         save_dtype=torch.bfloat16,
         config=dict(r=16, lora_alpha=32,
                     target_modules=r".*\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))")),
    dict(name="qwen3-moe-tiny-experts", base="qwen3-moe-tiny", kind="moe", seed_base=23025,  # search began at 23000; 23025 was the first seed accepted
         rel=0.1,
         save_dtype=torch.bfloat16,
         config=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                     rank_pattern={"mlp.experts.down_proj": 2}, alpha_pattern={"mlp.experts.down_proj": 6})),
    dict(name="deepseek-v3-tiny-mla", base="deepseek-v3-tiny", kind="deepseek", seed_base=24000, rel=0.1,
         save_dtype=torch.bfloat16, bypass_v5_moe_remap=True,
         config=dict(r=8, lora_alpha=16, target_modules=MLA + MLP)),
]

log = mt.log
write_json = mt.write_json


# ------------------------------------------------------------------ peft helpers ----------------------------------

@contextlib.contextmanager
def no_v5_moe_remap(active=True):
    """peft >= 0.18 with transformers 5 rewrites, for MoE model types that have a v4->v5 checkpoint conversion
    (qwen3_moe, deepseek_v3, mixtral, ...), every target_modules entry named gate_proj / up_proj / down_proj (list
    entries by suffix, regex strings after resolving them to leaf names) into target_parameters gate_up_proj /
    down_proj of the ROUTED experts (and drops them from target_modules), and converts the adapter state dict on load.
    That makes shared_experts.* and the dense layer-0 MLP of DeepSeek-V3 unreachable. This context disables both
    conversions (peft imports them lazily from this module, so patching the module attributes is enough)."""
    if not active:
        yield
        return
    import peft.utils.transformers_weight_conversion as twc
    saved = (twc.convert_peft_config_for_transformers, twc.convert_peft_adapter_state_dict_for_transformers)
    twc.convert_peft_config_for_transformers = lambda *a, **k: None
    twc.convert_peft_adapter_state_dict_for_transformers = (
        lambda model, peft_config, adapter_state_dict, adapter_name="default": adapter_state_dict)
    try:
        yield
    finally:
        twc.convert_peft_config_for_transformers, twc.convert_peft_adapter_state_dict_for_transformers = saved


def model_cls(kind):
    from transformers import DeepseekV3ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM
    return {"dense": Qwen3ForCausalLM, "moe": Qwen3MoeForCausalLM, "deepseek": DeepseekV3ForCausalLM}[kind]


def load_base(spec):
    """fp32, eager attention, eager experts -- as make_tiny_models / make_tiny_deepseek load their references.
    Loaded by the RELATIVE path (cwd = models/) so adapter_config.json's base_model_name_or_path is e.g.
    "qwen3-tiny" rather than an absolute path of this machine."""
    kwargs = dict(dtype=torch.float32, attn_implementation="eager")
    if spec["kind"] != "dense":
        kwargs["experts_implementation"] = "eager"
    cwd = os.getcwd()
    os.chdir(HERE)
    try:
        m = model_cls(spec["kind"]).from_pretrained(spec["base"], **kwargs)
    finally:
        os.chdir(cwd)
    m.eval()
    return m


def evaluate(spec, model, prompt_ids):
    """-> results, min greedy margin, router info dict (None for dense)."""
    if spec["kind"] == "deepseek":
        results, margin, rec = ds.evaluate(model, prompt_ids)
        return results, margin, dict(min_router_margin=rec.min_gap,
                                     min_router_group_margin=None if rec.min_group_gap == math.inf
                                     else rec.min_group_gap,
                                     min_router_expert_margin=rec.min_expert_gap)
    results, margin, router = mt.evaluate(model, prompt_ids)
    return results, margin, (None if spec["kind"] == "dense" else dict(min_router_margin=router))


def evaluate_fail_fast(spec, model, prompt_ids):
    """Seed-search evaluation: prompts shortest first, stop at the first greedy / router margin below target.
    Returns None on rejection, else what evaluate() returns (same numbers: every prompt is run independently)."""
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results = [None] * len(prompt_ids)
    router = None
    for i in order:
        res, margin, rt = evaluate(spec, model, [prompt_ids[i]])
        if margin <= MIN_GREEDY_MARGIN or (rt is not None and rt["min_router_margin"] <= MIN_ROUTER_MARGIN):
            return None
        results[i] = res[0]
        if rt is not None:
            router = rt if router is None else {
                k: (None if rt[k] is None or router[k] is None else min(rt[k], router[k])) for k in rt}
    return results, min(min(r["margins"]) for r in results), router


def lora_params(model):
    return sorted(((n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n),
                  key=lambda kv: kv[0])


def nominal_std(spec):
    """std of both A and B: |s * B A x| ~ rel * |W x| for W ~ N(0, 0.2^2), i.e. s * std^2 * sqrt(r) ~ rel * 0.2."""
    c = spec["config"]
    r, alpha = c["r"], c["lora_alpha"]
    s = alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r
    return math.sqrt(spec["rel"] * mt.INIT_STD / (s * math.sqrt(r)))


def randomize(model, seed, std):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lora_params(model):
            p.copy_((std * torch.randn(p.shape, generator=gen)).to(torch.bfloat16).to(torch.float32))


def mean_abs_delta(results, base_results):
    d = []
    for r, b in zip(results, base_results):
        for x, y in zip(r["prompt_logprobs"][1:], b["prompt_logprobs"][1:]):
            d.append(abs(x - y))
    return sum(d) / len(d)


# ------------------------------------------------------------------ independent merge (FORMAT.md math) -----------

def pattern_value(patterns, key, default):
    """peft.utils.other.get_pattern_key: first pattern p (dict order) with re.match(rf"(.*\\.)?({p})$", key)."""
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?({p})$", key):
            return v
    return default


def manual_merge(base_model, adapter_dir):
    """Apply the adapter by hand from adapter_config.json + adapter_model.safetensors only (no peft):
    W += scaling * B @ A (per expert for fused expert parameters). Returns {module/param: (r, alpha, scaling)}."""
    from safetensors.torch import load_file
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    sd = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert not cfg.get("fan_in_fan_out") and cfg.get("bias", "none") == "none" and not cfg.get("modules_to_save")
    params = dict(base_model.named_parameters())
    applied = {}
    prefix = "base_model.model."
    for ka in sorted(k for k in sd if k.endswith(".lora_A.weight")):
        assert ka.startswith(prefix)
        path = ka[len(prefix):-len(".lora_A.weight")]
        A, B = sd[ka].float(), sd[ka.replace(".lora_A.", ".lora_B.")].float()
        if path.endswith(".experts") or ".experts.base_layer" in path:
            # fused expert parameter wrapped by lora.ParamWrapper. Nesting: the parameters of the experts module are
            # wrapped in registration order (gate_up_proj, then down_proj); each later wrapper wraps the previous
            # one, so the LAST targeted parameter is the outermost ("experts.lora_A"), earlier ones sit under
            # ".base_layer" (one level per later wrapper).
            depth = path.count(".base_layer")
            mod = path.replace(".base_layer", "")
            targeted = [p for p in ("gate_up_proj", "down_proj")
                        if any(f"{mod}.{p}".endswith(t) for t in cfg["target_parameters"])]
            pname = targeted[len(targeted) - 1 - depth]
            W = params[f"{mod}.{pname}"]                       # gate_up [E, 2I, H] or down [E, H, I]
            E = W.shape[0]
            assert A.shape[0] % E == 0
            r = A.shape[0] // E
            key = f"{mod}.{pname}"
            assert A.shape == (r * E, W.shape[2]) and B.shape == (W.shape[1], r * E), (key, A.shape, B.shape)
        else:
            W = params[path + ".weight"]
            r = A.shape[0]
            key = path
            assert A.shape == (r, W.shape[1]) and B.shape == (W.shape[0], r)
        r_cfg = pattern_value(cfg.get("rank_pattern") or {}, key, cfg["r"])
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, key, cfg["lora_alpha"])
        assert r_cfg == r, (key, r_cfg, r)
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        with torch.no_grad():
            if W.dim() == 3:
                for e in range(E):
                    # A rows are expert-major (e*r + k); B columns are rank-major (k*E + e)
                    W[e] += scaling * (B[:, e::E] @ A[e * r:(e + 1) * r])
            else:
                W += scaling * (B @ A)
        applied[key] = (r, alpha, scaling)
    return applied, cfg, sd


# ------------------------------------------------------------------ main --------------------------------------------

def reference(spec, seed, results, margin, router, hf_tok, prompt_ids, versions, ids, mad, base_ref, extra):
    if spec["kind"] == "deepseek":
        class R:  # adapter for ds.make_reference
            min_gap = router["min_router_margin"]
            min_group_gap = router["min_router_group_margin"] if router["min_router_group_margin"] is not None \
                else math.inf
            min_expert_gap = router["min_router_expert_margin"]
        keep = {k: base_ref[k] for k in ("architecture", "config_model_type", "rope_parameters") if k in base_ref}
        ref = ds.make_reference(spec["name"], seed, results, margin, R, hf_tok, prompt_ids, versions, ids,
                                {**keep, **extra})
    else:
        prompts_out = []
        for text, pid, r in zip(mt.PROMPTS, prompt_ids, results):
            prompts_out.append({
                "text": text, "token_ids": pid,
                "prompt_logprobs": r["prompt_logprobs"], "prompt_top_logprobs": r["prompt_top_logprobs"],
                "greedy": {"token_ids": r["greedy_ids"], "logprobs": r["greedy_logprobs"],
                           "top_logprobs": r["greedy_top"],
                           "text": hf_tok.decode(r["greedy_ids"], skip_special_tokens=False)},
            })
        ref = {"model": spec["name"], "dtype": "float32", "transformers_version": versions["transformers"],
               "torch_version": versions["torch"], "min_greedy_margin": margin,
               "min_router_margin": None if router is None else router["min_router_margin"],
               "seed": seed, "greedy_steps": mt.GREEDY_STEPS, "special_token_ids": ids}
        ref.update(extra)
        ref["prompts"] = prompts_out
        ref["chat"] = []
    # put the adapter-specific keys right after "model"
    head = {"model": ref["model"], "base_model": spec["base"], "adapter_dir": f"lora/{spec['name']}",
            "peft_version": versions["peft"], "mean_abs_delta_vs_base": mad}
    return {**head, **{k: v for k, v in ref.items() if k not in head}}


def build(spec, versions, hf_tok, prompt_ids, ids, base_cache):
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    name = spec["name"]
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    log(f"== {name}")
    bypass = spec.get("bypass_v5_moe_remap", False)

    if spec["base"] not in base_cache:
        base = load_base(spec)
        base_results, bm, brouter = evaluate(spec, base, prompt_ids)
        base_ref = json.loads((HERE / spec["base"] / "reference.json").read_text())
        for r, p in zip(base_results, base_ref["prompts"]):     # same process as the base fixture scripts
            assert r["prompt_logprobs"] == p["prompt_logprobs"] and r["greedy_ids"] == p["greedy"]["token_ids"]
        base_cache[spec["base"]] = (base, base_results, base_ref)
    base, base_results, base_ref = base_cache[spec["base"]]

    std = nominal_std(spec)
    chosen = None
    for t in range(MAX_SEED_TRIES):
        seed = spec["seed_base"] + t
        with no_v5_moe_remap(bypass):
            pm = get_peft_model(copy.deepcopy(base), LoraConfig(lora_dropout=0.0, **copy.deepcopy(spec["config"])))
        pm.eval()
        randomize(pm, seed, std)
        ev = evaluate_fail_fast(spec, pm, prompt_ids)
        if ev is None:
            log(f"  seed {seed}: rejected (margin)")
            continue
        results, margin, router = ev
        mad = mean_abs_delta(results, base_results)
        rmin = None if router is None else router["min_router_margin"]
        ok = margin > MIN_GREEDY_MARGIN and mad > MIN_MEAN_ABS_DELTA and (rmin is None or rmin > MIN_ROUTER_MARGIN)
        log(f"  seed {seed}: std {std:.4f} greedy margin {margin:.5f} router {rmin} mean|dlp| {mad:.4f}"
            f"{'  <- accepted' if ok else ''}")
        if ok:
            chosen = (seed, pm, results, margin, router, mad)
            break
    if chosen is None:
        raise SystemExit(f"no seed satisfied the margins for {name}")
    seed, pm, results, margin, router, mad = chosen

    # the peft config as peft resolved it (e.g. the regex string stays a string; lists become sets)
    pcfg = pm.peft_config["default"]
    n_lora = len(lora_params(pm))

    # ---- save exactly what peft writes (tensors cast to the storage dtype; values are bf16-exact anyway) --------
    for f in d.glob("adapter_*"):
        f.unlink()
    with torch.no_grad():
        for _, p in lora_params(pm):
            p.data = p.data.to(spec["save_dtype"])
    cwd = os.getcwd()
    os.chdir(HERE)                  # base_model_name_or_path is relative to models/
    try:
        pm.save_pretrained(str(d))
    finally:
        os.chdir(cwd)
    (d / "README.md").unlink(missing_ok=True)      # peft's boilerplate model card (not needed by a loader)
    files = sorted(f.name for f in d.iterdir() if f.name.startswith("adapter_"))
    assert files == ["adapter_config.json", "adapter_model.safetensors"], files
    size = (d / "adapter_model.safetensors").stat().st_size
    assert size < MAX_ADAPTER_BYTES, size
    saved = load_file(str(d / "adapter_model.safetensors"))
    assert len(saved) == n_lora and all(v.dtype == spec["save_dtype"] for v in saved.values())
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in saved)
    acfg = json.loads((d / "adapter_config.json").read_text())

    # ---- reload from the SAVED files on a fresh base; must reproduce the in-memory logits exactly ---------------
    with no_v5_moe_remap(bypass):
        fresh = load_base(spec)
        rm = PeftModel.from_pretrained(fresh, str(d))
    rm.eval()
    rparams = dict(lora_params(rm))
    assert len(rparams) == n_lora and all(p.dtype == torch.float32 for p in rparams.values())
    for k, v in saved.items():      # every saved tensor landed in the model
        mk = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(rparams[mk], v.float()), k
    rresults, rmargin, rrouter = evaluate(spec, rm, prompt_ids)
    for a, b in zip(results, rresults):
        for la, lb in zip(a["all_logits"], b["all_logits"]):
            assert torch.equal(la, lb), "reloaded adapter logits differ from the in-memory model"
    assert rmargin == margin and rrouter == router

    # ---- independent check of the documented math: merge by hand into a fresh fp32 base --------------------------
    merged = load_base(spec)
    applied, _, _ = manual_merge(merged, d)
    mresults, mmargin, _ = evaluate(spec, merged, prompt_ids)
    max_diff = 0.0
    for a, b in zip(rresults, mresults):
        assert a["greedy_ids"] == b["greedy_ids"]
        for la, lb in zip(a["all_logits"], b["all_logits"]):
            max_diff = max(max_diff, float((la - lb).abs().max()))
    assert max_diff < MERGE_TOL, max_diff
    log(f"  hand-merged model vs peft: max |dlogit| {max_diff:.2e}, greedy identical")

    # ---- vanilla peft on the DeepSeek adapter: what happens without the bypass -----------------------------------
    extra = {}
    if bypass:
        import warnings
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            vm = PeftModel.from_pretrained(load_base(spec), str(d))
        vcfg = vm.peft_config["default"]
        vnames = [n for n, _ in lora_params(vm)]
        shared = [n for n in vnames if "shared_experts" in n or ".layers.0.mlp." in n]
        routed = [n for n in vnames if ".mlp.experts." in n]
        msgs = sorted({str(x.message).split("\n")[0][:160] for x in w if "adapter" in str(x.message).lower()})
        log(f"  vanilla peft reload: target_modules {sorted(vcfg.target_modules)} target_parameters "
            f"{sorted(vcfg.target_parameters or [])}; MLP/shared lora params {len(shared)}, routed-expert lora "
            f"params {len(routed)}; warnings {msgs}")
        extra["peft_v5_moe_remap_bypassed"] = True
        extra["note"] = (
            "peft " + versions["peft"] + " + transformers 5 remaps gate_proj/up_proj/down_proj targets of MoE model "
            "types (deepseek_v3, qwen3_moe, ...) to the ROUTED experts' fused parameters (target_parameters "
            "gate_up_proj/down_proj, r and alpha doubled for gate_up_proj) and drops them from target_modules, so "
            "shared_experts.* and the dense layer-0 MLP cannot be targeted with vanilla peft. This adapter was created "
            "and reloaded with that remapping disabled (make_tiny_lora.no_v5_moe_remap); its files are ordinary peft "
            "Linear LoRA tensors (mlp.shared_experts.*_proj, layer-0 mlp.*_proj). Loading it with vanilla "
            "PeftModel.from_pretrained silently drops those MLP tensors (and adds zero-B LoRA on the routed experts)."
            f" Vanilla reload observed here: {len(shared)} MLP/shared LoRA params, {len(routed)} routed-expert LoRA "
            "params.")
    extra["lora_scalings"] = {k: v[2] for k, v in sorted(applied.items())}
    extra["hand_merge_max_abs_logit_diff"] = max_diff

    ref = reference(spec, seed, results, margin, router, hf_tok, prompt_ids, versions, ids, mad, base_ref, extra)
    write_json(d / "reference.json", ref, indent=1)
    log(f"  wrote {name}: seed {seed}, margin {margin:.5f}, router {None if router is None else router}, "
        f"mean|dlp| {mad:.4f}, adapter {size} bytes")
    return dict(name=name, base=spec["base"], seed=seed, margin=margin, router=router, mad=mad, size=size,
                std=std, tensors={k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in saved.items()},
                config=acfg, applied=applied, max_diff=max_diff, spec=spec,
                resolved_target_modules=pcfg.target_modules)


# ------------------------------------------------------------------ docs ---------------------------------------------

def _grouped_tensors(tensors):
    """Collapse layer indices: name with {l} -> (shape, dtype, [layers])."""
    groups = {}
    for k, (shape, dt) in tensors.items():
        m = re.search(r"\.layers\.(\d+)\.", k)
        g = k if not m else k[:m.start()] + ".layers.{l}." + k[m.end():]
        groups.setdefault((g, tuple(shape), dt), []).append(int(m.group(1)) if m else None)
    out = []
    for (g, shape, dt), layers in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[1])):
        ls = sorted(x for x in layers if x is not None)
        out.append(f"| `{g}` | {'' if not ls else ', '.join(map(str, ls))} | {list(shape)} | {dt.upper()[:1] + dt[1:] if False else dt} |")
    return out


CONFIG_FIELDS = ["r", "lora_alpha", "use_rslora", "target_modules", "target_parameters", "rank_pattern",
                 "alpha_pattern", "modules_to_save", "fan_in_fan_out", "bias", "lora_dropout", "use_dora",
                 "layers_to_transform", "base_model_name_or_path"]


def write_format_md(summary, versions):
    parts = [f"""# LoRA adapter fixtures: file format and math

Generated by `models/make_tiny_lora.py` with peft {versions['peft']}, transformers {versions['transformers']},
torch {versions['torch']}. Every adapter directory holds exactly what `PeftModel.save_pretrained` writes --
`adapter_config.json` and `adapter_model.safetensors` -- plus `reference.json` (float32 reference outputs, see
`models/README.md`).

## Key naming (all adapters)

Saved tensor key = `base_model.model.` + the module path inside the transformers model + `.lora_A.weight` or
`.lora_B.weight` (the adapter name `default` that peft uses in memory, `...lora_A.default.weight`, is stripped on
save). E.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. Strip `base_model.model.` to get the
base-model module path (`model.layers.0.self_attn.q_proj`, whose weight is `model.layers.0.self_attn.q_proj.weight`
in the checkpoint). No other tensors are saved (`modules_to_save: null`, `bias: "none"`, no DoRA magnitude vectors).
The safetensors header metadata is `{{"format": "pt"}}`.

## Plain linear layers (`target_modules`)

For a targeted `nn.Linear` with weight `W [out, in]` (y = x W^T):

```
A = <path>.lora_A.weight   [r, in]
B = <path>.lora_B.weight   [out, r]
y = x W^T + scaling * (x A^T) B^T        i.e.  W_eff = W + scaling * B @ A
scaling = lora_alpha / r                 (use_rslora: false)
scaling = lora_alpha / sqrt(r)           (use_rslora: true)
```

`r` and `lora_alpha` are per module: peft looks the module path (without `base_model.model.`, e.g.
`model.layers.1.mlp.down_proj`) up in `rank_pattern` / `alpha_pattern`: the first key `p` (JSON order) with
`re.match(rf"(.*\.)?({{p}})$", path)` wins, else the global `r` / `lora_alpha`. (`r` always equals `A.shape[0]`, but
`alpha` must come from the config.) rslora uses the module's own r: `alpha_m / sqrt(r_m)`.

Which modules are targeted: `target_modules` as a JSON **list** matches a module whose path equals an entry or ends
with `.` + entry; as a JSON **string** it is a regex that must `re.fullmatch` the whole module path. A loader does not
need to evaluate these: the set of saved `lora_A` keys is authoritative (peft errors at load time on missing keys only as
a warning).

Fields that matter and their values in these fixtures: `fan_in_fan_out: false` (A/B are in nn.Linear [out, in]
orientation; `true` is for GPT-2 Conv1D only and would transpose), `bias: "none"` (no LoRA bias tensors),
`lora_dropout: 0.0` (inference: irrelevant), `use_dora: false`, `modules_to_save: null` (no full replacement tensors),
`layers_to_transform: null`, `init_lora_weights: true` (irrelevant when loading: the weights are overwritten).
`base_model_name_or_path` is the base directory name relative to `models/` (e.g. `qwen3-tiny`).

## Fused MoE experts (`target_parameters`, peft `lora.ParamWrapper`)

transformers 5 stores a Qwen3-MoE / DeepSeek-V3 layer's routed experts as two 3-D `nn.Parameter`s of
`model.layers.{{l}}.mlp.experts` (on disk they are per-expert Hub tensors, see models/README.md):
`gate_up_proj [E, 2I, H]` (rows 0..I-1 = gate_proj, I..2I-1 = up_proj of each expert) and `down_proj [E, H, I]`.
`target_parameters: ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]` (matched as a suffix of
`<module path>.<parameter name>`) wraps each parameter in a `lora.ParamWrapper` (peft/tuners/lora/layer.py):

* **Shapes.** For a 3-D parameter `[E, d1, d2]` peft sets `in = d2`, `out = d1` (the experts module has no
  `is_transposed = True`, so in/out are swapped from the default `[E, in, out]` reading), and creates
  `lora_A = nn.Linear(in, r*E)` -> weight `[r*E, in]` and `lora_B = nn.Linear(r*E, out)` -> weight `[out, r*E]`.
  `r` is the **per-expert** rank: `r = A.shape[0] / E`.
  gate_up_proj: `A [r*E, H]`, `B [2I, r*E]`; down_proj: `A [r*E, I]`, `B [H, r*E]`.
* **Per-expert factors** (`ParamWrapper.get_delta_weight`: `A.reshape(E, r, in)`, `B.reshape(out, r, E)`,
  `einsum("o r e, e r i -> e o i")`):
  ```
  A_e = A[e*r : (e+1)*r, :]        # [r, in]   rows are EXPERT-major   (row  = e*r + k)
  B_e = B[:, e::E]                 # [out, r]  columns are RANK-major (col = k*E + e)   <- note the asymmetry
  delta[e] = scaling * B_e @ A_e   # [out, in] = [d1, d2], added to param[e]
  ```
  gate_up_proj: `delta_gate[e] = scaling * B_e[:I] @ A_e`, `delta_up[e] = scaling * B_e[I:] @ A_e` (gate and up of
  one expert share `A_e`; in per-expert terms this is rank r for each of gate and up with a shared A).
  down_proj: `delta_down[e] = scaling * B_e @ A_e` with `A_e [r, I]`, `B_e [H, r]`.
  Expert e's forward becomes `down_eff[e] @ (silu(gate_eff[e] x) * (up_eff[e] x))` with `*_eff = W + delta`
  (peft applies it by temporarily parametrizing the 3-D parameter as `W + scaling * lhs @ rhs`, i.e. exactly a merge).
* **scaling** = `alpha / r` (or `alpha / sqrt(r)` with `use_rslora`), r = per-expert rank, `rank_pattern` /
  `alpha_pattern` keys are matched against `<module path>.<parameter name>`, e.g.
  `model.layers.0.mlp.experts.down_proj` (that is how `mlp.experts.down_proj` gets its own r/alpha here).
* **Key names / nesting.** Each ParamWrapper adapts one parameter; a second targeted parameter on the same module
  wraps the first wrapper. Parameters are wrapped in registration order (`gate_up_proj`, then `down_proj`), so the
  **last one is outermost**:
  `base_model.model.model.layers.{{l}}.mlp.experts.base_layer.lora_A.weight` / `...lora_B.weight` = **gate_up_proj**,
  `base_model.model.model.layers.{{l}}.mlp.experts.lora_A.weight` / `...lora_B.weight` = **down_proj**.
  (If only one of the two were targeted it would be `mlp.experts.lora_{{A,B}}.weight`.) The parameter name is NOT in
  the key; a loader must use this nesting rule (or `A.shape[1]`: H -> gate_up_proj, I -> down_proj; note that here
  2I == H, so the B shapes alone are ambiguous -- the fixture gives down_proj r 2 / alpha 6 vs gate_up_proj r 4 /
  alpha 8 so that the A shapes and the scalings both differ).
* **Converting to the per-expert (vLLM / transformers-4 peft) layout**, e.g.
  `base_model.model.model.layers.{{l}}.mlp.experts.{{e}}.gate_proj.lora_A.weight [r, H]`:
  gate: `lora_A = A_e`, `lora_B = B_e[:I]`; up: `lora_A = A_e`, `lora_B = B_e[I:]`; down: `lora_A = A_e`,
  `lora_B = B_e` (same r, same alpha). Conversely peft loads a per-expert v4 adapter onto a v5 model
  (`peft/utils/transformers_weight_conversion.py`) by concatenating gate/up A along r (`[E, 2r, H]` -> `[2r*E, H]`)
  and block-diagonalising B (`[2I, 2r*E]`, rank-major), with `rank_pattern`/`alpha_pattern` `.*\.gate_up_proj` set to
  `2r` / `2*alpha` (same alpha/r; NB not the same scaling under rslora).
* **Caveat (peft {versions['peft']} + transformers 5).** For model types with a v4->v5 checkpoint conversion
  (`qwen3_moe`, `deepseek_v3`, `mixtral`, ...), peft rewrites any `target_modules` entry named `gate_proj`, `up_proj`
  or `down_proj` (list entries by suffix, regex strings after resolving them to leaf names) into
  `target_parameters` for the routed experts and **removes** it from `target_modules`; `shared_experts.*` and dense
  MLP layers then get no LoRA. See `deepseek-v3-tiny-mla` below.

## Adapters
"""]
    for s in summary:
        c = s["config"]
        fields = "\n".join(f"| `{k}` | `{json.dumps(c.get(k))}` |" for k in CONFIG_FIELDS)
        scal = sorted({(r, a, sc) for (r, a, sc) in s["applied"].values()})
        scal_md = "; ".join(f"r {r}, alpha {a} -> scaling {sc:.6g}" for r, a, sc in scal)
        by_scaling = {}
        for k, v in s["applied"].items():
            by_scaling.setdefault(v, []).append(re.sub(r"layers\.\d+\.", "layers.{l}.", k))
        scal_detail = "\n".join(f"  * r {r}, alpha {a}, scaling {sc:.6g}: " +
                                ", ".join(f"`{x}`" for x in sorted(set(v)))
                                for (r, a, sc), v in sorted(by_scaling.items()))
        tens = "\n".join(_grouped_tensors(s["tensors"]))
        notes = ADAPTER_NOTES.get(s["name"], "")
        parts.append(f"""
### `{s['name']}` (base `{s['base']}`)

{notes}

adapter_config.json (fields that matter):

| field | value |
|---|---|
{fields}

Scalings actually applied ({scal_md}):
{scal_detail}

Tensors in adapter_model.safetensors ({len(s['tensors'])} tensors, {s['size']:,} bytes; `{{l}}` = layer index):

| key | layers | shape | dtype |
|---|---|---|---|
{tens}
""")
    (OUT / "FORMAT.md").write_text("".join(parts), encoding="utf-8")


ADAPTER_NOTES = {
    "qwen3-tiny-attn-r8": "Attention only, list `target_modules`. Tensors stored **float32** (values are "
                          "bf16-representable); the other adapters store bfloat16. q_proj out = 4 heads x head_dim 32 "
                          "= 128, k/v_proj out = 2 KV heads x 32 = 64, o_proj in = 128.",
    "qwen3-tiny-mlp-r4-rslora": "MLP only, `use_rslora: true` (scaling = alpha / sqrt(r)), and "
                                "`rank_pattern` / `alpha_pattern` `{\"layers.1.mlp.down_proj\": 2 / 3}`: "
                                "`model.layers.1.mlp.down_proj` has r 2 and scaling 3/sqrt(2); every other module "
                                "r 4, scaling 8/sqrt(4) = 4.",
    "qwen3-tiny-all-r16": "All seven linear layers of every decoder layer, `target_modules` as a **regex string** "
                          "(peft `re.fullmatch`es it against the module path; lm_head / embeddings are not matched).",
    "qwen3-moe-tiny-experts": "Attention q_proj / v_proj (plain Linear LoRA, r 4, alpha 8 -> scaling 2) plus the "
                              "routed experts of every layer through `target_parameters` (ParamWrapper, see above): "
                              "gate_up_proj r 4 / alpha 8 (scaling 2), down_proj r 2 / alpha 6 (scaling 3) via "
                              "`rank_pattern` / `alpha_pattern` key `mlp.experts.down_proj`. E = 8, H = 64, I = 32. "
                              "The router (`mlp.gate`) is not adapted, but its input changes (attention LoRA and the "
                              "previous layers' experts), so reference.json's router margins are those of the adapted "
                              "model. Loads with vanilla `PeftModel.from_pretrained` (checked).",
    "deepseek-v3-tiny-mla": "MLA projections `q_a_proj` [48, 64], `q_b_proj` [96, 48], `kv_a_proj_with_mqa` "
                            "[40, 64], `kv_b_proj` [128, 32], `o_proj` [64, 64] of all 3 layers, plus `gate_proj` / "
                            "`up_proj` / `down_proj` = the **dense layer-0 MLP** (`model.layers.0.mlp.*_proj`, "
                            "intermediate 128) and the **shared experts** of layers 1-2 "
                            "(`model.layers.{1,2}.mlp.shared_experts.*_proj`, intermediate 32); routed experts and "
                            "router untouched. All plain Linear LoRA, r 8, alpha 16, scaling 2. **Created and "
                            "reloaded with peft's transformers-5 MoE remapping disabled** "
                            "(`make_tiny_lora.no_v5_moe_remap`): vanilla peft would turn `gate_proj/up_proj/down_proj` "
                            "into routed-expert `target_parameters` (gate_up_proj r 16 / alpha 32) and could not reach "
                            "the shared experts or the dense MLP; loading this adapter with vanilla "
                            "`PeftModel.from_pretrained` silently ignores its MLP tensors. The files themselves are "
                            "ordinary peft Linear-LoRA files (what peft with transformers 4, and vLLM, expect). "
                            "The low-rank path is applied to the **weights**: q_a_proj's LoRA output goes through "
                            "q_a_layernorm, kv_a_proj_with_mqa's LoRA output is split into the latent (first 32 "
                            "rows, then kv_a_layernorm) and the rope part (last 8 rows) like the base output; an "
                            "engine that absorbs kv_b_proj into q / o must absorb `W + scaling * B @ A`.",
}


README_BEGIN = "<!-- make_tiny_lora.py: begin -->"
README_END = "<!-- make_tiny_lora.py: end -->"


def write_readme_section(summary, versions):
    rows = []
    for s in summary:
        c = s["config"]
        tm = c.get("target_modules")
        tm = f"`{tm}`" if isinstance(tm, str) else ", ".join(f"`{x}`" for x in sorted(tm or []))
        tp = ", ".join(f"`{x}`" for x in sorted(c.get("target_parameters") or []))
        router = "n/a" if s["router"] is None else f"{s['router']['min_router_margin']:.6f}"
        rows.append(f"| `lora/{s['name']}` | `{s['base']}` | {tm}{'; params ' + tp if tp else ''} | "
                    f"{c['r']} / {c['lora_alpha']}{' rslora' if c.get('use_rslora') else ''} | {s['seed']} | "
                    f"{s['margin']:.6f} | {router} | {s['mad']:.4f} | {s['size']:,} |")
    text = f"""{README_BEGIN}
## LoRA adapters (`make_tiny_lora.py`, `lora/`)

PEFT LoRA adapters on the tiny bases, written by peft {versions['peft']} itself (`LoraConfig` + `get_peft_model` +
`save_pretrained`: `adapter_config.json` + `adapter_model.safetensors`). Run after `make_tiny_models.py` and
`make_tiny_deepseek.py` (needs `pip install peft`). peft initialises `lora_B` to zero; here every A and B is
N(0, std^2) (seeded, std chosen so that |scaling B A x| ~ 0.1 |W x|), rounded to bf16. `lora/FORMAT.md` lists every
tensor name / shape, the config fields and the exact math (incl. the fused-MoE-expert `ParamWrapper` layout).

`reference.json` (next to each adapter): the base schema above (`chat: []`) computed in float32 by
`PeftModel.from_pretrained(base, adapter_dir)` on the base loaded as its own reference was (`dtype=float32`, eager
attention, eager experts) -- i.e. unmerged LoRA, `y = W x + scaling * B (A x)` -- from the SAVED files, checked
bit-identical to the in-memory model; plus `base_model`, `adapter_dir`, `peft_version`, `mean_abs_delta_vs_base`
(mean over all prompt positions of |logprob(adapter) - logprob(base)| of the actual next prompt token),
`lora_scalings` (module / parameter -> scaling) and `hand_merge_max_abs_logit_diff` (the script also applies the
adapter by hand, `W += scaling * B @ A` per FORMAT.md, and checks greedy tokens identical and logits within
{MERGE_TOL}). Seeds searched for greedy margin > {MIN_GREEDY_MARGIN}, router margin > {MIN_ROUTER_MARGIN} (MoE,
with the adapter applied) and mean |dlogprob| > {MIN_MEAN_ABS_DELTA}.

| adapter | base | targets | r / alpha | seed | min greedy margin | min router margin | mean abs dlogprob | adapter bytes |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

`deepseek-v3-tiny-mla` targets the shared experts and the dense layer-0 MLP, which peft {versions['peft']} with
transformers 5 cannot do by itself (it remaps gate/up/down_proj targets of MoE models to the routed experts): it was
created and reloaded with that remapping disabled; see FORMAT.md.
{README_END}
"""
    ds.replace_readme_section(README_BEGIN, README_END, text)


def summary_from_disk(spec):
    from safetensors.torch import load_file
    d = OUT / spec["name"]
    ref = json.loads((d / "reference.json").read_text())
    applied, cfg, sd = manual_merge(load_base(spec), d)
    router = None
    if spec["kind"] != "dense":
        router = {k: ref.get(k) for k in ("min_router_margin", "min_router_group_margin", "min_router_expert_margin")}
    return dict(name=spec["name"], base=spec["base"], seed=ref["seed"], margin=ref["min_greedy_margin"],
                router=router, mad=ref["mean_abs_delta_vs_base"],
                size=(d / "adapter_model.safetensors").stat().st_size,
                tensors={k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()},
                config=cfg, applied=applied, spec=spec)


def main():
    import peft
    import safetensors
    import tokenizers
    import transformers
    from transformers import AutoTokenizer
    transformers.logging.set_verbosity_error()

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)
    versions = dict(transformers=transformers.__version__, torch=torch.__version__, peft=peft.__version__,
                    tokenizers=tokenizers.__version__, safetensors=safetensors.__version__)
    log("versions:", versions)
    OUT.mkdir(exist_ok=True)
    base_cache = {}
    args = sys.argv[1:]
    docs_only = args == ["--docs"]
    only = set() if docs_only else set(args)
    for spec in ADAPTERS:
        if docs_only or (only and spec["name"] not in only):
            continue
        hf_tok = AutoTokenizer.from_pretrained(str(HERE / spec["base"]))
        ids = {t: hf_tok.convert_tokens_to_ids(t) for t in mt.SPECIAL_TOKENS + mt.EXTRA_ADDED_TOKENS}
        prompt_ids = [hf_tok.encode(t, add_special_tokens=False) for t in mt.PROMPTS]
        build(spec, versions, hf_tok, prompt_ids, ids, base_cache)
    if not only:
        # FORMAT.md / README section from the files on disk (so `--docs` can rebuild them without recomputing)
        for spec in ADAPTERS:
            (OUT / spec["name"] / "README.md").unlink(missing_ok=True)   # peft's boilerplate model card
        summary = [summary_from_disk(spec) for spec in ADAPTERS]
        write_format_md(summary, versions)
        write_readme_section(summary, versions)
    log("done")


if __name__ == "__main__":
    main()
