// SLB's expectation on the CPU in one pass over the logits' own layout (M, n), nothing else kept.
//
//   forward   E_m = sum_j p_mj v_j,  p_m = softmax(t a_m)          (a_m: the n logits of weight m)
//   backward  dL/da_mj = t p_mj (v_j - E_m) dL/dE_m                 (p recomputed from the logits)
//
// The n logits of an element are contiguous, so a softmax over them is a short row: done here for a
// block of elements at once, the probabilities held as (n, block) in a local buffer so that the loops
// run along the block (the compiler vectorizes them, exp included: fast_exp is plain arithmetic;
// AVX-512, AVX2 and x86-64 builds, picked at run time).
// float: fast_exp (relative error below 2e-7 on the softmax's arguments, all <= 0); double: std::exp.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kBlock = 64;

// the block loops are built for AVX-512, AVX2 and plain x86-64 and picked at run time (GCC may fuse
// multiply-adds into FMAs in the AVX builds: the results are held to the reference within tolerance)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SLB_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define SLB_INLINE __attribute__((always_inline)) inline
#else
#define SLB_CLONES
#define SLB_INLINE inline
#endif

// e^x for x <= 0 (float): 2^k e^r, |r| <= ln2 / 2, e^r by its Taylor series to r^7 (error < 1e-8)
SLB_INLINE float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float k = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // rint by the 1.5 2^23 shift (vectorizes)
  const float r = (x - k * 0.693145752f) - k * 1.42860677e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (int32_t(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double fast_exp(double x) { return std::exp(x); }

// p (n, count) = softmax over n of t * a (count rows of n, contiguous), and E (count)
template <typename T, int N>
SLB_INLINE void block_softmax(const T* a, int count, T t, const T* v, T (&p)[N][kBlock], T* e) {
  T mx[kBlock], s[kBlock];
  for (int i = 0; i < count; ++i) {
    T m = a[i * N];
    for (int j = 1; j < N; ++j) m = a[i * N + j] > m ? a[i * N + j] : m;
    mx[i] = m;
    s[i] = 0;
  }
  for (int j = 0; j < N; ++j)
    for (int i = 0; i < count; ++i) {
      p[j][i] = fast_exp(t * (a[i * N + j] - mx[i]));
      s[i] += p[j][i];
    }
  for (int i = 0; i < count; ++i) {
    s[i] = T(1) / s[i];
    e[i] = 0;
  }
  for (int j = 0; j < N; ++j)
    for (int i = 0; i < count; ++i) {
      p[j][i] *= s[i];
      e[i] += p[j][i] * v[j];
    }
}

// blocks [b0, b1) of kBlock elements: E
template <typename T, int N>
SLB_CLONES void forward_blocks(const T* a, T* e, int64_t m, int64_t b0, int64_t b1, T t, const T* v) {
  T p[N][kBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * kBlock;
    const int count = int(std::min<int64_t>(kBlock, m - start));
    block_softmax<T, N>(a + start * N, count, t, v, p, e + start);
  }
}

// blocks [b0, b1): dL/dA
template <typename T, int N>
SLB_CLONES void backward_blocks(const T* a, const T* g, T* ga, int64_t m, int64_t b0, int64_t b1, T t, const T* v) {
  T p[N][kBlock], e[kBlock], tg[kBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * kBlock;
    const int count = int(std::min<int64_t>(kBlock, m - start));
    block_softmax<T, N>(a + start * N, count, t, v, p, e);
    for (int i = 0; i < count; ++i) tg[i] = t * g[start + i];
    T* out = ga + start * N;
    for (int i = 0; i < count; ++i)
      for (int j = 0; j < N; ++j) out[i * N + j] = tg[i] * p[j][i] * (v[j] - e[i]);
  }
}

template <typename T, int N>
void forward_kernel(const T* a, T* e, int64_t m, T t, const T* v) {
  at::parallel_for(0, (m + kBlock - 1) / kBlock, 64,
                   [&](int64_t b0, int64_t b1) { forward_blocks<T, N>(a, e, m, b0, b1, t, v); });
}

template <typename T, int N>
void backward_kernel(const T* a, const T* g, T* ga, int64_t m, T t, const T* v) {
  at::parallel_for(0, (m + kBlock - 1) / kBlock, 64,
                   [&](int64_t b0, int64_t b1) { backward_blocks<T, N>(a, g, ga, m, b0, b1, t, v); });
}

template <typename T, typename F>
void dispatch_n(int64_t n, F&& f) {
  switch (n) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    default: TORCH_CHECK(false, "slb: 2, 4, 8 or 16 levels, got ", n);
  }
}

// the hard phase (argmax): v[argmax_j a_mj] per element, the first maximum (a NaN counts as the maximum,
// as torch.argmax has it); rows [r0, r1) a block of kBlock at a time, the running maximum and its level held per
// row in local arrays so the loop over the block's rows vectorizes (selects, no branch; 2.4x the row-at-a-time
// loop on 9.4 M x 4 logits, 2 threads); torch's argmax reduces one short row at a time
template <typename T, int N>
SLB_CLONES void argmax_levels_rows(const T* a, T* out, int64_t r0, int64_t r1, const T* v) {
  T top[kBlock], val[kBlock];
  for (int64_t s = r0; s < r1; s += kBlock) {
    const int count = int(std::min<int64_t>(kBlock, r1 - s));
    const T* b = a + s * N;
    for (int i = 0; i < count; ++i) {
      top[i] = b[i * N];
      val[i] = v[0];
    }
    for (int j = 1; j < N; ++j) {
      const T vj = v[j];
      for (int i = 0; i < count; ++i) {
        const T x = b[i * N + j];
        const bool take = !(x <= top[i]) & (top[i] == top[i]);  // larger, or a NaN, and no NaN taken before
        top[i] = take ? x : top[i];
        val[i] = take ? vj : val[i];
      }
    }
    for (int i = 0; i < count; ++i) out[s + i] = val[i];
  }
}

// the logged confidence: sum over rows [r0, r1) of max_j softmax(t a_m)_j = 1 / sum_j exp(t (a_mj - max_j a_mj)),
// a block of kBlock rows at a time (the loops along the block vectorize, fast_exp included), in double
template <typename T, int N>
SLB_CLONES double confidence_rows(const T* a, int64_t r0, int64_t r1, T t) {
  T mx[kBlock], s[kBlock];
  double total = 0;
  for (int64_t b = r0; b < r1; b += kBlock) {
    const int count = int(std::min<int64_t>(kBlock, r1 - b));
    const T* x = a + b * N;
    for (int i = 0; i < count; ++i) {
      mx[i] = x[i * N];
      s[i] = 0;
    }
    for (int j = 1; j < N; ++j)
      for (int i = 0; i < count; ++i) mx[i] = x[i * N + j] > mx[i] ? x[i * N + j] : mx[i];
    for (int j = 0; j < N; ++j)
      for (int i = 0; i < count; ++i) s[i] += fast_exp(t * (x[i * N + j] - mx[i]));
    T block = 0;
    for (int i = 0; i < count; ++i) block += T(1) / s[i];
    total += double(block);
  }
  return total;
}

}  // namespace

torch::Tensor slb_argmax_levels(torch::Tensor logits, std::vector<double> levels) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) == int64_t(levels.size()), "slb: logits (M, n), n levels");
  logits = logits.contiguous();
  const int64_t m = logits.size(0), n = logits.size(1);
  auto out = torch::empty({m}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "slb_argmax_levels", [&] {
    std::vector<scalar_t> v(levels.begin(), levels.end());
    const scalar_t* a = logits.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    dispatch_n<scalar_t>(n, [&](auto N) {
      at::parallel_for(0, m, 16384, [&](int64_t r0, int64_t r1) {
        argmax_levels_rows<scalar_t, decltype(N)::value>(a, o, r0, r1, v.data());
      });
    });
  });
  return out;
}

// the mean over the rows of max_j softmax(t a_m)_j (M, n) -> a 0-dim double tensor (finite logits; M = 0: NaN)
torch::Tensor slb_confidence(torch::Tensor logits, double t) {
  TORCH_CHECK(logits.dim() == 2, "slb: logits (M, n)");
  logits = logits.contiguous();
  const int64_t m = logits.size(0), n = logits.size(1);
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "slb_confidence", [&] {
    const scalar_t* a = logits.data_ptr<scalar_t>();
    dispatch_n<scalar_t>(n, [&](auto N) {
      // one partial sum per chunk, added in chunk order: the same value for any number of threads
      const int64_t chunk = 65536, chunks = (m + chunk - 1) / chunk;
      std::vector<double> partial(chunks, 0.0);
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c)
          partial[c] = confidence_rows<scalar_t, decltype(N)::value>(a, c * chunk, std::min(m, (c + 1) * chunk),
                                                                     scalar_t(t));
      });
      for (double p : partial) total += p;
    });
  });
  return torch::tensor(m > 0 ? total / double(m) : std::nan(""), torch::kFloat64);  // the mean of nothing: NaN
}

torch::Tensor slb_forward(torch::Tensor logits, std::vector<double> levels, double t) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) == int64_t(levels.size()), "slb: logits (M, n), n levels");
  logits = logits.contiguous();
  const int64_t m = logits.size(0), n = logits.size(1);
  auto e = torch::empty({m}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "slb_forward", [&] {
    std::vector<scalar_t> v(levels.begin(), levels.end());
    dispatch_n<scalar_t>(n, [&](auto N) {
      forward_kernel<scalar_t, decltype(N)::value>(logits.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(), m,
                                                   scalar_t(t), v.data());
    });
  });
  return e;
}

torch::Tensor slb_backward(torch::Tensor logits, std::vector<double> levels, double t, torch::Tensor grad) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) == int64_t(levels.size()), "slb: logits (M, n), n levels");
  logits = logits.contiguous();
  grad = grad.to(logits.scalar_type()).contiguous();
  const int64_t m = logits.size(0), n = logits.size(1);
  TORCH_CHECK(grad.numel() == m, "slb: one gradient per weight");
  auto ga = torch::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "slb_backward", [&] {
    std::vector<scalar_t> v(levels.begin(), levels.end());
    dispatch_n<scalar_t>(n, [&](auto N) {
      backward_kernel<scalar_t, decltype(N)::value>(logits.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                                                    ga.data_ptr<scalar_t>(), m, scalar_t(t), v.data());
    });
  });
  return ga;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &slb_forward, "SLB forward: E = softmax(t A) v over the last dim of A (M, n)");
  m.def("backward", &slb_backward, "SLB backward: dL/dA = t p (v - E) dL/dE");
  m.def("confidence", &slb_confidence, "SLB: mean over the rows of max_j softmax(t A)_j, A (M, n)");
  m.def("argmax_levels", &slb_argmax_levels, "SLB hard phase: v[argmax_j A_j] over the last dim of A (M, n)");
}
