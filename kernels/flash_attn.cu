// Fused (flash) causal grouped-query attention, forward: bf16 Q, K, V on tensor cores (mma.sync
// m16n8k16, ldmatrix, cp.async), f32 softmax statistics and accumulation, never materialising the
// score matrix. Also the decoding path (split-KV: several blocks share one query row's keys and a
// combine kernel merges their partial results). Status: compiled, unverified on GPU.
//
// What it computes is kernels/attention.cu's attention_fwd (CPU reference:
// engine/backend/cpu/attention.rs `attention`): per sequence b and query head h (KV head
// g = h / group, group = n_heads / n_kv_heads), query i (absolute position past + i) sees key j iff
// j <= past + i and key_mask[b, j] != 0; out_i = softmax_j(q_i . k_j * scale) v_j, lse_i = the
// log-sum-exp of the visible scores; a query that sees no key gets zeros and lse = -inf.
//
// Layouts (row-major):
//   q        [batch * tq, n_heads * D]               bf16
//   k, v     [batch, n_kv_heads, cap, D]             bf16 (rows >= past + tq are never read)
//   key_mask [batch, cap]                            u8, nonzero = a real key
//   out      [batch * tq, n_heads * D]               f32 (the engine's activations are f32)
//   lse      [batch, n_heads, tq]                    f32
//
// How (design and numbers: docs/kernels/attention.md):
// - Rows of a block are "packed rows" p = i * group + hh of one (sequence, KV head): the group's
//   query heads share every K/V tile the block loads (GQA costs no extra K/V traffic), and in
//   decoding (tq = 1..few) the group fills the tile's rows instead of leaving 63 of 64 empty.
// - Block = 4 warps, 64 packed rows (16 per warp, one m16 tile), key tiles of 64. Q is loaded once
//   into registers (A fragments). Per key tile: S = Q K^T (f32 accumulators), mask, online softmax
//   in base 2 (running max m, sum l per row; the 4 lanes of a quad own one row and reduce with two
//   shuffles), P rounded to bf16 straight from the accumulators into A fragments, O += P V.
// - Pipeline (cp.async, two groups in flight): V(j) loads while S(j) is computed, K(j+1) while the
//   softmax and P V(j) run. Q's shared tile is reused for V. Shared memory: 2 tiles of 64 x D bf16
//   (32 KiB at D = 128), under the 48 KiB a launch gets without an opt-in.
// - Causal: a block stops at the key tile of its last row's limit; the mask (causal, cache length
//   and key mask together) is applied per element only on tiles that need it: the barrier that
//   waits for K also ANDs the tile's key-mask bytes (__syncthreads_and), so full tiles below the
//   diagonal skip it. The blocks with the most tiles are scheduled first (blockIdx.x reversed).
// - Split-KV (decoding): grid.z = batch * splits; split s takes key tiles [s * tps, (s + 1) * tps)
//   and writes its normalised partial output and partial lse to slice s of a workspace shaped like
//   out / lse; flash_attn_combine_f32 merges the slices in a fixed order (deterministic). With
//   splits = 1 the kernel writes out and lse directly.
//
// Launch: flash_attn_fwd_d{64,80,128}: grid (ceil(group * tq / 64), n_kv_heads, batch * splits),
// block 128, dynamic shared 2 * 64 * Tile<D>::ROW_BYTES bytes. flash_attn_combine_f32: any grid,
// block 256 (grid-stride over batch * tq * n_heads * D).
//
// Versions: v1 (this file) as described. Measured: nothing yet (no GPU has run it).
#include "flash_attn.cuh"

using namespace ilrec;
using namespace ilrec::flash;

namespace {

constexpr int BM = 64;  // packed query rows per block
constexpr int BN = 64;  // keys per tile
constexpr int NT = 128; // threads per block

template <int D>
__device__ __forceinline__ void flash_fwd(float *__restrict__ out, float *__restrict__ lse, const bf16 *__restrict__ q,
                                          const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                                          const uint8_t *__restrict__ key_mask, uint32_t batch, uint32_t tq,
                                          uint32_t past, uint32_t cap, uint32_t n_heads, uint32_t n_kv_heads,
                                          uint32_t tiles_per_split, float scale) {
    using TL = Tile<D>;
    constexpr int KS = D / 16;   // k-steps over the head dim (S = Q K^T)
    constexpr int NTD = D / 8;   // n-tiles over the head dim (O)
    constexpr int NTN = BN / 8;  // n-tiles over the keys (S)
    ILREC_DYN_SMEM(unsigned char, smem);
    unsigned char *s_qv = smem;                           // Q, then V
    unsigned char *s_k = smem + BM * TL::ROW_BYTES; // K

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g8 = lane >> 2, t4 = lane & 3;
    const int group = (int)(n_heads / n_kv_heads);
    const int rows = group * (int)tq;
    const int m0 = (int)(gridDim.x - 1 - blockIdx.x) * BM;
    const int kvh = (int)blockIdx.y;
    const int b = (int)(blockIdx.z % batch), split = (int)(blockIdx.z / batch);
    const int kv_len = (int)(past + tq);
    const uint64_t q_width = (uint64_t)n_heads * D;
    out += (uint64_t)split * batch * tq * q_width;
    lse += (uint64_t)split * batch * n_heads * tq;

    // Keys this block needs: up to its last row's causal limit; this split's share of them.
    const int last_row = min(m0 + BM, rows) - 1;
    const int n_end = (int)past + last_row / group + 1;
    const int tiles = (n_end + BN - 1) / BN;
    const int j_begin = split * (int)tiles_per_split;
    const int j_end = min(tiles, j_begin + (int)tiles_per_split);

    const bf16 *kb = k + ((uint64_t)b * n_kv_heads + kvh) * cap * D;
    const bf16 *vb = v + ((uint64_t)b * n_kv_heads + kvh) * cap * D;
    const uint8_t *mask_b = key_mask + (uint64_t)b * cap;
    auto q_row = [&](int r) {
        const int p = m0 + r;
        return q + ((uint64_t)b * tq + p / group) * q_width + (uint64_t)(kvh * group + p % group) * D;
    };

    // This thread's two rows (g8 and g8 + 8 of its warp's 16): causal limits.
    int last[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int p = m0 + warp * 16 + g8 + 8 * half;
        last[half] = p < rows ? (int)past + p / group : -1;
    }

    float o[NTD][4];
#pragma unroll
    for (int x = 0; x < NTD; ++x) o[x][0] = o[x][1] = o[x][2] = o[x][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    const float scale_log2 = scale * LOG2E;

    if (j_begin < j_end) {
        load_tile<D, BM, NT>(s_qv, q_row, [&](int r) { return m0 + r < rows; });
        const int n0 = j_begin * BN;
        load_tile<D, BN, NT>(s_k, [&](int r) { return kb + (uint64_t)(n0 + r) * D; },
                             [&](int r) { return n0 + r < kv_len; });
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        uint32_t qf[KS][4];
        load_a_frags<D>(qf, s_qv, warp * 16);
        __syncthreads();  // every warp holds its Q: the tile becomes V's

        for (int jt = j_begin; jt < j_end; ++jt) {
            const int n0 = jt * BN;
            load_tile<D, BN, NT>(s_qv, [&](int r) { return vb + (uint64_t)(n0 + r) * D; },
                                 [&](int r) { return n0 + r < kv_len; });
            cp_async_commit();
            cp_async_wait<1>();  // K(jt) has landed (V(jt) may still be in flight)
            // The barrier also decides, uniformly, whether this tile needs the per-element mask:
            // not when every key is real, written, and at or before the block's first row's
            // causal limit (padding rows past `rows` are never written, so they need no mask).
            const bool keys_real = __syncthreads_and(threadIdx.x >= BN || n0 + (int)threadIdx.x >= kv_len ||
                                                     mask_b[n0 + threadIdx.x] != 0);
            const bool no_mask = keys_real && n0 + BN <= kv_len && n0 + BN - 1 <= (int)past + m0 / group;

            float s[NTN][4];
#pragma unroll
            for (int x = 0; x < NTN; ++x) s[x][0] = s[x][1] = s[x][2] = s[x][3] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
                for (int np = 0; np < NTN / 2; ++np) {
                    uint32_t b0[2], b1[2];
                    load_bt_pair<D>(b0, b1, s_k, np * 16, ks);
                    mma_bf16_16816(s[2 * np], qf[ks], b0, s[2 * np]);
                    mma_bf16_16816(s[2 * np + 1], qf[ks], b1, s[2 * np + 1]);
                }
            }
            __syncthreads();  // every warp is done with K(jt)
            if (jt + 1 < j_end) {
                const int n1 = n0 + BN;
                load_tile<D, BN, NT>(s_k, [&](int r) { return kb + (uint64_t)(n1 + r) * D; },
                                     [&](int r) { return n1 + r < kv_len; });
            }
            cp_async_commit();  // possibly empty: keeps the wait<1> below counting right

            // Mask, scale to base 2, online softmax. Accumulator e of n-tile x sits at row
            // g8 + 8 (e >> 1), key n0 + 8 x + 2 t4 + (e & 1).
            float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int x = 0; x < NTN; ++x) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int j = n0 + 8 * x + 2 * t4 + (e & 1);
                    const float val = no_mask || visible(j, last[e >> 1], kv_len, mask_b) ? s[x][e] * scale_log2 : -INFINITY;
                    s[x][e] = val;
                    tmax[e >> 1] = fmaxf(tmax[e >> 1], val);
                }
            }
            float mu[2];
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                tmax[half] = fmaxf(tmax[half], __shfl_xor_sync(0xffffffffu, tmax[half], 1));
                tmax[half] = fmaxf(tmax[half], __shfl_xor_sync(0xffffffffu, tmax[half], 2));
                const float m_new = fmaxf(m[half], tmax[half]);
                // A row that has seen no key yet keeps m = -inf; shifting by 0 then makes every
                // exp2 an exact 0 instead of exp2(-inf - -inf) = NaN.
                mu[half] = m_new == -INFINITY ? 0.0f : m_new;
                const float alpha = exp2f(m[half] - mu[half]);
                m[half] = m_new;
                l[half] *= alpha;
#pragma unroll
                for (int x = 0; x < NTD; ++x) {
                    o[x][2 * half] *= alpha;
                    o[x][2 * half + 1] *= alpha;
                }
            }
#pragma unroll
            for (int x = 0; x < NTN; ++x) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float p = exp2f(s[x][e] - mu[e >> 1]);
                    s[x][e] = p;
                    l[e >> 1] += p;
                }
            }

            cp_async_wait<1>();  // V(jt) has landed (K(jt + 1) may still be in flight)
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                uint32_t pa[4];
                acc_to_a(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
                for (int dp = 0; dp < NTD / 2; ++dp) {
                    uint32_t b0[2], b1[2];
                    load_b_pair<D>(b0, b1, s_qv, kk * 16, dp);
                    mma_bf16_16816(o[2 * dp], pa, b0, o[2 * dp]);
                    mma_bf16_16816(o[2 * dp + 1], pa, b1, o[2 * dp + 1]);
                }
            }
            __syncthreads();  // every warp is done with V(jt) before V(jt + 1) overwrites it
        }
    }

    // Epilogue: the quad's partial sums, then normalised rows (zeros and -inf for a row that saw
    // no key: l = 0).
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        l[half] += __shfl_xor_sync(0xffffffffu, l[half], 1);
        l[half] += __shfl_xor_sync(0xffffffffu, l[half], 2);
        const int p = m0 + warp * 16 + g8 + 8 * half;
        if (p >= rows) continue;
        const int i = p / group, h = kvh * group + p % group;
        const float inv = l[half] > 0.0f ? 1.0f / l[half] : 0.0f;
        float *orow = out + ((uint64_t)b * tq + i) * q_width + (uint64_t)h * D + 2 * t4;
#pragma unroll
        for (int x = 0; x < NTD; ++x)
            *reinterpret_cast<float2 *>(orow + 8 * x) = make_float2(o[x][2 * half] * inv, o[x][2 * half + 1] * inv);
        if (t4 == 0)
            lse[((uint64_t)b * n_heads + h) * tq + i] = l[half] > 0.0f ? (m[half] + log2f(l[half])) * LN2 : -INFINITY;
    }
}

}  // namespace

#define ILREC_FLASH_FWD(D)                                                                                            \
    extern "C" __global__ void __launch_bounds__(NT)                                                                  \
        flash_attn_fwd_d##D(float *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v,                     \
                            const uint8_t *key_mask, uint32_t batch, uint32_t tq, uint32_t past, uint32_t cap,       \
                            uint32_t n_heads, uint32_t n_kv_heads, uint32_t tiles_per_split, float scale) {          \
        flash_fwd<D>(out, lse, q, k, v, key_mask, batch, tq, past, cap, n_heads, n_kv_heads, tiles_per_split, scale); \
    }
ILREC_FLASH_FWD(64)
ILREC_FLASH_FWD(80)
ILREC_FLASH_FWD(128)

// Merges `splits` partial results of flash_attn_fwd_d* (slices of part_out / part_lse, each shaped
// like out / lse): lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) out_s, summed over s
// in order (deterministic). A row no split saw a key for gets zeros and -inf.
// rows = batch * tq * n_heads; element (r, x) of out is out[(b * tq + i) * n_heads * d + h * d + x]
// with r = (b * tq + i) * n_heads + h.
extern "C" __global__ void __launch_bounds__(256)
flash_attn_combine_f32(float *out, float *lse, const float *part_out, const float *part_lse, uint32_t batch,
                       uint32_t tq, uint32_t n_heads, uint32_t d, uint32_t splits) {
    const uint64_t rows = (uint64_t)batch * tq * n_heads;
    const uint64_t n = rows * d, lse_n = rows;
    ILREC_GRID_STRIDE(e, n) {
        const uint64_t r = e / d;
        const uint32_t h = (uint32_t)(r % n_heads);
        const uint64_t bi = r / n_heads, b = bi / tq, i = bi % tq;
        const uint64_t at = (b * n_heads + h) * tq + i;
        float mx = -INFINITY;
        for (uint32_t s = 0; s < splits; ++s) mx = fmaxf(mx, part_lse[s * lse_n + at]);
        float acc = 0.0f, wsum = 0.0f;
        if (mx != -INFINITY) {
            for (uint32_t s = 0; s < splits; ++s) {
                const float w = expf(part_lse[s * lse_n + at] - mx);  // 0 for a split that saw no key
                wsum += w;
                acc += w * part_out[s * n + e];
            }
        }
        out[e] = mx == -INFINITY ? 0.0f : acc / wsum;
        if (e % d == 0) lse[at] = mx == -INFINITY ? -INFINITY : mx + logf(wsum);
    }
}

// The first `len` rows of every [cap, d] slab of an f32 KV cache ([slabs = batch * n_kv_heads,
// cap, d]) rounded to bf16 (round to nearest even, as cast_f32_to_bf16) into a bf16 tensor of the
// same layout: the flash kernels' operands for an f32 cache, without touching the cache's unused
// capacity (the flash kernels never read rows >= past + tq). Grid-stride over slabs * len * d.
extern "C" __global__ void __launch_bounds__(256)
flash_attn_cast_kv_bf16(bf16 *dst, const float *src, uint64_t slabs, uint32_t cap, uint32_t len, uint32_t d) {
    const uint64_t per = (uint64_t)len * d;
    ILREC_GRID_STRIDE(e, slabs * per) {
        const uint64_t at = e / per * ((uint64_t)cap * d) + e % per;
        dst[at] = __float2bfloat16_rn(src[at]);
    }
}
