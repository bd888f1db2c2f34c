// selective_state_update.cu: one decode step of the Mamba selective SSM, in place on the state.
//
// Head form (Mamba-1 is H = 1, P = D, G = 1; the host normalizes the shapes and strides):
//   state (pool, H, P, N), x dt z out (B, H, P), A (H, P, N), B C (B, G, N), D dt_bias (H, P)
//   dt' = dt + dt_bias; dt' = softplus(dt') if dt_softplus
//   state = state * exp(A dt') + B (dt' x)         (in place, state row = indices[b] or b)
//   out   = sum_n state C + D x;  out *= silu(z)   (out = 0 for a padding row, index < 0)
//
// Grid: 1-D. A "group" of `lanes` consecutive lanes (a power of two <= 32, so groups never
// straddle a warp) owns one tile = kRows consecutive p of one (b, h). Within the group, lane i
// owns state elements n = (c * lanes + i) * kVec + [0, kVec) for chunks c < n_chunks: one
// 16-byte load/store of state per row and chunk when the host proves alignment (vec_state),
// else strided scalar accesses with n < N masks. sum_n is reduced over the group with xor
// shuffles. Block = 32..128 threads, chosen by the host so that small batches still spread
// over every SM.
//
// No thread returns early: every lane of every warp reaches the shuffles with the full mask;
// out-of-range groups/rows only switch their loads and stores off.
//
// kTie (Mamba-2 fast path): A, dt and dt_bias are constant along P (stride 0, as Mamba-2
// passes them through expand): dt' and exp(A dt') are computed once per (b, h, n) and shared by
// the tile's kRows rows, instead of once per (p, n).
//
// Dtypes (each argument is read in its own storage type; all math in fp32, fp64 for fp64 x):
//   TState  state (read and written)           fp32 / fp16 / bf16       (fp64 with fp64 x)
//   TIn     x, dt, z, out                      fp32 / fp16 / bf16 / fp64
//   TBC     B, C                               TIn or fp32               (fp64 with fp64 x)
//   A                                          fp32                      (fp64 with fp64 x)
//   D, dt_bias: per-channel scalars read once per row, each in its own type chosen per call
//   (D_type / bias_type, one of the kScalar* codes): upstream models pass them in the model
//   dtype (Mamba-1 step: bf16 D and dt_bias) or one of each (transformers' Mamba: bf16 D with
//   an fp32 dt_bias), and a template parameter per argument would quadruple the variants for a
//   load that happens once per row, not once per state element.
#include "scan.cuh"

namespace ssm {

struct SelectiveStateUpdateParams {
    void* state;           // (pool, H, P, N) TState, updated in place
    const void* x;         // (B, H, P) TIn
    const void* dt;        // (B, H, P) TIn
    const void* A;         // (H, P, N) fp32 (fp64 with fp64 x)
    const void* B;         // (B, G, N) TBC
    const void* C;         // (B, G, N) TBC
    const void* D;         // (H, P) D_type, or null
    const void* z;         // (B, H, P) TIn, or null
    const void* dt_bias;   // (H, P) bias_type, or null
    const void* indices;   // (B,) int32/int64, or null (state row b)
    void* out;             // (B, H, P) TIn
    int64_t batch, heads, headdim, dstate;
    int64_t heads_per_group;  // H / G
    int64_t pool;             // state rows; an index outside [0, pool) is a padding row
    int64_t tiles_per_head;   // ceil(P / kRows)
    int64_t total_groups;     // batch * heads * tiles_per_head
    int64_t state_b, state_h, state_p, state_n;
    int64_t x_b, x_h, x_p;
    int64_t dt_b, dt_h, dt_p;
    int64_t z_b, z_h, z_p;
    int64_t out_b, out_h, out_p;
    int64_t A_h, A_p, A_n;
    int64_t B_b, B_g, B_n;
    int64_t C_b, C_g, C_n;
    int64_t D_h, D_p;
    int64_t bias_h, bias_p;
    int64_t idx_stride;
    int32_t lanes;          // group size, power of two in [1, 32]
    int32_t n_chunks;       // ceil(N / (lanes * kVec))
    int32_t dt_softplus;
    int32_t idx_is_int64;
    int32_t vec_state;      // 1: state chunks are 16-byte aligned with unit stride along N
    int32_t vec_A;          // 1: A chunks aligned (min(16, kVec * 4 or 8) bytes), unit stride
    int32_t vec_B;          // 1: B chunks aligned (min(16, kVec * sizeof(TBC))), unit stride
    int32_t vec_C;
    int32_t D_type;         // storage type of D: a kScalar* code (0 when D is null)
    int32_t bias_type;      // storage type of dt_bias: a kScalar* code (0 when null)
};

// Storage type codes of D and dt_bias (mirrored by SCALAR_CODE in the host code).
constexpr int kScalarF32 = 0, kScalarBf16 = 1, kScalarF16 = 2, kScalarF64 = 3;

// Element i of a per-channel array stored as `type`, in the compute type R. The host sends
// kScalarF64 only to the fp64 instantiations (R = double), so fp32 variants carry no fp64 load.
template <typename R>
__device__ __forceinline__ R load_scalar(const void* base, int64_t i, int type) {
    if (type == kScalarBf16) return (R)to_float(((const bf16*)base)[i]);
    if (type == kScalarF16) return (R)to_float(((const f16*)base)[i]);
    if constexpr (IsSame<R, double>::value) {
        if (type == kScalarF64) return ((const double*)base)[i];
    }
    return (R)((const float*)base)[i];
}

__device__ __forceinline__ const void* scalar_addr(const void* base, int64_t i, int type) {
    const int bytes = type == kScalarF32 ? 4 : (type == kScalarF64 ? 8 : 2);
    return (const char*)base + i * bytes;
}

// Type of A: fp32, fp64 with fp64 inputs.
template <typename TIn> struct WeightOf { typedef float type; };
template <> struct WeightOf<double> { typedef double type; };

// exp(a * dt) as exp2 with dt pre-scaled by log2(e) once per row (one SFU op per element);
// fp64 uses the accurate exp (tests compare fp64 at 1e-10).
template <typename R> struct Exp;
template <> struct Exp<float> {
    __device__ __forceinline__ static float scale(float dt) { return dt * kLog2e; }
    __device__ __forceinline__ static float of(float a, float scaled_dt) { return exp2_fast(a * scaled_dt); }
};
template <> struct Exp<double> {
    __device__ __forceinline__ static double scale(double dt) { return dt; }
    __device__ __forceinline__ static double of(double a, double dt) { return exp(a * dt); }
};

template <typename TState, typename TIn, int kTie>
struct SsuTraits {
    typedef typename Acc<TIn>::type acc_t;
    typedef typename WeightOf<TIn>::type w_t;
    // One 16-byte state access per row and chunk (4 fp32, 8 fp16/bf16, 2 fp64): the widest
    // load; N = 16 fp32 is then 4 lanes per row. Mirrored by VEC_ELEMS in the host code.
    static constexpr int kVec = 16 / (int)sizeof(TState);
    // Rows (consecutive p) per group = independent 16-byte state loads in flight per thread.
    // fp32 state: 4 (96 registers on sm_90, 5 blocks of 128 per SM: 40 KB of state loads in
    // flight per SM, above the ~30 KB that 4.3 TB/s x ~0.8 us needs); 2 rows would allow 7
    // blocks at 72 registers but only 28 KB. 16-bit state: 2 (80 registers; 4 rows took 128).
    // The tied path shares dt' and exp(A dt') over its rows: 4. Batch 1 (D = 5120, N = 16,
    // 4 rows: 1280 groups of 4 lanes) still gives 160 one-warp blocks for 132 SMs.
    // Mirrored by rows_per_group() in the host code.
    static constexpr int kRows = (kTie || sizeof(TState) == 4) ? 4 : 2;
};

// Host-chosen block sizes never exceed this (see the host's block table).
constexpr int kMaxThreads = 128;

// ---- vector access ------------------------------------------------------------------------
// Explicit PTX vector accesses: a 16-byte struct copy is not always emitted as one
// st.global.v4 (it was split into four 4-byte stores), so the width is spelled out here.
__device__ __forceinline__ void ld_global_16(const void* p, uint32_t (&w)[4]) {
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p));
}
__device__ __forceinline__ void ld_global_8(const void* p, uint32_t (&w)[2]) {
    asm volatile("ld.global.v2.u32 {%0, %1}, [%2];" : "=r"(w[0]), "=r"(w[1]) : "l"(p));
}
__device__ __forceinline__ void st_global_16(void* p, const uint32_t (&w)[4]) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};"
                 :: "l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3]) : "memory");
}

__device__ __forceinline__ void prefetch_l1(const void* p) {
    asm volatile("prefetch.global.L1 [%0];" :: "l"(p));
}

// K elements of T at p, which the host proved aligned to min(16, K * sizeof(T)) bytes.
template <typename T, int K>
__device__ __forceinline__ void load_vec(const T* p, T (&v)[K]) {
    constexpr int kBytes = K * (int)sizeof(T);
    if constexpr (kBytes % 16 == 0) {
        union { uint32_t w[kBytes / 4]; T e[K]; } u;
#pragma unroll
        for (int i = 0; i < kBytes / 16; ++i) {
            uint32_t w[4];
            ld_global_16((const char*)p + 16 * i, w);
#pragma unroll
            for (int k = 0; k < 4; ++k) u.w[4 * i + k] = w[k];
        }
#pragma unroll
        for (int i = 0; i < K; ++i) v[i] = u.e[i];
    } else {
        static_assert(kBytes == 8, "vector accesses are 8 or 16k bytes");
        union { uint32_t w[2]; T e[K]; } u;
        ld_global_8(p, u.w);
#pragma unroll
        for (int i = 0; i < K; ++i) v[i] = u.e[i];
    }
}

template <typename T, int K>
__device__ __forceinline__ void store_vec(T* p, const T (&v)[K]) {
    constexpr int kBytes = K * (int)sizeof(T);
    static_assert(kBytes == 16, "state chunks are 16 bytes");
    union { uint32_t w[4]; T e[K]; } u;
#pragma unroll
    for (int i = 0; i < K; ++i) u.e[i] = v[i];
    st_global_16(p, u.w);
}

// K elements of T at p + i * stride (all in range), converted to the compute type R. `vec`:
// one wide load (the host proved the alignment), else K element loads.
template <typename T, int K, typename R>
__device__ __forceinline__ void load_chunk(const T* p, int64_t stride, bool vec, R (&v)[K]) {
    T raw[K];
    if (vec) {
        load_vec<T, K>(p, raw);
    } else {
#pragma unroll
        for (int i = 0; i < K; ++i) raw[i] = p[i * stride];
    }
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] = (R)to_acc(raw[i]);
}

// ---- the kernel -----------------------------------------------------------------------------
template <typename TState, typename TIn, typename TBC, int kTie>
__global__ void __launch_bounds__(kMaxThreads) selective_state_update(const SelectiveStateUpdateParams p) {
    typedef SsuTraits<TState, TIn, kTie> Tr;
    typedef typename Tr::acc_t R;
    typedef typename Tr::w_t W;
    constexpr int kVec = Tr::kVec;
    constexpr int kRows = Tr::kRows;

    // -- thread -> (group, b, h, tile) -----------------------------------------------------
    const int lanes = p.lanes;
    const int lig = (int)threadIdx.x & (lanes - 1);  // lane within the group
    const int64_t gid = (int64_t)blockIdx.x * (blockDim.x / lanes) + threadIdx.x / lanes;
    const bool group_ok = gid < p.total_groups;
    const int64_t g = group_ok ? gid : 0;  // keep the index math in range for idle groups
    const int64_t bh = g / p.tiles_per_head;
    const int64_t tile = g - bh * p.tiles_per_head;
    const int64_t b = bh / p.heads;
    const int64_t h = bh - b * p.heads;
    const int64_t grp = h / p.heads_per_group;
    const int64_t p0 = tile * kRows;
    const int64_t N = p.dstate;
    // Rows of this tile inside P (all kRows but in the last tile of a head); 0 for idle groups.
    const int nrows = group_ok ? (int)min((int64_t)kRows, p.headdim - p0) : 0;

    // -- state row (a padding row is neither read nor written) --------------------------------
    int64_t srow = b;
    if (p.indices != nullptr && group_ok) {
        srow = p.idx_is_int64 ? ((const int64_t*)p.indices)[b * p.idx_stride]
                              : (int64_t)((const int32_t*)p.indices)[b * p.idx_stride];
    }
    const bool live = group_ok && srow >= 0 && srow < p.pool;

    // -- per-row scalars: dt' x and dt' (scaled for exp2) -------------------------------------
    const TIn* xs = (const TIn*)p.x + b * p.x_b + h * p.x_h;
    const TIn* dts = (const TIn*)p.dt + b * p.dt_b + h * p.dt_h;
    const TIn* zs = (const TIn*)p.z;
    const void* Ds = p.D;
    const void* biases = p.dt_bias;
    auto dt_eff = [&](int64_t pp) -> R {
        R d = to_acc(dts[pp * p.dt_p]);
        if (biases != nullptr) d += load_scalar<R>(biases, h * p.bias_h + pp * p.bias_p, p.bias_type);
        if (p.dt_softplus) d = softplus_fast(d);  // SFU versions (~2 ulp); fp64: accurate
        return d;
    };
    R dtx[kRows], dtl[kRows], acc[kRows];
#pragma unroll
    for (int j = 0; j < kRows; ++j) { dtx[j] = R(0); dtl[j] = R(0); acc[j] = R(0); }
    auto row_scalars = [&]() {
        R dt_tied = R(0);
        if (kTie && nrows > 0) dt_tied = dt_eff(p0);
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
            const int64_t pp = p0 + j;
            if (j < nrows) {
                const R xv = to_acc(xs[pp * p.x_p]);
                // z and D are needed only by the epilogue: pull them into L1 now, without
                // holding registers across the state loop.
                if ((j & (lanes - 1)) == lig) {  // the lane that writes row j's output
                    if (zs != nullptr) prefetch_l1(zs + b * p.z_b + h * p.z_h + pp * p.z_p);
                    if (Ds != nullptr) prefetch_l1(scalar_addr(Ds, h * p.D_h + pp * p.D_p, p.D_type));
                }
                const R d = kTie ? dt_tied : dt_eff(pp);
                dtx[j] = d * xv;
                dtl[j] = Exp<R>::scale(d);
            }
        }
    };

    // -- state: new = s * exp(A dt') + B dt' x; acc += new * C ---------------------------------
    TState* st = (TState*)p.state + srow * p.state_b + h * p.state_h + p0 * p.state_p;
    if (live && p.vec_state) {
        // Start the first state chunk's trip from memory before the dt -> softplus chain (at
        // batch 1 the step is a chain of dependent latencies); prefetches hold no registers,
        // unlike loads issued this early (which took the fp32 variant from 96 to 150).
        const int64_t n0 = (int64_t)lig * kVec;
        if (n0 < N) {
#pragma unroll
            for (int j = 0; j < kRows; ++j)
                if (j < nrows) prefetch_l1(st + j * p.state_p + n0);
        }
    }
    row_scalars();

    if (live) {  // uniform within the group; no shuffles inside
        const W* As = (const W*)p.A + h * p.A_h + p0 * p.A_p;
        const TBC* Bs = (const TBC*)p.B + b * p.B_b + grp * p.B_g;
        const TBC* Cs = (const TBC*)p.C + b * p.C_b + grp * p.C_g;
        if (p.vec_state) {
            // Fast path: N % kVec == 0, one 16-byte state access per row and chunk. All loads of
            // a chunk are issued before the first use.
            const bool vec_A = p.vec_A != 0, vec_B = p.vec_B != 0, vec_C = p.vec_C != 0;
            for (int c = 0; c < p.n_chunks; ++c) {
                const int64_t n0 = ((int64_t)c * lanes + lig) * kVec;
                if (n0 >= N) break;
                TState s_raw[kRows][kVec];
#pragma unroll
                for (int j = 0; j < kRows; ++j)
                    if (j < nrows) load_vec<TState, kVec>(st + j * p.state_p + n0, s_raw[j]);
                R Bv[kVec], Cv[kVec];
                load_chunk<TBC, kVec, R>(Bs + n0 * p.B_n, p.B_n, vec_B, Bv);
                load_chunk<TBC, kVec, R>(Cs + n0 * p.C_n, p.C_n, vec_C, Cv);
                R a[kTie ? 1 : kRows][kVec];
#pragma unroll
                for (int j = 0; j < (kTie ? 1 : kRows); ++j)
                    if (j < nrows) load_chunk<W, kVec, R>(As + j * p.A_p + n0 * p.A_n, p.A_n, vec_A, a[j]);
                if (kTie) {
#pragma unroll
                    for (int i = 0; i < kVec; ++i) a[0][i] = Exp<R>::of(a[0][i], dtl[0]);
                }
#pragma unroll
                for (int j = 0; j < kRows; ++j) {
                    if (j >= nrows) continue;
                    TState s_new[kVec];
#pragma unroll
                    for (int i = 0; i < kVec; ++i) {
                        const R dA = kTie ? a[0][i] : Exp<R>::of(a[kTie ? 0 : j][i], dtl[j]);
                        const R sn = (R)to_acc(s_raw[j][i]) * dA + Bv[i] * dtx[j];
                        s_new[i] = Convert<TState>::from(sn);
                        acc[j] += sn * Cv[i];
                    }
                    store_vec<TState, kVec>(st + j * p.state_p + n0, s_new);
                }
            }
        } else {
            // General strides or N % kVec != 0: one element at a time (correctness path).
            for (int c = 0; c < p.n_chunks; ++c) {
                const int64_t n0 = ((int64_t)c * lanes + lig) * kVec;
#pragma unroll 1
                for (int i = 0; i < kVec; ++i) {
                    const int64_t n = n0 + i;
                    if (n >= N) break;
                    const R Bn = to_acc(Bs[n * p.B_n]);
                    const R Cn = to_acc(Cs[n * p.C_n]);
                    R dA_tied = R(0);
                    if (kTie) dA_tied = Exp<R>::of((R)As[n * p.A_n], dtl[0]);
#pragma unroll
                    for (int j = 0; j < kRows; ++j) {
                        if (j >= nrows) continue;
                        TState* sp = st + j * p.state_p + n * p.state_n;
                        const R dA = kTie ? dA_tied : Exp<R>::of((R)As[j * p.A_p + n * p.A_n], dtl[j]);
                        const R sn = (R)to_acc(*sp) * dA + Bn * dtx[j];
                        *sp = Convert<TState>::from(sn);
                        acc[j] += sn * Cn;
                    }
                }
            }
        }
    }

    // -- sum over the group's lanes (every lane of the warp takes part) ----------------------
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
        for (int m = lanes >> 1; m > 0; m >>= 1) acc[j] += shfl_xor(acc[j], m);
    }

    // -- output: (sum_n state C + D x) silu(z), 0 for padding rows ----------------------------
    // After the xor reduction every lane of the group holds every row's sum: lane j % lanes
    // writes row j, so the epilogue runs on up to kRows lanes in parallel.
    {
        TIn* outs = (TIn*)p.out + b * p.out_b + h * p.out_h;
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
            if (j >= nrows || (j & (lanes - 1)) != lig) continue;
            const int64_t pp = p0 + j;
            R o = R(0);
            if (live) {
                o = acc[j];
                if (Ds != nullptr) o += load_scalar<R>(Ds, h * p.D_h + pp * p.D_p, p.D_type) * (R)to_acc(xs[pp * p.x_p]);
                if (zs != nullptr) o *= silu_fast((R)to_acc(zs[b * p.z_b + h * p.z_h + pp * p.z_p]));
            }
            outs[(p0 + j) * p.out_p] = Convert<TIn>::from(o);
        }
    }
}

}  // namespace ssm
