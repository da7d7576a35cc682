// C++ check of the pykd ops built by CMakeLists.txt: calls them through the dispatcher, as a
// C++ user would, and compares with the same loss written in ATen operations.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <iostream>
#include <tuple>

namespace {

int failures = 0;

void expect_close(const at::Tensor& actual, const at::Tensor& expected, const char* what) {
  if (!at::allclose(actual.to(at::kDouble), expected.to(at::kDouble), 1e-4, 1e-6)) {
    std::cerr << "FAIL " << what << ": max difference "
              << (actual.to(at::kDouble) - expected.to(at::kDouble)).abs().max().item<double>()
              << "\n";
    ++failures;
  }
}

void check_shape(int64_t rows, int64_t classes, double temperature) {
  auto fwd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("pykd::kd_loss_fwd", "")
                 .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                     const at::Tensor&, const at::Tensor&, double)>();
  auto bwd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("pykd::kd_loss_bwd", "")
                 .typed<std::tuple<at::Tensor, at::Tensor>(
                     const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, double, bool, bool)>();
  const at::Tensor s = at::randn({rows, classes}, at::kDouble);
  const at::Tensor t = at::randn({rows, classes}, at::kDouble);
  auto [kl, lse_s, lse_t] = fwd.call(s.to(at::kFloat), t.to(at::kFloat), temperature);

  const at::Tensor log_ps = at::log_softmax(s / temperature, -1);
  const at::Tensor log_pt = at::log_softmax(t / temperature, -1);
  const at::Tensor p_t = log_pt.exp();
  const at::Tensor expected_kl = (p_t * (log_pt - log_ps)).sum(-1);
  expect_close(kl, expected_kl, "kl");
  expect_close(lse_s, at::logsumexp(s / temperature, -1), "student_lse");

  const at::Tensor grad = at::ones({rows}, at::kFloat);
  auto [grad_s, grad_t] =
      bwd.call(grad, s.to(at::kFloat), t.to(at::kFloat), lse_s, lse_t, kl, temperature, true, false);
  expect_close(grad_s, (log_ps.exp() - p_t) / temperature, "grad_student");
  if (grad_t.numel() != 0) {
    std::cerr << "FAIL grad_teacher should be empty when not asked for\n";
    ++failures;
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  check_shape(37, 10, 2.0);
  check_shape(5, 4099, 1.0);
  check_shape(3, 32000, 4.0);
  if (failures == 0) {
    std::cout << "test_kd_loss: all checks passed\n";
  }
  return failures == 0 ? 0 : 1;
}
