// selective_scan_bwd.cu: gradients of the selective scan, recomputed chunk by chunk.
//
// Same grid as the forward (one warp per channel, a block = `warps` channels of one (b, g)),
// chunks of 256 steps = 32 lanes x 8 items, walked from the end of time. Per chunk and state n:
//   1. forward replay from the saved chunk-start state (one exp per element; the forward saved
//      a state every 256 steps), keeping h_t in registers;
//   2. the adjoint dh_t = g_t + conj(a_{t+1}) dh_{t+1}, g_t = dL/dh_t from the readout, as a
//      reverse warp scan of lane maps X_out = conj(a_lane) X_in + Q_lane, with the carry
//      X = conj(a_first) dh_first passed to the previous chunk through shared memory;
//   (dz uses the un-gated output the forward saved, so y is not re-accumulated here)
//   3. per-element gradients (complex in the PyTorch convention dL/dRe + i dL/dIm):
//        G_a = dh conj(h_{t-1});  ddelta += Re(G_a conj(A a)) + Re(dh conj(B u));
//        dA += G_a delta conj(a);  du += Re(dh conj(delta B));  dB += dh delta u;
//        dC += dy h (2 dy conj(h) for complex A).
//      Arranged for few instructions per (l, n): the lane keeps w = delta u instead of u and
//      S = sum_n Re(dh conj(B)), so du = D dy + delta S and ddelta's B term = u S are formed
//      once per chunk; P = G_a conj(a) feeds both ddelta (Re(P conj(A))) and dA (P delta).
// Variable dB/dC are summed over the block's warps in a fixed order through shared memory (one
// barrier per chunk and state), then either (p.bc_atomic = 0, deterministic) written as
// per-block partials (B, G, blocks_per_group, N, L) that the host folds in index order, bitwise
// reproducible, or (p.bc_atomic = 1, the default) added with one fp32 atomic per (l, n) into a
// zeroed (B, G, 1, N, L): 4-8% faster fwd+bwd on the anchor rows, no fold pass, 1/blocks_per_group
// of the memory. (Every warp adding its own values atomically, no barrier, was 1.5-1.8x slower.)
// dA, dD, ddelta_bias and constant dB/dC are per-(b, d) partials that the host sums over b.
#include "selective_scan_common.cuh"

namespace ssm {

constexpr int kBwdItems = 8;                 // 32 x 8 = 256 = the forward's save spacing
constexpr int kBwdChunk = 32 * kBwdItems;
// Real fp32 state: a 512-thread bound caps registers at 128, so two 8-warp blocks share an SM
// (the host launches 8 warps: 16-warp blocks, one per SM, were slower). Complex and fp64 values
// are twice as wide and spill kilobytes under that cap: 256 threads, up to 255 registers.
template <typename W> struct BwdMaxThreads { static constexpr int value = 512; };
template <> struct BwdMaxThreads<double> { static constexpr int value = 256; };
template <typename R> struct BwdMaxThreads<complex<R>> { static constexpr int value = 256; };

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

// A block's dB/dC sum for one (step, state): added with fp32 atomics into the group's slab, or
// stored as this block's partial (the deterministic mode).
template <typename S> __device__ __forceinline__ void add_or_store(S* dst, S v, int atomic) {
    typedef typename RealOf<S>::type R;
    if (atomic) {
        const R* parts = (const R*)&v;
#pragma unroll
        for (int r = 0; r < int(sizeof(S) / sizeof(R)); ++r) atomicAdd((R*)dst + r, parts[r]);
    } else {
        *dst = v;
    }
}

// A warp's channel and its shared-memory slots, set up once.
template <typename In, typename W> struct BwdWarp {
    typedef typename RealOf<W>::type R;
    typedef typename VarBC<In, W>::type BCs;
    const In *u, *dl, *z, *dout, *ysave;
    In *du, *ddl, *dz;
    const W* A;
    const BCs *Bg, *Cg;
    const W *Bc, *Cc;
    const W* saved;
    const W* init;           // this (b, d)'s initial state (stride init_n) or null
    W *dX, *dA_acc, *dBc_acc, *dCc_acc;
    int64_t part_row;
    R Dv, bias;
};

// dL/d(ungated output) at a lane's steps: dout, times silu(z) when the forward gated by z.
template <bool kFast, typename In, typename W, int T>
__device__ __forceinline__ void load_dy(const SelectiveScanParams& p, const BwdWarp<In, W>& w, int64_t t0,
                                        int64_t L, typename RealOf<W>::type (&dy)[T]) {
    load_steps<kFast>(w.dout, p.dout_l, t0, L, dy);
    if (w.z) {
        typename RealOf<W>::type zv[T];
        load_steps<kFast>(w.z, p.z_l, t0, L, zv);
#pragma unroll
        for (int i = 0; i < T; ++i) dy[i] *= silu_fast(zv[i]);
    }
}

template <bool kFast, typename In, typename W, bool kVarB, bool kVarC>
__device__ __forceinline__ void bwd_chunk(const SelectiveScanParams& p, const BwdWarp<In, W>& w, int64_t c,
                                          bool active, int lane, int warp, int warps,
                                          typename RealOf<W>::type& dD_lane,
                                          typename RealOf<W>::type& dbias_lane, int& par) {
    typedef W S;
    typedef typename RealOf<W>::type R;
    constexpr int T = kBwdItems;
    const int tid = warp * 32 + lane, nthreads = warps * 32;
    const int64_t N = p.dstate, L = p.seqlen;
    const int64_t c0 = c * kBwdChunk;
    const int64_t t0 = c0 + lane * T;
    R u[T], dl[T], dy[T], Sb[T], ddl[T];   // u holds delta * u after the prologue
    R sum_dl = 0;
    // The previous chunk's rows (next in this walk) toward L2, for 16-bit inputs. A/B (bwd call):
    // bf16 b1 d5120 l8192 3.00 -> 2.77 ms, b4 d4096 l2048 2.14 -> 2.01, headline and l512 within
    // 2%; fp32 within 2% either way, so off (it costs fp32 registers).
    // Rows with unit stride only.
    if (sizeof(In) == 2 && active && c > 0) {
        const int64_t tp = t0 - kBwdChunk;
        prefetch_l2<In, T>((kFast || p.u_l == 1) ? w.u : nullptr, tp, L);
        prefetch_l2<In, T>((kFast || p.delta_l == 1) ? w.dl : nullptr, tp, L);
        prefetch_l2<In, T>((kFast || p.dout_l == 1) ? w.dout : nullptr, tp, L);
        prefetch_l2<In, T>((kFast || p.z_l == 1) ? w.z : nullptr, tp, L);
        prefetch_l2<In, T>(w.ysave, tp, L);
        prefetch_bc_l2<typename VarBC<In, W>::type, T>(w.Bg, w.Cg, p, tp, warp, warps, kVarB, kVarC);
    }
    if (active) {
        load_steps<kFast>(w.u, p.u_l, t0, L, u);
        load_steps<kFast>(w.dl, p.delta_l, t0, L, dl);
        load_dy<kFast>(p, w, t0, L, dy);
    }
#pragma unroll
    for (int i = 0; i < T; ++i) {
        const bool live = active && (kFast || t0 + i < L);
        if (!live) { u[i] = R(0); dy[i] = R(0); }
        R v = dl[i] + w.bias;
        v = p.delta_softplus ? softplus_fast(v) : v;
        dl[i] = live ? v : R(0);
        sum_dl += dl[i];
        Sb[i] = R(0);
        ddl[i] = R(0);
        dD_lane += dy[i] * u[i];
        u[i] *= dl[i];
    }
    typedef typename VarBC<In, W>::type BCs;
    // Variable B/C rows of state n, loaded at the top of its iteration. (Loading state n+1's rows
    // during state n measured no faster, 1.826 vs 1.830 ms at b8 d1536 l2048 n16 bf16, and costs
    // registers.)
    const BCs* bp = w.Bg;
    const BCs* cp = w.Cg;
    Vec<BCs, T> nb, nc;
    if (active) {
        if (kVarB) load_vec<kFast>(bp, p.B_l, t0, L, nb);
        if (kVarC) load_vec<kFast>(cp, p.C_l, t0, L, nc);
    }
    // This warp's dB/dC slices for the fixed-order block sum, double buffered by state parity so
    // one barrier per state suffices. Each lane's T values go out as 16-byte words into a row
    // padded by 16 bytes per lane (TileLayout): conflict-free. (Scalar stores at a lane stride of
    // 8 words were 8-way bank conflicts: the variable-B/C backward took 2.0 ms against 1.0 ms
    // for constant B/C. Two states per barrier, with twice the slices, measured 0-8% slower.)
    // Words are stored as soon as their values exist (dC after the replay, dB inside the
    // gradient loop), so neither dh[T] nor dC[T] is held to the end of the state.
    typedef TileLayout<S, T> Slice;
    constexpr int kPerWord = 16 / int(sizeof(S));
    for (int64_t n = 0; n < N; ++n) {
        // Addressed from the extern shared array itself (not a pointer kept in w): the compiler
        // then knows it is shared memory (32-bit STS addresses, not 64-bit generic ones).
        extern __shared__ __align__(16) unsigned char smem_raw[];
        S* sl = (S*)smem_raw + par * 2 * warps * Slice::kRow;
        uint4* slB = (uint4*)(sl + warp * Slice::kRow + lane * Slice::kSeg);
        uint4* slC = (uint4*)(sl + (warps + warp) * Slice::kRow + lane * Slice::kSeg);
        if (active && n > 0) {
            bp += p.B_n;
            cp += p.C_n;
            if (kVarB) load_vec<kFast>(bp, p.B_l, t0, L, nb);
            if (kVarC) load_vec<kFast>(cp, p.C_l, t0, L, nc);
        }
        const Vec<BCs, T> vb = nb, vc = nc;
        if (active) {
            const S Araw = w.A[n * p.A_n];
            const S A2 = prescale(Araw);
            // B and C stay in their packed storage words (4 registers for 8 bf16) and are
            // widened at each use: fewer live registers, fewer spills (the variable-B/C backward
            // spilled ~400 bytes per thread with float arrays).
            const S bconst = kVarB ? S(0) : w.Bc[n * p.B_n];
            const S cconst = kVarC ? S(0) : w.Cc[n * p.C_n];
#define Bv(i) (kVarB ? Ld<S>::from(vb.e[i]) : bconst)
#define Cv(i) (kVarC ? Ld<S>::from(vc.e[i]) : cconst)
            // 1. forward replay from the chunk's start state
            S dA[T], h[T];
            S bt = S(0);
#pragma unroll
            for (int i = 0; i < T; ++i) {
                // A padding step (tail chunk only: kFast chunks have none) is the identity map,
                // so a NaN/Inf A cannot reach, through exp(0 * A), the adjoint of step L-1 that
                // the reference keeps finite (dlast_state enters at the chunk's end).
                dA[i] = (kFast || t0 + i < L) ? gate(dl[i], A2) : S(1);
                bt = dA[i] * bt + Bv(i) * u[i];
            }
            const S a_own = (kFast || t0 < L) ? gate(sum_dl, A2) : S(1);
            S at = a_own;
            warp_exclusive_scan(at, bt, lane);
            S h_start = S(0);
            if (c > 0) h_start = w.saved[(c - 1) * N + n];
            else if (w.init) h_start = w.init[n * p.init_n];
            S h_in = at * h_start + bt;
            S hv = h_in;
            Vec<S, T> vdc;
#pragma unroll
            for (int i = 0; i < T; ++i) {
                hv = dA[i] * hv + Bv(i) * u[i];
                h[i] = hv;
                if (kVarC) {
                    vdc.e[i] = conj_times(dy[i], hv);
                    if (i % kPerWord == kPerWord - 1) slC[i / kPerWord] = vdc.w[i / kPerWord];
                }
            }
            // The tail chunk's padding steps (t >= L) replay h_{L-1} forward, and their zero dy
            // and delta multiply it into the constant-C and dA sums: 0 * NaN would turn a NaN or
            // Inf that the reference confines to ddelta/du/dB at step L-1 into NaN in dA and dC
            // (seen on the H100: a NaN in u at the last step). So, in that chunk only (a
            // warp-uniform branch, no cost per step elsewhere): padding states read as 0 for the
            // dC sum, then h_{L-1} too, as the previous state of the first padding step.
            const bool tail = !kFast && c0 + kBwdChunk > L;
            if (tail) {
#pragma unroll
                for (int i = 0; i < T; ++i)
                    if (t0 + i >= L) h[i] = S(0);
            }
            S sC = S(0);      // constant C: this lane's share of dC
            if (!kVarC) {
#pragma unroll
                for (int i = 0; i < T; ++i) sC += conj_times(dy[i], h[i]);
            }
            if (tail) {
#pragma unroll
                for (int i = 0; i < T; ++i)
                    if (t0 + i + 1 >= L) h[i] = S(0);
                if (t0 >= L) h_in = S(0);
            }
            // 2. adjoint: local pass with zero carry, then the reverse warp scan
            S q = S(0);
#pragma unroll
            for (int i = T - 1; i >= 0; --i) q = conj(dA[i]) * (readout_grad(Cv(i), dy[i]) + q);
            S ar = conj(a_own);
            warp_exclusive_scan_reverse(ar, q, lane);
            S X = ar * w.dX[n] + q;
            // 3. per-element gradients, walking back in time
            S dA_sum = S(0), sB = S(0);
            Vec<S, T> vdb;
#pragma unroll
            for (int i = T - 1; i >= 0; --i) {
                const S dh = readout_grad(Cv(i), dy[i]) + X;
                const S hp = i > 0 ? h[i - 1] : h_in;
                X = conj(dA[i]) * dh;                    // the carry to step i - 1
                const S P = X * conj(hp);                 // = G_a conj(a): one multiply
                ddl[i] += re_part(P * conj(Araw));
                dA_sum += P * dl[i];
                Sb[i] += re_part(dh * conj(Bv(i)));
                if (kVarB) {
                    vdb.e[i] = dh * u[i];
                    if (i % kPerWord == 0) slB[i / kPerWord] = vdb.w[i / kPerWord];
                } else {
                    sB += dh * u[i];
                }
            }
#undef Bv
#undef Cv
            dA_sum = warp_sum(dA_sum);
            if (!kVarB) {
                sB = warp_sum(sB);
                if (lane == 0) w.dBc_acc[n] = w.dBc_acc[n] + sB;
            }
            if (!kVarC) {
                sC = warp_sum(sC);
                if (lane == 0) w.dCc_acc[n] = w.dCc_acc[n] + sC;
            }
            __syncwarp();
            if (lane == 0) { w.dX[n] = X; w.dA_acc[n] = w.dA_acc[n] + dA_sum; }
            __syncwarp();
        } else {
            // An idle warp still owns slices in the block sum: zeros.
#pragma unroll
            for (int k = 0; k < T / kPerWord; ++k) {
                if (kVarB) slB[k] = make_uint4(0u, 0u, 0u, 0u);
                if (kVarC) slC[k] = make_uint4(0u, 0u, 0u, 0u);
            }
        }
        if (kVarB || kVarC) {
            // Fixed-order sum over the block's warps: one barrier, then each thread sums the
            // warps for its steps.
            __syncthreads();
            // One step per thread (256 threads at 8 warps): its dB and dC sums are two
            // independent chains of `warps` shared loads.
            const int64_t row = (w.part_row + n) * L + c0;
            S* dstB = (S*)p.dB_part + row;
            S* dstC = (S*)p.dC_part + row;
            for (int t = tid; t < kBwdChunk; t += nthreads) {
                if (!kFast && c0 + t >= L) break;
                const S* src = sl + Slice::index(0, t);
                S accB = S(0), accC = S(0);
#pragma unroll 4
                for (int ww = 0; ww < warps; ++ww) {
                    if (kVarB) accB += src[ww * Slice::kRow];
                    if (kVarC) accC += src[(warps + ww) * Slice::kRow];
                }
                if (kVarB) add_or_store(dstB + t, accB, p.bc_atomic);
                if (kVarC) add_or_store(dstC + t, accC, p.bc_atomic);
            }
            par ^= 1;
        }
    }
    if (active) {
        // dz needs the finished y (all states); delta's chain rule needs the raw value.
        if (w.z) {
            // dz = dout * (y + D u) * silu'(z), with the forward's saved un-gated output.
            R zv[T], go[T], dz[T], yv[T];
            load_steps<kFast>(w.z, p.z_l, t0, L, zv);
            load_steps<kFast>(w.dout, p.dout_l, t0, L, go);
            load_steps<kFast>(w.ysave, 1, t0, L, yv);
#pragma unroll
            for (int i = 0; i < T; ++i) dz[i] = go[i] * yv[i] * silu_grad(zv[i]);
            store_steps<kFast>(w.dz, p.dz_l, t0, L, dz);
        }
        R raw[T], ur[T];
        load_steps<kFast>(w.dl, p.delta_l, t0, L, raw);
        load_steps<kFast>(w.u, p.u_l, t0, L, ur);
#pragma unroll
        for (int i = 0; i < T; ++i) {
            const bool live = kFast || t0 + i < L;
            ddl[i] += (live ? ur[i] : R(0)) * Sb[i];
            Sb[i] = w.Dv * dy[i] + dl[i] * Sb[i];          // du
            if (p.delta_softplus) ddl[i] *= sigmoid_fast(raw[i] + w.bias);
            if (live) dbias_lane += ddl[i];
        }
        store_steps<kFast>(w.du, p.du_l, t0, L, Sb);
        store_steps<kFast>(w.ddl, p.ddelta_l, t0, L, ddl);
    }
}

// Carry pass, one chunk: the adjoint carry X of every state (in w.dX, lane 0 only) moves from
// the chunk's end to its start: X_out = conj(a_chunk) X_in + sum_t w_t g_t, with g_t = C_t dy_t
// the readout gradient and w_t = conj(gate(cum_t, A)), cum_t the inclusive prefix sum of delta
// from the chunk's start (the decay from the chunk's start through step t). One exp per (l, n)
// and a warp sum per state; the carry of the chunk composes across chunks as a map, so cum never
// spans more than 256 steps (its rounding enters the exponent). The first version composed lane
// maps with a reverse warp scan per state: ncu at b1 d5120 l8192 n16 put it at 0.54 ms (fp32) and
// 0.47 ms (bf16) against 3.25 / 2.78 ms for the main pass over twice the steps (latency-bound:
// 0.4-0.6 eligible warps per scheduler).
template <bool kFast, typename In, typename W, bool kVarC>
__device__ __forceinline__ void carry_chunk(const SelectiveScanParams& p, const BwdWarp<In, W>& w, int64_t c,
                                            int lane, typename RealOf<W>::type& sum_seg) {
    typedef W S;
    typedef typename RealOf<W>::type R;
    typedef typename VarBC<In, W>::type BCs;
    constexpr int T = kBwdItems;
    const int64_t N = p.dstate, L = p.seqlen;
    const int64_t t0 = c * kBwdChunk + lane * T;
    R cum[T], dy[T];
    load_steps<kFast>(w.dl, p.delta_l, t0, L, cum);
    load_dy<kFast>(p, w, t0, L, dy);
    R run = 0;
#pragma unroll
    for (int i = 0; i < T; ++i) {
        const bool live = kFast || t0 + i < L;
        R v = cum[i] + w.bias;
        v = p.delta_softplus ? softplus_fast(v) : v;
        run += live ? v : R(0);
        dy[i] = live ? dy[i] : R(0);
        cum[i] = run;
    }
    R off = run;             // inclusive scan of the lanes' sums
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
        const R up = shfl_up(off, d);
        if (lane >= d) off += up;
    }
    const R chunk_sum = shfl_idx(off, 31);
    off -= run;
#pragma unroll
    for (int i = 0; i < T; ++i) cum[i] += off;
    sum_seg += chunk_sum;
    // K states at a time: their C loads, exps and warp sums overlap (one state per iteration
    // left each iteration a chain of dependent latencies: load, exp, five shuffles, shared RMW).
    constexpr int K = sizeof(S) <= 4 ? 4 : (sizeof(S) == 8 ? 2 : 1);
    for (int64_t n0 = 0; n0 < N; n0 += K) {
        S q[K], A2[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const int64_t n = n0 + k < N ? n0 + k : N - 1;    // a duplicate past N, never stored
            A2[k] = prescale(w.A[n * p.A_n]);
            Vec<BCs, T> vc;
            if (kVarC) load_vec<kFast>(w.Cg + n * p.C_n, p.C_l, t0, L, vc);
            const S cconst = kVarC ? S(0) : w.Cc[n * p.C_n];
            q[k] = S(0);
#pragma unroll
            for (int i = 0; i < T; ++i)
                q[k] += conj(gate(cum[i], A2[k])) * readout_grad(kVarC ? Ld<S>::from(vc.e[i]) : cconst, dy[i]);
        }
#pragma unroll
        for (int m = 16; m >= 1; m /= 2) {
#pragma unroll
            for (int k = 0; k < K; ++k) q[k] = q[k] + shfl_xor(q[k], m);
        }
        if (lane == 0) {
#pragma unroll
            for (int k = 0; k < K; ++k)
                if (n0 + k < N) w.dX[n0 + k] = conj(gate(chunk_sum, A2[k])) * w.dX[n0 + k] + q[k];
        }
    }
}

template <typename In, typename W, bool kVarB, bool kVarC>
__global__ void __launch_bounds__(BwdMaxThreads<W>::value, 1) selective_scan_bwd(const SelectiveScanParams p) {
    typedef W S;
    typedef typename RealOf<W>::type R;
    typedef typename VarBC<In, W>::type BCs;
    const int lane = threadIdx.x, warp = threadIdx.y, warps = blockDim.y;
    // blockIdx.x = seg * blocks_per_seg + (block of the unsplit grid)
    const int64_t blocks_per_seg = p.batch * p.n_groups * p.blocks_per_group;
    const int64_t seg = blockIdx.x / blocks_per_seg;
    const int64_t vblk = blockIdx.x - seg * blocks_per_seg;
    if (p.carry_pass && seg == 0) return;       // block-uniform: segment 0's carry is not needed
    const ChannelMap m(p, warp, warps, vblk);
    const int64_t N = p.dstate, L = p.seqlen;
    const int64_t blk_k = vblk % p.blocks_per_group;

    // Shared memory, in the order the host sizes it (ssmkit/ops/selective_scan.py, bwd_smem).
    extern __shared__ __align__(16) unsigned char smem_raw[];
    // The warp's ~20 row pointers live in (static) shared memory, not registers: held in
    // registers across the state loop they pushed the kernel into spills under its 128-register
    // cap; reloaded after each barrier they cost a few LDS per chunk and state.
    __shared__ BwdWarp<In, W> warp_state[BwdMaxThreads<W>::value / 32];
    BwdWarp<In, W>& w = warp_state[warp];
    const int n_var = (kVarB ? 1 : 0) + (kVarC ? 1 : 0);
    // [2 parities][B, C][warps] padded slice rows first (bwd_chunk), then the per-warp state arrays.
    S* per_warp = (S*)smem_raw + (n_var ? 2 * 2 * warps * TileLayout<S, kBwdItems>::kRow : 0);
    if (lane == 0) {   // one writer per field; the warp reads them after the __syncwarp below
        w.dX = per_warp + warp * N;                                     // adjoint carry per state
        w.dA_acc = per_warp + (warps + warp) * N;
        w.dBc_acc = per_warp + (2 * warps + warp) * N;                  // constant B only
        w.dCc_acc = per_warp + ((kVarB ? 2 : 3) * warps + warp) * N;    // constant C only
        w.u = (const In*)p.u + m.b * p.u_b + m.d * p.u_d;
        w.dl = (const In*)p.delta + m.b * p.delta_b + m.d * p.delta_d;
        w.z = p.z ? (const In*)p.z + m.b * p.z_b + m.d * p.z_d : nullptr;
        w.dout = (const In*)p.dout + m.b * p.dout_b + m.d * p.dout_d;
        w.ysave = p.z ? (const In*)p.y_saved + (m.b * p.dim + m.d) * L : nullptr;
        w.du = (In*)p.du + m.b * p.du_b + m.d * p.du_d;
        w.ddl = (In*)p.ddelta + m.b * p.ddelta_b + m.d * p.ddelta_d;
        w.dz = p.dz ? (In*)p.dz + m.b * p.dz_b + m.d * p.dz_d : nullptr;
        w.A = (const S*)p.A + m.d * p.A_d;
        w.Dv = p.D ? ((const R*)p.D)[m.d * p.D_s] : R(0);
        w.bias = p.delta_bias ? ((const R*)p.delta_bias)[m.d * p.delta_bias_s] : R(0);
        w.Bg = (const BCs*)p.B + m.b * p.B_b + m.g * p.B_g;
        w.Cg = (const BCs*)p.C + m.b * p.C_b + m.g * p.C_g;
        w.Bc = (const S*)p.B + m.d * p.B_g;
        w.Cc = (const S*)p.C + m.d * p.C_g;
        w.saved = (const S*)p.saved_states + (m.b * p.dim + m.d) * p.n_saved * N;
        w.init = p.initial_state ? (const S*)p.initial_state + m.b * p.init_b + m.d * p.init_d : nullptr;
        // Atomic mode: every block of a group adds into one (N, L) slab.
        w.part_row = p.bc_atomic ? (m.b * p.n_groups + m.g) * N
                                 : ((m.b * p.n_groups + m.g) * p.blocks_per_group + blk_k) * N;
    }
    __syncwarp();
    const int64_t n_chunks = (L + kBwdChunk - 1) / kBwdChunk;
    const int64_t c_begin = seg * p.seg_chunks;
    const int64_t c_end = c_begin + p.seg_chunks < n_chunks ? c_begin + p.seg_chunks : n_chunks;
    S* carry = p.carry ? (S*)p.carry + (m.b * p.dim + m.d) * p.n_seg * 2 * N : nullptr;   // [seg][a, X][N]
    if (p.carry_pass) {
        // Warp-level only (no block barriers): inactive warps leave at once.
        if (!m.active) return;
        for (int n = lane; n < N; n += 32) w.dX[n] = S(0);
        __syncwarp();
        R sum_seg = 0;
        for (int64_t c = c_end - 1; c >= c_begin; --c) {
            if (p.vec_ok && (c + 1) * kBwdChunk <= L)
                carry_chunk<true, In, W, kVarC>(p, w, c, lane, sum_seg);
            else
                carry_chunk<false, In, W, kVarC>(p, w, c, lane, sum_seg);
        }
        __syncwarp();       // lane 0 wrote w.dX
        for (int n = lane; n < N; n += 32) {   // sum_seg is warp-uniform
            carry[(seg * 2) * N + n] = gate(sum_seg, prescale(w.A[n * p.A_n]));
            carry[(seg * 2 + 1) * N + n] = w.dX[n];
        }
        return;
    }
    for (int n = lane; n < N; n += 32) {
        S x0 = S(0);
        if (p.dlast_state && m.active)
            x0 = ((const S*)p.dlast_state)[m.b * p.dlast_b + m.d * p.dlast_d + n * p.dlast_n];
        // A segment starts from the carry of everything after it: X = conj(a_s) X + X_s, latest first.
        if (m.active)
            for (int64_t s2 = p.n_seg - 1; s2 > seg; --s2)
                x0 = conj(carry[(s2 * 2) * N + n]) * x0 + carry[(s2 * 2 + 1) * N + n];
        w.dX[n] = x0;
        w.dA_acc[n] = S(0);
        if (!kVarB) w.dBc_acc[n] = S(0);
        if (!kVarC) w.dCc_acc[n] = S(0);
    }
    __syncwarp();
    R dD_lane = 0, dbias_lane = 0;
    int par = 0;

    for (int64_t c = c_end - 1; c >= c_begin; --c) {
        // Block-uniform choice (all warps share the chunk): barriers inside stay uniform.
        if (p.vec_ok && (c + 1) * kBwdChunk <= L)
            bwd_chunk<true, In, W, kVarB, kVarC>(p, w, c, m.active, lane, warp, warps, dD_lane, dbias_lane, par);
        else
            bwd_chunk<false, In, W, kVarB, kVarC>(p, w, c, m.active, lane, warp, warps, dD_lane, dbias_lane, par);
    }
    if (m.active) {
        const R dD_w = warp_sum(dD_lane), db_w = warp_sum(dbias_lane);
        const int64_t bd = (seg * p.batch + m.b) * p.dim + m.d;   // per-segment partials (B, D) each
        if (lane == 0) {
            if (p.dD_part) ((R*)p.dD_part)[bd] = dD_w;
            if (p.ddelta_bias_part) ((R*)p.ddelta_bias_part)[bd] = db_w;
        }
        __syncwarp();
        for (int n = lane; n < N; n += 32) {
            ((S*)p.dA_part)[bd * N + n] = w.dA_acc[n];
            if (!kVarB) ((S*)p.dB_part)[bd * N + n] = w.dBc_acc[n];
            if (!kVarC) ((S*)p.dC_part)[bd * N + n] = w.dCc_acc[n];
            if (p.dinitial_state && seg == 0) ((S*)p.dinitial_state)[(m.b * p.dim + m.d) * N + n] = w.dX[n];
        }
    }
}

}  // namespace ssm
