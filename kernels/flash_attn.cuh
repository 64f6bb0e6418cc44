// Shared pieces of the fused (flash) attention kernels, kernels/flash_attn.cu (forward, split-KV
// decoding, combine) and kernels/flash_attn_bwd.cu (backward): the shared-memory tile layout of a
// bf16 [rows x D] tile, its asynchronous load from global memory, and the masking rule.
// Status: compiled, unverified on GPU.
#pragma once

#include "mma.cuh"

namespace ilrec {
namespace flash {

// ln(2) and log2(e): scores are kept in base-2 units (s * scale * log2 e) so that exp is one ex2.
constexpr float LN2 = 0.69314718055994530942f;
constexpr float LOG2E = 1.44269504088896340736f;

// A [ROWS x D] bf16 tile in shared memory, stored as 16-byte chunks (8 elements; ldmatrix reads
// one chunk per lane). Bank conflicts: the 8 lanes of one ldmatrix phase read the same chunk
// column of 8 consecutive rows. For D a multiple of 64 the row is 128-byte aligned, so the chunk
// index is XOR-swizzled with (row & 7), which spreads those 8 reads over the 8 16-byte bank
// groups without padding (padding would push the D = 128 backward past the 48 KiB of dynamic
// shared memory a launch gets without an opt-in). Other D (80) pad each row by one chunk: a row
// pitch of 176 bytes also visits 8 distinct bank groups over 8 rows.
template <int D>
struct Tile {
    static_assert(D % 16 == 0, "head dim must be a multiple of 16 (mma k-step)");
    static constexpr bool SWIZZLE = (D % 64) == 0;
    static constexpr int CHUNKS = D / 8;
    static constexpr int ROW_BYTES = SWIZZLE ? D * 2 : D * 2 + 16;
    __device__ __forceinline__ static uint32_t off(int row, int chunk) {
        return (uint32_t)row * ROW_BYTES + ((uint32_t)(SWIZZLE ? (chunk ^ (row & 7)) : chunk) << 4);
    }
};

// Queues the cp.async copies of ROWS rows of D bf16 into `tile` (NT threads cooperate): row r comes
// from `row_ptr(r)`, or is zero-filled when `valid(r)` is false (ragged edges; the source is then
// never read, so rows past the end of a buffer, or holding NaN, cost nothing and leak nothing).
template <int D, int ROWS, int NT, typename RowPtr, typename Valid>
__device__ __forceinline__ void load_tile(unsigned char *tile, RowPtr row_ptr, Valid valid) {
    using TL = Tile<D>;
    constexpr int TOTAL = ROWS * TL::CHUNKS;
#pragma unroll
    for (int x = threadIdx.x; x < TOTAL; x += NT) {
        const int r = x / TL::CHUNKS, c = x % TL::CHUNKS;
        const bool ok = valid(r);
        const bf16 *src = ok ? row_ptr(r) + c * 8 : row_ptr(0);
        cp_async_16_zfill(tile + TL::off(r, c), src, ok);
    }
}

// A fragments (mma_bf16_16816's `a`) of a [16 x D] row-major tile whose first row is `row0`:
// frag[ks] covers columns 16 ks .. 16 ks + 15.
template <int D>
__device__ __forceinline__ void load_a_frags(uint32_t frag[D / 16][4], const unsigned char *tile, int row0) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
        ldmatrix_x4(frag[ks], tile + Tile<D>::off(row0 + (lane & 15), 2 * ks + (lane >> 4)));
}

// B fragments of two n-tiles for a product against the transpose of a row-major tile (S = Q K^T:
// B = K^T, column n = tile row n): rows n0 .. n0 + 15, columns 16 ks .. 16 ks + 15. b0 is n-tile
// rows n0 .. n0 + 7, b1 rows n0 + 8 .. n0 + 15.
template <int D>
__device__ __forceinline__ void load_bt_pair(uint32_t b0[2], uint32_t b1[2], const unsigned char *tile, int n0, int ks) {
    const int lane = threadIdx.x & 31, mat = lane >> 3;
    uint32_t r[4];
    ldmatrix_x4(r, tile + Tile<D>::off(n0 + (lane & 7) + ((mat >> 1) << 3), 2 * ks + (mat & 1)));
    b0[0] = r[0];
    b0[1] = r[1];
    b1[0] = r[2];
    b1[1] = r[3];
}

// B fragments of two n-tiles for a product against a row-major tile as is (O = P V: B = V, rows
// are the k dimension): rows k0 .. k0 + 15, columns (n-tiles) 16 dp .. 16 dp + 7 (b0) and
// 16 dp + 8 .. 16 dp + 15 (b1).
template <int D>
__device__ __forceinline__ void load_b_pair(uint32_t b0[2], uint32_t b1[2], const unsigned char *tile, int k0, int dp) {
    const int lane = threadIdx.x & 31, mat = lane >> 3;
    uint32_t r[4];
    ldmatrix_x4_trans(r, tile + Tile<D>::off(k0 + (lane & 7) + ((mat & 1) << 3), 2 * dp + (mat >> 1)));
    b0[0] = r[0];
    b0[1] = r[1];
    b1[0] = r[2];
    b1[1] = r[3];
}

// The accumulators of n-tiles 2 kk and 2 kk + 1 (a [16 x 16] block of a product, f32) as the A
// fragment of the next product (bf16), e.g. P for O = P V.
__device__ __forceinline__ void acc_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
    a[0] = pack_bf16x2(c0[0], c0[1]);
    a[1] = pack_bf16x2(c0[2], c0[3]);
    a[2] = pack_bf16x2(c1[0], c1[1]);
    a[3] = pack_bf16x2(c1[2], c1[3]);
}

// Whether key `j` counts for a query whose last visible key is `last` (its absolute position: the
// causal limit; -1 for a padding row of a tile): j <= last, j inside the written part of the cache
// (j < kv_len), and a real key per the mask.
__device__ __forceinline__ bool visible(int j, int last, int kv_len, const uint8_t *mask_b) {
    return j <= last && j < kv_len && mask_b[j] != 0;
}

}  // namespace flash
}  // namespace ilrec
