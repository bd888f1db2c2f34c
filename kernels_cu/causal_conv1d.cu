// causal_conv1d.cu: depthwise causal 1-D convolution (Mamba's short conv), forward, backward and
// the decode-time state update.
//
//   out[b, d, t] = act(bias[d] + sum_k w[d, k] * xx[b, d, t - (W-1) + k])        k = 0..W-1
//
// xx is x extended to negative time with initial_states (zeros when absent). With seq_idx, input
// s is visible to output t only if seq(s) == seq(t), where seq(s < 0) = seq_idx[b, 0]; a token
// with seq(t) < 0 is padding: its output is exactly 0 and it contributes nothing (forward and
// backward). Accumulation is fp32 (fp64 for fp64 inputs).
//
// Template parameters: T (x / out / states), TW (weight and bias), kW (width 2..8), kSeq
// (seq_idx given). The activation is a runtime flag (one uniform branch per output).
//
// Two data mappings, picked in Python from x's strides. Both accept arbitrary strides for every
// array: the host sets a "vec" flag when an array's vector axis has unit stride, and the kernel
// additionally checks the actual address alignment of each row / thread base before it uses a
// vector access, so a misaligned view takes the scalar path and is still correct.
//
// * channel-first (the time axis is contiguous): a segment is 32 * kItems steps of one (b, d)
//   row, each lane owning kItems consecutive steps (16-byte vector loads). The W-1 steps before a
//   lane's first one (the halo) come from the previous lane by shuffles; lane 0 gets them from
//   global memory (L1/L2 hits: the warp of the segment before loads those lines) or
//   initial_states. A block is 4 warps = 4 channels of one batch row, so seq_idx loads are shared
//   through L1. No shared memory, no block barrier. Two kernels, chosen by x's dtype on the host:
//   - 16-bit types, causal_conv1d_fwd_cf (pipelined): 16 steps (32 bytes) per lane; one warp
//     walks a group of seg_iters consecutive segments of its row (host: 2), loading the next
//     segment while it computes the current one; lane 0 of a later segment takes its halo from
//     lane 31 of the one before.
//   - fp32 / fp64, causal_conv1d_fwd_cf_single: one segment per warp, 8 steps per lane (32 / 64
//     bytes), one round of loads.
//   Grid: blockIdx.x = (b * n_dgroups + dgroup) * n_seg + group  (n_seg: segment groups per row;
//   a group is one segment for the single-round kernel).
//
// * channel-last (the channel axis is contiguous): each thread owns kVec consecutive channels
//   (one 8-byte vector) and kSteps consecutive time steps, sliding the window in registers; its
//   W-1 halo steps are re-read (L1 hits: the warp above in the same block reads them). A block is
//   32 lanes along D x 4 warps along time. No transpose is needed: a warp's load of one time step
//   is 32 contiguous vectors.
//   Grid: blockIdx.x = (b * n_seg + tblock) * n_dgroups + dblock.
//
// Backward: dpre[t] = dout[t] * act'(pre[t]) (pre recomputed; with no activation dpre = dout);
//   dx[s] = sum_j w[W-1-j] * dpre[s+j] * [seq(s+j) == seq(s)]   (s < 0 gives dinitial_states),
//   dfinal_states adds onto the last W-1 positions of the extended input,
//   dweight[d, k] = sum dpre[t] * visible xx[t-(W-1)+k],  dbias[d] = sum dpre[t].
// The backward kernels write dx directly and per-(block, channel) partial sums of dweight/dbias
// (fixed summation order) into a workspace (P, D, W+1); causal_conv1d_bwd_reduce sums the P
// partials per (d, k) in index order. No atomics: bitwise reproducible run to run.
//
// Decode update: one thread per (b, d); the W-1 window values are read from the state row (a
// shift register, or a ring buffer addressed by cache_seqlens), new tokens slide through
// registers, then the state row is written back in place.
#include "common.cuh"

namespace ssm {

// ---- parameter structs (mirrored in ssmkit/ops/causal_conv1d.py) ---------------------------

struct ConvFwdParams {
    const void* x;                 // (B, D, L)
    const void* weight;            // (D, W)
    const void* bias;              // (D,) or null
    const int32_t* seq_idx;        // (B, L) or null (non-null exactly when kSeq)
    const void* initial_states;    // (B, D, W-1) or null
    void* out;                     // (B, D, L)
    void* final_states;            // (B, D, W-1) or null
    int64_t batch, dim, seqlen;
    int64_t x_b, x_d, x_l;
    int64_t w_d, w_k;
    int64_t bias_s;
    int64_t seq_b, seq_l;
    int64_t init_b, init_d, init_k;
    int64_t out_b, out_d, out_l;
    int64_t fin_b, fin_d, fin_k;
    int64_t n_seg;                 // grid decode: segment groups (channel-first) / time blocks (channel-last)
    int64_t n_dgroups;             // grid decode: channel groups (channel-first) / channel blocks (channel-last)
    int32_t silu;                  // activation silu/swish
    int32_t x_vec;                 // x's vector axis has unit stride
    int32_t out_vec;               // out's vector axis has unit stride
    int32_t seq_vec;               // seq_idx's time axis has unit stride (channel-first)
    int32_t seg_iters;             // channel-first, 16-bit: segments per warp (a group), >= 1
    int32_t pad_;
};

struct ConvBwdParams {
    const void* x;                 // (B, D, L)
    const void* weight;            // (D, W)
    const void* bias;              // (D,) or null
    const void* dout;              // (B, D, L)
    const int32_t* seq_idx;        // (B, L) or null (non-null exactly when kSeq)
    const void* initial_states;    // (B, D, W-1) or null
    const void* dfinal_states;     // (B, D, W-1) or null
    void* dx;                      // (B, D, L)
    void* dinitial_states;         // (B, D, W-1) or null
    void* partials;                // (P, D, W+1) accumulator type, contiguous
    int64_t batch, dim, seqlen;
    int64_t x_b, x_d, x_l;
    int64_t w_d, w_k;
    int64_t bias_s;
    int64_t dout_b, dout_d, dout_l;
    int64_t seq_b, seq_l;
    int64_t init_b, init_d, init_k;
    int64_t dfin_b, dfin_d, dfin_k;
    int64_t dx_b, dx_d, dx_l;
    int64_t dinit_b, dinit_d, dinit_k;
    int64_t n_seg;                 // grid decode: time groups per batch row (= partials per batch row)
    int64_t n_dgroups;             // grid decode: channel groups / blocks
    int32_t silu;
    int32_t x_vec;
    int32_t dout_vec;
    int32_t dx_vec;
    int32_t seq_vec;
    int32_t pad_;
};

struct ConvReduceParams {
    const void* partials;          // (P, D, W+1) accumulator type, contiguous
    void* dweight;                 // (D, W)
    void* dbias;                   // (D,) or null
    int64_t dim, n_partials;
    int64_t w_d, w_k;
    int64_t bias_s;
    int32_t width;
    int32_t pad_;
};

struct ConvUpdateParams {
    const void* x;                 // (B, D, L_new)   (a 2-D x travels with x_l = 0, L_new = 1)
    void* conv_state;              // (B_pool, D, S), updated in place
    const void* weight;            // (D, W)
    const void* bias;              // (D,) or null
    const int32_t* cache_seqlens;  // (B,) or null: ring-buffer mode
    const int32_t* state_indices;  // (B,) or null: row of the pool per batch row, < 0 = padding
    void* out;                     // (B, D, L_new)
    int64_t batch, dim, new_len, state_len;
    int64_t x_b, x_d, x_l;
    int64_t st_b, st_d, st_s;
    int64_t w_d, w_k;
    int64_t bias_s;
    int64_t csl_s, idx_s;
    int64_t out_b, out_d, out_l;
    int64_t n_dblocks;
    int32_t width;
    int32_t silu;
};

// ---- constants ---------------------------------------------------------------------------

constexpr int kConvMaxWidth = 8;   // widths 2..8; the decode update's register window
// Channel-first: 4 warps per block (4 channels at one segment): 128-thread blocks keep up to 16
// blocks per SM resident, so a row of short L still fills the machine; seq_idx is shared via L1.
constexpr int kConvCFWarps = 4;
// Channel-last: 32 lanes along D x 4 warps along time.
constexpr int kConvCLWarps = 4;
// Backward: each channel-first warp walks this many 32*kItems segments, each channel-last block
// this many 4*kSteps slices, accumulating dweight/dbias partials in registers, so the workspace
// stays near 1% of x's bytes (P = B * L / 1024 or B * L / 256 partials per channel).
constexpr int kConvCFBwdIters = 4;
constexpr int kConvCLBwdIters = 8;
// Decode update: one thread per (b, d).
constexpr int kConvUpdateThreads = 128;
constexpr int kConvReduceThreads = 256;
static_assert(kConvCFBwdIters >= 1 && kConvCLBwdIters >= 1 && kConvMaxWidth == 8 && kConvUpdateThreads % 32 == 0 &&
              kConvReduceThreads % 32 == 0, "launch constants (mirrored in ssmkit/ops/causal_conv1d.py)");

template <typename T> struct ConvTraits {
    // Channel-first forward: 16 steps per lane for 16-bit types (32 bytes, pipelined kernel), 8
    // for fp32 and fp64 (32 / 64 bytes, single-round kernel). Measured on the H200, width 4, silu,
    // bias, call time from Python in ms for b8 d3072 l2048 / b4 d8192 l2048 / b1 d10240 l8192
    // (upstream causal_conv1d: bf16 0.0953 / 0.1200 / 0.1299, fp32 0.1472 / 0.1703 / 0.2136):
    //   bf16 single-round, 64 B per lane          0.0947 / 0.1216 / 0.1475
    //   bf16 pipelined, 64 B, 80 regs, 4-8 segs   0.1059 / 0.1329 / 0.1767
    //   bf16 pipelined, 32 B, 64 regs, 1 seg      0.0916 / 0.1162 / 0.1475
    //                                  2 segs     0.0825 / 0.1032 / 0.1244  (shipped)
    //                                  4 segs     0.0838 / 0.1053 / 0.1257
    //   bf16 pipelined, 64 B, 94 regs, 2 segs     0.0913 / 0.1157 / 0.1377
    //   fp32 single-round, 32 B, 40 regs          0.1198 / 0.1531 / 0.1890  (shipped)
    //   fp32 pipelined, 32 B, 64 regs, 2 segs     0.1584 / 0.2013 / 0.2510 (71 regs: 0.1420 / 0.1841 /
    //                                             0.2248; 64 B per lane: slower still)
    // kItems >= 8 > W-1, so a lane's halo always lies within the previous lane.
    static constexpr int kFwdItems = sizeof(T) == 2 ? 16 : 8;
    // Channel-first backward: 8 steps per lane (x and dout: 16 bytes each for 16-bit types);
    // 16 bf16 steps would need ~150 registers (x, dout, dpre and seq windows).
    static constexpr int kBwdItems = 8;
    // Channel-last forward: one 8-byte vector of channels per thread (4 x 16-bit, 2 x fp32,
    // 1 x fp64), 16 time steps per thread (19 loads in flight for W = 4; ~100-130 registers).
    static constexpr int kVec = 8 / sizeof(T);
    static constexpr int kFwdSteps = 16;
    // Channel-last backward: 4-byte vectors (2 x 16-bit, 1 x fp32; fp64 1 x 8 bytes) and 8 steps:
    // it holds x, dout, dpre windows and dweight partials per channel.
    static constexpr int kBwdVec = sizeof(T) == 8 ? 1 : 4 / sizeof(T);
    static constexpr int kBwdSteps = 8;
    static_assert(kFwdItems > kConvMaxWidth - 1 && kBwdItems > kConvMaxWidth - 1,
                  "a channel-first lane's halo must lie within its neighbour");
    static_assert(kFwdItems * sizeof(T) % 16 == 0, "channel-first forward: whole 16-byte words per lane");
};

// Register cap of the pipelined channel-first forward (16-bit types): minimum resident 128-thread
// blocks per SM. 8 (64 registers, 32 warps per SM) for W = 4 without seq_idx is measured (see
// ConvTraits; 72 registers uncapped). Elsewhere the largest count at which ptxas (CUDA 13, sm_90)
// spills nothing inside a loop (checked in the SASS; up to 32 bytes spilled before or after the
// segment loops are allowed: fp16 W 4-5, and W 2-5 and 8 with seq_idx). Registers bf16 / fp16:
//   no seq_idx: W 2-5 -> 8 blocks (64 / 64), W 6-8 -> 7 (72 / 72)
//   seq_idx:    W 2-3 -> 7 (72 / 72), W 4-5 -> 6 (80 / 80), W 6-8 -> 5 (95-96 / 95-96)
// With seq_idx there is no prefetch (see the kernel) and the ids take registers besides x.
template <int kW, bool kSeq> struct ConvFwdCFMinBlocks {
    static constexpr int value = kSeq ? (kW <= 3 ? 7 : kW <= 5 ? 6 : 5) : (kW <= 5 ? 8 : 7);
};

// ---- small helpers -------------------------------------------------------------------------

template <int kBytes> struct ConvRaw;
template <> struct ConvRaw<16> { typedef uint4 type; };
template <> struct ConvRaw<8> { typedef uint2 type; };
template <> struct ConvRaw<4> { typedef unsigned int type; };
template <> struct ConvRaw<2> { typedef unsigned short type; };

// N elements of T viewed as one raw machine word (a single vector load/store).
template <typename T, int N> union ConvPacked {
    typename ConvRaw<sizeof(T) * N>::type raw;
    T v[N];
};

// An opaque copy: the compiler cannot see through it, so it cannot hoist work derived from it
// out of a loop (no instruction is emitted).
__device__ __forceinline__ void conv_opaque(int64_t& v) { asm volatile("" : "+l"(v)); }

// One 16-byte store of 16 bytes of values. A plain uint4 store let NVVM split the first word of
// every lane into four 32-bit stores (PTX of the channel-first forward; conv_store_row, which the
// single-round kernel keeps as measured, still shows it for fp32); the inline PTX keeps it one
// vector store.
__device__ __forceinline__ void conv_store16(void* p, uint4 v) {
    asm("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}
__device__ __forceinline__ uint32_t conv_pair(uint16_t lo, uint16_t hi) { return (uint32_t)lo | ((uint32_t)hi << 16); }
__device__ __forceinline__ uint4 conv_words(const bf16* v) {
    return make_uint4(conv_pair(v[0].bits, v[1].bits), conv_pair(v[2].bits, v[3].bits),
                      conv_pair(v[4].bits, v[5].bits), conv_pair(v[6].bits, v[7].bits));
}
__device__ __forceinline__ uint4 conv_words(const f16* v) {
    return make_uint4(conv_pair(v[0].bits, v[1].bits), conv_pair(v[2].bits, v[3].bits),
                      conv_pair(v[4].bits, v[5].bits), conv_pair(v[6].bits, v[7].bits));
}

template <int kBytes>
__device__ __forceinline__ bool conv_aligned(const void* p) {
    return (reinterpret_cast<uint64_t>(p) & (kBytes - 1)) == 0;
}

// Storage -> compute value (fp32 for 16/32-bit floats, fp64 for fp64, int for seq ids).
__device__ __forceinline__ float conv_val(float x) { return x; }
__device__ __forceinline__ double conv_val(double x) { return x; }
__device__ __forceinline__ float conv_val(bf16 x) { return to_float(x); }
__device__ __forceinline__ float conv_val(f16 x) { return to_float(x); }
__device__ __forceinline__ int conv_val(int x) { return x; }

__device__ __forceinline__ float conv_fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double conv_fma(double a, double b, double c) { return fma(a, b, c); }

// sigmoid via ex2.approx and rcp.approx (rel. error ~1e-7; inputs far below 0 give exactly 0).
__device__ __forceinline__ float conv_sigmoid(float x) {
    float e = exp2_fast(-x * kLog2e);
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.f + e));
    return r;
}
__device__ __forceinline__ double conv_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
template <typename A> __device__ __forceinline__ A conv_silu(A x) { return x * conv_sigmoid(x); }
template <typename A> __device__ __forceinline__ A conv_silu_grad(A x) {
    A s = conv_sigmoid(x);
    return s * (A(1) + x * (A(1) - s));
}

__device__ __forceinline__ float conv_shfl_up(float v) { return __shfl_up_sync(0xffffffffu, v, 1); }
__device__ __forceinline__ double conv_shfl_up(double v) { return __shfl_up_sync(0xffffffffu, v, 1); }
__device__ __forceinline__ int conv_shfl_up(int v) { return __shfl_up_sync(0xffffffffu, v, 1); }
__device__ __forceinline__ float conv_shfl_down(float v) { return __shfl_down_sync(0xffffffffu, v, 1); }
__device__ __forceinline__ double conv_shfl_down(double v) { return __shfl_down_sync(0xffffffffu, v, 1); }
__device__ __forceinline__ int conv_shfl_down(int v) { return __shfl_down_sync(0xffffffffu, v, 1); }
__device__ __forceinline__ float conv_shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
__device__ __forceinline__ double conv_shfl_xor(double v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
__device__ __forceinline__ float conv_shfl_idx(float v, int src) { return __shfl_sync(0xffffffffu, v, src); }
__device__ __forceinline__ double conv_shfl_idx(double v, int src) { return __shfl_sync(0xffffffffu, v, src); }
__device__ __forceinline__ int conv_shfl_idx(int v, int src) { return __shfl_sync(0xffffffffu, v, src); }

// Load N consecutive elements (indices t0 .. t0+N-1 of a row with element stride `stride`) as
// compute values; indices >= len give 0. `vec` = the row has unit stride and a 16-byte aligned
// base (t0 is a multiple of 16 / sizeof(T)); then, when the range lies inside the row, the loads
// are 16-byte vectors.
template <int N, typename V, typename T>
__device__ __forceinline__ void conv_load_row(V* v, const T* row, int64_t t0, int64_t len,
                                              int64_t stride, bool vec) {
    constexpr int kPer = 16 / sizeof(T);
    static_assert(N % kPer == 0, "row loads are whole 16-byte vectors");
    if (vec && t0 + N <= len) {
        const uint4* src = reinterpret_cast<const uint4*>(row + t0);
#pragma unroll
        for (int c = 0; c < N / kPer; ++c) {
            ConvPacked<T, kPer> pk;
            pk.raw = src[c];
#pragma unroll
            for (int i = 0; i < kPer; ++i) v[c * kPer + i] = V(conv_val(pk.v[i]));
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const int64_t t = t0 + i;
            v[i] = t < len ? V(conv_val(row[t * stride])) : V(0);
        }
    }
}

// Store N consecutive row elements (those at indices < len); `vec` as for conv_load_row.
template <int N, typename T, typename V>
__device__ __forceinline__ void conv_store_row(T* row, int64_t t0, int64_t len, int64_t stride,
                                               bool vec, const V* v) {
    constexpr int kPer = 16 / sizeof(T);
    static_assert(N % kPer == 0, "row stores are whole 16-byte vectors");
    if (vec && t0 + N <= len) {
        uint4* dst = reinterpret_cast<uint4*>(row + t0);
#pragma unroll
        for (int c = 0; c < N / kPer; ++c) {
            ConvPacked<T, kPer> pk;
#pragma unroll
            for (int i = 0; i < kPer; ++i) pk.v[i] = Convert<T>::from(v[c * kPer + i]);
            dst[c] = pk.raw;
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const int64_t t = t0 + i;
            if (t < len) row[t * stride] = Convert<T>::from(v[i]);
        }
    }
}

// Channel vectors (channel-last): N channels p[0], p[stride], ..., the first `nvalid` present.
// `vec` = unit stride and the address is aligned to the whole vector (checked by the caller).
template <int N, typename T>
__device__ __forceinline__ void conv_load_chans_raw(ConvPacked<T, N>& pk, const T* p, int64_t stride,
                                                    int nvalid, bool vec) {
    if (vec && nvalid == N) {
        pk.raw = *reinterpret_cast<const typename ConvRaw<sizeof(T) * N>::type*>(p);
    } else {
#pragma unroll
        for (int c = 0; c < N; ++c) pk.v[c] = c < nvalid ? p[c * stride] : T{};
    }
}

template <int N, typename T>
__device__ __forceinline__ void conv_zero_raw(ConvPacked<T, N>& pk) {
    pk.raw = typename ConvRaw<sizeof(T) * N>::type{};
}

template <int N, typename A, typename T>
__device__ __forceinline__ void conv_load_chans(A* v, const T* p, int64_t stride, int nvalid) {
#pragma unroll
    for (int c = 0; c < N; ++c) v[c] = c < nvalid ? A(conv_val(p[c * stride])) : A(0);
}

template <int N, typename T, typename A>
__device__ __forceinline__ void conv_store_chans(T* p, int64_t stride, int nvalid, bool vec, const A* v) {
    if (vec && nvalid == N && conv_aligned<sizeof(T) * N>(p)) {
        ConvPacked<T, N> pk;
#pragma unroll
        for (int c = 0; c < N; ++c) pk.v[c] = Convert<T>::from(v[c]);
        *reinterpret_cast<typename ConvRaw<sizeof(T) * N>::type*>(p) = pk.raw;
    } else {
#pragma unroll
        for (int c = 0; c < N; ++c)
            if (c < nvalid) p[c * stride] = Convert<T>::from(v[c]);
    }
}

// ---- per-position math (shared by both mappings) ---------------------------------------------

// Pre-activation: bias + sum_k w[k] * xs[k] over the visible inputs. xs/ss point at the window's
// oldest element (time t - (W-1)); s_t = seq(t).
template <int kW, bool kSeq, typename A>
__device__ __forceinline__ A conv_pre(const A* w, A bias, const A* xs, const int* ss, int s_t) {
    A acc = bias;
#pragma unroll
    for (int k = 0; k < kW; ++k) {
        A xv = xs[k];
        if (kSeq) xv = ss[k] == s_t ? xv : A(0);
        acc = conv_fma(w[k], xv, acc);
    }
    return acc;
}

// One output; padding outputs are exactly 0.
template <int kW, bool kSeq, typename A>
__device__ __forceinline__ A conv_out(const A* w, A bias, const A* xs, const int* ss, int s_t, bool silu) {
    A acc = conv_pre<kW, kSeq>(w, bias, xs, ss, s_t);
    if (silu) acc = conv_silu(acc);
    if (kSeq) acc = s_t >= 0 ? acc : A(0);
    return acc;
}

// dpre at one position: g = dout there, inside = position < L.
template <int kW, bool kSeq, typename A>
__device__ __forceinline__ A conv_dpre(const A* w, A bias, const A* xs, const int* ss, int s_t, A g,
                                       bool inside, bool silu) {
    A r = g;
    if (silu) r = r * conv_silu_grad(conv_pre<kW, kSeq>(w, bias, xs, ss, s_t));
    bool valid = inside;
    if (kSeq) valid = valid && s_t >= 0;
    return valid ? r : A(0);
}

// dweight/dbias partials of one position (its dpre and its visible window). A padding position
// (s_t < 0, dp = 0) sees no input either: padding tokens share its id, and a NaN / inf left in
// them (a padded batch's unwritten rows) must not reach dweight as 0 * NaN (a select, not a
// multiply by 0).
template <int kW, bool kSeq, typename A>
__device__ __forceinline__ void conv_accum(A* pw, A& pb, A dp, const A* xs, const int* ss, int s_t) {
    pb += dp;
    const bool live = s_t >= 0;
#pragma unroll
    for (int k = 0; k < kW; ++k) {
        A xv = xs[k];
        if (kSeq) xv = (live && ss[k] == s_t) ? xv : A(0);
        pw[k] = conv_fma(dp, xv, pw[k]);
    }
}

// dx at one position s: sum_j w[W-1-j] * dp[j] * [seq(s+j) == seq(s)]; dp/ss start at s.
template <int kW, bool kSeq, typename A>
__device__ __forceinline__ A conv_dx(const A* w, const A* dp, const int* ss, int s_s) {
    A acc = A(0);
#pragma unroll
    for (int j = 0; j < kW; ++j) {
        A g = dp[j];
        if (kSeq) g = ss[j] == s_s ? g : A(0);
        acc = conv_fma(w[kW - 1 - j], g, acc);
    }
    return acc;
}

// The W-1 inputs before a warp's first step (times t0-kH .. t0-1; initial_states or zeros and
// seq_idx[b, 0] at negative time), loaded by the edge lane before the shuffles so that their
// latency overlaps the main loads instead of following them. Other lanes (edge = false) get
// zeros: their halo comes by shuffle.
template <int kH, bool kSeq, typename A, typename T>
__device__ __forceinline__ void conv_load_prev_halo(bool edge, A* hx, int* hs, const T* x, int64_t x_l,
                                                    const T* init, int64_t init_k, bool has_init,
                                                    const int32_t* seq, int64_t seq_l, int64_t t0) {
#pragma unroll
    for (int j = 0; j < kH; ++j) {
        hx[j] = A(0);
        hs[j] = 0;
    }
    if (!edge) return;
#pragma unroll
    for (int j = 0; j < kH; ++j) {
        const int64_t t = t0 - kH + j;
        if (t >= 0) {
            hx[j] = A(conv_val(x[t * x_l]));
            if (kSeq) hs[j] = seq[t * seq_l];
        } else {
            hx[j] = has_init ? A(conv_val(init[(kH + t) * init_k])) : A(0);
            if (kSeq) hs[j] = seq[0];
        }
    }
}

// Channel-first grid: blockIdx.x = (b * n_dgroups + dgroup) * n_seg + seg; warp w of a block
// owns channel d = dgroup * kConvCFWarps + w (d >= dim: an idle warp). Forward and backward.
struct ConvCFBlock {
    int64_t seg, b, d;
    template <typename P>
    __device__ __forceinline__ ConvCFBlock(const P& p, int warp) {
        const int64_t blk = blockIdx.x;
        seg = blk % p.n_seg;
        const int64_t rest = blk / p.n_seg;
        b = rest / p.n_dgroups;
        d = (rest % p.n_dgroups) * kConvCFWarps + warp;
    }
};

// ============================================================================================
// Forward, channel-first
// ============================================================================================

// Load N consecutive row elements (indices t0 .. t0+N-1) as raw 16-byte words, unconverted;
// indices >= len give 0. The forward keeps the next segment's inputs in this form while it
// computes the current one (half the registers of fp32 values for 16-bit types).
// Unit stride and a 16-byte aligned row (t0 a multiple of 16 / sizeof(T)): 16-byte vectors; a
// lane that straddles len loads its elements one by one at constant offsets.
template <int N, typename T>
__device__ __forceinline__ void conv_load_row_raw_vec(ConvPacked<T, 16 / sizeof(T)>* raw, const T* row, int64_t t0,
                                                      int64_t len) {
    constexpr int kPer = 16 / sizeof(T);
    static_assert(N % kPer == 0, "row loads are whole 16-byte vectors");
    const T* src = row + t0;
    if (t0 + N <= len) {
#pragma unroll
        for (int c = 0; c < N / kPer; ++c) raw[c].raw = reinterpret_cast<const uint4*>(src)[c];
    } else {
        const int64_t n = len - t0;  // may be <= 0
#pragma unroll
        for (int c = 0; c < N / kPer; ++c) {
#pragma unroll
            for (int i = 0; i < kPer; ++i) raw[c].v[i] = c * kPer + i < n ? src[c * kPer + i] : T{};
        }
    }
}

// The same for any stride (scalar loads). The address walks by `stride`, one add per element, so
// that no table of per-element offsets is held in registers.
template <int N, typename T>
__device__ __forceinline__ void conv_load_row_raw(ConvPacked<T, 16 / sizeof(T)>* raw, const T* row, int64_t t0,
                                                  int64_t len, int64_t stride) {
    constexpr int kPer = 16 / sizeof(T);
    const int64_t n = len - t0;
    const T* q = row + t0 * stride;
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
            raw[c].v[i] = c * kPer + i < n ? *q : T{};
            q += stride;
        }
    }
}

// One lane's part of one channel-first forward segment: outputs at steps t0 .. t0+kItems-1 from
// the raw inputs xr / sr (seq ids, kSeq only). The halo (the kH steps before t0) is the previous
// lane's last steps; lane 0 takes it from hx / hs and receives lane 31's last steps there: the
// next segment's halo. Each 16-byte word of outputs is stored as soon as it is complete, which
// keeps few values live.
template <int kW, bool kSeq, int kItems, typename T, typename A>
__device__ __forceinline__ void conv_fwd_cf_segment(const ConvPacked<T, 16 / sizeof(T)>* xr,
                                                    const ConvPacked<int32_t, 4>* sr, A* hx, int* hs, const A* w,
                                                    A bias, bool silu, int lane, T* out, int64_t t0, int64_t L,
                                                    int64_t out_l, bool ovec) {
    constexpr int kH = kW - 1;
    constexpr int kPer = 16 / sizeof(T);
    const int prev = (lane + 31) & 31;
    A xv[kH + kItems];     // [0, kH): halo (times t0-kH .. t0-1); [kH, kH+kItems): own steps
    int sv[kH + kItems];   // their seq ids (kSeq only)
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
        xv[kH + i] = A(conv_val(xr[i / kPer].v[i % kPer]));
        sv[kH + i] = kSeq ? sr[i / 4].v[i % 4] : 0;
    }
#pragma unroll
    for (int j = 0; j < kH; ++j) {
        const A v = conv_shfl_idx(xv[kItems + j], prev);
        xv[j] = lane == 0 ? hx[j] : v;
        hx[j] = v;
        if (kSeq) {
            const int sj = conv_shfl_idx(sv[kItems + j], prev);
            sv[j] = lane == 0 ? hs[j] : sj;
            hs[j] = sj;
        }
    }
    const bool vstore = ovec && t0 + kItems <= L;
#pragma unroll
    for (int c = 0; c < kItems / kPer; ++c) {
        T ov[kPer];
#pragma unroll
        for (int i = c * kPer; i < (c + 1) * kPer; ++i)
            ov[i - c * kPer] =
                Convert<T>::from(conv_out<kW, kSeq>(w, bias, xv + i, sv + i, kSeq ? sv[kH + i] : 0, silu));
        if (vstore) {
            conv_store16(out + t0 + c * kPer, conv_words(ov));
        } else {
#pragma unroll
            for (int i = 0; i < kPer; ++i) {
                const int64_t t = t0 + c * kPer + i;
                if (t < L) out[t * out_l] = ov[i];
            }
        }
    }
}

// One warp walks p.seg_iters consecutive segments of its row (a segment group; host-chosen, a
// runtime value: no extra instantiations). With unit-stride aligned x the next segment's loads
// are issued before the current segment's math and stores, so a warp keeps a segment of loads
// in flight while it computes. Why: with one round of loads per warp the bf16 forward measured
// ~2.2 TB/s, half the copy rate; the likely cause is that a warp in its compute phase (2 MUFU ops
// per output: ~32 us of special-function time for a 268 MB row set on the H200, next to ~63 us
// of copy time) has no loads in flight. Measured: 2 segments per warp 10-16% faster than 1,
// 4 segments 1-2% slower than 2 (ConvTraits). Other layouts load each segment at
// the top of its iteration (scalar loads; the correctness path). Only a group's first segment
// reads its halo from global memory or initial_states; later ones take it from the previous
// segment's last lane.
template <typename T, typename TW, int kW, bool kSeq>
__global__ void __launch_bounds__(32 * kConvCFWarps, ConvFwdCFMinBlocks<kW, kSeq>::value)
causal_conv1d_fwd_cf(const ConvFwdParams p) {
    typedef typename Acc<T>::type A;
    constexpr int kItems = ConvTraits<T>::kFwdItems;
    constexpr int kH = kW - 1;
    constexpr int kSeg = 32 * kItems;
    constexpr int kPer = 16 / sizeof(T);          // x elements per 16-byte word
    static_assert(sizeof(T) == 2, "fp32 / fp64 run causal_conv1d_fwd_cf_single");
    static_assert(kH < kItems, "a lane's halo must lie within the previous lane");
    static_assert(kItems % 4 == 0, "seq ids travel as 16-byte words of 4");
    // With seq_idx a lane holds kItems int32 ids besides x: prefetching both would double that
    // (at 64 bytes per lane ~160-180 registers, or spills under a cap; ptxas -v), so the next segment's loads are
    // issued at the top of its iteration instead (the kernel before pipelining, looped).
    constexpr bool kPrefetch = !kSeq;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const ConvCFBlock cb(p, warp);
    const int64_t grp = cb.seg, b = cb.b, d = cb.d;
    if (d >= p.dim) return;  // warp-uniform: the shuffles below see full warps
    const int64_t L = p.seqlen;
    const int64_t s_first = grp * p.seg_iters;                        // < ceil(L / kSeg) (host)
    const int64_t s_end = min(s_first + p.seg_iters, (L + kSeg - 1) / kSeg);

    const T* x = (const T*)p.x + b * p.x_b + d * p.x_d;
    const int32_t* seq = p.seq_idx + b * p.seq_b;
    const T* init = (const T*)p.initial_states + b * p.init_b + d * p.init_d;
    T* out = (T*)p.out + b * p.out_b + d * p.out_d;
    // warp-uniform: every lane's base is the row's base plus a multiple of 16 bytes
    const bool fast = p.x_vec && conv_aligned<16>(x) && (!kSeq || (p.seq_vec && conv_aligned<16>(seq)));
    const bool ovec = p.out_vec && conv_aligned<16>(out);

    // Raw inputs of the current (xr, sr) and, when prefetching, the next (xn) segment.
    ConvPacked<T, kPer> xr[kItems / kPer], xn[kItems / kPer];
    ConvPacked<int32_t, 4> sr[kItems / 4];  // (kSeq only)
    if (kPrefetch && fast) conv_load_row_raw_vec<kItems>(xr, x, s_first * kSeg + lane * kItems, L);
    // Lane 0: the halo of the current segment (times t0-kH .. t0-1) and its seq ids.
    A hx[kH];
    int hs[kH];
    conv_load_prev_halo<kH, kSeq>(lane == 0, hx, hs, x, p.x_l, init, p.init_k, p.initial_states != nullptr, seq,
                                  p.seq_l, s_first * kSeg);   // lane 0: the group's first step, < L

    A w[kW];
#pragma unroll
    for (int k = 0; k < kW; ++k) w[k] = A(conv_val(((const TW*)p.weight)[d * p.w_d + k * p.w_k]));
    const A bias = p.bias ? A(conv_val(((const TW*)p.bias)[d * p.bias_s])) : A(0);
    const bool silu = p.silu;

    // Two loops, so that what the compiler hoists out of one is not live in the other.
    if (fast) {
        for (int64_t s = s_first; s < s_end; ++s) {
            const int64_t t0 = s * kSeg + lane * kItems;
            if (kPrefetch) {
                if (s + 1 < s_end)  // warp-uniform; in flight during the math and stores below
                    conv_load_row_raw_vec<kItems>(xn, x, t0 + kSeg, L);
            } else {
                conv_load_row_raw_vec<kItems>(xr, x, t0, L);
                conv_load_row_raw_vec<kItems>(sr, seq, t0, L);
            }
            conv_fwd_cf_segment<kW, kSeq, kItems>(xr, sr, hx, hs, w, bias, silu, lane, out, t0, L, p.out_l, ovec);
            if (kPrefetch) {
#pragma unroll
                for (int c = 0; c < kItems / kPer; ++c) xr[c] = xn[c];
            }
        }
    } else {
        for (int64_t s = s_first; s < s_end; ++s) {
            const int64_t t0 = s * kSeg + lane * kItems;
            // strides as opaque per-iteration values: otherwise the compiler hoists the offsets
            // i * stride (kItems per array) out of the loop into registers
            int64_t x_l = p.x_l, seq_l = p.seq_l, out_l = p.out_l;
            conv_opaque(x_l);
            conv_opaque(seq_l);
            conv_opaque(out_l);
            conv_load_row_raw<kItems>(xr, x, t0, L, x_l);
            if (kSeq) conv_load_row_raw<kItems>(sr, seq, t0, L, seq_l);
            conv_fwd_cf_segment<kW, kSeq, kItems>(xr, sr, hx, hs, w, bias, silu, lane, out, t0, L, out_l, ovec);
        }
    }

    if (p.final_states && s_end * kSeg >= L && lane < kH) {
        // The group with the row's last step: final_states[j] = xx[L - kH + j], the raw extended
        // input's last kH steps, read again (cache hits) rather than picked from registers.
        const int64_t t = L - kH + lane;
        T v = T{};
        if (t >= 0) v = x[t * p.x_l];
        else if (p.initial_states) v = init[(kH + t) * p.init_k];
        ((T*)p.final_states + b * p.fin_b + d * p.fin_d)[lane * p.fin_k] = v;
    }
}

// fp32 / fp64: one segment per warp, one round of loads (the channel-first forward before the
// pipelined kernel, unchanged; 40 registers for fp32 W = 4). It beats the pipelined kernel for
// 4-byte types by 1.3x (measured: see ConvTraits): with 8 fp32 steps per lane the pipelined
// kernel's extra registers cost more occupancy than the prefetch wins.
template <typename T, typename TW, int kW, bool kSeq>
__global__ void __launch_bounds__(32 * kConvCFWarps)
causal_conv1d_fwd_cf_single(const ConvFwdParams p) {
    typedef typename Acc<T>::type A;
    constexpr int kItems = ConvTraits<T>::kFwdItems;
    constexpr int kH = kW - 1;
    static_assert(sizeof(T) >= 4, "16-bit types run the pipelined causal_conv1d_fwd_cf");
    static_assert(kH < kItems, "a lane's halo must lie within the previous lane");
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const ConvCFBlock cb(p, warp);
    const int64_t seg = cb.seg, b = cb.b, d = cb.d;
    if (d >= p.dim) return;  // warp-uniform: the shuffles below see full warps
    const int64_t L = p.seqlen;
    const int64_t t0 = seg * (32 * kItems) + lane * kItems;

    const T* x = (const T*)p.x + b * p.x_b + d * p.x_d;
    const int32_t* seq = p.seq_idx + b * p.seq_b;
    A xv[kH + kItems];     // [0, kH): halo (times t0-kH .. t0-1); [kH, kH+kItems): own steps
    int sv[kH + kItems];   // their seq ids (kSeq only)
    conv_load_row<kItems>(xv + kH, x, t0, L, p.x_l, p.x_vec && conv_aligned<16>(x));
    if (kSeq) conv_load_row<kItems>(sv + kH, seq, t0, L, p.seq_l, p.seq_vec && conv_aligned<16>(seq));
    A hx[kH];
    int hs[kH];
    conv_load_prev_halo<kH, kSeq>(lane == 0, hx, hs, x, p.x_l,   // lane 0's t0 is the segment start, < L
                                  (const T*)p.initial_states + b * p.init_b + d * p.init_d, p.init_k,
                                  p.initial_states != nullptr, seq, p.seq_l, t0);

    A w[kW];
#pragma unroll
    for (int k = 0; k < kW; ++k) w[k] = A(conv_val(((const TW*)p.weight)[d * p.w_d + k * p.w_k]));
    const A bias = p.bias ? A(conv_val(((const TW*)p.bias)[d * p.bias_s])) : A(0);

#pragma unroll
    for (int j = 0; j < kH; ++j) {
        const A v = conv_shfl_up(xv[kItems + j]);
        xv[j] = lane == 0 ? hx[j] : v;
        if (kSeq) {
            const int sj = conv_shfl_up(sv[kItems + j]);
            sv[j] = lane == 0 ? hs[j] : sj;
        }
    }

    const bool silu = p.silu;
    A o[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) o[i] = conv_out<kW, kSeq>(w, bias, xv + i, sv + i, kSeq ? sv[kH + i] : 0, silu);
    T* out = (T*)p.out + b * p.out_b + d * p.out_d;
    conv_store_row<kItems>(out, t0, L, p.out_l, p.out_vec && conv_aligned<16>(out), o);

    if (p.final_states) {
        // final_states[j] = xx[L - kH + j]: the raw extended input's last kH steps.
        T* fin = (T*)p.final_states + b * p.fin_b + d * p.fin_d;
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
            const int64_t t = t0 + i;
            if (t >= L - kH && t < L) fin[(t - (L - kH)) * p.fin_k] = Convert<T>::from(xv[kH + i]);
        }
        if (t0 == 0) {  // L < W-1: part of the final state is the initial state
#pragma unroll
            for (int j = 0; j < kH; ++j) {
                const int64_t t = j - kH;
                if (t >= L - kH) fin[(t - (L - kH)) * p.fin_k] = Convert<T>::from(xv[j]);
            }
        }
    }
}

// ============================================================================================
// Forward, channel-last
// ============================================================================================

// Stage the raw inputs of times t0-kH+u, u = 0..kN-1 (x, or initial_states at negative time,
// zeros at or beyond L) and their seq ids. Interior threads (the whole window inside [0, L),
// unit channel stride, aligned, all kVec channels present) take a branch-free run of vector loads.
template <int kN, int kH, int kVec, bool kSeq, typename T>
__device__ __forceinline__ void conv_stage_cl(ConvPacked<T, kVec>* raw, int* sv, const T* x, int64_t x_l,
                                              int64_t x_d, bool xvec, const T* init, int64_t init_k,
                                              int64_t init_d, bool has_init, const int32_t* seq,
                                              int64_t seq_l, int64_t t0, int64_t L, int nvalid) {
    typedef typename ConvRaw<sizeof(T) * kVec>::type Raw;
    constexpr int kBytes = sizeof(T) * kVec;
    const bool vec = xvec && conv_aligned<kBytes>(x) && ((x_l * (int64_t)sizeof(T)) % kBytes) == 0;
    if (vec && nvalid == kVec && t0 - kH >= 0 && t0 - kH + kN <= L) {
        const T* px = x + (t0 - kH) * x_l;
#pragma unroll
        for (int u = 0; u < kN; ++u) raw[u].raw = *reinterpret_cast<const Raw*>(px + u * x_l);
        if (kSeq) {
            const int32_t* ps = seq + (t0 - kH) * seq_l;
#pragma unroll
            for (int u = 0; u < kN; ++u) sv[u] = ps[u * seq_l];
        }
        return;
    }
    const int s0 = kSeq ? seq[0] : 0;
#pragma unroll
    for (int u = 0; u < kN; ++u) {
        const int64_t t = t0 - kH + u;   // warp-uniform branches
        if (t >= L) {
            conv_zero_raw(raw[u]);
            if (kSeq) sv[u] = 0;
        } else if (t >= 0) {
            conv_load_chans_raw(raw[u], x + t * x_l, x_d, nvalid, vec);
            if (kSeq) sv[u] = seq[t * seq_l];
        } else {
            if (has_init) conv_load_chans_raw(raw[u], init + (kH + t) * init_k, init_d, nvalid, false);
            else conv_zero_raw(raw[u]);
            if (kSeq) sv[u] = s0;
        }
    }
}

template <typename T, typename TW, int kW, bool kSeq>
__global__ void __launch_bounds__(32 * kConvCLWarps)
causal_conv1d_fwd_cl(const ConvFwdParams p) {
    typedef typename Acc<T>::type A;
    constexpr int kVec = ConvTraits<T>::kVec;
    constexpr int kSteps = ConvTraits<T>::kFwdSteps;
    constexpr int kH = kW - 1;
    const int lane = threadIdx.x & 31;
    const int ty = threadIdx.x >> 5;
    const int64_t blk = blockIdx.x;
    const int64_t db = blk % p.n_dgroups;
    const int64_t rest = blk / p.n_dgroups;
    const int64_t tb = rest % p.n_seg;
    const int64_t b = rest / p.n_seg;
    const int64_t d0 = (db * 32 + lane) * kVec;
    const int64_t t0 = (tb * kConvCLWarps + ty) * kSteps;
    const int64_t L = p.seqlen;
    if (d0 >= p.dim || t0 >= L) return;  // no barriers or shuffles in this kernel
    const int nvalid = (int)min((int64_t)kVec, p.dim - d0);

    const int32_t* seq = p.seq_idx + b * p.seq_b;
    const T* x = (const T*)p.x + b * p.x_b + d0 * p.x_d;
    const T* init = (const T*)p.initial_states + b * p.init_b + d0 * p.init_d;
    // All loads first (raw words: 2 registers per step), then the math.
    ConvPacked<T, kVec> raw[kH + kSteps];
    int sv[kH + kSteps];
    conv_stage_cl<kH + kSteps, kH, kVec, kSeq>(raw, sv, x, p.x_l, p.x_d, p.x_vec, init, p.init_k, p.init_d,
                                               p.initial_states != nullptr, seq, p.seq_l, t0, L, nvalid);

    A w[kVec][kW], bias[kVec];
#pragma unroll
    for (int c = 0; c < kVec; ++c) {
        const bool ok = c < nvalid;
#pragma unroll
        for (int k = 0; k < kW; ++k)
            w[c][k] = ok ? A(conv_val(((const TW*)p.weight)[(d0 + c) * p.w_d + k * p.w_k])) : A(0);
        bias[c] = ok && p.bias ? A(conv_val(((const TW*)p.bias)[(d0 + c) * p.bias_s])) : A(0);
    }

    // Slide over the staged inputs: the window holds the kW inputs ending at the current step;
    // each output is stored as soon as it is computed.
    T* out = (T*)p.out + b * p.out_b + d0 * p.out_d;
    const bool silu = p.silu;
    A win[kW][kVec];
#pragma unroll
    for (int k = 0; k < kW; ++k) {
#pragma unroll
        for (int c = 0; c < kVec; ++c) win[k][c] = A(0);
    }
#pragma unroll
    for (int u = 0; u < kH + kSteps; ++u) {
#pragma unroll
        for (int k = 0; k + 1 < kW; ++k) {
#pragma unroll
            for (int c = 0; c < kVec; ++c) win[k][c] = win[k + 1][c];
        }
#pragma unroll
        for (int c = 0; c < kVec; ++c) win[kW - 1][c] = A(conv_val(raw[u].v[c]));
        if (u >= kH) {
            const int i = u - kH;
            A o[kVec];
#pragma unroll
            for (int c = 0; c < kVec; ++c) {
                A xs[kW];
#pragma unroll
                for (int k = 0; k < kW; ++k) xs[k] = win[k][c];
                o[c] = conv_out<kW, kSeq>(w[c], bias[c], xs, sv + i, kSeq ? sv[kH + i] : 0, silu);
            }
            if (t0 + i < L) conv_store_chans<kVec>(out + (t0 + i) * p.out_l, p.out_d, nvalid, p.out_vec, o);
        }
    }

    if (p.final_states) {
        T* fin = (T*)p.final_states + b * p.fin_b + d0 * p.fin_d;
#pragma unroll
        for (int u = 0; u < kH + kSteps; ++u) {
            const int64_t t = t0 - kH + u;
            // own steps, plus the negative-time halo for the first thread of the row
            const bool mine = u >= kH || (t0 == 0 && t < 0);
            if (mine && t >= L - kH && t < L) {
#pragma unroll
                for (int c = 0; c < kVec; ++c)
                    if (c < nvalid) fin[(t - (L - kH)) * p.fin_k + c * p.fin_d] = raw[u].v[c];
            }
        }
    }
}

// ============================================================================================
// Backward, channel-first
// ============================================================================================

// Register cap of the channel-first backward: the common case (no seq_idx, W <= 4, <= 4-byte
// types) fits 80 registers without spills (6 blocks = 24 warps per SM, 2 x 16-byte loads in
// flight per lane); the others are left uncapped (~96-128 registers, no spills).
template <typename T, int kW, bool kSeq> struct ConvBwdCFMinBlocks {
    static constexpr int value = (!kSeq && kW <= 4 && sizeof(T) <= 4) ? 6 : 1;
};

template <typename T, typename TW, int kW, bool kSeq>
__global__ void __launch_bounds__(32 * kConvCFWarps, ConvBwdCFMinBlocks<T, kW, kSeq>::value)
causal_conv1d_bwd_cf(const ConvBwdParams p) {
    typedef typename Acc<T>::type A;
    constexpr int kItems = ConvTraits<T>::kBwdItems;
    constexpr int kH = kW - 1;
    constexpr int kSeg = 32 * kItems;
    static_assert(kH < kItems, "a lane's halo must lie within the neighbouring lane");
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const ConvCFBlock cb(p, warp);
    const int64_t grp = cb.seg, b = cb.b, d = cb.d;
    if (d >= p.dim) return;  // warp-uniform; no block barriers in this kernel
    const int64_t L = p.seqlen;

    const T* x = (const T*)p.x + b * p.x_b + d * p.x_d;
    const T* dout = (const T*)p.dout + b * p.dout_b + d * p.dout_d;
    T* dx = (T*)p.dx + b * p.dx_b + d * p.dx_d;
    const T* init = (const T*)p.initial_states + b * p.init_b + d * p.init_d;
    const T* dfin = (const T*)p.dfinal_states + b * p.dfin_b + d * p.dfin_d;
    const int32_t* seq = p.seq_idx + b * p.seq_b;
    const bool xvec = p.x_vec && conv_aligned<16>(x);
    const bool gvec = p.dout_vec && conv_aligned<16>(dout);
    const bool dxvec = p.dx_vec && conv_aligned<16>(dx);
    const bool svec = p.seq_vec && conv_aligned<16>(seq);
    const bool silu = p.silu;

    A w[kW];
#pragma unroll
    for (int k = 0; k < kW; ++k) w[k] = A(conv_val(((const TW*)p.weight)[d * p.w_d + k * p.w_k]));
    const A bias = p.bias ? A(conv_val(((const TW*)p.bias)[d * p.bias_s])) : A(0);

    A pw[kW], pb = A(0);
#pragma unroll
    for (int k = 0; k < kW; ++k) pw[k] = A(0);

    for (int it = 0; it < kConvCFBwdIters; ++it) {
        const int64_t s_start = (grp * kConvCFBwdIters + it) * kSeg;
        if (s_start >= L) break;  // warp-uniform
        const int64_t t0 = s_start + lane * kItems;

        // xv: [kH halo | kItems own | kH next]; gv (dout): [kItems own | kH next]; sv like xv.
        A xv[kH + kItems + kH], gv[kItems + kH];
        int sv[kH + kItems + kH];
        conv_load_row<kItems>(xv + kH, x, t0, L, p.x_l, xvec);
        conv_load_row<kItems>(gv, dout, t0, L, p.dout_l, gvec);
        if (kSeq) conv_load_row<kItems>(sv + kH, seq, t0, L, p.seq_l, svec);
        // edge lanes: the previous lane's steps (lane 0) and the next lane's (lane 31)
        A hx[kH], nx[kH], ng[kH];
        int hs[kH], ns[kH];
#pragma unroll
        for (int j = 0; j < kH; ++j) {
            nx[j] = ng[j] = A(0);
            ns[j] = 0;
        }
        conv_load_prev_halo<kH, kSeq>(lane == 0, hx, hs, x, p.x_l, init, p.init_k, p.initial_states != nullptr,
                                      seq, p.seq_l, t0);
        if (lane == 31) {
#pragma unroll
            for (int j = 0; j < kH; ++j) {
                const int64_t t = t0 + kItems + j;
                if (t < L) {
                    nx[j] = A(conv_val(x[t * p.x_l]));
                    ng[j] = A(conv_val(dout[t * p.dout_l]));
                    if (kSeq) ns[j] = seq[t * p.seq_l];
                }
            }
        }
#pragma unroll
        for (int j = 0; j < kH; ++j) {
            const A up = conv_shfl_up(xv[kItems + j]);
            const A dn = conv_shfl_down(xv[kH + j]);
            const A gd = conv_shfl_down(gv[j]);
            xv[j] = lane == 0 ? hx[j] : up;
            xv[kH + kItems + j] = lane == 31 ? nx[j] : dn;
            gv[kItems + j] = lane == 31 ? ng[j] : gd;
            if (kSeq) {
                const int su = conv_shfl_up(sv[kItems + j]);
                const int sd = conv_shfl_down(sv[kH + j]);
                sv[j] = lane == 0 ? hs[j] : su;
                sv[kH + kItems + j] = lane == 31 ? ns[j] : sd;
            }
        }

        // dpre at positions q = 0 .. kItems+kH-1 (time t0 + q); the last kH are the next lane's
        // first steps, recomputed here (their dpre feeds this lane's dx).
        A dp[kItems + kH];
#pragma unroll
        for (int q = 0; q < kItems + kH; ++q)
            dp[q] = conv_dpre<kW, kSeq>(w, bias, xv + q, sv + q, kSeq ? sv[kH + q] : 0, gv[q], t0 + q < L, silu);
        if (t0 == 0 && p.dinitial_states) {
            // dinit[m] (time s = m - kH) = sum over positions q = s + j >= 0 of w[kW-1-j] * dp[q],
            // visible when seq(q) == seq(s) = seq(0); plus dfinal where the final state reaches.
            T* dinit_out = (T*)p.dinitial_states + b * p.dinit_b + d * p.dinit_d;
#pragma unroll
            for (int m = 0; m < kH; ++m) {
                A acc = A(0);
#pragma unroll
                for (int j = kH - m; j < kW; ++j) {
                    const int q = m - kH + j;
                    A g = dp[q];
                    if (kSeq) g = sv[kH + q] == sv[kH] ? g : A(0);
                    acc = conv_fma(w[kW - 1 - j], g, acc);
                }
                const int64_t t = m - kH;
                if (p.dfinal_states && t >= L - kH) acc += A(conv_val(dfin[(t - (L - kH)) * p.dfin_k]));
                dinit_out[m * p.dinit_k] = Convert<T>::from(acc);
            }
        }
#pragma unroll
        for (int q = 0; q < kItems; ++q) conv_accum<kW, kSeq>(pw, pb, dp[q], xv + q, sv + q, kSeq ? sv[kH + q] : 0);
        A dxo[kItems];
#pragma unroll
        for (int i = 0; i < kItems; ++i) dxo[i] = conv_dx<kW, kSeq>(w, dp + i, sv + kH + i, kSeq ? sv[kH + i] : 0);
        if (p.dfinal_states) {
#pragma unroll
            for (int i = 0; i < kItems; ++i) {
                const int64_t t = t0 + i;
                if (t >= L - kH && t < L) dxo[i] += A(conv_val(dfin[(t - (L - kH)) * p.dfin_k]));
            }
        }
        conv_store_row<kItems>(dx, t0, L, p.dx_l, dxvec, dxo);
    }

    // Warp reduction of the partials (fixed butterfly order), one write per (group, channel).
#pragma unroll
    for (int m = 16; m >= 1; m /= 2) {
#pragma unroll
        for (int k = 0; k < kW; ++k) pw[k] += conv_shfl_xor(pw[k], m);
        pb += conv_shfl_xor(pb, m);
    }
    if (lane == 0) {
        A* ws = (A*)p.partials + ((b * p.n_seg + grp) * p.dim + d) * (kW + 1);
#pragma unroll
        for (int k = 0; k < kW; ++k) ws[k] = pw[k];
        ws[kW] = pb;
    }
}

// ============================================================================================
// Backward, channel-last
// ============================================================================================

template <typename T, typename TW, int kW, bool kSeq>
__global__ void __launch_bounds__(32 * kConvCLWarps)
causal_conv1d_bwd_cl(const ConvBwdParams p) {
    typedef typename Acc<T>::type A;
    typedef typename ConvRaw<sizeof(T) * ConvTraits<T>::kBwdVec>::type Raw;
    constexpr int kVec = ConvTraits<T>::kBwdVec;
    constexpr int kSteps = ConvTraits<T>::kBwdSteps;
    constexpr int kH = kW - 1;
    constexpr int kSlice = kConvCLWarps * kSteps;      // time steps of one block iteration
    constexpr int kBytes = sizeof(T) * kVec;
    const int lane = threadIdx.x & 31;
    const int ty = threadIdx.x >> 5;
    const int64_t blk = blockIdx.x;
    const int64_t db = blk % p.n_dgroups;
    const int64_t rest = blk / p.n_dgroups;
    const int64_t tb = rest % p.n_seg;
    const int64_t b = rest / p.n_seg;
    const int64_t d0 = (db * 32 + lane) * kVec;
    const int64_t L = p.seqlen;
    // No early return: every thread reaches the barrier of the partial reduction below.
    const bool active = d0 < p.dim;
    const int nvalid = active ? (int)min((int64_t)kVec, p.dim - d0) : 0;

    A pw[kVec][kW], pb[kVec];
#pragma unroll
    for (int c = 0; c < kVec; ++c) {
        pb[c] = A(0);
#pragma unroll
        for (int k = 0; k < kW; ++k) pw[c][k] = A(0);
    }

    if (active) {
        A w[kVec][kW], bias[kVec];
#pragma unroll
        for (int c = 0; c < kVec; ++c) {
            const bool ok = c < nvalid;
#pragma unroll
            for (int k = 0; k < kW; ++k)
                w[c][k] = ok ? A(conv_val(((const TW*)p.weight)[(d0 + c) * p.w_d + k * p.w_k])) : A(0);
            bias[c] = ok && p.bias ? A(conv_val(((const TW*)p.bias)[(d0 + c) * p.bias_s])) : A(0);
        }
        const int32_t* seq = p.seq_idx + b * p.seq_b;
        const T* x = (const T*)p.x + b * p.x_b + d0 * p.x_d;
        const T* dout = (const T*)p.dout + b * p.dout_b + d0 * p.dout_d;
        T* dx = (T*)p.dx + b * p.dx_b + d0 * p.dx_d;
        const T* init = (const T*)p.initial_states + b * p.init_b + d0 * p.init_d;
        const T* dfin = (const T*)p.dfinal_states + b * p.dfin_b + d0 * p.dfin_d;
        T* dinit_out = (T*)p.dinitial_states + b * p.dinit_b + d0 * p.dinit_d;
        const bool gvec = p.dout_vec && nvalid == kVec && conv_aligned<kBytes>(dout) &&
                          ((p.dout_l * (int64_t)sizeof(T)) % kBytes) == 0;
        const bool silu = p.silu;

        for (int it = 0; it < kConvCLBwdIters; ++it) {
            const int64_t t0 = (tb * kConvCLBwdIters + it) * kSlice + ty * kSteps;
            if (t0 >= L) break;  // warp-uniform
            // x at times t0-kH .. t0+kSteps+kH-1, dout at t0 .. t0+kSteps+kH-1 (raw words)
            ConvPacked<T, kVec> xraw[kH + kSteps + kH], graw[kSteps + kH];
            int sv[kH + kSteps + kH];
            conv_stage_cl<kH + kSteps + kH, kH, kVec, kSeq>(xraw, sv, x, p.x_l, p.x_d, p.x_vec, init, p.init_k,
                                                           p.init_d, p.initial_states != nullptr, seq, p.seq_l,
                                                           t0, L, nvalid);
            if (gvec && t0 + kSteps + kH <= L) {
                const T* pg = dout + t0 * p.dout_l;
#pragma unroll
                for (int q = 0; q < kSteps + kH; ++q) graw[q].raw = *reinterpret_cast<const Raw*>(pg + q * p.dout_l);
            } else {
#pragma unroll
                for (int q = 0; q < kSteps + kH; ++q) {
                    const int64_t t = t0 + q;
                    if (t < L) conv_load_chans_raw(graw[q], dout + t * p.dout_l, p.dout_d, nvalid, gvec);
                    else conv_zero_raw(graw[q]);
                }
            }

            // Slide over positions q = 0..kSteps+kH-1 (time t0+q): dpre[q] needs the kW inputs
            // ending at q; dx at i = q - kH needs dpre[i .. q]. Both windows live in registers;
            // dx is stored as soon as it is complete.
            const bool first = t0 == 0;
            A xw[kW][kVec], dw[kW][kVec], dinit[kH][kVec];
#pragma unroll
            for (int k = 0; k < kW; ++k) {
#pragma unroll
                for (int c = 0; c < kVec; ++c) xw[k][c] = dw[k][c] = A(0);
            }
#pragma unroll
            for (int m = 0; m < kH; ++m) {
#pragma unroll
                for (int c = 0; c < kVec; ++c) dinit[m][c] = A(0);
            }
#pragma unroll
            for (int u = 0; u < kH; ++u) {  // the halo: times t0-kH .. t0-1
#pragma unroll
                for (int c = 0; c < kVec; ++c) xw[u + 1][c] = A(conv_val(xraw[u].v[c]));
            }
#pragma unroll
            for (int q = 0; q < kSteps + kH; ++q) {
#pragma unroll
                for (int k = 0; k + 1 < kW; ++k) {
#pragma unroll
                    for (int c = 0; c < kVec; ++c) {
                        xw[k][c] = xw[k + 1][c];
                        dw[k][c] = dw[k + 1][c];
                    }
                }
                const int* ss = sv + q;          // seq ids of the window ending at q
                const int s_t = kSeq ? sv[kH + q] : 0;
#pragma unroll
                for (int c = 0; c < kVec; ++c) {
                    xw[kW - 1][c] = A(conv_val(xraw[kH + q].v[c]));
                    A xs[kW];
#pragma unroll
                    for (int k = 0; k < kW; ++k) xs[k] = xw[k][c];
                    const A dp = conv_dpre<kW, kSeq>(w[c], bias[c], xs, ss, s_t, A(conv_val(graw[q].v[c])),
                                                     t0 + q < L, silu);
                    if (q < kSteps) conv_accum<kW, kSeq>(pw[c], pb[c], dp, xs, ss, s_t);
                    dw[kW - 1][c] = dp;
                    if (q < kH && first) {
                        // dinit[m] (time m - kH) gets w[m - q] * dpre[q] for q <= m, if seq(q) == seq(0)
                        const A g = (!kSeq || s_t == sv[kH]) ? dp : A(0);
#pragma unroll
                        for (int m = q; m < kH; ++m) dinit[m][c] = conv_fma(w[c][m - q], g, dinit[m][c]);
                    }
                }
                if (q >= kH) {
                    const int i = q - kH;
                    const int64_t t = t0 + i;
                    if (t < L) {
                        A o[kVec];
#pragma unroll
                        for (int c = 0; c < kVec; ++c) {
                            A dps[kW];
#pragma unroll
                            for (int k = 0; k < kW; ++k) dps[k] = dw[k][c];
                            o[c] = conv_dx<kW, kSeq>(w[c], dps, sv + kH + i, kSeq ? sv[kH + i] : 0);
                        }
                        if (p.dfinal_states && t >= L - kH) {
                            A f[kVec];
                            conv_load_chans<kVec>(f, dfin + (t - (L - kH)) * p.dfin_k, p.dfin_d, nvalid);
#pragma unroll
                            for (int c = 0; c < kVec; ++c) o[c] += f[c];
                        }
                        conv_store_chans<kVec>(dx + t * p.dx_l, p.dx_d, nvalid, p.dx_vec, o);
                    }
                }
            }
            if (first && p.dinitial_states) {
#pragma unroll
                for (int m = 0; m < kH; ++m) {
                    const int64_t t = m - kH;
                    if (p.dfinal_states && t >= L - kH) {
                        A f[kVec];
                        conv_load_chans<kVec>(f, dfin + (t - (L - kH)) * p.dfin_k, p.dfin_d, nvalid);
#pragma unroll
                        for (int c = 0; c < kVec; ++c) dinit[m][c] += f[c];
                    }
                    conv_store_chans<kVec>(dinit_out + m * p.dinit_k, p.dinit_d, nvalid, false, dinit[m]);
                }
            }
        }
    }

    // Block reduction over the warps (same channels, different time slices), fixed order.
    __shared__ A red[kConvCLWarps][kW + 1][32 * kVec];
#pragma unroll
    for (int c = 0; c < kVec; ++c) {
#pragma unroll
        for (int k = 0; k < kW; ++k) red[ty][k][lane * kVec + c] = pw[c][k];
        red[ty][kW][lane * kVec + c] = pb[c];
    }
    __syncthreads();
    if (ty == 0 && active) {
#pragma unroll
        for (int c = 0; c < kVec; ++c) {
            if (c < nvalid) {
                A* ws = (A*)p.partials + ((b * p.n_seg + tb) * p.dim + d0 + c) * (kW + 1);
#pragma unroll
                for (int k = 0; k <= kW; ++k) {
                    A s = red[0][k][lane * kVec + c];
#pragma unroll
                    for (int y = 1; y < kConvCLWarps; ++y) s += red[y][k][lane * kVec + c];
                    ws[k] = s;
                }
            }
        }
    }
}

// ============================================================================================
// Backward, second pass: dweight[d, k], dbias[d] = sum over the P partials, in index order.
// One thread per (d, k); reads of consecutive threads are consecutive (coalesced).
// ============================================================================================

template <typename TW>
__global__ void __launch_bounds__(kConvReduceThreads)
causal_conv1d_bwd_reduce(const ConvReduceParams p) {
    typedef typename Acc<TW>::type A;
    const int64_t n = p.dim * (p.width + 1);
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const A* ws = (const A*)p.partials;
    A s = A(0);
    for (int64_t j = 0; j < p.n_partials; ++j) s += ws[j * n + i];
    const int64_t d = i / (p.width + 1);
    const int k = (int)(i % (p.width + 1));
    if (k < p.width) ((TW*)p.dweight)[d * p.w_d + k * p.w_k] = Convert<TW>::from(s);
    else if (p.dbias) ((TW*)p.dbias)[d * p.bias_s] = Convert<TW>::from(s);
}

// ============================================================================================
// Decode update
// ============================================================================================

__device__ __forceinline__ int64_t conv_mod(int64_t a, int64_t n) {
    int64_t r = a % n;
    return r < 0 ? r + n : r;
}

// T: x/out, TS: conv_state, TW: weight/bias. Width is a runtime value (<= 8): the call is
// launch-bound, one variant serves every width. The window is right-aligned in kMaxWidth-1
// registers (win[kMaxWidth-2] = the step just before the current token).
template <typename T, typename TS, typename TW>
__global__ void __launch_bounds__(kConvUpdateThreads)
causal_conv1d_update(const ConvUpdateParams p) {
    typedef typename Acc<T>::type A;
    constexpr int kM = kConvMaxWidth;
    const int64_t blk = blockIdx.x;
    const int64_t b = blk / p.n_dblocks;
    const int64_t d = (blk % p.n_dblocks) * kConvUpdateThreads + threadIdx.x;
    if (d >= p.dim) return;
    const int W = p.width;
    const int64_t S = p.state_len;
    const int64_t n = p.new_len;
    const T* x = (const T*)p.x + b * p.x_b + d * p.x_d;
    T* out = (T*)p.out + b * p.out_b + d * p.out_d;
    // Loads that do not depend on the pool row first, so that they overlap the index load.
    const int64_t row = p.state_indices ? (int64_t)p.state_indices[b * p.idx_s] : b;
    // wr[m]: weight of the input m - (kM-1) steps before the current token (right-aligned).
    A wr[kM], win[kM - 1];
#pragma unroll
    for (int m = 0; m < kM; ++m) {
        const int k = m - (kM - W);
        wr[m] = k >= 0 ? A(conv_val(((const TW*)p.weight)[d * p.w_d + k * p.w_k])) : A(0);
    }
    const A bias = p.bias ? A(conv_val(((const TW*)p.bias)[d * p.bias_s])) : A(0);
    const int64_t start = p.cache_seqlens ? (int64_t)p.cache_seqlens[b * p.csl_s] : 0;
    const A x0 = A(conv_val(x[0]));
    if (row < 0) {  // padding row: state untouched, output zeros
        for (int64_t t = 0; t < n; ++t) out[t * p.out_l] = Convert<T>::from(A(0));
        return;
    }
    TS* st = (TS*)p.conv_state + row * p.st_b + d * p.st_d;

#pragma unroll
    for (int m = 0; m < kM - 1; ++m) {
        const int j = kM - 1 - m;  // steps back
        A v = A(0);
        if (j <= W - 1) {
            const int64_t pos = p.cache_seqlens ? conv_mod(start - j, S) : S - j;
            v = A(conv_val(st[pos * p.st_s]));
        }
        win[m] = v;
    }
    for (int64_t t = 0; t < n; ++t) {
        const A xt = t == 0 ? x0 : A(conv_val(x[t * p.x_l]));
        A acc = conv_fma(wr[kM - 1], xt, bias);
#pragma unroll
        for (int m = 0; m < kM - 1; ++m)
            if (m >= kM - W) acc = conv_fma(wr[m], win[m], acc);
        if (p.silu) acc = conv_silu(acc);
        out[t * p.out_l] = Convert<T>::from(acc);
#pragma unroll
        for (int m = 0; m < kM - 2; ++m) win[m] = win[m + 1];
        win[kM - 2] = xt;
    }
    if (p.cache_seqlens) {
        // ring buffer: token t lands at (start + t) % S; a later token overwrites an earlier one
        for (int64_t t = 0; t < n; ++t)
            st[conv_mod(start + t, S) * p.st_s] = Convert<TS>::from(A(conv_val(x[t * p.x_l])));
    } else {
        // shift register: state = last S steps of concat(state, x). Ascending i reads index
        // i + n before anything at or above it is written.
        for (int64_t i = 0; i < S; ++i) {
            const int64_t src = i + n;
            if (src < S) st[i * p.st_s] = st[src * p.st_s];
            else st[i * p.st_s] = Convert<TS>::from(A(conv_val(x[(src - S) * p.x_l])));
        }
    }
}

}  // namespace ssm
