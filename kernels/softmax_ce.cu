// Row-wise log-softmax and softmax cross-entropy (forward + backward) for small vocabularies
// (item-token sub-vocabularies, SASRec item tables, the SmolLM2 49k vocabulary at most): one block
// per row, the row streamed from global memory three times.
// CPU reference: engine/train/loss.rs (logsumexp, ce_row, sft_loss), which works in f64: so do
// these kernels (the logits are read as f32 and widened; exp and log are f64).
#include "common.cuh"

using namespace ilrec;

// log-sum-exp of one row in f64 (logsumexp in loss.rs: max, then max + ln(sum exp(v - max));
// -inf when every value is -inf). Called by every thread of the block; returns the value to all.
template <typename T>
__device__ __forceinline__ double row_lse(const T *z, uint32_t vocab, double *sh) {
    double mx = -INFINITY;
    for (uint32_t j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmax(mx, (double)ld(z[j]));
    mx = block_max(mx, sh);
    if (mx == -INFINITY) return mx;
    double s = 0.0;
    for (uint32_t j = threadIdx.x; j < vocab; j += blockDim.x) s += exp((double)ld(z[j]) - mx);
    s = block_sum(s, sh);
    return mx + log(s);
}

// =============================================================================================
// Cross-entropy per row (ce_row in loss.rs): loss[r] = lse - z[y] (f64) and, when dlogits is not
// null, dlogits[r, j] = f32(exp(z_j - lse) * scale), minus f32(scale) at j = y (the CPU's two
// roundings, in its order). `scale` is 1/norm for the SFT loss (sft_loss). A target of 0xFFFFFFFF
// marks an ignored row: loss 0 and a zero gradient row. Other targets must be < vocab and the
// logits finite (the caller checks, as sft_loss does).
// Layout: logits [n, vocab] (T); targets [n] u32; loss [n] f64; dlogits [n, vocab] f32 or null.
// Launch: grid (n), block 256 (multiple of 32, <= 1024).
template <typename T>
__device__ __forceinline__ void ce_row_impl(double *loss, float *dlogits, const T *logits, const uint32_t *targets,
                                            uint32_t vocab, double scale) {
    __shared__ double sh[32];
    const uint64_t row = blockIdx.x;
    const T *z = logits + row * vocab;
    float *d = dlogits == nullptr ? nullptr : dlogits + row * vocab;
    const uint32_t y = targets[row];
    if (y == 0xFFFFFFFFu) {
        if (threadIdx.x == 0) loss[row] = 0.0;
        if (d != nullptr)
            for (uint32_t j = threadIdx.x; j < vocab; j += blockDim.x) d[j] = 0.0f;
        return;
    }
    const double lse = row_lse(z, vocab, sh);
    if (threadIdx.x == 0) loss[row] = lse - (double)ld(z[y]);
    if (d == nullptr) return;
    const float scale_f = (float)scale;
    for (uint32_t j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float g = (float)(exp((double)ld(z[j]) - lse) * scale);
        d[j] = j == y ? fsub(g, scale_f) : g;
    }
}
extern "C" __global__ void __launch_bounds__(1024)
softmax_ce_f32(double *loss, float *dlogits, const float *logits, const uint32_t *targets, uint32_t vocab, double scale) {
    ce_row_impl(loss, dlogits, logits, targets, vocab, scale);
}
extern "C" __global__ void __launch_bounds__(1024)
softmax_ce_bf16(double *loss, float *dlogits, const bf16 *logits, const uint32_t *targets, uint32_t vocab, double scale) {
    ce_row_impl(loss, dlogits, logits, targets, vocab, scale);
}

// Total of the per-row losses divided by the normaliser, summed sequentially in row order
// (deterministic; the CPU's rayon sum may associate differently): out = (sum_r loss[r]) / norm.
// Layout: loss [n] f64; out: one f64. Launch: grid (1), block (1).
extern "C" __global__ void ce_loss_total(double *__restrict__ out, const double *__restrict__ loss, uint32_t n,
                                         double norm) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double s = 0.0;
    for (uint32_t r = 0; r < n; ++r) s += loss[r];
    *out = s / norm;
}

// =============================================================================================
// Log-softmax per row: out[r, j] = f32(z_j - lse_r) (lse in f64 as above).
// Layout: logits [n, vocab] (T); out [n, vocab] f32 (may not alias logits).
// Launch: grid (n), block 256 (multiple of 32, <= 1024).
template <typename T>
__device__ __forceinline__ void log_softmax_impl(float *out, const T *logits, uint32_t vocab) {
    __shared__ double sh[32];
    const uint64_t row = blockIdx.x;
    const T *z = logits + row * vocab;
    const double lse = row_lse(z, vocab, sh);
    for (uint32_t j = threadIdx.x; j < vocab; j += blockDim.x) out[row * vocab + j] = (float)((double)ld(z[j]) - lse);
}
extern "C" __global__ void __launch_bounds__(1024) log_softmax_f32(float *out, const float *logits, uint32_t vocab) {
    log_softmax_impl(out, logits, vocab);
}
extern "C" __global__ void __launch_bounds__(1024) log_softmax_bf16(float *out, const bf16 *logits, uint32_t vocab) {
    log_softmax_impl(out, logits, vocab);
}

// Log-softmax backward: dz[r, j] = dy[r, j] - exp(out[r, j]) * sum_k dy[r, k], from the forward's
// output `out` (PyTorch's _log_softmax_backward_data; the sum is f64, the result f32).
// Layout: dz, dy, out [n, vocab] f32 (dz may alias dy). Launch: grid (n), block 256 (multiple of
// 32, <= 1024).
extern "C" __global__ void __launch_bounds__(1024)
log_softmax_backward_f32(float *dz, const float *dy, const float *out, uint32_t vocab) {
    __shared__ double sh[32];
    const uint64_t base = (uint64_t)blockIdx.x * vocab;
    double s = 0.0;
    for (uint32_t j = threadIdx.x; j < vocab; j += blockDim.x) s += (double)dy[base + j];
    s = block_sum(s, sh);
    for (uint32_t j = threadIdx.x; j < vocab; j += blockDim.x)
        dz[base + j] = (float)((double)dy[base + j] - exp((double)out[base + j]) * s);
}
