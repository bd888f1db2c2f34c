// linear_scan.cu: h_t = a_t * h_{t-1} + b_t along the last axis of (R, L) rows, forward or
// reverse, real or complex. Also the backward: the adjoint is a reverse scan of dh whose gate
// at t is conj(a_{t+1}) (flags kShiftGate/kConjGate below), which the host reuses.
//
// Grid: one warp per row; blockDim = (32, kWarps); grid.x = ceil(R / kWarps).
// Each lane owns kItems consecutive steps of a chunk of 32 * kItems steps; chunks run in time
// order with the carried state broadcast from lane 31. Reverse mode walks logical time
// p = 0..L-1 over physical index t = L-1-p, so the same code serves both directions.
#include "scan.cuh"

namespace ssm {

struct LinearScanParams {
    const void* a;
    const void* b;
    const void* initial;   // (R,) or null
    void* h;
    int64_t rows, L;
    int64_t a_row_stride, a_l_stride;
    int64_t b_row_stride, b_l_stride;
    int64_t h_row_stride, h_l_stride;
    int64_t initial_stride;
    int32_t reverse;       // scan from t = L-1 down to 0
    int32_t shift_gate;    // the gate at t is a_{t+1} in the scan direction's "previous" sense (backward)
    int32_t conj_gate;     // use conj(a) (complex backward)
    int32_t pad_;
};

template <typename T> struct LinearScanTraits {
    // 8 items per lane: 32-byte loads of fp32 per lane, 256-step chunks. Not tuned: this kernel
    // is memory-bound with one FMA per element.
    static constexpr int kItems = 8;
};

template <typename T, typename S>
__device__ __forceinline__ S load_as(const T* p) { return S(to_acc(*p)); }

// Storage T -> state S. Complex storage uses complex<float|double>; 16-bit real storage is
// widened to fp32.
template <typename T> struct StateOf { typedef typename Acc<T>::type type; };
template <typename R> struct StateOf<complex<R>> { typedef complex<R> type; };

template <typename T> __device__ __forceinline__ typename StateOf<T>::type load_state(const T* p) { return to_acc(*p); }
template <> __device__ __forceinline__ complex<float> load_state<complex<float>>(const complex<float>* p) { return *p; }
template <> __device__ __forceinline__ complex<double> load_state<complex<double>>(const complex<double>* p) { return *p; }

template <typename T> struct StoreAs {
    template <typename S> __device__ __forceinline__ static T from(S v) { return Convert<T>::from(v); }
};
template <typename R> struct StoreAs<complex<R>> {
    __device__ __forceinline__ static complex<R> from(complex<R> v) { return v; }
};

template <typename T>
__global__ void linear_scan(const LinearScanParams p) {
    typedef typename StateOf<T>::type S;
    constexpr int kItems = LinearScanTraits<T>::kItems;
    constexpr int kChunk = 32 * kItems;
    const int lane = threadIdx.x;
    const int64_t row = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= p.rows) return;  // whole warp leaves together: the row is warp-uniform

    const T* a = (const T*)p.a + row * p.a_row_stride;
    const T* b = (const T*)p.b + row * p.b_row_stride;
    T* h = (T*)p.h + row * p.h_row_stride;
    S carry = p.initial ? load_state((const T*)p.initial + row * p.initial_stride) : zero<S>();
    const int64_t L = p.L;
    // In shift mode the gate of logical step q is the element one step later in time order,
    // i.e. physical index t+1 for reverse scans; beyond the end it is unused (carry is 0).
    const int64_t gate_offset = p.shift_gate ? (p.reverse ? 1 : -1) : 0;

    for (int64_t c0 = 0; c0 < L; c0 += kChunk) {
        S g[kItems], x[kItems];
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
            int64_t q = c0 + lane * kItems + i;
            if (q < L) {
                int64_t t = p.reverse ? L - 1 - q : q;
                int64_t tg = t + gate_offset;
                S gv = (tg >= 0 && tg < L) ? load_state(a + tg * p.a_l_stride) : zero<S>();
                g[i] = p.conj_gate ? conj(gv) : gv;
                x[i] = load_state(b + t * p.b_l_stride);
            } else {
                g[i] = one<S>();
                x[i] = zero<S>();
            }
        }
        S A = one<S>(), Bv = zero<S>();
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
            Bv = g[i] * Bv + x[i];
            A = g[i] * A;
        }
        warp_exclusive_scan(A, Bv, lane);
        S hv = A * carry + Bv;
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
            hv = g[i] * hv + x[i];
            int64_t q = c0 + lane * kItems + i;
            if (q < L) {
                int64_t t = p.reverse ? L - 1 - q : q;
                h[t * p.h_l_stride] = StoreAs<T>::from(hv);
            }
        }
        carry = shfl_idx(hv, 31);
    }
}

}  // namespace ssm
