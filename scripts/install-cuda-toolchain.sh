#!/usr/bin/env bash
# install-cuda-toolchain.sh — compile-only CUDA 13.0 toolchain for a machine with
# no GPU and no CUDA toolkit, built only from Python wheels (pip) and the cargo registry.
#
# Gives: nvcc/ptxas/fatbinary/cicc, CUDA headers (cuda_runtime.h, cuda_fp16.h,
# cuda_bf16.h, cuda_fp8.h, cccl), libcudart, libdevice, and link-time STUB
# libraries (libcuda, libnvrtc, libcurand, libcublas, libcublasLt) so that
# candle-core 0.11 `--features cuda` (which turns on cudarc's `dynamic-linking`)
# links. The stubs are only for the linker: at run time on a GPU machine the
# real driver/toolkit libraries must be found (see the printed notes).
#
# Origin: ../shared/tools/install-cuda-toolchain.sh (the team's shared tools, with its
# measurements in ../shared/tools/CUDA-NOTES.md); vendored here so a clone can build the
# `cuda` feature on its own. Changes from the shared copy: usage paths, and the notes on
# ember-kernels' own architecture list (EMBER_CUDA_ARCHS).
#
# Usage:
#   scripts/install-cuda-toolchain.sh            # install (idempotent) + print exports
#   eval "$(scripts/install-cuda-toolchain.sh --env)"   # install quietly, then export
#   EMBER_CUDA_HOME=/some/dir scripts/install-cuda-toolchain.sh
#   EMBER_CUDA_FORCE=1 ...                       # wipe and reinstall
#
# CUDA 13.0 (not newer) on purpose: PTX from a newer nvcc is rejected by driver 580 (CUDA 13.0).
set -euo pipefail

PREFIX="${EMBER_CUDA_HOME:-$HOME/.cache/ember-cuda}"
CUDA_DIR="$PREFIX/cuda"          # the CUDA_HOME-like tree
VENV="$PREFIX/venv"              # pip wheels land here
STAMP="$PREFIX/.ok-v2"
PYTHON="${PYTHON:-python3}"
COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
CUDARC_REQ="${EMBER_CUDARC_VERSION:-0.19}"   # stub symbol lists come from this cudarc

WHEELS=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-cccl==13.0.85"
)

ENV_ONLY=0
[ "${1:-}" = "--env" ] && ENV_ONLY=1
log() { if [ "$ENV_ONLY" = 1 ]; then echo "[cuda-toolchain] $*" >&2; else echo "[cuda-toolchain] $*"; fi; }

print_env() {
  cat <<EOF
export CUDA_HOME="$CUDA_DIR"
export CUDA_ROOT="$CUDA_DIR"
export CUDA_PATH="$CUDA_DIR"
export CUDA_TOOLKIT_ROOT_DIR="$CUDA_DIR"
export NVCC="$CUDA_DIR/bin/nvcc"
export PATH="$CUDA_DIR/bin:\$PATH"
export LIBRARY_PATH="$CUDA_DIR/lib64:$CUDA_DIR/lib64/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$CUDA_DIR/lib64\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="$COMPUTE_CAP"
export CUDAFORGE_THREADS="\${CUDAFORGE_THREADS:-\$(nproc)}"
EOF
}

check_ok() {
  [ -f "$STAMP" ] && [ -x "$CUDA_DIR/bin/nvcc" ] && [ -f "$CUDA_DIR/lib64/stubs/libcuda.so" ] \
    && "$CUDA_DIR/bin/nvcc" --version >/dev/null 2>&1
}

if [ "${EMBER_CUDA_FORCE:-0}" = 1 ]; then
  log "EMBER_CUDA_FORCE=1: removing $PREFIX"
  rm -rf "$PREFIX"
fi

if check_ok; then
  log "already installed in $PREFIX (set EMBER_CUDA_FORCE=1 to reinstall)"
else
  # Host C++ compiler for nvcc, C compiler for the stubs.
  if ! command -v g++ >/dev/null 2>&1 || ! command -v gcc >/dev/null 2>&1; then
    log "installing gcc/g++ (Debian)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential >/dev/null
  fi
  rm -f "$STAMP"
  mkdir -p "$PREFIX"

  # 1. wheels -> venv (or, if venv is unavailable, a plain --target dir)
  PIP_ARGS=(install -q --disable-pip-version-check --no-warn-script-location --only-binary=:all:)
  if [ -x "$VENV/bin/python" ] || { log "creating venv $VENV"; "$PYTHON" -m venv "$VENV" >&2; }; then
    log "pip install ${WHEELS[*]}"
    "$VENV/bin/python" -m pip "${PIP_ARGS[@]}" "${WHEELS[@]}" >&2
    SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  else
    log "venv failed; pip install --target $PREFIX/site"
    rm -rf "$VENV"
    "$PYTHON" -m pip "${PIP_ARGS[@]}" --target "$PREFIX/site" "${WHEELS[@]}" >&2
    SITE="$PREFIX/site"
  fi
  NV="$SITE/nvidia/cu13"
  for f in bin/nvcc bin/ptxas nvvm/bin/cicc nvvm/libdevice/libdevice.10.bc include/cuda_fp8.h lib/libcudart.so.13; do
    [ -e "$NV/$f" ] || { echo "missing $NV/$f after pip install" >&2; exit 1; }
  done

  # 2. CUDA_HOME-like tree: bin include nvvm -> wheel dirs; lib64 = real dir of links (+ stubs/)
  log "building $CUDA_DIR"
  rm -rf "$CUDA_DIR"
  mkdir -p "$CUDA_DIR/lib64/stubs"
  for d in bin include nvvm; do ln -s "$NV/$d" "$CUDA_DIR/$d"; done
  for f in "$NV"/lib/*; do ln -s "$f" "$CUDA_DIR/lib64/"; done
  ln -s libcudart.so.13 "$CUDA_DIR/lib64/libcudart.so"   # candle-kernels: -l dylib=cudart
  ln -s lib64 "$CUDA_DIR/lib"

  # 3. link-time stubs. Symbol names = the extern "C" fns of cudarc's sys bindings.
  log "fetching cudarc $CUDARC_REQ source (cargo) for stub symbol lists"
  GEN="$PREFIX/stubgen"
  rm -rf "$GEN"; mkdir -p "$GEN/src"
  cat > "$GEN/Cargo.toml" <<EOF
[package]
name = "ember-cuda-stubgen"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
cudarc = { version = "$CUDARC_REQ", default-features = false }
[workspace]
EOF
  : > "$GEN/src/lib.rs"
  (cd "$GEN" && cargo fetch --quiet) >&2
  CUDARC_SRC="$(cd "$GEN" && cargo metadata --format-version 1 --quiet \
    | "$PYTHON" -c 'import json,sys,os; m=json.load(sys.stdin); print([os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"][0])')"
  [ -f "$CUDARC_SRC/src/driver/sys/mod.rs" ] || { echo "cudarc source not found ($CUDARC_SRC)" >&2; exit 1; }
  log "cudarc source: $CUDARC_SRC"
  "$PYTHON" - "$CUDARC_SRC/src" "$GEN" <<'PY'
import os, re, sys
src, out = sys.argv[1], sys.argv[2]
# (cudarc module, stub file, SONAME of the real library, value every stub returns)
LIBS = [("driver",   "libcuda.so",     "libcuda.so.1",      34),   # CUDA_ERROR_STUB_LIBRARY
        ("nvrtc",    "libnvrtc.so",    "libnvrtc.so.13",    11),   # NVRTC_ERROR_INTERNAL_ERROR
        ("curand",   "libcurand.so",   "libcurand.so.10",   201),  # CURAND_STATUS_NOT_INITIALIZED
        ("cublas",   "libcublas.so",   "libcublas.so.13",   1),    # CUBLAS_STATUS_NOT_INITIALIZED
        ("cublaslt", "libcublasLt.so", "libcublasLt.so.13", 1)]
pat = re.compile(r'extern "C" \{\s*fn (\w+)\(')
for mod, lib, soname, code in LIBS:
    names = sorted(set(pat.findall(open(os.path.join(src, mod, "sys", "mod.rs")).read())))
    if not names:
        sys.exit("no symbols found for " + mod)
    with open(os.path.join(out, lib + ".c"), "w") as f:
        f.write("/* SONAME=%s link-time stub generated from cudarc; not for run time */\n" % soname)
        for n in names:
            f.write("int %s(void) { return %d; }\n" % (n, code))
    with open(os.path.join(out, lib + ".soname"), "w") as f:
        f.write(soname)
PY
  mkdir -p "$CUDA_DIR/lib64/stubs/run"
  for c in "$GEN"/*.so.c; do
    lib="$(basename "$c" .c)"; soname="$(cat "$GEN/$lib.soname")"
    gcc -shared -fPIC -O0 -Wl,-soname,"$soname" -o "$CUDA_DIR/lib64/stubs/$lib" "$c"
    # stubs/run: same stubs under their run-time names, opt-in for CPU-only machines
    ln -s "../$lib" "$CUDA_DIR/lib64/stubs/run/$soname"
  done
  rm -rf "$GEN/target"

  # 4. smoke test: nvcc -> PTX with bf16/fp8/fp16 headers
  T="$(mktemp -d)"
  cat > "$T/k.cu" <<'EOF'
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
extern "C" __global__ void k(__nv_bfloat16* x, __nv_fp8_e4m3* y, __half* h, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) { x[i] = __float2bfloat16(__bfloat162float(x[i]) * 2.f); y[i] = __nv_fp8_e4m3(1.5f); h[i] = __hadd(h[i], h[i]); }
}
EOF
  PATH="$CUDA_DIR/bin:$PATH" "$CUDA_DIR/bin/nvcc" -ptx -arch=sm_90 -o "$T/k90.ptx" "$T/k.cu"
  PATH="$CUDA_DIR/bin:$PATH" "$CUDA_DIR/bin/nvcc" -ptx -arch=sm_80 -o "$T/k80.ptx" "$T/k.cu"
  rm -rf "$T"
  date -u +%FT%TZ > "$STAMP"
  log "installed: $("$CUDA_DIR/bin/nvcc" --version | tail -1) ($(du -sh "$PREFIX" | cut -f1))"
fi

if [ "$ENV_ONLY" = 1 ]; then
  print_env
else
  echo
  echo "# --- paste / eval these (or: eval \"\$($0 --env)\") ---"
  print_env
  cat <<'EOF'
# Notes:
#  * ember-kernels builds kernels/*.cu for sm_80, sm_90 and sm_100 in one fatbin whatever
#    CUDA_COMPUTE_CAP says; EMBER_CUDA_ARCHS=80,90 (comma list) narrows that.
#  * CUDA_COMPUTE_CAP=90 -> candle-kernels (cudaforge) emits sm_90a PTX (H100/H200 only).
#    Only one arch per build. Override with CUDA_COMPUTE_CAP=80 for portable PTX.
#  * lib64/stubs holds LINK-TIME stubs (libcuda/libnvrtc/libcurand/libcublas/libcublasLt).
#    Binaries built with candle's `cuda` feature have DT_NEEDED on libcuda.so.1,
#    libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13, libcudart.so.13:
#    they will not START on a machine without those (build with `cargo test --no-run` here).
#  * Optional, CPU-only machines ONLY (never on a GPU machine): let such binaries start;
#    every CUDA call then fails with CUDA_ERROR_STUB_LIBRARY, so code can fall back to CPU:
#      export LD_LIBRARY_PATH="$CUDA_HOME/lib64/stubs/run:$LD_LIBRARY_PATH"
#  * At run time on the GPU machines, put their own CUDA 13 libs on LD_LIBRARY_PATH
#    (libcublas/libcublasLt/libcurand/libnvrtc/libcudart .so.13/.so.10); libcuda.so.1 is the driver's.
#  * A crate that also depends on cudarc directly next to candle's `cuda` feature must not
#    enable cudarc's `dynamic-loading` (conflicts with candle's `dynamic-linking`);
#    use `fallback-dynamic-loading` (in cudarc's default features) instead.
EOF
fi
