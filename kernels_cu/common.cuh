// common.cuh: what every ssmkit kernel shares. Self-contained on purpose: NVRTC provides no
// system headers we rely on, so 16-bit floats travel as raw 16-bit words and are converted by
// the small helpers below (one PTX cvt each), and complex numbers are a 2-field struct.
//
// Conventions: all element offsets are int64 (B*D*L exceeds 2^31 at real sizes); strides in
// the params structs are in elements, not bytes; accumulation and recurrent state are fp32
// (fp64 for fp64 inputs).
#pragma once

typedef long long int64_t;
typedef unsigned long long uint64_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef unsigned short uint16_t;

#ifndef SSMKIT_SOURCES_HASH
#define SSMKIT_SOURCES_HASH 0ull
#endif

namespace ssm {

// ---- 16-bit float storage types -----------------------------------------------------------
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(double x) { return (float)x; }
__device__ __forceinline__ float to_float(bf16 x) { return __uint_as_float(((uint32_t)x.bits) << 16); }
__device__ __forceinline__ float to_float(f16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

// Convert the accumulator type back to a storage type (round to nearest even).
template <typename T> struct Convert;
template <> struct Convert<float> {
    __device__ __forceinline__ static float from(float x) { return x; }
    __device__ __forceinline__ static float from(double x) { return (float)x; }
};
template <> struct Convert<double> {
    __device__ __forceinline__ static double from(double x) { return x; }
    __device__ __forceinline__ static double from(float x) { return (double)x; }
};
template <> struct Convert<bf16> {
    __device__ __forceinline__ static bf16 from(float x) {
        bf16 r;
#if __CUDA_ARCH__ >= 800
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
#else
        uint32_t u = __float_as_uint(x);
        if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu)) { r.bits = 0x7fc0; return r; }
        u += 0x7fffu + ((u >> 16) & 1u);
        r.bits = (uint16_t)(u >> 16);
#endif
        return r;
    }
};
template <> struct Convert<f16> {
    __device__ __forceinline__ static f16 from(float x) {
        f16 r;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
        return r;
    }
};

// Compute type for a storage type: fp32 for 16/32-bit floats, fp64 for fp64.
template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ float to_acc(bf16 x) { return to_float(x); }
__device__ __forceinline__ float to_acc(f16 x) { return to_float(x); }

// ---- complex ------------------------------------------------------------------------------
template <typename R>
struct complex {
    R re, im;
    complex() = default;
    __device__ __forceinline__ complex(R r) : re(r), im(0) {}
    __device__ __forceinline__ complex(R r, R i) : re(r), im(i) {}
};
template <typename R> __device__ __forceinline__ complex<R> operator+(complex<R> a, complex<R> b) { return {a.re + b.re, a.im + b.im}; }
template <typename R> __device__ __forceinline__ complex<R> operator-(complex<R> a, complex<R> b) { return {a.re - b.re, a.im - b.im}; }
template <typename R> __device__ __forceinline__ complex<R> operator*(complex<R> a, complex<R> b) {
    return {a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re};
}
template <typename R> __device__ __forceinline__ complex<R> operator*(complex<R> a, R s) { return {a.re * s, a.im * s}; }
template <typename R> __device__ __forceinline__ complex<R> operator*(R s, complex<R> a) { return {a.re * s, a.im * s}; }
template <typename R> __device__ __forceinline__ complex<R>& operator+=(complex<R>& a, complex<R> b) { a.re += b.re; a.im += b.im; return a; }

__device__ __forceinline__ float conj(float x) { return x; }
__device__ __forceinline__ double conj(double x) { return x; }
template <typename R> __device__ __forceinline__ complex<R> conj(complex<R> a) { return {a.re, -a.im}; }
__device__ __forceinline__ float real(float x) { return x; }
__device__ __forceinline__ double real(double x) { return x; }
template <typename R> __device__ __forceinline__ R real(complex<R> a) { return a.re; }

template <typename A, typename B> struct IsSame { static constexpr bool value = false; };
template <typename A> struct IsSame<A, A> { static constexpr bool value = true; };

template <typename T> struct RealOf { typedef T type; };
template <typename R> struct RealOf<complex<R>> { typedef R type; };
template <typename T> struct IsComplex { static constexpr bool value = false; };
template <typename R> struct IsComplex<complex<R>> { static constexpr bool value = true; };

// ---- math ---------------------------------------------------------------------------------
constexpr float kLog2e = 1.4426950408889634f;

// 2^x with the special-function unit (ex2.approx: ~2 ulp, flushes denormals to 0). The scans
// spend one of these per (b, d, l, n): it is the op's throughput floor.
__device__ __forceinline__ float exp2_fast(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ double exp2_fast(double x) { return exp2(x); }

__device__ __forceinline__ float softplus(float x) { return x <= 20.f ? log1pf(expf(x)) : x; }
__device__ __forceinline__ double softplus(double x) { return x <= 20.0 ? log1p(exp(x)) : x; }
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
template <typename T> __device__ __forceinline__ T silu(T x) { return x * sigmoid(x); }

// Fast fp32 versions for the per-element epilogues (special-function unit: ~2 ulp). fp64 keeps
// the accurate ones. softplus keeps log1p's accuracy for tiny exp(x) with the classic
// correction log1p(e) = log(u) * e / (u - 1), u = 1 + e (u - 1 is exact).
__device__ __forceinline__ float rcp_fast(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float log2_fast(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float sigmoid_fast(float x) { return rcp_fast(1.f + exp2_fast(-x * kLog2e)); }
__device__ __forceinline__ double sigmoid_fast(double x) { return sigmoid(x); }
__device__ __forceinline__ float silu_fast(float x) { return x * sigmoid_fast(x); }
__device__ __forceinline__ double silu_fast(double x) { return silu(x); }
__device__ __forceinline__ float softplus_fast(float x) {
    if (x > 20.f) return x;
    const float e = exp2_fast(x * kLog2e);
    const float u = 1.f + e;
    const float lu = log2_fast(u) * 0.6931471805599453f;
    return u == 1.f ? e : lu * (e * rcp_fast(u - 1.f));
}
__device__ __forceinline__ double softplus_fast(double x) { return softplus(x); }
// d/dx silu(x) = s (1 + x (1 - s)) with s = sigmoid(x)
template <typename T> __device__ __forceinline__ T silu_grad(T x) {
    T s = sigmoid(x);
    return s * (T(1) + x * (T(1) - s));
}

}  // namespace ssm
