// A CPU emulation of the small part of the CUDA programming model the kernels in csrc/cuda/ use, so their exact
// source (preprocessed by tests/test_cuda_emulated.py: launches -> mk_emu_launch, __shared__ -> static) runs on a
// machine without a GPU. Blocks run one after another; the threads of a block are real std::threads meeting at
// std::barrier for __syncthreads and, per warp, for __shfl_xor_sync -- so races between phases, wrong barriers and
// wrong shuffle partners show up as wrong results, as they would on a GPU. Test-only: never part of a build.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint4 {
  unsigned x, y, z, w;
};

typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr cudaError_t cudaSuccess = 0;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 gridDim, blockDim;

namespace mk_emu {
struct Block {
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint32_t> slots;
};
inline Block* current = nullptr;
inline std::vector<float>& dyn_smem() {
  static std::vector<float> buf(1 << 16);
  return buf;
}
}  // namespace mk_emu

inline float* mk_emu_dyn_smem() {
  std::fill(mk_emu::dyn_smem().begin(), mk_emu::dyn_smem().end(), std::nanf(""));  // uninitialised = NaN
  return mk_emu::dyn_smem().data();
}

inline void __syncthreads() { mk_emu::current->all->arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  mk_emu::Block& b = *mk_emu::current;
  const unsigned t = threadIdx.x, w = t / 32;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  b.slots[t] = bits;
  b.warps[w]->arrive_and_wait();
  const uint32_t got = b.slots[w * 32 + ((t % 32) ^ unsigned(lane_mask))];
  b.warps[w]->arrive_and_wait();
  T out;
  std::memcpy(&out, &got, 4);
  return out;
}

template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float __expf(float x) { return std::exp(x); }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline int atomicMax(int* p, int v) {
  std::atomic_ref<int> a(*p);
  int old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
using std::max;
using std::min;

template <typename F>
inline void mk_emu_launch(dim3 grid, dim3 block, F&& body) {
  const unsigned n = block.x * block.y * block.z;
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        mk_emu::Block b;
        b.all = std::make_unique<std::barrier<>>(n);
        for (unsigned w = 0; w < (n + 31) / 32; ++w)
          b.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - w * 32)));
        b.slots.assign(n, 0);
        mk_emu::current = &b;
        mk_emu_dyn_smem();
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (unsigned t = 0; t < n; ++t)
          threads.emplace_back([&, t] {
            threadIdx = dim3(t, 0, 0);
            blockIdx = dim3(x, y, z);
            body();
          });
        for (auto& th : threads) th.join();
        mk_emu::current = nullptr;
      }
}
