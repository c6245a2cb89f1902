// Per-row math of the fused CPU SQ op (sq_cpu.cpp; the GPU's is the Triton kernel
// sqdist/quant/kernels/triton_ops.py). Mirrors the references in
// sqdist/quant/weights.py: bwn_reference, twn_reference, kbit_reference,
// quantization_error. Everything is computed in fp32 (sums in fp64) whatever
// the storage dtype; the scale is rounded to the storage dtype before Q is
// formed, so Q, the codes and the errors describe the weight the model uses.
#pragma once
#include <cstdint>
#include <cmath>

#define SQ_HD inline

namespace sqdist {

enum Kind : int64_t { KIND_BWN = 0, KIND_TWN = 1, KIND_KBIT = 2 };

// Bits of the `outputs` argument: which tensors the op writes.
enum Output : int64_t {
  OUT_VALUES = 1,         // hybrid weight: Q where the mask says so, W elsewhere
  OUT_CODES = 2,          // integer-valued codes, storage dtype
  OUT_SCALES = 4,         // per-row scale, storage dtype
  OUT_ERROR_CHANNEL = 8,  // ||W_i - Q_i||_1 / ||W_i||_1, fp32 (m,)
  OUT_ERROR_ELEMENT = 16, // |W_ij - Q_ij| / |W_ij|, fp32 (m, n)
};

enum MaskKind : int32_t { MASK_ALL = 0, MASK_ROW = 1, MASK_ELEMENT = 2 };

// One (m, n) weight and where its results go. Pointers of outputs not asked
// for are null. Rows of all jobs of one call are numbered consecutively from
// row0, so one OpenMP loop covers every layer.
struct Job {
  const void* w;
  void* values;
  void* codes;
  void* scales;
  float* error;
  const bool* mask;
  int64_t m, n;
  int64_t row0;
  int32_t mask_kind;
  int32_t pad_;
};

// Code of one weight x given the row's threshold (TWN) or safe scale (k-bit).
template <int KIND>
SQ_HD float code_of(float x, float thr, float safe, float levels) {
  if (KIND == KIND_BWN) return x >= 0.f ? 1.f : -1.f;  // sign, with 0 -> +1
  if (KIND == KIND_TWN) {  // sign(x) where |x| > thr (x != 0 there), else 0; two selects vectorize
    const float s = x > 0.f ? 1.f : -1.f;
    return fabsf(x) > thr ? s : 0.f;
  }
  // k-bit: division (not a reciprocal) and round-half-even, as torch.round does
  const float c = rintf(x / safe);
  return fminf(fmaxf(c, -levels), levels);
}

// Normalized error |w - q| / |w| (or its row sums). A zero |w| is exact only when q
// is zero too; a zero weight mapped to a nonzero level (BWN maps 0 to +a) has an
// infinite relative error, so SQ never takes it for an exact one.
SQ_HD float relative_error(float diff, float ref) {
  return ref > 0.f ? diff / ref : (diff > 0.f ? INFINITY : 0.f);
}

}  // namespace sqdist
