// selective_scan_fwd.cu: the selective-scan forward.
//
//   delta' = softplus?(delta + delta_bias);  h_t = exp(delta'_t A) h_{t-1} + delta'_t B_t u_t
//   y_t = sum_n C_t[n] h_t[n]  (2 Re(...) for complex A);  out = (y + D u) * silu(z)?
//
// Grid mapping: one warp per channel d; a block holds `warps` channels of one (batch, group),
// so the warps of a block read the same variable B/C rows at about the same time and all but
// the first hit L1 (upstream re-reads all of B/C from L2 per channel). blockIdx.x ->
// (b, g, channel block). Each lane owns kItems consecutive steps of a chunk of 32*kItems
// steps. Per state n: every lane folds its steps into one affine map, a warp scan composes
// the lanes' maps, and the lane replays its steps from its entry state, accumulating y. One
// exp2 per (b, d, l, n): the op's floor. The warp's carry between chunks lives in shared
// memory (N values per warp).
//
// The kernel is instruction-bound, so full chunks of aligned, unit-stride data take a path
// without bounds checks or scalar fallbacks (kFast); the host decides alignment once.
//
// History (b8 d1536 l2048 n16 bf16, H200): B/C tiles staged in shared memory 0.89 ms
// (serialized tile fills); direct L1 loads 0.90 ms (ncu: IPC 2.8, instruction-bound:
// ~37 instructions per (l, n) and ~300 per step for the epilogue with accurate expf/log1pf).
//
// For the backward the forward saves the state every kSaveEvery steps: (B, D, ceil(L/256), N),
// so the backward recomputes within 256-step chunks instead of storing (B, D, L, N).
#include "selective_scan_common.cuh"

namespace ssm {

constexpr int kSaveEvery = 256;      // = the backward's chunk (32 lanes x 8 items)

// Real fp32-state variants: 2 blocks of 8 warps per SM (registers capped at 128).
// Complex and fp64 state take 1 (capping them spills).
template <typename W> struct FwdMinBlocks { static constexpr int value = 2; };
template <> struct FwdMinBlocks<double> { static constexpr int value = 1; };
template <typename R> struct FwdMinBlocks<complex<R>> { static constexpr int value = 1; };

// Everything a warp needs for its channel, set up once.
template <typename In, typename W> struct FwdWarp {
    typedef typename RealOf<W>::type R;
    typedef typename VarBC<In, W>::type BCs;
    const In *u, *dl, *z;
    In* out;
    In* ysave;                // un-gated output for the backward, or null
    const W* A;
    const BCs *Bg, *Cg;       // variable: this (b, g)
    const W *Bc, *Cc;         // constant: this channel
    W* carry;
    W* saved;                 // this (b, d)'s saved states, or null
    R Dv, bias;
};

template <bool kFast, typename In, typename W, bool kVarB, bool kVarC, int T>
__device__ __forceinline__ void fwd_chunk(const SelectiveScanParams& p, const FwdWarp<In, W>& w,
                                          int64_t c0, int lane, int warp, int warps) {
    typedef W S;
    typedef typename RealOf<W>::type R;
    typedef typename VarBC<In, W>::type BCs;
    // Prefetching state n+1's B/C rows during state n costs 4 * kItems * sizeof(BCs) / 4
    // registers; with 16 items it spills, so it is used with 8.
    constexpr bool kPrefetch = T <= 8;
    const int64_t N = p.dstate, L = p.seqlen;
    const int64_t t0 = c0 + lane * T;
    R u[T], dl[T], dlu[T], y[T];
    R sum_dl = 0;
    if (sizeof(In) == 2) {
        // Toward L2: this chunk's z and B/C rows (read later in this chunk: z at the end, B/C
        // state by state) and the next chunk's rows, where rows have unit stride. A/B, bf16
        // selective_scan call: b1 d5120 l8192 0.83 -> 0.71 ms, b8 d1536 l2048 0.402 -> 0.371,
        // b16 d1536 l512 0.210 -> 0.200, b4 d4096 l2048 0.52 -> 0.47 (next chunk only: -10% at
        // l8192, +2-8% at l2048). fp32 measured 3-7% slower with it (more spills): off.
        const int64_t tn = t0 + 32 * T;
        const In* z = (kFast || p.z_l == 1) ? w.z : nullptr;
        prefetch_l2<In, T>(z, t0, L);
        prefetch_bc_l2<BCs, T>(w.Bg, w.Cg, p, t0, warp, warps, kVarB, kVarC);
        prefetch_l2<In, T>((kFast || p.u_l == 1) ? w.u : nullptr, tn, L);
        prefetch_l2<In, T>((kFast || p.delta_l == 1) ? w.dl : nullptr, tn, L);
        prefetch_l2<In, T>(z, tn, L);
        prefetch_bc_l2<BCs, T>(w.Bg, w.Cg, p, tn, warp, warps, kVarB, kVarC);
    }
    load_steps<kFast>(w.u, p.u_l, t0, L, u);
    load_steps<kFast>(w.dl, p.delta_l, t0, L, dl);
#pragma unroll
    for (int i = 0; i < T; ++i) {
        R v = dl[i] + w.bias;
        v = p.delta_softplus ? softplus_fast(v) : v;
        dl[i] = (kFast || t0 + i < L) ? v : R(0);   // steps past L are the identity map
        dlu[i] = dl[i] * u[i];
        y[i] = w.Dv * u[i];                         // the skip term first: u is then dead
        sum_dl += dl[i];
    }
    // With 8 items, state n+1's B/C rows load while state n computes; with 16 (no prefetch), at
    // the end of state n. fp32 B/C (16 registers a row at 16 items) go further: C loads only
    // after the first pass over the steps, its latency behind the warp scan, so B and C are never
    // live together. A/B at b1 d5120 l8192 and b8 d1536 l2048 n16 (selective_scan_fwd call):
    // fp32 1.457 -> 1.334 and 0.795 -> 0.733 ms; the same for bf16 was 15-25% slower.
    constexpr bool kLateC = !kPrefetch && sizeof(BCs) == 4;
    const BCs* bp = w.Bg;
    const BCs* cp = w.Cg;
    Vec<BCs, T> nb, nc;
    if (kVarB) load_vec<kFast>(bp, p.B_l, t0, L, nb);
    if (!kLateC && kVarC) load_vec<kFast>(cp, p.C_l, t0, L, nc);
    for (int64_t n = 0; n < N; ++n) {
        const Vec<BCs, T> vb = nb;
        Vec<BCs, T> vc = nc;
        if (kPrefetch && n + 1 < N) {
            bp += p.B_n;
            cp += p.C_n;
            if (kVarB) load_vec<kFast>(bp, p.B_l, t0, L, nb);
            if (kVarC) load_vec<kFast>(cp, p.C_l, t0, L, nc);
        }
        const S A2 = prescale(w.A[n * p.A_n]);
        const S bconst = kVarB ? S(0) : w.Bc[n * p.B_n];
        S dA[T], bu[T];
        S bt = S(0);
#pragma unroll
        for (int i = 0; i < T; ++i) {
            dA[i] = gate(dl[i], A2);
            bu[i] = (kVarB ? Ld<S>::from(vb.e[i]) : bconst) * dlu[i];
            bt = dA[i] * bt + bu[i];
        }
        if (kLateC && kVarC) {
            load_vec<kFast>(cp, p.C_l, t0, L, vc);
            cp += p.C_n;
        }
        S at = gate(sum_dl, A2);   // the product of the lane's gates, in one exp
        warp_exclusive_scan(at, bt, lane);
        S h = at * w.carry[n] + bt;
        const S cconst = kVarC ? S(0) : w.Cc[n * p.C_n];
#pragma unroll
        for (int i = 0; i < T; ++i) {
            h = dA[i] * h + bu[i];
            y[i] += readout(kVarC ? Ld<S>::from(vc.e[i]) : cconst, h);
        }
        if (w.saved && ((lane + 1) * T) % kSaveEvery == 0) {
            const int64_t idx = (c0 + (lane + 1) * T) / kSaveEvery - 1;
            if (idx < p.n_saved) w.saved[idx * N + n] = h;
        }
        __syncwarp();
        if (lane == 31) w.carry[n] = h;
        __syncwarp();
        if (!kPrefetch && n + 1 < N) {
            bp += p.B_n;
            if (kVarB) load_vec<kFast>(bp, p.B_l, t0, L, nb);
            if (!kLateC) {
                cp += p.C_n;
                if (kVarC) load_vec<kFast>(cp, p.C_l, t0, L, nc);
            }
        }
    }
    if (w.z) {
        // Training keeps the un-gated output for the backward's dz (one (B, D, L) array in the
        // input dtype): the backward then skips re-accumulating y over all N states.
        if (w.ysave) store_steps<kFast>(w.ysave, 1, t0, L, y);
        R zv[T];
        load_steps<kFast>(w.z, p.z_l, t0, L, zv);
#pragma unroll
        for (int i = 0; i < T; ++i) y[i] *= silu_fast(zv[i]);
    }
    store_steps<kFast>(w.out, p.out_l, t0, L, y);
}

template <typename In, typename W, bool kVarB, bool kVarC, int kItems>
__global__ void __launch_bounds__(256, FwdMinBlocks<W>::value) selective_scan_fwd(const SelectiveScanParams p) {
    typedef W S;
    constexpr int T = kItems;
    constexpr int kChunk = 32 * T;
    static_assert(kChunk % kSaveEvery == 0, "saved states must fall on chunk ends");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int lane = threadIdx.x, warp = threadIdx.y, warps = blockDim.y;
    const ChannelMap m(p, warp, warps);
    if (!m.active) return;   // no block-wide barriers below: idle warps may leave
    const int64_t N = p.dstate, L = p.seqlen;

    FwdWarp<In, W> w;
    w.carry = (S*)smem_raw + warp * N;
    for (int n = lane; n < N; n += 32)
        w.carry[n] = p.initial_state
            ? ((const S*)p.initial_state)[m.b * p.init_b + m.d * p.init_d + n * p.init_n] : S(0);
    __syncwarp();
    w.u = (const In*)p.u + m.b * p.u_b + m.d * p.u_d;
    w.dl = (const In*)p.delta + m.b * p.delta_b + m.d * p.delta_d;
    w.z = p.z ? (const In*)p.z + m.b * p.z_b + m.d * p.z_d : nullptr;
    w.out = (In*)p.out + m.b * p.out_b + m.d * p.out_d;
    w.ysave = (p.y_saved && p.z) ? (In*)p.y_saved + (m.b * p.dim + m.d) * L : nullptr;
    w.A = (const S*)p.A + m.d * p.A_d;
    w.Dv = p.D ? ((const typename RealOf<W>::type*)p.D)[m.d * p.D_s] : 0;
    w.bias = p.delta_bias ? ((const typename RealOf<W>::type*)p.delta_bias)[m.d * p.delta_bias_s] : 0;
    w.Bg = (const typename VarBC<In, W>::type*)p.B + m.b * p.B_b + m.g * p.B_g;
    w.Cg = (const typename VarBC<In, W>::type*)p.C + m.b * p.C_b + m.g * p.C_g;
    w.Bc = (const S*)p.B + m.d * p.B_g;
    w.Cc = (const S*)p.C + m.d * p.C_g;
    w.saved = p.saved_states ? (S*)p.saved_states + (m.b * p.dim + m.d) * p.n_saved * N : nullptr;

    for (int64_t c0 = 0; c0 < L; c0 += kChunk) {
        if (p.vec_ok && c0 + kChunk <= L)
            fwd_chunk<true, In, W, kVarB, kVarC, T>(p, w, c0, lane, warp, warps);
        else
            fwd_chunk<false, In, W, kVarB, kVarC, T>(p, w, c0, lane, warp, warps);
    }
    if (p.last_state) {
        __syncwarp();
        for (int n = lane; n < N; n += 32)
            ((S*)p.last_state)[(m.b * p.dim + m.d) * N + n] = w.carry[n];
    }
}

}  // namespace ssm
