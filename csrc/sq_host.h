// Argument checks and output allocation of the CPU op.
#pragma once
#include <ATen/ATen.h>
#include <string>
#include <tuple>
#include <vector>

#include "sq_common.h"

namespace sqdist {

using TensorList4 = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>,
                               std::vector<at::Tensor>, std::vector<at::Tensor>>;

// Schema of the op (sqdist_cpu; the Triton module sqdist.quant.kernels.triton_ops takes the same arguments):
//   ws       (m, n) weights, contiguous, one device, one dtype (fp32/fp16/bf16)
//   kind     0 bwn, 1 twn, 2 kbit
//   delta    TWN threshold factor; levels: k-bit positive levels 2^(k-1)-1
//   layer_threshold  TWN threshold delta * mean|W - mean W| over each whole weight
//   masks    [] (everything quantized) or one per weight: bool, numel 0 (all),
//            (m,) per row, or (m, n) per element
//   outputs  bits of Output
// Returns (values, codes, scales, errors), each [] when not asked for.
constexpr const char* kSchema =
    "quantize(Tensor[] ws, int kind, float delta, int levels, bool layer_threshold, "
    "Tensor[] masks, int outputs) -> (Tensor[], Tensor[], Tensor[], Tensor[])";

struct Prepared {
  std::vector<Job> jobs;
  std::vector<at::Tensor> values, codes, scales, errors;
  int64_t total_rows = 0;
  int64_t total_elems = 0;
  int64_t max_n = 0;
};

inline Prepared prepare(const std::vector<at::Tensor>& ws, int64_t kind, int64_t levels,
                        const std::vector<at::Tensor>& masks, int64_t outputs, at::DeviceType dev) {
  TORCH_CHECK(kind >= KIND_BWN && kind <= KIND_KBIT, "sqdist quantize: kind=", kind, "; allowed: 0 (bwn), 1 (twn), 2 (kbit)");
  TORCH_CHECK(kind != KIND_KBIT || levels >= 1, "sqdist quantize: levels=", levels, "; allowed: >= 1");
  TORCH_CHECK(outputs > 0 && outputs < 32, "sqdist quantize: outputs=", outputs, "; allowed: bits of 1|2|4|8|16");
  TORCH_CHECK(!((outputs & OUT_ERROR_CHANNEL) && (outputs & OUT_ERROR_ELEMENT)),
              "sqdist quantize: ask for channel or element error, not both");
  TORCH_CHECK(masks.empty() || masks.size() == ws.size(), "sqdist quantize: ", masks.size(),
              " masks for ", ws.size(), " weights; allowed: none or one per weight");
  Prepared p;
  const size_t k = ws.size();
  p.jobs.resize(k);
  if (outputs & OUT_VALUES) p.values.reserve(k);
  if (outputs & OUT_CODES) p.codes.reserve(k);
  if (outputs & OUT_SCALES) p.scales.reserve(k);
  if (outputs & (OUT_ERROR_CHANNEL | OUT_ERROR_ELEMENT)) p.errors.reserve(k);
  for (size_t t = 0; t < k; ++t) {
    const at::Tensor& w = ws[t];
    TORCH_CHECK(w.dim() == 2, "sqdist quantize: weight ", t, " has shape ", w.sizes(), "; allowed: (m, n)");
    TORCH_CHECK(w.is_contiguous(), "sqdist quantize: weight ", t, " is not contiguous");
    TORCH_CHECK(w.device().type() == dev, "sqdist quantize: weight ", t, " is on ", w.device(), "; this op runs on ", dev);
    TORCH_CHECK(w.device() == ws[0].device(), "sqdist quantize: weights on ", ws[0].device(), " and ", w.device());
    TORCH_CHECK(w.scalar_type() == ws[0].scalar_type(), "sqdist quantize: weights of dtypes ", ws[0].scalar_type(),
                " and ", w.scalar_type(), "; one call takes one dtype");
    const auto st = w.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "sqdist quantize: dtype ", st,
                "; allowed: float32, float16, bfloat16");
    Job& j = p.jobs[t];
    j.m = w.size(0);
    j.n = w.size(1);
    j.row0 = p.total_rows;
    j.w = w.data_ptr();
    j.mask = nullptr;
    j.mask_kind = MASK_ALL;
    if (!masks.empty() && masks[t].numel() > 0) {
      const at::Tensor& mk = masks[t];
      TORCH_CHECK(mk.scalar_type() == at::kBool && mk.is_contiguous() && mk.device() == w.device(),
                  "sqdist quantize: mask ", t, " must be a contiguous bool tensor on ", w.device());
      if (mk.dim() == 1 && mk.size(0) == j.m) {
        j.mask_kind = MASK_ROW;
      } else if (mk.dim() == 2 && mk.size(0) == j.m && mk.size(1) == j.n) {
        j.mask_kind = MASK_ELEMENT;
      } else {
        TORCH_CHECK(false, "sqdist quantize: mask ", t, " has shape ", mk.sizes(), " for a weight ", w.sizes(),
                    "; allowed: (m,) or (m, n)");
      }
      j.mask = mk.data_ptr<bool>();
    }
    at::Tensor v, c, s, e;
    j.values = j.codes = j.scales = nullptr;
    j.error = nullptr;
    if (outputs & OUT_VALUES) { v = at::empty_like(w); j.values = v.data_ptr(); p.values.push_back(v); }
    if (outputs & OUT_CODES) { c = at::empty_like(w); j.codes = c.data_ptr(); p.codes.push_back(c); }
    if (outputs & OUT_SCALES) { s = at::empty({j.m}, w.options()); j.scales = s.data_ptr(); p.scales.push_back(s); }
    if (outputs & OUT_ERROR_CHANNEL) {
      e = at::empty({j.m}, w.options().dtype(at::kFloat));
      j.error = e.data_ptr<float>();
      p.errors.push_back(e);
    } else if (outputs & OUT_ERROR_ELEMENT) {
      e = at::empty({j.m, j.n}, w.options().dtype(at::kFloat));
      j.error = e.data_ptr<float>();
      p.errors.push_back(e);
    }
    p.total_rows += j.m;
    p.total_elems += j.m * j.n;
    if (j.n > p.max_n) p.max_n = j.n;
  }
  return p;
}

// The csrc/ hash the op was built from (-DSQDIST_SOURCE_HASH=..., passed unquoted because
// build tools strip quotes: stringify it); sqdist compares it with the sources to spot a stale build.
inline std::string source_hash() {
#ifdef SQDIST_SOURCE_HASH
#define SQDIST_STR2(x) #x
#define SQDIST_STR(x) SQDIST_STR2(x)
  return SQDIST_STR(SQDIST_SOURCE_HASH);
#else
  return "";
#endif
}

}  // namespace sqdist
