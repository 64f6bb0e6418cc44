// Causal grouped-query attention, forward and backward: the simple, correct reference kernels the
// optimised fused ones will replace. Status: compiled, unverified on GPU.
//
// What it computes (CPU reference: engine/backend/cpu/attention.rs `attention`, backward.rs
// `attention_backward`): per sequence b and query head h, with KV head g = h / (n_heads /
// n_kv_heads), query i (absolute position past + i) sees key j iff j <= past + i and
// key_mask[b, j] != 0;  s_ij = (q_i . k_j) * scale (scale = 1/sqrt(head_dim), computed on the host
// as the CPU does), p_ij = softmax_j(s_ij) over the visible keys, out_i = sum_j p_ij v_j. A query
// that sees no key (a left-padding slot) outputs zeros and gets lse = -inf. The forward also
// writes the row's log-sum-exp lse_i = max_j s_ij + ln(sum_j exp(s_ij - max)), from which the
// backward recomputes p_ij = exp(s_ij - lse_i) instead of storing batch * heads * T^2 of them.
// Backward (training: past == 0, cap == tq): dp_ij = dout_i . v_j, delta_i = sum_j p_ij dp_ij
// (computed as dout_i . out_i when out is passed, equal since out_i = sum_j p_ij v_j; the launcher
// passes out for f32 storage only: a bf16-rounded out would put ~1e-2 relative error into dk, so
// for bf16 delta is summed from p and dp like the CPU does), ds_ij = p_ij (dp_ij - delta_i) scale,
// dq_i = sum_j ds_ij k_j, dk_j = sum_{h in group, i} ds_ij q_i, dv_j = sum_{h in group, i} p_ij
// dout_i. Rows with lse = -inf (no visible key) get p = 0: zero dq, no contribution to dk, dv; a
// masked key gets zero dk, dv.
//
// Layouts (row-major; T = float or bf16 storage, everything else f32, math in f32):
//   q, out, dout, dq   [batch * tq, n_heads * head_dim]      (dout, dq f32)
//   k, v               [batch, n_kv_heads, cap, head_dim]    (backward: cap == tq)
//   dk, dv             [batch, n_kv_heads, tq, head_dim]     f32
//   key_mask           [batch, cap] u8 (nonzero = a real key)
//   lse, delta         [batch, n_heads, tq] f32
//
// Launches (engine/backend/cuda/ops/attention.rs): block = 128 threads when head_dim <= 128, else
// 256 (any multiple of 32 that is >= head_dim and <= 256 works: thread t owns output dimension t;
// so head_dim <= 256, and __launch_bounds__(256), which keeps ptxas from spilling on sm_90a):
//   attention_fwd_T        grid (tq, n_heads, batch)     dynamic shared (head_dim + block) * 4
//   attention_bwd_dq_T     grid (tq, n_heads, batch)     dynamic shared (2 head_dim + block) * 4
//   attention_bwd_dkdv_T   grid (tq, n_kv_heads, batch)  dynamic shared 2 (head_dim + block) * 4
// attention_bwd_dq_T writes delta, which attention_bwd_dkdv_T reads: launch them in that order on
// one stream.
//
// Why it is simple: one block per output row (a query row for out and dq, a key row for dk and
// dv). Keys (or queries) are processed in chunks of blockDim: each thread computes one score with
// a sequential dot product over head_dim, the chunk's weights go to shared memory, then each
// dimension-owning thread accumulates weight * row over the chunk, reading rows coalesced. The
// forward is a two-pass softmax (max, then exp/sum/accumulate), recomputing the scores rather than
// keeping them; no tiling, no tensor cores, no online rescaling. Each output element is written by
// exactly one thread, every sum is a fixed sequential loop or the fixed block_sum/block_max tree:
// deterministic, no atomics. Summation orders differ from the CPU's, so results agree to f32
// rounding, not bitwise. exp is exp_cephes (the CPU forward's exp).
#include "common.cuh"

using namespace ilrec;

// (a . b) over n elements, a in shared memory (f32), b in global memory; sequential explicit FMAs,
// so every call site computes the same value for the same operands.
template <typename T>
__device__ __forceinline__ float dot_row(const float *a, const T *__restrict__ b, uint32_t n) {
    float acc = 0.0f;
    for (uint32_t x = 0; x < n; ++x) acc = __fmaf_rn(a[x], ld(b[x]), acc);
    return acc;
}

// =============================================================================================
// Forward. Block (i, h, b) computes out[b * tq + i, h * d .. (h + 1) * d] and lse[b, h, i].
template <typename T>
__device__ __forceinline__ void attn_fwd_impl(T *__restrict__ out, float *__restrict__ lse, const T *__restrict__ q,
                                              const T *__restrict__ k, const T *__restrict__ v,
                                              const uint8_t *__restrict__ key_mask, uint32_t tq, uint32_t past,
                                              uint32_t cap, uint32_t n_heads, uint32_t n_kv_heads, uint32_t d,
                                              float scale) {
    ILREC_DYN_SMEM(float, smem);
    __shared__ float red[32];
    float *qs = smem;      // [d]: the query row in f32
    float *e = smem + d;   // [blockDim]: the chunk's exp(s - max)
    const uint32_t tid = threadIdx.x, nt = blockDim.x;
    const uint32_t i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const uint32_t g = h / (n_heads / n_kv_heads);
    const uint64_t qrow = ((uint64_t)b * tq + i) * ((uint64_t)n_heads * d) + (uint64_t)h * d;
    const T *kb = k + ((uint64_t)b * n_kv_heads + g) * cap * d;
    const T *vb = v + ((uint64_t)b * n_kv_heads + g) * cap * d;
    const uint8_t *m = key_mask + (uint64_t)b * cap;
    const uint64_t lse_at = ((uint64_t)b * n_heads + h) * tq + i;
    const uint32_t nk = past + i + 1;  // keys 0..nk are causally visible

    for (uint32_t x = tid; x < d; x += nt) qs[x] = ld(q[qrow + x]);
    __syncthreads();

    // Pass 1: the largest visible score.
    float mx = -INFINITY;
    for (uint32_t j = tid; j < nk; j += nt)
        if (m[j]) mx = fmaxf(mx, __fmul_rn(dot_row(qs, kb + (uint64_t)j * d, d), scale));
    mx = block_max(mx, red);
    if (mx == -INFINITY) {  // no visible key (uniform over the block)
        for (uint32_t x = tid; x < d; x += nt) out[qrow + x] = st<T>(0.0f);
        if (tid == 0) lse[lse_at] = -INFINITY;
        return;
    }

    // Pass 2: e_j = exp(s_j - max), l = sum e_j, acc = sum e_j v_j (thread tid owns dimension tid).
    float acc = 0.0f, l = 0.0f;
    for (uint32_t j0 = 0; j0 < nk; j0 += nt) {
        const uint32_t j = j0 + tid;
        float ej = 0.0f;
        if (j < nk && m[j]) ej = exp_cephes(__fsub_rn(__fmul_rn(dot_row(qs, kb + (uint64_t)j * d, d), scale), mx));
        e[tid] = ej;
        l += ej;
        __syncthreads();
        if (tid < d) {
            const uint32_t n = min(nt, nk - j0);
            const T *vc = vb + (uint64_t)j0 * d + tid;
            for (uint32_t jj = 0; jj < n; ++jj) acc = __fmaf_rn(e[jj], ld(vc[(uint64_t)jj * d]), acc);
        }
        __syncthreads();  // e is rewritten by the next chunk
    }
    l = block_sum(l, red);  // >= 1: the max key contributes exp(0)
    if (tid < d) out[qrow + tid] = st<T>(__fdiv_rn(acc, l));
    if (tid == 0) lse[lse_at] = __fadd_rn(mx, logf(l));
}

extern "C" __global__ void __launch_bounds__(256)
attention_fwd_f32(float *out, float *lse, const float *q, const float *k, const float *v, const uint8_t *key_mask,
                  uint32_t tq, uint32_t past, uint32_t cap, uint32_t n_heads, uint32_t n_kv_heads, uint32_t d,
                  float scale) {
    attn_fwd_impl(out, lse, q, k, v, key_mask, tq, past, cap, n_heads, n_kv_heads, d, scale);
}
extern "C" __global__ void __launch_bounds__(256)
attention_fwd_bf16(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v, const uint8_t *key_mask,
                   uint32_t tq, uint32_t past, uint32_t cap, uint32_t n_heads, uint32_t n_kv_heads, uint32_t d,
                   float scale) {
    attn_fwd_impl(out, lse, q, k, v, key_mask, tq, past, cap, n_heads, n_kv_heads, d, scale);
}

// =============================================================================================
// Backward, part 1. Block (i, h, b) writes delta[b, h, i] (0 for a query that sees no key) and
// dq[b * t + i, h * d .. (h + 1) * d] = sum_{j <= i, mask[j]} ds_ij k_j. `out` may be null (then
// delta is computed from p and dp). (past == 0, cap == t.)
template <typename T>
__device__ __forceinline__ void attn_bwd_dq_impl(float *__restrict__ dq, float *__restrict__ delta,
                                                 const float *__restrict__ dout, const T *__restrict__ q,
                                                 const T *__restrict__ k, const T *__restrict__ v,
                                                 const T *__restrict__ out, const float *__restrict__ lse,
                                                 const uint8_t *__restrict__ key_mask, uint32_t t, uint32_t n_heads,
                                                 uint32_t n_kv_heads, uint32_t d, float scale) {
    ILREC_DYN_SMEM(float, smem);
    __shared__ float red[32];
    float *qs = smem;           // [d]: q_i
    float *dos = smem + d;      // [d]: dout_i
    float *ds = smem + 2 * d;   // [blockDim]: the chunk's ds_ij
    const uint32_t tid = threadIdx.x, nt = blockDim.x;
    const uint32_t i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const uint32_t g = h / (n_heads / n_kv_heads);
    const uint64_t row = ((uint64_t)b * t + i) * ((uint64_t)n_heads * d) + (uint64_t)h * d;
    const T *kb = k + ((uint64_t)b * n_kv_heads + g) * t * d;
    const T *vb = v + ((uint64_t)b * n_kv_heads + g) * t * d;
    const uint8_t *m = key_mask + (uint64_t)b * t;
    const uint64_t at = ((uint64_t)b * n_heads + h) * t + i;

    for (uint32_t x = tid; x < d; x += nt) {
        qs[x] = ld(q[row + x]);
        dos[x] = dout[row + x];
    }
    __syncthreads();
    const float L = lse[at];
    if (L == -INFINITY) {  // the query sees no key: p = 0 everywhere (uniform over the block)
        for (uint32_t x = tid; x < d; x += nt) dq[row + x] = 0.0f;
        if (tid == 0) delta[at] = 0.0f;
        return;
    }
    const uint32_t nk = i + 1;  // keys 0..nk are causally visible

    // delta_i: dout_i . out_i when `out` is given (f32 storage), else sum_j p_ij dp_ij, the CPU's
    // formula (one more pass over the keys; used for bf16 storage, whose rounding of `out` would
    // put an error of a few 1e-3 relative into dk).
    float part = 0.0f;
    if (out != nullptr) {
        for (uint32_t x = tid; x < d; x += nt) part = __fmaf_rn(dos[x], ld(out[row + x]), part);
    } else {
        for (uint32_t j = tid; j < nk; j += nt) {
            if (!m[j]) continue;
            const float s = __fmul_rn(dot_row(qs, kb + (uint64_t)j * d, d), scale);
            const float p = exp_cephes(__fsub_rn(s, L));
            part = __fmaf_rn(p, dot_row(dos, vb + (uint64_t)j * d, d), part);
        }
    }
    const float dl = block_sum(part, red);
    if (tid == 0) delta[at] = dl;

    float acc = 0.0f;
    for (uint32_t j0 = 0; j0 < nk; j0 += nt) {
        const uint32_t j = j0 + tid;
        float dsj = 0.0f;
        if (j < nk && m[j]) {
            const float s = __fmul_rn(dot_row(qs, kb + (uint64_t)j * d, d), scale);
            const float p = exp_cephes(__fsub_rn(s, L));
            const float dp = dot_row(dos, vb + (uint64_t)j * d, d);
            dsj = __fmul_rn(__fmul_rn(p, __fsub_rn(dp, dl)), scale);
        }
        ds[tid] = dsj;
        __syncthreads();
        if (tid < d) {
            const uint32_t n = min(nt, nk - j0);
            const T *kc = kb + (uint64_t)j0 * d + tid;
            for (uint32_t jj = 0; jj < n; ++jj) acc = __fmaf_rn(ds[jj], ld(kc[(uint64_t)jj * d]), acc);
        }
        __syncthreads();
    }
    if (tid < d) dq[row + tid] = acc;
}

extern "C" __global__ void __launch_bounds__(256)
attention_bwd_dq_f32(float *dq, float *delta, const float *dout, const float *q, const float *k, const float *v,
                     const float *out, const float *lse, const uint8_t *key_mask, uint32_t t, uint32_t n_heads,
                     uint32_t n_kv_heads, uint32_t d, float scale) {
    attn_bwd_dq_impl(dq, delta, dout, q, k, v, out, lse, key_mask, t, n_heads, n_kv_heads, d, scale);
}
extern "C" __global__ void __launch_bounds__(256)
attention_bwd_dq_bf16(float *dq, float *delta, const float *dout, const bf16 *q, const bf16 *k, const bf16 *v,
                      const bf16 *out, const float *lse, const uint8_t *key_mask, uint32_t t, uint32_t n_heads,
                      uint32_t n_kv_heads, uint32_t d, float scale) {
    attn_bwd_dq_impl(dq, delta, dout, q, k, v, out, lse, key_mask, t, n_heads, n_kv_heads, d, scale);
}

// =============================================================================================
// Backward, part 2. Block (j, g, b) writes dk and dv of key j of KV head g of sequence b: sums over
// the group's query heads h and the queries i >= j (in that order) of ds_ij q_i and p_ij dout_i.
// Reads delta from attention_bwd_dq_T. (past == 0, cap == t.)
template <typename T>
__device__ __forceinline__ void attn_bwd_dkdv_impl(float *__restrict__ dk, float *__restrict__ dv,
                                                   const float *__restrict__ dout, const T *__restrict__ q,
                                                   const T *__restrict__ k, const T *__restrict__ v,
                                                   const float *__restrict__ lse, const float *__restrict__ delta,
                                                   const uint8_t *__restrict__ key_mask, uint32_t t,
                                                   uint32_t n_heads, uint32_t n_kv_heads, uint32_t d, float scale) {
    ILREC_DYN_SMEM(float, smem);
    float *ks = smem;                   // [d]: k_j
    float *vs = smem + d;               // [d]: v_j
    float *ps = smem + 2 * d;           // [blockDim]: the chunk's p_ij
    float *dss = smem + 2 * d + blockDim.x;  // [blockDim]: the chunk's ds_ij
    const uint32_t tid = threadIdx.x, nt = blockDim.x;
    const uint32_t j = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    const uint32_t group = n_heads / n_kv_heads;
    const uint64_t width = (uint64_t)n_heads * d;
    const uint64_t kv = (((uint64_t)b * n_kv_heads + g) * t + j) * d;
    if (key_mask[(uint64_t)b * t + j] == 0) {  // a masked key: no query sees it (uniform)
        for (uint32_t x = tid; x < d; x += nt) {
            dk[kv + x] = 0.0f;
            dv[kv + x] = 0.0f;
        }
        return;
    }
    for (uint32_t x = tid; x < d; x += nt) {
        ks[x] = ld(k[kv + x]);
        vs[x] = ld(v[kv + x]);
    }
    __syncthreads();

    float dk_acc = 0.0f, dv_acc = 0.0f;
    for (uint32_t hh = 0; hh < group; ++hh) {
        const uint32_t h = g * group + hh;
        const uint64_t stat = ((uint64_t)b * n_heads + h) * t;  // lse/delta row of (b, h)
        const uint64_t col = (uint64_t)b * t * width + (uint64_t)h * d;  // q/dout element (b, i=0, h, 0)
        for (uint32_t i0 = j; i0 < t; i0 += nt) {
            const uint32_t i = i0 + tid;
            float pi = 0.0f, dsi = 0.0f;
            if (i < t) {
                const float L = lse[stat + i];
                if (L != -INFINITY) {
                    const uint64_t row = col + (uint64_t)i * width;
                    const float s = __fmul_rn(dot_row(ks, q + row, d), scale);
                    pi = exp_cephes(__fsub_rn(s, L));
                    const float dp = dot_row(vs, dout + row, d);
                    dsi = __fmul_rn(__fmul_rn(pi, __fsub_rn(dp, delta[stat + i])), scale);
                }
            }
            ps[tid] = pi;
            dss[tid] = dsi;
            __syncthreads();
            if (tid < d) {
                const uint32_t n = min(nt, t - i0);
                const uint64_t base = col + (uint64_t)i0 * width + tid;
                for (uint32_t ii = 0; ii < n; ++ii) {
                    const uint64_t at = base + (uint64_t)ii * width;
                    dv_acc = __fmaf_rn(ps[ii], dout[at], dv_acc);
                    dk_acc = __fmaf_rn(dss[ii], ld(q[at]), dk_acc);
                }
            }
            __syncthreads();
        }
    }
    if (tid < d) {
        dk[kv + tid] = dk_acc;
        dv[kv + tid] = dv_acc;
    }
}

extern "C" __global__ void __launch_bounds__(256)
attention_bwd_dkdv_f32(float *dk, float *dv, const float *dout, const float *q, const float *k, const float *v,
                       const float *lse, const float *delta, const uint8_t *key_mask, uint32_t t, uint32_t n_heads,
                       uint32_t n_kv_heads, uint32_t d, float scale) {
    attn_bwd_dkdv_impl(dk, dv, dout, q, k, v, lse, delta, key_mask, t, n_heads, n_kv_heads, d, scale);
}
extern "C" __global__ void __launch_bounds__(256)
attention_bwd_dkdv_bf16(float *dk, float *dv, const float *dout, const bf16 *q, const bf16 *k, const bf16 *v,
                        const float *lse, const float *delta, const uint8_t *key_mask, uint32_t t, uint32_t n_heads,
                        uint32_t n_kv_heads, uint32_t d, float scale) {
    attn_bwd_dkdv_impl(dk, dv, dout, q, k, v, lse, delta, key_mask, t, n_heads, n_kv_heads, d, scale);
}
