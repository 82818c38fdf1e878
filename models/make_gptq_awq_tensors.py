#!/usr/bin/env python3
"""Build ember's bit-exact GPTQ and AWQ dequantization fixtures (deterministic, offline): random weights packed by
the makers' own tools, with those tools' own dequantized weights next to them.

  quantized-tensors/<scheme>.safetensors   per layer `<layer>.*`: `qweight`, `qzeros`, `scales` (and `g_idx` for
                                           GPTQ) exactly as the tool packs them, and `<layer>.dequantized` (the
                                           tool's dequantized weight `[out, in]`, float16 as the tool returns it)
  quantized-tensors/<scheme>.json          the quantization_config the scheme is stored under

Tools:
  GPTQModel 7.7.0   TorchLinear.pack_original (packing), convert_gptq_v2_to_v1_format_module (the v1 checkpoint
                    zero points, stored less one word-wise), TorchLinear.dequantize_weight (dequantizing, in its
                    v2 form before conversion)
  AutoAWQ 0.2.9     WQLinear_GEMM.from_linear (packing in AWQ's interleaved order), dequantize_gemm (dequantizing)
Scales and zero points are random (GPTQ's asymmetric zeros include 0 and 15, so v1's word-wise borrow happens);
the tools only pack and dequantize, which is what the fixtures test.

Usage (neither tool installs as a wheel on a CPU machine; their sources import):
    pip download --no-deps gptqmodel==7.7.0 autoawq==0.2.9 && tar xzf each
    pip install torch transformers pypcre logbar threadpoolctl tokenicer device-smi defuser pillow datasets dill requests
    PYTHONPATH=<gptqmodel-7.7.0> AWQ_SRC=<autoawq-0.2.9>/awq python models/make_gptq_awq_tensors.py
"""
import json
import os
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
OUT = HERE / "quantized-tensors"
SEED = 20261203


def awq_tools():
    # AutoAWQ's package __init__ pulls in calibration datasets; its linear module needs none of that.
    pkg = types.ModuleType("awq")
    pkg.__path__ = [os.environ["AWQ_SRC"]]
    sys.modules["awq"] = pkg
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.utils.packing_utils import dequantize_gemm
    return WQLinear_GEMM, dequantize_gemm


def gptq(name, bits, group_size, sym, desc_act, v1, shapes, gen):
    import gptqmodel  # noqa: F401  (initialises the package in its import order)
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.quantization import QuantizeConfig
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module
    maxq = 2 ** bits - 1
    tensors = {}
    for i, (out, inp) in enumerate(shapes):
        gs = inp if group_size == -1 else group_size
        groups = inp // gs
        w = torch.randn(out, inp, generator=gen)
        scales = (torch.rand(out, groups, generator=gen) * 0.05 + 0.01).half().float()
        if sym:
            zeros = torch.full((out, groups), float(2 ** (bits - 1)))
        else:
            zeros = torch.randint(0, maxq + 1, (out, groups), generator=gen).float()
            zeros[0, 0], zeros[1, 0] = 0, maxq
        if desc_act:
            # Activation order: inputs quantized in a permuted order, so each input's group is its rank's.
            perm = torch.randperm(inp, generator=gen)
            g_idx = torch.empty(inp, dtype=torch.int32)
            g_idx[perm] = torch.arange(inp, dtype=torch.int32) // gs
        else:
            g_idx = torch.arange(inp, dtype=torch.int32) // gs
        linear = torch.nn.Linear(inp, out, bias=False)
        linear.weight.data = w
        q = TorchLinear(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, in_features=inp,
                        out_features=out, bias=False, register_buffers=True)
        q.pack_original(linear, scales, zeros, g_idx)
        q.post_init() if hasattr(q, "post_init") else None
        deq = q.dequantize_weight().T.contiguous()  # [out, in], float16
        if v1:
            cfg = QuantizeConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act)
            convert_gptq_v2_to_v1_format_module(q, cfg)
        p = f"layer{i}"
        tensors.update({f"{p}.qweight": q.qweight.clone(), f"{p}.qzeros": q.qzeros.clone(),
                        f"{p}.scales": q.scales.clone(), f"{p}.g_idx": q.g_idx.to(torch.int32).clone(),
                        f"{p}.dequantized": deq})
        assert deq.dtype == torch.float16 and deq.abs().sum() > 0
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
          "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    return tensors, qc, {"gptqmodel": "7.7.0", "torch": torch.__version__}


def awq(name, group_size, shapes, gen):
    WQLinear_GEMM, dequantize_gemm = awq_tools()
    tensors = {}
    for i, (out, inp) in enumerate(shapes):
        groups = inp // group_size
        w = torch.randn(out, inp, generator=gen)
        scales = (torch.rand(groups, out, generator=gen) * 0.05 + 0.01).half()
        zeros = torch.randint(0, 16, (groups, out), generator=gen, dtype=torch.int32)
        linear = torch.nn.Linear(inp, out, bias=False)
        linear.weight.data = w
        q = WQLinear_GEMM.from_linear(linear, 4, group_size, scales=scales, zeros=zeros)
        deq = dequantize_gemm(q.qweight, q.qzeros, q.scales, 4, group_size).T.contiguous()  # [out, in]
        p = f"layer{i}"
        tensors.update({f"{p}.qweight": q.qweight.clone(), f"{p}.qzeros": q.qzeros.clone(),
                        f"{p}.scales": q.scales.clone(), f"{p}.dequantized": deq})
        assert deq.dtype == torch.float16 and deq.abs().sum() > 0
    qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    return tensors, qc, {"autoawq": "0.2.9", "torch": torch.__version__}


SCHEMES = {
    "gptq-int4-group32-symmetric": lambda g: gptq("g", 4, 32, True, False, True, [(32, 64), (16, 96)], g),
    "gptq-int4-group32-asymmetric-actorder": lambda g: gptq("g", 4, 32, False, True, True, [(32, 64), (24, 128)], g),
    "gptq-int8-channel-v2": lambda g: gptq("g", 8, -1, False, False, False, [(16, 64), (8, 32)], g),
    "gptq-int2-group16-v1": lambda g: gptq("g", 2, 16, False, False, True, [(32, 64)], g),
    "awq-int4-group32": lambda g: awq("a", 32, [(32, 64), (64, 96)], g),
}


def main(only):
    OUT.mkdir(exist_ok=True)
    for name, make in SCHEMES.items():
        if only and name not in only:
            continue
        gen = torch.Generator().manual_seed(SEED)
        tensors, qc, versions = make(gen)
        save_file(tensors, str(OUT / f"{name}.safetensors"), metadata={"format": "pt"})
        (OUT / f"{name}.json").write_text(json.dumps({"quantization_config": qc, "versions": versions},
                                                     indent=1) + "\n")
        print(name, sorted(tensors))


if __name__ == "__main__":
    main(sys.argv[1:])
