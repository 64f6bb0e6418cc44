// Fallback dense GEMM: C = alpha * op(A) @ op(B) + beta * C, row-major, f32 accumulation.
// Used when libcublas cannot be loaded (engine/backend/cuda/blas.rs prefers cuBLAS) and as an
// independent check of the cuBLAS call's operand order. Correct and simple, not fast: a 32x32
// output tile per block of (32, 8) threads, each thread owning 4 rows of one column, with 32-wide
// K tiles staged in padded shared memory (no bank conflicts on the transposed read).
// CPU reference: engine/backend/cpu/matmul.rs.
//
// Layout: A [m, k] ([k, m] when trans_a), B [k, n] ([n, k] when trans_b), C [m, n], row-major.
// beta == 0 overwrites C without reading it (C may hold NaN poison).
// Launch: grid (ceil(n / 32), ceil(m / 32)), block (32, 8) exactly.
#include "common.cuh"

using namespace ilrec;

#define GEMM_TILE 32

template <typename TI, typename TO>
__device__ __forceinline__ void gemm_impl(TO *__restrict__ c, const TI *__restrict__ a, const TI *__restrict__ b,
                                          uint32_t m, uint32_t n, uint32_t k, int trans_a, int trans_b, float alpha,
                                          float beta) {
    __shared__ float as[GEMM_TILE][GEMM_TILE + 1];  // as[row in tile][kk]
    __shared__ float bs[GEMM_TILE][GEMM_TILE + 1];  // bs[kk][col in tile]
    const uint32_t tx = threadIdx.x, ty = threadIdx.y;
    const uint32_t row0 = blockIdx.y * GEMM_TILE, col0 = blockIdx.x * GEMM_TILE;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (uint32_t k0 = 0; k0 < k; k0 += GEMM_TILE) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint32_t r = ty + 8 * i;  // tile row (A) / tile kk (B)
            // A element (row0 + r, k0 + tx)
            const uint32_t ar = row0 + r, ak = k0 + tx;
            float av = 0.0f;
            if (ar < m && ak < k) av = ld(trans_a ? a[(uint64_t)ak * m + ar] : a[(uint64_t)ar * k + ak]);
            as[r][tx] = av;
            // B element (k0 + r, col0 + tx)
            const uint32_t bk = k0 + r, bc = col0 + tx;
            float bv = 0.0f;
            if (bk < k && bc < n) bv = ld(trans_b ? b[(uint64_t)bc * k + bk] : b[(uint64_t)bk * n + bc]);
            bs[r][tx] = bv;
        }
        __syncthreads();
#pragma unroll 8
        for (uint32_t kk = 0; kk < GEMM_TILE; ++kk) {
            const float bv = bs[kk][tx];
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[i] += as[ty + 8 * i][kk] * bv;
        }
        __syncthreads();
    }
    const uint32_t col = col0 + tx;
    if (col >= n) return;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint32_t row = row0 + ty + 8 * i;
        if (row >= m) continue;
        const uint64_t at = (uint64_t)row * n + col;
        float v = alpha * acc[i];
        if (beta != 0.0f) v += beta * ld(c[at]);
        c[at] = st<TO>(v);
    }
}

extern "C" __global__ void __launch_bounds__(256)
gemm_f32(float *c, const float *a, const float *b, uint32_t m, uint32_t n, uint32_t k, int trans_a, int trans_b,
         float alpha, float beta) {
    gemm_impl(c, a, b, m, n, k, trans_a, trans_b, alpha, beta);
}
extern "C" __global__ void __launch_bounds__(256)
gemm_bf16_f32(float *c, const bf16 *a, const bf16 *b, uint32_t m, uint32_t n, uint32_t k, int trans_a, int trans_b,
              float alpha, float beta) {
    gemm_impl(c, a, b, m, n, k, trans_a, trans_b, alpha, beta);
}
extern "C" __global__ void __launch_bounds__(256)
gemm_bf16(bf16 *c, const bf16 *a, const bf16 *b, uint32_t m, uint32_t n, uint32_t k, int trans_a, int trans_b,
          float alpha, float beta) {
    gemm_impl(c, a, b, m, n, k, trans_a, trans_b, alpha, beta);
}
