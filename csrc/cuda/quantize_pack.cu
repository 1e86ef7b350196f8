// CUDA quantize-and-pack of one cache payload (layout: quantize_pack.h; numerics: quant.h, shared with the CPU
// packer, so results are bit-exact with csrc/cpu/quantize_pack.cpp and malloc_kernels/cache/quant.py).
//
// Two kernels, so that no two threads ever write the same byte (4-bit/2-bit groups may share bytes):
//   1. group_params_*: one thread per (row, group, channel|entry-group) computes min/max over the group's valid
//      entries and stores the fp16 scale/zero (groups with no valid entry store 0);
//   2. pack_codes: one thread per output byte reads back the fp16 scale/zero (exact, since they are fp16
//      values) and packs its 1, 2 or 4 codes; padding entries get 0.
// The division (x - zero) / scale is IEEE-rounded (nvcc's default, no --use_fast_math), as the contract needs.
#include <cuda_runtime.h>

#include "launch.h"
#include "malloc_kernels/quant.h"

namespace malloc_kernels {
namespace cuda {
namespace {

namespace q = malloc_kernels::quant;

struct Dims {
  int64_t B, H, N, D;
  int64_t xs0, xs1, xs2, xs3;
  int64_t ls0, ls1;
};

__device__ __forceinline__ int64_t valid_len(const int32_t* length, const Dims& d, int64_t b, int64_t h) {
  const int64_t n = length[b * d.ls0 + h * d.ls1];
  return n < 0 ? 0 : (n > d.N ? d.N : n);
}

__device__ __forceinline__ int group_scale_zero(const QuantSpec& spec, float mn, float mx, float* s, float* z) {
  if (spec.fp8) {
    *z = 0.0f;
    return q::fp8_scale(mx, s);
  }
  return q::int_scale_zero(mn, mx, (1 << spec.bits) - 1, s, z);
}

// Scale/zero of the non-empty group of valid values v[t * stride], begin <= t < end: min, max and absmax with the
// same comparisons in the same order as the CPU packer, so even the sign of a zero statistic matches it. A NaN or
// a range that does not fit float16 raises *status (atomicMax of the quant:: code) and leaves s = z = 0.
__device__ __forceinline__ void strided_group_params(const QuantSpec& spec, const float* v, int64_t stride,
                                                     int64_t begin, int64_t end, int* status, float* s, float* z) {
  float mn = v[begin * stride], mx = mn, amax = 0.0f;
  bool nan = false;
  for (int64_t t = begin; t < end; ++t) {
    const float e = v[t * stride];
    nan |= (e != e);
    mn = e < mn ? e : mn;
    mx = e > mx ? e : mx;
    amax = fabsf(e) > amax ? fabsf(e) : amax;
  }
  const int st = nan ? int(q::kNonFinite) : group_scale_zero(spec, mn, spec.fp8 ? amax : mx, s, z);
  if (st != q::kOk) {
    atomicMax(status, st);
    *s = *z = 0.0f;
  }
}

// Token axis: one thread per (b, h, entry j, channel group g); threads of a warp walk consecutive groups.
__global__ void group_params_token(const float* __restrict__ x, const int32_t* __restrict__ length, Dims d,
                                   QuantSpec spec, uint16_t* __restrict__ scale, uint16_t* __restrict__ zero,
                                   int* status) {
  const int64_t NG = d.D / spec.group_size;
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= d.B * d.H * d.N * NG) return;
  const int64_t g = idx % NG, j = (idx / NG) % d.N, r = idx / (NG * d.N);
  const int64_t b = r / d.H, h = r % d.H;
  float s = 0.0f, z = 0.0f;
  if (j < valid_len(length, d, b, h)) {
    const float* xr = x + b * d.xs0 + h * d.xs1 + j * d.xs2;
    strided_group_params(spec, xr, d.xs3, g * spec.group_size, (g + 1) * spec.group_size, status, &s, &z);
  }
  scale[idx] = q::f32_to_f16_bits(s);
  if (!spec.fp8) zero[idx] = q::f32_to_f16_bits(z);
}

// Channel axis (KIVI keys): one thread per (b, h, entry group g, channel c); a warp covers consecutive channels,
// so every load of the entry loop is coalesced along D.
__global__ void group_params_channel(const float* __restrict__ x, const int32_t* __restrict__ length, Dims d,
                                     QuantSpec spec, uint16_t* __restrict__ scale, uint16_t* __restrict__ zero,
                                     int* status) {
  const int64_t G = spec.group_size, NG = (d.N + G - 1) / G;
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= d.B * d.H * NG * d.D) return;
  const int64_t c = idx % d.D, g = (idx / d.D) % NG, r = idx / (d.D * NG);
  const int64_t b = r / d.H, h = r % d.H;
  const int64_t n = valid_len(length, d, b, h);
  float s = 0.0f, z = 0.0f;
  const int64_t j0 = g * G, j1 = (j0 + G < n) ? j0 + G : n;
  if (j0 < n) {
    const float* xc = x + b * d.xs0 + h * d.xs1 + c * d.xs3;
    strided_group_params(spec, xc, d.xs2, j0, j1, status, &s, &z);
  }
  scale[idx] = q::f32_to_f16_bits(s);
  if (!spec.fp8) zero[idx] = q::f32_to_f16_bits(z);
}

// One thread per output byte (b, h, j, w): codes of elements [w * per, w * per + per) with per = 8 / bits.
__global__ void pack_codes(const float* __restrict__ x, const int32_t* __restrict__ length, Dims d, QuantSpec spec,
                           const uint16_t* __restrict__ scale, const uint16_t* __restrict__ zero,
                           uint8_t* __restrict__ codes) {
  const int64_t W = q::packed_width(int(d.D), spec.bits);
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= d.B * d.H * d.N * W) return;
  const int64_t w = idx % W, j = (idx / W) % d.N, r = idx / (W * d.N);
  const int64_t b = r / d.H, h = r % d.H;
  uint32_t byte = 0;
  if (j < valid_len(length, d, b, h)) {
    const int per = 8 / spec.bits;
    const int64_t G = spec.group_size;
    const float* xr = x + b * d.xs0 + h * d.xs1 + j * d.xs2;
    for (int k = 0; k < per; ++k) {
      const int64_t c = w * per + k;
      if (c >= d.D) break;
      const int64_t p = spec.channel ? (r * ((d.N + G - 1) / G) + j / G) * d.D + c
                                     : (r * d.N + j) * (d.D / G) + c / G;
      const float s = q::f16_bits_to_f32(scale[p]);
      const float v = xr[c * d.xs3];
      const uint32_t code = spec.fp8 ? q::quantize_fp8(v, s)
                                     : q::quantize_int(v, s, q::f16_bits_to_f32(zero[p]), (1 << spec.bits) - 1);
      byte |= code << (k * spec.bits);
    }
  }
  codes[idx] = static_cast<uint8_t>(byte);
}

inline unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace

cudaError_t quantize_pack(const float* x, const int64_t* xs, const int32_t* length, const int64_t* ls, int64_t B,
                          int64_t H, int64_t N, int64_t D, const QuantSpec& spec, uint8_t* codes, uint16_t* scale,
                          uint16_t* zero, int* status, cudaStream_t stream) {
  const Dims d{B, H, N, D, xs[0], xs[1], xs[2], xs[3], ls[0], ls[1]};
  constexpr int kThreads = 256;
  const int64_t groups = spec.channel ? B * H * ((N + spec.group_size - 1) / spec.group_size) * D
                                      : B * H * N * (D / spec.group_size);
  if (groups > 0) {
    if (spec.channel) {
      group_params_channel<<<blocks_for(groups, kThreads), kThreads, 0, stream>>>(x, length, d, spec, scale, zero,
                                                                                   status);
    } else {
      group_params_token<<<blocks_for(groups, kThreads), kThreads, 0, stream>>>(x, length, d, spec, scale, zero,
                                                                                 status);
    }
  }
  const int64_t bytes = B * H * N * quant::packed_width(int(D), spec.bits);
  if (bytes > 0) pack_codes<<<blocks_for(bytes, kThreads), kThreads, 0, stream>>>(x, length, d, spec, scale, zero,
                                                                                  codes);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace malloc_kernels
