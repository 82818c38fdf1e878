#!/usr/bin/env python3
"""Build ember's kimi-k2-{gptq,awq}-tiny fixtures (deterministic, offline): the kimi-k2-tiny architecture with its
routed experts in GPTQ's and AWQ's own checkpoint layouts, everything else bf16, exactly as
make_tiny_kimi_quantized.py builds its compressed-tensors variants (same seeds, margins and reference):
  kimi-k2-gptq-tiny   GPTQ v1 (`checkpoint_format: gptq`), 4-bit, group 32, asymmetric, activation order
                      (`desc_act`, a random input-to-group map in `g_idx`): packed by GPTQModel's
                      TorchLinear.pack_original, zero points stored less one word-wise by its
                      convert_gptq_v2_to_v1_format_module, dequantized by its TorchLinear.dequantize_weight
  kimi-k2-awq-tiny    AWQ GEMM, 4-bit, group 32, zero points: packed by AutoAWQ's WQLinear_GEMM.from_linear,
                      dequantized by its dequantize_gemm
Scales and zero points come from each group's min and max (asymmetric, 4 bits); the tools pack and dequantize.
The reference is transformers in float32 running the DEQUANTIZED model: each expert weight is the tool's float16
dequantization, in float32.

Usage (see make_gptq_awq_tensors.py for the tools' sources and dependencies):
    PYTHONPATH=<gptqmodel-7.7.0> AWQ_SRC=<autoawq-0.2.9>/awq python models/make_tiny_gptq_awq.py [gptq|awq ...]
"""
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_gptq_awq_tensors as tools  # noqa: E402
import make_tiny_kimi_quantized as mk  # noqa: E402

GROUP = 32


def min_max_qparams(w, order):
    """Per-output, per-group asymmetric 4-bit scale (float16) and integer zero, groups over the inputs in `order`."""
    g = w.float()[:, order].reshape(w.shape[0], -1, GROUP)
    lo, hi = g.amin(dim=-1).clamp(max=0), g.amax(dim=-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-8).half().float()
    zero = torch.round(-lo / scale).clamp(0, 15)
    return scale, zero     # [out, groups]


def compress_gptq(sd):
    import gptqmodel  # noqa: F401
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.quantization import QuantizeConfig
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module
    gen = torch.Generator().manual_seed(11)
    out, deq = {}, {}
    for k, w in sd.items():
        if not mk.is_routed_expert(k):
            out[k] = w
            continue
        o, n = w.shape
        perm = torch.randperm(n, generator=gen)
        g_idx = torch.empty(n, dtype=torch.int32)
        g_idx[perm] = torch.arange(n, dtype=torch.int32) // GROUP
        scale, zero = min_max_qparams(w, perm)
        linear = torch.nn.Linear(n, o, bias=False)
        linear.weight.data = w.float()
        q = TorchLinear(bits=4, group_size=GROUP, sym=False, desc_act=True, in_features=n, out_features=o,
                        bias=False, register_buffers=True)
        q.pack_original(linear, scale, zero, g_idx)
        q.post_init()
        deq16 = q.dequantize_weight().T.contiguous()
        convert_gptq_v2_to_v1_format_module(q, QuantizeConfig(bits=4, group_size=GROUP, sym=False, desc_act=True))
        pre = k[: -len("weight")]
        out.update({pre + "qweight": q.qweight.clone(), pre + "qzeros": q.qzeros.clone(),
                    pre + "scales": q.scales.clone(), pre + "g_idx": q.g_idx.to(torch.int32).clone()})
        deq[k] = deq16.float()
        assert (deq[k] - w.float()).abs().max() <= 0.6 * scale.max() + 1e-3, k
    qc = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": True, "sym": False,
          "checkpoint_format": "gptq"}
    return out, deq, None, qc


def compress_awq(sd):
    WQLinear_GEMM, dequantize_gemm = tools.awq_tools()
    out, deq = {}, {}
    for k, w in sd.items():
        if not mk.is_routed_expert(k):
            out[k] = w
            continue
        o, n = w.shape
        scale, zero = min_max_qparams(w, torch.arange(n))
        # AutoAWQ packs a weight its quantizer already rounded (it neither clamps nor masks the codes), so
        # round and clamp first, as AutoAWQ's pseudo_quantize_tensor does.
        s_in, z_in = scale.repeat_interleave(GROUP, dim=1), zero.repeat_interleave(GROUP, dim=1)
        fake = (torch.clamp(torch.round(w.float() / s_in) + z_in, 0, 15) - z_in) * s_in
        linear = torch.nn.Linear(n, o, bias=False)
        linear.weight.data = fake
        q = WQLinear_GEMM.from_linear(linear, 4, GROUP, scales=scale.t().contiguous().half(),
                                      zeros=zero.t().contiguous().to(torch.int32))
        deq16 = dequantize_gemm(q.qweight, q.qzeros, q.scales, 4, GROUP).T.contiguous()
        pre = k[: -len("weight")]
        out.update({pre + "qweight": q.qweight.clone(), pre + "qzeros": q.qzeros.clone(),
                    pre + "scales": q.scales.clone()})
        deq[k] = deq16.float()
        assert (deq[k] - w.float()).abs().max() <= 0.6 * scale.max() + 1e-3, k
    qc = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}
    return out, deq, None, qc


mk.FORMATS["gptq"] = compress_gptq
mk.FORMATS["awq"] = compress_awq
mk.NOTES["gptq"] = ("W[:, c] = scales[g_idx[c]] * (q[c] - zero[g_idx[c]]) as GPTQModel dequantizes it in float16 "
                    "(GPTQ v1, 4-bit, group 32, asymmetric, activation order)")
mk.NOTES["awq"] = "W[:, c] = (q[c] - zero[c // 32]) * scales[c // 32] as AutoAWQ dequantizes it in float16"
mk.TOOL_VERSIONS["gptq"] = {"gptqmodel": "7.7.0"}
mk.TOOL_VERSIONS["awq"] = {"autoawq": "0.2.9"}

if __name__ == "__main__":
    for fmt in sys.argv[1:] or ["gptq", "awq"]:
        mk.build(fmt)
