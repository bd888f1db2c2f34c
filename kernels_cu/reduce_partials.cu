// reduce_partials.cu: out[o, i] = sum_k part[o, k, i], in a fixed order (deterministic), cast to
// the output's storage type. The backward kernels write per-block / per-batch partial sums
// instead of using float atomics; this folds them. Memory-bound: one coalesced pass over the
// partials (consecutive threads take consecutive i).
//
// Grid: x covers `inner` (blockDim.x threads each), y covers `outer` (folded into x past 65535).
// Complex partials are summed as pairs of reals (the host doubles `inner`).
#include "common.cuh"

namespace ssm {

struct ReduceParams {
    const void* part;    // (outer, K, inner), contiguous, Acc
    void* out;           // (outer, inner), contiguous, Out
    int64_t outer, K, inner;
};

template <typename Acc, typename Out>
__global__ void reduce_partials(const ReduceParams p) {
    const int64_t total = p.outer * p.inner;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t o = e / p.inner, i = e - o * p.inner;
        const Acc* src = (const Acc*)p.part + o * p.K * p.inner + i;
        Acc acc = Acc(0);
        for (int64_t k = 0; k < p.K; ++k) acc += src[k * p.inner];
        ((Out*)p.out)[e] = Convert<Out>::from(acc);
    }
}

}  // namespace ssm
