// CPU implementations of pykd::hint_loss_fwd / hint_loss_bwd.
//
// All pairs are cut into chunks of at most kChunk elements and handled in one at::parallel_for
// region, so a single large pair is shared by every thread. The loss is summed per chunk and the
// chunk sums are added in a fixed order, so it does not depend on the number of threads.
//
// The loops are plain code that the compiler vectorises: they are bound by memory bandwidth (one
// subtraction and one multiply-add per element read), so ATen's per-capability at::vec kernels
// (as for the exponential-bound KD loss) gain nothing measurable here.
#include "hint_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace pykd::cpu {
namespace {

constexpr int64_t kChunk = int64_t{1} << 16;
// Independent partial sums in a chunk: they let the compiler keep the sum in vector registers
// without reassociating floating-point additions itself.
constexpr int64_t kLanes = 16;

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

// Runs body(chunk_index) for every chunk, in parallel unless the whole job is small.
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
      body(c);
    }
  });
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
acc_t sum_squared_difference(const scalar_t* s, const scalar_t* t, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const acc_t d = static_cast<acc_t>(s[i + j]) - static_cast<acc_t>(t[i + j]);
      lanes[j] += d * d;
    }
  }
  for (; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(s[i]) - static_cast<acc_t>(t[i]);
    lanes[0] += d * d;
  }
  acc_t sum = 0;
  for (int64_t j = 0; j < kLanes; ++j) {
    sum += lanes[j];
  }
  return sum;
}

// grad_s = scale * (s - t) and grad_t = -grad_s, each only when asked for.
template <typename scalar_t, bool kStudent, bool kTeacher>
void scaled_difference(
    const scalar_t* s,
    const scalar_t* t,
    int64_t n,
    at::opmath_type<scalar_t> scale,
    scalar_t* grad_s,
    scalar_t* grad_t) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t d = scale * (static_cast<acc_t>(s[i]) - static_cast<acc_t>(t[i]));
    if constexpr (kStudent) {
      grad_s[i] = static_cast<scalar_t>(d);
    }
    if constexpr (kTeacher) {
      grad_t[i] = static_cast<scalar_t>(-d);
    }
  }
}

// Element `offset` of a flat tensor, or null for a gradient that was not asked for.
template <typename scalar_t>
const scalar_t* data(const at::Tensor& tensor, int64_t offset) {
  return tensor.defined() ? tensor.const_data_ptr<scalar_t>() + offset : nullptr;
}

template <typename scalar_t>
scalar_t* mutable_data(const at::Tensor& tensor, int64_t offset) {
  return tensor.defined() ? tensor.mutable_data_ptr<scalar_t>() + offset : nullptr;
}

at::Tensor hint_loss_fwd_cpu(
    at::TensorList student_features,
    at::TensorList teacher_features,
    at::ArrayRef<double> weights) {
  check_hint_features("hint_loss_fwd", student_features, teacher_features, weights);
  const at::Tensor& first = student_features[0];
  at::Tensor loss = at::empty({}, first.options().dtype(at::toOpMathType(first.scalar_type())));
  const std::vector<HintPair> pairs = hint_pairs(student_features, teacher_features, false, false);
  const std::vector<Chunk> chunks = make_chunks(pairs);
  std::vector<double> chunk_sums(chunks.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, first.scalar_type(), "hint_loss_fwd", [&] {
    for_each_chunk(chunks, [&](int64_t c) {
      const Chunk& chunk = chunks[c];
      const HintPair& pair = pairs[chunk.pair];
      chunk_sums[c] = sum_squared_difference(
          data<scalar_t>(pair.student, chunk.begin), data<scalar_t>(pair.teacher, chunk.begin),
          chunk.end - chunk.begin);
    });
    double total = 0;
    size_t c = 0;
    for (size_t k = 0; k < pairs.size(); ++k) {
      double pair_sum = 0;
      for (; c < chunks.size() && chunks[c].pair == static_cast<int64_t>(k); ++c) {
        pair_sum += chunk_sums[c];
      }
      total += weights[k] * (pair_sum / static_cast<double>(pairs[k].numel()));
    }
    *loss.mutable_data_ptr<at::opmath_type<scalar_t>>() =
        static_cast<at::opmath_type<scalar_t>>(total);
  });
  return loss;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> hint_loss_bwd_cpu(
    const at::Tensor& grad_loss,
    at::TensorList student_features,
    at::TensorList teacher_features,
    at::ArrayRef<double> weights,
    bool student_grad,
    bool teacher_grad) {
  check_hint_features("hint_loss_bwd", student_features, teacher_features, weights);
  const at::Tensor& first = student_features[0];
  check_hint_grad(grad_loss, first);
  std::vector<HintPair> pairs =
      hint_pairs(student_features, teacher_features, student_grad, teacher_grad);
  if (!(student_grad || teacher_grad)) {
    return hint_gradients(pairs);
  }
  const std::vector<Chunk> chunks = make_chunks(pairs);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, first.scalar_type(), "hint_loss_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const double grad = static_cast<double>(*grad_loss.const_data_ptr<acc_t>());
    std::vector<acc_t> scales;
    for (size_t k = 0; k < pairs.size(); ++k) {
      scales.push_back(static_cast<acc_t>(hint_grad_scale(grad, weights[k], pairs[k].numel())));
    }
    for_each_chunk(chunks, [&](int64_t c) {
      const Chunk& chunk = chunks[c];
      const HintPair& pair = pairs[chunk.pair];
      const scalar_t* s = data<scalar_t>(pair.student, chunk.begin);
      const scalar_t* t = data<scalar_t>(pair.teacher, chunk.begin);
      scalar_t* grad_s = mutable_data<scalar_t>(pair.grad_student, chunk.begin);
      scalar_t* grad_t = mutable_data<scalar_t>(pair.grad_teacher_out, chunk.begin);
      const int64_t n = chunk.end - chunk.begin;
      const acc_t scale = scales[chunk.pair];
      if (student_grad && teacher_grad) {
        scaled_difference<scalar_t, true, true>(s, t, n, scale, grad_s, grad_t);
      } else if (student_grad) {
        scaled_difference<scalar_t, true, false>(s, t, n, scale, grad_s, grad_t);
      } else {
        scaled_difference<scalar_t, false, true>(s, t, n, scale, grad_s, grad_t);
      }
    });
  });
  return hint_gradients(pairs);
}

}  // namespace
}  // namespace pykd::cpu

TORCH_LIBRARY_IMPL(pykd, CPU, m) {
  m.impl("hint_loss_fwd", &pykd::cpu::hint_loss_fwd_cpu);
  m.impl("hint_loss_bwd", &pykd::cpu::hint_loss_bwd_cpu);
}
