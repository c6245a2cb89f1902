// ESB's quantization between two scale searches on the CPU (esb_codes_refined in __init__.py), two
// passes a row while it is in cache:
//
//   pass 1   c_e = esb_round(w_e / scale_i): |v| with its float mantissa rounded to linear_bits bits
//            (below 1: |v| + 1 rounded, minus 1), capped at the top level, v's sign;
//            num = sum w_e c_e, den = sum c_e^2 (double)
//   pass 2   s_i = den > 0 ? num / den : scale_i (float32); out_e = c_e, or c_e * s_i (values)
//
// Each c_e is the same float32 arithmetic as the PyTorch form (no multiply-add the compiler could fuse;
// the double sums may be fused, which changes nothing: a float32 product is exact in double); the
// sums are in double, as there, so s_i is
// the same float32 value but where the two summation orders round across a float32 boundary (about
// 1e-13 relative apart). A row with scale <= 0 gets c = 0.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ESB_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ESB_CLONES
#endif

// pass 1 of one row: the levels into c, the two sums
ESB_CLONES void row_levels(const float* w, float* c, int64_t n, float safe, uint32_t add, uint32_t mask, float top,
                           bool keep, double& num_out, double& den_out) {
  double num = 0, den = 0;
#pragma omp simd reduction(+ : num, den)
  for (int64_t e = 0; e < n; ++e) {
    const float v = w[e] / safe;
    float a = std::fabs(v);
    const float small = a < 1.f ? 1.f : 0.f;
    a += small;
    uint32_t bits;
    std::memcpy(&bits, &a, 4);
    bits = (bits + add) & mask;
    std::memcpy(&a, &bits, 4);
    a -= small;
    a = std::min(a, top);
    const float ce = keep ? std::copysign(a, v) : std::copysign(a, v) * 0.f;
    c[e] = ce;
    num += double(w[e]) * double(ce);
    den += double(ce) * double(ce);
  }
  num_out = num;
  den_out = den;
}

ESB_CLONES void row_scale(float* c, int64_t n, float s) {
  for (int64_t e = 0; e < n; ++e) c[e] = c[e] * s;
}

}  // namespace

// (c or c * s, s): w (m, n) float32, scale (m,); see the top of the file
std::vector<torch::Tensor> refined(torch::Tensor w, torch::Tensor scale, int64_t linear_bits, double top,
                                   bool values) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat, "esb refined: w (m, n) float32");
  TORCH_CHECK(linear_bits >= 0 && linear_bits < 22, "esb refined: linear_bits in [0, 22)");
  w = w.contiguous();
  auto sc = scale.to(torch::kFloat).contiguous();
  const int64_t m = w.size(0), n = w.size(1);
  TORCH_CHECK(sc.numel() == m, "esb refined: scale (m,)");
  auto out = torch::empty_like(w);
  auto s_out = torch::empty({m}, w.options());
  const float* wp = w.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* so = s_out.data_ptr<float>();
  const uint32_t add = (uint32_t(1) << (22 - linear_bits)) - 1, mask = ~((uint32_t(1) << (23 - linear_bits)) - 1);
  const float topf = float(top);
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float s0 = sp[r];
      const bool keep = s0 > 0.f;
      double num, den;
      row_levels(wp + r * n, op + r * n, n, keep ? s0 : 1.f, add, mask, topf, keep, num, den);
      const float numf = float(num), denf = float(den);
      const float s = denf > 0.f ? numf / std::max(denf, 1e-30f) : s0;
      so[r] = s;
      if (values) row_scale(op + r * n, n, s);
    }
  });
  return {out, s_out};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("refined", &refined, "ESB levels at each row's kept scale and the refitted scale (values: levels * scale)");
}
