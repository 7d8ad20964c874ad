#include "nn/cuda_device_ids.h"

#include "mlx/fast.h"
#include "nn/cuda_kernel_common.h"

namespace mlxr {

namespace {

// One thread an id: each is read once (one transaction a warp across PCIe) and written to the output, which MLX
// allocates in device memory.
constexpr const char* kDeviceIds = R"(
  size_t n = 1;
  for (int d = 0; d < ids_ndim; ++d) n *= ids_shape[d];
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = ids[i];
)";

constexpr int kDeviceIdsThreads = 256;

bool integer_ids(mx::Dtype dtype) {
  return dtype == mx::int32 || dtype == mx::uint32 || dtype == mx::int64 || dtype == mx::uint64;
}

}  // namespace

std::optional<mx::array> cuda_ids_on_device(const mx::array& ids) {
  static const bool off = switched_off("MLXRUNNER_DEVICE_IDS");
  if (off || !running_on_cuda() || ids.size() < 2 || !integer_ids(ids.dtype())) return std::nullopt;
  static const auto kernel = cuda_kernel("mlxr_device_ids", {"ids"}, {"out"}, kDeviceIds);
  const long long blocks = (static_cast<long long>(ids.size()) + kDeviceIdsThreads - 1) / kDeviceIdsThreads;
  return kernel({ids}, {ids.shape()}, {ids.dtype()}, {cuda_checked_threads(blocks * kDeviceIdsThreads), 1, 1},
                {kDeviceIdsThreads, 1, 1}, {{"T", ids.dtype()}}, std::nullopt, false, {})[0];
}

}  // namespace mlxr
