#!/usr/bin/env bash
# gpu-prepare.sh — builds, on a machine with Rust (no GPU needed), what scripts/gpu-check.sh runs on a
# GPU machine that has no Rust toolchain: the release `ember` with --features cuda and the CUDA test
# binaries, xz-compressed into .gpu/ (git-ignored) to fit the device tool's 64 MiB carry.
#
#   scripts/gpu-prepare.sh          # then: device run, carry [".gpu"], command "bash scripts/gpu-check.sh"
#
# CUDA_COMPUTE_CAP (default 90: H100/H200) picks candle's kernel architecture; ember's own kernels
# are built for sm_80, sm_90 and sm_100 regardless.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/install-cuda-toolchain.sh --env)"
export CARGO_INCREMENTAL=0
rm -rf .gpu && mkdir -p .gpu
cargo build --release -p ember-cli --features cuda
cp target/release/ember .gpu/ember
# Test binaries: cargo prints their paths as JSON; keep the test targets' executables.
tests() {
    cargo test --no-run --message-format=json "$@" |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])'
}
{ tests -p ember-kernels --features cuda; tests -p ember-engine --features cuda --test cuda; } |
    while read -r name exe; do cp "$exe" ".gpu/test-$name"; done
# The tests find models/ through the absolute crate paths they were compiled with.
pwd > .gpu/build-root
git rev-parse HEAD > .gpu/commit
xz -T0 -6 .gpu/ember .gpu/test-*
ls -la .gpu
du -sh .gpu
