// Registers the CUDA implementation of the fused SQ op as torch.ops.sqdist_cuda.quantize:
// checks arguments, allocates outputs, copies the job table to the device and launches
// the kernels of sq_cuda_kernel.cu on the current stream.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>

#include "sq_host.h"

namespace sqdist {

void launch_quantize(const Job* jobs, int njobs, int64_t total_rows, bool block_per_row, int dtype, int64_t kind,
                     float delta, float levels, const float* layer_thr, int64_t out, cudaStream_t stream);
void launch_layer_threshold(const Job* jobs, int njobs, int64_t total_rows, int dtype, float delta, double* partial,
                            float* mean, float* thr, cudaStream_t stream);

namespace {

TensorList4 quantize_cuda(const std::vector<at::Tensor>& ws, int64_t kind, double delta, int64_t levels,
                          bool layer_threshold, const std::vector<at::Tensor>& masks, int64_t outputs) {
  Prepared p = prepare(ws, kind, levels, masks, outputs, at::kCUDA);
  if (ws.empty() || p.total_rows == 0) return {p.values, p.codes, p.scales, p.errors};
  const at::Device device = ws[0].device();
  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  // job table: pinned host buffer -> device, asynchronously on the current stream
  const int64_t bytes = static_cast<int64_t>(sizeof(Job) * p.jobs.size());
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), p.jobs.data(), bytes);
  at::Tensor table = host.to(device, /*non_blocking=*/true);
  const Job* jobs = reinterpret_cast<const Job*>(table.data_ptr());
  const int njobs = static_cast<int>(p.jobs.size());
  const auto st = ws[0].scalar_type();
  const int dtype = st == at::kFloat ? 0 : st == at::kHalf ? 1 : 2;
  at::Tensor thr;
  if (kind == KIND_TWN && layer_threshold) {
    at::Tensor partial = at::empty({p.total_rows}, ws[0].options().dtype(at::kDouble));
    thr = at::empty({2 * njobs}, ws[0].options().dtype(at::kFloat));
    launch_layer_threshold(jobs, njobs, p.total_rows, dtype, static_cast<float>(delta), partial.data_ptr<double>(),
                           thr.data_ptr<float>() + njobs, thr.data_ptr<float>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // A warp per row fills the GPU only with many rows; long rows or few rows get a block each.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
  const bool block_per_row = p.max_n > 8192 || p.total_rows < static_cast<int64_t>(sms) * 32;
  launch_quantize(jobs, njobs, p.total_rows, block_per_row, dtype, kind, static_cast<float>(delta),
                  static_cast<float>(levels), thr.defined() ? thr.data_ptr<float>() : nullptr, outputs, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {p.values, p.codes, p.scales, p.errors};
}

}  // namespace
}  // namespace sqdist

TORCH_LIBRARY(sqdist_cuda, m) {
  m.def(sqdist::kSchema);
  m.def("source_hash() -> str", &sqdist::source_hash);
}

TORCH_LIBRARY_IMPL(sqdist_cuda, CUDA, m) { m.impl("quantize", &sqdist::quantize_cuda); }
