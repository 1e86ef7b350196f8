// A CPU emulation of the small part of the CUDA programming model the kernels in csrc/cuda/ use, so their exact
// source (preprocessed by tests/test_cuda_emulated.py: launches -> mk_emu_launch, __shared__ -> static) runs on a
// machine without a GPU. Blocks run one after another; the threads of a block are fibers meeting at barriers for
// __syncthreads and, per warp, for __shfl_xor_sync; each runs until its next barrier, so a missing barrier lets a
// thread read shared memory its peers have not written yet (NaN-filled), and wrong shuffle partners or barrier
// counts show up as wrong results or a reported deadlock. Launch shapes a GPU rejects throw. Test-only: never part
// of a build.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <ucontext.h>
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
struct uint2 {
  unsigned x, y;
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
constexpr unsigned kWarpFragWords = 10;  // a[4], b[2], c[4] of one lane's mma.sync operands
// The threads of a block are cooperative fibers (ucontext) on the calling OS thread: a barrier marks the fiber as
// arrived and switches back to the scheduler, which resumes the block's fibers round-robin until every one has
// finished. One OS thread and a context switch per wait make a block ~20x cheaper than one std::thread per CUDA
// thread, while keeping the semantics that matter: no fiber passes a barrier before all its participants arrive.
struct Barrier {
  unsigned expected = 0, arrived = 0, generation = 0;
};
struct Block {
  std::vector<Barrier> barriers;  // [0]: the whole block (__syncthreads); [1 + w]: warp w (shuffles)
  std::vector<uint32_t> slots;
  std::vector<uint32_t> frags;    // kWarpFragWords per thread: the operands of an emulated warp MMA (emu/mma.cuh)
  std::vector<ucontext_t> ctx;
  std::vector<char> done;
  std::vector<unsigned> wait_id, wait_gen;  // the barrier a fiber waits at and its generation then (id ~0u: none)
  ucontext_t scheduler;
  unsigned current_thread = 0;
  unsigned progress = 0;          // barrier releases + finished fibers, for deadlock detection
  std::function<void()>* body = nullptr;
};
inline Block* current = nullptr;
inline std::vector<float>& dyn_smem() {
  static std::vector<float> buf(1 << 16);
  return buf;
}
inline std::vector<std::vector<char>>& stacks() {
  static std::vector<std::vector<char>> s;
  return s;
}

inline void arrive_and_wait(unsigned id) {
  Block& b = *current;
  Barrier& bar = b.barriers[id];
  const unsigned gen = bar.generation;
  if (++bar.arrived == bar.expected) {
    bar.arrived = 0;
    ++bar.generation;
    ++b.progress;
    return;
  }
  const unsigned me = b.current_thread;
  b.wait_id[me] = id;
  b.wait_gen[me] = gen;
  swapcontext(&b.ctx[me], &b.scheduler);  // resumed only once the barrier has been released
  b.wait_id[me] = ~0u;
}

inline void fiber_entry() {
  Block& b = *current;
  (*b.body)();
  b.done[b.current_thread] = 1;
  ++b.progress;
  // returning resumes uc_link, the scheduler
}
}  // namespace mk_emu

inline float* mk_emu_dyn_smem() {
  std::fill(mk_emu::dyn_smem().begin(), mk_emu::dyn_smem().end(), std::nanf(""));  // uninitialised = NaN
  return mk_emu::dyn_smem().data();
}

inline void __syncthreads() { mk_emu::arrive_and_wait(0); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  mk_emu::Block& b = *mk_emu::current;
  const unsigned t = threadIdx.x, w = t / 32;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  b.slots[t] = bits;
  mk_emu::arrive_and_wait(1 + w);
  const uint32_t got = b.slots[w * 32 + ((t % 32) ^ unsigned(lane_mask))];
  mk_emu::arrive_and_wait(1 + w);
  T out;
  std::memcpy(&out, &got, 4);
  return out;
}

template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float __expf(float x) { return std::exp(x); }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
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

// A launch a GPU would reject (cudaErrorInvalidConfiguration: an empty grid, grid x above 2^31 - 1, y or z above
// 65,535, more than 1024 threads) throws instead of running, so the emulated tests see launch-shape bugs too.
inline void mk_emu_check_launch(dim3 grid, dim3 block) {
  const bool ok = grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u && grid.y <= 65535u &&
                  grid.z <= 65535u && block.x * block.y * block.z >= 1 && block.x * block.y * block.z <= 1024u;
  if (!ok)
    throw std::runtime_error("invalid configuration argument: grid (" + std::to_string(grid.x) + ", " +
                             std::to_string(grid.y) + ", " + std::to_string(grid.z) + ")");
}

template <typename F>
inline void mk_emu_launch(dim3 grid, dim3 block, F&& body) {
  mk_emu_check_launch(grid, block);
  const unsigned n = block.x * block.y * block.z;
  constexpr size_t kStack = 256 * 1024;
  gridDim = grid;
  blockDim = block;
  auto& stacks = mk_emu::stacks();
  while (stacks.size() < n) stacks.emplace_back(kStack);
  std::function<void()> fn = body;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        mk_emu::Block b;
        b.barriers.resize(1 + (n + 31) / 32);
        b.barriers[0].expected = n;
        for (unsigned w = 0; w < (n + 31) / 32; ++w) b.barriers[1 + w].expected = std::min(32u, n - w * 32);
        b.slots.assign(n, 0);
        b.frags.assign(size_t(n) * mk_emu::kWarpFragWords, 0);
        b.ctx.resize(n);
        b.done.assign(n, 0);
        b.wait_id.assign(n, ~0u);
        b.wait_gen.assign(n, 0);
        b.body = &fn;
        mk_emu::current = &b;
        mk_emu_dyn_smem();
        blockIdx = dim3(x, y, z);
        for (unsigned t = 0; t < n; ++t) {
          getcontext(&b.ctx[t]);
          b.ctx[t].uc_stack.ss_sp = stacks[t].data();
          b.ctx[t].uc_stack.ss_size = kStack;
          b.ctx[t].uc_link = &b.scheduler;
          makecontext(&b.ctx[t], mk_emu::fiber_entry, 0);
        }
        for (;;) {
          bool all_done = true;
          const unsigned before = b.progress;
          for (unsigned t = 0; t < n; ++t) {
            if (b.done[t]) continue;
            all_done = false;
            if (b.wait_id[t] != ~0u && b.barriers[b.wait_id[t]].generation == b.wait_gen[t]) continue;
            b.current_thread = t;
            threadIdx = dim3(t, 0, 0);
            swapcontext(&b.scheduler, &b.ctx[t]);
          }
          if (all_done) break;
          if (b.progress == before) throw std::runtime_error("emulated block deadlocked at a barrier");
        }
        mk_emu::current = nullptr;
      }
}
