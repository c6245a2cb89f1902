// CPU implementation of the fused SQ op: OpenMP over the rows of all weights of
// a call, one row at a time through the passes the math needs (the row stays
// in cache between them, so memory sees one read of W and one write per output).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <omp.h>

#include "sq_host.h"

namespace sqdist {
namespace {

// y rounded half to even, as rintf, for |y| <= 2^22, by a rounding that vectorizes on plain
// SSE2 (no libm call): (y + 1.5 * 2^23) - 1.5 * 2^23. Callers clamp y to a small range first.
inline float round_small(float y) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (y + kMagic) - kMagic;
}

// code_of with round_small: clamping to +-(levels + 1) first keeps y in its range and gives the
// same clamped code.
template <int KIND>
inline float cpu_code(float x, float thr, float safe, float levels) {
  if (KIND != KIND_KBIT) return code_of<KIND>(x, thr, safe, levels);
  const float y = std::min(std::max(x / safe, -levels - 1.f), levels + 1.f);
  return std::min(std::max(round_small(y), -levels), levels);
}

template <typename T, int KIND>
void quantize_row(const Job& j, int64_t r, float delta, float levels, float layer_thr, int64_t out) {
  const int64_t n = j.n;
  const T* w = static_cast<const T*>(j.w) + r * n;
  const bool row_q = j.mask_kind == MASK_ALL || (j.mask_kind == MASK_ROW && j.mask[r]);
  if (out == OUT_VALUES && j.mask_kind == MASK_ROW && !row_q) {  // full-precision row of a hybrid weight
    std::memcpy(static_cast<T*>(j.values) + r * n, w, sizeof(T) * n);
    return;
  }
  // pass 1: sum |w| (and max |w| for k-bit)
  double sum = 0.0;
  float amax = 0.f;
  if (KIND == KIND_KBIT) {
#pragma omp simd reduction(+ : sum) reduction(max : amax)
    for (int64_t i = 0; i < n; ++i) {
      const float a = std::fabs(static_cast<float>(w[i]));
      sum += a;
      amax = std::max(amax, a);
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += std::fabs(static_cast<float>(w[i]));
  }
  const float sum_abs = static_cast<float>(sum);
  float scale = 0.f, thr = 0.f, safe = 1.f;
  if (KIND == KIND_BWN) {
    scale = sum_abs / static_cast<float>(n);
  } else if (KIND == KIND_TWN) {
    thr = layer_thr >= 0.f ? layer_thr : delta * (sum_abs / static_cast<float>(n));
    // pass 2: mean |w| over |w| > thr
    double kept_sum = 0.0, kept = 0.0;
#pragma omp simd reduction(+ : kept_sum, kept)
    for (int64_t i = 0; i < n; ++i) {
      const float a = std::fabs(static_cast<float>(w[i]));
      const bool k = a > thr;
      kept_sum += k ? a : 0.f;
      kept += k ? 1.0 : 0.0;
    }
    scale = static_cast<float>(kept_sum) / static_cast<float>(std::max(kept, 1.0));
  } else {
    scale = amax / levels;
    safe = scale > 0.f ? scale : 1.f;
  }
  const T scale_t = static_cast<T>(scale);
  const float sq = static_cast<float>(scale_t);
  if (j.scales) static_cast<T*>(j.scales)[r] = scale_t;
  // pass 3: one simple loop per output (the row is in L1 by now), so each vectorizes
  if (out & OUT_ERROR_CHANNEL) {
    double diff = 0.0;
#pragma omp simd reduction(+ : diff)
    for (int64_t i = 0; i < n; ++i) {
      const float x = static_cast<float>(w[i]);
      diff += std::fabs(x - static_cast<float>(static_cast<T>(sq * cpu_code<KIND>(x, thr, safe, levels))));
    }
    j.error[r] = relative_error(static_cast<float>(diff), sum_abs);
  }
  if (out & OUT_ERROR_ELEMENT) {
    float* e = j.error + r * n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float x = static_cast<float>(w[i]);
      const float a = std::fabs(x);
      const float d = std::fabs(x - static_cast<float>(static_cast<T>(sq * cpu_code<KIND>(x, thr, safe, levels))));
      e[i] = relative_error(d, a);
    }
  }
  if (out & OUT_CODES) {
    T* c = static_cast<T*>(j.codes) + r * n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) c[i] = static_cast<T>(cpu_code<KIND>(static_cast<float>(w[i]), thr, safe, levels));
  }
  if (out & OUT_VALUES) {
    T* v = static_cast<T*>(j.values) + r * n;
    if (j.mask_kind == MASK_ELEMENT) {
      const bool* em = j.mask + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i)
        v[i] = em[i] ? static_cast<T>(sq * cpu_code<KIND>(static_cast<float>(w[i]), thr, safe, levels)) : w[i];
    } else if (row_q) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) v[i] = static_cast<T>(sq * cpu_code<KIND>(static_cast<float>(w[i]), thr, safe, levels));
    } else {
      std::memcpy(v, w, sizeof(T) * n);
    }
  }
}

// delta * mean |W - mean W| over one whole weight (TWN, layer-wide threshold).
template <typename T>
float layer_threshold(const Job& j, float delta, int threads) {
  const T* w = static_cast<const T*>(j.w);
  const int64_t numel = j.m * j.n;
  double s = 0.0;
#pragma omp parallel for simd reduction(+ : s) num_threads(threads) if (numel > 65536)
  for (int64_t i = 0; i < numel; ++i) s += static_cast<float>(w[i]);
  const float mean = static_cast<float>(s / static_cast<double>(numel));
  double d = 0.0;
#pragma omp parallel for simd reduction(+ : d) num_threads(threads) if (numel > 65536)
  for (int64_t i = 0; i < numel; ++i) d += std::fabs(static_cast<float>(w[i]) - mean);
  return delta * static_cast<float>(d / static_cast<double>(numel));
}

template <typename T, int KIND>
void run(const Prepared& p, float delta, float levels, bool layer, int64_t out) {
  const int threads = std::max(1, at::get_num_threads());
  const size_t k = p.jobs.size();
  std::vector<float> thr(k, -1.f);
  if (KIND == KIND_TWN && layer)
    for (size_t t = 0; t < k; ++t) thr[t] = layer_threshold<T>(p.jobs[t], delta, threads);
  // Cut the rows of all weights into chunks of similar element counts, so small
  // layers share a parallel region and large rows do not unbalance the threads.
  const int64_t target = std::max<int64_t>(p.total_elems / (threads * 8), 16384);
  std::vector<std::pair<int64_t, int64_t>> chunks;  // (first global row, end global row)
  int64_t start = 0, acc = 0;
  for (size_t t = 0; t < k; ++t) {
    for (int64_t r = 0; r < p.jobs[t].m; ++r) {
      acc += p.jobs[t].n;
      const int64_t g = p.jobs[t].row0 + r + 1;
      if (acc >= target) { chunks.emplace_back(start, g); start = g; acc = 0; }
    }
  }
  if (start < p.total_rows) chunks.emplace_back(start, p.total_rows);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (nchunks > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    // job holding the chunk's first row
    size_t t = std::upper_bound(p.jobs.begin(), p.jobs.end(), chunks[c].first,
                                [](int64_t g, const Job& j) { return g < j.row0; }) - p.jobs.begin() - 1;
    for (int64_t g = chunks[c].first; g < chunks[c].second; ++g) {
      while (g >= p.jobs[t].row0 + p.jobs[t].m) ++t;  // also skips weights with m = 0
      quantize_row<T, KIND>(p.jobs[t], g - p.jobs[t].row0, delta, levels, thr[t], out);
    }
  }
}

TensorList4 quantize_cpu(const std::vector<at::Tensor>& ws, int64_t kind, double delta, int64_t levels,
                         bool layer_threshold, const std::vector<at::Tensor>& masks, int64_t outputs) {
  Prepared p = prepare(ws, kind, levels, masks, outputs, at::kCPU);
  if (!ws.empty() && p.total_rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ws[0].scalar_type(), "sqdist_quantize_cpu", [&] {
      const float d = static_cast<float>(delta), l = static_cast<float>(levels);
      if (kind == KIND_BWN) run<scalar_t, KIND_BWN>(p, d, l, layer_threshold, outputs);
      else if (kind == KIND_TWN) run<scalar_t, KIND_TWN>(p, d, l, layer_threshold, outputs);
      else run<scalar_t, KIND_KBIT>(p, d, l, layer_threshold, outputs);
    });
  }
  return {p.values, p.codes, p.scales, p.errors};
}

int64_t max_threads() { return std::max(1, at::get_num_threads()); }

// the element loops below are built for AVX-512, AVX2 and plain x86-64, picked at run time (the codes,
// scales and Q have no multiply-add for GCC to fuse into an FMA; the error sums may be fused)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SQDIST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SQDIST_CLONES
#endif

// k-bit mse scale search: errors[i, j] = sum_e (clamp(round(w_ie / s_ij), -L, L) s_ij - w_ie)^2 with
// s_ij = safe_i * ratios_ij, every candidate of a row while the row is in cache (the PyTorch form,
// kbit_mse._best_ratio_reference, makes a pass over all of w per candidate). Same division, rounding
// (half to even) and products as that form, summed in float in another order.
SQDIST_CLONES float row_mse(const float* row, int64_t n, float s, float lv) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t e = 0; e < n; ++e) {
    const float y = std::min(std::max(row[e] / s, -lv), lv);
    const float d = round_small(y) * s - row[e];
    acc += d * d;
  }
  return acc;
}

// LSQ (Esser et al.): y = round(clamp(x / s, qmin, qmax)) s in one pass; backward in one pass over x
// and dL/dy: dL/dx = dL/dy where qmin < x / s < qmax (0 outside), and sum dL/dy (round(clamp(v)) - v
// inside, the bound outside) for the step (summed in double; the caller scales it). The same division
// and rounding (half to even) as the PyTorch form in sqdist/quant/lsq.py.
SQDIST_CLONES void lsq_forward_range(const float* x, float* y, int64_t n, float s, float lo, float hi) {
  for (int64_t e = 0; e < n; ++e) {
    const float v = std::min(std::max(x[e] / s, lo), hi);
    y[e] = round_small(v) * s;
  }
}

SQDIST_CLONES double lsq_backward_range(const float* x, const float* g, float* gx, int64_t n, float s, float lo,
                                        float hi) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t e = 0; e < n; ++e) {
    const float v = x[e] / s;
    const bool inside = v > lo && v < hi;
    const float c = std::min(std::max(v, lo), hi);
    const float term = round_small(c) - (inside ? v : 0.f);
    gx[e] = inside ? g[e] : 0.f;
    acc += double(g[e] * term);
  }
  return acc;
}

float step_value(const at::Tensor& step) {
  TORCH_CHECK(step.numel() == 1, "lsq: one step per tensor");
  return step.to(at::kCPU, at::kFloat).item<float>();
}

at::Tensor lsq_forward(const at::Tensor& x_in, const at::Tensor& step, int64_t qmin, int64_t qmax) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "lsq: float32 input");
  const auto x = x_in.contiguous();
  auto y = at::empty_like(x);
  const float s = step_value(step), lo = float(qmin), hi = float(qmax);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, x.numel(), 16384,
                   [&](int64_t b, int64_t e) { lsq_forward_range(xp + b, yp + b, e - b, s, lo, hi); });
  return y;
}

std::tuple<at::Tensor, at::Tensor> lsq_backward(const at::Tensor& x_in, const at::Tensor& g_in, const at::Tensor& step,
                                                int64_t qmin, int64_t qmax) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && g_in.scalar_type() == at::kFloat, "lsq: float32 input and gradient");
  const auto x = x_in.contiguous(), g = g_in.contiguous();
  TORCH_CHECK(x.numel() == g.numel(), "lsq: one gradient per element");
  auto gx = at::empty_like(x);
  const float s = step_value(step), lo = float(qmin), hi = float(qmax);
  const float* xp = x.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* gxp = gx.data_ptr<float>();
  const int64_t n = x.numel(), grain = 16384, chunks = (n + grain - 1) / grain;
  std::vector<double> partial(std::max<int64_t>(chunks, 1), 0.0);  // fixed chunks: the same sum for any thread count
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * grain, e = std::min(n, b + grain);
      partial[c] = lsq_backward_range(xp + b, gp + b, gxp + b, e - b, s, lo, hi);
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return {gx, at::scalar_tensor(total, x.options().dtype(at::kDouble))};
}

// k-bit codes at each row's searched ratio (kbit_mse.kbit_codes_at_ratio): scale_i = safe_i * ratio_i with
// safe_i = max|w_i| / L (1 for a zero row), codes = clamp(round(w / scale), -L, L); a zero row gets
// scale 0. One pass for the max and one for the codes while the row is in cache; the same
// divisions and rounding as the PyTorch form. values: the first output is codes * scale (the
// quantized weight, one product per element) instead of the codes.
SQDIST_CLONES void row_codes_at(const float* row, float* codes, int64_t n, float scale, float lv, float times) {
  for (int64_t e = 0; e < n; ++e) {
    const float y = std::min(std::max(row[e] / scale, -lv), lv);
    codes[e] = round_small(y) * times;
  }
}

SQDIST_CLONES float row_absmax(const float* row, int64_t n) {
  float m = 0.f;
#pragma omp simd reduction(max : m)
  for (int64_t e = 0; e < n; ++e) m = std::max(m, std::fabs(row[e]));
  return m;
}

std::tuple<at::Tensor, at::Tensor> kbit_codes_at_ratio(const at::Tensor& w_in, const at::Tensor& ratio_in,
                                                       int64_t levels, bool values) {
  TORCH_CHECK(w_in.dim() == 2 && w_in.scalar_type() == at::kFloat, "kbit_codes_at_ratio: w (m, n) float32");
  const auto w = w_in.contiguous(), ratio = ratio_in.contiguous().to(at::kFloat);
  const int64_t m = w.size(0), n = w.size(1);
  TORCH_CHECK(ratio.numel() == m, "kbit_codes_at_ratio: ratio (m,)");
  auto codes = at::empty_like(w);
  auto scales = at::empty({m}, w.options());
  const float* wp = w.data_ptr<float>();
  const float* rp = ratio.data_ptr<float>();
  float* cp = codes.data_ptr<float>();
  float* sp = scales.data_ptr<float>();
  const float lv = static_cast<float>(levels);
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float top = row_absmax(wp + r * n, n) / lv;
      const float scale = (top > 0.f ? top : 1.f) * rp[r];
      sp[r] = top > 0.f ? scale : 0.f;
      row_codes_at(wp + r * n, cp + r * n, n, scale, lv, values ? sp[r] : 1.f);
    }
  });
  return {codes, scales};
}

at::Tensor mse_errors(const at::Tensor& w_in, const at::Tensor& safe_in, const at::Tensor& ratios_in, int64_t levels) {
  TORCH_CHECK(w_in.dim() == 2 && w_in.scalar_type() == at::kFloat, "mse_errors: w (m, n) float32");
  const auto w = w_in.contiguous(), safe = safe_in.contiguous().to(at::kFloat),
             ratios = ratios_in.contiguous().to(at::kFloat);
  const int64_t m = w.size(0), n = w.size(1), k = ratios.size(1);
  TORCH_CHECK(safe.numel() == m && ratios.size(0) == m, "mse_errors: safe (m,), ratios (m, k)");
  auto errors = at::empty({m, k}, w.options());
  const float* wp = w.data_ptr<float>();
  const float* sp = safe.data_ptr<float>();
  const float* rp = ratios.data_ptr<float>();
  float* ep = errors.data_ptr<float>();
  const float lv = static_cast<float>(levels);
  at::parallel_for(0, m, std::max<int64_t>(1, 32768 / std::max<int64_t>(n * k, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < k; ++j) ep[r * k + j] = row_mse(wp + r * n, n, sp[r] * rp[r * k + j], lv);
  });
  return errors;
}

}  // namespace
}  // namespace sqdist

TORCH_LIBRARY(sqdist_cpu, m) {
  m.def(sqdist::kSchema);
  m.def("source_hash() -> str", &sqdist::source_hash);
  m.def("max_threads() -> int", &sqdist::max_threads);
  m.def("mse_errors(Tensor w, Tensor safe, Tensor ratios, int levels) -> Tensor");
  m.def("kbit_codes_at_ratio(Tensor w, Tensor ratio, int levels, bool values=False) -> (Tensor, Tensor)");
  m.def("lsq_forward(Tensor x, Tensor step, int qmin, int qmax) -> Tensor");
  m.def("lsq_backward(Tensor x, Tensor grad, Tensor step, int qmin, int qmax) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sqdist_cpu, CPU, m) {
  m.impl("quantize", &sqdist::quantize_cpu);
  m.impl("mse_errors", &sqdist::mse_errors);
  m.impl("kbit_codes_at_ratio", &sqdist::kbit_codes_at_ratio);
  m.impl("lsq_forward", &sqdist::lsq_forward);
  m.impl("lsq_backward", &sqdist::lsq_backward);
}
