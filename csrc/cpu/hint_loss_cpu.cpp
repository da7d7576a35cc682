// CPU implementation of pykd::hint_loss: checks, allocation, and one at::parallel_for region over
// all pairs. The pairs are cut into chunks of at most kChunk elements (so a single large pair is
// shared by every thread) and the kernel for this CPU (cpu/cpu_capability.h) runs on each chunk:
// it reads the chunk of s and t once, sums the squared differences and writes the gradients asked
// for in the same pass. The loss is summed per chunk and the chunk sums are added in a fixed
// order, so it does not depend on the number of threads.
#include "hint_loss.h"
#include "cpu/cpu_capability.h"
#include "cpu/hint_loss_cpu.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace pykd::cpu {
namespace {

constexpr int64_t kChunk = int64_t{1} << 16;

struct Chunk {
  int64_t pair, begin, end;
};

std::vector<Chunk> make_chunks(const std::vector<HintPair>& pairs) {
  std::vector<Chunk> chunks;
  for (size_t k = 0; k < pairs.size(); ++k) {
    const int64_t n = pairs[k].numel();
    for (int64_t begin = 0; begin < n; begin += kChunk) {
      chunks.push_back({static_cast<int64_t>(k), begin, std::min(begin + kChunk, n)});
    }
  }
  return chunks;
}

// Runs body(chunk) for every chunk, in parallel unless the whole job is small.
template <typename Body>
void for_each_chunk(const std::vector<Chunk>& chunks, const Body& body) {
  int64_t total = 0;
  for (const Chunk& c : chunks) {
    total += c.end - c.begin;
  }
  const int64_t n = static_cast<int64_t>(chunks.size());
  const int64_t grain = total < at::internal::GRAIN_SIZE ? n + 1 : 1;
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      body(c, chunks[c]);
    }
  });
}

// Element `offset` of a flat tensor, or null for a gradient that was not asked for.
const void* data(const at::Tensor& tensor, int64_t offset) {
  return tensor.defined()
      ? static_cast<const char*>(tensor.const_data_ptr()) + offset * tensor.element_size()
      : nullptr;
}

void* mutable_data(const at::Tensor& tensor, int64_t offset) {
  return tensor.defined()
      ? static_cast<char*>(tensor.mutable_data_ptr()) + offset * tensor.element_size()
      : nullptr;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> hint_loss_cpu(
    at::TensorList student_features,
    at::TensorList teacher_features,
    at::ArrayRef<double> weights,
    bool student_grad,
    bool teacher_grad) {
  check_hint_features("hint_loss", student_features, teacher_features, weights);
  const at::Tensor& first = student_features[0];
  at::Tensor loss = at::empty({}, first.options().dtype(at::toOpMathType(first.scalar_type())));
  std::vector<HintPair> pairs =
      hint_pairs(student_features, teacher_features, student_grad, teacher_grad);
  const std::vector<Chunk> chunks = make_chunks(pairs);
  const auto kernel = PYKD_CPU_KERNEL(hint_chunk);
  std::vector<double> chunk_sums(chunks.size());
  for_each_chunk(chunks, [&](int64_t c, const Chunk& chunk) {
    const HintPair& pair = pairs[chunk.pair];
    chunk_sums[c] = kernel(
        first.scalar_type(), data(pair.student, chunk.begin), data(pair.teacher, chunk.begin),
        chunk.end - chunk.begin, hint_grad_scale(weights[chunk.pair], pair.numel()),
        mutable_data(pair.grad_student, chunk.begin),
        mutable_data(pair.grad_teacher_out, chunk.begin));
  });
  double total = 0;
  size_t c = 0;
  for (size_t k = 0; k < pairs.size(); ++k) {
    double pair_sum = 0;
    for (; c < chunks.size() && chunks[c].pair == static_cast<int64_t>(k); ++c) {
      pair_sum += chunk_sums[c];
    }
    total += weights[k] * (pair_sum / static_cast<double>(pairs[k].numel()));  // 0 / 0 = NaN
  }
  loss.fill_(total);
  auto [grad_student, grad_teacher] = hint_gradients(pairs);
  return {loss, std::move(grad_student), std::move(grad_teacher)};
}

}  // namespace
}  // namespace pykd::cpu

TORCH_LIBRARY_IMPL(pykd, CPU, m) {
  m.impl("hint_loss", &pykd::cpu::hint_loss_cpu);
}
