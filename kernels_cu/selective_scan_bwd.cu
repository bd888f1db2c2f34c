// selective_scan_bwd.cu: gradients of the selective scan, recomputed chunk by chunk.
//
// Same grid as the forward (one warp per channel, a block = `warps` channels of one (b, g)),
// chunks of 256 steps = 32 lanes x 8 items, walked from the end of time. Per chunk and state n:
//   1. forward replay from the saved chunk-start state (one exp per element; the forward saved
//      a state every 256 steps), keeping h_t in registers;
//   2. the adjoint dh_t = g_t + conj(a_{t+1}) dh_{t+1}, g_t = dL/dh_t from the readout, as a
//      reverse warp scan of lane maps X_out = conj(a_lane) X_in + Q_lane, with the carry
//      X = conj(a_first) dh_first passed to the previous chunk through shared memory;
//   3. per-element gradients (complex in the PyTorch convention dL/dRe + i dL/dIm):
//        G_a = dh conj(h_{t-1});  ddelta += Re(G_a conj(A a)) + Re(dh conj(B u));
//        dA += G_a delta conj(a);  du += Re(dh conj(delta B));  dB += dh delta u;
//        dC += dy h (2 dy conj(h) for complex A).
// Reductions are deterministic (no float atomics): variable dB/dC are summed over the block's
// warps in a fixed order through shared memory and written as per-block partials
// (B, G, blocks_per_group, N, L) that the host sums; dA, dD, ddelta_bias and constant dB/dC
// are per-(b, d) partials that the host sums over b.
#include "selective_scan_common.cuh"

namespace ssm {

constexpr int kBwdItems = 8;                 // 32 x 8 = 256 = the forward's save spacing
constexpr int kBwdChunk = 32 * kBwdItems;
// Real fp32-state variants: 2 blocks of 8 warps per SM (registers capped at 128). Complex and
// fp64 variants hold twice the bytes per value; capping them spills heavily, so they take 1.
template <typename W> struct BwdMinBlocks { static constexpr int value = 2; };
template <> struct BwdMinBlocks<double> { static constexpr int value = 1; };
template <typename R> struct BwdMinBlocks<complex<R>> { static constexpr int value = 1; };

__device__ __forceinline__ float re_part(float x) { return x; }
__device__ __forceinline__ double re_part(double x) { return x; }
template <typename R> __device__ __forceinline__ R re_part(complex<R> x) { return x.re; }

// dL/dh from the readout: C dy for real A; 2 dy conj(C) for complex A.
__device__ __forceinline__ float readout_grad(float c, float dy) { return c * dy; }
__device__ __forceinline__ double readout_grad(double c, double dy) { return c * dy; }
template <typename R> __device__ __forceinline__ complex<R> readout_grad(complex<R> c, R dy) {
    return {R(2) * dy * c.re, -R(2) * dy * c.im};
}
__device__ __forceinline__ float conj_times(float dy, float h) { return dy * h; }
__device__ __forceinline__ double conj_times(double dy, double h) { return dy * h; }
template <typename R> __device__ __forceinline__ complex<R> conj_times(R dy, complex<R> h) {
    return {R(2) * dy * h.re, -R(2) * dy * h.im};   // dC = 2 dy conj(h)
}

template <typename In, typename W, bool kVarB, bool kVarC>
__global__ void __launch_bounds__(256, BwdMinBlocks<W>::value) selective_scan_bwd(const SelectiveScanParams p) {
    typedef W S;
    typedef typename RealOf<W>::type R;
    typedef typename VarBC<In, W>::type BCs;
    constexpr int T = kBwdItems;

    const int lane = threadIdx.x, warp = threadIdx.y, warps = blockDim.y;
    const int tid = warp * 32 + lane, nthreads = warps * 32;
    const ChannelMap m(p, warp, warps);
    const int64_t N = p.dstate, L = p.seqlen;
    const int64_t blk_k = blockIdx.x % p.blocks_per_group;

    // Shared memory, in the order the host sizes it (ssmkit/ops/selective_scan.py, bwd_smem).
    extern __shared__ __align__(16) unsigned char smem_raw[];
    S* slices = (S*)smem_raw;                                       // [2][2][warps][chunk]
    const int n_var = (kVarB ? 1 : 0) + (kVarC ? 1 : 0);
    S* per_warp = slices + (n_var ? 2 * 2 * warps * kBwdChunk : 0);
    S* dX = per_warp + warp * N;                                    // adjoint carry per state
    S* dA_acc = per_warp + (warps + warp) * N;
    S* dBc_acc = per_warp + (2 * warps + warp) * N;                 // constant B only
    S* dCc_acc = per_warp + ((kVarB ? 2 : 3) * warps + warp) * N;   // constant C only

    for (int n = lane; n < N; n += 32) {
        S x0 = S(0);
        if (p.dlast_state && m.active)
            x0 = ((const S*)p.dlast_state)[m.b * p.dlast_b + m.d * p.dlast_d + n * p.dlast_n];
        dX[n] = x0;
        dA_acc[n] = S(0);
        if (!kVarB) dBc_acc[n] = S(0);
        if (!kVarC) dCc_acc[n] = S(0);
    }
    __syncwarp();

    const In* u_row = (const In*)p.u + m.b * p.u_b + m.d * p.u_d;
    const In* dl_row = (const In*)p.delta + m.b * p.delta_b + m.d * p.delta_d;
    const In* z_row = (const In*)p.z + m.b * p.z_b + m.d * p.z_d;
    const In* dout_row = (const In*)p.dout + m.b * p.dout_b + m.d * p.dout_d;
    const S* A_row = (const S*)p.A + m.d * p.A_d;
    const R Dv = p.D ? ((const R*)p.D)[m.d * p.D_s] : R(0);
    const R bias = p.delta_bias ? ((const R*)p.delta_bias)[m.d * p.delta_bias_s] : R(0);
    const BCs* Bg = (const BCs*)p.B + m.b * p.B_b + m.g * p.B_g;
    const BCs* Cg = (const BCs*)p.C + m.b * p.C_b + m.g * p.C_g;
    const S* Bc = (const S*)p.B + m.d * p.B_g;
    const S* Cc = (const S*)p.C + m.d * p.C_g;
    const S* saved = (const S*)p.saved_states + (m.b * p.dim + m.d) * p.n_saved * N;
    const int64_t part_row = ((m.b * p.n_groups + m.g) * p.blocks_per_group + blk_k) * N;
    R dD_lane = 0, dbias_lane = 0;
    int par = 0;

    const int64_t n_chunks = (L + kBwdChunk - 1) / kBwdChunk;
    for (int64_t c = n_chunks - 1; c >= 0; --c) {
        const int64_t c0 = c * kBwdChunk;
        const int64_t t0 = c0 + lane * T;
        R u[T], dl[T], dy[T], du[T], ddl[T], y[T];
        R sum_dl = 0;
        if (m.active) {
            load_seg(u_row, p.u_l, t0, L, u, R(0));
            load_seg(dl_row, p.delta_l, t0, L, dl, R(0));
            load_seg(dout_row, p.dout_l, t0, L, dy, R(0));
            if (p.z) {
                R zv[T];
                load_seg(z_row, p.z_l, t0, L, zv, R(0));
#pragma unroll
                for (int i = 0; i < T; ++i) dy[i] *= silu(zv[i]);
            }
        }
#pragma unroll
        for (int i = 0; i < T; ++i) {
            const bool live = m.active && t0 + i < L;
            if (!live) { u[i] = R(0); dy[i] = R(0); }
            dl[i] = live ? delta_eff(dl[i], bias, p.delta_softplus) : R(0);
            sum_dl += dl[i];
            y[i] = Dv * u[i];
            du[i] = Dv * dy[i];
            ddl[i] = R(0);
            dD_lane += dy[i] * u[i];
        }
        {
            for (int64_t n = 0; n < N; ++n) {
                S dBt[T], dCt[T];   // this warp's dB/dC contributions for (n, its steps)
                if (m.active) {
                    const S Araw = A_row[n * p.A_n];
                    const S A2 = prescale(Araw);
                    S Bv[T], Cv[T];
                    if (kVarB) {
                        Vec<BCs, T> v;
                        load_raw(Bg + n * p.B_n, p.B_l, t0, L, v);
#pragma unroll
                        for (int i = 0; i < T; ++i) Bv[i] = Ld<S>::from(v.e[i]);
                    } else {
                        const S b = Bc[n * p.B_n];
#pragma unroll
                        for (int i = 0; i < T; ++i) Bv[i] = b;
                    }
                    if (kVarC) {
                        Vec<BCs, T> v;
                        load_raw(Cg + n * p.C_n, p.C_l, t0, L, v);
#pragma unroll
                        for (int i = 0; i < T; ++i) Cv[i] = Ld<S>::from(v.e[i]);
                    } else {
                        const S cc = Cc[n * p.C_n];
#pragma unroll
                        for (int i = 0; i < T; ++i) Cv[i] = cc;
                    }
                    // 1. forward replay
                    S dA[T], h[T];
                    S bt = S(0);
#pragma unroll
                    for (int i = 0; i < T; ++i) {
                        dA[i] = gate(dl[i], A2);
                        bt = dA[i] * bt + Bv[i] * (dl[i] * u[i]);
                    }
                    const S a_own = gate(sum_dl, A2);
                    S at = a_own;
                    warp_exclusive_scan(at, bt, lane);
                    S h_start = S(0);
                    if (c > 0) h_start = saved[(c - 1) * N + n];
                    else if (p.initial_state)
                        h_start = ((const S*)p.initial_state)[m.b * p.init_b + m.d * p.init_d + n * p.init_n];
                    const S h_in = at * h_start + bt;
                    S hv = h_in;
#pragma unroll
                    for (int i = 0; i < T; ++i) {
                        hv = dA[i] * hv + Bv[i] * (dl[i] * u[i]);
                        h[i] = hv;
                        y[i] += readout(Cv[i], hv);
                    }
                    // 2. adjoint: local pass with zero carry, then the reverse warp scan
                    S q = S(0);
#pragma unroll
                    for (int i = T - 1; i >= 0; --i) q = conj(dA[i]) * (readout_grad(Cv[i], dy[i]) + q);
                    S ar = conj(a_own);
                    warp_exclusive_scan_reverse(ar, q, lane);
                    S X = ar * dX[n] + q;
                    // 3. per-element gradients, walking back in time
                    S dA_sum = S(0);
#pragma unroll
                    for (int i = T - 1; i >= 0; --i) {
                        const S dh = readout_grad(Cv[i], dy[i]) + X;
                        const S hp = i > 0 ? h[i - 1] : h_in;
                        const S Ga = dh * conj(hp);
                        ddl[i] += re_part(Ga * conj(Araw * dA[i])) + re_part(dh * conj(Bv[i] * u[i]));
                        dA_sum += Ga * conj(dA[i]) * dl[i];
                        du[i] += re_part(dh * conj(Bv[i] * dl[i]));
                        dBt[i] = dh * (dl[i] * u[i]);
                        dCt[i] = conj_times(dy[i], h[i]);
                        X = conj(dA[i]) * dh;
                    }
                    dA_sum = warp_sum(dA_sum);
                    if (!kVarB) { S s = S(0);
#pragma unroll
                        for (int i = 0; i < T; ++i) s += dBt[i];
                        s = warp_sum(s);
                        if (lane == 0) dBc_acc[n] = dBc_acc[n] + s; }
                    if (!kVarC) { S s = S(0);
#pragma unroll
                        for (int i = 0; i < T; ++i) s += dCt[i];
                        s = warp_sum(s);
                        if (lane == 0) dCc_acc[n] = dCc_acc[n] + s; }
                    __syncwarp();
                    if (lane == 0) { dX[n] = X; dA_acc[n] = dA_acc[n] + dA_sum; }
                    __syncwarp();
                } else {
#pragma unroll
                    for (int i = 0; i < T; ++i) { dBt[i] = S(0); dCt[i] = S(0); }
                }
                if (kVarB || kVarC) {
                    // Fixed-order sum over the block's warps: write this warp's slice, one
                    // barrier, then each thread sums the warps for its steps. Slices are double
                    // buffered by state parity, so one barrier per state suffices.
                    S* sl = slices + par * 2 * warps * kBwdChunk;
                    if (kVarB) {
#pragma unroll
                        for (int i = 0; i < T; ++i) sl[warp * kBwdChunk + lane * T + i] = dBt[i];
                    }
                    if (kVarC) {
#pragma unroll
                        for (int i = 0; i < T; ++i) sl[(warps + warp) * kBwdChunk + lane * T + i] = dCt[i];
                    }
                    __syncthreads();
                    for (int e = tid; e < 2 * kBwdChunk; e += nthreads) {
                        const int which = e / kBwdChunk, t = e % kBwdChunk;
                        if ((which == 0 && !kVarB) || (which == 1 && !kVarC)) continue;
                        const int64_t tt = c0 + t;
                        if (tt >= L) continue;
                        S acc = S(0);
                        for (int w = 0; w < warps; ++w) acc += sl[(which * warps + w) * kBwdChunk + t];
                        S* dst = (S*)(which == 0 ? p.dB_part : p.dC_part);
                        dst[(part_row + n) * L + tt] = acc;
                    }
                    par ^= 1;
                }
            }
        }
        if (m.active) {
            // dz needs the finished y (all states); delta's chain rule needs the raw value.
            if (p.z) {
                R zv[T], go[T], dz[T];
                load_seg(z_row, p.z_l, t0, L, zv, R(0));
                load_seg(dout_row, p.dout_l, t0, L, go, R(0));
#pragma unroll
                for (int i = 0; i < T; ++i) dz[i] = go[i] * y[i] * silu_grad(zv[i]);
                store_seg((In*)p.dz + m.b * p.dz_b + m.d * p.dz_d, p.dz_l, t0, L, dz);
            }
            R raw[T];
            load_seg(dl_row, p.delta_l, t0, L, raw, R(0));
#pragma unroll
            for (int i = 0; i < T; ++i) {
                if (p.delta_softplus) ddl[i] *= sigmoid(raw[i] + bias);
                if (t0 + i < L) dbias_lane += ddl[i];
            }
            store_seg((In*)p.du + m.b * p.du_b + m.d * p.du_d, p.du_l, t0, L, du);
            store_seg((In*)p.ddelta + m.b * p.ddelta_b + m.d * p.ddelta_d, p.ddelta_l, t0, L, ddl);
        }
    }
    if (m.active) {
        const R dD_w = warp_sum(dD_lane), db_w = warp_sum(dbias_lane);
        const int64_t bd = m.b * p.dim + m.d;
        if (lane == 0) {
            if (p.dD_part) ((R*)p.dD_part)[bd] = dD_w;
            if (p.ddelta_bias_part) ((R*)p.ddelta_bias_part)[bd] = db_w;
        }
        __syncwarp();
        for (int n = lane; n < N; n += 32) {
            ((S*)p.dA_part)[bd * N + n] = dA_acc[n];
            if (!kVarB) ((S*)p.dB_part)[bd * N + n] = dBc_acc[n];
            if (!kVarC) ((S*)p.dC_part)[bd * N + n] = dCc_acc[n];
            if (p.dinitial_state) ((S*)p.dinitial_state)[bd * N + n] = dX[n];
        }
    }
}

}  // namespace ssm
