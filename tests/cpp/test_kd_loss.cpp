// C++ check of the pykd ops built by CMakeLists.txt: calls them through the dispatcher, as a
// C++ user would, and compares with the same loss written in ATen operations.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <iostream>
#include <optional>
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
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("pykd::kd_loss", "")
                .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                    double, double, double, double, int64_t, c10::string_view, bool, bool)>();
  const at::Tensor s = at::randn({rows, classes}, at::kDouble);
  const at::Tensor t = at::randn({rows, classes}, at::kDouble);
  auto [per_row, grad_s, grad_t] = op.call(
      s.to(at::kFloat), t.to(at::kFloat), std::nullopt, temperature, 0.0, 1.0, 0.0, -100, "none",
      true, false);

  const at::Tensor log_ps = at::log_softmax(s / temperature, -1);
  const at::Tensor log_pt = at::log_softmax(t / temperature, -1);
  const at::Tensor p_t = log_pt.exp();
  const at::Tensor expected = (p_t * (log_pt - log_ps)).sum(-1) * temperature * temperature;
  expect_close(per_row, expected, "per-row loss");
  expect_close(grad_s, (log_ps.exp() - p_t) * temperature, "grad_student");
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
