#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, ptxas, NVVM, CUDA headers incl. CCCL) from PyPI into
# the git-ignored .cuda/ of the repository, where build.rs finds it. Idempotent: does nothing when
# .cuda/ already holds nvcc 13.0.88 with every pinned package at its pinned version.
#
# Why PyPI: no machine here has a CUDA install; the wheels are ~100 MB and need no root. Why 13.0:
# the GPU machines run driver 580 (CUDA 13.0), and PTX written by a newer nvcc cannot be JIT-compiled
# by an older driver. All five packages are needed (without nvidia-cuda-cccl, cuda_bf16.h fails to
# include <cuda/std/...>). Call nvcc by its real path, .cuda/nvidia/cu13/bin/nvcc: a symlink loses
# the headers it finds relative to itself. The host compiler is the system's g++ (gcc 12 works).
#
# Usage: bash scripts/install-cuda-toolchain.sh     (FORCE=1 reinstalls)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEST=.cuda
NVCC="$DEST/nvidia/cu13/bin/nvcc"
NVCC_VERSION=13.0.88
PACKAGES=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-cccl==13.0.85
)

# Every pinned distribution is present in .cuda/ at its pinned version (pip --target writes one
# <name>-<version>.dist-info per package; names use underscores there).
all_pinned_present() {
    local spec name version
    for spec in "${PACKAGES[@]}"; do
        name=${spec%%==*}
        version=${spec##*==}
        [[ -d "$DEST/${name//-/_}-$version.dist-info" ]] || return 1
    done
}

# nvcc runs and reports the pinned release (its --version prints e.g. "Build cuda_13.0.r13.0/..." and
# "release 13.0, V13.0.88").
nvcc_ok() {
    [[ -x "$NVCC" ]] && "$NVCC" --version 2>/dev/null | grep -q "V$NVCC_VERSION"
}

if [[ -z "${FORCE:-}" ]] && all_pinned_present && nvcc_ok; then
    echo "install-cuda-toolchain: $NVCC is already CUDA $NVCC_VERSION; nothing to do"
    exit 0
fi

command -v python3 >/dev/null || { echo "install-cuda-toolchain: python3 is required" >&2; exit 1; }
start=$(date +%s)
echo "install-cuda-toolchain: installing ${PACKAGES[*]} into $DEST/"
# A stale or partial install is replaced wholesale (pip --target does not upgrade in place cleanly).
rm -rf "$DEST"
python3 -m pip install --quiet --disable-pip-version-check --no-input --root-user-action=ignore --no-deps --no-compile \
    --target "$DEST" "${PACKAGES[@]}"

if ! nvcc_ok; then
    echo "install-cuda-toolchain: $NVCC does not report V$NVCC_VERSION after installing:" >&2
    "$NVCC" --version >&2 || true
    exit 1
fi
# Smoke test: one bf16 kernel through the whole pipeline (headers, cicc, ptxas, fatbinary).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/smoke.cu" <<'EOF'
#include <cuda_bf16.h>
extern "C" __global__ void smoke(__nv_bfloat16 *y, const float *x) { y[threadIdx.x] = __float2bfloat16_rn(x[threadIdx.x]); }
EOF
"$NVCC" --fatbin -gencode arch=compute_80,code=sm_80 -o "$tmp/smoke.fatbin" "$tmp/smoke.cu"
# build.rs reruns when build.rs changes; a fresh toolchain must rebuild a crate cached as CPU-only.
touch build.rs
"$NVCC" --version | tail -n 2
echo "install-cuda-toolchain: done in $(( $(date +%s) - start )) s, $(du -sh "$DEST" | cut -f1) in $DEST/"
