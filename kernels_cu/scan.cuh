// scan.cuh: the scan primitive every recurrent kernel shares.
//
// h_t = a_t * h_{t-1} + b_t is a composition of affine maps. A map is a pair (a, b); applying
// (a1, b1) first and then (a2, b2) gives (a2*a1, a2*b1 + b2). The forward and the reverse
// (backward) scans both compose with this one rule; only the order of the elements differs.
#pragma once
#include "common.cuh"

namespace ssm {

__device__ __forceinline__ float shfl_up(float v, int d) { return __shfl_up_sync(0xffffffffu, v, d); }
__device__ __forceinline__ double shfl_up(double v, int d) { return __shfl_up_sync(0xffffffffu, v, d); }
template <typename R> __device__ __forceinline__ complex<R> shfl_up(complex<R> v, int d) {
    return {shfl_up(v.re, d), shfl_up(v.im, d)};
}
__device__ __forceinline__ float shfl_down(float v, int d) { return __shfl_down_sync(0xffffffffu, v, d); }
__device__ __forceinline__ double shfl_down(double v, int d) { return __shfl_down_sync(0xffffffffu, v, d); }
template <typename R> __device__ __forceinline__ complex<R> shfl_down(complex<R> v, int d) {
    return {shfl_down(v.re, d), shfl_down(v.im, d)};
}
__device__ __forceinline__ float shfl_idx(float v, int src) { return __shfl_sync(0xffffffffu, v, src); }
__device__ __forceinline__ double shfl_idx(double v, int src) { return __shfl_sync(0xffffffffu, v, src); }
template <typename R> __device__ __forceinline__ complex<R> shfl_idx(complex<R> v, int src) {
    return {shfl_idx(v.re, src), shfl_idx(v.im, src)};
}
__device__ __forceinline__ float shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
__device__ __forceinline__ double shfl_xor(double v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
template <typename R> __device__ __forceinline__ complex<R> shfl_xor(complex<R> v, int m) {
    return {shfl_xor(v.re, m), shfl_xor(v.im, m)};
}

template <typename S> __device__ __forceinline__ S one() { return S(1); }
template <typename S> __device__ __forceinline__ S zero() { return S(0); }

// Exclusive scan of affine maps over the 32 lanes, lane order = time order. On return (a, b)
// is the composition of the maps of lanes 0..lane-1 (identity (1, 0) on lane 0). The gate
// type G may be real while the value type S is complex (a real gate on a complex state).
template <typename G, typename S>
__device__ __forceinline__ void warp_exclusive_scan(G& a, S& b, int lane) {
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
        G a_prev = shfl_up(a, d);
        S b_prev = shfl_up(b, d);
        if (lane >= d) {
            b = a * b_prev + b;
            a = a * a_prev;
        }
    }
    G a_ex = shfl_up(a, 1);
    S b_ex = shfl_up(b, 1);
    a = lane == 0 ? one<G>() : a_ex;
    b = lane == 0 ? zero<S>() : b_ex;
}

// The same over lanes in reverse order (lane 31 first): on return (a, b) composes the maps of
// lanes 31..lane+1. Used by backward passes, whose adjoint runs from the end of time.
template <typename G, typename S>
__device__ __forceinline__ void warp_exclusive_scan_reverse(G& a, S& b, int lane) {
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
        G a_next = shfl_down(a, d);
        S b_next = shfl_down(b, d);
        if (lane + d < 32) {
            b = a * b_next + b;
            a = a * a_next;
        }
    }
    G a_ex = shfl_down(a, 1);
    S b_ex = shfl_down(b, 1);
    a = lane == 31 ? one<G>() : a_ex;
    b = lane == 31 ? zero<S>() : b_ex;
}

template <typename T> __device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int m = 16; m >= 1; m /= 2) v = v + shfl_xor(v, m);
    return v;
}

}  // namespace ssm
