// mlxrunner._core: the module. The bindings of each area are in their own file (bindings.h).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "bindings/bindings.h"
#include "mlx/version.h"

NB_MODULE(_core, m) {
  // Registers mx.array with nanobind before any binding mentions it.
  nanobind::module_::import_("mlx.core");
  m.doc() = "mlxrunner's C++ core: networks, loops and sampling over MLX's C++ API.";
  m.attr("mlx_version") = mlx::core::version();

  mlxr::bindings::bind_building_blocks(m);
  mlxr::bindings::bind_embed(m);
  mlxr::bindings::bind_text(m);
  mlxr::bindings::bind_diffusion(m);
}
