// CUDA implementation of the fused SQ op (sm_80, sm_90).
//
// One launch covers every row of every weight of a call. A row belongs to a
// "row group" of G warps: G = 1 (a warp per row, 8 rows per 256-thread block)
// when there are enough rows to fill the GPU, else G = 8 (a block per row).
// Per-row sums are fp64 per thread, then warp shuffles (and shared memory
// across the warps of a block); the passes after the first re-read the row
// from L1/L2, so DRAM sees about one read of W and one write per output.
#include <cuda_runtime.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "sq_common.h"

namespace sqdist {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Index of the weight holding global row g: the last job with row0 <= g.
__device__ __forceinline__ int find_job(const Job* jobs, int njobs, int64_t g) {
  int lo = 0, hi = njobs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (jobs[mid].row0 <= g) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ double warp_sum(double v) {
  // xor butterfly: every lane ends with the same bits (addition commutes)
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Reductions over one row group; G == kWarps means the whole block is the group.
template <int G>
__device__ __forceinline__ double group_sum(double v, double* smem) {
  v = warp_sum(v);
  if (G == 1) return v;
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
  __syncthreads();
  double t = 0.0;
  for (int k = 0; k < G; ++k) t += smem[k];  // same order in every thread
  __syncthreads();
  return t;
}

template <int G>
__device__ __forceinline__ float group_max(float v, float* smem) {
  v = warp_max(v);
  if (G == 1) return v;
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = 0.f;
  for (int k = 0; k < G; ++k) t = fmaxf(t, smem[k]);
  __syncthreads();
  return t;
}

template <typename T, int KIND, int G>
__global__ void __launch_bounds__(kThreads)
quantize_kernel(const Job* __restrict__ jobs, int njobs, int64_t total_rows, float delta, float levels,
                const float* __restrict__ layer_thr, int64_t out) {
  static_assert(G == 1 || G == kWarps, "a row group is one warp or the whole block");
  __shared__ double smem_d[kWarps];
  __shared__ float smem_f[kWarps];
  const int64_t g = static_cast<int64_t>(blockIdx.x) * (kWarps / G) + (threadIdx.x >> 5) / G;
  if (g >= total_rows) return;  // uniform over the row group
  const int t = find_job(jobs, njobs, g);
  const Job j = jobs[t];
  const int64_t r = g - j.row0, n = j.n;
  const int tid = G == 1 ? (threadIdx.x & 31) : threadIdx.x;
  constexpr int S = 32 * G;
  const T* __restrict__ w = static_cast<const T*>(j.w) + r * n;
  const bool row_q = j.mask_kind == MASK_ALL || (j.mask_kind == MASK_ROW && j.mask[r]);
  if (out == OUT_VALUES && j.mask_kind == MASK_ROW && !row_q) {  // full-precision row of a hybrid weight
    T* __restrict__ v = static_cast<T*>(j.values) + r * n;
    for (int64_t i = tid; i < n; i += S) v[i] = w[i];
    return;
  }
  // pass 1: sum |w| (and max |w| for k-bit)
  double s = 0.0;
  float amax = 0.f;
#pragma unroll 4
  for (int64_t i = tid; i < n; i += S) {
    const float a = fabsf(static_cast<float>(w[i]));
    s += a;
    if (KIND == KIND_KBIT) amax = fmaxf(amax, a);
  }
  const float sum_abs = static_cast<float>(group_sum<G>(s, smem_d));
  if (KIND == KIND_KBIT) amax = group_max<G>(amax, smem_f);
  float scale = 0.f, thr = 0.f, safe = 1.f;
  if (KIND == KIND_BWN) {
    scale = sum_abs / static_cast<float>(n);
  } else if (KIND == KIND_TWN) {
    thr = layer_thr ? layer_thr[t] : delta * (sum_abs / static_cast<float>(n));
    // pass 2: mean |w| over |w| > thr
    double ks = 0.0, kc = 0.0;
#pragma unroll 4
    for (int64_t i = tid; i < n; i += S) {
      const float a = fabsf(static_cast<float>(w[i]));
      if (a > thr) { ks += a; kc += 1.0; }
    }
    ks = group_sum<G>(ks, smem_d);
    kc = group_sum<G>(kc, smem_d);
    scale = static_cast<float>(ks) / static_cast<float>(kc > 1.0 ? kc : 1.0);
  } else {
    scale = amax / levels;
    safe = scale > 0.f ? scale : 1.f;
  }
  const T scale_t = static_cast<T>(scale);
  const float sq = static_cast<float>(scale_t);
  if (j.scales && tid == 0) static_cast<T*>(j.scales)[r] = scale_t;
  // pass 3: codes, Q (or the hybrid weight) and the error
  T* __restrict__ codes = j.codes ? static_cast<T*>(j.codes) + r * n : nullptr;
  T* __restrict__ values = j.values ? static_cast<T*>(j.values) + r * n : nullptr;
  float* __restrict__ elem_err = (out & OUT_ERROR_ELEMENT) ? j.error + r * n : nullptr;
  const bool* __restrict__ emask = j.mask_kind == MASK_ELEMENT ? j.mask + r * n : nullptr;
  double d = 0.0;
#pragma unroll 4
  for (int64_t i = tid; i < n; i += S) {
    const T wt = w[i];
    const float x = static_cast<float>(wt);
    const float c = code_of<KIND>(x, thr, safe, levels);
    const T q_t = static_cast<T>(sq * c);
    const float e = fabsf(x - static_cast<float>(q_t));
    d += e;
    if (codes) codes[i] = static_cast<T>(c);
    if (values) values[i] = (emask ? emask[i] : row_q) ? q_t : wt;
    if (elem_err) {
      const float a = fabsf(x);
      elem_err[i] = relative_error(e, a);
    }
  }
  if (out & OUT_ERROR_CHANNEL) {
    d = group_sum<G>(d, smem_d);
    if (tid == 0) j.error[r] = relative_error(static_cast<float>(d), sum_abs);
  }
}

// Per row: sum w (MODE 0) or sum |w - mean of its weight| (MODE 1); a warp per row.
template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads)
row_partial_kernel(const Job* __restrict__ jobs, int njobs, int64_t total_rows, const float* __restrict__ mean,
                   double* __restrict__ partial) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (g >= total_rows) return;
  const int t = find_job(jobs, njobs, g);
  const Job j = jobs[t];
  const T* __restrict__ w = static_cast<const T*>(j.w) + (g - j.row0) * j.n;
  const float mu = MODE == 1 ? mean[t] : 0.f;
  double s = 0.0;
  for (int64_t i = threadIdx.x & 31; i < j.n; i += 32) {
    const float x = static_cast<float>(w[i]);
    s += MODE == 0 ? x : fabsf(x - mu);
  }
  s = warp_sum(s);
  if ((threadIdx.x & 31) == 0) partial[g] = s;
}

// One block per weight: mean (MODE 0) or the TWN threshold delta * mean |w - mean| (MODE 1),
// summing the row partials in a fixed order (deterministic).
template <int MODE>
__global__ void __launch_bounds__(kThreads)
job_reduce_kernel(const Job* __restrict__ jobs, const double* __restrict__ partial, float delta,
                  float* __restrict__ result) {
  __shared__ double smem[kThreads];
  const Job j = jobs[blockIdx.x];
  double s = 0.0;
  for (int64_t r = threadIdx.x; r < j.m; r += kThreads) s += partial[j.row0 + r];
  smem[threadIdx.x] = s;
  __syncthreads();
  for (int k = kThreads / 2; k > 0; k >>= 1) {
    if (threadIdx.x < k) smem[threadIdx.x] += smem[threadIdx.x + k];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const float m = static_cast<float>(smem[0] / (static_cast<double>(j.m) * static_cast<double>(j.n)));
    result[blockIdx.x] = MODE == 0 ? m : delta * m;
  }
}

template <typename T, int KIND>
void launch_kind(const Job* jobs, int njobs, int64_t total_rows, bool block_per_row, float delta, float levels,
                 const float* layer_thr, int64_t out, cudaStream_t stream) {
  if (block_per_row) {
    quantize_kernel<T, KIND, kWarps><<<static_cast<unsigned>(total_rows), kThreads, 0, stream>>>(
        jobs, njobs, total_rows, delta, levels, layer_thr, out);
  } else {
    const unsigned blocks = static_cast<unsigned>((total_rows + kWarps - 1) / kWarps);
    quantize_kernel<T, KIND, 1><<<blocks, kThreads, 0, stream>>>(jobs, njobs, total_rows, delta, levels, layer_thr, out);
  }
}

template <typename T>
void launch_typed(const Job* jobs, int njobs, int64_t total_rows, bool block_per_row, int64_t kind, float delta,
                  float levels, const float* layer_thr, int64_t out, cudaStream_t stream) {
  if (kind == KIND_BWN) launch_kind<T, KIND_BWN>(jobs, njobs, total_rows, block_per_row, delta, levels, layer_thr, out, stream);
  else if (kind == KIND_TWN) launch_kind<T, KIND_TWN>(jobs, njobs, total_rows, block_per_row, delta, levels, layer_thr, out, stream);
  else launch_kind<T, KIND_KBIT>(jobs, njobs, total_rows, block_per_row, delta, levels, layer_thr, out, stream);
}

template <typename T>
void threshold_typed(const Job* jobs, int njobs, int64_t total_rows, float delta, double* partial, float* mean,
                     float* thr, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((total_rows + kWarps - 1) / kWarps);
  row_partial_kernel<T, 0><<<blocks, kThreads, 0, stream>>>(jobs, njobs, total_rows, mean, partial);
  job_reduce_kernel<0><<<njobs, kThreads, 0, stream>>>(jobs, partial, delta, mean);
  row_partial_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(jobs, njobs, total_rows, mean, partial);
  job_reduce_kernel<1><<<njobs, kThreads, 0, stream>>>(jobs, partial, delta, thr);
}

}  // namespace

// dtype: 0 float32, 1 float16, 2 bfloat16. jobs: device copy of the job table.
void launch_quantize(const Job* jobs, int njobs, int64_t total_rows, bool block_per_row, int dtype, int64_t kind,
                     float delta, float levels, const float* layer_thr, int64_t out, cudaStream_t stream) {
  if (dtype == 0) launch_typed<float>(jobs, njobs, total_rows, block_per_row, kind, delta, levels, layer_thr, out, stream);
  else if (dtype == 1) launch_typed<c10::Half>(jobs, njobs, total_rows, block_per_row, kind, delta, levels, layer_thr, out, stream);
  else launch_typed<c10::BFloat16>(jobs, njobs, total_rows, block_per_row, kind, delta, levels, layer_thr, out, stream);
}

// TWN layer-wide thresholds: thr[t] = delta * mean |W_t - mean W_t| (mean, partial: scratch).
void launch_layer_threshold(const Job* jobs, int njobs, int64_t total_rows, int dtype, float delta, double* partial,
                            float* mean, float* thr, cudaStream_t stream) {
  if (dtype == 0) threshold_typed<float>(jobs, njobs, total_rows, delta, partial, mean, thr, stream);
  else if (dtype == 1) threshold_typed<c10::Half>(jobs, njobs, total_rows, delta, partial, mean, thr, stream);
  else threshold_typed<c10::BFloat16>(jobs, njobs, total_rows, delta, partial, mean, thr, stream);
}

}  // namespace sqdist
