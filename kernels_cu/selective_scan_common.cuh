// selective_scan_common.cuh: what the selective-scan forward and backward share: the params
// struct, the per-dtype traits, the gate/output math for real and complex A, and vector I/O.
//
// Shapes (element strides in the params): u, delta, z, out (B, D, L); A (D, N); B, C either
// variable (B, G, N, L) or constant (D, N) (then the host passes the channel stride as the
// "group" stride and zero batch/L strides); D, delta_bias (D,); initial/last state (B, D, N).
#pragma once
#include "scan.cuh"

namespace ssm {

struct SelectiveScanParams {
    const void* u; const void* delta; const void* A; const void* B; const void* C;
    const void* D; const void* z; const void* delta_bias; const void* initial_state;
    void* out; void* last_state; void* saved_states;    // saved: (B, D, n_saved, N), contiguous
    void* y_saved;      // forward with z, for the backward: y + D u before the gate, (B, D, L) contiguous
    // backward only
    const void* dout; const void* dlast_state;
    void* du; void* ddelta; void* dz; void* dinitial_state;
    void* dA_part;      // (B, D, N) per-batch partials of dA (summed over b by the host)
    void* dB_part;      // variable: (B, n_dblk, N, L) per-block partials; constant: (B, D, N)
    void* dC_part;
    void* dD_part;      // (B, D)
    void* ddelta_bias_part;  // (B, D)
    int64_t batch, dim, seqlen, dstate, n_groups, dim_per_group, n_saved, blocks_per_group;
    int64_t u_b, u_d, u_l, delta_b, delta_d, delta_l, z_b, z_d, z_l, out_b, out_d, out_l;
    int64_t A_d, A_n, B_b, B_g, B_n, B_l, C_b, C_g, C_n, C_l;
    int64_t D_s, delta_bias_s, init_b, init_d, init_n;
    int64_t dout_b, dout_d, dout_l, dlast_b, dlast_d, dlast_n;
    int64_t du_b, du_d, du_l, ddelta_b, ddelta_d, ddelta_l, dz_b, dz_d, dz_l;
    int32_t delta_softplus;
    int32_t vec_ok;     // every row 16-byte aligned with unit L stride: full chunks take the fast path
    int32_t bc_atomic;  // backward, variable dB/dC: 0 per-block partials (deterministic), 1 block sum
                        // + fp32 atomics into (B, G, 1, N, L)
    // Backward split along time: segment s of n_seg covers chunks [s, s + 1) * seg_chunks. A
    // carry pass (carry_pass = 1) writes, per (b, d, segment >= 1, n), the segment's decay
    // gate(sum delta, A) and its adjoint carry-out from a zero carry-in into carry
    // (B, D, n_seg, 2, N); the main pass starts each segment from the later segments' carries.
    void* carry;
    int64_t n_seg, seg_chunks;
    int32_t carry_pass;
};

// Storage of variable B/C: the input dtype for real A; complex (fp32 or fp64 parts) for complex A.
template <typename In, typename W> struct VarBC { typedef In type; };
template <typename In, typename R> struct VarBC<In, complex<R>> { typedef complex<R> type; };

// Load one element of any storage type as the compute type S (real or complex).
template <typename S> struct Ld {
    template <typename T> __device__ __forceinline__ static S from(const T& x) { return S(to_acc(x)); }
    __device__ __forceinline__ static S from(const complex<float>& x) { return S(x.re, x.im); }
    __device__ __forceinline__ static S from(const complex<double>& x) { return S(x.re, x.im); }
};

// ---- gate and readout: real and complex A ---------------------------------------------------
// The gate exp(delta * A). A is passed pre-scaled: real part times log2(e), imaginary part as is.
__device__ __forceinline__ float gate(float delta, float A2) { return exp2_fast(delta * A2); }
__device__ __forceinline__ double gate(double delta, double A2) { return exp2(delta * A2); }
__device__ __forceinline__ complex<float> gate(float delta, complex<float> A2) {
    float m = exp2_fast(delta * A2.re), s, c;
    sincosf(delta * A2.im, &s, &c);
    return {m * c, m * s};
}
__device__ __forceinline__ complex<double> gate(double delta, complex<double> A2) {
    double m = exp2(delta * A2.re), s, c;
    sincos(delta * A2.im, &s, &c);
    return {m * c, m * s};
}
__device__ __forceinline__ float prescale(float a) { return a * kLog2e; }
__device__ __forceinline__ double prescale(double a) { return a * 1.4426950408889634; }
template <typename R> __device__ __forceinline__ complex<R> prescale(complex<R> a) { return {prescale(a.re), a.im}; }

// y contribution of one state: C*h for real A; 2*Re(C*h) for complex A (conjugate pairs,
// as upstream).
__device__ __forceinline__ float readout(float c, float h) { return c * h; }
__device__ __forceinline__ double readout(double c, double h) { return c * h; }
template <typename R> __device__ __forceinline__ R readout(complex<R> c, complex<R> h) {
    return R(2) * (c.re * h.re - c.im * h.im);
}

// ---- vector I/O of kN consecutive elements (kN * sizeof(T) a multiple of 16) --------------
template <typename T, int kN> union Vec {
    static_assert((kN * sizeof(T)) % 16 == 0, "vector of whole 16-byte words");
    uint4 w[kN * sizeof(T) / 16];
    T e[kN];
};

__device__ __forceinline__ bool aligned16(const void* p) { return (((uint64_t)p) & 15ull) == 0; }

// Load kN elements of row[t0 .. t0+kN) (element stride `stride`) as Acc values; positions
// at or past L read `fill`. 16-byte loads when contiguous and aligned, else scalar.
template <typename T, int kN, typename A>
__device__ __forceinline__ void load_seg(const T* row, int64_t stride, int64_t t0, int64_t L,
                                         A (&out)[kN], A fill) {
    const T* p = row + t0 * stride;
    if (stride == 1 && t0 + kN <= L && aligned16(p)) {
        Vec<T, kN> v;
#pragma unroll
        for (int k = 0; k < int(kN * sizeof(T) / 16); ++k) v.w[k] = ((const uint4*)p)[k];
#pragma unroll
        for (int i = 0; i < kN; ++i) out[i] = A(to_acc(v.e[i]));
    } else {
#pragma unroll
        for (int i = 0; i < kN; ++i) out[i] = (t0 + i < L) ? A(to_acc(p[i * stride])) : fill;
    }
}

template <typename T, int kN, typename A>
__device__ __forceinline__ void store_seg(T* row, int64_t stride, int64_t t0, int64_t L, const A (&in)[kN]) {
    T* p = row + t0 * stride;
    if (stride == 1 && t0 + kN <= L && aligned16(p)) {
        Vec<T, kN> v;
#pragma unroll
        for (int i = 0; i < kN; ++i) v.e[i] = Convert<T>::from(in[i]);
#pragma unroll
        for (int k = 0; k < int(kN * sizeof(T) / 16); ++k) ((uint4*)p)[k] = v.w[k];
    } else {
#pragma unroll
        for (int i = 0; i < kN; ++i)
            if (t0 + i < L) p[i * stride] = Convert<T>::from(in[i]);
    }
}

// Load kN consecutive raw elements of row[t0 ..) (element stride `stride`) into a vector;
// positions at or past L read as zero bits (0.0 in every float type). Read-only path (ld.nc):
// the warps of a block read the same variable B/C rows, so most of these hit L1.
template <typename T, int kN>
__device__ __forceinline__ void load_raw(const T* row, int64_t stride, int64_t t0, int64_t L, Vec<T, kN>& v) {
    const T* p = row + t0 * stride;
    if (stride == 1 && t0 + kN <= L && aligned16(p)) {
#pragma unroll
        for (int k = 0; k < int(kN * sizeof(T) / 16); ++k) v.w[k] = __ldg((const uint4*)p + k);
    } else {
#pragma unroll
        for (int k = 0; k < int(kN * sizeof(T) / 16); ++k) v.w[k] = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
        for (int i = 0; i < kN; ++i)
            if (t0 + i < L) v.e[i] = p[i * stride];
    }
}

// Load kN steps from row[t0..): kFast = whole vector, aligned, no bounds; else checked.
template <bool kFast, typename T, int kN, typename A>
__device__ __forceinline__ void load_steps(const T* row, int64_t stride, int64_t t0, int64_t L, A (&out)[kN]) {
    if (kFast) {
        Vec<T, kN> v;
#pragma unroll
        for (int k = 0; k < int(kN * sizeof(T) / 16); ++k) v.w[k] = __ldg((const uint4*)(row + t0) + k);
#pragma unroll
        for (int i = 0; i < kN; ++i) out[i] = A(to_acc(v.e[i]));
    } else {
        load_seg(row, stride, t0, L, out, A(0));
    }
}

template <bool kFast, typename T, int kN>
__device__ __forceinline__ void load_vec(const T* row, int64_t stride, int64_t t0, int64_t L, Vec<T, kN>& v) {
    if (kFast) {
#pragma unroll
        for (int k = 0; k < int(kN * sizeof(T) / 16); ++k) v.w[k] = __ldg((const uint4*)(row + t0) + k);
    } else {
        load_raw(row, stride, t0, L, v);
    }
}

template <bool kFast, typename T, int kN, typename A>
__device__ __forceinline__ void store_steps(T* row, int64_t stride, int64_t t0, int64_t L, const A (&in)[kN]) {
    if (kFast) {
        Vec<T, kN> v;
#pragma unroll
        for (int i = 0; i < kN; ++i) v.e[i] = Convert<T>::from(in[i]);
#pragma unroll
        for (int k = 0; k < int(kN * sizeof(T) / 16); ++k) ((uint4*)(row + t0))[k] = v.w[k];
    } else {
        store_seg(row, stride, t0, L, in);
    }
}

// Ask L2 for a lane's kN elements of a unit-stride row from t0 (one prefetch per 32-byte sector,
// none at or past L):
// the next chunk's rows arrive while this chunk computes, so its first loads wait on L2, not DRAM.
template <typename T, int kN> __device__ __forceinline__ void prefetch_l2(const T* row, int64_t t0, int64_t L) {
    if (row == nullptr) return;
    const char* b = (const char*)(row + t0);
#pragma unroll
    for (int off = 0; off < int(kN * sizeof(T)); off += 32)
        if (t0 + off / int(sizeof(T)) < L) asm volatile("prefetch.global.L2 [%0];" ::"l"(b + off));
}

// The B/C rows a block will read for steps [t0 ...) of all N states, shared out over its warps
// (warp w takes states w, w + warps, ...). Unit-stride rows only.
template <typename T, int kN>
__device__ __forceinline__ void prefetch_bc_l2(const T* Bg, const T* Cg, const SelectiveScanParams& p, int64_t t0,
                                               int warp, int warps, bool var_b, bool var_c) {
    var_b = var_b && p.B_l == 1;
    var_c = var_c && p.C_l == 1;
    for (int64_t n = warp; n < p.dstate; n += warps) {
        if (var_b) prefetch_l2<T, kN>(Bg + n * p.B_n, t0, p.seqlen);
        if (var_c) prefetch_l2<T, kN>(Cg + n * p.C_n, t0, p.seqlen);
    }
}

// Shared-memory rows of per-lane segments (the backward's dB/dC slices): each lane's kItems-long
// segment padded by one 16-byte word so a quarter-warp's 16-byte accesses hit distinct banks.
template <typename S, int kItems> struct TileLayout {
    static constexpr int kPad = 16 / sizeof(S) > 0 ? 16 / sizeof(S) : 1;
    static constexpr int kSeg = kItems + kPad;
    static constexpr int kRow = 32 * kSeg;
    __device__ __forceinline__ static int index(int j, int t) { return j * kRow + (t / kItems) * kSeg + (t % kItems); }
};


// Delta after bias and softplus, from the raw delta value.
template <typename R> __device__ __forceinline__ R delta_eff(R raw, R bias, int softplus_on) {
    R v = raw + bias;
    return softplus_on ? softplus(v) : v;
}

// Channel mapping shared by forward and backward: blockIdx.x -> (b, g, first channel); warp w
// of the block owns channel d = g * Dg + k * warps + w (active when k * warps + w < Dg).
struct ChannelMap {
    int64_t b, g, d_local, d;
    bool active;
    __device__ __forceinline__ ChannelMap(const SelectiveScanParams& p, int warp, int warps,
                                          int64_t blk = blockIdx.x) {
        int64_t per_b = p.n_groups * p.blocks_per_group;
        b = blk / per_b;
        int64_t rem = blk - b * per_b;
        g = rem / p.blocks_per_group;
        int64_t k = rem - g * p.blocks_per_group;
        d_local = k * warps + warp;
        active = d_local < p.dim_per_group;
        d = g * p.dim_per_group + (active ? d_local : 0);
    }
};

}  // namespace ssm
