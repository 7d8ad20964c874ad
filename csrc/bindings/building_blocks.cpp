// Building blocks bound on their own, to check them against NumPy; and QuantSpec, which every network
// that runs packed weights takes (nn/weights.h).
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>

#include "bindings/bindings.h"
#include "bindings/config.h"
#include "nn/activation.h"
#include "nn/attention.h"
#include "nn/conv.h"
#include "nn/linear.h"
#include "nn/rope.h"

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
  m.def("conv2d_in_bands", &conv2d_in_bands, "x"_a, "weight"_a, "padding"_a, "band_rows"_a,
        "A stride-1 conv2d (x NHWC, weight [O, kh, kw, I]) computed band by band of band_rows output rows.");
  m.def(
      "rope",
      [](const mx::array& x, const RopeConfig& config, int offset) {
        RopeConfig c = config;
        if (c.dims == 0) c.dims = x.shape(-1);
        return evaluated(Rope(c)(x, offset));
      },
      "x"_a, "config"_a, "offset"_a = 0, nb::call_guard<nb::gil_scoped_release>(),
      "A decoder's RoPE on x [B, H, T, D], positions from offset (dims 0: the whole head).");
  m.def(
      "attention",
      [](const mx::array& q, const mx::array& k, const mx::array& v, int window, std::optional<float> scale,
         std::optional<mx::array> sinks) {
        return evaluated(window > 0 ? windowed_causal_attention(q, k, v, window, scale, sinks)
                                    : causal_attention(q, k, v, scale, sinks));
      },
      "q"_a, "k"_a, "v"_a, "window"_a = 0, "scale"_a = nb::none(), "sinks"_a = nb::none(),
      nb::call_guard<nb::gil_scoped_release>(),
      "Causal attention over [B, H, L, D] (queries the last Lq of the Lk positions), within a sliding window "
      "when window > 0, with attention sinks [Hq] when given.");
  m.def(
      "mxfp4_blocks",
      [](const mx::array& blocks, const mx::array& scales) -> std::pair<mx::array, std::optional<mx::array>> {
        const WeightMap map{{"w_blocks", blocks}, {"w_scales", scales}};
        const auto& shape = blocks.shape();
        if (shape.size() < 3) throw std::invalid_argument("blocks must be [..., rows, cols / 32, 16]");
        const mx::Shape stack(shape.begin(), shape.end() - 3);
        auto matrix = Weights(map).mxfp4_blocks("w", stack, shape[shape.size() - 3], shape[shape.size() - 2] * 32);
        if (!matrix.quantized) return {evaluated(matrix.weight), std::nullopt};
        return {evaluated(matrix.weight), evaluated(matrix.quantized->scales)};
      },
      "blocks"_a, "scales"_a, nb::call_guard<nb::gil_scoped_release>(),
      "A GPT-OSS checkpoint's MXFP4 *_blocks / *_scales as the loader keeps them: (MLX mxfp4 weight, scales); "
      "on CUDA a shape its kernels lack comes back dequantized, with scales None.");
}

}  // namespace mlxr::bindings
