// Kernels with the bugs the emulator must report (tests/kernel_emu.rs `emulator_reports_*`), and
// warp collectives with host-checkable results. Never compiled by nvcc (tests/ is not kernels/).
#include "mma.cuh"

using namespace ilrec;

// The first warp returns early; the others wait at a barrier it never reaches.
extern "C" __global__ void early_return_then_sync(float *out) {
    if (threadIdx.x < 32) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// Odd and even threads at two different barriers.
extern "C" __global__ void divergent_barriers(float *out) {
    if (threadIdx.x & 1u) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}

// Reads a neighbour's shared slot with (sync != 0) or without a barrier in between.
extern "C" __global__ void neighbour_exchange(float *out, int sync) {
    __shared__ float sh[64];
    sh[threadIdx.x] = (float)threadIdx.x;
    if (sync) __syncthreads();
    out[threadIdx.x] = sh[(threadIdx.x + 1) % blockDim.x];
}

// Reads its own cp.async destination before (wait == 0) or after (wait != 0) cp_async_wait.
extern "C" __global__ void cp_async_early_read(float *out, const float *in, int wait) {
    ILREC_DYN_SMEM(float, tile);
    const unsigned t = threadIdx.x;  // 8 threads x 4 floats
    cp_async_16(&tile[4 * t], &in[4 * t]);
    cp_async_commit();
    if (wait) cp_async_wait<0>();
    __syncthreads();
    for (unsigned e = 0; e < 4; ++e) out[4 * t + e] = tile[4 * t + e];
}

// Lanes 0-15 shuffle with mask 0x0000ffff but read lane 20.
extern "C" __global__ void shuffle_outside_mask(float *out) {
    if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1.0f, 20);
}

extern "C" __global__ void traps(float *out) {
    if (threadIdx.x == 5) __trap();
    out[threadIdx.x] = 1.0f;
}

// Misaligned ldmatrix row address (8-byte offset).
extern "C" __global__ void ldmatrix_misaligned(uint32_t *out) {
    __shared__ __align__(16) bf16 t[8 * 8 + 4];
    for (unsigned e = threadIdx.x; e < 68; e += 32) t[e] = __float2bfloat16_rn(0.0f);
    __syncwarp();
    uint32_t r[1];
    ldmatrix_x1(r, &t[4 + (threadIdx.x % 8) * 8]);
    out[threadIdx.x] = r[0];
}

// Warp collectives over a 48-thread block (a full warp and a partial one of 16 lanes):
// out[tid * 8 + k] = idx(src = lane ^ 3), up 1 (width 8), down 2 (width 8), xor 4, ballot(v odd),
// any(v > 40), all(v >= 0), warp_sum (shuffle tree over the warp's existing lanes, via
// shfl_down with width 16 for the partial warp).
extern "C" __global__ void warp_collectives(int *out, const int *in) {
    const unsigned tid = threadIdx.x, lane = tid & 31u;
    const unsigned mask = __activemask();
    const int v = in[tid];
    int *o = out + tid * 8;
    o[0] = __shfl_sync(mask, v, (int)((lane ^ 3u) & 15u) | (int)(lane & 16u), 32);
    o[1] = __shfl_up_sync(mask, v, 1, 8);
    o[2] = __shfl_down_sync(mask, v, 2, 8);
    o[3] = __shfl_xor_sync(mask, v, 4);
    o[4] = (int)__ballot_sync(mask, v & 1);
    o[5] = __any_sync(mask, v > 40);
    o[6] = __all_sync(mask, v >= 0);
    int s = v;
    for (int d = 8; d > 0; d >>= 1) s += __shfl_down_sync(mask, s, d, 16);
    o[7] = s;
}

// Recursion deep enough to overflow a fiber's stack (the runtime reports it before dying).
__device__ __noinline__ int deep(volatile int *p, int n) {
    volatile char pad[4096];
    pad[0] = (char)n;
    return n == 0 ? *p : deep(p, n - 1) + pad[0];
}
extern "C" __global__ void overflow_stack(int *out, int n) { out[threadIdx.x] = deep(out, n); }

// Reads n floats starting at `offset` (past the end of a guarded buffer when offset + n > its length).
extern "C" __global__ void read_at(float *out, const float *in, uint32_t offset) { out[threadIdx.x] = in[offset + threadIdx.x]; }
