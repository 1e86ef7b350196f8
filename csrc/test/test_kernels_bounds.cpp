// Framework-free test of the kernels beside attention: RWKV-4's WKV (wkv.h), Reformer's bucketed attention
// (lsh_attention.h) and the product-key memory (pkm.h). Every case runs over exactly-sized heap buffers, so the
// -fsanitize=address,undefined build of .ci/run catches any access past a tensor, and the aarch64 build runs the same
// under qemu-user. Each kernel is checked against an independent float64 loop written from its header's math (not
// against itself), on adversarial shapes: empty users, one-token users, channel counts that are not a multiple of
// any vector width, carried initial states, every ISA variant this CPU runs.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "malloc_kernels/bias.h"
#include "malloc_kernels/isa.h"
#include "malloc_kernels/lsh_attention.h"
#include "malloc_kernels/pkm.h"
#include "malloc_kernels/wkv.h"

#include "expect.h"

namespace isa = malloc_kernels::isa;


static std::vector<isa::Isa> variants() {
  std::vector<isa::Isa> out{isa::Isa::Portable};
  for (isa::Isa v : {isa::Isa::Avx2, isa::Isa::Avx512, isa::Isa::Neon})  // neon: these families run portable
    if (isa::cpu_supports(v)) out.push_back(v);
  return out;
}

static std::vector<double> normal(std::mt19937& rng, size_t n, double sd = 1.0) {
  std::normal_distribution<double> nd(0.0, sd);
  std::vector<double> x(n);
  for (double& e : x) e = nd(rng);
  return x;
}

template <typename T>
static std::vector<T> cast(const std::vector<double>& x) {
  return std::vector<T>(x.begin(), x.end());
}

// max |a - b| / (atol + rtol |b|) over the elements: <= 1 passes.
template <typename A>
static double worst(const std::vector<A>& a, const std::vector<double>& b, double atol, double rtol) {
  double w = 0;
  for (size_t i = 0; i < b.size(); ++i) w = std::max(w, std::fabs(double(a[i]) - b[i]) / (atol + rtol * std::fabs(b[i])));
  return w;
}

// ---------------------------------------------------------------------------------------------------------------
// WKV: the direct sums of wkv.h (no running maximum; small values keep every exponent finite in float64).
struct WkvCase {
  std::vector<int64_t> offsets;
  int64_t C;
  bool carried;  // users start from a non-empty state
};

struct WkvRef {
  std::vector<double> y, A, Bv;  // outputs; the final (A, B) per user and channel
};

static WkvRef wkv_reference(const std::vector<double>& w, const std::vector<double>& u, const std::vector<double>& k,
                            const std::vector<double>& v, const std::vector<int64_t>& off, int64_t C,
                            const std::vector<double>& st) {
  const int64_t B = int64_t(off.size()) - 1;
  WkvRef r{std::vector<double>(k.size()), std::vector<double>(B * C), std::vector<double>(B * C)};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      const double* s = st.data() + b * 3 * C;
      const double A0 = s[2 * C + c] == -INFINITY ? 0.0 : s[c] * std::exp(s[2 * C + c]);
      const double B0 = s[2 * C + c] == -INFINITY ? 0.0 : s[C + c] * std::exp(s[2 * C + c]);
      const int64_t n = off[b + 1] - off[b];
      for (int64_t t = 0; t <= n; ++t) {
        double At = std::exp(t * w[c]) * A0, Bt = std::exp(t * w[c]) * B0;
        for (int64_t i = 0; i < t; ++i) {
          const double e = std::exp((t - 1 - i) * w[c] + k[(off[b] + i) * C + c]);
          At += e * v[(off[b] + i) * C + c];
          Bt += e;
        }
        if (t == n) {
          r.A[b * C + c] = At;
          r.Bv[b * C + c] = Bt;
          break;
        }
        const double eu = std::exp(u[c] + k[(off[b] + t) * C + c]);
        r.y[(off[b] + t) * C + c] = (At + eu * v[(off[b] + t) * C + c]) / (Bt + eu);
      }
    }
  return r;
}

static void test_wkv(const WkvCase& wc) {
  std::mt19937 rng(11 + wc.C);
  const int64_t B = int64_t(wc.offsets.size()) - 1, C = wc.C, T = wc.offsets.back();
  std::vector<double> w = normal(rng, C, 0.5), u = normal(rng, C, 0.5), k = normal(rng, T * C),
                      v = normal(rng, T * C), g = normal(rng, T * C);
  for (double& x : w) x = -std::exp(x);  // the model's w = -exp(decay)
  std::vector<double> st(B * 3 * C);
  std::uniform_real_distribution<double> pos(0.1, 2.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      double* s = st.data() + b * 3 * C;
      const bool empty = !wc.carried || (b + c) % 3 == 0;
      s[c] = empty ? 0.0 : normal(rng, 1)[0];
      s[C + c] = empty ? 0.0 : pos(rng);
      s[2 * C + c] = empty ? -INFINITY : normal(rng, 1)[0];
    }
  const WkvRef ref = wkv_reference(w, u, k, v, wc.offsets, C, st);
  const char* tag = wc.carried ? "carried" : "empty";

  // float64 kernel: forward against the sums, backward against central differences of L = sum g * y
  std::vector<double> y(T * C), aux(2 * T * C), so(B * 3 * C);
  malloc_kernels::wkv::forward<double>(w.data(), u.data(), k.data(), v.data(), wc.offsets.data(), B, C, st.data(),
                                       y.data(), aux.data(), so.data(), isa::Isa::Portable);
  EXPECT(worst(y, ref.y, 1e-12, 1e-10) <= 1, "wkv %s C=%lld: float64 forward", tag, (long long)C);
  std::vector<double> Aout(B * C), Bout(B * C);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      const double* s = so.data() + b * 3 * C;
      Aout[b * C + c] = s[c] * std::exp(s[2 * C + c]);
      Bout[b * C + c] = s[C + c] * std::exp(s[2 * C + c]);
    }
  EXPECT(worst(Aout, ref.A, 1e-12, 1e-10) <= 1 && worst(Bout, ref.Bv, 1e-12, 1e-10) <= 1,
         "wkv %s C=%lld: float64 final state", tag, (long long)C);

  std::vector<double> gw(B * C), gu(B * C), gk(T * C), gv(T * C);
  malloc_kernels::wkv::backward<double>(w.data(), u.data(), k.data(), v.data(), wc.offsets.data(), B, C, st.data(),
                                        y.data(), aux.data(), g.data(), gw.data(), gu.data(), gk.data(), gv.data(),
                                        isa::Isa::Portable);
  auto loss = [&](const std::vector<double>& w_, const std::vector<double>& u_, const std::vector<double>& k_,
                  const std::vector<double>& v_) {
    const WkvRef r = wkv_reference(w_, u_, k_, v_, wc.offsets, C, st);
    return std::inner_product(g.begin(), g.end(), r.y.begin(), 0.0);
  };
  const double eps = 1e-6;
  auto numeric = [&](std::vector<double>& x, size_t i) {
    const double x0 = x[i];
    x[i] = x0 + eps;
    const double lp = loss(w, u, k, v);
    x[i] = x0 - eps;
    const double lm = loss(w, u, k, v);
    x[i] = x0;
    return (lp - lm) / (2 * eps);
  };
  std::vector<double> dw_sum(C, 0.0), du_sum(C, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) dw_sum[c] += gw[b * C + c], du_sum[c] += gu[b * C + c];
  for (int64_t c = 0; c < std::min<int64_t>(C, 5); ++c) {
    EXPECT(std::fabs(dw_sum[c] - numeric(w, c)) <= 1e-6 * (1 + std::fabs(dw_sum[c])), "wkv %s: dw[%lld]", tag,
           (long long)c);
    EXPECT(std::fabs(du_sum[c] - numeric(u, c)) <= 1e-6 * (1 + std::fabs(du_sum[c])), "wkv %s: du[%lld]", tag,
           (long long)c);
  }
  for (size_t i = 0; i < k.size(); i += std::max<size_t>(1, k.size() / 7)) {
    EXPECT(std::fabs(gk[i] - numeric(k, i)) <= 1e-6 * (1 + std::fabs(gk[i])), "wkv %s: dk[%zu]", tag, i);
    EXPECT(std::fabs(gv[i] - numeric(v, i)) <= 1e-6 * (1 + std::fabs(gv[i])), "wkv %s: dv[%zu]", tag, i);
  }

  // float32, every ISA variant, against the float64 kernel just verified
  const auto wf = cast<float>(w), uf = cast<float>(u), kf = cast<float>(k), vf = cast<float>(v), gf = cast<float>(g),
             sf = cast<float>(st);
  for (isa::Isa var : variants()) {
    std::vector<float> yf(T * C), af(2 * T * C), sof(B * 3 * C), gwf(B * C), guf(B * C), gkf(T * C), gvf(T * C);
    malloc_kernels::wkv::forward<float>(wf.data(), uf.data(), kf.data(), vf.data(), wc.offsets.data(), B, C,
                                        sf.data(), yf.data(), af.data(), sof.data(), var);
    malloc_kernels::wkv::backward<float>(wf.data(), uf.data(), kf.data(), vf.data(), wc.offsets.data(), B, C,
                                         sf.data(), yf.data(), af.data(), gf.data(), gwf.data(), guf.data(),
                                         gkf.data(), gvf.data(), var);
    EXPECT(worst(yf, y, 1e-5, 1e-4) <= 1, "wkv %s C=%lld %s: float32 forward", tag, (long long)C, isa::name(var));
    EXPECT(worst(gkf, gk, 1e-4, 1e-3) <= 1 && worst(gvf, gv, 1e-4, 1e-3) <= 1 && worst(gwf, gw, 1e-3, 1e-3) <= 1 &&
               worst(guf, gu, 1e-4, 1e-3) <= 1,
           "wkv %s C=%lld %s: float32 backward", tag, (long long)C, isa::name(var));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Reformer's bucketed attention: scores of the visible set, then a two-pass softmax / HSTU mean (lsh_attention.h).
static void test_lsh(bool hstu, bool biases) {
  std::mt19937 rng(hstu * 2 + biases);
  const std::vector<int64_t> offsets{0, 3, 3, 4, 11};  // a user without request tokens, a one-token user
  const int64_t B = 4, H = 2, D = 13, C = 9, T = offsets.back(), P = 6, NT = 5, NB = 3;
  std::uniform_int_distribution<int> bucket(0, NB - 1);
  std::vector<uint8_t> qb(T * H), cb(B * H * C);
  for (auto& x : qb) x = uint8_t(bucket(rng));
  for (auto& x : cb) x = uint8_t(bucket(rng));
  std::vector<int32_t> clen{9, 0, 4, 1, 7, 9, 0, 2};  // full, empty and partial rows
  std::vector<int64_t> qpos(T), qts(T), cts(B * H * C);
  std::vector<int32_t> cpos(B * H * C);
  for (int64_t i = 0; i < T; ++i) qpos[i] = 20 + i, qts[i] = 5000 + 37 * i;
  for (int64_t j = 0; j < B * H * C; ++j) cpos[j] = int32_t(j % C), cts[j] = 1000 + 131 * (j % C);
  const std::vector<int64_t> thresholds{0, 1, 100, 1000, 4000};
  const std::vector<double> q = normal(rng, T * H * D), k = normal(rng, T * H * D), v = normal(rng, T * H * D),
                            ck = normal(rng, B * H * C * D), cv = normal(rng, B * H * C * D),
                            pb = normal(rng, P, 0.5), tb = normal(rng, NT, 0.5);
  const std::vector<float> pbf = cast<float>(pb), tbf = cast<float>(tb);
  malloc_kernels::lsh::LSHParams p;
  p.B = B, p.H = H, p.D = D, p.C = C, p.T = T, p.offsets = offsets.data(), p.q_bucket = qb.data();
  p.q_pos = qpos.data(), p.cache_len = clen.data(), p.cache_bucket = cb.data(), p.cache_pos = cpos.data();
  if (biases) {
    p.q_ts = qts.data(), p.cache_ts = cts.data(), p.pos_bias = pbf.data(), p.P = P, p.time_bias = tbf.data();
    p.thresholds = thresholds.data(), p.NT = NT;
  }
  p.hstu = hstu, p.scale = 1.0 / std::sqrt(double(D));

  malloc_kernels::bias::TimeBucketer tbk;
  tbk.init(thresholds.data(), NT);
  std::vector<double> ref(T * H * D, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = offsets[b]; i < offsets[b + 1]; ++i) {
        std::vector<double> s;
        std::vector<const double*> vs;
        auto see = [&](const double* kj, const double* vj, int64_t pj, int64_t tj) {
          double x = p.scale * std::inner_product(kj, kj + D, q.data() + (i * H + h) * D, 0.0);
          if (biases) x += double(pbf[malloc_kernels::bias::pos_index(qpos[i], pj, P)]) + double(tbf[tbk(qts[i], tj)]);
          s.push_back(x);
          vs.push_back(vj);
        };
        const int64_t bh = b * H + h;
        for (int64_t j = 0; j < clen[bh]; ++j)
          if (cb[bh * C + j] == qb[i * H + h]) see(ck.data() + (bh * C + j) * D, cv.data() + (bh * C + j) * D, cpos[bh * C + j], cts[bh * C + j]);
        for (int64_t m = offsets[b]; m <= i; ++m)
          if (qb[m * H + h] == qb[i * H + h]) see(k.data() + (m * H + h) * D, v.data() + (m * H + h) * D, qpos[m], qts[m]);
        std::vector<double> wgt(s.size());
        if (hstu) {
          for (size_t j = 0; j < s.size(); ++j) wgt[j] = s[j] / (1 + std::exp(-s[j])) / double(s.size());
        } else {
          const double mx = *std::max_element(s.begin(), s.end());
          double z = 0;
          for (size_t j = 0; j < s.size(); ++j) z += wgt[j] = std::exp(s[j] - mx);
          for (double& x : wgt) x /= z;
        }
        for (size_t j = 0; j < s.size(); ++j)
          for (int64_t d = 0; d < D; ++d) ref[(i * H + h) * D + d] += wgt[j] * vs[j][d];
      }

  std::vector<double> out64(T * H * D);
  malloc_kernels::lsh::lsh_attention_cpu(p, q.data(), k.data(), v.data(), ck.data(), cv.data(), out64.data());
  EXPECT(worst(out64, ref, 1e-12, 1e-10) <= 1, "lsh hstu=%d biases=%d: float64", hstu, biases);
  const auto qf = cast<float>(q), kf = cast<float>(k), vf = cast<float>(v), ckf = cast<float>(ck),
             cvf = cast<float>(cv);
  std::vector<float> out32(T * H * D);
  malloc_kernels::lsh::lsh_attention_cpu(p, qf.data(), kf.data(), vf.data(), ckf.data(), cvf.data(), out32.data());
  EXPECT(worst(out32, ref, 1e-5, 1e-4) <= 1, "lsh hstu=%d biases=%d: float32", hstu, biases);
}

// ---------------------------------------------------------------------------------------------------------------
// Product-key memory: the top-k of all S*S slot scores s1(i1) + s2(i2), and the Sparse-Gather with its backward.
static void test_pkm_topk(int64_t N, int64_t H, int64_t Dh, int64_t S, int64_t K) {
  std::mt19937 rng(int(S * 31 + K));
  const std::vector<double> q = normal(rng, N * H * 2 * Dh), sk = normal(rng, H * 2 * S * Dh);
  auto half_scores = [&](int64_t n, int64_t h, int half) {
    std::vector<double> s(S);
    const double* qh = q.data() + (n * H + h) * 2 * Dh + half * Dh;
    for (int64_t i = 0; i < S; ++i)
      s[i] = std::inner_product(qh, qh + Dh, sk.data() + ((h * 2 + half) * S + i) * Dh, 0.0);
    return s;
  };
  std::vector<double> sc64(N * H * K);
  std::vector<int64_t> ix64(N * H * K);
  malloc_kernels::pkm::topk<double>(q.data(), sk.data(), N, H, Dh, S, K, sc64.data(), ix64.data(), isa::Isa::Portable);
  const auto qf = cast<float>(q), skf = cast<float>(sk);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h) {
      const std::vector<double> s1 = half_scores(n, h, 0), s2 = half_scores(n, h, 1);
      std::vector<double> all(S * S);
      for (int64_t i = 0; i < S * S; ++i) all[i] = s1[i / S] + s2[i % S];
      std::vector<int64_t> order(S * S);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return all[a] > all[b]; });
      const int64_t o = (n * H + h) * K;
      for (int64_t e = 0; e < K; ++e)
        EXPECT(ix64[o + e] == order[e] && std::fabs(sc64[o + e] - all[order[e]]) <= 1e-12,
               "pkm topk float64 S=%lld k=%lld: rank %lld is slot %lld, expected %lld", (long long)S, (long long)K,
               (long long)e, (long long)ix64[o + e], (long long)order[e]);
    }
  // float32 per ISA: a valid top-k in float arithmetic -- scores descending and equal to the reference at the chosen
  // slots, and no unchosen slot above the k-th chosen score (within float rounding of a Dh-term dot product)
  for (isa::Isa var : variants()) {
    std::vector<float> sc(N * H * K);
    std::vector<int64_t> ix(N * H * K);
    malloc_kernels::pkm::topk<float>(qf.data(), skf.data(), N, H, Dh, S, K, sc.data(), ix.data(), var);
    const double tol = 1e-5 * Dh;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < H; ++h) {
        const std::vector<double> s1 = half_scores(n, h, 0), s2 = half_scores(n, h, 1);
        const int64_t o = (n * H + h) * K;
        std::vector<char> chosen(S * S, 0);
        bool ok = true;
        for (int64_t e = 0; e < K; ++e) {
          ok &= ix[o + e] >= 0 && ix[o + e] < S * S && !chosen[ix[o + e]];
          if (!ok) break;
          chosen[ix[o + e]] = 1;
          ok &= std::fabs(sc[o + e] - (s1[ix[o + e] / S] + s2[ix[o + e] % S])) <= tol;
          ok &= e == 0 || sc[o + e] <= sc[o + e - 1];
        }
        for (int64_t i = 0; ok && i < S * S; ++i) ok &= chosen[i] || s1[i / S] + s2[i % S] <= sc[o + K - 1] + tol;
        EXPECT(ok, "pkm topk float32 %s S=%lld k=%lld: (n %lld, h %lld) is not a top-k", isa::name(var), (long long)S,
               (long long)K, (long long)n, (long long)h);
      }
  }
}

static void test_pkm_gather(int64_t N, int64_t E, int64_t M, int64_t Dv) {
  std::mt19937 rng(int(N * 7 + Dv));
  std::uniform_int_distribution<int64_t> row(0, M - 1);
  std::vector<int64_t> idx(N * E);
  for (auto& x : idx) x = row(rng) % std::max<int64_t>(1, M / 3);  // repeated rows: the backward must accumulate
  const std::vector<double> values = normal(rng, M * Dv), w = normal(rng, N * E), go = normal(rng, N * Dv);
  std::vector<double> out_ref(N * Dv, 0.0), gw_ref(N * E, 0.0), grow_ref(M * Dv, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t e = 0; e < E; ++e) {
      const double* vr = values.data() + idx[n * E + e] * Dv;
      for (int64_t d = 0; d < Dv; ++d) {
        out_ref[n * Dv + d] += w[n * E + e] * vr[d];
        gw_ref[n * E + e] += go[n * Dv + d] * vr[d];
        grow_ref[idx[n * E + e] * Dv + d] += w[n * E + e] * go[n * Dv + d];
      }
    }
  std::vector<int64_t> rows_ref(idx);
  std::sort(rows_ref.begin(), rows_ref.end());
  rows_ref.erase(std::unique(rows_ref.begin(), rows_ref.end()), rows_ref.end());
  std::vector<double> grad_rows_ref;
  for (int64_t r : rows_ref) grad_rows_ref.insert(grad_rows_ref.end(), grow_ref.begin() + r * Dv, grow_ref.begin() + (r + 1) * Dv);

  const auto vf = cast<float>(values), wf = cast<float>(w), gof = cast<float>(go);
  for (isa::Isa var : variants()) {
    std::vector<float> out(N * Dv);
    malloc_kernels::pkm::gather_forward<float>(vf.data(), Dv, idx.data(), wf.data(), N, E, out.data(), var);
    EXPECT(worst(out, out_ref, 1e-5, 1e-4) <= 1, "pkm gather forward %s Dv=%lld", isa::name(var), (long long)Dv);
    std::vector<int32_t> count(M);
    const int64_t U = malloc_kernels::pkm::gather_backward_plan(idx.data(), N * E, M, count.data());
    EXPECT(U == int64_t(rows_ref.size()), "pkm gather plan: %lld rows, expected %zu", (long long)U, rows_ref.size());
    if (U != int64_t(rows_ref.size())) continue;
    std::vector<int64_t> order(N * E), start(U + 1), rows(U);
    std::vector<float> gw(N * E), grad_rows(U * Dv);
    malloc_kernels::pkm::gather_backward<float>(gof.data(), vf.data(), M, Dv, idx.data(), wf.data(), N, E,
                                                count.data(), U, order.data(), start.data(), gw.data(), rows.data(),
                                                grad_rows.data(), var);
    EXPECT(rows == rows_ref, "pkm gather backward %s: touched rows differ", isa::name(var));
    EXPECT(worst(gw, gw_ref, 1e-5, 1e-4) <= 1 && worst(grad_rows, grad_rows_ref, 1e-5, 1e-4) <= 1,
           "pkm gather backward %s Dv=%lld", isa::name(var), (long long)Dv);
  }
}

int main() {
  std::printf("ISA variants:");
  for (isa::Isa v : variants()) std::printf(" %s", isa::name(v));
  std::printf("\n");
  // channel counts around the vector widths (8 / 16) and the kernel's channel block; empty and one-token users
  for (int64_t C : {1, 7, 17, 37, 70})
    for (bool carried : {false, true}) test_wkv({{0, 5, 5, 6, 19}, C, carried});
  for (bool hstu : {false, true})
    for (bool biases : {false, true}) test_lsh(hstu, biases);
  test_pkm_topk(3, 2, 5, 7, 4);
  test_pkm_topk(2, 1, 16, 32, 32);
  test_pkm_topk(2, 3, 33, 9, 9);    // k = S, odd Dh
  test_pkm_gather(5, 3, 11, 13);
  test_pkm_gather(4, 8, 40, 64);
  test_pkm_gather(1, 1, 1, 1);
  if (expect_failures) {
    std::fprintf(stderr, "%d failure(s)\n", expect_failures);
    return 1;
  }
  std::printf("wkv, lsh_attention and pkm: all cases passed\n");
  return 0;
}
