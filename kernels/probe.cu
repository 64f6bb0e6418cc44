// ILRec's intermediate-layer probe ("logit lens", ILREC.md section 2) for up to 8 probed blocks at
// once: z^l[r, j] = RMSNorm_final(h^l[pos[r]]) · W_head[cand[j]] for every layer l in one launch,
// with the final RMSNorm fused into the projection and each LM-head tile read once for all layers.
// CPU reference: engine/train/backprop.rs (gather_rows, cpu::rms_norm, matmul_nt onto
// `gather_head_rows(candidates)`), engine/model/forward.rs's probes.
//
// The fusion: RMSNorm(x) · w = rstd(x) * ((x ⊙ g) · w), so the block streams x ⊙ g (rounded to
// bf16, the GEMM's A operand) while it sums x² for rstd, and scales the f32 accumulators by rstd
// at the end: no normed rows are stored. The bf16 rounding sits on x ⊙ g rather than on the
// normed value; the relative error is the same 2^-9.
//
// Layouts: x_l [n, h] f32 per layer (the residual stream after block l; up to 8 pointers, unused
// ones null), pos [m] u32 rows of x to probe, gamma [h] f32 (the final norm's weight), head
// [V, h] bf16, cand [S] u32 (< V, checked by the launcher), z [L, m, S] f32. h % 8 == 0.
// Launch: grid (ceil(S/64), ceil(m/16)), block 128 (4 warps x 16 candidate columns).
// The ensemble, V_N and w come in the next pass (loss.cu: loss_rows), which also needs the final
// layer's log-sum-exp; the backward of L_CPD into h^l is dz^l · W_S then the RMSNorm backward.
//
// Status: compiled, unverified on GPU.
// Versions: v1 (this one): one cp.async stage, f32 x loaded through registers. Not measured.
#include "mma.cuh"

using namespace ilrec;

namespace {
constexpr int LMAX = 8, PBM = 16, PBN = 64, PBK = 32, PPITCH = PBK + 8, PTHREADS = 128;
}

extern "C" __global__ void __launch_bounds__(PTHREADS)
probe_project_bf16(float *__restrict__ z, const float *x0, const float *x1, const float *x2, const float *x3,
                   const float *x4, const float *x5, const float *x6, const float *x7,
                   const uint32_t *__restrict__ pos, const float *__restrict__ gamma, const bf16 *__restrict__ head,
                   const uint32_t *__restrict__ cand, uint32_t m, uint32_t S, uint32_t h, uint32_t L, float eps) {
    __shared__ __align__(16) bf16 as[LMAX][PBM][PPITCH];
    __shared__ __align__(16) bf16 ws[PBN][PPITCH];
    __shared__ float rstd[LMAX][PBM];
    const float *xs[LMAX] = {x0, x1, x2, x3, x4, x5, x6, x7};
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const uint32_t col0 = blockIdx.x * PBN, row0 = blockIdx.y * PBM;
    // This thread's A piece: row ar, four columns from ac.
    const int ar = threadIdx.x >> 3, ac = (threadIdx.x & 7) * 4;
    const uint32_t arow = row0 + ar;
    const bool arow_ok = arow < m;
    const uint64_t xrow = arow_ok ? (uint64_t)pos[arow] * h : 0;
    float acc[LMAX][2][4];
    float ss[LMAX];
#pragma unroll
    for (int l = 0; l < LMAX; ++l) {
        ss[l] = 0.0f;
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[l][j][e] = 0.0f;
    }
    for (uint32_t k0 = 0; k0 < h; k0 += PBK) {
        // LM-head rows of the candidates: 64 rows x 4 pieces of 16 bytes.
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int c = threadIdx.x + i * PTHREADS;
            const int r = c >> 2, kc = (c & 3) * 8;
            const uint32_t j = col0 + r, k = k0 + kc;
            const bool ok = j < S && k < h;
            cp_async_16_zfill(&ws[r][kc], ok ? head + (uint64_t)cand[j] * h + k : head, ok);
        }
        cp_async_commit();
        const uint32_t k = k0 + ac;
        float4 gv = make_float4(0.f, 0.f, 0.f, 0.f);
        if (k < h) gv = *reinterpret_cast<const float4 *>(gamma + k);
#pragma unroll
        for (int l = 0; l < LMAX; ++l) {
            if (l < (int)L) {
                float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
                if (arow_ok && k < h) v = *reinterpret_cast<const float4 *>(xs[l] + xrow + k);
                ss[l] += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
                uint2 p;
                p.x = pack_bf16x2(v.x * gv.x, v.y * gv.y);
                p.y = pack_bf16x2(v.z * gv.z, v.w * gv.w);
                *reinterpret_cast<uint2 *>(&as[l][ar][ac]) = p;
            }
        }
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < PBK; kk += 16) {
            uint32_t b[2][2];
            {
                const int mi = lane >> 3, r = lane & 7;
                uint32_t t4[4];
                ldmatrix_x4(t4, &ws[warp * 16 + (mi >> 1) * 8 + r][kk + (mi & 1) * 8]);
                b[0][0] = t4[0];
                b[0][1] = t4[1];
                b[1][0] = t4[2];
                b[1][1] = t4[3];
            }
#pragma unroll
            for (int l = 0; l < LMAX; ++l) {
                if (l < (int)L) {
                    uint32_t a[4];
                    ldmatrix_x4(a, &as[l][lane & 15][kk + (lane >> 4) * 8]);
                    mma_bf16_16816(acc[l][0], a, b[0], acc[l][0]);
                    mma_bf16_16816(acc[l][1], a, b[1], acc[l][1]);
                }
            }
        }
        __syncthreads();
    }
    // rstd per (layer, row): the 8 threads of a row are 8 consecutive lanes.
#pragma unroll
    for (int l = 0; l < LMAX; ++l) {
        float s = ss[l];
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        s += __shfl_xor_sync(0xffffffffu, s, 4);
        if ((threadIdx.x & 7) == 0) rstd[l][ar] = 1.0f / sqrtf(s / (float)h + eps);
    }
    __syncthreads();
#pragma unroll
    for (int l = 0; l < LMAX; ++l) {
        if (l >= (int)L) continue;
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = g + (e >> 1) * 8;
                const uint32_t row = row0 + r, col = col0 + warp * 16 + j * 8 + 2 * t + (e & 1);
                if (row < m && col < S) z[((uint64_t)l * m + row) * S + col] = acc[l][j][e] * rstd[l][r];
            }
    }
}

// =============================================================================================
// The probe rows the backward needs, one block per (row, layer), block 128 (a multiple of 32):
// probe_normed_f32 writes out[l, r] = RMSNorm_final(x_l[pos[r]]) (f32 [L, m, h], cpu::rms_norm's
// formula: the LM-head row gradients multiply it), and probe_norm_bwd_f32 writes
// dx_l[r] = the RMSNorm backward of dn[l, r] at x_l[pos[r]] (cpu::rms_norm_backward into a zeroed
// row: r dn g - x r^3/h (dn g · x)), one [m, h] f32 output per layer (the gradient each probed
// block's output receives). Grid (m, L).

namespace {
// Sum of squares of x and, with dn, the dot (dn ⊙ g) · x, over the row.
__device__ __forceinline__ float2 row_stats(const float *x, const float *dn, const float *gamma, uint32_t h, float *sh) {
    float ss = 0.0f, dot = 0.0f;
    for (uint32_t i = threadIdx.x; i < h; i += blockDim.x) {
        ss += x[i] * x[i];
        if (dn != nullptr) dot += dn[i] * gamma[i] * x[i];
    }
    ss = block_sum(ss, sh);
    if (dn != nullptr) dot = block_sum(dot, sh);
    return make_float2(ss, dot);
}

__device__ __forceinline__ const float *pick(uint32_t l, const float *x0, const float *x1, const float *x2, const float *x3,
                                             const float *x4, const float *x5, const float *x6, const float *x7) {
    switch (l) {
        case 0: return x0;
        case 1: return x1;
        case 2: return x2;
        case 3: return x3;
        case 4: return x4;
        case 5: return x5;
        case 6: return x6;
        default: return x7;
    }
}
}  // namespace

extern "C" __global__ void __launch_bounds__(1024)
probe_normed_f32(float *__restrict__ out, const float *x0, const float *x1, const float *x2, const float *x3,
                 const float *x4, const float *x5, const float *x6, const float *x7, const uint32_t *__restrict__ pos,
                 const float *__restrict__ gamma, uint32_t m, uint32_t h, float eps) {
    __shared__ float sh[32];
    const uint32_t row = blockIdx.x, l = blockIdx.y;
    const float *x = pick(l, x0, x1, x2, x3, x4, x5, x6, x7) + (uint64_t)pos[row] * h;
    const float2 st = row_stats(x, nullptr, gamma, h, sh);
    const float inv = 1.0f / sqrtf(st.x / (float)h + eps);
    float *o = out + ((uint64_t)l * m + row) * h;
    for (uint32_t i = threadIdx.x; i < h; i += blockDim.x) o[i] = gamma[i] * (x[i] * inv);
}

extern "C" __global__ void __launch_bounds__(1024)
probe_norm_bwd_f32(float *d0, float *d1, float *d2, float *d3, float *d4, float *d5, float *d6, float *d7,
                   const float *__restrict__ dn, const float *x0, const float *x1, const float *x2, const float *x3,
                   const float *x4, const float *x5, const float *x6, const float *x7, const uint32_t *__restrict__ pos,
                   const float *__restrict__ gamma, uint32_t m, uint32_t h, float eps) {
    __shared__ float sh[32];
    const uint32_t row = blockIdx.x, l = blockIdx.y;
    const float *x = pick(l, x0, x1, x2, x3, x4, x5, x6, x7) + (uint64_t)pos[row] * h;
    float *dx = const_cast<float *>(pick(l, d0, d1, d2, d3, d4, d5, d6, d7)) + (uint64_t)row * h;
    const float *d = dn + ((uint64_t)l * m + row) * h;
    const float2 st = row_stats(x, d, gamma, h, sh);
    const float r = 1.0f / sqrtf(st.x / (float)h + eps);
    const float c = r * r * r / (float)h * st.y;
    for (uint32_t i = threadIdx.x; i < h; i += blockDim.x) dx[i] = r * d[i] * gamma[i] - x[i] * c;
}
