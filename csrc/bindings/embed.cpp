// Sentence embeddings: the BERT encoder, pooling and normalisation.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "bindings/bindings.h"
#include "bindings/config.h"
#include "bindings/network.h"
#include "embed/bert.h"

namespace mlxr::bindings {

void bind_embed(nb::module_& m) {
  bind_config<BertConfig>(m, "BertConfig", "transformers' BertConfig (config.json).");

  bind_network<BertEncoder>(m, "BertEncoder",
                            "BERT encoder (transformers' BertModel) with sentence-transformers pooling.")
      .def(
          "forward",
          [](const BertEncoder& self, const mx::array& ids, const mx::array& mask,
             std::optional<mx::array> token_types) { return evaluated(self.forward(ids, mask, token_types)); },
          "input_ids"_a, "attention_mask"_a, "token_type_ids"_a = nb::none(), nb::call_guard<nb::gil_scoped_release>(),
          "Last hidden state [B, T, H].")
      .def(
          "embed",
          [](const BertEncoder& self, const mx::array& ids, const mx::array& mask, const std::string& pooling,
             bool normalize) { return evaluated(self.embed(ids, mask, pooling_from_name(pooling), normalize)); },
          "input_ids"_a, "attention_mask"_a, "pooling"_a = "mean", "normalize"_a = true,
          nb::call_guard<nb::gil_scoped_release>(), "One float32 vector per input row: [B, H].")
      .def(
          "embed_sequences",
          [](const BertEncoder& self, const std::vector<std::vector<int>>& sequences, const std::string& pooling,
             bool normalize) {
            return evaluated(self.embed_sequences(sequences, pooling_from_name(pooling), normalize));
          },
          "sequences"_a, "pooling"_a = "mean", "normalize"_a = true, nb::call_guard<nb::gil_scoped_release>(),
          "One float32 vector per token id list (any lengths, no padding needed): [B, H]. On the CPU (float32) the "
          "sequences run back to back without padding, each attending to itself.")
      .def_prop_ro("packs_sequences", &BertEncoder::packs_sequences,
                   "Whether embed_sequences runs its sequences back to back, without padding, on this device.");

  m.def(
      "pool",
      [](const mx::array& hidden, const mx::array& mask, const std::string& mode) {
        return pool(hidden, mask, pooling_from_name(mode));
      },
      "hidden"_a, "attention_mask"_a, "mode"_a = "mean",
      "Pool hidden states [B, T, H] over unmasked tokens: mean, cls, max or mean_sqrt_len.");
  m.def("l2_normalize", &l2_normalize, "x"_a, "Row-wise L2 normalisation (eps 1e-12).");
}

}  // namespace mlxr::bindings
