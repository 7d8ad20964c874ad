#include "nn/cuda_host_ints.h"

#include <iterator>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "mlx/fast.h"
#include "nn/cuda_kernel_common.h"

namespace mlxr {

namespace {

// Kernels for 16, 64 and 512 values: a call pads its values to the smallest that holds them (unwritten: the
// kernel stores the first n only). PTX for a given capacity never changes, so each is built and compiled once.
constexpr int kCapacities[] = {16, 64, kMostHostInts};

// The kernel for n values (1 <= n <= kMostHostInts): the smallest capacity that holds them, and its PTX.
std::pair<int, const std::string&> kernel_for(int n) {
  static const std::vector<std::string> sources = [] {
    std::vector<std::string> out;
    for (int capacity : kCapacities) out.push_back(host_ints_ptx(capacity));
    return out;
  }();
  for (size_t i = 0; i < std::size(kCapacities); ++i) {
    if (n <= kCapacities[i]) return {kCapacities[i], sources[i]};
  }
  throw std::logic_error("host_ints: no kernel holds " + std::to_string(n) + " values");
}

}  // namespace

// Hand-written PTX (MLX's precompiled-kernel path takes PTX and loads it through the driver, which compiles it for the
// GPU at hand): the parameters in the order MLX passes them, the output's pointer, then each int scalar. Kernel
// parameters cannot be indexed by a register, so the stores are unrolled, each guarded by k < n.
std::string host_ints_ptx(int capacity) {
  const std::string name = "mlxr_host_ints_" + std::to_string(capacity);
  std::string ptx = ".version 7.0\n.target sm_75\n.address_size 64\n.visible .entry " + name + "(\n";
  ptx += "  .param .u64 param_out,\n  .param .u32 param_count";
  for (int k = 0; k < capacity; ++k) ptx += ",\n  .param .u32 param_v" + std::to_string(k);
  ptx += "\n)\n{\n  .reg .pred %in_range;\n  .reg .b32 %count, %value;\n  .reg .b64 %dst;\n";
  ptx += "  ld.param.u64 %dst, [param_out];\n  cvta.to.global.u64 %dst, %dst;\n  ld.param.u32 %count, [param_count];\n";
  for (int k = 0; k < capacity; ++k) {
    const auto at = std::to_string(k);
    ptx += "  setp.gt.u32 %in_range, %count, " + at + ";\n  ld.param.u32 %value, [param_v" + at +
           "];\n  @%in_range st.global.u32 [%dst+" + std::to_string(4 * k) + "], %value;\n";
  }
  ptx += "  ret;\n}\n";
  return ptx;
}

std::optional<mx::array> cuda_int32_from_host(std::span<const int> values) {
  const int n = static_cast<int>(values.size());
  if (!running_on_cuda() || n < 1 || n > kMostHostInts) return std::nullopt;
  const auto [capacity, ptx] = kernel_for(n);
  std::vector<mx::fast::ScalarArg> scalars;
  scalars.reserve(capacity + 1);
  scalars.emplace_back(n);
  for (int k = 0; k < capacity; ++k) scalars.emplace_back(k < n ? values[k] : 0);
  return mx::fast::precompiled_cuda_kernel("mlxr_host_ints_" + std::to_string(capacity), ptx, {}, {{1, n}}, {mx::int32},
                                           scalars, {1, 1, 1}, {1, 1, 1})[0];
}

bool host_ints_by_kernel_switched_on() {
  static EnvSwitch by_kernel("MLXRUNNER_HOST_INTS_BY_KERNEL");
  return by_kernel.on();
}

}  // namespace mlxr
