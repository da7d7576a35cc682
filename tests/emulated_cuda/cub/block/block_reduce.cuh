// cub::BlockReduce for emulated_cuda.h: the same contract (the result is valid in thread 0 only;
// the temporary storage is reusable only after a __syncthreads), summed in thread order.
#pragma once

namespace cub {

template <typename T, int kThreads>
class BlockReduce {
 public:
  struct TempStorage {
    T slots[kThreads];
  };

  explicit BlockReduce(TempStorage& temp) : temp_(temp) {}

  template <typename Op>
  T Reduce(T value, Op op) {
    const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    TORCH_CHECK(
        blockDim.x * blockDim.y * blockDim.z == kThreads,
        "emulated CUDA: cub::BlockReduce of ", kThreads, " threads in a smaller or larger block");
    temp_.slots[thread] = value;
    __syncthreads();
    if (thread != 0) {
      return value;  // undefined in cub; a partial value, as there
    }
    T result = temp_.slots[0];
    for (int i = 1; i < kThreads; ++i) {
      result = op(result, temp_.slots[i]);
    }
    return result;
  }

  T Sum(T value) {
    return Reduce(value, [](const T& a, const T& b) { return a + b; });
  }

 private:
  TempStorage& temp_;
};

}  // namespace cub
