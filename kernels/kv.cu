// KV-cache copies, and the dropout multiply of the LoRA branch.
// kv_scatter: the new tokens' key/value projections, laid out token-major as the GEMMs produce them ([batch * t, kv_heads * d]), copied into the cache's head-major layout
// ([batch, kv_heads, cap, d]) at rows past .. past + t, where attention reads them.
// CPU reference: scatter_kv in engine/model/forward.rs. A pure copy: bitwise equal.
// Layout: src [batch * t, heads * d] (T); dst [batch, heads, cap, d] (T).
// Launch: element-wise over batch * t * heads * d (grid-stride; block 256).
#include "common.cuh"

using namespace ilrec;

template <typename T>
__device__ __forceinline__ void kv_scatter_impl(T *__restrict__ dst, const T *__restrict__ src, uint32_t batch, uint32_t t,
                                                uint32_t past, uint32_t cap, uint32_t heads, uint32_t d) {
    const uint64_t n = (uint64_t)batch * t * heads * d;
    ILREC_GRID_STRIDE(e, n) {
        const uint64_t col = e % ((uint64_t)heads * d);
        const uint64_t row = e / ((uint64_t)heads * d);  // b * t + i
        const uint64_t b = row / t, i = row % t;
        const uint64_t hd = col / d, j = col % d;
        dst[((b * heads + hd) * cap + past + i) * d + j] = src[e];
    }
}
extern "C" __global__ void kv_scatter_f32(float *dst, const float *src, uint32_t batch, uint32_t t, uint32_t past,
                                          uint32_t cap, uint32_t heads, uint32_t d) {
    kv_scatter_impl(dst, src, batch, t, past, cap, heads, d);
}
extern "C" __global__ void kv_scatter_bf16(bf16 *dst, const bf16 *src, uint32_t batch, uint32_t t, uint32_t past,
                                           uint32_t cap, uint32_t heads, uint32_t d) {
    kv_scatter_impl(dst, src, batch, t, past, cap, heads, d);
}

// The inverse copy: cache layout back to token-major rows (the attention backward's dK/dV, which
// the K/V projections' backward reads as [batch * t, heads * d]). Rows past .. past + t of src.
// Layout: src [batch, heads, cap, d] (T); dst [batch * t, heads * d] (T).
// Launch: element-wise over batch * t * heads * d (grid-stride; block 256).
template <typename T>
__device__ __forceinline__ void kv_gather_impl(T *__restrict__ dst, const T *__restrict__ src, uint32_t batch, uint32_t t,
                                               uint32_t past, uint32_t cap, uint32_t heads, uint32_t d) {
    const uint64_t n = (uint64_t)batch * t * heads * d;
    ILREC_GRID_STRIDE(e, n) {
        const uint64_t col = e % ((uint64_t)heads * d);
        const uint64_t row = e / ((uint64_t)heads * d);
        const uint64_t b = row / t, i = row % t;
        const uint64_t hd = col / d, j = col % d;
        dst[e] = src[((b * heads + hd) * cap + past + i) * d + j];
    }
}
extern "C" __global__ void kv_gather_f32(float *dst, const float *src, uint32_t batch, uint32_t t, uint32_t past,
                                         uint32_t cap, uint32_t heads, uint32_t d) {
    kv_gather_impl(dst, src, batch, t, past, cap, heads, d);
}
extern "C" __global__ void kv_gather_bf16(bf16 *dst, const bf16 *src, uint32_t batch, uint32_t t, uint32_t past,
                                          uint32_t cap, uint32_t heads, uint32_t d) {
    kv_gather_impl(dst, src, batch, t, past, cap, heads, d);
}

// Element-wise product in place: x[i] *= m[i] (dropout masks holding 0 or 1/(1-p), applied to
// the LoRA branch's input and to its gradient; the CPU multiplies the same f32 values).
// Layout: x, m [n] f32. Launch: element-wise over n (grid-stride; block 256).
extern "C" __global__ void mul_inplace_f32(float *__restrict__ x, const float *__restrict__ m, uint64_t n) {
    ILREC_GRID_STRIDE(i, n) x[i] = fmul(x[i], m[i]);
}

// The cache's bookkeeping for new tokens, on the device, so a decode step uploads nothing:
// sequence b's t new tokens (mask [batch * t] u8, 1 = real; null = all real) get their RoPE
// positions (pos [batch * t] u32: the real tokens before them; a padding token takes the last
// real position, as positions() in engine/model/batch.rs), their key-mask columns
// past .. past + t (key_mask [batch, cap] u8) and the new real-token count real_out [batch] from
// real_in [batch] (u32; distinct buffers, so a forward that fails later leaves the cache's count
// as it was: columns past the committed length are never read).
// Launch: element-wise over batch (grid-stride; block 256); t is a handful of tokens in decode and
// a prompt's length at prefill, once per decode.
extern "C" __global__ void kv_advance(uint32_t *__restrict__ pos, uint8_t *__restrict__ key_mask,
                                      uint32_t *__restrict__ real_out, const uint32_t *__restrict__ real_in,
                                      const uint8_t *__restrict__ mask, uint32_t batch, uint32_t t, uint32_t past,
                                      uint32_t cap) {
    ILREC_GRID_STRIDE(b, batch) {
        uint32_t real = real_in[b];
        for (uint32_t i = 0; i < t; ++i) {
            const uint8_t m = mask ? mask[b * t + i] : (uint8_t)1;
            pos[b * t + i] = m ? real : (real > 0 ? real - 1 : 0);
            key_mask[b * cap + past + i] = m;
            real += m ? 1u : 0u;
        }
        real_out[b] = real;
    }
}
