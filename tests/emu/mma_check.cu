// Test kernels of the emulated mma.cuh wrappers (tests/kernel_emu.rs): written against mma.cuh's
// documented fragment layouts only, the way the tiled kernels use them, and compared on the host
// with an f64 matmul and with the layouts transcribed independently in Rust.
#include "mma.cuh"

using namespace ilrec;

// One warp: C[16x16] (f32, row-major) = A[16x16] B[16x16] (bf16, row-major; B is K x N). Tiles go
// to static shared memory by cp.async, A fragments by ldmatrix_x4, B fragments (two n-tiles of 8)
// by ldmatrix_x4_trans, two mma.
extern "C" __global__ void mma_tile_16x16(float *C, const bf16 *A, const bf16 *B) {
    __shared__ __align__(16) bf16 as[16 * 16];
    __shared__ __align__(16) bf16 bs[16 * 16];
    const unsigned lane = threadIdx.x & 31u;
    const unsigned chunk = (lane / 2) * 16 + (lane % 2) * 8;  // 32 chunks of 8 bf16 per tile
    cp_async_16(&as[chunk], &A[chunk]);
    cp_async_16(&bs[chunk], &B[chunk]);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t a[4], b[4];
    // Lanes 0-15: rows 0-15 at column 0; lanes 16-31: rows 0-15 at column 8 (mma.cuh's recipe).
    ldmatrix_x4(a, &as[(lane % 16) * 16 + (lane / 16) * 8]);
    // Matrices: k 0-7 / k 8-15 of n-tile 0, then of n-tile 1; transposed gives B[2t, 2t+1][g].
    ldmatrix_x4_trans(b, &bs[((lane % 8) + ((lane / 8) % 2) * 8) * 16 + (lane / 16) * 8]);
    const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float d0[4], d1[4];
    mma_bf16_16816(d0, a, b, zero);
    mma_bf16_16816(d1, a, b + 2, zero);
    const unsigned g = lane / 4, t = lane % 4;
    C[g * 16 + 2 * t] = d0[0];
    C[g * 16 + 2 * t + 1] = d0[1];
    C[(g + 8) * 16 + 2 * t] = d0[2];
    C[(g + 8) * 16 + 2 * t + 1] = d0[3];
    C[g * 16 + 8 + 2 * t] = d1[0];
    C[g * 16 + 8 + 2 * t + 1] = d1[1];
    C[(g + 8) * 16 + 8 + 2 * t] = d1[2];
    C[(g + 8) * 16 + 8 + 2 * t + 1] = d1[3];
}

// C[M x N] (f32) = A[M x K] B[K x N] (bf16, row-major), K and N multiples of 8. Block 128 threads
// (4 warps) computes a 64 x 64 tile of C: warp w owns rows 16w..16w+15, all 64 columns. K runs in
// 32-wide stages, double-buffered in dynamic shared memory (2 x (64x32 + 32x64) bf16 = 16 KiB),
// loaded by cp.async with zero fill outside the matrices, one commit group per stage.
// Grid (ceil(N / 64), ceil(M / 64)).
extern "C" __global__ void __launch_bounds__(128)
mma_gemm_bf16(float *__restrict__ C, const bf16 *__restrict__ A, const bf16 *__restrict__ B, uint32_t M, uint32_t N,
              uint32_t K) {
    ILREC_DYN_SMEM(bf16, smem);
    bf16 *As = smem;                // [2][64][32]
    bf16 *Bs = smem + 2 * 64 * 32;  // [2][32][64]
    const unsigned tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const uint32_t m0 = blockIdx.y * 64, n0 = blockIdx.x * 64;
    auto load = [&](unsigned stage, uint32_t k0) {
        for (unsigned c = tid; c < 256; c += 128) {
            const unsigned r = c / 4, q = c % 4;  // A: row r, k chunk q
            const uint32_t gr = m0 + r, gk = k0 + q * 8;
            const bool ok = gr < M && gk < K;
            cp_async_16_zfill(&As[(stage * 64 + r) * 32 + q * 8], ok ? &A[(uint64_t)gr * K + gk] : A, ok);
            const unsigned kk = c / 8, qb = c % 8;  // B: row kk, n chunk qb
            const uint32_t gk2 = k0 + kk, gn = n0 + qb * 8;
            const bool okb = gk2 < K && gn < N;
            cp_async_16_zfill(&Bs[(stage * 32 + kk) * 64 + qb * 8], okb ? &B[(uint64_t)gk2 * N + gn] : B, okb);
        }
        cp_async_commit();
    };
    float acc[8][4];
    for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    const uint32_t stages = (K + 31) / 32;
    load(0, 0);
    for (uint32_t s = 0; s < stages; ++s) {
        if (s + 1 < stages) {
            load((s + 1) & 1u, (s + 1) * 32);
            cp_async_wait<1>();  // stage s has landed, stage s + 1 may still be in flight
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16 *as = As + (s & 1u) * 64 * 32;
        const bf16 *bs = Bs + (s & 1u) * 32 * 64;
        for (unsigned kk = 0; kk < 32; kk += 16) {
            uint32_t a[4];
            ldmatrix_x4(a, &as[(warp * 16 + lane % 16) * 32 + kk + (lane / 16) * 8]);
            for (unsigned nt = 0; nt < 8; nt += 2) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, &bs[(kk + lane % 8 + ((lane / 8) % 2) * 8) * 64 + nt * 8 + (lane / 16) * 8]);
                mma_bf16_16816(acc[nt], a, b, acc[nt]);
                mma_bf16_16816(acc[nt + 1], a, b + 2, acc[nt + 1]);
            }
        }
        __syncthreads();  // the next iteration's load overwrites this stage's buffers
    }
    const unsigned g = lane / 4, t = lane % 4;
    for (unsigned nt = 0; nt < 8; ++nt) {
        const uint32_t col = n0 + nt * 8 + 2 * t;
        for (unsigned h = 0; h < 2; ++h) {
            const uint32_t row = m0 + warp * 16 + g + 8 * h;
            if (row >= M) continue;
            if (col < N) C[(uint64_t)row * N + col] = acc[nt][2 * h];
            if (col + 1 < N) C[(uint64_t)row * N + col + 1] = acc[nt][2 * h + 1];
        }
    }
}

// Every ldmatrix variant on one 32 x 8 bf16 shared tile (4 matrices of 8 x 8, matrix i = rows
// 8i..8i+7), lane l addressing row l: out[variant][lane][reg] (variants x1, x2, x4, x1_trans,
// x2_trans, x4_trans; registers a variant does not write stay 0). One warp.
extern "C" __global__ void ldmatrix_probe(uint32_t *out, const bf16 *tile) {
    __shared__ __align__(16) bf16 ts[32 * 8];
    const unsigned lane = threadIdx.x & 31u;
    for (unsigned e = 0; e < 8; ++e) ts[lane * 8 + e] = tile[lane * 8 + e];
    __syncwarp();
    uint32_t r[6][4] = {};
    const bf16 *row = &ts[lane * 8];
    ldmatrix_x1(r[0], row);
    ldmatrix_x2(r[1], row);
    ldmatrix_x4(r[2], row);
    ldmatrix_x1_trans(r[3], row);
    ldmatrix_x2_trans(r[4], row);
    ldmatrix_x4_trans(r[5], row);
    for (unsigned v = 0; v < 6; ++v)
        for (unsigned i = 0; i < 4; ++i) out[(v * 32 + lane) * 4 + i] = r[v][i];
}
