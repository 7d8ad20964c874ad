#include "bindings/progress.h"

namespace mlxr::bindings {

StepCallback step_callback(nb::object progress) {
  if (progress.is_none()) return {};
  return [progress](int step, int total) {
    nb::gil_scoped_acquire gil;
    nb::object result = progress(step, total);
    return !(result.is_valid() && nb::isinstance<nb::bool_>(result) && !nb::cast<bool>(result));
  };
}

std::function<void()> cancel_check(nb::object check) {
  if (check.is_none()) return {};
  return [check]() {
    nb::gil_scoped_acquire gil;
    check();
  };
}

}  // namespace mlxr::bindings
