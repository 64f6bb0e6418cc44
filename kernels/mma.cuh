// Tensor-core and asynchronous-copy primitives shared by the tiled kernels (fused attention, LoRA
// matmul, probe projection, fused loss), as thin wrappers over inline PTX (sm_80+).
//
// Every warp-collective wrapper here has a host implementation in kernels/emu/ (compiled when
// ILREC_EMU is defined) that follows the fragment layouts written below. Those layouts are the
// contract between the kernels and the emulator: they are transcribed from the PTX ISA
// ("Matrix Fragments for mma.m16n8k16 with floating point type", "ldmatrix"), and both sides must
// read them from here.
//
// Notation: lane = threadIdx.x % 32, g = lane / 4 ("groupID"), t = lane % 4 ("threadID_in_group").
// A bf16 pair packed in a uint32_t holds its lower-index element in the low 16 bits.
//
// mma_bf16_16816: D[16x8] (f32) = A[16x16] (bf16, row-major) * B[16x8] (bf16, "col": K x N) + C.
//   A: a[0] = A[g    ][2t, 2t+1]    a[1] = A[g + 8][2t, 2t+1]
//      a[2] = A[g    ][2t+8, 2t+9]  a[3] = A[g + 8][2t+8, 2t+9]
//   B: b[0] = B[2t, 2t+1][g]        b[1] = B[2t+8, 2t+9][g]        (pairs along K)
//   C, D: c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g + 8][2t, 2t+1]
//
// ldmatrix_x{1,2,4}: loads 1, 2 or 4 8x8 bf16 matrices from shared memory. Lanes 8i..8i+7 give the
//   addresses of rows 0..7 of matrix i (each row 16 contiguous bytes, 16-byte aligned; for x1 and
//   x2 only lanes 0..7 / 0..15 are read, the other lanes' addresses are ignored but must be
//   passed). Register r[i] of every lane receives matrix i's row g, columns 2t and 2t+1.
//   The _trans variants give r[i] = matrix i's column g, rows 2t and 2t+1 (the transpose).
//   So for a row-major 16x16 A tile: lanes 0-15 point at rows 0-15, column 0, and lanes 16-31 at
//   rows 0-15, column 8, and ldmatrix_x4 yields exactly the a[] fragment above.
//
// cp_async_16: 16-byte global -> shared copy that does not pass through registers (cp.async.cg,
//   L2 only); both addresses 16-byte aligned. Visible after cp_async_wait<N>() (at most N most
//   recent commit groups still pending) followed by __syncthreads().
#pragma once

#include "common.cuh"

namespace ilrec {

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    const bf16 l = __float2bfloat16_rn(lo), h = __float2bfloat16_rn(hi);
    return (uint32_t)__bfloat16_as_ushort(l) | ((uint32_t)__bfloat16_as_ushort(h) << 16);
}

__device__ __forceinline__ float2 unpack_bf16x2(uint32_t v) {
    return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}

#ifndef ILREC_EMU

__device__ __forceinline__ void mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void ldmatrix_x1(uint32_t r[1], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t r[1], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}

__device__ __forceinline__ void cp_async_16(void *smem, const void *gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}
// Zero-fills the 16 destination bytes instead of reading when `valid` is false (ragged tiles).
__device__ __forceinline__ void cp_async_16_zfill(void *smem, const void *gmem, bool valid) {
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

#else  // the host emulator: the same wrappers as warp collectives over these layouts

#include "emu/mma_emu.h"

#endif  // ILREC_EMU

}  // namespace ilrec
