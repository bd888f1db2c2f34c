// selective_scan_fwd.cu: the selective-scan forward.
//
//   delta' = softplus?(delta + delta_bias);  h_t = exp(delta'_t A) h_{t-1} + delta'_t B_t u_t
//   y_t = sum_n C_t[n] h_t[n]  (2 Re(...) for complex A);  out = (y + D u) * silu(z)?
//
// Grid mapping: one warp per channel d; a block holds `warps` channels of one (batch, group),
// so the warps of a block read the same variable B/C rows at about the same time and all but
// the first hit L1 (upstream re-reads all of B/C from L2 per channel). A first version staged
// B/C tiles in shared memory: its serialized tile fills made the forward 2x slower than
// upstream (0.89 ms at b8 d1536 l2048 n16 bf16). blockIdx.x -> (b, g, channel block).
// Each lane owns kItems consecutive steps of a chunk of 32*kItems steps. Per state n: every
// lane folds its steps into one affine map, a warp scan composes the lanes' maps, and the lane
// replays its steps from its entry state, accumulating y. One exp2 per (b, d, l, n): the floor.
// The warp's carry between chunks lives in shared memory (N values per warp).
//
// For the backward the forward saves the state every kSaveEvery steps: (B, D, ceil(L/256), N),
// so the backward recomputes within 256-step chunks instead of storing (B, D, L, N).
#include "selective_scan_common.cuh"

namespace ssm {

constexpr int kSaveEvery = 256;      // = the backward's chunk (32 lanes x 8 items)
// 2 blocks of 8 warps per SM caps registers at 128/thread; the first build without the cap
// used 164 (one block per SM, 8 warps: too few to hide the scan's shuffle latency).
// Complex and fp64 state take 1 (capping them spills).
template <typename W> struct FwdMinBlocks { static constexpr int value = 2; };
template <> struct FwdMinBlocks<double> { static constexpr int value = 1; };
template <typename R> struct FwdMinBlocks<complex<R>> { static constexpr int value = 1; };

// kItems (steps per lane; chunk = 32 * kItems, a multiple of kSaveEvery) is chosen by the host
// (ssmkit/ops/selective_scan.py, kernel_config).
template <typename In, typename W, bool kVarB, bool kVarC, int kItems>
__global__ void __launch_bounds__(256, FwdMinBlocks<W>::value) selective_scan_fwd(const SelectiveScanParams p) {
    typedef W S;
    typedef typename RealOf<W>::type R;
    typedef typename VarBC<In, W>::type BCs;
    constexpr int T = kItems;
    constexpr int kChunk = 32 * T;
    static_assert(kChunk % kSaveEvery == 0, "saved states must fall on chunk ends");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    S* carry_all = (S*)smem_raw;     // [warps][N]: each warp's state carried between chunks

    const int lane = threadIdx.x, warp = threadIdx.y, warps = blockDim.y;
    const ChannelMap m(p, warp, warps);
    const int64_t N = p.dstate, L = p.seqlen;
    S* carry = carry_all + warp * N;

    for (int n = lane; n < N; n += 32) {
        S h0 = S(0);
        if (p.initial_state && m.active)
            h0 = ((const S*)p.initial_state)[m.b * p.init_b + m.d * p.init_d + n * p.init_n];
        carry[n] = h0;
    }
    __syncwarp();

    const In* u_row = (const In*)p.u + m.b * p.u_b + m.d * p.u_d;
    const In* dl_row = (const In*)p.delta + m.b * p.delta_b + m.d * p.delta_d;
    const S* A_row = (const S*)p.A + m.d * p.A_d;
    const R Dv = p.D ? ((const R*)p.D)[m.d * p.D_s] : R(0);
    const R bias = p.delta_bias ? ((const R*)p.delta_bias)[m.d * p.delta_bias_s] : R(0);
    const BCs* Bg = (const BCs*)p.B + m.b * p.B_b + m.g * p.B_g;   // variable: this (b, g)
    const BCs* Cg = (const BCs*)p.C + m.b * p.C_b + m.g * p.C_g;
    const S* Bc = (const S*)p.B + m.d * p.B_g;                     // constant: this channel
    const S* Cc = (const S*)p.C + m.d * p.C_g;

    for (int64_t c0 = 0; c0 < L; c0 += kChunk) {
        const int64_t t0 = c0 + lane * T;
        R u[T], dl[T], dlu[T], y[T];
        R sum_dl = 0;
        if (m.active) {
            load_seg(u_row, p.u_l, t0, L, u, R(0));
            load_seg(dl_row, p.delta_l, t0, L, dl, R(0));
        }
#pragma unroll
        for (int i = 0; i < T; ++i) {
            dl[i] = (m.active && t0 + i < L) ? delta_eff(dl[i], bias, p.delta_softplus) : R(0);
            if (!m.active) u[i] = R(0);
            dlu[i] = dl[i] * u[i];
            y[i] = Dv * u[i];   // the skip term first: u is then dead, saving kItems registers
            sum_dl += dl[i];
        }
        if (m.active) {
            // Variable B/C rows for state n+1 are loaded while state n computes (registers
            // hold the raw 16-bit/32-bit words: 2 x kItems values).
            Vec<BCs, T> nb, nc;
            if (kVarB) load_raw(Bg, p.B_l, t0, L, nb);
            if (kVarC) load_raw(Cg, p.C_l, t0, L, nc);
            for (int64_t n = 0; n < N; ++n) {
                const Vec<BCs, T> vb = nb, vc = nc;
                if (n + 1 < N) {
                    if (kVarB) load_raw(Bg + (n + 1) * p.B_n, p.B_l, t0, L, nb);
                    if (kVarC) load_raw(Cg + (n + 1) * p.C_n, p.C_l, t0, L, nc);
                }
                const S A2 = prescale(A_row[n * p.A_n]);
                const S bconst = kVarB ? S(0) : Bc[n * p.B_n];
                S dA[T], bu[T];
                S bt = S(0);
#pragma unroll
                for (int i = 0; i < T; ++i) {
                    dA[i] = gate(dl[i], A2);
                    bu[i] = (kVarB ? Ld<S>::from(vb.e[i]) : bconst) * dlu[i];
                    bt = dA[i] * bt + bu[i];
                }
                S at = gate(sum_dl, A2);   // the product of the lane's gates, in one exp
                warp_exclusive_scan(at, bt, lane);
                S h = at * carry[n] + bt;
                const S cconst = kVarC ? S(0) : Cc[n * p.C_n];
#pragma unroll
                for (int i = 0; i < T; ++i) {
                    h = dA[i] * h + bu[i];
                    y[i] += readout(kVarC ? Ld<S>::from(vc.e[i]) : cconst, h);
                }
                if (p.saved_states && ((lane + 1) * T) % kSaveEvery == 0) {
                    const int64_t idx = (c0 + (lane + 1) * T) / kSaveEvery - 1;
                    if (idx < p.n_saved)
                        ((S*)p.saved_states)[((m.b * p.dim + m.d) * p.n_saved + idx) * N + n] = h;
                }
                __syncwarp();
                if (lane == 31) carry[n] = h;
                __syncwarp();
            }
        }
        if (m.active) {
            R o[T];
#pragma unroll
            for (int i = 0; i < T; ++i) o[i] = y[i];
            if (p.z) {
                R zv[T];
                load_seg((const In*)p.z + m.b * p.z_b + m.d * p.z_d, p.z_l, t0, L, zv, R(0));
#pragma unroll
                for (int i = 0; i < T; ++i) o[i] *= silu(zv[i]);
            }
            store_seg((In*)p.out + m.b * p.out_b + m.d * p.out_d, p.out_l, t0, L, o);
        }
    }
    if (p.last_state && m.active) {
        __syncwarp();
        for (int n = lane; n < N; n += 32)
            ((S*)p.last_state)[(m.b * p.dim + m.d) * N + n] = carry[n];
    }
}

}  // namespace ssm
