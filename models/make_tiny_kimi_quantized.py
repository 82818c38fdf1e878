#!/usr/bin/env python3
"""Build ember's kimi-k2-{int4,nvfp4,mxfp4}-tiny fixtures (deterministic, offline): the kimi-k2-tiny architecture
with its routed experts quantized, everything else bf16 (attention, shared experts, dense MLPs, router, embeddings,
lm_head):
  kimi-k2-int4-tiny    as Kimi K2 Thinking ships them: compressed-tensors `pack-quantized` INT4, group 32,
                       symmetric, bf16 scales
  kimi-k2-nvfp4-tiny   compressed-tensors `nvfp4-pack-quantized` (NVFP4A16: e2m1, e4m3 scale per 16, global scale)
  kimi-k2-mxfp4-tiny   compressed-tensors `mxfp4-pack-quantized` (MXFP4A16: e2m1, e8m0 scale per 32)

The experts are quantized and packed by compressed-tensors' own PackedQuantizationCompressor (scales from its
calculate_qparams, the minmax rule); the config's quantization_config is compressed-tensors' QuantizationConfig
serialised. The reference is transformers in float32 running the DEQUANTIZED model: each expert weight is
compressed-tensors' unpack_from_int32 ints times the bf16 scale, in float32 (exact; it rounds to compressed-tensors'
own bf16 decompression bit for bit, which the script checks).

Usage:  pip install compressed-tensors;  python models/make_tiny_kimi_quantized.py [int4|nvfp4|mxfp4 ...]
        (after make_tiny_deepseek.py; all three by default)
        PYTHONPATH=<compressed-tensors 0.12.2> python models/make_tiny_kimi_quantized.py int4-actorder
        kimi-k2-int4-actorder-tiny: int4 with GPTQ's activation order (`actorder: group`, `weight_g_idx`)
"""
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_tiny_deepseek as md  # noqa: E402
import make_tiny_models as mt  # noqa: E402

SPEC = dict(md.MODELS[1], seed_base=6004)      # kimi-k2-tiny's accepted seed first
assert SPEC["model_type"] == "kimi_k2"
MAX_TRIES = 60
WEIGHTS = dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32, dynamic=False,
               observer="minmax")
# What Kimi K2 Thinking's config.json ignores: attention, shared experts, dense MLPs, the LM head.
IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]


def is_routed_expert(name):
    return ".mlp.experts." in name and name.endswith("_proj.weight")


def scheme():
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**WEIGHTS))


def compress(sd):
    """-> (checkpoint tensors, exact float32 dequantized expert weights)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor as C
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    s = scheme()
    out, deq = {}, {}
    for k, w in sd.items():
        if not is_routed_expert(k):
            out[k] = w
            continue
        g = w.float().reshape(w.shape[0], -1, WEIGHTS["group_size"])
        scale, _ = calculate_qparams(g.amin(dim=-1), g.amax(dim=-1), s.weights)
        scale = scale.to(torch.bfloat16)
        comp = C.compress({"weight": w, "weight_scale": scale}, s)
        pre = k[: -len("weight")]
        for n, t in comp.items():
            out[pre + n] = t.contiguous()
        ints = unpack_from_int32(comp["weight_packed"], 4, comp["weight_shape"])
        deq[k] = dequantize(x_q=ints, scale=scale.float(), args=s.weights)
        assert deq[k].dtype == torch.float32
        assert torch.equal(deq[k].to(torch.bfloat16), C.decompress(comp, s)["weight"]), k
        assert (deq[k] - w.float()).abs().max() <= 0.6 * scale.float().max(), k     # half a step (+ clamping of +amax)
    return out, deq


def compress_actorder(sd):
    """-> (checkpoint tensors, exact float32 dequantized expert weights, scheme): INT4 group 32 symmetric with
    GPTQ's activation order (`actorder: group`): each expert weight's columns are grouped in a random order
    and `weight_g_idx` [in] maps every column to its group. Needs compressed-tensors 0.12.x, the last with
    g_idx in its pack-quantized compressor (see make_quantized_tensors.py)."""
    from compressed_tensors.compressors.quantized_compressors.pack_quantized import (
        PackedQuantizationCompressor as C, unpack_from_int32)
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    s = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**WEIGHTS, actorder="group"))
    compressor = C(config=None)
    gen = torch.Generator().manual_seed(7)
    group = WEIGHTS["group_size"]
    out, deq = {}, {}
    for k, w in sd.items():
        if not is_routed_expert(k):
            out[k] = w
            continue
        n = w.shape[1]
        perm = torch.randperm(n, generator=gen)
        g_idx = torch.empty(n, dtype=torch.int32)
        g_idx[perm] = torch.arange(n, dtype=torch.int32) // group
        cols = w.float()[:, perm].reshape(w.shape[0], -1, group)
        scale, _ = calculate_qparams(cols.amin(dim=-1), cols.amax(dim=-1), s.weights)
        scale = scale.to(torch.bfloat16)
        comp = compressor.compress_weight(weight=w, scale=scale, quantization_args=s.weights, g_idx=g_idx)
        comp.update({"weight_scale": scale, "weight_g_idx": g_idx})
        pre = k[: -len("weight")]
        for name, t in comp.items():
            out[pre + name] = t.contiguous()
        ints = unpack_from_int32(comp["weight_packed"], 4, torch.Size(comp["weight_shape"]))
        deq[k] = dequantize(x_q=ints, scale=scale.float(), args=s.weights, g_idx=g_idx)
        assert deq[k].dtype == torch.float32
        assert torch.equal(deq[k].to(torch.bfloat16), compressor.decompress_weight(comp, s.weights)), k
        assert (deq[k] - w.float()).abs().max() <= 0.6 * scale.float().max(), k
    return out, deq, s


def compress_fp4(sd, preset):
    """compressed-tensors NVFP4A16 / MXFP4A16 -> (checkpoint tensors, exact float32 dequantized weights)."""
    from compressed_tensors.compressors.mx_utils import decompress_mx_scale
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
    s = preset_name_to_scheme(preset, ["Linear"])
    nv = s.weights.group_size == 16
    C = NVFP4PackedCompressor if nv else MXFP4PackedCompressor
    out, deq = {}, {}
    for k, w in sd.items():
        if not is_routed_expert(k):
            out[k] = w
            continue
        o, n = w.shape
        g = w.float().reshape(o, -1, s.weights.group_size)
        state = {"weight": w}
        gscale = None
        if nv:
            gscale = generate_gparam(w.float().min(), w.float().max()).reshape(1)
            state["weight_global_scale"] = gscale
        scale, _ = calculate_qparams(g.amin(dim=-1), g.amax(dim=-1), s.weights, global_scale=gscale)
        state["weight_scale"] = scale
        comp = C.compress(state, s)
        pre = k[: -len("weight")]
        for name, t in comp.items():
            out[pre + name] = t.contiguous()
        codes = unpack_fp4_from_uint8(comp["weight_packed"], o, n, dtype=torch.float32)
        block = comp["weight_scale"].float() / gscale if nv else decompress_mx_scale(comp["weight_scale"]).float()
        deq[k] = (codes.reshape(o, -1, s.weights.group_size) * block[..., None]).reshape(o, n)
        assert torch.equal(deq[k].to(torch.bfloat16), C.decompress(comp, s)["weight"]), k
    return out, deq, s


# The tensor that holds a quantized weight's codes, and the ones beside it (compressed-tensors; GPTQ / AWQ).
PACKED = ("weight_packed", "qweight")
AUXILIARY = ("weight_scale", "weight_shape", "weight_global_scale", "weight_g_idx", "qzeros", "scales", "g_idx")


def quantization_config(sch, fmt):
    import json
    if isinstance(fmt, dict):   # a GPTQ / AWQ config, written as its tool writes it
        return fmt
    from compressed_tensors.quantization import QuantizationConfig
    qc = QuantizationConfig(config_groups={"group_0": sch}, format=fmt,
                            quantization_status="compressed", ignore=IGNORE)
    return json.loads(json.dumps(qc.to_dict(), default=str))


FORMATS = {
    "int4": lambda sd: (*compress(sd), scheme(), "pack-quantized"),
    "nvfp4": lambda sd: (*compress_fp4(sd, "NVFP4A16"), "nvfp4-pack-quantized"),
    "mxfp4": lambda sd: (*compress_fp4(sd, "MXFP4A16"), "mxfp4-pack-quantized"),
    # Only with compressed-tensors 0.12.x on PYTHONPATH; not in the default list.
    "int4-actorder": lambda sd: (*compress_actorder(sd), "pack-quantized"),
}
# Versions of tools other than compressed-tensors, by format (filled by scripts that add formats).
TOOL_VERSIONS = {}
NOTES = {
    "int4": "W = compressed-tensors unpack_from_int32(weight_packed) * weight_scale (bf16 scale, one per 32 inputs)",
    "nvfp4": "W = e2m1(weight_packed) * (float(weight_scale e4m3, one per 16 inputs) / weight_global_scale)",
    "mxfp4": "W = e2m1(weight_packed) * 2^(weight_scale - 127) (e8m0, one per 32 inputs)",
    "int4-actorder": ("W[:, c] = compressed-tensors unpack_from_int32(weight_packed)[:, c] * "
                      "weight_scale[:, weight_g_idx[c]] (GPTQ activation order: a random column-to-group map)"),
}


def main():
    for fmt in sys.argv[1:] or ["int4", "nvfp4", "mxfp4"]:
        build(fmt)


def build(fmt):
    import json
    import safetensors
    import tokenizers
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)
    versions = dict(transformers=transformers.__version__, torch=torch.__version__,
                    tokenizers=tokenizers.__version__, safetensors=safetensors.__version__,
                    **TOOL_VERSIONS.get(fmt, {}))
    if fmt in ("int4", "nvfp4", "mxfp4", "int4-actorder"):
        import compressed_tensors
        versions["compressed_tensors"] = compressed_tensors.__version__
    hf_tok = AutoTokenizer.from_pretrained(str(md.TOK_SRC))
    tok_size = len(hf_tok)
    vocab_size = (tok_size + 63) // 64 * 64
    ids = {t: hf_tok.convert_tokens_to_ids(t) for t in mt.SPECIAL_TOKENS + mt.EXTRA_ADDED_TOKENS}
    prompt_ids = [hf_tok.encode(t, add_special_tokens=False) for t in mt.PROMPTS]
    cfg = md.make_config(SPEC, vocab_size, ids)
    NAME = f"kimi-k2-{fmt}-tiny"

    found = None
    for t in range(MAX_TRIES):
        seed = SPEC["seed_base"] + t
        model = md.build_model(cfg, seed, tok_size)
        sd = md.hub_state_dict(model, cfg)
        qsd, deq, sch, ct_format = FORMATS[fmt](sd)
        qm = md.build_model(cfg, seed, tok_size)
        qm.load_state_dict(md.to_model_state_dict({**sd, **deq}, qm), strict=True)
        qm.eval()
        res, m, rec = md.evaluate(qm, prompt_ids)
        ok = m > md.MIN_GREEDY_MARGIN and rec.min_gap > md.MIN_ROUTER_MARGIN
        md.log(f"  {NAME}: seed {seed}: greedy {m:.5f} router {rec.min_gap:.3g}{'  <- accepted' if ok else ''}")
        if ok:
            found = (seed, sd, qsd, deq, sch, ct_format)
            break
    if not found:
        raise SystemExit("no seed satisfied the margins")
    seed, sd, qsd, deq, sch, ct_format = found

    d = HERE / NAME
    d.mkdir(exist_ok=True)
    md.copy_tokenizer(d)
    md.save(qsd, d)
    cfg.save_pretrained(str(d))
    v5 = json.loads((d / "config.json").read_text())
    vcfg = md.legacy_config(SPEC, cfg, v5)
    vcfg["quantization_config"] = quantization_config(sch, ct_format)
    md.write_json(d / "config.json", dict(sorted(vcfg.items())))

    # Dequantize again from the file as written, and run that.
    ql = load_file(str(d / "model.safetensors"))
    assert set(ql) == set(qsd) and all(torch.equal(ql[k], qsd[k]) for k in ql)
    again = FORMATS[fmt]({k: v for k, v in sd.items()})[1]
    hub, n_packed = {}, 0
    for k, v in ql.items():
        packed = next((p for p in PACKED if k.endswith(p)), None)
        if packed:
            n_packed += 1
            pre = k[: -len(packed)]
            assert torch.equal(again[pre + "weight"], deq[pre + "weight"])
            hub[pre + "weight"] = deq[pre + "weight"]
        elif not any(k.endswith(x) for x in AUXILIARY):
            hub[k] = v.float()
    qm = md.build_model(cfg, seed, tok_size)
    qm.load_state_dict(md.to_model_state_dict(hub, qm), strict=True)
    qm.eval()
    res, margin, rec = md.evaluate(qm, prompt_ids)
    extra = {"architecture": "DeepseekV3ForCausalLM", "config_model_type": "kimi_k2",
             "rope_parameters": dict(qm.config.rope_parameters),
             "note": ("reference computed in float32 from the DEQUANTIZED weights: every routed-expert projection "
                      f"{NOTES[fmt]}, in float32; all other tensors as stored (bf16 / fp32)"),
             "quantization_config": vcfg["quantization_config"], "packed_tensor_count": n_packed}
    ref = md.make_reference(NAME, seed, res, margin, rec, hf_tok, prompt_ids, versions, ids, extra)
    ref["min_router_group_margin"] = None
    md.write_json(d / "reference.json", ref, indent=1)
    os.chmod(d / "model.safetensors", 0o644)
    md.log(f"wrote {NAME}: seed {seed} margin {margin:.6f} router {rec.min_gap:.6f} packed {n_packed} "
           f"size {(d / 'model.safetensors').stat().st_size}")


if __name__ == "__main__":
    main()
