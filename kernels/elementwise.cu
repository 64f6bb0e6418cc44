// Row-wise and element-wise ops of the decoder block: RMSNorm (plain and fused with the residual
// add) and its backward (dx, dw), RoPE and its backward, SwiGLU and its backward, bias and residual
// adds, f32 <-> bf16 casts. CPU reference: engine/backend/cpu/{elementwise.rs, backward.rs, vexp.rs}.
//
// All tensors are row-major and contiguous. `T` is the activation storage (`_f32` / `_bf16`
// entry points); statistics and arithmetic are f32; gradients are f32. See common.cuh for the
// launch and determinism conventions.
#include "common.cuh"

using namespace ilrec;

// =============================================================================================
// RMSNorm forward: y[r] = w * (x[r] * inv_r), inv_r = 1 / sqrt(mean(x[r]^2) + eps)
// (rms_norm in elementwise.rs; the sum of squares is a block tree instead of a sequential sum).

template <typename T>
__device__ __forceinline__ void rms_norm_row(T *y, const T *x, const T *w, float *rstd, uint32_t h, float eps) {
    __shared__ float sh[32];
    const uint64_t row = blockIdx.x;
    const T *xr = x + row * h;
    T *yr = y + row * h;
    float ss = 0.0f;
    for (uint32_t j = threadIdx.x; j < h; j += blockDim.x) {
        const float v = ld(xr[j]);
        ss += v * v;
    }
    ss = block_sum(ss, sh);
    const float inv = fdiv(1.0f, fsqrt(fadd(fdiv(ss, (float)h), eps)));
    if (rstd != nullptr && threadIdx.x == 0) rstd[row] = inv;
    for (uint32_t j = threadIdx.x; j < h; j += blockDim.x) yr[j] = st<T>(fmul(ld(w[j]), fmul(ld(xr[j]), inv)));
}

// Layout: x, y [rows, h] (T), w [h] (T), rstd [rows] f32 or null (saved for the dw backward).
// Launch: grid (rows), block 256 (any multiple of 32 up to 1024). y may alias x.
extern "C" __global__ void __launch_bounds__(1024)
rms_norm_f32(float *y, const float *x, const float *w, float *rstd, uint32_t h, float eps) {
    rms_norm_row(y, x, w, rstd, h, eps);
}
extern "C" __global__ void __launch_bounds__(1024)
rms_norm_bf16(bf16 *y, const bf16 *x, const bf16 *w, float *rstd, uint32_t h, float eps) {
    rms_norm_row(y, x, w, rstd, h, eps);
}

// Fused residual add + RMSNorm: resid[r] = T(resid[r] + x[r]) (rounded to the storage type, as
// add_inplace followed by a store would), then y[r] = rms_norm(resid[r]) computed from the rounded
// values, exactly like the unfused pair add_inplace + rms_norm.
template <typename T>
__device__ __forceinline__ void rms_norm_residual_row(T *y, T *resid, const T *x, const T *w, float *rstd, uint32_t h,
                                                      float eps) {
    __shared__ float sh[32];
    const uint64_t row = blockIdx.x;
    T *rr = resid + row * h;
    const T *xr = x + row * h;
    T *yr = y + row * h;
    float ss = 0.0f;
    for (uint32_t j = threadIdx.x; j < h; j += blockDim.x) {
        const T s = st<T>(fadd(ld(rr[j]), ld(xr[j])));
        rr[j] = s;
        const float v = ld(s);
        ss += v * v;
    }
    ss = block_sum(ss, sh);
    const float inv = fdiv(1.0f, fsqrt(fadd(fdiv(ss, (float)h), eps)));
    if (rstd != nullptr && threadIdx.x == 0) rstd[row] = inv;
    // Each thread reads back only the elements it wrote above (same j mapping).
    for (uint32_t j = threadIdx.x; j < h; j += blockDim.x) yr[j] = st<T>(fmul(ld(w[j]), fmul(ld(rr[j]), inv)));
}

// Layout: resid (in/out), x, y [rows, h] (T), w [h] (T), rstd [rows] f32 or null.
// Launch: grid (rows), block 256 (multiple of 32, <= 1024). y must not alias resid or x.
extern "C" __global__ void __launch_bounds__(1024)
rms_norm_residual_f32(float *y, float *resid, const float *x, const float *w, float *rstd, uint32_t h, float eps) {
    rms_norm_residual_row(y, resid, x, w, rstd, h, eps);
}
extern "C" __global__ void __launch_bounds__(1024)
rms_norm_residual_bf16(bf16 *y, bf16 *resid, const bf16 *x, const bf16 *w, float *rstd, uint32_t h, float eps) {
    rms_norm_residual_row(y, resid, x, w, rstd, h, eps);
}

// =============================================================================================
// RMSNorm backward w.r.t. x, ADDED into dx (rms_norm_backward in backward.rs):
// r = 1/sqrt(mean(x^2)+eps), c = r^3 / h * sum(dy * w * x), dx += r*dy*w - x*c.

template <typename T>
__device__ __forceinline__ void rms_norm_backward_dx_row(float *dx, const float *dy, const T *x, const T *w, float *rstd,
                                                         uint32_t h, float eps) {
    __shared__ float sh[32];
    const uint64_t row = blockIdx.x;
    const T *xr = x + row * h;
    const float *dyr = dy + row * h;
    float *dxr = dx + row * h;
    float ss = 0.0f, dot = 0.0f;
    for (uint32_t j = threadIdx.x; j < h; j += blockDim.x) {
        const float v = ld(xr[j]);
        ss += v * v;
        dot += fmul(fmul(dyr[j], ld(w[j])), v);
    }
    ss = block_sum(ss, sh);
    dot = block_sum(dot, sh);
    const float r = fdiv(1.0f, fsqrt(fadd(fdiv(ss, (float)h), eps)));
    if (rstd != nullptr && threadIdx.x == 0) rstd[row] = r;
    const float c = fmul(fdiv(fmul(fmul(r, r), r), (float)h), dot);
    for (uint32_t j = threadIdx.x; j < h; j += blockDim.x)
        dxr[j] = fadd(dxr[j], fsub(fmul(fmul(r, dyr[j]), ld(w[j])), fmul(ld(xr[j]), c)));
}

// Layout: dx (accumulated into), dy [rows, h] f32; x [rows, h] (T); w [h] (T); rstd [rows] f32 or
// null (written: the dw kernel needs it). Launch: grid (rows), block 256 (multiple of 32, <= 1024).
extern "C" __global__ void __launch_bounds__(1024)
rms_norm_backward_dx_f32(float *dx, const float *dy, const float *x, const float *w, float *rstd, uint32_t h, float eps) {
    rms_norm_backward_dx_row(dx, dy, x, w, rstd, h, eps);
}
extern "C" __global__ void __launch_bounds__(1024)
rms_norm_backward_dx_bf16(float *dx, const float *dy, const bf16 *x, const bf16 *w, float *rstd, uint32_t h, float eps) {
    rms_norm_backward_dx_row(dx, dy, x, w, rstd, h, eps);
}

// RMSNorm backward w.r.t. the weight, pass 1 of 2: dw[j] = sum_r dy[r,j] * (x[r,j] * rstd[r]).
// (The CPU trainer keeps norm weights frozen; this is HF's gradient, for trainable norms.)
// Block (32, 8) owns 32 columns of one chunk of `rows_per_chunk` rows; thread (tx, ty) sums rows
// ty, ty+8, ... of the chunk, then the 8 partial sums are added in ty order: fixed order, so
// deterministic. Writes partial[chunk, j]; pass 2 is column_sum_f32 over the chunks.
// Layout: partial [chunks, h] f32; dy [rows, h] f32; x [rows, h] (T); rstd [rows] f32.
// Launch: grid (ceil(h/32), chunks = ceil(rows/rows_per_chunk)), block (32, 8) exactly.
template <typename T>
__device__ __forceinline__ void rms_norm_backward_dw_partial_impl(float *partial, const float *dy, const T *x,
                                                                  const float *rstd, uint32_t rows, uint32_t h,
                                                                  uint32_t rows_per_chunk) {
    __shared__ float sh[8][33];
    const uint32_t col = blockIdx.x * 32 + threadIdx.x;
    const uint32_t r0 = blockIdx.y * rows_per_chunk;
    const uint32_t r1 = min(rows, r0 + rows_per_chunk);
    float acc = 0.0f;
    if (col < h)
        for (uint32_t r = r0 + threadIdx.y; r < r1; r += 8) {
            const uint64_t at = (uint64_t)r * h + col;
            acc = fadd(acc, fmul(dy[at], fmul(ld(x[at]), rstd[r])));
        }
    sh[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < h) {
        float s = sh[0][threadIdx.x];
#pragma unroll
        for (int k = 1; k < 8; ++k) s = fadd(s, sh[k][threadIdx.x]);
        partial[(uint64_t)blockIdx.y * h + col] = s;
    }
}
extern "C" __global__ void __launch_bounds__(256)
rms_norm_backward_dw_partial_f32(float *partial, const float *dy, const float *x, const float *rstd, uint32_t rows,
                                 uint32_t h, uint32_t rows_per_chunk) {
    rms_norm_backward_dw_partial_impl(partial, dy, x, rstd, rows, h, rows_per_chunk);
}
extern "C" __global__ void __launch_bounds__(256)
rms_norm_backward_dw_partial_bf16(float *partial, const float *dy, const bf16 *x, const float *rstd, uint32_t rows,
                                  uint32_t h, uint32_t rows_per_chunk) {
    rms_norm_backward_dw_partial_impl(partial, dy, x, rstd, rows, h, rows_per_chunk);
}

// Column sums in row order: out[j] = (accumulate ? out[j] : 0) + sum_r in[r, j], sequential over
// r (deterministic). Pass 2 of the dw reduction above; also a bias gradient (sum of dy over rows).
// Layout: in [rows, cols] f32, out [cols] f32. Launch: grid (ceil(cols/256)), block 256 (any).
extern "C" __global__ void __launch_bounds__(1024)
column_sum_f32(float *__restrict__ out, const float *__restrict__ in, uint32_t rows, uint32_t cols, int accumulate) {
    const uint32_t col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    float s = accumulate ? out[col] : 0.0f;
    for (uint32_t r = 0; r < rows; ++r) s = fadd(s, in[(uint64_t)r * cols + col]);
    out[col] = s;
}

// =============================================================================================
// RoPE, HF rotate_half layout (rope_inplace in elementwise.rs): within each head the pairs are
// (i, i + head_dim/2); row r of x uses row pos[r] of the cos/sin tables (rope_tables), or row r
// when pos is null.
//   forward:  a' = a*cos - b*sin, b' = b*cos + a*sin
//   backward: the rotation by the opposite angle (the CPU passes -sin; negation is exact, so this
//             is bitwise the same): a' = a*cos + b*sin, b' = b*cos - a*sin
// The position indirection lets the decode loop keep one table per KV cache (positions 0..cap)
// and compute positions on the device (kv_advance), so a step uploads nothing. A position past
// the table cannot be checked on the host (it lives on the device): the row becomes NaN, which
// the beam search reports, instead of reading outside the table.
// Layout: x [rows, n_heads * head_dim] (T, in place); cos, sin [table_rows, head_dim/2] f32;
// pos null or [rows] u32.
// Launch: element-wise over rows * n_heads * head_dim/2 pairs (grid-stride; block 256).

template <typename T, bool BACKWARD>
__device__ __forceinline__ void rope_impl(T *x, const float *cos, const float *sin, const uint32_t *pos, uint32_t rows,
                                          uint32_t table_rows, uint32_t n_heads, uint32_t head_dim) {
    const uint32_t half = head_dim / 2;
    const uint64_t pairs = (uint64_t)rows * n_heads * half;
    ILREC_GRID_STRIDE(p, pairs) {
        const uint32_t i = (uint32_t)(p % half);
        const uint64_t rh = p / half;  // row * n_heads + head
        const uint64_t r = rh / n_heads;
        T *head = x + rh * head_dim;
        const uint64_t tr = pos ? (uint64_t)pos[r] : r;
        if (tr >= table_rows) {
            head[i] = st<T>(__int_as_float(0x7fc00000));
            head[i + half] = st<T>(__int_as_float(0x7fc00000));
            continue;
        }
        const float c = cos[tr * half + i], s = sin[tr * half + i];
        const float a = ld(head[i]), b = ld(head[i + half]);
        if (BACKWARD) {
            head[i] = st<T>(fadd(fmul(a, c), fmul(b, s)));
            head[i + half] = st<T>(fsub(fmul(b, c), fmul(a, s)));
        } else {
            head[i] = st<T>(fsub(fmul(a, c), fmul(b, s)));
            head[i + half] = st<T>(fadd(fmul(b, c), fmul(a, s)));
        }
    }
}
extern "C" __global__ void rope_f32(float *x, const float *cos, const float *sin, const uint32_t *pos, uint32_t rows,
                                    uint32_t table_rows, uint32_t n_heads, uint32_t head_dim) {
    rope_impl<float, false>(x, cos, sin, pos, rows, table_rows, n_heads, head_dim);
}
extern "C" __global__ void rope_bf16(bf16 *x, const float *cos, const float *sin, const uint32_t *pos, uint32_t rows,
                                     uint32_t table_rows, uint32_t n_heads, uint32_t head_dim) {
    rope_impl<bf16, false>(x, cos, sin, pos, rows, table_rows, n_heads, head_dim);
}
// Backward operates on the f32 gradient of the rotated tensor, in place.
extern "C" __global__ void rope_backward_f32(float *dx, const float *cos, const float *sin, const uint32_t *pos,
                                             uint32_t rows, uint32_t table_rows, uint32_t n_heads, uint32_t head_dim) {
    rope_impl<float, true>(dx, cos, sin, pos, rows, table_rows, n_heads, head_dim);
}

// =============================================================================================
// SwiGLU (silu_mul in elementwise.rs / vexp.rs): out = gate / (1 + exp(-gate)) * up, with the CPU's
// Cephes exp, so the result is bitwise the CPU's. Layout: out, gate, up [n] (T); out may alias gate
// (the CPU op is in place on gate). Launch: element-wise over n (grid-stride; block 256).

template <typename T>
__device__ __forceinline__ void swiglu_impl(T *out, const T *gate, const T *up, uint64_t n) {
    ILREC_GRID_STRIDE(i, n) {
        const float g = ld(gate[i]);
        out[i] = st<T>(fmul(fdiv(g, fadd(1.0f, exp_cephes(-g))), ld(up[i])));
    }
}
extern "C" __global__ void swiglu_f32(float *out, const float *gate, const float *up, uint64_t n) {
    swiglu_impl(out, gate, up, n);
}
extern "C" __global__ void swiglu_bf16(bf16 *out, const bf16 *gate, const bf16 *up, uint64_t n) {
    swiglu_impl(out, gate, up, n);
}

// SwiGLU backward (silu_mul_backward in backward.rs), overwriting dg and du:
// sig = 1/(1+exp(-g)); du = da*g*sig; dg = da*u*sig*(1 + g*(1-sig)). The CPU uses libm's expf here
// and CUDA's expf is within 2 ulp of it: agreement to a few ulp, not bitwise.
// Layout: dg, du, da [n] f32; gate, up [n] (T). Launch: element-wise over n (grid-stride; block 256).
template <typename T>
__device__ __forceinline__ void swiglu_backward_impl(float *dg, float *du, const float *da, const T *gate, const T *up,
                                                     uint64_t n) {
    ILREC_GRID_STRIDE(i, n) {
        const float d = da[i], g = ld(gate[i]), u = ld(up[i]);
        const float sig = fdiv(1.0f, fadd(1.0f, expf(-g)));
        du[i] = fmul(fmul(d, g), sig);
        dg[i] = fmul(fmul(fmul(d, u), sig), fadd(1.0f, fmul(g, fsub(1.0f, sig))));
    }
}
extern "C" __global__ void swiglu_backward_f32(float *dg, float *du, const float *da, const float *gate,
                                               const float *up, uint64_t n) {
    swiglu_backward_impl(dg, du, da, gate, up, n);
}
extern "C" __global__ void swiglu_backward_bf16(float *dg, float *du, const float *da, const bf16 *gate,
                                                const bf16 *up, uint64_t n) {
    swiglu_backward_impl(dg, du, da, gate, up, n);
}

// =============================================================================================
// Bias add (add_bias in elementwise.rs): x[r, c] += bias[c]. Layout: x [rows, cols] (T, in place),
// bias [cols] (T). Launch: element-wise over rows * cols (grid-stride; block 256).
template <typename T>
__device__ __forceinline__ void add_bias_impl(T *x, const T *bias, uint32_t rows, uint32_t cols) {
    ILREC_GRID_STRIDE(i, (uint64_t)rows * cols) x[i] = st<T>(fadd(ld(x[i]), ld(bias[i % cols])));
}
extern "C" __global__ void add_bias_f32(float *x, const float *bias, uint32_t rows, uint32_t cols) {
    add_bias_impl(x, bias, rows, cols);
}
extern "C" __global__ void add_bias_bf16(bf16 *x, const bf16 *bias, uint32_t rows, uint32_t cols) {
    add_bias_impl(x, bias, rows, cols);
}

// Residual add (add_inplace in elementwise.rs): acc[i] += x[i]. Layout: acc, x [n] (T).
// Launch: element-wise over n (grid-stride; block 256).
template <typename T>
__device__ __forceinline__ void add_inplace_impl(T *acc, const T *x, uint64_t n) {
    ILREC_GRID_STRIDE(i, n) acc[i] = st<T>(fadd(ld(acc[i]), ld(x[i])));
}
extern "C" __global__ void add_inplace_f32(float *acc, const float *x, uint64_t n) { add_inplace_impl(acc, x, n); }
extern "C" __global__ void add_inplace_bf16(bf16 *acc, const bf16 *x, uint64_t n) { add_inplace_impl(acc, x, n); }

// =============================================================================================
// Casts. f32 -> bf16 rounds to nearest even (NaN stays NaN); bf16 -> f32 is exact.
// Layout: out, in [n]. Launch: element-wise over n (grid-stride; block 256).
extern "C" __global__ void cast_f32_to_bf16(bf16 *__restrict__ out, const float *__restrict__ in, uint64_t n) {
    ILREC_GRID_STRIDE(i, n) out[i] = __float2bfloat16_rn(in[i]);
}
extern "C" __global__ void cast_bf16_to_f32(float *__restrict__ out, const bf16 *__restrict__ in, uint64_t n) {
    ILREC_GRID_STRIDE(i, n) out[i] = __bfloat162float(in[i]);
}
