// The LoRA linear, forward and backward, with the low-rank path fused into the base GEMM
// (dossier: docs/kernels/lora.md; CPU reference: lin_fwd / lin_bwd in engine/train/backprop.rs).
//
//   forward:  Y  = X W^T (+ bias) + s (drop(X) A^T) B^T        U  = drop(X) A^T   (kept for the backward)
//   backward: dX (+)= dY W + drop'((s dY B) A)                 dU = s dY B
//             dA += dU^T drop(X), dB += s dY^T U   (skinny TN products: ops/lora.rs, through `matmul`)
//
// Shapes: X [M, K], W [N, K] (frozen, bf16), A [r, K], B [N, r] (bf16 copies of the f32 parameters,
// made once per micro-batch: r (K + N) elements, under 0.1% of the base GEMM's bytes), U [M, r]
// bf16, Y / dX f32 [M, *] (the trainer's activations are f32), dropout mask u8 [M, K] (1 = kept;
// a kept element is multiplied by `keep` = 1 / (1 - p), exactly the CPU's f32 product).
//
// Two kernel families:
//
// - lora_gemm_{fwd,fwd_t,bwd,bwd_t}_r{16,32,64}: a 128 x 128 x 32 tensor-core tile GEMM
//   (mma.sync m16n8k16 bf16 -> f32, ldmatrix, 2-stage cp.async pipeline, XOR-swizzled shared
//   tiles, 8 warps of 64 x 32). C[M, Nc] = P[M, Kr] op(Q) + s_epi (T op(S)) [* mask * keep]
//   (+ bias) (+ C). fwd: op = ^T (Q = W [N, K], S = B [N, r]); bwd: op = none (Q = W [N, K] read
//   as [Kr = N, Nc = K], S = A [r, K]). The low-rank T = s_loop P op(Rw) [M, r] is either computed
//   in the main loop from the P tiles already in shared memory (`fwd`, `bwd`: Rw = A resp. B; the
//   block with blockIdx.x == 0 writes it out) or read (`fwd_t`, `bwd_t`, from lora_down). The
//   epilogue multiplies T [128, r] by the S tile with the same tensor cores and adds it to the
//   base accumulators before the single store of C.
// - lora_down_{nt_f32,nt_bf16,nn_f32}_r{16,32,64}: the memory-bound pass that makes T without
//   recomputing it per output tile: reads X (f32 or bf16) once, applies the dropout mask, writes the
//   bf16 GEMM operand (the dropped input for dA, or dY in bf16 for the backward GEMM, replacing the
//   cast that pass needed anyway) and T = scale bf16(X') op(Rw) [M, r].
//
// Why both: computing T in the main loop repeats it for every one of the Nc / 128 output tiles of
// a row block (+r/128 of the base FLOPs), while the separate pass costs one read of X
// (~ peak / (Nc * bandwidth) of the base time). ops/lora.rs picks per shape (docs/kernels/lora.md).
//
// Ranks: the template R in {16, 32, 64} is a capacity; any runtime r <= R works (rows/columns
// r .. R are zero-filled). Sizes: any M, N, K, r (ragged tiles are zero-filled); `vec` = 1 (every
// row length a multiple of 8 elements, so each 16-byte chunk is aligned) selects cp.async, else
// guarded element loads. Deterministic: no atomics; every output element has one owner.
// Launch (gemm): grid (ceil(Nc / 128), ceil(M / 128)), block 256, dynamic shared memory
// lora_gemm_smem_bytes (ops/lora.rs); (down): grid ceil(M / 64), block 128, 64 * 32 * 2 + R * 32 * 2.
//
// Versions: v1 (this file): compiled, unverified on GPU.
#include "mma.cuh"

using namespace ilrec;

namespace {

constexpr int BM = 128, BN = 128, BK = 32, THREADS = 256;
constexpr int DM = 64, DTHREADS = 128;  // lora_down: rows per block, threads per block

// Element offset of (row, col) in a [rows][COLS] bf16 tile whose 16-byte chunks are XOR-swizzled
// so that the 8 row addresses of one ldmatrix (same logical chunk, 8 consecutive rows) fall in 8
// different bank groups: with rows of 128 bytes or more the chunk index is XORed with row % 8;
// shorter rows (several per 128-byte line) with the index of the row's line.
template <int COLS>
__device__ __forceinline__ int swz(int row, int col) {
    constexpr int NCH = COLS / 8;
    const int ch = col >> 3;
    int p;
    if constexpr (NCH >= 8) {
        p = ch ^ (row & 7);
    } else {
        p = ch ^ ((row / (8 / NCH)) & (NCH - 1));
    }
    return row * COLS + (p << 3) + (col & 7);
}

__device__ __forceinline__ uint32_t bf16_bits(const bf16 *g, uint64_t i) {
    return (uint32_t)__bfloat16_as_ushort(g[i]);
}

// Rows [r0, r0 + ROWS) x columns [c0, c0 + COLS) of a row-major bf16 matrix (`ld` elements per row,
// `rows` x `cols` in all) into a swizzled [ROWS][COLS] tile; elements outside are zero. With `vec`
// (ld and cols multiples of 8) through cp.async (the caller commits and waits), else synchronous.
template <int ROWS, int COLS, int NT>
__device__ __forceinline__ void load_tile(bf16 *sm, const bf16 *g, uint32_t ld, uint32_t r0, uint32_t rows, uint32_t c0,
                                          uint32_t cols, bool vec) {
    constexpr int CPR = COLS / 8;
    for (int i = threadIdx.x; i < ROWS * CPR; i += NT) {
        const int row = i / CPR, col = (i % CPR) * 8;
        const uint32_t gr = r0 + row, gc = c0 + col;
        bf16 *dst = sm + swz<COLS>(row, col);
        if (vec) {
            const bool ok = gr < rows && gc < cols;
            cp_async_16_zfill(dst, ok ? g + (uint64_t)gr * ld + gc : g, ok);
        } else {
            uint32_t w[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const uint64_t base = (uint64_t)gr * ld + gc + 2 * e;
                const uint32_t lo = (gr < rows && gc + 2 * e < cols) ? bf16_bits(g, base) : 0u;
                const uint32_t hi = (gr < rows && gc + 2 * e + 1 < cols) ? bf16_bits(g, base + 1) : 0u;
                w[e] = lo | (hi << 16);
            }
            *reinterpret_cast<uint4 *>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
        }
    }
}

// B-operand fragments (mma.cuh: b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]) of two adjacent
// n8 tiles (columns n0 .. n0 + 15, k = kk .. kk + 15) from a tile stored N-major ([n][k], "^T":
// a weight row per output) or K-major ([k][n]).
template <bool KMAJOR, int COLS>
__device__ __forceinline__ void b_frag_x4(uint32_t b0[2], uint32_t b1[2], const bf16 *sm, int n0, int kk, int lane) {
    uint32_t r[4];
    if constexpr (KMAJOR) {
        const int row = kk + (lane & 7) + (((lane >> 3) & 1) << 3), col = n0 + ((lane >> 4) << 3);
        ldmatrix_x4_trans(r, sm + swz<COLS>(row, col));
    } else {
        const int row = n0 + (lane & 7) + ((lane >> 4) << 3), col = kk + (((lane >> 3) & 1) << 3);
        ldmatrix_x4(r, sm + swz<COLS>(row, col));
    }
    b0[0] = r[0];
    b0[1] = r[1];
    b1[0] = r[2];
    b1[1] = r[3];
}

// One n8 tile's B fragment (lanes 16-31 repeat lanes 0-15's addresses; ldmatrix_x2 ignores them).
template <bool KMAJOR, int COLS>
__device__ __forceinline__ void b_frag_x2(uint32_t b[2], const bf16 *sm, int n0, int kk, int lane) {
    if constexpr (KMAJOR) {
        ldmatrix_x2_trans(b, sm + swz<COLS>(kk + (lane & 7) + (((lane >> 3) & 1) << 3), n0));
    } else {
        ldmatrix_x2(b, sm + swz<COLS>(n0 + (lane & 7), kk + (((lane >> 3) & 1) << 3)));
    }
}

// Eight consecutive elements (32-byte aligned f32, 16-byte aligned bf16) as f32.
__device__ __forceinline__ void load8(float v[8], const float *x) {
    const float4 a = *reinterpret_cast<const float4 *>(x), b = *reinterpret_cast<const float4 *>(x + 4);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load8(float v[8], const bf16 *x) {
    const uint4 u = *reinterpret_cast<const uint4 *>(x);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const float2 f = unpack_bf16x2(w[e]);
        v[2 * e] = f.x, v[2 * e + 1] = f.y;
    }
}

// A-operand fragment of the 16 x 16 block at (m0, kk) of a row-major [rows][COLS] tile.
template <int COLS>
__device__ __forceinline__ void a_frag(uint32_t a[4], const bf16 *sm, int m0, int kk, int lane) {
    ldmatrix_x4(a, sm + swz<COLS>(m0 + (lane & 15), kk + ((lane >> 4) << 3)));
}

// NN = false: forward (Q, Rw, S stored N-major: W [Nc, Kr], A [r, Kr], B [Nc, r]).
// NN = true: backward input gradient (K-major: W [Kr, Nc], B [Kr, r], A [r, Nc]).
// LOOP: T = s_loop P op(Rw) computed here (written to t by the blockIdx.x == 0 column when
// write_t); else T is read from t.
template <bool NN, int R, bool LOOP>
__device__ __forceinline__ void lora_gemm(float *__restrict__ c, bf16 *__restrict__ t, const bf16 *__restrict__ p,
                                          const bf16 *__restrict__ q, const bf16 *__restrict__ rw,
                                          const bf16 *__restrict__ s, const float *__restrict__ bias,
                                          const uint8_t *__restrict__ mask, float keep, uint32_t M, uint32_t Nc,
                                          uint32_t Kr, uint32_t r, float s_loop, float s_epi, int accumulate,
                                          int write_t, int vec_i) {
    static_assert(R == 16 || R == 32 || R == 64, "rank capacity");
    ILREC_DYN_SMEM(bf16, sm);
    const bool vec = vec_i != 0;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = warp >> 2, wn = warp & 3;  // 2 x 4 warps, 64 x 32 each
    const int g = lane >> 2, tq = lane & 3;
    const uint32_t m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;

    constexpr int RT = LOOP ? R * BK : 0;
    constexpr int STAGE = BM * BK + BN * BK + RT;
    // T's n8 column chunks are dealt round-robin to the 4 warps that share a row range.
    constexpr int TCH = R / 8, UCH = (TCH + 3) / 4;

    float acc[4][4][4];
    float acct[4][UCH][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
        }
#pragma unroll
        for (int j = 0; j < UCH; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acct[i][j][e] = 0.f;
        }
    }

    auto load_stage = [&](int st, uint32_t k0) {
        bf16 *ps = sm + st * STAGE;
        load_tile<BM, BK, THREADS>(ps, p, Kr, m0, M, k0, Kr, vec);
        if constexpr (NN) {
            load_tile<BK, BN, THREADS>(ps + BM * BK, q, Nc, k0, Kr, n0, Nc, vec);
        } else {
            load_tile<BN, BK, THREADS>(ps + BM * BK, q, Kr, n0, Nc, k0, Kr, vec);
        }
        if constexpr (LOOP) {
            if constexpr (NN) {
                load_tile<BK, R, THREADS>(ps + BM * BK + BN * BK, rw, r, k0, Kr, 0, r, vec);
            } else {
                load_tile<R, BK, THREADS>(ps + BM * BK + BN * BK, rw, Kr, 0, r, k0, Kr, vec);
            }
        }
    };

    const uint32_t ktiles = (Kr + BK - 1) / BK;
    if (ktiles > 0) load_stage(0, 0);
    cp_async_commit();
    for (uint32_t kt = 0; kt < ktiles; ++kt) {
        if (kt + 1 < ktiles) load_stage((kt + 1) & 1, (kt + 1) * BK);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const bf16 *ps = sm + (kt & 1) * STAGE;
        const bf16 *qs = ps + BM * BK;
        const bf16 *rs = qs + BN * BK;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t b[4][2];
#pragma unroll
            for (int jj = 0; jj < 2; ++jj) {
                if constexpr (NN) {
                    b_frag_x4<true, BN>(b[2 * jj], b[2 * jj + 1], qs, wn * 32 + jj * 16, kk, lane);
                } else {
                    b_frag_x4<false, BK>(b[2 * jj], b[2 * jj + 1], qs, wn * 32 + jj * 16, kk, lane);
                }
            }
            uint32_t bt[UCH][2];
            if constexpr (LOOP) {
#pragma unroll
                for (int j = 0; j < UCH; ++j) {
                    const int ch = wn + 4 * j;
                    if (ch < TCH) {
                        if constexpr (NN) {
                            b_frag_x2<true, R>(bt[j], rs, ch * 8, kk, lane);
                        } else {
                            b_frag_x2<false, BK>(bt[j], rs, ch * 8, kk, lane);
                        }
                    }
                }
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                uint32_t a[4];
                a_frag<BK>(a, ps, wm * 64 + mi * 16, kk, lane);
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) mma_bf16_16816(acc[mi][ni], a, b[ni], acc[mi][ni]);
                if constexpr (LOOP) {
#pragma unroll
                    for (int j = 0; j < UCH; ++j) {
                        if (wn + 4 * j < TCH) mma_bf16_16816(acct[mi][j], a, bt[j], acct[mi][j]);
                    }
                }
            }
        }
        __syncthreads();  // the stage just read is the next iteration's load target
    }
    cp_async_wait<0>();
    __syncthreads();

    // Epilogue: T [BM][R] and the S tile in the (now free) pipeline buffers.
    bf16 *ts = sm;
    bf16 *ss = sm + BM * R;
    if constexpr (LOOP) {
        const bool out_t = write_t != 0 && blockIdx.x == 0;
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
            for (int j = 0; j < UCH; ++j) {
                const int ch = wn + 4 * j;
                if (ch >= TCH) continue;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = wm * 64 + mi * 16 + g + 8 * h, col = ch * 8 + 2 * tq;
                    const float v0 = acct[mi][j][2 * h] * s_loop, v1 = acct[mi][j][2 * h + 1] * s_loop;
                    *reinterpret_cast<uint32_t *>(ts + swz<R>(row, col)) = pack_bf16x2(v0, v1);
                    const uint32_t gr = m0 + row;
                    if (out_t && gr < M) {
                        if ((uint32_t)col < r) t[(uint64_t)gr * r + col] = __float2bfloat16_rn(v0);
                        if ((uint32_t)col + 1 < r) t[(uint64_t)gr * r + col + 1] = __float2bfloat16_rn(v1);
                    }
                }
            }
        }
    } else {
        load_tile<BM, R, THREADS>(ts, t, r, m0, M, 0, r, vec);
    }
    if constexpr (NN) {
        load_tile<R, BN, THREADS>(ss, s, Nc, 0, r, n0, Nc, vec);
    } else {
        load_tile<BN, R, THREADS>(ss, s, r, n0, Nc, 0, r, vec);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    float acc2[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc2[i][j][e] = 0.f;
        }
    }
#pragma unroll
    for (int kk = 0; kk < R; kk += 16) {
        uint32_t b[4][2];
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
            if constexpr (NN) {
                b_frag_x4<true, BN>(b[2 * jj], b[2 * jj + 1], ss, wn * 32 + jj * 16, kk, lane);
            } else {
                b_frag_x4<false, R>(b[2 * jj], b[2 * jj + 1], ss, wn * 32 + jj * 16, kk, lane);
            }
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
            uint32_t a[4];
            a_frag<R>(a, ts, wm * 64 + mi * 16, kk, lane);
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) mma_bf16_16816(acc2[mi][ni], a, b[ni], acc2[mi][ni]);
        }
    }

    // Pairs of adjacent columns per store: 8-byte stores when the row length keeps them aligned.
    const bool pairs = (Nc & 1u) == 0;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint32_t row = m0 + wm * 64 + mi * 16 + g + 8 * h;
                const uint32_t col = n0 + wn * 32 + ni * 8 + 2 * tq;
                if (row >= M || col >= Nc) continue;
                const uint64_t i = (uint64_t)row * Nc + col;
                float v[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float lo = acc2[mi][ni][2 * h + e] * s_epi;
                    if (mask != nullptr && col + e < Nc) lo = lo * (mask[i + e] ? keep : 0.f);
                    v[e] = acc[mi][ni][2 * h + e];
                    if (bias != nullptr && col + e < Nc) v[e] += bias[col + e];
                    v[e] += lo;
                }
                if (pairs) {
                    float2 *dst = reinterpret_cast<float2 *>(c + i);
                    if (accumulate) {
                        const float2 old = *dst;
                        v[0] += old.x;
                        v[1] += old.y;
                    }
                    *dst = make_float2(v[0], v[1]);
                } else {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        if (col + e < Nc) c[i + e] = accumulate ? v[e] + c[i + e] : v[e];
                    }
                }
            }
        }
    }
}

// T[M, r] = bf16(scale * bf16(X') op(Rw)), X' = X * (mask ? keep : 0) (or X), and xo = bf16(X').
// NN = false: Rw = A [r, K] ("^T"); NN = true: Rw = B [K, r]. 4 warps, 16 rows each.
template <bool NN, int R, typename TIn>
__device__ __forceinline__ void lora_down(bf16 *__restrict__ t, bf16 *__restrict__ xo, const TIn *__restrict__ x,
                                          const uint8_t *__restrict__ mask, float keep, const bf16 *__restrict__ rw,
                                          uint32_t M, uint32_t K, uint32_t r, float scale, int vec_i) {
    ILREC_DYN_SMEM(bf16, sm);
    bf16 *xs = sm;            // [DM][BK]
    bf16 *rs = sm + DM * BK;  // [R][BK] or [BK][R]
    const bool vec = vec_i != 0;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, tq = lane & 3;
    const uint32_t m0 = blockIdx.x * DM;
    constexpr int TCH = R / 8;
    float acc[TCH][4];
#pragma unroll
    for (int j = 0; j < TCH; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
    }
    // Each thread owns two 8-element chunks of the [64, 32] input tile. The next k-tile's chunks
    // are loaded into registers before this tile's MMAs, so a block keeps its loads in flight
    // while it computes (the pass is memory-bound: bytes in flight set its bandwidth).
    constexpr int CHUNKS = DM * BK / 8 / DTHREADS;
    static_assert(CHUNKS * DTHREADS * 8 == DM * BK, "whole chunks per thread");
    float cur[CHUNKS][8];
    auto fetch = [&](uint32_t k0) {
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            const int i = threadIdx.x + c * DTHREADS;
            const uint32_t gr = m0 + i / (BK / 8), gc = k0 + (i % (BK / 8)) * 8;
            const uint64_t g0 = (uint64_t)gr * K + gc;
            float *v = cur[c];
            if (vec && gr < M && gc + 8 <= K) {
                load8(v, x + g0);
                if (mask != nullptr) {
                    const uint2 mw = *reinterpret_cast<const uint2 *>(mask + g0);
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
                        const uint32_t byte = ((e < 4 ? mw.x : mw.y) >> (8 * (e & 3))) & 0xffu;
                        v[e] = fmul(v[e], byte ? keep : 0.f);
                    }
                }
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const bool ok = gr < M && gc + e < K;
                    float xv = ok ? ld(x[g0 + e]) : 0.f;
                    if (mask != nullptr && ok) xv = fmul(xv, mask[g0 + e] ? keep : 0.f);
                    v[e] = xv;
                }
            }
        }
    };
    if (K > 0) fetch(0);
    for (uint32_t k0 = 0; k0 < K; k0 += BK) {
        if constexpr (NN) {
            load_tile<BK, R, DTHREADS>(rs, rw, r, k0, K, 0, r, vec);
        } else {
            load_tile<R, BK, DTHREADS>(rs, rw, K, 0, r, k0, K, vec);
        }
        cp_async_commit();
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            const int i = threadIdx.x + c * DTHREADS;
            const int row = i / (BK / 8), col = (i % (BK / 8)) * 8;
            const uint32_t gr = m0 + row, gc = k0 + col;
            const uint64_t g0 = (uint64_t)gr * K + gc;
            const float *v = cur[c];
            const uint4 packed = make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]), pack_bf16x2(v[4], v[5]),
                                            pack_bf16x2(v[6], v[7]));
            *reinterpret_cast<uint4 *>(xs + swz<BK>(row, col)) = packed;
            if (xo != nullptr && gr < M) {
                if (vec && gc + 8 <= K) {
                    *reinterpret_cast<uint4 *>(xo + g0) = packed;
                } else {
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
                        if (gc + e < K) xo[g0 + e] = __float2bfloat16_rn(v[e]);
                    }
                }
            }
        }
        cp_async_wait<0>();
        __syncthreads();
        if (k0 + BK < K) fetch(k0 + BK);
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t a[4];
            a_frag<BK>(a, xs, warp * 16, kk, lane);
#pragma unroll
            for (int j = 0; j < TCH; ++j) {
                uint32_t b[2];
                if constexpr (NN) {
                    b_frag_x2<true, R>(b, rs, j * 8, kk, lane);
                } else {
                    b_frag_x2<false, BK>(b, rs, j * 8, kk, lane);
                }
                mma_bf16_16816(acc[j], a, b, acc[j]);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < TCH; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const uint32_t row = m0 + warp * 16 + g + 8 * (e >> 1), col = j * 8 + 2 * tq + (e & 1);
            if (row < M && col < r) t[(uint64_t)row * r + col] = __float2bfloat16_rn(acc[j][e] * scale);
        }
    }
}

}  // namespace

#define LORA_GEMM(name, NN, R, LOOP)                                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) name(                                                     \
        float *c, bf16 *t, const bf16 *p, const bf16 *q, const bf16 *rw, const bf16 *s, const float *bias,          \
        const uint8_t *mask, float keep, uint32_t M, uint32_t Nc, uint32_t Kr, uint32_t r, float s_loop, float s_epi, \
        int accumulate, int write_t, int vec) {                                                                      \
        lora_gemm<NN, R, LOOP>(c, t, p, q, rw, s, bias, mask, keep, M, Nc, Kr, r, s_loop, s_epi, accumulate, write_t, \
                               vec);                                                                                 \
    }

#define LORA_GEMM_RANKS(stem, NN, LOOP)     \
    LORA_GEMM(stem##_r16, NN, 16, LOOP)     \
    LORA_GEMM(stem##_r32, NN, 32, LOOP)     \
    LORA_GEMM(stem##_r64, NN, 64, LOOP)

LORA_GEMM_RANKS(lora_gemm_fwd, false, true)
LORA_GEMM_RANKS(lora_gemm_fwd_t, false, false)
LORA_GEMM_RANKS(lora_gemm_bwd, true, true)
LORA_GEMM_RANKS(lora_gemm_bwd_t, true, false)

#define LORA_DOWN(name, NN, R, TIn)                                                                                  \
    extern "C" __global__ void __launch_bounds__(DTHREADS) name(bf16 *t, bf16 *xo, const TIn *x, const uint8_t *mask, \
                                                                float keep, const bf16 *rw, uint32_t M, uint32_t K,  \
                                                                uint32_t r, float scale, int vec) {                  \
        lora_down<NN, R, TIn>(t, xo, x, mask, keep, rw, M, K, r, scale, vec);                                        \
    }

#define LORA_DOWN_RANKS(stem, NN, TIn)     \
    LORA_DOWN(stem##_r16, NN, 16, TIn)     \
    LORA_DOWN(stem##_r32, NN, 32, TIn)     \
    LORA_DOWN(stem##_r64, NN, 64, TIn)

LORA_DOWN_RANKS(lora_down_nt_f32, false, float)
LORA_DOWN_RANKS(lora_down_nt_bf16, false, bf16)
LORA_DOWN_RANKS(lora_down_nn_f32, true, float)
