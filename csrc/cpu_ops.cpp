// CPU versions of prefrank's log-prob ops, on raw buffers (no torch headers: the extension
// builds in seconds and works with any torch the user brings).
//
// logprobs_from_logits: logp[i] = logits[i, t_i] - logsumexp(logits[i, :]) for every row i
// whose target t_i != ignore_index (0 for ignored rows), accumulated in fp32 for half and single
// precision inputs (float64 stays float64). Two passes over each row (max, then sum of exp); a row of a 128k vocabulary
// stays in L2 between them. The inner loops work on 16 lanes at once in GCC/Clang vector types
// (a polynomial exp instead of libm's), built for AVX-512, AVX2 and baseline x86-64: GCC does not
// vectorize an `omp simd` reduction around this exp (the scalar loop ran at a third of the speed
// of torch.compile's cross-entropy).
#include <pybind11/pybind11.h>

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <type_traits>

namespace py = pybind11;

namespace {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {  // inf or nan
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {  // normal
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {  // signed zero
    bits = sign;
  } else {  // subnormal: value = mantissa * 2^-24
    float f = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -f : f;
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// 8 fp32 lanes (an AVX2 register; GCC splits wider vector types lane by lane on AVX2), and as
// many int32 lanes. The loops below run two of them side by side: 16 lanes.
typedef float F8x __attribute__((vector_size(32)));
typedef int32_t I8x __attribute__((vector_size(32)));
typedef uint32_t U8x __attribute__((vector_size(32)));
typedef uint16_t H8x __attribute__((vector_size(16)));
constexpr int64_t kLanes = 16;

inline float two_to(float n) {  // 2^n for an integral n in [-126, 127]
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline F8x two_to(F8x n) {
  return reinterpret_cast<F8x>((__builtin_convertvector(n, I8x) + 127) << 23);
}

// exp(x) for x <= 0 to about 2 ulp, on each lane (scalars: a one-lane call); x below -87 (and
// -inf) gives ~1e-38 instead of 0, which changes a sum that is >= 1 (the max term) by less than
// fp32 resolution. NaN stays NaN.
template <typename V>
inline V exp_nonpositive(V x) {
  x = x < -87.0f ? V{} - 87.0f : x;
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest: |x * log2 e| < 2^22
  V r = x - n * 0.693359375f;  // ln2 split in two for an exact reduction
  r = r + n * 2.12194440e-4f;
  // exp(r) on [-ln2/2, ln2/2] (Cephes coefficients)
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * two_to(n);
}

struct BF16 { uint16_t v; };
struct FP16 { uint16_t v; };

// Per input type: how an element (and a block of kLanes) is read, the accumulation type, and exp
// on values <= 0. Half and single precision accumulate in fp32 with the vectorized exp; float64
// (for references and gradcheck) stays in double with libm's exp, one element at a time.
template <typename T> struct Elem {
  using Acc = float;
  static constexpr bool kVector = true;
  static float load(const T* p, int64_t j) { return p[j]; }
  static F8x load8(const T* p, int64_t j) {
    F8x v;
    std::memcpy(&v, p + j, sizeof(v));
    return v;
  }
};
template <> struct Elem<BF16> {
  using Acc = float;
  static constexpr bool kVector = true;
  static float load(const BF16* p, int64_t j) { return bf16_to_float(p[j].v); }
  static F8x load8(const BF16* p, int64_t j) {  // a bf16 is the top half of an fp32
    H8x h;
    std::memcpy(&h, p + j, sizeof(h));
    return reinterpret_cast<F8x>(__builtin_convertvector(h, U8x) << 16);
  }
};
template <> struct Elem<FP16> {
  using Acc = float;
  static constexpr bool kVector = true;
  static float load(const FP16* p, int64_t j) { return fp16_to_float(p[j].v); }
  static F8x load8(const FP16* p, int64_t j) {
    F8x v;
    for (int64_t k = 0; k < 8; ++k) v[k] = fp16_to_float(p[j + k].v);
    return v;
  }
};
template <> struct Elem<double> {
  using Acc = double;
  static constexpr bool kVector = false;
  static double load(const double* p, int64_t j) { return p[j]; }
};

// logsumexp of a row: the max, then the sum of exp(x - max), over kLanes lanes combined in a fixed
// order at the end (the same result whatever the build), then the tail one by one.
template <typename T, typename Acc = typename Elem<T>::Acc>
__attribute__((target_clones("avx512f", "avx2", "default")))
Acc row_logsumexp(const T* row, int64_t V) {
  constexpr Acc kInf = std::numeric_limits<Acc>::infinity();
  const int64_t body = Elem<T>::kVector ? V - V % kLanes : 0;
  Acc m = -kInf;
  if constexpr (Elem<T>::kVector) {
    F8x lo = F8x{} - kInf, hi = lo;
    for (int64_t j = 0; j < body; j += kLanes) {
      const F8x a = Elem<T>::load8(row, j), b = Elem<T>::load8(row, j + 8);
      lo = a > lo ? a : lo;
      hi = b > hi ? b : hi;
    }
    for (int64_t k = 0; k < 8; ++k) m = lo[k] > m ? lo[k] : m;
    for (int64_t k = 0; k < 8; ++k) m = hi[k] > m ? hi[k] : m;
  }
  for (int64_t j = body; j < V; ++j) {
    const Acc x = Elem<T>::load(row, j);
    m = x > m ? x : m;
  }
  if (m == -kInf || std::isnan(m)) return m;
  Acc s = 0;
  if constexpr (Elem<T>::kVector) {
    F8x lo = F8x{}, hi = F8x{};
    for (int64_t j = 0; j < body; j += kLanes) {
      lo += exp_nonpositive(Elem<T>::load8(row, j) - m);
      hi += exp_nonpositive(Elem<T>::load8(row, j + 8) - m);
    }
    for (int64_t k = 0; k < 8; ++k) s += lo[k];
    for (int64_t k = 0; k < 8; ++k) s += hi[k];
    for (int64_t j = body; j < V; ++j) s += exp_nonpositive(Elem<T>::load(row, j) - m);
  } else {
    for (int64_t j = 0; j < V; ++j) s += std::exp(Elem<T>::load(row, j) - m);
  }
  return m + std::log(s);
}

template <typename T, typename Acc = typename Elem<T>::Acc>
int64_t logprobs_rows(const T* logits, int64_t N, int64_t V, int64_t row_stride, const int64_t* targets,
                      Acc* out, Acc* lse_out, int64_t ignore_index, int num_threads) {
  int64_t bad_targets = 0;
#pragma omp parallel for schedule(static) num_threads(num_threads) reduction(+ : bad_targets)
  for (int64_t i = 0; i < N; ++i) {
    const int64_t t = targets[i];
    if (t == ignore_index) {
      out[i] = 0;
      if (lse_out) lse_out[i] = 0;
      continue;
    }
    if (t < 0 || t >= V) {
      out[i] = std::numeric_limits<Acc>::quiet_NaN();
      ++bad_targets;
      continue;
    }
    const T* row = logits + i * row_stride;
    const Acc lse = row_logsumexp<T>(row, V);
    out[i] = Elem<T>::load(row, t) - lse;
    if (lse_out) lse_out[i] = lse;
  }
  return bad_targets;
}

// Calls f with the logits pointer cast to its element type.
template <typename F>
int64_t with_element_type(int dtype, uintptr_t ptr, F&& f) {
  switch (dtype) {
    case kFloat32: return f(reinterpret_cast<const float*>(ptr));
    case kBFloat16: return f(reinterpret_cast<const BF16*>(ptr));
    case kFloat16: return f(reinterpret_cast<const FP16*>(ptr));
    case kFloat64: return f(reinterpret_cast<const double*>(ptr));
    default: throw std::invalid_argument("unsupported dtype code");
  }
}

template <typename P>
using AccOf = typename Elem<std::remove_cv_t<std::remove_pointer_t<P>>>::Acc;

int64_t logprobs_from_logits(uintptr_t logits_ptr, int dtype, int64_t N, int64_t V, int64_t row_stride,
                             uintptr_t targets_ptr, uintptr_t out_ptr, uintptr_t lse_ptr, int64_t ignore_index,
                             int num_threads) {
  if (num_threads <= 0) num_threads = omp_get_max_threads();
  const auto* targets = reinterpret_cast<const int64_t*>(targets_ptr);
  return with_element_type(dtype, logits_ptr, [&](auto* logits) {
    using Acc = AccOf<decltype(logits)>;
    return logprobs_rows(logits, N, V, row_stride, targets, reinterpret_cast<Acc*>(out_ptr),
                         reinterpret_cast<Acc*>(lse_ptr), ignore_index, num_threads);
  });
}

// Sequence sums: for each segment s (rows cu_seqlens[s] .. cu_seqlens[s+1]-1), the sum of the
// log-probs of its non-ignored rows (float64) and how many there are, in one pass over the logits:
// the per-token log-probs are never written. OpenMP over segments: deterministic.
template <typename T>
int64_t sequence_rows(const T* logits, int64_t V, int64_t row_stride, const int64_t* targets, const int64_t* cu,
                      int64_t S, double* sums, int64_t* counts, int64_t ignore_index, int num_threads) {
  int64_t bad_targets = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) reduction(+ : bad_targets)
  for (int64_t s = 0; s < S; ++s) {
    double sum = 0.0;
    int64_t count = 0;
    for (int64_t i = cu[s]; i < cu[s + 1]; ++i) {
      const int64_t t = targets[i];
      if (t == ignore_index) continue;
      if (t < 0 || t >= V) {
        ++bad_targets;
        continue;
      }
      const T* row = logits + i * row_stride;
      sum += static_cast<double>(Elem<T>::load(row, t) - row_logsumexp<T>(row, V));
      ++count;
    }
    sums[s] = sum;
    counts[s] = count;
  }
  return bad_targets;
}

int64_t sequence_logprobs(uintptr_t logits_ptr, int dtype, int64_t V, int64_t row_stride, uintptr_t targets_ptr,
                          uintptr_t cu_seqlens_ptr, int64_t S, uintptr_t sums_ptr, uintptr_t counts_ptr,
                          int64_t ignore_index, int num_threads) {
  if (num_threads <= 0) num_threads = omp_get_max_threads();
  return with_element_type(dtype, logits_ptr, [&](auto* logits) {
    return sequence_rows(logits, V, row_stride, reinterpret_cast<const int64_t*>(targets_ptr),
                         reinterpret_cast<const int64_t*>(cu_seqlens_ptr), S, reinterpret_cast<double*>(sums_ptr),
                         reinterpret_cast<int64_t*>(counts_ptr), ignore_index, num_threads);
  });
}

}  // namespace

PYBIND11_MODULE(_cpu_ops, m) {
  m.doc() = "prefrank CPU ops on raw buffers (OpenMP)";
  m.def("logprobs_from_logits", &logprobs_from_logits, py::call_guard<py::gil_scoped_release>(),
        py::arg("logits_ptr"), py::arg("dtype"), py::arg("N"), py::arg("V"), py::arg("row_stride"),
        py::arg("targets_ptr"), py::arg("out_ptr"), py::arg("lse_ptr"), py::arg("ignore_index"),
        py::arg("num_threads") = 0,
        "Per-row log-softmax of logits[N, V] gathered at targets[N] (int64) into out[N] (fp32; float64 for "
        "float64 logits), and each row's logsumexp into lse[N] (same dtype) unless lse_ptr is 0; both 0 "
        "at ignored rows. dtype: a code from DTYPES. Returns the number of out-of-range targets.");
  m.def("sequence_logprobs", &sequence_logprobs, py::call_guard<py::gil_scoped_release>(), py::arg("logits_ptr"),
        py::arg("dtype"), py::arg("V"), py::arg("row_stride"), py::arg("targets_ptr"), py::arg("cu_seqlens_ptr"),
        py::arg("S"), py::arg("sums_ptr"), py::arg("counts_ptr"), py::arg("ignore_index"), py::arg("num_threads") = 0,
        "Per-segment sums (float64) and counts (int64) of the log-probs of logits[N, V] at targets[N], segments "
        "given by cu_seqlens[S + 1] (int64). Returns the number of out-of-range targets.");
  m.def("max_threads", &omp_get_max_threads);
  // the dtype codes above, by torch dtype name: Python reads them here, so they are written once
  py::dict dtypes;
  dtypes["float32"] = static_cast<int>(kFloat32);
  dtypes["bfloat16"] = static_cast<int>(kBFloat16);
  dtypes["float16"] = static_cast<int>(kFloat16);
  dtypes["float64"] = static_cast<int>(kFloat64);
  m.attr("DTYPES") = dtypes;
}
