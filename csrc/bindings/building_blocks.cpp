// Building blocks bound on their own, to check them against NumPy; and QuantSpec, which every network
// that runs packed weights takes (nn/weights.h).
#include <nanobind/stl/optional.h>

#include "bindings/bindings.h"
#include "bindings/config.h"
#include "nn/activation.h"
#include "nn/linear.h"

namespace mlxr::bindings {

void bind_building_blocks(nb::module_& m) {
  bind_config<QuantSpec>(m, "QuantSpec", "How a packed weight was quantized: mx.quantize's bits, group_size, mode.");
  m.def(
      "gelu", [](const mx::array& x) { return gelu(x); }, "x"_a, "Exact (erf) GELU, as torch.nn.functional.gelu.");
  m.def(
      "linear",
      [](const mx::array& x, const mx::array& weight, std::optional<mx::array> bias) {
        return Linear{.weight = weight, .bias = bias}(x);
      },
      "x"_a, "weight"_a, "bias"_a = nb::none(), "x @ weight.T + bias, weight stored [out, in] as in PyTorch.");
}

}  // namespace mlxr::bindings
