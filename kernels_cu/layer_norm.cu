// layer_norm.cu: fused residual add + LayerNorm / RMSNorm over the last axis (mamba_ssm's
// layer_norm_fn / rms_norm_fn), forward and backward.
//
//   s = x + residual (or x), rounded to the residual stream's type TRes;  residual_out = s
//   LayerNorm: mean = sum(s) / H, rstd = 1 / sqrt(sum((s - mean)^2) / H + eps), xhat = (s - mean) rstd
//   RMSNorm:   rstd = 1 / sqrt(sum(s^2) / H + eps), xhat = s rstd
//   y = xhat * weight + bias
// Backward (g = weight * dy): dweight = sum_rows dy xhat, dbias = sum_rows dy,
//   ds = rstd (g - xhat mean(xhat g) - mean(g))   (RMSNorm: without - mean(g))
//   ds += dresidual_out (prenorm);  dx = ds (TIn);  dresidual = ds (TRes, when asked for)
//
// Grid mapping. Rows are the flattened leading dims (host-proved to have one row stride), H is
// contiguous. A row belongs to a "group" of G threads (G a multiple of 32, <= 1024, runtime);
// a block holds blockDim.x / G groups. Thread t of a group owns chunks c = i * G + t for
// i < kIters, chunk c being the kVec columns [c kVec, c kVec + kVec) (kVec = one 16-byte load
// of TIn): consecutive threads read consecutive 16 bytes. The row lives in registers between
// its load and its store, so HBM sees each byte once. Row sums: xor-butterfly in the warp,
// then (G > 32) one shared-memory slot per warp and a fixed-order sum over the group's warps,
// so every thread holds the same bits and results are run-to-run deterministic.
//
// Blocks step over rows (grid-stride by whole blocks, every thread of a block taking the same
// number of steps, so the block barriers of the group sums are uniform). The forward launches
// one step per group; the backward launches as many blocks as are resident and walks all rows,
// each thread summing dy xhat and dy for its columns in registers; at the end the block's
// groups are folded through shared memory into one partial row per block, and a second kernel
// (layer_norm_bwd_reduce) sums the partial rows per column in a fixed order.
//
// Loads and stores: a full chunk of an array the host marked aligned (base 16-byte aligned,
// row stride a multiple of 16 bytes) moves as 16-byte vectors; a chunk cut by the row end, or
// any chunk of an unaligned array (odd H, strided views), moves element by element.
// Math in fp32 (fp64 for fp64 inputs). Offsets are int64.
#include "scan.cuh"

namespace ssm {

// Threads per block, at most (groups of up to 1024 threads): registers are capped at 64.
// ptxas (sm_90): bf16 forward with kIters = 1 takes 51-54 registers (4 blocks of 256 per SM),
// fp32 32; the backward 47-64; kIters = 2 and 4 backward variants spill (the row, g, dweight and
// dbias sums do not fit 64 registers at H > 8192 in 16-bit).
constexpr int kLnMaxThreads = 1024;
constexpr int kLnMaxWarps = kLnMaxThreads / 32;
// Minimum resident blocks per SM asked of ptxas (__launch_bounds__), for experiments through
// SSMKIT_NVRTC_OPTIONS="-DSSMKIT_LN_FWD_MIN_BLOCKS=2": with 1024-thread bounds, 2 caps registers at
// 32 (bf16 forward kIters = 1: 44-92 bytes of spills, 8 blocks of 256 per SM). Not measured yet.
#ifndef SSMKIT_LN_FWD_MIN_BLOCKS
#define SSMKIT_LN_FWD_MIN_BLOCKS 1
#endif
#ifndef SSMKIT_LN_BWD_MIN_BLOCKS
#define SSMKIT_LN_BWD_MIN_BLOCKS 1
#endif

struct LayerNormFwdParams {
    const void* x;           // (M, H) TIn, row stride x_row
    const void* residual;    // (M, H) TRes, or null
    const void* weight;      // (H,) TW, unit stride
    const void* bias;        // (H,) TW, or null
    void* y;                 // (M, H) TIn
    void* residual_out;      // (M, H) TRes, or null (not stored)
    void* mean;              // (M,) acc type, or null (RMSNorm, or not kept)
    void* rstd;              // (M,) acc type, or null (not kept)
    int64_t rows, hidden;
    int64_t x_row, res_row, y_row, rout_row;    // row strides in elements
    double eps;
    int32_t group;           // threads per row, a multiple of 32 in [32, 1024]
    int32_t vec_x, vec_res, vec_y, vec_rout, vec_w;   // 1: 16-byte accesses (host-proved alignment)
};

struct LayerNormBwdParams {
    const void* x;           // (M, H) TRes: the normalized input (residual_out, or x when none)
    const void* weight;      // (H,) TW
    const void* dy;          // (M, H) TIn
    const void* dres_out;    // (M, H) TRes, gradient of residual_out, or null
    const void* mean;        // (M,) acc type (LayerNorm)
    const void* rstd;        // (M,) acc type
    void* dx;                // (M, H) TIn
    void* dres;              // (M, H) TRes, or null (the host reuses dx when the types agree)
    void* dw_part;           // (gridDim.x, part_row) acc type: per-block sums of dy xhat
    void* db_part;           // (gridDim.x, part_row) acc type: per-block sums of dy, or null
    int64_t rows, hidden, part_row;
    int64_t x_row, dy_row, drout_row, dx_row, dres_row;
    int32_t group;
    int32_t vec_x, vec_w, vec_dy, vec_drout, vec_dx, vec_dres;
};

struct LayerNormReduceParams {
    const void* dw_part;     // (parts, part_row) acc type
    const void* db_part;     // (parts, part_row) acc type, or null
    void* dweight;           // (H,) TW
    void* dbias;             // (H,) TW, or null
    int64_t parts, hidden, part_row;
};

// One 16-byte load of TIn per chunk: 8 elements of fp16/bf16, 4 of fp32, 2 of fp64. Mirrored
// by VEC_ELEMS in ssmkit/ops/layer_norm.py.
template <typename TIn> struct LnTraits {
    typedef typename Acc<TIn>::type acc_t;
    static constexpr int kVec = 16 / (int)sizeof(TIn);
};

// ---- chunk loads and stores ------------------------------------------------------------------
__device__ __forceinline__ void ln_ld16(const void* p, uint32_t (&w)[4]) {
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p));
}
__device__ __forceinline__ void ln_st16(void* p, const uint32_t (&w)[4]) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};"
                 :: "l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3]) : "memory");
}

// K elements of T at p into R; the first n are real, the rest read as 0. A full chunk of an
// aligned array (vec) is K * sizeof(T) / 16 vector loads (K * sizeof(T) is 16 or 32 here).
template <typename T, int K, typename R>
__device__ __forceinline__ void ln_load(const T* p, bool vec, int n, R (&v)[K]) {
    constexpr int kBytes = K * (int)sizeof(T);
    static_assert(kBytes % 16 == 0, "chunks are whole 16-byte vectors");
    if (vec && n == K) {
        union { uint32_t w[kBytes / 4]; T e[K]; } u;
#pragma unroll
        for (int q = 0; q < kBytes / 16; ++q) {
            uint32_t w[4];
            ln_ld16((const char*)p + 16 * q, w);
#pragma unroll
            for (int k = 0; k < 4; ++k) u.w[4 * q + k] = w[k];
        }
#pragma unroll
        for (int j = 0; j < K; ++j) v[j] = (R)to_acc(u.e[j]);
    } else {
#pragma unroll
        for (int j = 0; j < K; ++j) v[j] = j < n ? (R)to_acc(p[j]) : R(0);
    }
}

template <typename T, int K, typename R>
__device__ __forceinline__ void ln_store(T* p, bool vec, int n, const R (&v)[K]) {
    constexpr int kBytes = K * (int)sizeof(T);
    static_assert(kBytes % 16 == 0, "chunks are whole 16-byte vectors");
    if (vec && n == K) {
        union { uint32_t w[kBytes / 4]; T e[K]; } u;
#pragma unroll
        for (int j = 0; j < K; ++j) u.e[j] = Convert<T>::from(v[j]);
#pragma unroll
        for (int q = 0; q < kBytes / 16; ++q) {
            const uint32_t w[4] = {u.w[4 * q], u.w[4 * q + 1], u.w[4 * q + 2], u.w[4 * q + 3]};
            ln_st16((char*)p + 16 * q, w);
        }
    } else {
#pragma unroll
        for (int j = 0; j < K; ++j)
            if (j < n) p[j] = Convert<T>::from(v[j]);
    }
}

// Real elements in the chunk starting at column col0 (0 past the row end or for idle groups).
__device__ __forceinline__ int ln_valid(int64_t col0, int64_t hidden, bool live, int k) {
    const int64_t rem = hidden - col0;
    return !live || rem <= 0 ? 0 : (rem >= k ? k : (int)rem);
}

// ---- group sum ------------------------------------------------------------------------------
// Sums kN values over the G threads of each group; every thread of the group gets the same
// bits. Block-uniform: every thread of the block calls it (G is uniform). `red` holds two
// buffers of kLnMaxWarps * kN slots used alternately, so one barrier per sum suffices: the
// buffer written here was last read two sums ago, before the barrier of the sum in between.
template <int kN, typename R>
__device__ __forceinline__ void ln_group_sum(R (&v)[kN], int group, R* red, int& buf) {
#pragma unroll
    for (int k = 0; k < kN; ++k) v[k] = warp_sum(v[k]);
    if (group > 32) {
        const int warp = (int)threadIdx.x >> 5;
        R* slot = red + buf * (kLnMaxWarps * kN);
        if ((threadIdx.x & 31) == 0) {
#pragma unroll
            for (int k = 0; k < kN; ++k) slot[warp * kN + k] = v[k];
        }
        __syncthreads();
        const int nw = group >> 5;
        const int first = ((int)threadIdx.x / group) * nw;
#pragma unroll
        for (int k = 0; k < kN; ++k) {
            R s = R(0);
            for (int w = 0; w < nw; ++w) s += slot[(first + w) * kN + k];
            v[k] = s;
        }
        buf ^= 1;
    }
}

// ---- forward ------------------------------------------------------------------------------
template <typename TIn, typename TW, typename TRes, int kRms, int kIters>
__global__ void __launch_bounds__(kLnMaxThreads, SSMKIT_LN_FWD_MIN_BLOCKS) layer_norm_fwd(const LayerNormFwdParams p) {
    typedef typename LnTraits<TIn>::acc_t R;
    constexpr int kVec = LnTraits<TIn>::kVec;
    __shared__ R red[2 * kLnMaxWarps];

    const int G = p.group;
    const int t = (int)threadIdx.x % G;
    const int grp = (int)threadIdx.x / G;
    const int rpb = (int)blockDim.x / G;
    const int64_t step = (int64_t)gridDim.x * rpb;
    const int64_t H = p.hidden;
    const R inv_h = R(1) / (R)H;
    const R eps = (R)p.eps;
    const bool vec_x = p.vec_x != 0, vec_res = p.vec_res != 0, vec_y = p.vec_y != 0;
    const bool vec_rout = p.vec_rout != 0, vec_w = p.vec_w != 0;
    const TIn* xs = (const TIn*)p.x;
    const TRes* res = (const TRes*)p.residual;
    const TW* wp = (const TW*)p.weight;
    const TW* bp = (const TW*)p.bias;
    TIn* ys = (TIn*)p.y;
    TRes* rout = (TRes*)p.residual_out;
    int buf = 0;

    // Every thread of the block takes the same number of steps (the group sums hold barriers).
    for (int64_t base = (int64_t)blockIdx.x * rpb; base < p.rows; base += step) {
        const int64_t row = base + grp;
        const bool live = row < p.rows;
        const int64_t r = live ? row : 0;

        // -- s = x + residual, kept in registers; residual_out = s ------------------------------
        R v[kIters][kVec];
        int n[kIters];
#pragma unroll
        for (int i = 0; i < kIters; ++i) {
            const int64_t col0 = ((int64_t)i * G + t) * kVec;
            n[i] = ln_valid(col0, H, live, kVec);
            ln_load<TIn, kVec, R>(xs + r * p.x_row + col0, vec_x, n[i], v[i]);
        }
        if (res != nullptr) {
#pragma unroll
            for (int i = 0; i < kIters; ++i) {
                const int64_t col0 = ((int64_t)i * G + t) * kVec;
                R rv[kVec];
                ln_load<TRes, kVec, R>(res + r * p.res_row + col0, vec_res, n[i], rv);
#pragma unroll
                for (int j = 0; j < kVec; ++j) v[i][j] += rv[j];
            }
        }
        // Statistics and y come from s as residual_out stores it (rounded to a 16-bit TRes):
        // the backward reads residual_out, so it then differentiates exactly what was computed.
        // (With the unrounded sum, as mamba_ssm does, a row whose variance is near the rounding
        // error, H = 1 LayerNorm for one, got dx off by 100x in bf16 on the H100.)
        if (sizeof(TRes) < sizeof(R) && res != nullptr) {
#pragma unroll
            for (int i = 0; i < kIters; ++i)
#pragma unroll
                for (int j = 0; j < kVec; ++j) v[i][j] = (R)to_acc(Convert<TRes>::from(v[i][j]));
        }
        if (rout != nullptr) {
#pragma unroll
            for (int i = 0; i < kIters; ++i) {
                const int64_t col0 = ((int64_t)i * G + t) * kVec;
                ln_store<TRes, kVec, R>(rout + r * p.rout_row + col0, vec_rout, n[i], v[i]);
            }
        }

        // -- statistics (two passes over the registers for LayerNorm) ---------------------------
        R mean = R(0);
        if (!kRms) {
            R s[1] = {R(0)};
#pragma unroll
            for (int i = 0; i < kIters; ++i)
#pragma unroll
                for (int j = 0; j < kVec; ++j) s[0] += v[i][j];
            ln_group_sum<1, R>(s, G, red, buf);
            mean = s[0] * inv_h;
        }
        R ss[1] = {R(0)};
#pragma unroll
        for (int i = 0; i < kIters; ++i)
#pragma unroll
            for (int j = 0; j < kVec; ++j) {
                const R d = j < n[i] ? v[i][j] - mean : R(0);
                ss[0] += d * d;
            }
        ln_group_sum<1, R>(ss, G, red, buf);
        const R rstd = R(1) / sqrt(ss[0] * inv_h + eps);
        if (live && t == 0) {
            if (p.mean != nullptr) ((R*)p.mean)[row] = mean;
            if (p.rstd != nullptr) ((R*)p.rstd)[row] = rstd;
        }

        // -- y = xhat * weight + bias ------------------------------------------------------------
#pragma unroll
        for (int i = 0; i < kIters; ++i) {
            const int64_t col0 = ((int64_t)i * G + t) * kVec;
            R w[kVec], b[kVec];
            ln_load<TW, kVec, R>(wp + col0, vec_w, n[i], w);
            if (bp != nullptr) {
                ln_load<TW, kVec, R>(bp + col0, vec_w, n[i], b);
            } else {
#pragma unroll
                for (int j = 0; j < kVec; ++j) b[j] = R(0);
            }
            R y[kVec];
#pragma unroll
            for (int j = 0; j < kVec; ++j) y[j] = (v[i][j] - mean) * rstd * w[j] + b[j];
            ln_store<TIn, kVec, R>(ys + r * p.y_row + col0, vec_y, n[i], y);
        }
    }
}

// Folds the per-thread column sums acc of a block's groups (fixed order: group 0, 1, ...) and
// stores the block's partial row. One value per thread per round through shared memory
// (kIters * kVec rounds, once per block); block-uniform.
template <int kIters, int kVec, typename R>
__device__ __forceinline__ void ln_fold_store(R (&acc)[kIters][kVec], R* part, int64_t part_row, int64_t H,
                                              int G, int t, int grp, int rpb, R* fold) {
    if (rpb > 1) {
#pragma unroll
        for (int i = 0; i < kIters; ++i)
#pragma unroll
            for (int j = 0; j < kVec; ++j) {
                fold[threadIdx.x] = acc[i][j];
                __syncthreads();
                if (grp == 0) {
                    R sum = fold[t];
                    for (int q = 1; q < rpb; ++q) sum += fold[q * G + t];
                    acc[i][j] = sum;
                }
                __syncthreads();
            }
    }
    if (grp == 0) {
        const int64_t nchunks = (H + kVec - 1) / kVec;
        R* row = part + (int64_t)blockIdx.x * part_row;
#pragma unroll
        for (int i = 0; i < kIters; ++i) {
            const int64_t c = (int64_t)i * G + t;
            // Partial rows are padded to whole chunks and 16-byte aligned: always vectors.
            if (c < nchunks) ln_store<R, kVec, R>(row + c * kVec, true, kVec, acc[i]);
        }
    }
}

// ---- backward -----------------------------------------------------------------------------
template <typename TIn, typename TW, typename TRes, int kRms, int kIters>
__global__ void __launch_bounds__(kLnMaxThreads, SSMKIT_LN_BWD_MIN_BLOCKS) layer_norm_bwd(const LayerNormBwdParams p) {
    typedef typename LnTraits<TIn>::acc_t R;
    constexpr int kVec = LnTraits<TIn>::kVec;
    __shared__ R red[2 * kLnMaxWarps * 2];
    __shared__ R fold[kLnMaxThreads];

    const int G = p.group;
    const int t = (int)threadIdx.x % G;
    const int grp = (int)threadIdx.x / G;
    const int rpb = (int)blockDim.x / G;
    const int64_t step = (int64_t)gridDim.x * rpb;
    const int64_t H = p.hidden;
    const R inv_h = R(1) / (R)H;
    const bool vec_x = p.vec_x != 0, vec_w = p.vec_w != 0, vec_dy = p.vec_dy != 0;
    const bool vec_drout = p.vec_drout != 0, vec_dx = p.vec_dx != 0, vec_dres = p.vec_dres != 0;
    const TRes* xs = (const TRes*)p.x;
    const TW* wp = (const TW*)p.weight;
    const TIn* dys = (const TIn*)p.dy;
    const TRes* drout = (const TRes*)p.dres_out;
    TIn* dxs = (TIn*)p.dx;
    TRes* dres = (TRes*)p.dres;
    const bool want_db = p.db_part != nullptr;
    int buf = 0;

    R dw[kIters][kVec], db[kIters][kVec];
#pragma unroll
    for (int i = 0; i < kIters; ++i)
#pragma unroll
        for (int j = 0; j < kVec; ++j) { dw[i][j] = R(0); db[i][j] = R(0); }

    for (int64_t base = (int64_t)blockIdx.x * rpb; base < p.rows; base += step) {
        const int64_t row = base + grp;
        const bool live = row < p.rows;
        const int64_t r = live ? row : 0;
        const R rstd = live ? ((const R*)p.rstd)[r] : R(0);
        const R mean = (!kRms && live) ? ((const R*)p.mean)[r] : R(0);

        // -- xhat, g = weight * dy; dweight/dbias sums; the two row sums -------------------------
        R xh[kIters][kVec], g[kIters][kVec];
        int n[kIters];
        R s[2] = {R(0), R(0)};
#pragma unroll
        for (int i = 0; i < kIters; ++i) {
            const int64_t col0 = ((int64_t)i * G + t) * kVec;
            n[i] = ln_valid(col0, H, live, kVec);
            R dy[kVec], w[kVec];
            ln_load<TRes, kVec, R>(xs + r * p.x_row + col0, vec_x, n[i], xh[i]);
            ln_load<TIn, kVec, R>(dys + r * p.dy_row + col0, vec_dy, n[i], dy);
            ln_load<TW, kVec, R>(wp + col0, vec_w, n[i], w);
#pragma unroll
            for (int j = 0; j < kVec; ++j) {
                xh[i][j] = j < n[i] ? (xh[i][j] - mean) * rstd : R(0);
                g[i][j] = w[j] * dy[j];
                dw[i][j] += dy[j] * xh[i][j];
                db[i][j] += dy[j];
                s[0] += xh[i][j] * g[i][j];
                s[1] += g[i][j];
            }
        }
        if (kRms) {
            R s1[1] = {s[0]};
            ln_group_sum<1, R>(s1, G, red, buf);
            s[0] = s1[0];
        } else {
            ln_group_sum<2, R>(s, G, red, buf);
        }
        const R c1 = s[0] * inv_h;
        const R c2 = kRms ? R(0) : s[1] * inv_h;

        // -- dx = rstd (g - xhat c1 - c2) + dresidual_out ----------------------------------------
#pragma unroll
        for (int i = 0; i < kIters; ++i) {
            const int64_t col0 = ((int64_t)i * G + t) * kVec;
            R d[kVec];
#pragma unroll
            for (int j = 0; j < kVec; ++j) d[j] = (g[i][j] - (xh[i][j] * c1 + c2)) * rstd;
            if (drout != nullptr) {
                R e[kVec];
                ln_load<TRes, kVec, R>(drout + r * p.drout_row + col0, vec_drout, n[i], e);
#pragma unroll
                for (int j = 0; j < kVec; ++j) d[j] += e[j];
            }
            ln_store<TIn, kVec, R>(dxs + r * p.dx_row + col0, vec_dx, n[i], d);
            if (dres != nullptr) ln_store<TRes, kVec, R>(dres + r * p.dres_row + col0, vec_dres, n[i], d);
        }
    }

    // -- fold the block's groups into one partial row each for dweight and dbias ---------------
    ln_fold_store<kIters, kVec, R>(dw, (R*)p.dw_part, p.part_row, H, G, t, grp, rpb, fold);
    if (want_db) ln_fold_store<kIters, kVec, R>(db, (R*)p.db_part, p.part_row, H, G, t, grp, rpb, fold);
}

// ---- backward, second step: dweight[h] = sum_k dw_part[k, h] (and dbias) -------------------
// Block (32 columns) x (kLnReduceRows slices of the partial rows): each thread sums every
// kLnReduceRows-th partial row of its column, then one thread per column adds the slices in a
// fixed order. Up to ~1000 partial rows: about 32 loads per thread, kept in flight.
constexpr int kLnReduceRows = 32;

template <typename TW>
__global__ void __launch_bounds__(32 * kLnReduceRows) layer_norm_bwd_reduce(const LayerNormReduceParams p) {
    typedef typename Acc<TW>::type R;
    __shared__ R slices[kLnReduceRows][33];
    const int tx = (int)threadIdx.x & 31, ty = (int)threadIdx.x >> 5;
    const int64_t col = (int64_t)blockIdx.x * 32 + tx;
    const bool bias_job = blockIdx.y == 1;
    const R* part = (const R*)(bias_job ? p.db_part : p.dw_part);
    R s = R(0);
    if (col < p.hidden) {
#pragma unroll 4
        for (int64_t k = ty; k < p.parts; k += kLnReduceRows) s += part[k * p.part_row + col];
    }
    slices[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && col < p.hidden) {
        R sum = slices[0][tx];
        for (int k = 1; k < kLnReduceRows; ++k) sum += slices[k][tx];
        ((TW*)(bias_job ? p.dbias : p.dweight))[col] = Convert<TW>::from(sum);
    }
}

}  // namespace ssm
