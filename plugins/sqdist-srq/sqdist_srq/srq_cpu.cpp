// SRQ's estimator on the CPU, one pass over the elements (OpenMP), nothing of size numel x codes.
//
// Every element e has a grid "level" l (index[e], or 0 without index): step s_l = alpha * mult_l,
// codes k in [qmin_l, qmax_l], grid points s_l * (k + off_l) (off 0: the integer grid, 0.5: the
// symmetric grid of DropBits), noise scale tau_l = |sigma| / s_l (+ the floor) in units of s_l.
// With u = x / s_l - off_l:
//   forward   y = s_l * (clamp(rint(u), qmin, qmax) + off)
//   backward  E = sum_k k pi_k over a window of codes around the mode c (see window_half_width in
//             __init__.py: the mass outside it is below float32 precision), pi_k ∝ F_k G_{k-1},
//             F_k = sigmoid(t_k), G_k = 1 - F_k, t_k = (k + 1/2 - u) / tau (boundary of code k),
//             dE/du = 1/tau Cov_pi(k, F_{k-1} - G_k), dE/dtau = 1/tau Cov_pi(k, F_{k-1} t_{k-1} - G_k t_k)
//             gx = g dE/du; galpha += g mult (c + off - (u + off) dE/du - tau0 dE/dtau); gsigma += g dE/dtau
// u is clamped to 20 tau beyond the grid's outer boundaries: further out pi no longer depends on u
// (to a relative 2e-9) and x gets no gradient. The exponentials: two per element (the boundaries next
// to u), the others by the factor exp(-1/tau) per code (a table per level).
// Tabulated backward (spacing h > 0 for a level): dE/du and dE/dtau depend on u only (tau is the
// level's), so they are computed as above at nodes umin + i h over [umin, umax] and each element
// interpolates the four nodes around its u (cubic Lagrange: error below h^4 / 24 max|f''''|, and with
// h = tau / 32 that is under float32 rounding). The caller picks h, or 0 (exact per element) where
// the table would cost more than it saves (few elements, or tiny tau: many nodes).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int kMaxCodes = 256;

// the element loops are built for AVX-512, AVX2 and plain x86-64 and picked at run time; GCC may fuse
// a multiply-add into an FMA in the AVX builds (_build.CFLAGS): the gradients are held to the reference
// within float tolerance, not bit for bit
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SRQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define SRQ_INLINE __attribute__((always_inline)) inline
#else
#define SRQ_CLONES
#define SRQ_INLINE inline
#endif

// clamp(rint(u), qmin, qmax), rint half to even by the 1.5 2^p shift (no libm call, vectorizes): u is
// clamped to [qmin - 1, qmax + 1] first, which leaves the clamped result as it is
template <typename T>
SRQ_INLINE T code_of(T u, long qmin, long qmax) {
  constexpr T kMagic = sizeof(T) == 4 ? T(12582912.0) : T(6755399441055744.0);
  const T y = std::min(std::max(u, T(qmin - 1)), T(qmax + 1));
  return std::min(std::max((y + kMagic) - kMagic, T(qmin)), T(qmax));
}

struct Level {
  double step, tau, tau0, mult, off;
  long qmin, qmax, K;
  double umin, umax;        // u is clamped to [umin, umax]
  std::vector<double> ratio;  // ratio[j] = exp(-j / tau)
  long nodes = 0;             // tabulated: nodes umin + i h, i < nodes (0: exact per element)
  double inv_h = 0;
  std::vector<double> table;  // (dE/du, dE/dtau) at each node, interleaved
};

template <typename T>
SRQ_INLINE void element_grads(T u, const Level& L, T& c_out, double& dEdu, double& dEdtau, bool& clamped);

void build_table(Level& L, double h) {
  const double width = L.umax - L.umin;
  L.nodes = std::max(long(std::ceil(width / h)), 3L) + 1;
  const double hh = width / double(L.nodes - 1);  // the last node is umax
  L.inv_h = 1.0 / hh;
  L.table.assign(2 * L.nodes, 0.0);
  at::parallel_for(0, L.nodes, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double c, d1, d2;
      bool clamped;
      const double u = std::min(L.umin + double(i) * hh, L.umax);
      element_grads<double>(u, L, c, d1, d2, clamped);
      L.table[2 * i] = d1;
      L.table[2 * i + 1] = d2;
    }
  });
}

// dE/du, dE/dtau of one element from the level's table; c and the clamping as in element_grads
template <typename T>
SRQ_INLINE void table_grads(T u, const Level& L, T& c_out, double& dEdu, double& dEdtau) {
  c_out = code_of<T>(u, L.qmin, L.qmax);
  double uc = double(u);
  const bool clamped = uc < L.umin || uc > L.umax;
  uc = std::min(std::max(uc, L.umin), L.umax);
  const double p = (uc - L.umin) * L.inv_h;
  const long i = std::min(std::max(long(p), 1L), L.nodes - 3);
  const double f = p - double(i);  // nodes i-1 .. i+2 at -1, 0, 1, 2
  const double fm = f + 1, f1 = f - 1, f2 = f - 2;
  const double w0 = -f * f1 * f2 * (1.0 / 6), w1 = fm * f1 * f2 * 0.5, w2 = -fm * f * f2 * 0.5,
               w3 = fm * f * f1 * (1.0 / 6);
  const double* t = L.table.data() + 2 * (i - 1);
  dEdu = clamped ? 0.0 : w0 * t[0] + w1 * t[2] + w2 * t[4] + w3 * t[6];
  dEdtau = w0 * t[1] + w1 * t[3] + w2 * t[5] + w3 * t[7];
}

std::vector<Level> make_levels(const torch::Tensor& steps, const torch::Tensor& taus, const torch::Tensor& tau0s,
                               const std::vector<double>& mults, const std::vector<double>& offs,
                               const std::vector<int64_t>& qmins, const std::vector<int64_t>& qmaxs,
                               const std::vector<int64_t>& halfwidths,
                               const std::vector<double>& spacings = {}) {
  auto s = steps.to(torch::kDouble).contiguous(), t = taus.to(torch::kDouble).contiguous(),
       t0 = tau0s.to(torch::kDouble).contiguous();
  std::vector<Level> levels(mults.size());
  for (size_t l = 0; l < levels.size(); ++l) {
    Level& L = levels[l];
    L.step = s.data_ptr<double>()[l];
    L.tau = t.data_ptr<double>()[l];
    L.tau0 = t0.data_ptr<double>()[l];
    L.mult = mults[l];
    L.off = offs[l];
    L.qmin = qmins[l];
    L.qmax = qmaxs[l];
    L.K = halfwidths[l];
    TORCH_CHECK(L.qmax - L.qmin + 1 <= kMaxCodes, "srq: at most 256 codes");
    L.umin = L.qmin - 0.5 - 20.0 * L.tau;
    L.umax = L.qmax + 0.5 + 20.0 * L.tau;
    L.ratio.resize(L.qmax - L.qmin + 3);
    for (size_t j = 0; j < L.ratio.size(); ++j) L.ratio[j] = std::exp(-double(j) / L.tau);
    if (l < spacings.size() && spacings[l] > 0) build_table(L, spacings[l]);
  }
  return levels;
}

template <typename T>
SRQ_CLONES void forward_range(const T* x, const uint8_t* index, T* y, int64_t begin, int64_t end,
                              const std::vector<Level>& levels, const std::vector<T>& step_t) {
  for (int64_t e = begin; e < end; ++e) {
    const int l = index ? index[e] : 0;
    const Level& L = levels[l];
    const T s = step_t[l];
    T u = x[e] / s - T(L.off);
    y[e] = s * (code_of<T>(u, L.qmin, L.qmax) + T(L.off));
  }
}

template <typename T>
void forward_kernel(const T* x, const uint8_t* index, T* y, int64_t n, const std::vector<Level>& levels,
                    const std::vector<T>& step_t) {
  at::parallel_for(0, n, 4096,
                   [&](int64_t begin, int64_t end) { forward_range<T>(x, index, y, begin, end, levels, step_t); });
}

// dE/du and dE/dtau of one element, in double: one pass over the window's boundaries, then one over
// its codes with the sums of w, k w, w s, k w s (k counted from the mode: small, no cancellation).
template <typename T>
SRQ_INLINE void element_grads(T u, const Level& L, T& c_out, double& dEdu, double& dEdtau, bool& clamped) {
  const double tau = L.tau, inv_tau = 1.0 / L.tau;
  const T c = code_of<T>(u, L.qmin, L.qmax);
  c_out = c;
  double uc = double(u);
  clamped = uc < L.umin || uc > L.umax;
  uc = std::min(std::max(uc, L.umin), L.umax);
  const long ci = long(c);
  const long lo = std::max(L.qmin, ci - L.K), hi = std::min(L.qmax, ci + L.K);
  const long nb = hi - lo + 2;  // boundaries lo-1 .. hi
  double F[kMaxCodes + 2], G[kMaxCodes + 2], t[kMaxCodes + 2];
  // first boundary at or above uc: k_a = ceil(uc - 1/2), as an index j_a = k_a - (lo - 1) in [0, nb]
  long ja = long(std::ceil(uc - 0.5)) - (lo - 1);
  ja = std::min(std::max(ja, 0L), nb);
  const double t0 = ((lo - 1) + 0.5 - uc) * inv_tau;
  for (long j = 0; j < nb; ++j) t[j] = t0 + double(j) * inv_tau;
  if (ja < nb) {  // boundaries above u: q = exp(-t) <= 1
    const double q0 = std::exp(-t[ja]);
    for (long j = ja; j < nb; ++j) {
      const double q = q0 * L.ratio[j - ja], f = 1.0 / (1.0 + q);
      F[j] = f;
      G[j] = q * f;
    }
  }
  if (ja > 0) {  // boundaries below u: p = exp(t) <= 1
    const double p0 = std::exp(t[ja - 1]);
    for (long j = ja - 1; j >= 0; --j) {
      const double p = p0 * L.ratio[ja - 1 - j], g = 1.0 / (1.0 + p);
      F[j] = p * g;
      G[j] = g;
    }
  }
  double Z = 0, S = 0, W1 = 0, K1 = 0, W2 = 0, K2 = 0;
  for (long k = lo; k <= hi; ++k) {
    const long j = k - lo + 1;
    const double w = F[j] * G[j - 1];
    if (w == 0) continue;  // also where t is large: no 0 * inf
    const double o = double(k - ci);
    const double s1 = F[j - 1] - G[j], s2 = F[j - 1] * t[j - 1] - G[j] * t[j];
    Z += w;
    S += o * w;
    W1 += w * s1;
    K1 += o * w * s1;
    W2 += w * s2;
    K2 += o * w * s2;
  }
  const double iz = 1.0 / Z, Eo = S * iz;  // E - c
  // Cov(k, s) = sum (k - E) w s / Z
  dEdu = clamped ? 0.0 : (K1 - Eo * W1) * iz * inv_tau;
  dEdtau = (K2 - Eo * W2) * iz * inv_tau;
}

template <typename T>
SRQ_CLONES double soft_range(const T* x, const T* g, int64_t begin, int64_t end, T s_lo, long lo_min, long lo_max,
                             T s_hi, long hi_min, long hi_max);

template <typename T>
SRQ_CLONES void backward_range(const T* x, const uint8_t* index, const T* g, T* gx, int64_t begin, int64_t end,
                               const std::vector<Level>& levels, const std::vector<T>& step_t, int soft_lo,
                               int soft_hi, double& ga, double& gs, double& gf) {
  for (int64_t e = begin; e < end; ++e) {
    const int l = index ? index[e] : 0;
    const Level& L = levels[l];
    const T s = step_t[l];
    const T u = x[e] / s - T(L.off);
    T c;
    double dEdu, dEdtau;
    if (L.nodes) {
      table_grads<T>(u, L, c, dEdu, dEdtau);
    } else {
      bool clamped;
      element_grads<T>(u, L, c, dEdu, dEdtau, clamped);
    }
    const double ge = double(g[e]);
    gx[e] = T(ge * dEdu);
    ga += ge * L.mult * ((double(c) + L.off) - (double(u) + L.off) * dEdu - L.tau0 * dEdtau);
    gs += ge * dEdtau;
  }
  if (soft_lo >= 0)
    gf += soft_range<T>(x, g, begin, end, step_t[soft_lo], levels[soft_lo].qmin, levels[soft_lo].qmax,
                        step_t[soft_hi], levels[soft_hi].qmin, levels[soft_hi].qmax);
}

// the learned width's gradient over [begin, end): d/df of (1 - f) y_lo + f y_hi = g (y_hi - y_lo), both
// integer grids, every element whatever its own level (a loop of its own: no per-element level, it vectorizes)
template <typename T>
SRQ_CLONES double soft_range(const T* x, const T* g, int64_t begin, int64_t end, T s_lo, long lo_min, long lo_max,
                             T s_hi, long hi_min, long hi_max) {
  double gf = 0;
#pragma omp simd reduction(+ : gf)
  for (int64_t e = begin; e < end; ++e) {
    const T yl = s_lo * code_of<T>(x[e] / s_lo, lo_min, lo_max);
    const T yh = s_hi * code_of<T>(x[e] / s_hi, hi_min, hi_max);
    gf += double(g[e]) * double(yh - yl);
  }
  return gf;
}

template <typename T>
void backward_kernel(const T* x, const uint8_t* index, const T* g, T* gx, int64_t n, const std::vector<Level>& levels,
                     const std::vector<T>& step_t, int soft_lo, int soft_hi, double& galpha, double& gsigma,
                     double& gsoft) {
  const int threads = at::get_num_threads();
  std::vector<double> acc(3 * threads, 0.0);
  at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
    double ga = 0, gs = 0, gf = 0;
    for (int64_t b = begin; b < end; b += 4096)  // blocks: the soft loop re-reads x and g from the cache
      backward_range<T>(x, index, g, gx, b, std::min(end, b + 4096), levels, step_t, soft_lo, soft_hi, ga, gs, gf);
    const int tid = at::get_thread_num();
    acc[3 * tid] += ga;
    acc[3 * tid + 1] += gs;
    acc[3 * tid + 2] += gf;
  });
  galpha = gsigma = gsoft = 0;
  for (int i = 0; i < threads; ++i) {
    galpha += acc[3 * i];
    gsigma += acc[3 * i + 1];
    gsoft += acc[3 * i + 2];
  }
}

// lowbias32 (C. Wellons' integer hash): a counter-based generator, element e's draw a hash of e and the seeds
SRQ_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

SRQ_CLONES void widths_range(uint8_t* out, int64_t begin, int64_t end, uint32_t s1, uint32_t s2, float f, uint8_t lo) {
  for (int64_t e = begin; e < end; ++e) {
    const uint32_t h = mix32(mix32(uint32_t(e) + s1) ^ s2);
    out[e] = lo + uint8_t(float(h >> 8) * 5.9604644775390625e-08f < f);  // u = top 24 bits / 2^24 in [0, 1)
  }
}

}  // namespace

// a learned width's per-element draw: lo + 1 where u < f, u the hash's top 24 bits / 2^24, so with probability
// ceil(f 2^24) / 2^24 (fast.random_widths has the PyTorch form)
torch::Tensor random_widths(int64_t n, int64_t seed1, int64_t seed2, double f, int64_t lo) {
  auto out = torch::empty({n}, torch::kUInt8);
  uint8_t* o = out.data_ptr<uint8_t>();
  const uint32_t s1 = uint32_t(seed1), s2 = uint32_t(seed2);
  const float ff = float(f);
  at::parallel_for(0, n, 65536, [&](int64_t begin, int64_t end) { widths_range(o, begin, end, s1, s2, ff, uint8_t(lo)); });
  return out;
}

torch::Tensor srq_forward(torch::Tensor x, c10::optional<torch::Tensor> index, torch::Tensor steps, torch::Tensor taus,
                          torch::Tensor tau0s, std::vector<double> mults, std::vector<double> offs,
                          std::vector<int64_t> qmins, std::vector<int64_t> qmaxs, std::vector<int64_t> halfwidths) {
  x = x.contiguous();
  auto levels = make_levels(steps, taus, tau0s, mults, offs, qmins, qmaxs, halfwidths);
  auto y = torch::empty_like(x);
  const uint8_t* idx = nullptr;
  torch::Tensor ic;
  if (index.has_value()) {
    ic = index->contiguous();
    idx = ic.data_ptr<uint8_t>();
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "srq_forward", [&] {
    auto st = steps.to(x.scalar_type()).contiguous();
    std::vector<scalar_t> step_t(st.data_ptr<scalar_t>(), st.data_ptr<scalar_t>() + st.numel());
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), idx, y.data_ptr<scalar_t>(), x.numel(), levels, step_t);
  });
  return y;
}

std::vector<torch::Tensor> srq_backward(torch::Tensor x, c10::optional<torch::Tensor> index, torch::Tensor grad,
                                        torch::Tensor steps, torch::Tensor taus, torch::Tensor tau0s,
                                        std::vector<double> mults, std::vector<double> offs,
                                        std::vector<int64_t> qmins, std::vector<int64_t> qmaxs,
                                        std::vector<int64_t> halfwidths, int64_t soft_lo, int64_t soft_hi,
                                        std::vector<double> spacings) {
  x = x.contiguous();
  grad = grad.to(x.scalar_type()).contiguous();
  auto levels = make_levels(steps, taus, tau0s, mults, offs, qmins, qmaxs, halfwidths, spacings);
  auto gx = torch::empty_like(x);
  const uint8_t* idx = nullptr;
  torch::Tensor ic;
  if (index.has_value()) {
    ic = index->contiguous();
    idx = ic.data_ptr<uint8_t>();
  }
  double ga = 0, gs = 0, gf = 0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "srq_backward", [&] {
    auto st = steps.to(x.scalar_type()).contiguous();
    std::vector<scalar_t> step_t(st.data_ptr<scalar_t>(), st.data_ptr<scalar_t>() + st.numel());
    backward_kernel<scalar_t>(x.data_ptr<scalar_t>(), idx, grad.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
                              x.numel(), levels, step_t, int(soft_lo), int(soft_hi), ga, gs, gf);
  });
  auto sums = torch::tensor({ga, gs, gf}, torch::kDouble);
  return {gx, sums};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &srq_forward, "SRQ forward: the grid point of highest probability");
  m.def("random_widths", &random_widths, "a learned width per element: lo + ((hash(e, seeds) >> 8) / 2^24 < f), uint8 (n,)");
  m.def("backward", &srq_backward, "SRQ backward: (grad x, [grad alpha, grad sigma, grad soft]); spacings: a table per level (0: exact)");
}
