// The binding every network shares: built from (config, weights[, quantization]), it shows the config it was
// built with.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unordered_map.h>

#include <type_traits>
#include <utility>

#include "nn/weights.h"

namespace mlxr::bindings {

namespace nb = nanobind;

// Binds Network as `name` with its constructor Network(config, weights) and a read-only `config`: a
// copy, so changing it changes nothing in the network. Returns the class for the network's own methods.
template <class Network>
nb::class_<Network> bind_network(nb::module_& m, const char* name, const char* doc) {
  using namespace nb::literals;
  using Config = std::decay_t<decltype(std::declval<const Network&>().config())>;
  nb::class_<Network> cls(m, name, doc);
  if constexpr (std::is_constructible_v<Network, const Config&, const WeightMap&, const QuantMap&>) {
    // A network that runs packed weights: `quantization` names them (nn/weights.h).
    cls.def(nb::init<const Config&, const WeightMap&, const QuantMap&>(), "config"_a, "weights"_a,
            "quantization"_a = QuantMap{});
  } else {
    cls.def(nb::init<const Config&, const WeightMap&>(), "config"_a, "weights"_a);
  }
  cls.def_prop_ro(
      "config", [](const Network& self) { return self.config(); }, "The config it was built with (a copy).");
  if constexpr (requires(const Network& n) { n.arrays(); }) {
    cls.def(
        "weight_arrays", [](const Network& self) { return self.arrays(); },
        "Every weight array it holds, lazy until evaluated: evaluating them reads the checkpoint and builds its "
        "fused projections.");
  }
  return cls;
}

}  // namespace mlxr::bindings
