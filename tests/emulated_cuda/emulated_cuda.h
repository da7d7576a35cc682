// Runs pykd's CUDA sources (csrc/cuda/) on the host, for tests on machines without a GPU: the
// host compiler builds them with this header first (build.py rewrites the two constructs that are
// not C++: kernel<<<config>>>(args) and extern __shared__ arrays).
//
// What is emulated: a launch runs its blocks one after another; the threads of a block are fibers
// (ucontext) on one OS thread, each running until it waits at a barrier (__syncthreads, a warp's
// __syncwarp or shuffle). The scheduler always runs the runnable thread of highest priority, the
// priorities in thread order, reversed, or shuffled anew whenever a barrier opens (set_schedule):
// a warp runs ahead of the rest of its block as far as its barriers let it, so that a missing
// barrier gives a wrong or schedule-dependent result instead of passing by luck. Shuffles
// exchange values through per-warp slots; a barrier that not every thread of its block or warp
// reaches is reported as a deadlock; dynamic shared memory is filled with 0xff bytes before each
// block (a read before any write gives NaN); a launch with more than 1024 threads, an empty grid,
// or more dynamic shared memory than the kernel may use (48 KiB, or its cudaFuncSetAttribute
// opt-in, at most 227 KiB) fails as on a device; a failed CUDA_KERNEL_ASSERT fails the launch.
//
// What is not: the device's arithmetic (exp2f and friends are the host's), registers, occupancy,
// timing, static shared memory sizes, the memory model between blocks (blocks never overlap) and
// streams (everything is synchronous).
#pragma once

#include <cuda_runtime.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

namespace emu {

constexpr int kWarp = 32;
constexpr unsigned kMaxBlockThreads = 1024;
constexpr size_t kDefaultDynamicShared = 48 * 1024;
constexpr size_t kMaxDynamicShared = 227 * 1024;  // opt-in limit of an H100 / H200
constexpr size_t kFiberStack = 256 * 1024;

enum class Schedule { Forward = 0, Reverse = 1, Shuffled = 2 };

struct Barrier {
  int first = 0, count = 0;  // the fibers [first, first + count) wait at it
  int arrived = 0;
};

struct Fiber {
  ucontext_t start;  // entered once per block; later switches are _setjmp / _longjmp, which
  jmp_buf resume;    // (unlike swapcontext) make no system call
  bool started = false;
  void* fake_stack = nullptr;  // AddressSanitizer's, while switched out
  std::unique_ptr<char[]> stack;
  dim3 thread;
  int linear = 0;
  Barrier* waiting = nullptr;
  bool done = false;
};

struct Machine {
  dim3 grid, block, block_index;
  std::vector<Fiber> fibers;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> warp_slots;  // kWarp per warp
  std::vector<unsigned char> dynamic_shared;
  std::vector<int> order;  // the fibers' priorities, highest first
  bool released = false;   // a barrier let its fibers go since the scheduler last looked
  int finished = 0;
  jmp_buf scheduler;
  int current = 0;
  std::function<void()> body;
  std::exception_ptr error;
  std::string assert_failure;
  std::mt19937 random;
  void* fake_stack = nullptr;  // the scheduler's, while a fiber runs
#if defined(__SANITIZE_ADDRESS__)
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
#endif
};

struct Settings {
  Schedule schedule = Schedule::Forward;
  uint32_t seed = 0;
  int64_t launches = 0;
  std::map<const void*, size_t> dynamic_shared_opt_in;
};

inline Settings& settings() {
  static Settings s;
  return s;
}

inline Machine*& machine() {
  static Machine* m = nullptr;
  return m;
}

inline Fiber& current_fiber() {
  return machine()->fibers[machine()->current];
}

// AddressSanitizer's notes of a stack switch.
inline void switching(void** fake_stack, const void* stack, size_t size) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(fake_stack, stack, size);
#else
  (void)fake_stack, (void)stack, (void)size;
#endif
}
inline void switched(
    void* fake_stack,
    const void** from_stack = nullptr,
    size_t* from_size = nullptr) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake_stack, from_stack, from_size);
#else
  (void)fake_stack, (void)from_stack, (void)from_size;
#endif
}

inline const void* scheduler_stack() {
#if defined(__SANITIZE_ADDRESS__)
  return machine()->scheduler_stack;
#else
  return nullptr;
#endif
}
inline size_t scheduler_stack_size() {
#if defined(__SANITIZE_ADDRESS__)
  return machine()->scheduler_stack_size;
#else
  return 0;
#endif
}

// From the scheduler into fiber f, until it waits or finishes.
inline void enter(Fiber& f) {
  Machine& m = *machine();
  switching(&m.fake_stack, f.stack.get(), kFiberStack);
  if (_setjmp(m.scheduler) == 0) {
    if (!f.started) {
      f.started = true;
      setcontext(&f.start);
    }
    _longjmp(f.resume, 1);
  }
  switched(m.fake_stack);
}

// Back to the scheduler (the fiber runs again once it is not waiting).
inline void yield() {
  Fiber& f = current_fiber();
  switching(&f.fake_stack, scheduler_stack(), scheduler_stack_size());
  if (_setjmp(f.resume) == 0) {
    _longjmp(machine()->scheduler, 1);
  }
  switched(f.fake_stack);
}

inline void wait(Barrier& b) {
  Machine& m = *machine();
  if (++b.arrived == b.count) {
    b.arrived = 0;
    for (int i = b.first; i < b.first + b.count; ++i) {
      m.fibers[i].waiting = nullptr;
    }
    m.released = true;
  } else {
    current_fiber().waiting = &b;
  }
  yield();
}

inline void sync_block() {
  wait(machine()->block_barrier);
}

inline void sync_warp(unsigned mask = 0xffffffffu) {
  Machine& m = *machine();
  const int warp = current_fiber().linear / kWarp;
  const int lanes = m.warp_barriers[warp].count;
  const unsigned full = lanes == kWarp ? 0xffffffffu : (1u << lanes) - 1;
  TORCH_CHECK(
      (mask & full) == full, "emulated CUDA: a warp-synchronous call with mask ", mask,
      " in a warp of ", lanes, " threads (pykd's kernels use whole warps)");
  wait(m.warp_barriers[warp]);
}

// __shfl_xor_sync over a whole warp (pykd's kernels pass no width).
template <typename T>
T shfl_xor(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  Machine& m = *machine();
  const int linear = current_fiber().linear, warp = linear / kWarp, lane = linear % kWarp;
  uint64_t* slots = m.warp_slots.data() + warp * kWarp;
  std::memcpy(&slots[lane], &value, sizeof(T));
  sync_warp(mask);
  const int source = (lane ^ lane_mask) & (kWarp - 1);
  T result = value;
  if (source < m.warp_barriers[warp].count) {
    std::memcpy(&result, &slots[source], sizeof(T));
  }
  sync_warp(mask);  // the slots may be written again
  return result;
}

inline void* dynamic_shared() {
  return machine()->dynamic_shared.data();
}

inline void device_assert_failed(const char* condition, const char* file, int line) {
  Machine& m = *machine();
  if (m.assert_failure.empty()) {
    m.assert_failure = std::string(file) + ":" + std::to_string(line) + ": " + condition;
  }
}

inline void fiber_main() {
  Machine& m = *machine();
#if defined(__SANITIZE_ADDRESS__)
  switched(nullptr, &m.scheduler_stack, &m.scheduler_stack_size);
#endif
  try {
    m.body();
  } catch (...) {
    if (!m.error) {
      m.error = std::current_exception();
    }
  }
  current_fiber().done = true;
  ++m.finished;
  switching(nullptr, scheduler_stack(), scheduler_stack_size());  // this stack is done
  _longjmp(m.scheduler, 1);
}

inline void run_block(Machine& m) {
  std::fill(m.dynamic_shared.begin(), m.dynamic_shared.end(), 0xff);
  for (Fiber& f : m.fibers) {
    f.done = false;
    f.started = false;
    f.waiting = nullptr;
    getcontext(&f.start);
    f.start.uc_stack.ss_sp = f.stack.get();
    f.start.uc_stack.ss_size = kFiberStack;
    f.start.uc_link = nullptr;  // fiber_main never returns
    makecontext(&f.start, &fiber_main, 0);
  }
  m.finished = 0;
  m.released = true;
  // Always the runnable fiber of highest priority: a warp that can go on runs ahead of the rest
  // of its block as far as its barriers let it, which a missing barrier cannot survive.
  const int n = static_cast<int>(m.fibers.size());
  int next = 0;
  while (m.finished < n) {
    if (m.released) {
      m.released = false;
      next = 0;
      if (settings().schedule == Schedule::Shuffled) {
        std::shuffle(m.order.begin(), m.order.end(), m.random);
      }
    }
    while (next < n && (m.fibers[m.order[next]].done || m.fibers[m.order[next]].waiting)) {
      ++next;
    }
    if (next == n) {
      if (!m.error) {
        m.error = std::make_exception_ptr(c10::Error(
            {__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
            "emulated CUDA: deadlock in block (" + std::to_string(m.block_index.x) + ", " +
                std::to_string(m.block_index.y) + "): " + std::to_string(n - m.finished) +
                " threads wait at a barrier that " + std::to_string(m.finished) +
                " finished threads never reach"));
      }
      return;
    }
    m.current = m.order[next];
    enter(m.fibers[m.current]);
  }
}

struct Config {
  dim3 grid, block;
  size_t shared;
  template <typename G, typename B, typename S = size_t, typename St = cudaStream_t>
  Config(G g, B b, S s = 0, St = nullptr)
      : grid(g), block(b), shared(static_cast<size_t>(s)) {}
  template <typename... A>
  auto operator()(A&&... args) const;
};

// A launch's configuration and arguments, until `kernel ^ call` runs it.
template <typename... A>
struct Call {
  Config config;
  std::tuple<std::decay_t<A>...> args;
};

template <typename... A>
auto Config::operator()(A&&... args) const {
  return Call<A...>{*this, std::tuple<std::decay_t<A>...>(std::forward<A>(args)...)};
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), const Call<A...>& call) {
  const Config& c = call.config;
  const unsigned threads = c.block.x * c.block.y * c.block.z;
  const uint64_t blocks = uint64_t(c.grid.x) * c.grid.y * c.grid.z;
  TORCH_CHECK(
      threads >= 1 && threads <= kMaxBlockThreads && blocks >= 1,
      "emulated CUDA: invalid configuration argument (grid ", c.grid.x, "x", c.grid.y, "x",
      c.grid.z, ", block ", c.block.x, "x", c.block.y, "x", c.block.z, ")");
  const auto opt_in = settings().dynamic_shared_opt_in.find(reinterpret_cast<const void*>(kernel));
  const size_t allowed = opt_in != settings().dynamic_shared_opt_in.end()
      ? std::max(opt_in->second, kDefaultDynamicShared)
      : kDefaultDynamicShared;
  TORCH_CHECK(
      c.shared <= allowed, "emulated CUDA: a launch with ", c.shared,
      " bytes of dynamic shared memory, more than the kernel's ", allowed);
  TORCH_CHECK(machine() == nullptr, "emulated CUDA: a launch inside a kernel");

  Machine m;
  m.grid = c.grid;
  m.block = c.block;
  m.random.seed(settings().seed + static_cast<uint32_t>(settings().launches++));
  m.fibers = std::vector<Fiber>(threads);
  for (unsigned i = 0; i < threads; ++i) {
    Fiber& f = m.fibers[i];
    f.stack.reset(new char[kFiberStack]);
    f.linear = static_cast<int>(i);
    f.thread = dim3(i % c.block.x, i / c.block.x % c.block.y, i / (c.block.x * c.block.y));
  }
  m.block_barrier.count = static_cast<int>(threads);  // first = 0
  const int warps = static_cast<int>((threads + kWarp - 1) / kWarp);
  m.warp_barriers.resize(warps);
  for (int w = 0; w < warps; ++w) {
    m.warp_barriers[w].first = w * kWarp;
    m.warp_barriers[w].count = std::min<int>(kWarp, static_cast<int>(threads) - w * kWarp);
  }
  m.warp_slots.assign(size_t(warps) * kWarp, 0);
  m.dynamic_shared.resize(std::max<size_t>(c.shared, 16));
  m.order.resize(threads);
  std::iota(m.order.begin(), m.order.end(), 0);
  if (settings().schedule == Schedule::Reverse) {
    std::reverse(m.order.begin(), m.order.end());
  }
  m.body = [&] { std::apply(kernel, call.args); };

  machine() = &m;
  // The launch stops at the first block that fails (an exception or a device-side assert).
  auto running = [&] { return !m.error && m.assert_failure.empty(); };
  for (unsigned z = 0; z < c.grid.z && running(); ++z) {
    for (unsigned y = 0; y < c.grid.y && running(); ++y) {
      for (unsigned x = 0; x < c.grid.x && running(); ++x) {
        m.block_index = dim3(x, y, z);
        run_block(m);
      }
    }
  }
  machine() = nullptr;
  if (m.error) {
    std::rethrow_exception(m.error);
  }
  TORCH_CHECK(
      m.assert_failure.empty(), "emulated CUDA: device-side assertion failed: ", m.assert_failure);
}

template <typename... P, typename... A>
void operator^(void (*kernel)(P...), const Call<A...>& call) {
  launch(kernel, call);
}

template <typename T>
T atomic_or(T* address, T value) {  // fibers never preempt each other
  const T old = *address;
  *address = old | value;
  return old;
}

template <typename T>
T atomic_add(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

// The runtime calls pykd's drivers make (sparse_kd_loss_cuda.cu's shared memory opt-in).
template <typename F>
cudaError_t func_get_attributes(cudaFuncAttributes* attributes, F* kernel) {
  std::memset(attributes, 0, sizeof(*attributes));
  attributes->maxThreadsPerBlock = kMaxBlockThreads;
  const auto it = settings().dynamic_shared_opt_in.find(reinterpret_cast<const void*>(kernel));
  attributes->maxDynamicSharedSizeBytes = static_cast<int>(
      it != settings().dynamic_shared_opt_in.end() ? it->second : kDefaultDynamicShared);
  return cudaSuccess;
}

template <typename F>
cudaError_t func_set_attribute(F* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > kMaxDynamicShared) {
    return cudaErrorInvalidValue;
  }
  settings().dynamic_shared_opt_in[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

inline cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t device_get_attribute(int* value, cudaDeviceAttr attribute, int) {
  if (attribute != cudaDevAttrMaxSharedMemoryPerBlockOptin) {
    return cudaErrorInvalidValue;
  }
  *value = static_cast<int>(kMaxDynamicShared);
  return cudaSuccess;
}

}  // namespace emu

namespace c10::cuda {
// The drivers' device guard and stream, for tensors that live in host memory.
struct EmulatedGuard {
  explicit EmulatedGuard(c10::Device) {}
};
inline cudaStream_t emulated_current_stream(c10::DeviceIndex = -1) {
  return nullptr;
}
}  // namespace c10::cuda

// The CUDA language, for the host compiler.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#undef CUDA_KERNEL_ASSERT
#undef C10_CUDA_CHECK
#undef C10_CUDA_KERNEL_LAUNCH_CHECK
#undef TORCH_LIBRARY_IMPL
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define threadIdx (::emu::current_fiber().thread)
#define blockIdx (::emu::machine()->block_index)
#define blockDim (::emu::machine()->block)
#define gridDim (::emu::machine()->grid)
#define __syncthreads() ::emu::sync_block()
#define __syncwarp ::emu::sync_warp
#define __shfl_xor_sync ::emu::shfl_xor
#define atomicOr ::emu::atomic_or
#define atomicAdd ::emu::atomic_add
#define CUDA_KERNEL_ASSERT(cond) \
  ((cond) ? (void)0 : ::emu::device_assert_failed(#cond, __FILE__, __LINE__))
#define C10_CUDA_CHECK(expr)                                                          \
  do {                                                                                \
    const cudaError_t emulated_error = (expr);                                        \
    TORCH_CHECK(emulated_error == cudaSuccess, "emulated CUDA: ", #expr, " failed");  \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
#define cudaFuncGetAttributes ::emu::func_get_attributes
#define cudaFuncSetAttribute ::emu::func_set_attribute
#define cudaGetDevice ::emu::get_device
#define cudaDeviceGetAttribute ::emu::device_get_attribute
#define CUDAGuard EmulatedGuard
#define getCurrentCUDAStream emulated_current_stream
// The drivers' CUDA kernels become the CPU kernels of the pykd_emulated_cuda namespace.
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(pykd_emulated_cuda, CPU, m, C10_UID)
