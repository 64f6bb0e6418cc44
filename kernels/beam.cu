// Trie-constrained beam search on the device (issue 8; docs/kernels/decode.md). One step is two
// launches, beam_lse_f32 then beam_select; beams are fixed slots (`users x beam`), dead slots hold
// node NO_NODE. The host reference of exactly this algorithm is `flat_step` in
// engine/rec/beam.rs (itself checked equal to the CPU beam search `search`).
//
// Trie layout (FlatTrie, engine/rec/trie.rs, validated on the host before upload): child_start
// [nodes + 1], child_token / child_node [edges] sorted by token within a node, node_item [nodes]
// (0xFFFFFFFF for inner nodes). Nodes < 2^31, vocab <= 2^23, beam <= 512 (checked by the launcher).
//
// Ranking key of a candidate (u64, ascending = better): high 32 bits the f32-rounded score mapped
// so that a higher score is a smaller integer, low 32 bits (token << 9 | beam). This is the CPU's
// order (score descending, token ascending, beam ascending) except between two candidates whose
// f64 scores round to the same f32 (relative gap < 6e-8), where the device breaks the tie by
// token and beam. Scores themselves stay f64 (as in the CPU search): only ranking uses the key.
#include "common.cuh"

using namespace ilrec;

#define NO_NODE 0xFFFFFFFFu
#define LEAF_BIT 0x80000000u
#define SELECT_THREADS 512
#define MAX_BEAM 512

// Log-sum-exp of each live slot's logits row (the CPU's f64 `log_sum_exp` of the full row: f32
// max, f32 exp(x - max) per element, the per-thread f32 partial sums added in f64), and the first
// row with a NaN or +inf (atomicMin, so the reported row does not depend on timing).
// Layout: logits [users * rows_per_user, vocab] f32; node, lse [users * beam] (u32, f64); err [1]
// u32, initialised to 0xFFFFFFFF by the caller. Slot b of user u reads row u * rows_per_user + b
// (live slots lie below rows_per_user). Launch: one block per row (grid users * rows_per_user),
// blockDim a multiple of 32 (256 intended).
extern "C" __global__ void beam_lse_f32(double *__restrict__ lse, uint32_t *__restrict__ err, const float *__restrict__ logits,
                                        const uint32_t *__restrict__ node, uint32_t vocab, uint32_t rows_per_user,
                                        uint32_t beam) {
    __shared__ float shf[32];
    __shared__ double shd[32];
    const uint32_t row = blockIdx.x, u = row / rows_per_user, b = row % rows_per_user;
    const uint64_t slot = (uint64_t)u * beam + b;
    if (node[slot] == NO_NODE) return;  // uniform over the block
    const float *x = logits + (uint64_t)row * vocab;
    float m = -INFINITY;
    bool bad = false;
    for (uint32_t i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = x[i];
        bad |= (v != v) || (v == INFINITY);
        m = fmaxf(m, v);
    }
    if (bad) atomicMin(err, row);
    m = block_max(m, shf);
    float s = 0.0f;
    if (m != -INFINITY) {
        for (uint32_t i = threadIdx.x; i < vocab; i += blockDim.x) s += expf(x[i] - m);
    }
    const double total = block_sum((double)s, shd);
    if (threadIdx.x == 0) lse[slot] = (double)m + log(total);
}

__device__ __forceinline__ uint64_t rank_key(double score, uint32_t token, uint32_t beam) {
    const uint32_t u = __float_as_uint((float)score);
    const uint32_t hi = (u & 0x80000000u) ? u : (~u & 0x7fffffffu);
    return ((uint64_t)hi << 32) | ((uint64_t)token << 9) | beam;
}

// Exclusive prefix sum of v (one value per thread, all SELECT_THREADS threads take part) in
// `sh` [SELECT_THREADS + 1]; sh[SELECT_THREADS] is the total. Hillis-Steele in shared memory.
__device__ uint32_t block_exclusive_scan(uint32_t v, uint32_t *sh) {
    const uint32_t t = threadIdx.x;
    __syncthreads();
    sh[t] = v;
    __syncthreads();
    for (uint32_t o = 1; o < SELECT_THREADS; o <<= 1) {
        const uint32_t add = t >= o ? sh[t - o] : 0u;
        __syncthreads();
        sh[t] += add;
        __syncthreads();
    }
    const uint32_t incl = sh[t];
    __syncthreads();
    if (t == SELECT_THREADS - 1) sh[SELECT_THREADS] = incl;
    sh[t] = incl - v;
    __syncthreads();
    return incl - v;
}

struct SelectShared {
    uint32_t hist[256];
    uint64_t key[MAX_BEAM];
    uint32_t idx[MAX_BEAM];
    uint64_t prefix;
    uint32_t remaining, total, done_flag, count;
};

// The k_want smallest keys among the n candidates that pass the filter (all, or only those whose
// child is not a leaf), sorted ascending into sh.key / sh.idx [0, k); returns k = min(k_want,
// passing). MSB-first radix select over 8-bit digits (histograms with integer shared atomics:
// exact counts), stopping as soon as the selected digit's bucket is taken whole; then a
// compaction of the keys <= the threshold (exactly k, keys are unique) and a bitonic sort.
__device__ uint32_t select_smallest(const uint64_t *__restrict__ keys, const uint32_t *__restrict__ child, uint32_t n,
                                    uint32_t k_want, bool inner_only, SelectShared &sh) {
    const uint32_t t = threadIdx.x, lane = t & 31u;
    uint64_t mask = 0;
    if (t == 0) {
        sh.prefix = 0;
        sh.remaining = k_want;
        sh.done_flag = 0;
    }
    uint64_t threshold = ~0ull;
    for (int shift = 56; shift >= 0; shift -= 8) {
        __syncthreads();
        if (t < 256) sh.hist[t] = 0;
        __syncthreads();
        const uint64_t prefix = sh.prefix;
        for (uint32_t i = t; i < n; i += SELECT_THREADS) {
            const uint64_t k = keys[i];
            if ((inner_only && (child[i] & LEAF_BIT)) || (k & mask) != prefix) continue;
            atomicAdd(&sh.hist[(k >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (t < 32) {
            // Lane l owns digits 8l .. 8l + 7; an inclusive warp scan of the lane sums finds the
            // digit holding the remaining-th smallest key.
            uint32_t c[8], sum = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                c[j] = sh.hist[lane * 8 + j];
                sum += c[j];
            }
            uint32_t incl = sum;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const uint32_t y = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= (uint32_t)o) incl += y;
            }
            const uint32_t all = __shfl_sync(0xffffffffu, incl, 31);
            uint32_t rem = sh.remaining;
            if (shift == 56) {
                rem = min(rem, all);  // the first pass sees every passing candidate
                if (lane == 0) sh.total = rem;
            }
            __syncwarp();
            if (rem == 0) {
                if (lane == 0) sh.done_flag = 2;
            } else {
                uint32_t before = incl - sum;
                if (before < rem && rem <= incl) {
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        if (before < rem && rem <= before + c[j]) {
                            const uint32_t d = lane * 8 + j;
                            const uint32_t left = rem - before;
                            sh.prefix = prefix | ((uint64_t)d << shift);
                            sh.remaining = left;
                            if (left == c[j]) sh.done_flag = 1;
                        }
                        before += c[j];
                    }
                }
            }
        }
        __syncthreads();
        mask |= 0xffull << shift;
        if (sh.done_flag == 2) return 0;
        if (sh.done_flag == 1 || shift == 0) {
            threshold = sh.prefix | (shift == 0 ? 0ull : ((1ull << shift) - 1ull));
            break;
        }
    }
    const uint32_t k = sh.total;
    uint32_t p = 1;
    while (p < k) p <<= 1;
    if (t == 0) sh.count = 0;
    __syncthreads();
    for (uint32_t i = t; i < n; i += SELECT_THREADS) {
        const uint64_t key = keys[i];
        if ((inner_only && (child[i] & LEAF_BIT)) || key > threshold) continue;
        const uint32_t pos = atomicAdd(&sh.count, 1u);
        if (pos < MAX_BEAM) {
            sh.key[pos] = key;
            sh.idx[pos] = i;
        }
    }
    __syncthreads();
    if (t >= k && t < p) {
        sh.key[t] = ~0ull;
        sh.idx[t] = 0;
    }
    for (uint32_t size = 2; size <= p; size <<= 1) {
        for (uint32_t stride = size >> 1; stride > 0; stride >>= 1) {
            __syncthreads();
            const uint32_t j = t ^ stride;
            if (t < p && j > t) {
                const bool up = (t & size) == 0;
                const uint64_t a = sh.key[t], b = sh.key[j];
                if ((a > b) == up) {
                    sh.key[t] = b;
                    sh.key[j] = a;
                    const uint32_t ia = sh.idx[t];
                    sh.idx[t] = sh.idx[j];
                    sh.idx[j] = ia;
                }
            }
        }
    }
    __syncthreads();
    return k;
}

// (score descending, item ascending): the order of a user's finished list.
__device__ __forceinline__ bool fin_better(double sa, uint32_t ia, double sb, uint32_t ib) {
    return sa > sb || (sa == sb && ia < ib);
}

// One beam step per user: candidates = children of every live slot's node, scored
// score + (logit - lse) in f64; the best `beam` candidates overall finish their leaves, the best
// `beam` inner candidates become the new live slots (in rank order), the finished top_k list is
// merged, and the user stops when no live score can enter it (engine/rec/beam.rs `search`).
// Writes parent (user-local slot) and token per new slot for the KV reorder and the next forward;
// dead slots get 0 and 0.
// Layout: logits [users * rows_per_user, vocab] f32; lse, score [users * beam] f64; node, parent,
// token [users * beam] u32; done, fin_count [users] u32; fin_score [users * top_k] f64, fin_item
// [users * top_k] u32; cand_key [users * max_cand] u64 and cand_child [users * max_cand] u32
// scratch (max_cand >= the root's fan-out and beam * the largest fan-out below the root; a user's
// candidates beyond max_cand would be dropped, never written out of bounds). Launch: one block of SELECT_THREADS per user.
extern "C" __global__ void __launch_bounds__(SELECT_THREADS)
    beam_select(uint32_t *__restrict__ node, double *__restrict__ score, uint32_t *__restrict__ done,
                double *__restrict__ fin_score, uint32_t *__restrict__ fin_item, uint32_t *__restrict__ fin_count,
                uint32_t *__restrict__ parent, uint32_t *__restrict__ token, uint64_t *__restrict__ cand_key,
                uint32_t *__restrict__ cand_child, const float *__restrict__ logits, const double *__restrict__ lse,
                const uint32_t *__restrict__ child_start, const uint32_t *__restrict__ child_token,
                const uint32_t *__restrict__ child_node, const uint32_t *__restrict__ node_item, uint32_t vocab,
                uint32_t rows_per_user, uint32_t beam, uint32_t top_k, uint32_t max_cand) {
    __shared__ SelectShared sh;
    __shared__ uint32_t s_node[MAX_BEAM];
    __shared__ double s_score[MAX_BEAM];
    __shared__ uint32_t s_off[SELECT_THREADS + 1];
    __shared__ double new_s[MAX_BEAM], old_s[MAX_BEAM];
    __shared__ uint32_t new_i[MAX_BEAM], old_i[MAX_BEAM];
    __shared__ double s_kth;
    const uint32_t u = blockIdx.x, t = threadIdx.x;
    const uint64_t base = (uint64_t)u * beam;
    uint64_t *keys = cand_key + (uint64_t)u * max_cand;
    uint32_t *kids = cand_child + (uint64_t)u * max_cand;
    const bool user_done = done[u] != 0;

    uint32_t fan = 0;
    if (t < beam) {
        const uint32_t nd = node[base + t];
        s_node[t] = nd;
        s_score[t] = score[base + t];
        // A live slot without a logits row (b >= rows_per_user) cannot be scored: treated as dead,
        // so no read leaves the user's rows (the host step rejects such a state).
        if (!user_done && nd != NO_NODE && t < rows_per_user) fan = child_start[nd + 1] - child_start[nd];
    }
    block_exclusive_scan(fan, s_off);
    const uint32_t n = min(s_off[SELECT_THREADS], max_cand);

    // Candidates: for index i, the slot b with s_off[b] <= i < s_off[b + 1] (binary search).
    for (uint32_t i = t; i < n; i += SELECT_THREADS) {
        uint32_t lo = 0, hi = beam;
        while (hi - lo > 1) {
            const uint32_t mid = (lo + hi) >> 1;
            if (s_off[mid] <= i) lo = mid; else hi = mid;
        }
        const uint32_t e = child_start[s_node[lo]] + (i - s_off[lo]);
        const uint32_t tok = child_token[e], c = child_node[e];
        const double lp = (double)logits[((uint64_t)u * rows_per_user + lo) * vocab + tok] - lse[base + lo];
        keys[i] = rank_key(s_score[lo] + lp, tok, lo);
        kids[i] = c | (node_item[c] != NO_NODE ? LEAF_BIT : 0u);
    }
    __syncthreads();

    // Finished: the leaves among the best `beam` candidates, in rank order.
    const uint32_t ka = select_smallest(keys, kids, n, beam, false, sh);
    bool leaf = false;
    uint32_t item = 0;
    double sc = 0.0;
    if (t < ka) {
        const uint32_t i = sh.idx[t];
        leaf = (kids[i] & LEAF_BIT) != 0;
        if (leaf) {
            const uint64_t key = sh.key[t];
            const uint32_t b = (uint32_t)key & 511u, tok = ((uint32_t)key) >> 9;
            const uint32_t c = kids[i] & ~LEAF_BIT;
            item = node_item[c];
            sc = s_score[b] + ((double)logits[((uint64_t)u * rows_per_user + b) * vocab + tok] - lse[base + b]);
        }
    }
    const uint32_t pos = block_exclusive_scan(leaf ? 1u : 0u, s_off);
    const uint32_t n_new = s_off[SELECT_THREADS];
    if (leaf) {
        new_s[pos] = sc;
        new_i[pos] = item;
    }
    const uint32_t n_old = user_done ? 0u : fin_count[u];
    if (t < n_old) {
        old_s[t] = fin_score[(uint64_t)u * top_k + t];
        old_i[t] = fin_item[(uint64_t)u * top_k + t];
    }
    __syncthreads();

    // Live: the best `beam` inner candidates (the same list when no leaf made the top `beam`).
    const uint32_t kb = n_new == 0 ? ka : select_smallest(keys, kids, n, beam, true, sh);

    // New finished in the list's order (rank by counting: at most `beam` of them), then merged
    // with the old list (both sorted, items distinct: positions by binary search).
    double ns = 0.0;
    uint32_t ni = 0, nrank = 0;
    if (t < n_new) {
        ns = new_s[t];
        ni = new_i[t];
        for (uint32_t j = 0; j < n_new; ++j) nrank += fin_better(new_s[j], new_i[j], ns, ni) ? 1u : 0u;
    }
    __syncthreads();
    if (t < n_new) {
        new_s[nrank] = ns;
        new_i[nrank] = ni;
    }
    __syncthreads();
    const uint32_t n_fin = min(top_k, n_old + n_new);
    if (t < n_old) {
        uint32_t lo = 0, hi = n_new;  // new entries better than old[t]
        while (lo < hi) {
            const uint32_t mid = (lo + hi) >> 1;
            if (fin_better(new_s[mid], new_i[mid], old_s[t], old_i[t])) lo = mid + 1; else hi = mid;
        }
        const uint32_t p = t + lo;
        if (p < top_k) {
            fin_score[(uint64_t)u * top_k + p] = old_s[t];
            fin_item[(uint64_t)u * top_k + p] = old_i[t];
            if (p == top_k - 1) s_kth = old_s[t];
        }
    }
    if (t < n_new) {
        uint32_t lo = 0, hi = n_old;  // old entries better than new[t]
        while (lo < hi) {
            const uint32_t mid = (lo + hi) >> 1;
            if (fin_better(old_s[mid], old_i[mid], new_s[t], new_i[t])) lo = mid + 1; else hi = mid;
        }
        const uint32_t p = t + lo;
        if (p < top_k) {
            fin_score[(uint64_t)u * top_k + p] = new_s[t];
            fin_item[(uint64_t)u * top_k + p] = new_i[t];
            if (p == top_k - 1) s_kth = new_s[t];
        }
    }
    if (t == 0 && !user_done) fin_count[u] = n_fin;
    __syncthreads();

    // The best live score (rank 0 of the inner list) against the top_k-th finished.
    double best = -INFINITY;
    if (kb > 0) {
        const uint64_t key = sh.key[0];
        const uint32_t b = (uint32_t)key & 511u, tok = ((uint32_t)key) >> 9;
        best = s_score[b] + ((double)logits[((uint64_t)u * rows_per_user + b) * vocab + tok] - lse[base + b]);
    }
    const bool stop = user_done || kb == 0 || (n_fin >= top_k && best <= s_kth);
    if (t < beam) {
        if (!stop && t < kb) {
            const uint64_t key = sh.key[t];
            const uint32_t b = (uint32_t)key & 511u, tok = ((uint32_t)key) >> 9;
            node[base + t] = kids[sh.idx[t]] & ~LEAF_BIT;
            score[base + t] = s_score[b] + ((double)logits[((uint64_t)u * rows_per_user + b) * vocab + tok] - lse[base + b]);
            parent[base + t] = b;
            token[base + t] = tok;
        } else {
            node[base + t] = NO_NODE;
            score[base + t] = -INFINITY;
            parent[base + t] = 0;
            token[base + t] = 0;
        }
    }
    if (t == 0) done[u] = stop ? 1u : 0u;
}

// The KV cache after a beam step: row r of the new cache (`groups * dst_per` rows; group g = r /
// dst_per, one group per user) is row parent[r] of the same group in the old cache (`src_per`
// rows per group; parent clamped into the group, so any parent value stays inside the cache).
// Positions 0 .. len only (the rest are never read before being written).
// Layout: src [groups * src_per, heads, cap, d] f32, dst [groups * dst_per, heads, cap, d] f32,
// parent [groups * dst_per] u32. Launch: element-wise over groups * dst_per * heads * len * d.
extern "C" __global__ void kv_reorder_f32(float *__restrict__ dst, const float *__restrict__ src,
                                          const uint32_t *__restrict__ parent, uint32_t groups, uint32_t src_per,
                                          uint32_t dst_per, uint32_t heads, uint32_t cap, uint32_t len, uint32_t d) {
    const uint64_t n = (uint64_t)groups * dst_per * heads * len * d;
    ILREC_GRID_STRIDE(e, n) {
        const uint64_t j = e % d;
        const uint64_t p = (e / d) % len;
        const uint64_t rh = e / ((uint64_t)d * len);  // r * heads + h
        const uint64_t h = rh % heads, r = rh / heads;
        const uint64_t g = r / dst_per;
        const uint64_t sr = g * src_per + min(parent[r], src_per - 1u);
        dst[((r * heads + h) * cap + p) * d + j] = src[((sr * heads + h) * cap + p) * d + j];
    }
}
