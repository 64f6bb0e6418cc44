// Fused final-layer loss of LoRA training (SFT cross-entropy, ILRec's L_CPO + L_CRR, and the
// bookkeeping L_CPD needs), streaming the vocabulary: the `m x V` logits of the response rows are
// never stored. CPU reference: engine/train/loss.rs (`sft_loss`, `ilrec_loss`, `item_row`) on
// the logits `normed · W_head^T`; the equations are ../docs/kernels/loss.md's and ILREC.md's.
//
// The pipeline (engine/backend/cuda/ops/loss.rs runs it; peak extra memory does not grow with V):
//   1. loss_lse_bf16     logits tiles with mma.sync (bf16 in, f32 accumulate), per (row tile,
//                        vocabulary split) an online max / sum of exp(z); captures z[y] and, by
//                        index, the logits of the candidate sub-vocabulary (the columns V_N, H and
//                        the CPD teacher need).
//   2. loss_rows         one block per row: the log-sum-exp (f64), and on item rows the ILRec
//                        selection: ensemble of the probe logits, V_N, w, the CPO log-sum-exp of
//                        the scaled logits (a correction of lse(z) by the few scaled columns, so
//                        no second pass), CRR soft labels, CPD loss and its probe-logit gradient.
//   3. per vocabulary chunk of VC columns (VC from a fixed byte budget, not from V):
//      loss_dlogits_bf16 recomputes the chunk's logits and writes dL/dz (bf16, [m, VC]) plus the
//                        f32 gradients of the trainable columns (by index);
//      loss_dhidden_bf16 dN (+)= dz_chunk · W[chunk] (f32 accumulate, chunks in order: no atomics).
//
// Layouts: normed rows `a` [m, h] bf16 (h % 8 == 0, rows 16-byte aligned), LM head `w` [V, h]
// bf16, targets [m] u32 (0xFFFFFFFF = ignored row: zero loss and zero gradient).
// Tiles: 64 x 64 per block of 128 threads (2 x 2 warps of 32 x 32), K chunks of 32, two cp.async
// stages, row pitch padded by 8 bf16 so ldmatrix rows fall in distinct banks.
//
// Status: compiled, unverified on GPU.
// Versions: v1 (this one): plain two-stage mma.sync tiles, scalar epilogue stores. Not measured.
#include "mma.cuh"

using namespace ilrec;

namespace {

constexpr int BM = 64, BN = 64, BK = 32, PITCH = BK + 8, THREADS = 128;
constexpr uint32_t NONE = 0xFFFFFFFFu;

struct __align__(16) TileSmem {
    bf16 a[2][BM][PITCH];
    bf16 b[2][BN][PITCH];
};

// One K chunk of a 64-row tile of a [rows, ld] row-major bf16 matrix into smem (zero-filled
// outside [0, rows) x [0, kdim)). `row_of(r)` maps a tile row to a matrix row.
__device__ __forceinline__ void load_chunk(bf16 (*dst)[PITCH], const bf16 *src, uint64_t ld, uint32_t row0, uint32_t rows,
                                           uint32_t k0, uint32_t kdim) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int c = threadIdx.x + i * THREADS;  // 256 16-byte pieces: 64 rows x 4
        const int r = c >> 2, kc = (c & 3) * 8;
        const uint32_t row = row0 + r, k = k0 + kc;
        const bool ok = row < rows && k < kdim;
        const bf16 *g = ok ? src + (uint64_t)row * ld + k : src;
        cp_async_16_zfill(&dst[r][kc], g, ok);
    }
}

// acc[i][j] = the 16x8 piece (i, j) of this warp's 32 x 32 part of A[row0:+64] · B[col0:+64]^T,
// A [rows_a, kdim] and B [rows_b, kdim] row-major bf16 with leading dimension kdim.
__device__ __forceinline__ void tile_nt(float acc[2][4][4], TileSmem &sm, const bf16 *A, uint32_t row0, uint32_t rows_a,
                                        const bf16 *B, uint32_t col0, uint32_t rows_b, uint32_t kdim) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
    const uint32_t nk = (kdim + BK - 1) / BK;
    load_chunk(sm.a[0], A, kdim, row0, rows_a, 0, kdim);
    load_chunk(sm.b[0], B, kdim, col0, rows_b, 0, kdim);
    cp_async_commit();
    for (uint32_t kt = 0; kt < nk; ++kt) {
        const int s = kt & 1;
        if (kt + 1 < nk) {
            load_chunk(sm.a[s ^ 1], A, kdim, row0, rows_a, (kt + 1) * BK, kdim);
            load_chunk(sm.b[s ^ 1], B, kdim, col0, rows_b, (kt + 1) * BK, kdim);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t a[2][4], b[4][2];
#pragma unroll
            for (int i = 0; i < 2; ++i) ldmatrix_x4(a[i], &sm.a[s][wm * 32 + i * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
            for (int j = 0; j < 4; j += 2) {
                // Matrices (n, kk), (n, kk+8), (n+8, kk), (n+8, kk+8): b[j] and b[j+1].
                const int mi = lane >> 3, r = lane & 7;
                uint32_t t4[4];
                ldmatrix_x4(t4, &sm.b[s][wn * 32 + j * 8 + (mi >> 1) * 8 + r][kk + (mi & 1) * 8]);
                b[j][0] = t4[0];
                b[j][1] = t4[1];
                b[j + 1][0] = t4[2];
                b[j + 1][1] = t4[3];
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_bf16_16816(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
}

// Online (max, sum exp(v - max)) merge.
__device__ __forceinline__ void lse_merge(float &mx, float &sum, float omx, float osum) {
    const float nm = fmaxf(mx, omx);
    if (nm == -INFINITY) return;
    sum = sum * expf(mx - nm) + osum * expf(omx - nm);
    mx = nm;
}

}  // namespace

// =============================================================================================
// Pass 1. Grid (ceil(m/64), splits), block 128. Split `s` covers the vocabulary tiles
// [s * tiles_per_split, (s+1) * tiles_per_split). Writes part_max/part_sum [splits, m] (-inf / 0
// for a split without columns), zy[r] = z[r, targets[r]] (the one block whose split holds the
// target), and zc[r, j] = z[r, v] for every column v with colmap[v] = j != NONE (colmap [V] or
// null; zc [m, S]).
extern "C" __global__ void __launch_bounds__(THREADS)
loss_lse_bf16(float *__restrict__ part_max, float *__restrict__ part_sum, float *__restrict__ zy, float *__restrict__ zc,
              const bf16 *__restrict__ a, const bf16 *__restrict__ w, const uint32_t *__restrict__ targets,
              const uint32_t *__restrict__ colmap, uint32_t m, uint32_t vocab, uint32_t h, uint32_t s_cand,
              uint32_t tiles_per_split) {
    __shared__ TileSmem sm;
    __shared__ float red_max[BM], red_sum[BM];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
    const int g = lane >> 2, t = lane & 3;
    const uint32_t row0 = blockIdx.x * BM, split = blockIdx.y;
    float mx[4], sum[4];
    uint32_t tgt[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        mx[q] = -INFINITY;
        sum[q] = 0.0f;
        const uint32_t row = row0 + wm * 32 + (q >> 1) * 16 + (q & 1) * 8 + g;
        tgt[q] = row < m ? targets[row] : NONE;
    }
    for (uint32_t vt = 0; vt < tiles_per_split; ++vt) {
        const uint64_t tile = (uint64_t)split * tiles_per_split + vt;
        if (tile * BN >= vocab) break;
        const uint32_t col0 = (uint32_t)(tile * BN);
        float acc[2][4][4];
        tile_nt(acc, sm, a, row0, m, w, col0, vocab, h);
        // Capture the target and candidate columns, then fold the tile into the running stats
        // with one rescale per row.
        float tmax[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const uint32_t col = col0 + wn * 32 + j * 8 + 2 * t + e;
                const bool valid = col < vocab;
                const uint32_t cj = valid && colmap != nullptr ? colmap[col] : NONE;
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const uint32_t row = row0 + wm * 32 + (q >> 1) * 16 + (q & 1) * 8 + g;
                    float &z = acc[q >> 1][j][(q & 1) * 2 + e];
                    if (!valid) z = -INFINITY;
                    tmax[q] = fmaxf(tmax[q], z);
                    if (valid && row < m) {
                        if (col == tgt[q]) zy[row] = z;
                        if (cj != NONE) zc[(uint64_t)row * s_cand + cj] = z;
                    }
                }
            }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const float nm = fmaxf(mx[q], tmax[q]);
            if (nm == -INFINITY) continue;  // none of this thread's columns exist yet
            float s = sum[q] * expf(mx[q] - nm);
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) s += expf(acc[q >> 1][j][(q & 1) * 2 + e] - nm);
            sum[q] = s;
            mx[q] = nm;
        }
    }
    // The four lanes of a quad hold the same rows; then the two column warps.
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
        for (int o = 1; o <= 2; o <<= 1) {
            const float om = __shfl_xor_sync(0xffffffffu, mx[q], o);
            const float os = __shfl_xor_sync(0xffffffffu, sum[q], o);
            lse_merge(mx[q], sum[q], om, os);
        }
    }
    const int rbase = wm * 32 + g;
    if (wn == 1 && t == 0) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            red_max[rbase + (q >> 1) * 16 + (q & 1) * 8] = mx[q];
            red_sum[rbase + (q >> 1) * 16 + (q & 1) * 8] = sum[q];
        }
    }
    __syncthreads();
    if (wn == 0 && t == 0) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int r = rbase + (q >> 1) * 16 + (q & 1) * 8;
            lse_merge(mx[q], sum[q], red_max[r], red_sum[r]);
            const uint32_t row = row0 + r;
            if (row < m) {
                part_max[(uint64_t)split * m + row] = mx[q];
                part_sum[(uint64_t)split * m + row] = sum[q];
            }
        }
    }
}

// =============================================================================================
// Pass 2: the row statistics and the ILRec selection, one block per row (block 256).
//
// Inputs: part_max/part_sum [splits, m] from pass 1, zy [m], zc [m, S] (final logits of the
// candidates, pass 1), zp [k, m, S] (probe logits; null when k = 0), rewards [m, S] or null,
// targets [m], tcol [m] (candidate column of the target, NONE if it is not a candidate), item [m]
// (u8: ILRec terms apply; the launcher checks tcol != NONE there).
// Outputs: lse_s, lse_z, crr_w [m] f32 (the CPO log-sum-exp of z * mult, lse(z), and mu or 0);
// mult, qh [m, S] f32 (1 + beta w on V_N, else 1; mu q on H, else 0; null when S = 0);
// dzp [k, m, S] f32 (lambda * scale * dL_CPD/dz^l); rows_f64 [m, 3] (main term: L_CPO on item rows,
// cross-entropy on the others; L_CPD; L_CRR; unscaled); counts [m, 2] u32 (|V_N|, negatives whose
// final logit is below zero).
// flags: bit 0 neg_weight = logit, bit 1 cpd_direction = reverse, bit 2 negatives = final layer.
// Arithmetic in f64 as loss.rs; the per-row formulas are item_row's. Launch bounds (256, 1): with
// the default heuristic ptxas spills around the f64 division's slow path on sm_90a.

namespace {

constexpr int ROW_THREADS = 256;

__device__ __forceinline__ double bmax(double v, double *sh) { return block_max(v, sh); }
__device__ __forceinline__ double bsum(double v, double *sh) { return block_sum(v, sh); }

// log-sum-exp over the j < S with keep(j) of f(j), -inf when none.
template <typename F, typename K>
__device__ __forceinline__ double block_lse(uint32_t S, F f, K keep, double *sh) {
    double mx = -INFINITY;
    for (uint32_t j = threadIdx.x; j < S; j += blockDim.x)
        if (keep(j)) mx = fmax(mx, f(j));
    mx = bmax(mx, sh);
    if (mx == -INFINITY) return mx;
    double s = 0.0;
    for (uint32_t j = threadIdx.x; j < S; j += blockDim.x)
        if (keep(j)) s += exp(f(j) - mx);
    return mx + log(bsum(s, sh));
}

}  // namespace

extern "C" __global__ void __launch_bounds__(ROW_THREADS, 1)
loss_rows(float *__restrict__ lse_s_out, float *__restrict__ lse_z_out, float *__restrict__ crr_w_out,
          float *__restrict__ mult, float *__restrict__ qh, float *__restrict__ dzp, double *__restrict__ rows_f64,
          uint32_t *__restrict__ counts, const float *__restrict__ part_max, const float *__restrict__ part_sum,
          const float *__restrict__ zy, const float *__restrict__ zc, const float *__restrict__ zp,
          const float *__restrict__ rewards, const uint32_t *__restrict__ targets, const uint32_t *__restrict__ tcol,
          const uint8_t *__restrict__ item, uint32_t m, uint32_t S, uint32_t k, uint32_t splits, double alpha,
          double beta, double lambda, double mu, double scale, uint32_t flags) {
    __shared__ double sh[32];
    const uint32_t row = blockIdx.x;
    const uint64_t rs = (uint64_t)row * S;
    // lse(z) from the splits, in f64 (logsumexp of loss.rs up to the order of the sum).
    double gmx = -INFINITY;
    for (uint32_t s = threadIdx.x; s < splits; s += blockDim.x) gmx = fmax(gmx, (double)part_max[(uint64_t)s * m + row]);
    gmx = bmax(gmx, sh);
    double gs = 0.0;
    for (uint32_t s = threadIdx.x; s < splits; s += blockDim.x) {
        const double pm = part_max[(uint64_t)s * m + row];
        if (pm != -INFINITY) gs += (double)part_sum[(uint64_t)s * m + row] * exp(pm - gmx);
    }
    const double lse_z = gmx + log(bsum(gs, sh));
    const uint32_t y = targets[row];
    const bool is_item = S > 0 && y != NONE && item[row] != 0;
    // Defaults: plain cross-entropy (or nothing for an ignored row).
    if (!is_item) {
        for (uint32_t j = threadIdx.x; j < S; j += blockDim.x) {
            mult[rs + j] = 1.0f;
            qh[rs + j] = 0.0f;
        }
        for (uint32_t l = 0; l < k; ++l)
            for (uint32_t j = threadIdx.x; j < S; j += blockDim.x) dzp[((uint64_t)l * m + row) * S + j] = 0.0f;
        if (threadIdx.x == 0) {
            lse_s_out[row] = (float)lse_z;
            lse_z_out[row] = (float)lse_z;
            crr_w_out[row] = 0.0f;
            rows_f64[row * 3 + 0] = y == NONE ? 0.0 : lse_z - (double)zy[row];
            rows_f64[row * 3 + 1] = 0.0;
            rows_f64[row * 3 + 2] = 0.0;
            counts[row * 2 + 0] = 0;
            counts[row * 2 + 1] = 0;
        }
        return;
    }
    const uint32_t jy = tcol[row];
    const bool final_neg = (flags & 4u) != 0, logit_w = (flags & 1u) != 0, reverse = (flags & 2u) != 0;
    // Ensemble zhat (section 2): sum over the layers in order, then / k, as item_row.
    auto zhat = [=](uint32_t j) -> double {
        if (final_neg || k == 0) return (double)zc[rs + j];
        double s = 0.0;
        for (uint32_t l = 0; l < k; ++l) s += (double)zp[((uint64_t)l * m + row) * S + j];
        return s / (double)k;
    };
    auto all = [](uint32_t) { return true; };
    const double lse_hat = block_lse(S, zhat, all, sh);
    const double tau = alpha * exp(zhat(jy) - lse_hat);
    auto is_neg = [=](uint32_t j) { return j != jy && exp(zhat(j) - lse_hat) >= tau; };
    // w: softmax over V_N of p̂ (or ẑ).
    auto raw = [=](uint32_t j) { return logit_w ? zhat(j) : exp(zhat(j) - lse_hat); };
    const double lse_w = block_lse(S, raw, is_neg, sh);
    // mult, the CPO correction and the counts.
    double corr = 0.0;
    uint32_t nneg = 0, below = 0;
    for (uint32_t j = threadIdx.x; j < S; j += blockDim.x) {
        double mlt = 1.0;
        if (is_neg(j)) {
            mlt = 1.0 + beta * exp(raw(j) - lse_w);
            const double z = zc[rs + j];
            // exp(z * mlt) - exp(z), relative to exp(lse_z), without cancellation.
            corr += exp(z - lse_z) * expm1((mlt - 1.0) * z);
            ++nneg;
            below += z < 0.0;
        }
        mult[rs + j] = (float)mlt;
    }
    corr = bsum(corr, sh);
    const double nneg_d = bsum((double)nneg, sh), below_d = bsum((double)below, sh);
    const double lse_s = lse_z + log1p(corr);
    const double cpo = lse_s - (double)zy[row];
    // CRR (section 6): soft labels over H = V_N ∪ {y} on the unscaled logits.
    double crr = 0.0;
    const bool use_crr = mu > 0.0 && rewards != nullptr;
    if (use_crr) {
        auto in_h = [=](uint32_t j) { return j == jy || is_neg(j); };
        auto r = [=](uint32_t j) { return (double)rewards[rs + j]; };
        const double lse_r = block_lse(S, r, in_h, sh);
        double c = 0.0;
        for (uint32_t j = threadIdx.x; j < S; j += blockDim.x) {
            float qv = 0.0f;
            if (in_h(j)) {
                const double q = exp(r(j) - lse_r);
                c += q * (lse_z - (double)zc[rs + j]);
                qv = (float)(q * mu);
            }
            qh[rs + j] = qv;
        }
        crr = bsum(c, sh);
    } else {
        for (uint32_t j = threadIdx.x; j < S; j += blockDim.x) qh[rs + j] = 0.0f;
    }
    // CPD (section 5): teacher softmax of the final candidate logits, detached.
    auto zt = [=](uint32_t j) { return (double)zc[rs + j]; };
    const double lse_t = block_lse(S, zt, all, sh);
    const double ls = lambda * scale;
    double cpd = 0.0;
    for (uint32_t l = 0; l < k; ++l) {
        const float *zl = zp + ((uint64_t)l * m + row) * S;
        float *gl = dzp + ((uint64_t)l * m + row) * S;
        auto zs = [=](uint32_t j) { return (double)zl[j]; };
        const double lse_l = block_lse(S, zs, all, sh);
        double kl = 0.0;
        for (uint32_t j = threadIdx.x; j < S; j += blockDim.x) {
            const double tj = exp(zt(j) - lse_t), log_tj = log(tj);
            const double log_sj = zs(j) - lse_l, sj = exp(log_sj);
            if (!reverse) {
                if (tj > 0.0) kl += tj * (log_tj - log_sj);
                gl[j] = (float)((sj - tj) * ls);
            } else {
                kl += sj * (log_sj - log_tj);
            }
        }
        kl = bsum(kl, sh);
        cpd += kl;
        if (reverse)
            for (uint32_t j = threadIdx.x; j < S; j += blockDim.x) {
                const double tj = exp(zt(j) - lse_t), log_tj = log(tj);
                const double log_sj = zs(j) - lse_l, sj = exp(log_sj);
                gl[j] = (float)(sj * (log_sj - log_tj - kl) * ls);
            }
    }
    if (threadIdx.x == 0) {
        lse_s_out[row] = (float)lse_s;
        lse_z_out[row] = (float)lse_z;
        crr_w_out[row] = use_crr ? (float)mu : 0.0f;
        rows_f64[row * 3 + 0] = cpo;
        rows_f64[row * 3 + 1] = cpd;
        rows_f64[row * 3 + 2] = crr;
        counts[row * 2 + 0] = (uint32_t)nneg_d;
        counts[row * 2 + 1] = (uint32_t)below_d;
    }
}

// =============================================================================================
// Pass 3a: dL/dz for the vocabulary chunk [c0, c0 + vc), recomputed from the logits:
//   dz = scale * (exp(z mult - lse_s) mult + crr_w exp(z - lse_z) - [v = y] - qh)
// (mult = 1 and qh = 0 outside the candidates; zero on ignored rows). Grid (ceil(m/64),
// ceil(ldz/64)), block 128. Writes dz [m, ldz] bf16 (columns vc..ldz zero: the next GEMM's K
// padding) and, for columns with slotmap[v] = i != NONE, dtrain[r, i] = dz in f32 (slotmap [V] or
// null, dtrain [m, ntrain]). `w` points at the head's row 0; mult/qh/colmap may be null when S = 0.
extern "C" __global__ void __launch_bounds__(THREADS)
loss_dlogits_bf16(bf16 *__restrict__ dz, float *__restrict__ dtrain, const bf16 *__restrict__ a,
                  const bf16 *__restrict__ w, const uint32_t *__restrict__ targets, const uint32_t *__restrict__ colmap,
                  const uint32_t *__restrict__ slotmap, const float *__restrict__ lse_s, const float *__restrict__ lse_z,
                  const float *__restrict__ crr_w, const float *__restrict__ mult, const float *__restrict__ qh,
                  uint32_t m, uint32_t vocab, uint32_t h, uint32_t s_cand, uint32_t ntrain, uint32_t c0, uint32_t vc,
                  uint32_t ldz, float scale) {
    __shared__ TileSmem sm;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
    const int g = lane >> 2, t = lane & 3;
    const uint32_t row0 = blockIdx.x * BM, lcol0 = blockIdx.y * BN;
    float acc[2][4][4];
    // Rows of the head past the chunk are zero-filled (vocab bound = c0 + vc).
    tile_nt(acc, sm, a, row0, m, w, c0 + lcol0, c0 + vc, h);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const uint32_t row = row0 + wm * 32 + (q >> 1) * 16 + (q & 1) * 8 + g;
        if (row >= m) continue;
        const uint32_t y = targets[row];
        const float ls = lse_s[row], lz = lse_z[row], cw = crr_w[row];
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const uint32_t lc = lcol0 + wn * 32 + j * 8 + 2 * t + e;
                if (lc >= ldz) continue;
                float d = 0.0f;
                if (lc < vc) {
                    const uint32_t col = c0 + lc;
                    if (y != NONE) {
                        const float z = acc[q >> 1][j][(q & 1) * 2 + e];
                        const uint32_t cj = colmap != nullptr ? colmap[col] : NONE;
                        const float ml = cj != NONE ? mult[(uint64_t)row * s_cand + cj] : 1.0f;
                        const float qv = cj != NONE ? qh[(uint64_t)row * s_cand + cj] : 0.0f;
                        d = expf(z * ml - ls) * ml - qv - (col == y ? 1.0f : 0.0f);
                        if (cw != 0.0f) d += cw * expf(z - lz);
                        d *= scale;
                    }
                    const uint32_t sl = slotmap != nullptr ? slotmap[col] : NONE;
                    if (sl != NONE) dtrain[(uint64_t)row * ntrain + sl] = d;
                }
                dz[(uint64_t)row * ldz + lc] = __float2bfloat16_rn(d);
            }
    }
}

// =============================================================================================
// Pass 3b: dn [m, h] f32 (accumulate ? += : =) dz [m, ldz] bf16 · w [ldz, h] bf16, where `w`
// points at the chunk's first head row and rows >= vc are treated as zero. Grid (ceil(m/64),
// ceil(h/64)), block 128; one block owns its output tile over the whole chunk (deterministic).
extern "C" __global__ void __launch_bounds__(THREADS)
loss_dhidden_bf16(float *__restrict__ dn, const bf16 *__restrict__ dz, const bf16 *__restrict__ w, uint32_t m,
                  uint32_t h, uint32_t vc, uint32_t ldz, uint32_t accumulate) {
    __shared__ __align__(16) bf16 as[2][BM][PITCH];
    __shared__ __align__(16) bf16 bs[2][BK][BN + 8];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
    const int g = lane >> 2, t = lane & 3;
    const uint32_t row0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
    auto load = [&](int s, uint32_t k0) {
        load_chunk(as[s], dz, ldz, row0, m, k0, ldz);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int c = threadIdx.x + i * THREADS;  // 32 rows x 8 pieces of 8
            const int r = c >> 3, nc = (c & 7) * 8;
            const uint32_t k = k0 + r, n = n0 + nc;
            const bool ok = k < vc && n < h;
            cp_async_16_zfill(&bs[s][r][nc], ok ? w + (uint64_t)k * h + n : w, ok);
        }
    };
    const uint32_t nk = (ldz + BK - 1) / BK;
    load(0, 0);
    cp_async_commit();
    for (uint32_t kt = 0; kt < nk; ++kt) {
        const int s = kt & 1;
        if (kt + 1 < nk) {
            load(s ^ 1, (kt + 1) * BK);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t af[2][4], bf[4][2];
#pragma unroll
            for (int i = 0; i < 2; ++i) ldmatrix_x4(af[i], &as[s][wm * 32 + i * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
            for (int j = 0; j < 4; j += 2) {
                // Transposed matrices (k=kk, n), (kk+8, n), (kk, n+8), (kk+8, n+8): b[j], b[j+1].
                const int mi = lane >> 3, r = lane & 7;
                uint32_t t4[4];
                ldmatrix_x4_trans(t4, &bs[s][kk + (mi & 1) * 8 + r][wn * 32 + j * 8 + (mi >> 1) * 8]);
                bf[j][0] = t4[0];
                bf[j][1] = t4[1];
                bf[j + 1][0] = t4[2];
                bf[j + 1][1] = t4[3];
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_bf16_16816(acc[i][j], af[i], bf[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const uint32_t row = row0 + wm * 32 + i * 16 + g + (e >> 1) * 8;
                const uint32_t col = n0 + wn * 32 + j * 8 + 2 * t + (e & 1);
                if (row < m && col < h) {
                    float *p = dn + (uint64_t)row * h + col;
                    *p = accumulate ? *p + acc[i][j][e] : acc[i][j][e];
                }
            }
}
