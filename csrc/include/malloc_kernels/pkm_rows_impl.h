// SIMD row kernels of the product-key memory Sparse-Gather (float32), compiled once per ISA variant: pkm.cpp
// includes this header (no include guard) inside a `#pragma GCC target` region with MK_IMPL_NS and exactly one of
// MK_PKM_AVX512 / MK_PKM_AVX2 set. The scalar kernels (portable variant, float64) live in pkm.cpp.
//
// A value row is processed in column blocks of kBlock = 64 floats held in registers (4 zmm or 8 ymm): the forward
// sums the weighted rows of one query into one block of accumulators; the backward loads one touched value row's
// block once and, for each entry that selected it, forms the grad_weights dot product and accumulates the weighted
// grad_out row. Partial blocks (Dv % 64) use masked loads/stores. The sums run in the same order as the scalar
// kernels' (ascending entry per output element); only the dot product's association differs.
//
// Rows are prefetched a fixed number of entries (forward) or touched rows (backward) ahead: the forward's reads are
// random (latency bound), so the prefetches keep many misses in flight (memory-level parallelism).

namespace malloc_kernels {
namespace pkm {
namespace MK_IMPL_NS {

#if MK_PKM_AVX512
struct Simd {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int64_t kLanes = 16;
  static Mask mask(int64_t n) { return n >= 16 ? Mask(0xFFFF) : Mask((1u << n) - 1u); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(float* p, V v, Mask m) { _mm512_mask_storeu_ps(p, m, v); }
  static void stream(float* p, V v) { _mm512_stream_ps(p, v); }
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
#elif MK_PKM_AVX2
struct Simd {
  using V = __m256;
  using Mask = __m256i;
  static constexpr int64_t kLanes = 8;
  static Mask mask(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n < 8 ? n : 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store(float* p, V v, Mask m) { _mm256_maskstore_ps(p, m, v); }
  static void stream(float* p, V v) { _mm256_stream_ps(p, v); }
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static float sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#else
#error "pkm_rows_impl.h: define MK_PKM_AVX512 or MK_PKM_AVX2"
#endif

constexpr int64_t kBlock = 64;
constexpr int64_t kVecs = kBlock / Simd::kLanes;

// Columns [c, c + width) of one row as kVecs vectors (width <= kBlock; lanes past width read as 0, never touched).
struct Lanes {
  Simd::Mask m[kVecs];
  explicit Lanes(int64_t width) {
    for (int64_t j = 0; j < kVecs; ++j) m[j] = Simd::mask(width - j * Simd::kLanes > 0 ? width - j * Simd::kLanes : 0);
  }
};

template <bool kFull>
inline Simd::V load_lane(const float* p, const Lanes& ln, int64_t j) {
  if constexpr (kFull) return Simd::load(p + j * Simd::kLanes);
  else return Simd::load(p + j * Simd::kLanes, ln.m[j]);
}

template <bool kFull>
inline void store_lane(float* p, Simd::V v, const Lanes& ln, int64_t j) {
  if constexpr (kFull) Simd::store(p + j * Simd::kLanes, v);
  else Simd::store(p + j * Simd::kLanes, v, ln.m[j]);
}

// Prefetch the cache lines of [p, p + bytes) into L1.
inline void prefetch_span(const float* p, int64_t bytes) {
  const char* b = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(b + o, _MM_HINT_T0);
  _mm_prefetch(b + bytes - 1, _MM_HINT_T0);
}

// out[n, c .. c+width) = sum over t (ascending) of w[n, t] * values[idx[n, t], c .. c+width). While summing entry
// t, the whole row of the entry pf[t] is prefetched when t < pf_count (pf points kAhead entries ahead in the flat
// entry stream, so the prefetches run across query boundaries).
template <bool kFull>
__attribute__((always_inline)) inline void gather_block(const float* values, int64_t Dv, const int64_t* ix, const float* w, int64_t E, int64_t c,
                         int64_t width, const int64_t* pf, int64_t pf_count, float* out) {
  const Lanes ln(width);
  const int64_t row_bytes = Dv * int64_t(sizeof(float));
  Simd::V acc[kVecs];
  for (int64_t j = 0; j < kVecs; ++j) acc[j] = Simd::zero();
  for (int64_t t = 0; t < E; ++t) {
    if (t < pf_count) prefetch_span(values + pf[t] * Dv, row_bytes);
    const float* r = values + ix[t] * Dv + c;
    const Simd::V wv = Simd::set1(w[t]);
    for (int64_t j = 0; j < kVecs; ++j) acc[j] = Simd::fma(wv, load_lane<kFull>(r, ln, j), acc[j]);
  }
  for (int64_t j = 0; j < kVecs; ++j) store_lane<kFull>(out + c, acc[j], ln, j);
}

// Forward for the queries n in [n0, n1): out[n] = sum_t w[n, t] * values[idx[n, t]]. The reads are random rows, so
// the time is DRAM latency unless many misses are in flight: each row is prefetched kAhead entries before it is
// summed (kAhead rows x Dv * 4 bytes stay well inside L1).
void gather_range(const float* values, int64_t Dv, const int64_t* idx, const float* w, int64_t E, int64_t n0,
                  int64_t n1, float* out) {
  constexpr int64_t kAhead = 24;
  const int64_t f_end = n1 * E;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t f = n * E;
    const int64_t pf_count = std::min(E, f_end - f - kAhead);
    int64_t c = 0;
    for (; c + kBlock <= Dv; c += kBlock)
      gather_block<true>(values, Dv, idx + f, w + f, E, c, kBlock, idx + f + kAhead, c == 0 ? pf_count : 0,
                         out + n * Dv);
    if (c < Dv)
      gather_block<false>(values, Dv, idx + f, w + f, E, c, Dv - c, idx + f + kAhead, c == 0 ? pf_count : 0,
                          out + n * Dv);
  }
}

// Backward of one touched row u for columns [c, c + width): the value row's block stays in registers; for each
// entry (n, t) of the row (order[start[u] .. start[u+1]), packed n << 32 | t, ascending n * E + t) grad_weights[n, t]
// gains <grad_out[n], row> over these columns and grad_rows[u] accumulates weights[n, t] * grad_out[n].
// kStream: grad_row + c is aligned to the vector width and the block is full, so the row is written with
// non-temporal stores (it is not read again here, and skipping the read-for-ownership of each line saves a third of
// the backward's memory traffic).
template <bool kFull, bool kStream>
__attribute__((always_inline)) inline void scatter_block(const float* grad_out, const float* vrow, int64_t Dv, const float* weights, int64_t E,
                          const int64_t* order, int64_t p0, int64_t p1, int64_t c, int64_t width,
                          float* grad_weights, float* grad_row) {
  const Lanes ln(width);
  Simd::V v[kVecs], acc[kVecs];
  for (int64_t j = 0; j < kVecs; ++j) {
    v[j] = load_lane<kFull>(vrow + c, ln, j);
    acc[j] = Simd::zero();
  }
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n = order[p] >> 32, e = n * E + (order[p] & 0xFFFFFFFF);
    const float* g = grad_out + n * Dv + c;
    const Simd::V wv = Simd::set1(weights[e]);
    Simd::V dot = Simd::zero();
    for (int64_t j = 0; j < kVecs; ++j) {
      const Simd::V gj = load_lane<kFull>(g, ln, j);
      dot = Simd::fma(gj, v[j], dot);
      acc[j] = Simd::fma(wv, gj, acc[j]);
    }
    const float d = Simd::sum(dot);
    grad_weights[e] = c == 0 ? d : grad_weights[e] + d;
  }
  for (int64_t j = 0; j < kVecs; ++j) {
    if constexpr (kStream) Simd::stream(grad_row + c + j * Simd::kLanes, acc[j]);
    else store_lane<kFull>(grad_row + c, acc[j], ln, j);
  }
}

// Backward over the touched rows u in [u0, u1) (ascending row ids, so the value reads sweep the table in address
// order); the row kAhead touched rows ahead is prefetched.
void scatter_range(const float* grad_out, const float* values, int64_t Dv, const float* weights, int64_t E,
                   const int64_t* rows, const int64_t* order, const int64_t* start, int64_t u0, int64_t u1,
                   float* grad_weights, float* grad_rows) {
  constexpr int64_t kAhead = 8;
  const int64_t bytes = Dv * int64_t(sizeof(float));
  const bool stream = reinterpret_cast<uintptr_t>(grad_rows) % sizeof(Simd::V) == 0 && Dv % Simd::kLanes == 0;
  for (int64_t u = u0; u < u1; ++u) {
    if (u + kAhead < u1) {
      // The value row and, for each of its entries, the grad_out row and the weight: grad_out [N, Dv] is small
      // but does not stay cached while the value rows stream through, and the entries' n are random.
      prefetch_span(values + rows[u + kAhead] * Dv, bytes);
      for (int64_t p = start[u + kAhead]; p < start[u + kAhead + 1]; ++p) {
        const int64_t n = order[p] >> 32;
        prefetch_span(grad_out + n * Dv, bytes);
        _mm_prefetch(reinterpret_cast<const char*>(weights + n * E + (order[p] & 0xFFFFFFFF)), _MM_HINT_T0);
      }
    }
    const float* vrow = values + rows[u] * Dv;
    int64_t c = 0;
    for (; c + kBlock <= Dv; c += kBlock) {
      if (stream)
        scatter_block<true, true>(grad_out, vrow, Dv, weights, E, order, start[u], start[u + 1], c, kBlock,
                                  grad_weights, grad_rows + u * Dv);
      else
        scatter_block<true, false>(grad_out, vrow, Dv, weights, E, order, start[u], start[u + 1], c, kBlock,
                                   grad_weights, grad_rows + u * Dv);
    }
    if (c < Dv)
      scatter_block<false, false>(grad_out, vrow, Dv, weights, E, order, start[u], start[u + 1], c, Dv - c,
                                  grad_weights, grad_rows + u * Dv);
  }
  _mm_sfence();  // the streamed rows are visible to other threads before this range counts as done
}

}  // namespace MK_IMPL_NS
}  // namespace pkm
}  // namespace malloc_kernels
