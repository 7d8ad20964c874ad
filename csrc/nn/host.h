// Reading array values on the host (token ids, position ids) when they may live on a GPU.
#pragma once

#include <mlx/mlx.h>

namespace mlxr {

namespace mx = mlx::core;

// The array evaluated into host-visible memory. On a GPU the read goes through a copy on the CPU
// stream: MLX orders that copy after the GPU work that produced `a` (an event between the streams)
// and writes it into memory the CPU may dereference. Reading a CUDA buffer's pointer directly is
// what crashed Ollama's CUDA image runner (a null Buffer::raw_ptr); this never depends on how a
// backend maps device buffers. On the CPU it is just an eval.
inline mx::array to_host(const mx::array& a) {
  if (mx::default_device() == mx::Device::cpu) {
    mx::eval(a);
    return a;
  }
  auto host = mx::copy(a, mx::Device::cpu);
  mx::eval(host);
  return host;
}

template <typename T>
T host_item(const mx::array& a) {
  return to_host(a).item<T>();
}

}  // namespace mlxr
