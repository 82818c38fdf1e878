#!/usr/bin/env python3
"""Build ember's bit-exact dequantization fixtures (deterministic, offline): random weights quantized and packed
by the makers' own tools, with those tools' own unpacked values and dequantized weights next to them.

  quantized-tensors/<scheme>.safetensors   per layer `<layer>.*`: the checkpoint tensors exactly as the tool
                                           writes them, `<layer>.unpacked` (the tool's unpacked int8 / e2m1
                                           codes as float32) and `<layer>.dequantized` (the tool's decompressed
                                           weight, in the dtype the tool returns)
  quantized-tensors/<scheme>.json          the quantization_config the scheme is stored under

Tools: compressed-tensors (PackedQuantizationCompressor pack-quantized INT4/INT8, NVFP4PackedCompressor,
MXFP4PackedCompressor, with its own calculate_qparams / generate_gparam scales) and NVIDIA ModelOpt
(NVFP4QTensor.quantize / dequantize).

Usage:  pip install compressed-tensors nvidia-modelopt;  python models/make_quantized_tensors.py [SCHEME ...]
        (every scheme but int4-group32-actorder by default; that one needs compressed-tensors 0.12.x:
        pip install --target /tmp/ct012 --no-deps compressed-tensors==0.12.2;
        PYTHONPATH=/tmp/ct012 python models/make_quantized_tensors.py int4-group32-actorder)
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
OUT = HERE / "quantized-tensors"
SEED = 20240610


def groups_min_max(w, group):
    g = w.float().reshape(w.shape[0], -1, group)
    return g.amin(dim=-1), g.amax(dim=-1)


def ct_config(scheme, fmt):
    from compressed_tensors.quantization import QuantizationConfig
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, quantization_status="compressed",
                            ignore=["lm_head"])
    return json.loads(json.dumps(qc.to_dict(), default=str))


def pack_quantized(name, preset_args, shapes, gen):
    """compressed-tensors pack-quantized (W4A16 / W8A16, symmetric or with zero points), bf16 scales."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor as C
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    args = QuantizationArgs(**preset_args)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    tensors = {}
    for i, (o, n) in enumerate(shapes):
        w = (0.2 * torch.randn(o, n, generator=gen)).to(torch.bfloat16)
        group = args.group_size if args.strategy == "group" else n
        mn, mx = groups_min_max(w, group)
        scale, zp = calculate_qparams(mn, mx, args)
        scale = scale.to(torch.bfloat16)
        sd = {"weight": w, "weight_scale": scale}
        if not args.symmetric:
            sd["weight_zero_point"] = torch.round(zp).to(torch.int8)
        comp = C.compress(sd, scheme)
        dec = C.decompress(comp, scheme)
        ints = unpack_from_int32(comp["weight_packed"], args.num_bits, comp["weight_shape"])
        for k, v in comp.items():
            tensors[f"layer{i}.{k}"] = v.contiguous()
        tensors[f"layer{i}.unpacked"] = ints.float()
        tensors[f"layer{i}.dequantized"] = dec["weight"].contiguous()
        assert dec["weight"].dtype == torch.bfloat16
    return tensors, ct_config(scheme, "pack-quantized")


def pack_quantized_actorder(name, preset_args, shapes, gen):
    """compressed-tensors pack-quantized with GPTQ's activation order (`actorder: group`): a `weight_g_idx`
    [in] maps every input column to its group, as GPTQ leaves it after quantizing the columns in a permuted
    order. compressed-tensors dropped actorder "group" in 2026-08, so this scheme needs a version that still
    has it (0.12.x, whose PackedQuantizationCompressor.compress_weight / decompress_weight take g_idx)."""
    from compressed_tensors.compressors.quantized_compressors.pack_quantized import (
        PackedQuantizationCompressor as C)
    from compressed_tensors.compressors.quantized_compressors.pack_quantized import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    args = QuantizationArgs(**preset_args)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    compressor = C(config=None)
    tensors = {}
    for i, (o, n) in enumerate(shapes):
        w = (0.2 * torch.randn(o, n, generator=gen)).to(torch.bfloat16)
        group = args.group_size
        # Column perm[j] was quantized j-th: its group is j // group.
        perm = torch.randperm(n, generator=gen)
        g_idx = torch.empty(n, dtype=torch.int32)
        g_idx[perm] = torch.arange(n, dtype=torch.int32) // group
        cols = w.float()[:, perm].reshape(o, -1, group)
        scale, zp = calculate_qparams(cols.amin(dim=-1), cols.amax(dim=-1), args)
        scale = scale.to(torch.bfloat16)
        comp = compressor.compress_weight(weight=w, scale=scale, quantization_args=args, zero_point=zp,
                                          g_idx=g_idx)
        comp.update({"weight_scale": scale.contiguous(), "weight_g_idx": g_idx})
        dec = compressor.decompress_weight(comp, quantization_args=args)
        ints = unpack_from_int32(comp["weight_packed"], args.num_bits, torch.Size(comp["weight_shape"]))
        for k, v in comp.items():
            tensors[f"layer{i}.{k}"] = v.contiguous()
        tensors[f"layer{i}.unpacked"] = ints.float()
        tensors[f"layer{i}.dequantized"] = dec.contiguous()
        assert dec.dtype == torch.bfloat16
    return tensors, ct_config(scheme, "pack-quantized")


def fp4_compressed_tensors(name, preset, shapes, gen):
    """compressed-tensors nvfp4-pack-quantized / mxfp4-pack-quantized."""
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
    scheme = preset_name_to_scheme(preset, ["Linear"])
    args = scheme.weights
    nv = args.group_size == 16
    C = NVFP4PackedCompressor if nv else MXFP4PackedCompressor
    tensors = {}
    for i, (o, n) in enumerate(shapes):
        w = (0.2 * torch.randn(o, n, generator=gen)).to(torch.bfloat16)
        mn, mx = groups_min_max(w, args.group_size)
        sd = {"weight": w}
        gscale = None
        if nv:
            gscale = generate_gparam(w.float().min(), w.float().max()).reshape(1)
            sd["weight_global_scale"] = gscale
        scale, _ = calculate_qparams(mn, mx, args, global_scale=gscale)
        sd["weight_scale"] = scale
        comp = C.compress(sd, scheme)
        dec = C.decompress(comp, scheme)
        codes = unpack_fp4_from_uint8(comp["weight_packed"], o, n, dtype=torch.float32)
        for k, v in comp.items():
            tensors[f"layer{i}.{k}"] = v.contiguous()
        tensors[f"layer{i}.unpacked"] = codes
        tensors[f"layer{i}.dequantized"] = dec["weight"].contiguous()
    fmt = "nvfp4-pack-quantized" if nv else "mxfp4-pack-quantized"
    return tensors, ct_config(scheme, fmt)


def nvfp4_modelopt(name, shapes, gen):
    """NVIDIA ModelOpt NVFP4 (export layout: uint8 `weight`, e4m3 `weight_scale`, f32 `weight_scale_2`)."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    import modelopt
    tensors = {}
    for i, (o, n) in enumerate(shapes):
        w = (0.2 * torch.randn(o, n, generator=gen)).to(torch.bfloat16).float()
        q, scale, scale_2 = NVFP4QTensor.quantize(w, 16)
        dec = q.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
        packed = q._quantized_data
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(o, n)
        values = NVFP4QTensor.get_e2m1_values("cpu")[codes.long()]
        tensors[f"layer{i}.weight"] = packed.contiguous()
        tensors[f"layer{i}.weight_scale"] = scale.contiguous()
        tensors[f"layer{i}.weight_scale_2"] = scale_2.float().reshape(()).contiguous()
        tensors[f"layer{i}.unpacked"] = values.float().contiguous()
        tensors[f"layer{i}.dequantized"] = dec.contiguous()
        assert packed.dtype == torch.uint8 and scale.dtype == torch.float8_e4m3fn
    qc = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"],
          "producer": {"name": "modelopt", "version": modelopt.__version__}}
    return tensors, qc


SCHEMES = {
    # Kimi K2 Thinking's experts: INT4, group 32, symmetric.
    "int4-group32-symmetric": lambda g: pack_quantized(
        "int4", dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32),
        [(24, 64), (48, 96), (40, 32)], g),
    # GPTQ / AWQ-style: INT4, group 128, asymmetric (packed zero points, an odd row count).
    "int4-group128-asymmetric": lambda g: pack_quantized(
        "int4a", dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=128),
        [(16, 256), (33, 128)], g),
    # W8A16 per channel.
    "int8-channel-symmetric": lambda g: pack_quantized(
        "int8", dict(num_bits=8, type="int", symmetric=True, strategy="channel"), [(24, 40), (7, 64)], g),
    "nvfp4-compressed-tensors": lambda g: fp4_compressed_tensors("nvfp4", "NVFP4A16", [(32, 64), (48, 32)], g),
    "mxfp4-compressed-tensors": lambda g: fp4_compressed_tensors("mxfp4", "MXFP4A16", [(32, 64), (16, 96)], g),
    "nvfp4-modelopt": lambda g: nvfp4_modelopt("nvfp4", [(32, 64), (48, 32)], g),
    # GPTQ with activation order: INT4, group 32, symmetric, a weight_g_idx column-to-group map
    # (compressed-tensors 0.12.x: `make_quantized_tensors.py int4-group32-actorder`).
    "int4-group32-actorder": lambda g: pack_quantized_actorder(
        "int4g", dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32, actorder="group"),
        [(24, 64), (40, 96)], g),
}


def main(only):
    import compressed_tensors
    versions = {"torch": torch.__version__, "compressed-tensors": compressed_tensors.__version__}
    if only != ["int4-group32-actorder"]:
        import modelopt
        versions["nvidia-modelopt"] = modelopt.__version__
    OUT.mkdir(exist_ok=True)
    for i, (name, make) in enumerate(SCHEMES.items()):
        if only and name not in only:
            continue
        gen = torch.Generator().manual_seed(SEED + i)
        tensors, qc = make(gen)
        save_file(tensors, str(OUT / f"{name}.safetensors"), metadata={"format": "pt"})
        (OUT / f"{name}.json").write_text(json.dumps({"quantization_config": qc, "versions": versions},
                                                     indent=1, sort_keys=True) + "\n")
        print(name, {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in tensors.items()
                     if k.startswith("layer0.")})


if __name__ == "__main__":
    import sys
    torch.manual_seed(0)
    main(sys.argv[1:])
