// Token ids made on the host, copied into device memory before a gather reads them (CUDA).
//
// An array made from host data (a prompt's ids) lives in MLX's managed memory, which the GPU reads across PCIe, and
// MLX's gather reads the index again for every element it writes: 2,560 reads a row of a 4B model's embedding table.
// An H200 took 134 us to gather the 64 rows of a prompt's follow-up (3.1 us for one row), longer than a layer of the
// model. One small kernel reads each id once and writes it to device memory, where the gather then finds it.
#pragma once

#include <optional>

#include "mlx/array.h"

namespace mlxr {

namespace mx = mlx::core;

// `ids` (an integer array of more than one element) copied by a kernel into a fresh device buffer, the same values,
// shape and dtype; nullopt off CUDA, for one element (a decode step's token, made on the device), for other dtypes, or
// with MLXRUNNER_DEVICE_IDS=0 (to measure MLX's gather reading the ids where they are).
std::optional<mx::array> cuda_ids_on_device(const mx::array& ids);

}  // namespace mlxr
