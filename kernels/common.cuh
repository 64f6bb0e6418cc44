// Shared helpers of the kernels/*.cu files: storage types, loads/stores through f32, exact
// (never contracted) f32 arithmetic, the Cephes exp of the CPU backend, and deterministic warp and
// block reductions.
//
// Conventions of every kernel in this directory:
// - Entry points are `extern "C" __global__` (unmangled names, loaded by name from the fatbin).
// - Storage is `float` or `__nv_bfloat16` (suffix `_f32` / `_bf16`); arithmetic and accumulation
//   are f32 (f64 where the CPU reference accumulates in f64). Gradients and optimizer state are f32.
// - Sizes: element counts are `uint64_t` (Rust u64), row/column counts `uint32_t` (Rust u32);
//   element offsets are computed in 64 bits.
// - Row kernels ("one block per row") need blockDim.x a multiple of 32, at most 1024 (256 is the
//   intended launch); their reductions are deterministic for a given blockDim (fixed shuffle tree,
//   no atomics), so a run is reproducible bit for bit, but the summation order differs from the
//   CPU's sequential sums: results agree with the CPU reference to f32 rounding, not bitwise.
// - Element-wise kernels use __fmul_rn/__fadd_rn/... so nvcc cannot fuse a multiply and an add
//   into an FMA: they perform the CPU reference's operations in its order and precision (Rust never
//   contracts), which makes RoPE, SwiGLU forward, casts, bias adds and AdamW bitwise equal to the
//   CPU reference by construction. Element-wise kernels are grid-stride loops: any grid works.
#pragma once

#ifndef ILREC_EMU  // the host emulator (kernels/emu/emu.h) supplies bf16
#include <cuda_bf16.h>
#endif
#include <stdint.h>

namespace ilrec {

typedef __nv_bfloat16 bf16;

// ---------------------------------------------------------------------------------------------
// Storage <-> f32

__device__ __forceinline__ float ld(float x) { return x; }
__device__ __forceinline__ float ld(bf16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T st(float x);
template <>
__device__ __forceinline__ float st<float>(float x) { return x; }
// Round to nearest even, as PyTorch's `.to(torch.bfloat16)`.
template <>
__device__ __forceinline__ bf16 st<bf16>(float x) { return __float2bfloat16_rn(x); }

// ---------------------------------------------------------------------------------------------
// Exact f32 arithmetic (IEEE round-to-nearest, never fused into an FMA).

__device__ __forceinline__ float fmul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float fadd(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float fsub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float fdiv(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float fsqrt(float a) { return __fsqrt_rn(a); }

// `exp_f32` of engine/backend/cpu/vexp.rs (Cephes expf), operation for operation: same constants
// (the same decimal literals round to the same f32), same fused multiply-adds, same edge cases
// (x < ln(FLT_MIN) -> 0, x > 88.3763 -> +inf, NaN -> NaN). Bitwise equal to the CPU's.
__device__ __forceinline__ float exp_cephes(float x) {
    const float LOG2E = 1.44269504088896340736f;
    const float LN2_HI = 0.6933594f;
    const float LN2_LO = -2.1219444e-4f;
    const float P0 = 1.9875691e-4f;
    const float P1 = 1.3981999e-3f;
    const float P2 = 8.333452e-3f;
    const float P3 = 4.1665796e-2f;
    const float P4 = 1.6666665e-1f;
    const float P5 = 0.5f;
    const float X_MIN = -87.33654f;
    const float X_MAX = 88.37626f;
    if (x != x) return x;
    if (x < X_MIN) return 0.0f;
    if (x > X_MAX) return __int_as_float(0x7f800000);
    const float n = floorf(__fmaf_rn(x, LOG2E, 0.5f));
    const float r = __fmaf_rn(n, -LN2_LO, __fmaf_rn(n, -LN2_HI, x));
    const float z = fmul(r, r);
    float p = __fmaf_rn(P0, r, P1);
    p = __fmaf_rn(p, r, P2);
    p = __fmaf_rn(p, r, P3);
    p = __fmaf_rn(p, r, P4);
    p = __fmaf_rn(p, r, P5);
    const float y = fadd(__fmaf_rn(p, z, r), 1.0f);
    return fmul(y, __int_as_float(((int)n + 127) << 23));
}

// ---------------------------------------------------------------------------------------------
// Deterministic reductions. The xor butterfly leaves the same value in every lane (each step adds
// the same two operands on both sides, and IEEE addition is commutative).

template <typename F>
__device__ __forceinline__ F warp_sum(F v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename F>
__device__ __forceinline__ F warp_max(F v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block, returned to every thread. `sh` is shared scratch of at least 32 elements;
// blockDim.x must be a multiple of 32. Safe to call repeatedly with the same scratch.
template <typename F>
__device__ __forceinline__ F block_sum(F v, F *sh) {
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // the previous call's readers are done with `sh`
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    // Every warp reduces the per-warp sums itself, in the same order: no second broadcast.
    return warp_sum(lane < nwarps ? sh[lane] : F(0));
}

// Max over the block (NaN-ignoring, like Rust's f64::max), returned to every thread.
template <typename F>
__device__ __forceinline__ F block_max(F v, F *sh) {
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    return warp_max(lane < nwarps ? sh[lane] : F(-INFINITY));
}

// Dynamic shared memory (the launch's shared-bytes argument) as `T *name`, 16-byte aligned. Kernels
// declare it only through this macro so that the host emulator (kernels/emu/) can supply it.
#ifndef ILREC_EMU  // kernels/emu/emu.h defines the emulator's version
#define ILREC_DYN_SMEM(T, name)                                         \
    extern __shared__ __align__(16) unsigned char ilrec_dyn_smem_[]; \
    T *name = reinterpret_cast<T *>(ilrec_dyn_smem_)
#endif

// Grid-stride loop over [0, n).
#define ILREC_GRID_STRIDE(i, n)                                                               \
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (uint64_t)(n); \
         i += (uint64_t)gridDim.x * blockDim.x)

}  // namespace ilrec
