// nanobind bindings for mlxrunner._core. Bindings only: the work lives in nn/, embed/, ...
//
// mx.array crosses the boundary because this module shares nanobind's type registry with
// mlx.core (NB_DOMAIN mlx in CMakeLists.txt) and imports mlx.core before anything is bound.
// Long computations release the GIL and are evaluated before returning, so Python threads
// (the aiohttp loop) keep running while MLX works.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unordered_map.h>
#include <nanobind/stl/vector.h>

#include "embed/bert.h"
#include "mlx/version.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

namespace {

void bind_building_blocks(nb::module_& m) {
  m.def("gelu", [](const mx::array& x) { return mlxr::gelu(x); }, "x"_a,
        "Exact (erf) GELU, as torch.nn.functional.gelu.");
  m.def("linear",
        [](const mx::array& x, const mx::array& weight, std::optional<mx::array> bias) {
          return mlxr::Linear{weight, bias}(x);
        },
        "x"_a, "weight"_a, "bias"_a = nb::none(), "x @ weight.T + bias, weight stored [out, in] as in PyTorch.");
  m.def("pool",
        [](const mx::array& hidden, const mx::array& mask, const std::string& mode) {
          return mlxr::pool(hidden, mask, mlxr::pooling_from_name(mode));
        },
        "hidden"_a, "attention_mask"_a, "mode"_a = "mean",
        "Pool hidden states [B, T, H] over unmasked tokens: mean, cls, max or mean_sqrt_len.");
  m.def("l2_normalize", &mlxr::l2_normalize, "x"_a, "Row-wise L2 normalisation (eps 1e-12).");
}

void bind_bert(nb::module_& m) {
  nb::class_<mlxr::BertConfig>(m, "BertConfig")
      .def(nb::init<>())
      .def_rw("vocab_size", &mlxr::BertConfig::vocab_size)
      .def_rw("hidden_size", &mlxr::BertConfig::hidden_size)
      .def_rw("num_hidden_layers", &mlxr::BertConfig::num_hidden_layers)
      .def_rw("num_attention_heads", &mlxr::BertConfig::num_attention_heads)
      .def_rw("intermediate_size", &mlxr::BertConfig::intermediate_size)
      .def_rw("max_position_embeddings", &mlxr::BertConfig::max_position_embeddings)
      .def_rw("type_vocab_size", &mlxr::BertConfig::type_vocab_size)
      .def_rw("layer_norm_eps", &mlxr::BertConfig::layer_norm_eps)
      .def_rw("hidden_act", &mlxr::BertConfig::hidden_act);

  nb::class_<mlxr::BertEncoder>(m, "BertEncoder",
                                "BERT encoder (transformers' BertModel) with sentence-transformers pooling.")
      .def(nb::init<const mlxr::BertConfig&, const mlxr::WeightMap&>(), "config"_a, "weights"_a)
      .def(
          "forward",
          [](const mlxr::BertEncoder& self, const mx::array& ids, const mx::array& mask,
             std::optional<mx::array> token_types) {
            auto out = self.forward(ids, mask, token_types);
            mx::eval(out);
            return out;
          },
          "input_ids"_a, "attention_mask"_a, "token_type_ids"_a = nb::none(),
          nb::call_guard<nb::gil_scoped_release>(), "Last hidden state [B, T, H].")
      .def(
          "embed",
          [](const mlxr::BertEncoder& self, const mx::array& ids, const mx::array& mask, const std::string& pooling,
             bool normalize) {
            auto out = self.embed(ids, mask, mlxr::pooling_from_name(pooling), normalize);
            mx::eval(out);
            return out;
          },
          "input_ids"_a, "attention_mask"_a, "pooling"_a = "mean", "normalize"_a = true,
          nb::call_guard<nb::gil_scoped_release>(), "One float32 vector per input row: [B, H].")
      .def_prop_ro("hidden_size", [](const mlxr::BertEncoder& self) { return self.config().hidden_size; })
      .def_prop_ro("max_positions",
                   [](const mlxr::BertEncoder& self) { return self.config().max_position_embeddings; });
}

}  // namespace

NB_MODULE(_core, m) {
  // Registers mx.array with nanobind before any binding mentions it.
  nb::module_::import_("mlx.core");
  m.doc() = "mlxrunner's C++ core: networks, loops and sampling over MLX's C++ API.";
  m.attr("mlx_version") = mx::version();

  // C++ exceptions carry the message Python shows: invalid_argument -> ValueError.
  bind_building_blocks(m);
  bind_bert(m);
}
