// CPU implementation of the RWKV-4 WKV recurrence (malloc_kernels/wkv.h: the math, layout and paper).
//
// Work split: OpenMP tasks are (user, block of CB channels); the time loop runs inside a task, and every step is a
// loop over the block's channels that the compiler vectorises. The step functions are written once (always-inline
// templates) and instantiated in a portable function and in AVX2 / AVX-512 ones (GCC target attributes), so the
// same source runs the ISA chosen at run time. exp is a branch-free Cody-Waite + polynomial evaluation so it
// vectorises with the rest (std::exp would stay a scalar call): float ~1 ulp, double < 1e-15 relative.
#include "malloc_kernels/wkv.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <limits>

namespace malloc_kernels {
namespace wkv {
namespace {

#define MK_INLINE __attribute__((always_inline)) inline

// Channels per task: two AVX-512 float vectors, four double ones; small enough for the block's running state to
// stay in registers, large enough that a step is a few full-width vector instructions.
constexpr int CB = 32;

MK_INLINE float vexp(float x) {
  const bool under = x < -87.3f;  // -inf and anything that underflows: exactly 0
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float t = x * 1.44269504088896341f + magic;
  const float n = t - magic;
  int32_t ti;
  std::memcpy(&ti, &t, 4);
  const int32_t ni = ti - 0x4B400000;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * (r * r) + (r + 1.0f);
  const int32_t eb = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &eb, 4);
  const float out = p * scale;
  return under ? 0.0f : out;
}

MK_INLINE double vexp(double x) {
  const bool under = x < -708.0;
  x = x < -708.0 ? -708.0 : x;
  x = x > 709.0 ? 709.0 : x;
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  const double t = x * 1.4426950408889634074 + magic;
  const double n = t - magic;
  int64_t ti, mi;
  std::memcpy(&ti, &t, 8);
  std::memcpy(&mi, &magic, 8);
  const int64_t ni = ti - mi;
  // fdlibm's split of ln 2: n * ln2_hi is exact for |n| < 2^11
  double r = x - n * 6.93147180369123816490e-01;
  r = r - n * 1.90821492927058770002e-10;
  // Taylor series of e^r to degree 13 (|r| <= 0.35: truncation < 1e-17 relative)
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int64_t eb = (ni + 1023) << 52;
  double scale;
  std::memcpy(&scale, &eb, 8);
  const double out = p * scale;
  return under ? 0.0 : out;
}

template <typename T>
MK_INLINE T vmax(T a, T b) { return a > b ? a : b; }

// One user's tokens [t0, t1) over channels [c0, c0 + n) (N = n when the block is full: a compile-time trip count).
template <typename T, int N>
MK_INLINE void forward_block(const T* w, const T* u, const T* k, const T* v, int64_t t0, int64_t t1, int64_t C,
                             int64_t T_total, int64_t c0, int n, const T* st_in, T* y, T* aux, T* st_out) {
  const int m = N ? N : n;
  T a[CB], b[CB], p[CB], ww[CB], uu[CB];
#pragma omp simd
  for (int j = 0; j < m; ++j) {
    a[j] = st_in[c0 + j];
    b[j] = st_in[C + c0 + j];
    p[j] = st_in[2 * C + c0 + j];
    ww[j] = w[c0 + j];
    uu[j] = u[c0 + j];
  }
  for (int64_t t = t0; t < t1; ++t) {
    const T* kt = k + t * C + c0;
    const T* vt = v + t * C + c0;
    T* yt = y + t * C + c0;
    T* qt = aux ? aux + t * C + c0 : nullptr;
    T* dt = aux ? aux + (T_total + t) * C + c0 : nullptr;
#pragma omp simd
    for (int j = 0; j < m; ++j) {
      const T uk = uu[j] + kt[j];
      const T q = vmax(p[j], uk);
      const T e1 = vexp(p[j] - q), e2 = vexp(uk - q);
      const T den = e1 * b[j] + e2;
      yt[j] = (e1 * a[j] + e2 * vt[j]) / den;
      if (qt) {
        qt[j] = q;
        dt[j] = den;
      }
      const T pw = p[j] + ww[j];
      const T p2 = vmax(pw, kt[j]);
      const T f1 = vexp(pw - p2), f2 = vexp(kt[j] - p2);
      a[j] = f1 * a[j] + f2 * vt[j];
      b[j] = f1 * b[j] + f2;
      p[j] = p2;
    }
  }
#pragma omp simd
  for (int j = 0; j < m; ++j) {
    st_out[c0 + j] = a[j];
    st_out[C + c0 + j] = b[j];
    st_out[2 * C + c0 + j] = p[j];
  }
}

template <typename T, int N>
MK_INLINE void backward_block(const T* w, const T* u, const T* k, const T* v, int64_t t0, int64_t t1, int64_t C,
                              int64_t T_total, int64_t c0, int n, const T* st_in, const T* y, const T* aux,
                              const T* gy, T* gw, T* gu, T* gk, T* gv) {
  const int m = N ? N : n;
  const T ninf = -std::numeric_limits<T>::infinity();
  T G[CB], H[CB], G1[CB], H1[CB], s[CB], ww[CB], uu[CB], dw[CB], du[CB];
#pragma omp simd
  for (int j = 0; j < m; ++j) {
    G[j] = H[j] = G1[j] = H1[j] = dw[j] = du[j] = T(0);
    s[j] = ninf;
    ww[j] = w[c0 + j];
    uu[j] = u[c0 + j];
  }
  for (int64_t t = t1 - 1; t >= t0; --t) {
    const int64_t o = t * C + c0;
    const T* qt = aux + o;
    const T* dt = aux + T_total * C + o;
#pragma omp simd
    for (int j = 0; j < m; ++j) {
      const T kj = k[o + j], vj = v[o + j];
      // the later tokens' share (the reverse sums hold t' > t)
      const T f = vexp(kj + s[j]);
      T dv = f * G[j];
      T dk = f * (vj * G[j] - H[j]);
      dw[j] += f * (vj * G1[j] - H1[j]);
      // the bonus term of token t itself
      const T alpha = gy[o + j] / dt[j];
      const T beta = alpha * y[o + j];
      const T e = vexp(uu[j] + kj - qt[j]);
      const T direct = e * (vj * alpha - beta);
      dv += e * alpha;
      dk += direct;
      du[j] += direct;
      gv[o + j] = dv;
      gk[o + j] = dk;
      // fold token t into the reverse sums (they now hold t' >= t, i.e. the sums of index t - 1)
      const T sw = s[j] + ww[j];
      const T s2 = vmax(sw, -qt[j]);
      const T e1 = vexp(sw - s2), e2 = vexp(-qt[j] - s2);
      G1[j] = e1 * (G1[j] + G[j]);
      H1[j] = e1 * (H1[j] + H[j]);
      G[j] = e1 * G[j] + e2 * alpha;
      H[j] = e1 * H[j] + e2 * beta;
      s[j] = s2;
    }
  }
#pragma omp simd
  for (int j = 0; j < m; ++j) {
    // the carried initial state (a0, b0, p0) decays by e^{t w} into every token's A_t, B_t
    const T f = vexp(st_in[2 * C + c0 + j] + s[j]);
    const T a0 = st_in[c0 + j], b0 = st_in[C + c0 + j];
    gw[c0 + j] = dw[j] + f * (a0 * G1[j] - b0 * H1[j]);
    gu[c0 + j] = du[j];
  }
}

template <typename T>
struct Args {
  const T *w, *u, *k, *v;
  const int64_t* offsets;
  int64_t B, C, T_total;
  const T* st_in;
  T *y, *aux, *st_out;
  const T *y_c, *aux_c, *gy;
  T *gw, *gu, *gk, *gv;
};

template <typename T>
MK_INLINE void forward_task(const Args<T>& A, int64_t b, int64_t c0) {
  const int n = static_cast<int>(std::min<int64_t>(CB, A.C - c0));
  const int64_t t0 = A.offsets[b], t1 = A.offsets[b + 1];
  const T* si = A.st_in + b * 3 * A.C;
  T* so = A.st_out + b * 3 * A.C;
  if (n == CB)
    forward_block<T, CB>(A.w, A.u, A.k, A.v, t0, t1, A.C, A.T_total, c0, n, si, A.y, A.aux, so);
  else
    forward_block<T, 0>(A.w, A.u, A.k, A.v, t0, t1, A.C, A.T_total, c0, n, si, A.y, A.aux, so);
}

template <typename T>
MK_INLINE void backward_task(const Args<T>& A, int64_t b, int64_t c0) {
  const int n = static_cast<int>(std::min<int64_t>(CB, A.C - c0));
  const int64_t t0 = A.offsets[b], t1 = A.offsets[b + 1];
  const T* si = A.st_in + b * 3 * A.C;
  T* gw = A.gw + b * A.C;
  T* gu = A.gu + b * A.C;
  if (n == CB)
    backward_block<T, CB>(A.w, A.u, A.k, A.v, t0, t1, A.C, A.T_total, c0, n, si, A.y_c, A.aux_c, A.gy, gw, gu, A.gk,
                          A.gv);
  else
    backward_block<T, 0>(A.w, A.u, A.k, A.v, t0, t1, A.C, A.T_total, c0, n, si, A.y_c, A.aux_c, A.gy, gw, gu, A.gk,
                         A.gv);
}

// One entry point per (direction, ISA): the always-inline bodies above are compiled for each target here.
template <typename T>
void forward_portable(const Args<T>& A, int64_t b, int64_t c0) { forward_task(A, b, c0); }
template <typename T>
void backward_portable(const Args<T>& A, int64_t b, int64_t c0) { backward_task(A, b, c0); }
#if MALLOC_KERNELS_X86
template <typename T>
__attribute__((target("avx2,fma"))) void forward_avx2(const Args<T>& A, int64_t b, int64_t c0) {
  forward_task(A, b, c0);
}
template <typename T>
__attribute__((target("avx2,fma"))) void backward_avx2(const Args<T>& A, int64_t b, int64_t c0) {
  backward_task(A, b, c0);
}
template <typename T>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))) void forward_avx512(const Args<T>& A,
                                                                                          int64_t b, int64_t c0) {
  forward_task(A, b, c0);
}
template <typename T>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))) void backward_avx512(const Args<T>& A,
                                                                                           int64_t b, int64_t c0) {
  backward_task(A, b, c0);
}
#endif

template <typename T>
using TaskFn = void (*)(const Args<T>&, int64_t, int64_t);

template <typename T>
void run_tasks(const Args<T>& A, TaskFn<T> fn) {
  const int64_t nblk = (A.C + CB - 1) / CB;
  const int64_t tasks = A.B * nblk;
  // users differ in length: dynamic scheduling balances them; tiny problems stay on the calling thread
#pragma omp parallel for schedule(dynamic, 1) if (A.T_total * A.C > 16384)
  for (int64_t i = 0; i < tasks; ++i) fn(A, i / nblk, (i % nblk) * CB);
}

}  // namespace

template <typename T>
void forward(const T* w, const T* u, const T* k, const T* v, const int64_t* offsets, int64_t B, int64_t C,
             const T* state_in, T* y, T* aux, T* state_out, isa::Isa variant) {
  Args<T> A{w, u, k, v, offsets, B, C, offsets[B], state_in, y, aux, state_out,
            nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  TaskFn<T> fn = forward_portable<T>;
#if MALLOC_KERNELS_X86
  const isa::Isa run = isa::isa_for_family(variant, isa::Family::Wkv);
  if (run == isa::Isa::Avx512) fn = forward_avx512<T>;
  else if (run == isa::Isa::Avx2) fn = forward_avx2<T>;
#else
  isa::isa_for_family(variant, isa::Family::Wkv);  // still refuses a variant this CPU cannot run
#endif
  run_tasks(A, fn);
}

template <typename T>
void backward(const T* w, const T* u, const T* k, const T* v, const int64_t* offsets, int64_t B, int64_t C,
              const T* state_in, const T* y, const T* aux, const T* grad_y, T* grad_w_users, T* grad_u_users,
              T* grad_k, T* grad_v, isa::Isa variant) {
  Args<T> A{w, u, k, v, offsets, B, C, offsets[B], state_in, nullptr, nullptr, nullptr,
            y, aux, grad_y, grad_w_users, grad_u_users, grad_k, grad_v};
  TaskFn<T> fn = backward_portable<T>;
#if MALLOC_KERNELS_X86
  const isa::Isa run = isa::isa_for_family(variant, isa::Family::Wkv);
  if (run == isa::Isa::Avx512) fn = backward_avx512<T>;
  else if (run == isa::Isa::Avx2) fn = backward_avx2<T>;
#else
  isa::isa_for_family(variant, isa::Family::Wkv);  // still refuses a variant this CPU cannot run
#endif
  run_tasks(A, fn);
}

template void forward<float>(const float*, const float*, const float*, const float*, const int64_t*, int64_t,
                             int64_t, const float*, float*, float*, float*, isa::Isa);
template void forward<double>(const double*, const double*, const double*, const double*, const int64_t*, int64_t,
                              int64_t, const double*, double*, double*, double*, isa::Isa);
template void backward<float>(const float*, const float*, const float*, const float*, const int64_t*, int64_t,
                              int64_t, const float*, const float*, const float*, const float*, float*, float*,
                              float*, float*, isa::Isa);
template void backward<double>(const double*, const double*, const double*, const double*, const int64_t*, int64_t,
                               int64_t, const double*, const double*, const double*, const double*, double*,
                               double*, double*, double*, isa::Isa);

}  // namespace wkv
}  // namespace malloc_kernels
