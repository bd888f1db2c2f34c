// reduce_partials.cu: out_j[o, i] = sum_k part_j[o, k, i] for up to kReduceJobs jobs in one
// launch, each in a fixed order (deterministic) and cast to its output's storage type. The
// backward kernels write per-block / per-batch partial sums instead of float atomics; this folds
// them. One launch for all of a backward's folds: each launch from Python costs ~6 us of host
// time, against a few microseconds of GPU time for these small folds.
//
// Memory-bound: one coalesced pass over the partials (consecutive threads take consecutive i).
// Grid-stride over the jobs' concatenated outputs; job j owns [start_j, start_j + outer_j * inner_j).
// Complex partials are summed as pairs of reals (the host doubles `inner`).
#include "common.cuh"

namespace ssm {

constexpr int kReduceJobs = 6;

struct ReduceParams {
    const void* part[kReduceJobs];   // (outer, K, inner), contiguous, Acc
    void* out[kReduceJobs];          // (outer, inner), contiguous, storage type out_type
    int64_t outer[kReduceJobs], K[kReduceJobs], inner[kReduceJobs];
    int64_t start[kReduceJobs + 1];  // prefix sums of outer * inner; start[n_jobs] = total
    int32_t out_type[kReduceJobs];   // 0 float, 1 bf16, 2 f16, 3 double (Acc = double only)
    int32_t n_jobs;
};

template <typename Acc>
__global__ void reduce_partials(const ReduceParams p) {
    const int64_t total = p.start[p.n_jobs];
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (int64_t)gridDim.x * blockDim.x) {
        int j = 0;
#pragma unroll
        for (int k = 1; k < kReduceJobs; ++k) j += (k < p.n_jobs && e >= p.start[k]) ? 1 : 0;
        const int64_t local = e - p.start[j], inner = p.inner[j], K = p.K[j];
        const int64_t o = local / inner, i = local - o * inner;
        const Acc* src = (const Acc*)p.part[j] + o * K * inner + i;
        Acc acc = Acc(0);
        for (int64_t k = 0; k < K; ++k) acc += src[k * inner];
        switch (p.out_type[j]) {
            case 0: ((float*)p.out[j])[local] = Convert<float>::from(acc); break;
            case 1: ((bf16*)p.out[j])[local] = Convert<bf16>::from(acc); break;
            case 2: ((f16*)p.out[j])[local] = Convert<f16>::from(acc); break;
            default: ((double*)p.out[j])[local] = Convert<double>::from(acc); break;
        }
    }
}

}  // namespace ssm
