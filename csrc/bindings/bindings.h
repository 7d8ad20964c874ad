// The areas of mlxrunner._core, each bound by its own file.
//
// mx.array crosses the boundary because this module shares nanobind's type registry with
// mlx.core (NB_DOMAIN mlx in CMakeLists.txt) and imports mlx.core before anything is bound.
// Long computations release the GIL and are evaluated before returning, so Python threads
// (the aiohttp loop) keep running while MLX works. C++ exceptions carry the message Python
// shows: std::invalid_argument becomes ValueError.
#pragma once

#include <nanobind/nanobind.h>

#include "mlx/mlx.h"

namespace mlxr::bindings {

namespace nb = nanobind;
namespace mx = mlx::core;
using namespace nb::literals;

// `out` (an array or arrays) evaluated, as a computation's result is before it returns to Python.
template <class Arrays>
Arrays evaluated(Arrays out) {
  mx::eval(out);
  return out;
}

void bind_building_blocks(nb::module_& m);  // building_blocks.cpp
void bind_embed(nb::module_& m);            // embed.cpp
void bind_text(nb::module_& m);             // text.cpp
void bind_diffusion(nb::module_& m);        // diffusion.cpp

}  // namespace mlxr::bindings
