// Host versions of the mma.cuh wrappers (included from kernels/mma.cuh inside namespace ilrec when
// ILREC_EMU is defined; no includes here). Each is a warp collective that follows the fragment
// layouts written at the top of mma.cuh: every lane publishes its registers (or, for ldmatrix, the
// 16-byte row its address names), the warp meets, and each lane's outputs are computed from all
// lanes' inputs. All wrappers need the full warp (mask 0xffffffff), as .sync.aligned PTX does.

// Products of two bf16 values are exact in f32 (8 + 8 significant bits); the sum of the 16
// products and C is accumulated in f32 in k order. The tensor cores' internal order and precision
// differ (they are not specified), so compare mma results with a tolerance, not bitwise.
inline std::string emu_mma_fn(::ilrec_emu::Warp &w, unsigned) {
    auto half = [](uint32_t v, int hi) { return ::ilrec_emu::bf16_to_f32((uint16_t)(hi ? v >> 16 : v & 0xffffu)); };
    float A[16][16], B[16][8];
    for (unsigned lane = 0; lane < 32; ++lane) {
        uint32_t r[6];
        memcpy(r, w.in[lane].data, sizeof r);
        const unsigned g = lane / 4, t = lane % 4;
        for (int e = 0; e < 2; ++e) {
            A[g][2 * t + e] = half(r[0], e);
            A[g + 8][2 * t + e] = half(r[1], e);
            A[g][2 * t + 8 + e] = half(r[2], e);
            A[g + 8][2 * t + 8 + e] = half(r[3], e);
            B[2 * t + e][g] = half(r[4], e);
            B[2 * t + 8 + e][g] = half(r[5], e);
        }
    }
    for (unsigned lane = 0; lane < 32; ++lane) {
        float c[4], d[4];
        memcpy(c, w.in[lane].data + 24, sizeof c);
        const unsigned g = lane / 4, t = lane % 4;
        for (int i = 0; i < 4; ++i) {
            const unsigned row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
            float acc = c[i];
            for (int k = 0; k < 16; ++k) acc = acc + A[row][k] * B[k][col];
            d[i] = acc;
        }
        memcpy(w.out[lane].data, d, sizeof d);
    }
    return {};
}
inline const ::ilrec_emu::WarpOp EMU_OP_MMA{"mma_bf16_16816", emu_mma_fn};

__device__ __forceinline__ void mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    ::ilrec_emu::Slot in{};
    memcpy(in.data, a, 16);
    memcpy(in.data + 16, b, 8);
    memcpy(in.data + 24, c, 16);
    const ::ilrec_emu::Slot &out = ::ilrec_emu::warp_collective(&EMU_OP_MMA, 0xffffffffu, in, __FILE__, __LINE__);
    memcpy(d, out.data, 16);
}

// ldmatrix: lane l's input is the 16-byte row at its address (lanes 0..8*count-1). Register i of
// lane (g, t) is matrix i's row g, elements 2t, 2t+1 (trans: column g, rows 2t, 2t+1).
template <int COUNT, bool TRANS>
inline std::string emu_ldmatrix_fn(::ilrec_emu::Warp &w, unsigned) {
    auto elem = [&](unsigned row_lane, unsigned e) {
        uint16_t v;
        memcpy(&v, w.in[row_lane].data + 2 * e, 2);
        return (uint32_t)v;
    };
    for (unsigned lane = 0; lane < 32; ++lane) {
        const unsigned g = lane / 4, t = lane % 4;
        uint32_t r[4] = {0, 0, 0, 0};
        for (int i = 0; i < COUNT; ++i) {
            if (!TRANS) r[i] = elem(8 * i + g, 2 * t) | elem(8 * i + g, 2 * t + 1) << 16;
            else r[i] = elem(8 * i + 2 * t, g) | elem(8 * i + 2 * t + 1, g) << 16;
        }
        memcpy(w.out[lane].data, r, sizeof r);
    }
    return {};
}
template <int COUNT, bool TRANS>
inline const ::ilrec_emu::WarpOp EMU_OP_LDMATRIX{
    TRANS ? (COUNT == 1 ? "ldmatrix_x1_trans" : COUNT == 2 ? "ldmatrix_x2_trans" : "ldmatrix_x4_trans")
          : (COUNT == 1 ? "ldmatrix_x1" : COUNT == 2 ? "ldmatrix_x2" : "ldmatrix_x4"),
    emu_ldmatrix_fn<COUNT, TRANS>};

template <int COUNT, bool TRANS>
inline void emu_ldmatrix(uint32_t *r, const void *row) {
    ::ilrec_emu::Slot in{};
    const unsigned lane = ::ilrec_emu::lane_id();
    if (lane < 8u * COUNT) {
        if (((uintptr_t)row & 15u) != 0 || !::ilrec_emu::in_shared(row, 16))
            ::ilrec_emu::fail(std::string(EMU_OP_LDMATRIX<COUNT, TRANS>.name) + ": lane " + std::to_string(lane) +
                              "'s row address is not a 16-byte aligned shared-memory address");
        memcpy(in.data, row, 16);
    }
    const ::ilrec_emu::Slot &out =
        ::ilrec_emu::warp_collective(&EMU_OP_LDMATRIX<COUNT, TRANS>, 0xffffffffu, in, __FILE__, __LINE__);
    memcpy(r, out.data, 4 * COUNT);
}

__device__ __forceinline__ void ldmatrix_x1(uint32_t r[1], const void *row) { emu_ldmatrix<1, false>(r, row); }
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void *row) { emu_ldmatrix<2, false>(r, row); }
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void *row) { emu_ldmatrix<4, false>(r, row); }
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t r[1], const void *row) { emu_ldmatrix<1, true>(r, row); }
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const void *row) { emu_ldmatrix<2, true>(r, row); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void *row) { emu_ldmatrix<4, true>(r, row); }

// cp.async: queued per thread; the copy happens when cp_async_wait retires its commit group.
__device__ __forceinline__ void cp_async_16(void *smem, const void *gmem) {
    ::ilrec_emu::cp_async_issue(smem, gmem, true, "cp_async_16");
}
__device__ __forceinline__ void cp_async_16_zfill(void *smem, const void *gmem, bool valid) {
    ::ilrec_emu::cp_async_issue(smem, gmem, valid, "cp_async_16_zfill");
}
__device__ __forceinline__ void cp_async_commit() { ::ilrec_emu::cp_async_commit_group(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    static_assert(N >= 0, "cp_async_wait<N>: N >= 0");
    ::ilrec_emu::cp_async_wait_groups((unsigned)N);
}
