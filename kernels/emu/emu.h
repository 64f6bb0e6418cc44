// Host emulator prelude: lets g++ compile a kernels/*.cu file as C++ and run its kernels on the
// CPU, so that kernel logic (indexing, barriers, masking, warp collectives, mma fragment layouts)
// is checked without a GPU. Force-included by the compile line (see kernels/emu/README.md):
//
//   g++ -std=c++20 -O1 -g -shared -fPIC -fvisibility=hidden -pthread -ffp-contract=off -DILREC_EMU \
//       -include kernels/emu/emu.h -x c++ kernels/X.cu -I kernels -o libX.so
//
// Execution model. One block runs at a time; its threads are fibers (user-mode contexts) on the
// launching OS thread, switched only at barriers and warp collectives, in a fixed (or chosen)
// order, so a run is deterministic and a deadlock is detected exactly (no runnable thread left).
// `__shared__` variables are function-local statics placed in one linker section that is
// poisoned with 0xFF bytes (NaN for f32/bf16/f64) before every block, like the dynamic shared
// buffer; a read of shared memory nobody wrote in this block shows up as NaN.
//
// The .so is one translation unit: this header defines the runtime (non-inline), so it must be
// included exactly once per .so, which `-include` does.
#pragma once
#ifndef ILREC_EMU
#error "kernels/emu/emu.h is the host emulator's prelude: compile with -DILREC_EMU"
#endif

#include <dlfcn.h>
#include <elf.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------------------------------------
// CUDA keywords

#ifdef ILREC_EMU_SCAN
// The builder's preprocessing pass (engine/backend/cuda/emu.rs) finds every kernel, macro-made
// ones included, by these markers in `g++ -E` output; nothing is compiled in this mode.
#define __global__ ILREC_EMU_KERNEL
#define __launch_bounds__(...) ILREC_EMU_BOUNDS(__VA_ARGS__)
#else
#define __global__ __attribute__((visibility("default")))  // the build hides everything else
#define __launch_bounds__(...)
#endif
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
#define __managed__
// Every `__shared__` variable lands in one section so the runtime can poison all of them.
#define __shared__ static __attribute__((section("ilrec_emu_shared"), aligned(16)))
// Dynamic shared memory: the buffer the launch sized (common.cuh defines the nvcc version).
#define ILREC_DYN_SMEM(T, name) T *name = reinterpret_cast<T *>(::ilrec_emu::dyn_smem())

// ---------------------------------------------------------------------------------------------
// Vector types

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(8) float2 { float x, y; };
struct float3 { float x, y, z; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct int3 { int x, y, z; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(4) ushort2 { unsigned short x, y; };
struct alignas(4) char4 { signed char x, y, z, w; };
struct alignas(4) uchar4 { unsigned char x, y, z, w; };
struct alignas(16) longlong2 { long long x, y; };
struct alignas(16) ulonglong2 { unsigned long long x, y; };

inline float2 make_float2(float x, float y) { return {x, y}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int3 make_int3(int x, int y, int z) { return {x, y, z}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

constexpr int warpSize = 32;

namespace ilrec_emu {
struct Fiber;
extern Fiber *cur;  // the running emulated thread
const uint3 &thread_idx();
unsigned char *dyn_smem();
[[noreturn]] void fail(const std::string &msg);
void syncthreads(const char *file, int line);
int syncthreads_reduce(int pred, int kind, const char *file, int line);
void yield_point();
}  // namespace ilrec_emu

// threadIdx is the running fiber's; the others are the launch's (one block at a time).
#define threadIdx (::ilrec_emu::thread_idx())
extern uint3 blockIdx;
extern dim3 blockDim, gridDim;

// ---------------------------------------------------------------------------------------------
// bf16 (storage type; arithmetic goes through float, as the kernels here do)

namespace ilrec_emu {
inline uint16_t f32_to_bf16_rn(float f) {
    uint32_t u = std::bit_cast<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN -> canonical NaN, as cvt.rn.bf16.f32
    u += 0x7fffu + ((u >> 16) & 1u);                      // round to nearest, ties to even
    return (uint16_t)(u >> 16);
}
inline float bf16_to_f32(uint16_t b) { return std::bit_cast<float>((uint32_t)b << 16); }
}  // namespace ilrec_emu

struct __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(ilrec_emu::f32_to_bf16_rn(f)) {}
    __nv_bfloat16(double f) : __x(ilrec_emu::f32_to_bf16_rn((float)f)) {}
    __nv_bfloat16(int f) : __x(ilrec_emu::f32_to_bf16_rn((float)f)) {}
    __nv_bfloat16(unsigned f) : __x(ilrec_emu::f32_to_bf16_rn((float)f)) {}
    operator float() const { return ilrec_emu::bf16_to_f32(__x); }
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return ilrec_emu::bf16_to_f32(b.__x); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
    __nv_bfloat16 b;
    b.__x = u;
    return b;
}
inline short __bfloat16_as_short(__nv_bfloat16 b) { return (short)b.__x; }
inline __nv_bfloat16 __short_as_bfloat16(short s) { return __ushort_as_bfloat16((unsigned short)s); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return {__nv_bfloat16(v.x), __nv_bfloat16(v.y)}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return {a, a}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {__bfloat162float(v.x), __bfloat162float(v.y)}; }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 v) { return v.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 v) { return v.y; }
// bf16 arithmetic as sm_80 does it: exact operation, one rounding to bf16.
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16((float)a + (float)b); }
inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16((float)a - (float)b); }
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16((float)a * (float)b); }
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
    return __nv_bfloat16(fmaf((float)a, (float)b, (float)c));
}
inline __nv_bfloat16 __hmax(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(fmaxf(a, b)); }
inline __nv_bfloat16 __hmin(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(fminf(a, b)); }
inline bool __hisnan(__nv_bfloat16 a) { return (a.__x & 0x7fff) > 0x7f80; }

// ---------------------------------------------------------------------------------------------
// Arithmetic intrinsics. The `_rn` ops are the correctly rounded IEEE operations; the build uses
// -ffp-contract=off, so g++ never fuses a multiply and an add behind the kernel's back.

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fmaf_rz(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline double __dsqrt_rn(double a) { return sqrt(a); }
// Fast-math intrinsics are emulated by the precise functions (the hardware's are approximations).
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x != x ? 0.0f : fminf(fmaxf(x, 0.0f), 1.0f); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float exp10f(float x) { return powf(10.0f, x); }

inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)truncf(x); }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
inline unsigned __float2uint_rz(float x) { return (unsigned)truncf(x); }
inline long long __float2ll_rn(float x) { return (long long)nearbyintf(x); }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline float __ll2float_rn(long long x) { return (float)x; }
inline float __double2float_rn(double x) { return (float)x; }

inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero((unsigned)x); }
inline int __clzll(long long x) { return std::countl_zero((unsigned long long)x); }
inline int __ffs(int x) { return x == 0 ? 0 : std::countr_zero((unsigned)x) + 1; }
inline int __ffsll(long long x) { return x == 0 ? 0 : std::countr_zero((unsigned long long)x) + 1; }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
    const unsigned long long v = ((unsigned long long)hi << 32) | lo;
    return (unsigned)((v << (s & 31)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
    const unsigned long long v = ((unsigned long long)hi << 32) | lo;
    return (unsigned)(v >> (s & 31));
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const unsigned long long v = ((unsigned long long)y << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}

// CUDA's global min/max overloads (integer and float), with the usual arithmetic conversions.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
    using C = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point_v<C>) return fmin((C)a, (C)b);
    else return (C)a < (C)b ? (C)a : (C)b;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
    using C = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point_v<C>) return fmax((C)a, (C)b);
    else return (C)a < (C)b ? (C)b : (C)a;
}

template <typename T>
inline T __ldg(const T *p) { return *p; }
template <typename T>
inline T __ldcg(const T *p) { return *p; }
template <typename T>
inline T __ldcs(const T *p) { return *p; }
template <typename T>
inline T __ldlu(const T *p) { return *p; }
template <typename T>
inline void __stcg(T *p, T v) { *p = v; }
template <typename T>
inline void __stcs(T *p, T v) { *p = v; }
template <typename T>
inline void __stwt(T *p, T v) { *p = v; }

// Fences and sleeps order nothing here (one thread runs at a time) but let the others run, so a
// thread polling a flag another thread sets makes progress.
inline void __threadfence() { ::ilrec_emu::yield_point(); }
inline void __threadfence_block() { ::ilrec_emu::yield_point(); }
inline void __nanosleep(unsigned) { ::ilrec_emu::yield_point(); }
[[noreturn]] inline void __trap() { ::ilrec_emu::fail("__trap() called"); }

// ---------------------------------------------------------------------------------------------
// Atomics (one OS thread runs a block, but blocks of other .so launches may run concurrently on
// other host threads and the values can be host-visible: std::atomic_ref, relaxed like CUDA's).

namespace ilrec_emu {
template <typename T, typename F>
inline T atomic_rmw(T *p, F f) {
    std::atomic_ref<T> a(*p);
    T old = a.load(std::memory_order_relaxed);
    while (!a.compare_exchange_weak(old, f(old), std::memory_order_relaxed)) {
    }
    ::ilrec_emu::yield_point();
    return old;
}
}  // namespace ilrec_emu

template <typename T>
inline T atomicAdd(T *p, T v) { return ilrec_emu::atomic_rmw(p, [v](T o) { return (T)(o + v); }); }
template <typename T>
inline T atomicSub(T *p, T v) { return ilrec_emu::atomic_rmw(p, [v](T o) { return (T)(o - v); }); }
template <typename T>
inline T atomicMax(T *p, T v) { return ilrec_emu::atomic_rmw(p, [v](T o) { return o < v ? v : o; }); }
template <typename T>
inline T atomicMin(T *p, T v) { return ilrec_emu::atomic_rmw(p, [v](T o) { return v < o ? v : o; }); }
template <typename T>
inline T atomicExch(T *p, T v) { return ilrec_emu::atomic_rmw(p, [v](T) { return v; }); }
template <typename T>
inline T atomicOr(T *p, T v) { return ilrec_emu::atomic_rmw(p, [v](T o) { return (T)(o | v); }); }
template <typename T>
inline T atomicAnd(T *p, T v) { return ilrec_emu::atomic_rmw(p, [v](T o) { return (T)(o & v); }); }
template <typename T>
inline T atomicXor(T *p, T v) { return ilrec_emu::atomic_rmw(p, [v](T o) { return (T)(o ^ v); }); }
template <typename T>
inline T atomicCAS(T *p, T cmp, T v) {
    std::atomic_ref<T> a(*p);
    a.compare_exchange_strong(cmp, v, std::memory_order_relaxed);
    ::ilrec_emu::yield_point();
    return cmp;
}
inline unsigned atomicInc(unsigned *p, unsigned lim) {
    return ilrec_emu::atomic_rmw(p, [lim](unsigned o) { return o >= lim ? 0u : o + 1; });
}

// ---------------------------------------------------------------------------------------------
// Barriers and warp collectives. __FILE__/__LINE__ go into the diagnostics.

#define __syncthreads() ::ilrec_emu::syncthreads(__FILE__, __LINE__)
#define __syncthreads_count(p) ::ilrec_emu::syncthreads_reduce((p), 0, __FILE__, __LINE__)
#define __syncthreads_and(p) ::ilrec_emu::syncthreads_reduce((p), 1, __FILE__, __LINE__)
#define __syncthreads_or(p) ::ilrec_emu::syncthreads_reduce((p), 2, __FILE__, __LINE__)

namespace ilrec_emu {

// One lane's contribution to / result of a warp collective.
struct Slot {
    alignas(16) unsigned char data[48];
    long long p0, p1;
};
struct Warp;
// A warp collective's semantics: computes every participating lane's `out` from all `in`s.
// Returns an empty string or what was wrong (the launch then fails with it).
typedef std::string (*WarpFn)(Warp &w, unsigned members);
struct WarpOp {
    const char *name;
    WarpFn fn;
};
struct Warp {
    unsigned present = 0;  // lanes that exist (the last warp of a block may be partial)
    unsigned arrived = 0;  // lanes waiting at the current collective
    unsigned mask = 0;     // its member mask
    const WarpOp *op = nullptr;
    Slot in[32], out[32];
};

// Joins the calling lane to `op` over `mask` with input `in`; returns its result slot.
const Slot &warp_collective(const WarpOp *op, unsigned mask, const Slot &in, const char *file, int line);
unsigned lane_id();
bool in_shared(const void *p, size_t bytes);

inline std::string shfl_fn(Warp &w, unsigned members, int kind) {
    for (unsigned lane = 0; lane < 32; ++lane) {
        if (!(members >> lane & 1u)) continue;
        const long long width = w.in[lane].p1;
        if (width < 1 || width > 32 || (width & (width - 1)) != 0)
            return "shuffle width " + std::to_string(width) + " is not a power of two in 1..32";
        const unsigned base = lane & ~(unsigned)(width - 1);
        const long long v = w.in[lane].p0;
        long long src;
        switch (kind) {
            case 0: src = base + (v & (width - 1)); break;                            // idx
            case 1: src = (long long)(lane - base) >= v ? lane - v : lane; break;     // up
            case 2: src = (long long)(lane - base) + v < width ? lane + v : lane; break;  // down
            default: src = lane ^ (unsigned)v; if (src < base || src >= base + width) src = lane; break;
        }
        if (src < 0 || src > 31 || !(members >> src & 1u))
            return "lane " + std::to_string(lane) + " reads lane " + std::to_string(src) +
                   ", which is not a member of this shuffle (mask & present lanes = " + std::to_string(members) + ")";
        memcpy(w.out[lane].data, w.in[src].data, 16);
    }
    return {};
}
inline std::string shfl_idx_fn(Warp &w, unsigned m) { return shfl_fn(w, m, 0); }
inline std::string shfl_up_fn(Warp &w, unsigned m) { return shfl_fn(w, m, 1); }
inline std::string shfl_down_fn(Warp &w, unsigned m) { return shfl_fn(w, m, 2); }
inline std::string shfl_xor_fn(Warp &w, unsigned m) { return shfl_fn(w, m, 3); }
inline std::string vote_fn(Warp &w, unsigned members) {
    unsigned ballot = 0;
    for (unsigned lane = 0; lane < 32; ++lane)
        if ((members >> lane & 1u) && w.in[lane].p0) ballot |= 1u << lane;
    for (unsigned lane = 0; lane < 32; ++lane)
        if (members >> lane & 1u) w.out[lane].p0 = ballot;
    return {};
}
inline std::string syncwarp_fn(Warp &, unsigned) { return {}; }
inline std::string match_any_fn(Warp &w, unsigned members) {
    for (unsigned lane = 0; lane < 32; ++lane) {
        if (!(members >> lane & 1u)) continue;
        unsigned m = 0;
        for (unsigned o = 0; o < 32; ++o)
            if ((members >> o & 1u) && memcmp(w.in[o].data, w.in[lane].data, 8) == 0) m |= 1u << o;
        w.out[lane].p0 = m;
    }
    return {};
}
inline const WarpOp OP_SHFL_IDX{"__shfl_sync", shfl_idx_fn};
inline const WarpOp OP_SHFL_UP{"__shfl_up_sync", shfl_up_fn};
inline const WarpOp OP_SHFL_DOWN{"__shfl_down_sync", shfl_down_fn};
inline const WarpOp OP_SHFL_XOR{"__shfl_xor_sync", shfl_xor_fn};
inline const WarpOp OP_VOTE{"__ballot_sync/__any_sync/__all_sync", vote_fn};
inline const WarpOp OP_SYNCWARP{"__syncwarp", syncwarp_fn};
inline const WarpOp OP_MATCH_ANY{"__match_any_sync", match_any_fn};

template <typename T>
inline T shfl(const WarpOp *op, unsigned mask, T v, long long param, int width, const char *file, int line) {
    static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "shuffled type must be trivially copyable, <= 16 bytes");
    Slot in{};
    memcpy(in.data, &v, sizeof(T));
    in.p0 = param;
    in.p1 = width;
    const Slot &out = warp_collective(op, mask, in, file, line);
    T r;
    memcpy(&r, out.data, sizeof(T));
    return r;
}
inline unsigned vote(unsigned mask, int pred, const char *file, int line) {
    Slot in{};
    in.p0 = pred != 0;
    return (unsigned)warp_collective(&OP_VOTE, mask, in, file, line).p0;
}
template <typename T>
inline unsigned match_any(unsigned mask, T v, const char *file, int line) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_any_sync takes a 4- or 8-byte value");
    Slot in{};
    memcpy(in.data, &v, sizeof(T));
    return (unsigned)warp_collective(&OP_MATCH_ANY, mask, in, file, line).p0;
}
}  // namespace ilrec_emu

#define __shfl_sync(mask, v, src, ...) \
    ::ilrec_emu::shfl(&::ilrec_emu::OP_SHFL_IDX, (mask), (v), (src), ILREC_EMU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) \
    ::ilrec_emu::shfl(&::ilrec_emu::OP_SHFL_UP, (mask), (v), (d), ILREC_EMU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) \
    ::ilrec_emu::shfl(&::ilrec_emu::OP_SHFL_DOWN, (mask), (v), (d), ILREC_EMU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, m, ...) \
    ::ilrec_emu::shfl(&::ilrec_emu::OP_SHFL_XOR, (mask), (v), (m), ILREC_EMU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define ILREC_EMU_WIDTH(...) (32 __VA_OPT__(*0 + (__VA_ARGS__)))
#define __ballot_sync(mask, p) ::ilrec_emu::vote((mask), (p), __FILE__, __LINE__)
#define __any_sync(mask, p) (::ilrec_emu::vote((mask), (p), __FILE__, __LINE__) != 0u)
#define __all_sync(mask, p) (::ilrec_emu::vote((mask), (p), __FILE__, __LINE__) == ((mask) & ::ilrec_emu::present_lanes()))
#define __match_any_sync(mask, v) ::ilrec_emu::match_any((mask), (v), __FILE__, __LINE__)
#define __syncwarp(...) ::ilrec_emu::syncwarp_at(ILREC_EMU_MASK(__VA_ARGS__), __FILE__, __LINE__)
#define ILREC_EMU_MASK(...) (0xffffffffu __VA_OPT__(*0u + (__VA_ARGS__)))
#define __activemask() (::ilrec_emu::present_lanes())

namespace ilrec_emu {
inline void syncwarp_at(unsigned mask, const char *file, int line) {
    Slot in{};
    warp_collective(&OP_SYNCWARP, mask, in, file, line);
}
unsigned present_lanes();
}  // namespace ilrec_emu

#include "runtime.h"

// ---------------------------------------------------------------------------------------------
// Launch by name with an argument array (the driver's `kernelParams` convention), for the
// emulated CUDA runtime. The builder appends `ILREC_EMU_ENTRY(kernel, max_threads)` for every
// kernel it found; the entry points export the kernel's parameter kinds (so a launcher passing
// a 64-bit value for a 32-bit parameter, or too few arguments, is an error, as it would be
// garbage on a GPU) and its `__launch_bounds__` (0: none).
namespace ilrec_emu {
template <class... A, size_t... I>
void invoke_impl(void (*f)(A...), void *const *args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<A> *>(args[I])...);
}
template <class... A>
void invoke(void (*f)(A...), void *const *args) {
    invoke_impl(f, args, std::index_sequence_for<A...>{});
}
// p: pointer, f: float, d: double, i: 4-byte integer, l: 8-byte integer, ?: anything else.
template <class T>
constexpr char param_kind() {
    if constexpr (std::is_pointer_v<T>) return 'p';
    else if constexpr (std::is_same_v<T, float>) return 'f';
    else if constexpr (std::is_same_v<T, double>) return 'd';
    else if constexpr (std::is_integral_v<T> && sizeof(T) == 4) return 'i';
    else if constexpr (std::is_integral_v<T> && sizeof(T) == 8) return 'l';
    else return '?';
}
template <class... A>
const char *signature(void (*)(A...)) {
    static const char s[] = {param_kind<A>()..., 0};
    return s;
}
}  // namespace ilrec_emu

#define ILREC_EMU_ENTRY(k, bound)                                                                   \
    extern "C" __attribute__((visibility("default"))) void emu_call__##k(void *const *args) {    \
        ::ilrec_emu::invoke(k, args);                                                            \
    }                                                                                            \
    extern "C" __attribute__((visibility("default"))) const char *emu_sig__##k() {              \
        return ::ilrec_emu::signature(k);                                                        \
    }                                                                                            \
    extern "C" __attribute__((visibility("default"))) unsigned emu_bound__##k() { return (bound); }
