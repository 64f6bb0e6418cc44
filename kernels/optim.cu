// Optimizer kernels: the fused AdamW step, the gradient 2-norm (two-pass, deterministic), the
// clip coefficient and the scale that applies it, and a non-finite check.
// CPU reference: engine/train/optim.rs (Optimizer::step, grad_norm, clip_grad_norm), which follows
// PyTorch's torch.optim.AdamW (single-tensor path) and clip_grad_norm_. Parameters, gradients and
// moments are f32, as there.
#include "common.cuh"

using namespace ilrec;

// Elements per partial sum of the gradient norm: optim.rs's CHUNK, so each partial covers the
// same elements as the CPU's.
#define GRAD_NORM_CHUNK 32768u

// =============================================================================================
// One AdamW update of one parameter tensor, in place (Optimizer::step, per element):
//   x = p; if apply_decay: x *= decay
//   m' = m + w1 * (g - m)
//   v' = v * b2 + w2 * g * g
//   denom = sqrt(v') / bc2_sqrt + eps
//   p' = x + neg_step * m' / denom
// The scalars are computed on the host exactly as optim.rs computes them (f64, rounded to f32):
//   decay = f32(1 - lr*wd) (apply_decay = 0 when the tensor is not decayed or wd == 0),
//   w1 = f32(1 - beta1), b2 = f32(beta2), w2 = f32(1 - beta2),
//   bc2_sqrt = f32(sqrt(1 - beta2^t)), eps = f32(eps), neg_step = f32(-(lr / (1 - beta1^t))),
// with t the tensor's step count after incrementing. Every operation is a correctly rounded f32
// operation in the CPU's order (no FMA contraction), so the update is bitwise the CPU's.
// The caller checks the gradient is finite first (count_nonfinite_f32), as Optimizer::step does.
// Layout: p, g, m, v [n] f32. Launch: element-wise over n (grid-stride; block 256).
extern "C" __global__ void adamw_step_f32(float *__restrict__ p, const float *__restrict__ g, float *__restrict__ m,
                                          float *__restrict__ v, uint64_t n, int apply_decay, float decay, float w1,
                                          float b2, float w2, float bc2_sqrt, float eps, float neg_step) {
    ILREC_GRID_STRIDE(i, n) {
        float x = p[i];
        if (apply_decay) x = fmul(x, decay);
        const float gi = g[i], mi = m[i], vi = v[i];
        const float mj = fadd(mi, fmul(w1, fsub(gi, mi)));
        const float vj = fadd(fmul(vi, b2), fmul(fmul(w2, gi), gi));
        const float denom = fadd(fdiv(fsqrt(vj), bc2_sqrt), eps);
        p[i] = fadd(x, fdiv(fmul(neg_step, mj), denom));
        m[i] = mj;
        v[i] = vj;
    }
}

// =============================================================================================
// Gradient 2-norm, computed like grad_norm in optim.rs: per tensor, partial sums of squares in f64
// over fixed chunks of GRAD_NORM_CHUNK elements, the partials added in order, sqrt, rounded to
// f32; then the total is the f64 sqrt of the sum of the squared per-tensor norms, in tensor order.
// Squares of f32 values are exact in f64; only the within-chunk summation order differs from the
// CPU's (a block tree instead of a sequential sum), an f64 rounding difference that essentially
// never survives the final rounding to f32. Every pass is deterministic (no atomics).

// Pass 1, per tensor: partial[c] = sum over chunk c of (f64)g^2.
// Layout: g [n] f32; partial [ceil(n / 32768)] f64.
// Launch: grid (ceil(n / 32768)) exactly, block 256 (multiple of 32, <= 1024).
extern "C" __global__ void __launch_bounds__(1024)
grad_sumsq_partial_f32(double *__restrict__ partial, const float *__restrict__ g, uint64_t n) {
    __shared__ double sh[32];
    const uint64_t begin = (uint64_t)blockIdx.x * GRAD_NORM_CHUNK;
    const uint64_t end = min(n, begin + GRAD_NORM_CHUNK);
    double s = 0.0;
    for (uint64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const double x = (double)g[i];
        s += x * x;
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// Pass 2, per tensor: norms[tensor] = f32(sqrt(sum of the partials, in order)).
// Layout: partial [chunks] f64; norms [n_tensors] f32. Launch: grid (1), block (1) (sequential).
extern "C" __global__ void grad_norm_finish(float *__restrict__ norms, uint32_t tensor, const double *__restrict__ partial,
                                            uint32_t chunks) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double s = 0.0;
    for (uint32_t c = 0; c < chunks; ++c) s += partial[c];
    norms[tensor] = (float)sqrt(s);
}

// Pass 3, once: total = f32(sqrt(sum over tensors of (f64)norm^2)) and the clip coefficient of
// clip_grad_norm: coef = (1 / (total + 1e-6)) * max_norm, stored as 1 (no clipping) when the total
// is not finite (the CPU then leaves the gradients alone) or when coef >= 1.
// Layout: norms [n_tensors] f32; total, coef: one f32 each. Launch: grid (1), block (1).
extern "C" __global__ void grad_norm_total_clip_coef(float *__restrict__ total, float *__restrict__ coef,
                                                     const float *__restrict__ norms, uint32_t n_tensors,
                                                     float max_norm) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double s = 0.0;
    for (uint32_t t = 0; t < n_tensors; ++t) s += (double)norms[t] * (double)norms[t];
    const float tot = (float)sqrt(s);
    *total = tot;
    const float c = fmul(fdiv(1.0f, fadd(tot, 1e-6f)), max_norm);
    *coef = (isfinite(tot) && c < 1.0f) ? c : 1.0f;
}

// Clipping: x *= *coef, skipped entirely when *coef >= 1 (clip_grad_norm scales only when the
// coefficient is below 1). The coefficient stays on the device: no host round trip.
// Layout: x [n] f32; coef: one f32. Launch: element-wise over n (grid-stride; block 256).
extern "C" __global__ void scale_by_coef_f32(float *__restrict__ x, uint64_t n, const float *__restrict__ coef) {
    const float c = *coef;
    if (!(c < 1.0f)) return;
    ILREC_GRID_STRIDE(i, n) x[i] = fmul(x[i], c);
}

// x *= s (gradient averaging over micro-batches, loss scaling).
// Layout: x [n] f32. Launch: element-wise over n (grid-stride; block 256).
extern "C" __global__ void scale_f32(float *__restrict__ x, uint64_t n, float s) {
    ILREC_GRID_STRIDE(i, n) x[i] = fmul(x[i], s);
}

// Number of non-finite values (NaN, +-inf), added into *count (zero it first). Integer atomics:
// the count is exact and deterministic. Optimizer::step refuses a non-finite gradient.
// Layout: x [n] f32; count: one u32. Launch: element-wise over n (grid-stride; block 256, a
// multiple of 32).
extern "C" __global__ void count_nonfinite_f32(uint32_t *__restrict__ count, const float *__restrict__ x, uint64_t n) {
    uint32_t bad = 0;
    ILREC_GRID_STRIDE(i, n) bad += isfinite(x[i]) ? 0u : 1u;
    bad = warp_sum(bad);
    if ((threadIdx.x & 31u) == 0 && bad != 0) atomicAdd(count, bad);
}
