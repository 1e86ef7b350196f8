// OpenMP quantize-and-pack of one cache payload over (user, kv head) rows; see quantize_pack.h for the layout and
// quant.h for the numerics (shared with the CUDA packer, so the two are bit-exact by construction).
#include "malloc_kernels/quantize_pack.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "malloc_kernels/nvfp4.h"
#include "malloc_kernels/quant.h"

namespace malloc_kernels {
namespace {

using namespace quant;

inline int64_t row_length(const int32_t* length, const int64_t* ls, int64_t b, int64_t h, int64_t N) {
  const int64_t n = length[b * ls[0] + h * ls[1]];
  return std::min<int64_t>(std::max<int64_t>(n, 0), N);
}

// Scale/zero of one group from its fp32 statistics, stored as fp16 bits. For fp8 `mx` is the absmax.
inline int group_params(const QuantSpec& spec, float mn, float mx, float* s, float* z) {
  if (spec.fp8) {
    *z = 0.0f;
    return fp8_scale(mx, s);
  }
  return int_scale_zero(mn, mx, (1 << spec.bits) - 1, s, z);
}

inline uint32_t encode(const QuantSpec& spec, float x, float s, float z) {
  return spec.fp8 ? quantize_fp8(x, s) : quantize_int(x, s, z, (1 << spec.bits) - 1);
}

// One (b, h) row with the token axis: each valid entry's channels split into D / G groups.
int row_token(const float* x, const int64_t* xs, int64_t n, int64_t D, int64_t W, const QuantSpec& spec,
              uint8_t* codes, uint16_t* scale, uint16_t* zero) {
  const int64_t G = spec.group_size, NG = D / G;
  int status = kOk;
  for (int64_t j = 0; j < n; ++j) {
    const float* xr = x + j * xs[2];
    uint8_t* cr = codes + j * W;
    for (int64_t g = 0; g < NG; ++g) {
      float mn = xr[g * G * xs[3]], mx = mn, amax = 0.0f;
      bool nan = false;
      for (int64_t d = g * G; d < (g + 1) * G; ++d) {
        const float v = xr[d * xs[3]];
        nan |= (v != v);
        mn = v < mn ? v : mn;
        mx = v > mx ? v : mx;
        amax = std::fabs(v) > amax ? std::fabs(v) : amax;
      }
      float s, z;
      int st = nan ? kNonFinite : group_params(spec, mn, spec.fp8 ? amax : mx, &s, &z);
      if (st != kOk) {
        status = status ? status : st;
        s = z = 0.0f;
      }
      scale[j * NG + g] = f32_to_f16_bits(s);
      if (!spec.fp8) zero[j * NG + g] = f32_to_f16_bits(z);
      for (int64_t d = g * G; d < (g + 1) * G; ++d) set_code(cr, int(d), spec.bits, encode(spec, xr[d * xs[3]], s, z));
    }
  }
  return status;
}

// One (b, h) row with the channel axis: groups of G consecutive valid entries per channel (KIVI keys).
int row_channel(const float* x, const int64_t* xs, int64_t n, int64_t D, int64_t W, const QuantSpec& spec,
                uint8_t* codes, uint16_t* scale, uint16_t* zero, std::vector<float>& buf) {
  const int64_t G = spec.group_size;
  buf.resize(3 * D);
  float* mn = buf.data();
  float* mx = mn + D;
  float* fs = mx + D;  // per-channel scale then zero reuse: fs holds scale, mn is overwritten by zero
  int status = kOk;
  for (int64_t j0 = 0, g = 0; j0 < n; j0 += G, ++g) {
    const int64_t j1 = std::min(j0 + G, n);
    // Entries outer, channels inner: the stride-1 walk over d keeps the statistics loop streaming.
    for (int64_t d = 0; d < D; ++d) {
      const float v = x[j0 * xs[2] + d * xs[3]];
      mn[d] = v;
      mx[d] = spec.fp8 ? std::fabs(v) : v;
    }
    bool nan = false;
    for (int64_t j = j0; j < j1; ++j) {
      const float* xr = x + j * xs[2];
      for (int64_t d = 0; d < D; ++d) {
        const float v = xr[d * xs[3]];
        nan |= (v != v);
        if (spec.fp8) {
          mx[d] = std::fabs(v) > mx[d] ? std::fabs(v) : mx[d];
        } else {
          mn[d] = v < mn[d] ? v : mn[d];
          mx[d] = v > mx[d] ? v : mx[d];
        }
      }
    }
    for (int64_t d = 0; d < D; ++d) {
      float s, z;
      int st = nan ? kNonFinite : group_params(spec, mn[d], mx[d], &s, &z);
      if (st != kOk) {
        status = status ? status : st;
        s = z = 0.0f;
      }
      fs[d] = s;
      mn[d] = z;
      scale[g * D + d] = f32_to_f16_bits(s);
      if (!spec.fp8) zero[g * D + d] = f32_to_f16_bits(z);
    }
    for (int64_t j = j0; j < j1; ++j) {
      const float* xr = x + j * xs[2];
      uint8_t* cr = codes + j * W;
      for (int64_t d = 0; d < D; ++d) set_code(cr, int(d), spec.bits, encode(spec, xr[d * xs[3]], fs[d], mn[d]));
    }
  }
  return status;
}

}  // namespace

int quantize_pack_cpu(const float* x, const int64_t* xs, const int32_t* length, const int64_t* ls, int64_t B,
                      int64_t H, int64_t N, int64_t D, const QuantSpec& spec, uint8_t* codes, uint16_t* scale,
                      uint16_t* zero) {
  const int64_t W = packed_width(int(D), spec.bits);
  const int64_t rows = B * H;
  const int64_t scale_row = spec.channel ? ((N + spec.group_size - 1) / spec.group_size) * D
                                         : N * (D / spec.group_size);
  // Padding must read as zeros (codes, and scales/zeros of groups with no valid entry).
  std::memset(codes, 0, size_t(rows * N * W));
  std::memset(scale, 0, size_t(rows * scale_row) * sizeof(uint16_t));
  if (!spec.fp8) std::memset(zero, 0, size_t(rows * scale_row) * sizeof(uint16_t));
  std::vector<int> status(size_t(rows), 0);
#pragma omp parallel
  {
    std::vector<float> buf;
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / H, h = r % H;
      const float* xr = x + b * xs[0] + h * xs[1];
      const int64_t n = row_length(length, ls, b, h, N);
      uint8_t* cr = codes + r * N * W;
      uint16_t* sr = scale + r * scale_row;
      uint16_t* zr = spec.fp8 ? nullptr : zero + r * scale_row;
      status[size_t(r)] = spec.channel ? row_channel(xr, xs, n, D, W, spec, cr, sr, zr, buf)
                                       : row_token(xr, xs, n, D, W, spec, cr, sr, zr);
    }
  }
  for (int s : status)
    if (s) return s;
  return kOk;
}

// Codes of one packed row as floats, c[d] for d < D: whole bytes at a time (the loops vectorize), the odd tail
// through get_code.
template <int BITS>
inline void unpack_row(const uint8_t* cr, int64_t D, float* c) {
  constexpr int per = 8 / BITS;
  constexpr uint32_t mask = (1u << BITS) - 1;
  const int64_t whole = D / per;
  for (int64_t i = 0; i < whole; ++i) {
    const uint32_t byte = cr[i];
    for (int k = 0; k < per; ++k) c[i * per + k] = float((byte >> (k * BITS)) & mask);
  }
  for (int64_t d = whole * per; d < D; ++d) c[d] = float(get_code(cr, int(d), BITS));
}

void unpack_dequantize_cpu(const uint8_t* codes, const uint16_t* scale, const uint16_t* zero,
                           const int32_t* length, const int64_t* ls, int64_t B, int64_t H, int64_t N, int64_t D,
                           const QuantSpec& spec, float* out) {
  const int64_t W = packed_width(int(D), spec.bits);
  const int64_t G = spec.group_size;
  const int64_t scale_row = spec.channel ? ((N + G - 1) / G) * D : N * (D / G);
  // e4m3fn decodes through a table (256 entries, exact)
  float fp8[256];
  for (int i = 0; i < 256; ++i) fp8[i] = e4m3fn_to_f32(uint8_t(i));
  // Work items of up to 256 entries of one (user, head) row, so both threads stay busy on few rows. Scales and
  // zeros are converted from fp16 once per group (channel axis: per token group; token axis: per entry) into
  // per-channel float vectors, so the inner loop is code * s[d] + z[d] over whole rows (the same fp32 operations
  // as dequant_int / dequant_fp8, so the result is bit-identical to the element-wise definition).
  constexpr int64_t kChunk = 256;
  const int64_t chunks = (N + kChunk - 1) / kChunk;
#pragma omp parallel
  {
    std::vector<float> sf(static_cast<size_t>(D)), zf(static_cast<size_t>(D)), c(static_cast<size_t>(D));
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < B * H * chunks; ++it) {
      const int64_t r = it / chunks, j0 = (it % chunks) * kChunk, j1 = std::min(N, j0 + kChunk);
      const int64_t b = r / H, h = r % H;
      const int64_t n = row_length(length, ls, b, h, N);
      const uint16_t* sr = scale + r * scale_row;
      const uint16_t* zr = spec.fp8 ? nullptr : zero + r * scale_row;
      float* o = out + r * N * D;
      const int64_t jv = std::max(j0, std::min(j1, n));
      if (jv < j1) std::memset(o + jv * D, 0, size_t((j1 - jv) * D) * sizeof(float));
      int64_t loaded = -1;  // group whose scales sf / zf hold (channel axis)
      for (int64_t j = j0; j < jv; ++j) {
        if (spec.channel) {
          if (j / G != loaded) {
            loaded = j / G;
            for (int64_t d = 0; d < D; ++d) {
              sf[size_t(d)] = f16_bits_to_f32(sr[loaded * D + d]);
              zf[size_t(d)] = zr ? f16_bits_to_f32(zr[loaded * D + d]) : 0.f;
            }
          }
        } else {
          for (int64_t g = 0; g < D / G; ++g) {
            const float s = f16_bits_to_f32(sr[j * (D / G) + g]);
            const float z = zr ? f16_bits_to_f32(zr[j * (D / G) + g]) : 0.f;
            for (int64_t d = g * G; d < (g + 1) * G; ++d) { sf[size_t(d)] = s; zf[size_t(d)] = z; }
          }
        }
        const uint8_t* cr = codes + (r * N + j) * W;
        float* oj = o + j * D;
        if (spec.fp8) {
          for (int64_t d = 0; d < D; ++d) oj[d] = fp8[cr[d]] * sf[size_t(d)];
          continue;
        }
        if (spec.bits == 8) unpack_row<8>(cr, D, c.data());
        else if (spec.bits == 4) unpack_row<4>(cr, D, c.data());
        else unpack_row<2>(cr, D, c.data());
        for (int64_t d = 0; d < D; ++d) oj[d] = c[size_t(d)] * sf[size_t(d)] + zf[size_t(d)];
      }
    }
  }
}

int quantize_pack_nvfp4_cpu(const float* x, const int64_t* xs, const int32_t* length, const int64_t* ls, int64_t B,
                            int64_t H, int64_t N, int64_t D, uint8_t* codes, uint8_t* scale) {
  const int64_t W = (D + 1) / 2, NG = nvfp4::groups(D), rows = B * H;
  std::memset(codes, 0, size_t(rows * N * W));
  std::memset(scale, 0, size_t(rows * N * NG));
  std::vector<int> status(size_t(rows), 0);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / H, h = r % H;
    const int64_t n = row_length(length, ls, b, h, N);
    for (int64_t j = 0; j < n; ++j) {
      const int st = nvfp4::encode_row(x + b * xs[0] + h * xs[1] + j * xs[2], xs[3], int(D),
                                       codes + (r * N + j) * W, scale + (r * N + j) * NG);
      if (st && !status[size_t(r)]) status[size_t(r)] = st;
    }
  }
  for (int s : status)
    if (s) return s;
  return kOk;
}

void unpack_dequantize_nvfp4_cpu(const uint8_t* codes, const uint8_t* scale, const int32_t* length,
                                 const int64_t* ls, int64_t B, int64_t H, int64_t N, int64_t D, float* out) {
  const int64_t W = (D + 1) / 2, NG = nvfp4::groups(D);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t r = 0; r < B * H; ++r) {
    const int64_t b = r / H, h = r % H;
    const int64_t n = row_length(length, ls, b, h, N);
    float* o = out + r * N * D;
    std::memset(o, 0, size_t(N * D) * sizeof(float));
    nvfp4::decode_rows(codes + r * N * W, W, int(n), int(D), int(D), o, scale + r * N * NG, NG);
  }
}

}  // namespace malloc_kernels
