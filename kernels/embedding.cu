// Token embedding: the row gather of the forward pass and the deterministic scatter-add of the
// gradient into the rows of the trainable tokens.
// CPU reference: engine/train/backprop.rs (the embedding copy at the start of the forward, and the
// "Embedding rows of trainable tokens" loop at the end of the backward).
#include "common.cuh"

using namespace ilrec;

// =============================================================================================
// Gather: out[i, :] = table[tokens[i], :]. Token ids must be < vocab (the caller validates them,
// as backprop.rs does; the kernel does not check).
// Layout: out [n, h], table [vocab, h], tokens [n] u32.
// Launch: element-wise over n * h (grid-stride; block 256).
template <typename TI, typename TO>
__device__ __forceinline__ void gather_impl(TO *__restrict__ out, const TI *__restrict__ table,
                                            const uint32_t *__restrict__ tokens, uint32_t n, uint32_t h) {
    ILREC_GRID_STRIDE(i, (uint64_t)n * h) {
        const uint64_t row = i / h, col = i % h;
        out[i] = st<TO>(ld(table[(uint64_t)tokens[row] * h + col]));
    }
}
extern "C" __global__ void embedding_gather_f32(float *out, const float *table, const uint32_t *tokens, uint32_t n,
                                                uint32_t h) {
    gather_impl(out, table, tokens, n, h);
}
extern "C" __global__ void embedding_gather_bf16(bf16 *out, const bf16 *table, const uint32_t *tokens, uint32_t n,
                                                 uint32_t h) {
    gather_impl(out, table, tokens, n, h);
}
// bf16 table, f32 activations (exact widening).
extern "C" __global__ void embedding_gather_bf16_to_f32(float *out, const bf16 *table, const uint32_t *tokens,
                                                        uint32_t n, uint32_t h) {
    gather_impl(out, table, tokens, n, h);
}

// =============================================================================================
// Scatter-add of the embedding gradient into the trainable rows, deterministic: each output
// element is owned by one thread, which adds its contributions one at a time in ascending
// position order, exactly the sequence of `+=` the CPU loop performs (bitwise equal to it).
// No atomics anywhere.

// CSR form (preferred): the host lists, for each trainable slot s, the positions i (ascending)
// with slot[tokens[i]] == s and mask[i] set, in positions[offsets[s] .. offsets[s+1]].
// grad[s, c] += dx[i, c] for those positions, in that order.
// Layout: grad [n_slots, h] f32 (accumulated into); dx [n, h] f32; offsets [n_slots + 1] u32;
// positions [offsets[n_slots]] u32.
// Launch: grid (n_slots, ceil(h / 256)), block 256 (any size; grid.y * block >= h).
extern "C" __global__ void embedding_scatter_add_csr_f32(float *__restrict__ grad, const float *__restrict__ dx,
                                                         const uint32_t *__restrict__ offsets,
                                                         const uint32_t *__restrict__ positions, uint32_t h) {
    const uint32_t s = blockIdx.x;
    const uint32_t col = blockIdx.y * blockDim.x + threadIdx.x;
    if (col >= h) return;
    const uint32_t k0 = offsets[s], k1 = offsets[s + 1];
    if (k0 == k1) return;
    float acc = grad[(uint64_t)s * h + col];
    for (uint32_t k = k0; k < k1; ++k) acc = fadd(acc, dx[(uint64_t)positions[k] * h + col]);
    grad[(uint64_t)s * h + col] = acc;
}

// Scan form (no host preprocessing; the CPU loop verbatim): block (s, column tile) walks all n
// positions in order and adds dx[i, c] where mask[i] != 0 and slot[tokens[i]] == s. Costs
// n_slots * n index reads: meant for small batches, or as the check of the CSR form.
// Layout: grad [n_slots, h] f32 (accumulated into); dx [n, h] f32; tokens [n] u32; mask [n] u8;
// slot [vocab] u32 (0xFFFFFFFF: not trainable).
// Launch: grid (n_slots, ceil(h / 256)), block 256 (any size; grid.y * block >= h).
extern "C" __global__ void embedding_scatter_add_scan_f32(float *__restrict__ grad, const float *__restrict__ dx,
                                                          const uint32_t *__restrict__ tokens,
                                                          const uint8_t *__restrict__ mask,
                                                          const uint32_t *__restrict__ slot, uint32_t n, uint32_t h) {
    const uint32_t s = blockIdx.x;
    const uint32_t col = blockIdx.y * blockDim.x + threadIdx.x;
    if (col >= h) return;
    float acc = grad[(uint64_t)s * h + col];
    for (uint32_t i = 0; i < n; ++i)
        if (mask[i] != 0 && slot[tokens[i]] == s) acc = fadd(acc, dx[(uint64_t)i * h + col]);
    grad[(uint64_t)s * h + col] = acc;
}
