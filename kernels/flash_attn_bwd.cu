// Fused (flash) causal grouped-query attention, backward: dQ, dK, dV from the forward's saved
// log-sum-exp (P recomputed, never stored), bf16 operands on tensor cores (mma.sync m16n8k16),
// f32 accumulation. Deterministic: no atomics; every output element is written by one thread
// after a fixed-order loop. Status: compiled, unverified on GPU.
//
// What it computes is engine/backend/cpu/backward.rs `attention_backward` (training: past = 0,
// cap = t): with p_ij = exp(s_ij - lse_i) over visible keys (j <= i, key_mask[b, j] != 0),
// s_ij = q_i . k_j * scale, dp_ij = dout_i . v_j, delta_i = sum_j p_ij dp_ij = dout_i . out_i,
// ds_ij = p_ij (dp_ij - delta_i) scale: dq_i = sum_j ds_ij k_j, dk_j = sum_{h in group, i} ds_ij q_i,
// dv_j = sum_{h in group, i} p_ij dout_i. A masked key gets dk = dv = 0; a query that sees no key
// (lse = -inf) gets dq = 0.
//
// Layouts (row-major):
//   q                 [batch * t, n_heads * D]          bf16
//   k, v              [batch, n_kv_heads, t, D]         bf16
//   out, dout         [batch * t, n_heads * D]          f32 (flash_attn_fwd's out)
//   dout_bf16         [batch * t, n_heads * D]          bf16 (written by the prep kernel)
//   lse, delta        [batch, n_heads, t]               f32
//   key_mask          [batch, t]                        u8
//   dq                [batch * t, n_heads * D]          f32
//   dk, dv            [batch, n_kv_heads, t, D]         f32
//
// Three kernels, launched in this order on one stream:
//   flash_attn_bwd_prep        dout in bf16 for the tensor cores, and delta_i = bf16(dout_i) . out_i
//                              (f32, a fixed warp tree): the same rounded dout as dP = dO V^T uses,
//                              so that sum_j p_ij (dp_ij - delta_i) stays ~0 as it must. With the
//                              f32 dout here instead, every ds of a row carries the rounding
//                              difference (emulator, d 128, t 130: dk 9.8e-3 -> 3.6e-3, dq 6.9e-3
//                              -> 3.6e-3 max-norm relative error). grid: any (grid-stride over
//                              rows, one warp per row), block 256.
//   flash_attn_bwd_dkdv_d{D}   one block per (64-key tile, KV head, sequence): dK and dV of its 64
//                              keys stay in registers (16 keys per warp) while it walks the group's
//                              query heads and the query tiles at or after its keys in a fixed
//                              order: S^T = K Q^T, P^T, dP^T = V dO^T, dS^T, dV += P^T dO,
//                              dK += dS^T Q. grid (ceil(t / 64), n_kv_heads, batch), block 128.
//   flash_attn_bwd_dq_d{D}     one block per (64-query tile, head, sequence): Q and dO in
//                              registers, K/V tiles double-buffered by cp.async: S, P, dP, dS,
//                              dQ += dS K. grid (ceil(t / 64), n_heads, batch), block 128.
// Tiles wholly below the diagonal whose keys are all real skip the per-element mask (decided
// uniformly with __syncthreads_and).
// Splitting dK/dV from dQ is what makes it deterministic without atomics: each owner recomputes
// S and dP itself (7 tile products per (query, key) tile pair instead of FA2's 5 with an atomic dQ).
//
// Query/key tile sizes trade registers: D = 128 keeps 2 x 64 f32 accumulators (dK, dV or Q, dO
// fragments plus dQ) per thread, so its inner tiles are 32 wide to stay under 255 registers
// without spills; D <= 80 uses 64. Shared memory stays within the 48 KiB a launch gets without
// an opt-in (dkdv: K, V tiles of 64 rows + Q, dO tiles of BQ rows; dq: two K/V stages).
//
// Versions: v1 (this file). Measured: nothing yet (no GPU has run it).
#include "flash_attn.cuh"

using namespace ilrec;
using namespace ilrec::flash;

namespace {

constexpr int NT = 128;  // threads per block (4 warps)
constexpr int BK = 64;   // keys per dkdv block
constexpr int BQ_DQ = 64;  // queries per dq block

// Inner tile width (queries per step in dkdv, keys per step in dq).
template <int D>
struct Inner {
    static constexpr int N = D > 80 ? 32 : 64;
};

template <int D>
__device__ __forceinline__ void bwd_dkdv(float *__restrict__ dk, float *__restrict__ dv, const bf16 *__restrict__ q,
                                         const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                                         const bf16 *__restrict__ dout, const float *__restrict__ lse,
                                         const float *__restrict__ delta, const uint8_t *__restrict__ key_mask,
                                         uint32_t t, uint32_t n_heads, uint32_t n_kv_heads, float scale) {
    using TL = Tile<D>;
    constexpr int BQ = Inner<D>::N;
    constexpr int KS = D / 16, NTD = D / 8, NTQ = BQ / 8;
    ILREC_DYN_SMEM(unsigned char, smem);
    unsigned char *s_k = smem;
    unsigned char *s_v = s_k + BK * TL::ROW_BYTES;
    unsigned char *s_q = s_v + BK * TL::ROW_BYTES;
    unsigned char *s_do = s_q + BQ * TL::ROW_BYTES;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g8 = lane >> 2, t4 = lane & 3;
    const int T = (int)t;
    const int j0 = (int)blockIdx.x * BK, kvh = (int)blockIdx.y, b = (int)blockIdx.z;
    const int group = (int)(n_heads / n_kv_heads);
    const uint64_t q_width = (uint64_t)n_heads * D;
    const uint64_t kv0 = ((uint64_t)b * n_kv_heads + kvh) * t * D;
    const uint8_t *mask_b = key_mask + (uint64_t)b * t;
    const float scale_log2 = scale * LOG2E;

    load_tile<D, BK, NT>(s_k, [&](int r) { return k + kv0 + (uint64_t)(j0 + r) * D; }, [&](int r) { return j0 + r < T; });
    load_tile<D, BK, NT>(s_v, [&](int r) { return v + kv0 + (uint64_t)(j0 + r) * D; }, [&](int r) { return j0 + r < T; });
    cp_async_commit();

    float dk_acc[NTD][4], dv_acc[NTD][4];
#pragma unroll
    for (int x = 0; x < NTD; ++x)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk_acc[x][e] = dv_acc[x][e] = 0.0f;

    const int krow = warp * 16;  // this warp's 16 keys within the tile
    const int i_first = (j0 / BQ) * BQ;  // queries before j0 see none of these keys
    // Whether all of this block's keys are real and written: then query tiles wholly after them
    // skip the per-element mask.
    const bool keys_full = __syncthreads_and(threadIdx.x >= BK || (j0 + (int)threadIdx.x < T && mask_b[j0 + threadIdx.x] != 0));
    for (int hh = 0; hh < group; ++hh) {
        const int h = kvh * group + hh;
        const uint64_t stat = ((uint64_t)b * n_heads + h) * t;
        for (int i0 = i_first; i0 < T; i0 += BQ) {
            auto row = [&](const bf16 *base) {
                return [=](int r) { return base + ((uint64_t)b * t + i0 + r) * q_width + (uint64_t)h * D; };
            };
            auto in_range = [&](int r) { return i0 + r < T; };
            load_tile<D, BQ, NT>(s_q, row(q), in_range);
            load_tile<D, BQ, NT>(s_do, row(dout), in_range);
            cp_async_commit();
            cp_async_wait<0>();
            __syncthreads();

            // S^T = K Q^T and dP^T = V dO^T: rows = this warp's keys, columns = the tile's queries.
            float s[NTQ][4], dp[NTQ][4];
#pragma unroll
            for (int x = 0; x < NTQ; ++x)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[x][e] = dp[x][e] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
                uint32_t ka[4], va[4];
                ldmatrix_x4(ka, s_k + TL::off(krow + (lane & 15), 2 * ks + (lane >> 4)));
                ldmatrix_x4(va, s_v + TL::off(krow + (lane & 15), 2 * ks + (lane >> 4)));
#pragma unroll
                for (int np = 0; np < NTQ / 2; ++np) {
                    uint32_t b0[2], b1[2];
                    load_bt_pair<D>(b0, b1, s_q, np * 16, ks);
                    mma_bf16_16816(s[2 * np], ka, b0, s[2 * np]);
                    mma_bf16_16816(s[2 * np + 1], ka, b1, s[2 * np + 1]);
                    load_bt_pair<D>(b0, b1, s_do, np * 16, ks);
                    mma_bf16_16816(dp[2 * np], va, b0, dp[2 * np]);
                    mma_bf16_16816(dp[2 * np + 1], va, b1, dp[2 * np + 1]);
                }
            }
            // P^T and dS^T. Accumulator e of n-tile x: key j0 + krow + g8 + 8 (e >> 1), query
            // i0 + 8 x + 2 t4 + (e & 1).
            const bool no_mask = keys_full && i0 >= j0 + BK - 1 && i0 + BQ <= T;
#pragma unroll
            for (int x = 0; x < NTQ; ++x) {
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int i = i0 + 8 * x + 2 * t4 + c;
                    const bool live = i < T;
                    const float l2 = live ? lse[stat + i] * LOG2E : 0.0f;
                    const float dl = live ? delta[stat + i] : 0.0f;
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const int j = j0 + krow + g8 + 8 * half, e = 2 * half + c;
                        const bool vis = no_mask || (live && visible(j, i, T, mask_b));
                        const float p = vis ? exp2f(s[x][e] * scale_log2 - l2) : 0.0f;
                        s[x][e] = p;
                        dp[x][e] = p * (dp[x][e] - dl) * scale;
                    }
                }
            }
            // dV += P^T dO, dK += dS^T Q (k dimension = the tile's queries).
#pragma unroll
            for (int kk = 0; kk < BQ / 16; ++kk) {
                uint32_t pa[4], dsa[4];
                acc_to_a(pa, s[2 * kk], s[2 * kk + 1]);
                acc_to_a(dsa, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
                for (int dpair = 0; dpair < NTD / 2; ++dpair) {
                    uint32_t b0[2], b1[2];
                    load_b_pair<D>(b0, b1, s_do, kk * 16, dpair);
                    mma_bf16_16816(dv_acc[2 * dpair], pa, b0, dv_acc[2 * dpair]);
                    mma_bf16_16816(dv_acc[2 * dpair + 1], pa, b1, dv_acc[2 * dpair + 1]);
                    load_b_pair<D>(b0, b1, s_q, kk * 16, dpair);
                    mma_bf16_16816(dk_acc[2 * dpair], dsa, b0, dk_acc[2 * dpair]);
                    mma_bf16_16816(dk_acc[2 * dpair + 1], dsa, b1, dk_acc[2 * dpair + 1]);
                }
            }
            __syncthreads();  // every warp is done with this Q / dO tile
        }
    }
    cp_async_wait<0>();  // t == 0 never launches, but a block with no query tile still owns its copies

#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int j = j0 + krow + g8 + 8 * half;
        if (j >= T) continue;
        const uint64_t at = kv0 + (uint64_t)j * D + 2 * t4;
#pragma unroll
        for (int x = 0; x < NTD; ++x) {
            *reinterpret_cast<float2 *>(dk + at + 8 * x) = make_float2(dk_acc[x][2 * half], dk_acc[x][2 * half + 1]);
            *reinterpret_cast<float2 *>(dv + at + 8 * x) = make_float2(dv_acc[x][2 * half], dv_acc[x][2 * half + 1]);
        }
    }
}

template <int D>
__device__ __forceinline__ void bwd_dq(float *__restrict__ dq, const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                                       const bf16 *__restrict__ v, const bf16 *__restrict__ dout,
                                       const float *__restrict__ lse, const float *__restrict__ delta,
                                       const uint8_t *__restrict__ key_mask, uint32_t t, uint32_t n_heads,
                                       uint32_t n_kv_heads, float scale) {
    using TL = Tile<D>;
    constexpr int BN = Inner<D>::N;
    constexpr int KS = D / 16, NTD = D / 8, NTN = BN / 8;
    constexpr int STAGE = 2 * BN * TL::ROW_BYTES;  // one K tile and one V tile
    ILREC_DYN_SMEM(unsigned char, smem);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g8 = lane >> 2, t4 = lane & 3;
    const int T = (int)t;
    const int m0 = (int)(gridDim.x - 1 - blockIdx.x) * BQ_DQ;  // the longest rows first
    const int h = (int)blockIdx.y, b = (int)blockIdx.z;
    const int kvh = h / (int)(n_heads / n_kv_heads);
    const uint64_t q_width = (uint64_t)n_heads * D;
    const uint64_t kv0 = ((uint64_t)b * n_kv_heads + kvh) * t * D;
    const uint8_t *mask_b = key_mask + (uint64_t)b * t;
    const float scale_log2 = scale * LOG2E;

    // Q and dO through shared memory into A fragments; the space then holds the K/V stages.
    auto row = [&](const bf16 *base) {
        return [=](int r) { return base + ((uint64_t)b * t + m0 + r) * q_width + (uint64_t)h * D; };
    };
    auto in_range = [&](int r) { return m0 + r < T; };
    load_tile<D, BQ_DQ, NT>(smem, row(q), in_range);
    load_tile<D, BQ_DQ, NT>(smem + BQ_DQ * TL::ROW_BYTES, row(dout), in_range);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t qf[KS][4], dof[KS][4];
    load_a_frags<D>(qf, smem, warp * 16);
    load_a_frags<D>(dof, smem + BQ_DQ * TL::ROW_BYTES, warp * 16);
    __syncthreads();

    int last[2];
    float l2[2], dl[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int i = m0 + warp * 16 + g8 + 8 * half;
        const bool live = i < T;
        last[half] = live ? i : -1;
        const uint64_t at = ((uint64_t)b * n_heads + h) * t + i;
        l2[half] = live ? lse[at] * LOG2E : 0.0f;
        dl[half] = live ? delta[at] : 0.0f;
    }
    float dq_acc[NTD][4];
#pragma unroll
    for (int x = 0; x < NTD; ++x) dq_acc[x][0] = dq_acc[x][1] = dq_acc[x][2] = dq_acc[x][3] = 0.0f;

    const int tiles = (min(m0 + BQ_DQ, T) + BN - 1) / BN;
    auto load_stage = [&](int jt) {
        unsigned char *st = smem + (jt & 1) * STAGE;
        const int n0 = jt * BN;
        load_tile<D, BN, NT>(st, [&](int r) { return k + kv0 + (uint64_t)(n0 + r) * D; }, [&](int r) { return n0 + r < T; });
        load_tile<D, BN, NT>(st + BN * TL::ROW_BYTES, [&](int r) { return v + kv0 + (uint64_t)(n0 + r) * D; },
                             [&](int r) { return n0 + r < T; });
    };
    load_stage(0);
    cp_async_commit();
    for (int jt = 0; jt < tiles; ++jt) {
        if (jt + 1 < tiles) load_stage(jt + 1);
        cp_async_commit();
        cp_async_wait<1>();  // stage jt has landed
        const int n0 = jt * BN;
        // The barrier also decides, uniformly, whether the tile needs the per-element mask: not
        // when every key is real, written, and at or before the block's first query.
        const bool keys_real = __syncthreads_and(threadIdx.x >= BN || (n0 + (int)threadIdx.x < T && mask_b[n0 + threadIdx.x] != 0));
        const bool no_mask = keys_real && n0 + BN - 1 <= m0 && m0 + BQ_DQ <= T;
        const unsigned char *s_k = smem + (jt & 1) * STAGE;
        const unsigned char *s_v = s_k + BN * TL::ROW_BYTES;

        float s[NTN][4], dp[NTN][4];
#pragma unroll
        for (int x = 0; x < NTN; ++x)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[x][e] = dp[x][e] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
            for (int np = 0; np < NTN / 2; ++np) {
                uint32_t b0[2], b1[2];
                load_bt_pair<D>(b0, b1, s_k, np * 16, ks);
                mma_bf16_16816(s[2 * np], qf[ks], b0, s[2 * np]);
                mma_bf16_16816(s[2 * np + 1], qf[ks], b1, s[2 * np + 1]);
                load_bt_pair<D>(b0, b1, s_v, np * 16, ks);
                mma_bf16_16816(dp[2 * np], dof[ks], b0, dp[2 * np]);
                mma_bf16_16816(dp[2 * np + 1], dof[ks], b1, dp[2 * np + 1]);
            }
        }
        // dS; accumulator e of n-tile x: query row g8 + 8 (e >> 1), key n0 + 8 x + 2 t4 + (e & 1).
#pragma unroll
        for (int x = 0; x < NTN; ++x) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = n0 + 8 * x + 2 * t4 + (e & 1), half = e >> 1;
                const bool vis = no_mask || visible(j, last[half], T, mask_b);
                const float p = vis ? exp2f(s[x][e] * scale_log2 - l2[half]) : 0.0f;
                dp[x][e] = p * (dp[x][e] - dl[half]) * scale;
            }
        }
        // dQ += dS K (k dimension = the tile's keys).
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t dsa[4];
            acc_to_a(dsa, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
            for (int dpair = 0; dpair < NTD / 2; ++dpair) {
                uint32_t b0[2], b1[2];
                load_b_pair<D>(b0, b1, s_k, kk * 16, dpair);
                mma_bf16_16816(dq_acc[2 * dpair], dsa, b0, dq_acc[2 * dpair]);
                mma_bf16_16816(dq_acc[2 * dpair + 1], dsa, b1, dq_acc[2 * dpair + 1]);
            }
        }
        __syncthreads();  // every warp is done with stage jt before it is refilled
    }
    cp_async_wait<0>();

#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int i = m0 + warp * 16 + g8 + 8 * half;
        if (i >= T) continue;
        float *drow = dq + ((uint64_t)b * t + i) * q_width + (uint64_t)h * D + 2 * t4;
#pragma unroll
        for (int x = 0; x < NTD; ++x)
            *reinterpret_cast<float2 *>(drow + 8 * x) = make_float2(dq_acc[x][2 * half], dq_acc[x][2 * half + 1]);
    }
}

}  // namespace

// delta[b, h, i] = bf16(dout_i) . out_i over the head's d values (a fixed warp tree), and dout in bf16.
// rows = batch * t * n_heads; row r = (b * t + i) * n_heads + h.
extern "C" __global__ void __launch_bounds__(256)
flash_attn_bwd_prep(float *delta, bf16 *dout_bf16, const float *dout, const float *out, uint32_t batch, uint32_t t,
                    uint32_t n_heads, uint32_t d) {
    const uint64_t rows = (uint64_t)batch * t * n_heads;
    const uint32_t lane = threadIdx.x & 31u;
    const uint64_t warps = (uint64_t)gridDim.x * (blockDim.x >> 5);
    for (uint64_t r = (uint64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
        const uint64_t base = r * d;
        float acc = 0.0f;
        for (uint32_t x = lane; x < d; x += 32) {
            const bf16 g = __float2bfloat16_rn(dout[base + x]);
            acc = __fmaf_rn(__bfloat162float(g), out[base + x], acc);
            dout_bf16[base + x] = g;
        }
        acc = warp_sum(acc);
        if (lane == 0) {
            const uint64_t h = r % n_heads, bi = r / n_heads;
            delta[(bi / t * n_heads + h) * t + bi % t] = acc;
        }
    }
}

#define ILREC_FLASH_BWD(D)                                                                                          \
    extern "C" __global__ void __launch_bounds__(NT)                                                                \
        flash_attn_bwd_dkdv_d##D(float *dk, float *dv, const bf16 *q, const bf16 *k, const bf16 *v,                \
                                 const bf16 *dout_bf16, const float *lse, const float *delta,                       \
                                 const uint8_t *key_mask, uint32_t t, uint32_t n_heads, uint32_t n_kv_heads,        \
                                 float scale) {                                                                     \
        bwd_dkdv<D>(dk, dv, q, k, v, dout_bf16, lse, delta, key_mask, t, n_heads, n_kv_heads, scale);              \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(NT)                                                                \
        flash_attn_bwd_dq_d##D(float *dq, const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout_bf16,       \
                               const float *lse, const float *delta, const uint8_t *key_mask, uint32_t t,           \
                               uint32_t n_heads, uint32_t n_kv_heads, float scale) {                                \
        bwd_dq<D>(dq, q, k, v, dout_bf16, lse, delta, key_mask, t, n_heads, n_kv_heads, scale);                    \
    }
ILREC_FLASH_BWD(64)
ILREC_FLASH_BWD(80)
ILREC_FLASH_BWD(128)
