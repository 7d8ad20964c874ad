#include "nn/cpu_kernels.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"
#include "nn/cpu_kernel_loops.h"
#include "nn/erf_coefficients.h"

// Built with -ffp-contract=off (CMakeLists.txt): a * b + c stays two roundings, as in MLX's separate ops;
// only the explicit fmas of MLX's exp fuse.

namespace mlxr {

namespace {

// Below this many elements a kernel stays on the calling thread: starting threads would cost more.
constexpr size_t kElementsPerThread = 1 << 15;

// Runs work(begin, end) over [0, n) in contiguous parts, one per core (the last on the calling thread).
template <typename Work>
void on_all_cores(size_t n, size_t elements_per_item, const Work& work) {
  const size_t cores = std::max(1u, std::thread::hardware_concurrency());
  const size_t threads = std::clamp<size_t>(n * elements_per_item / kElementsPerThread, 1, std::min(cores, n));
  std::vector<std::thread> helpers;
  const size_t part = (n + threads - 1) / threads;
  for (size_t t = 1; t < threads; ++t) {
    const size_t begin = t * part, end = std::min(n, begin + part);
    if (begin < end) helpers.emplace_back([&work, begin, end] { work(begin, end); });
  }
  work(0, std::min(n, part));
  for (auto& helper : helpers) helper.join();
}

}  // namespace

namespace cpu_loops::baseline {
#include "nn/cpu_kernel_loops.inc"
}  // namespace cpu_loops::baseline

namespace {

// The loops for this machine: AVX2 + FMA where the CPU has both.
const cpu_loops::Loops& loops() {
  static const cpu_loops::Loops& chosen = []() -> const cpu_loops::Loops& {
#ifdef MLXR_AVX2_LOOPS
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return cpu_loops::avx2::loops;
#endif
    return cpu_loops::baseline::loops;
  }();
  return chosen;
}

// MLX's softmax kernel for float32 at SIMD width 1 (mlx/backend/cpu/softmax.cpp): the max, the exps and
// their sum in index order (one accumulator: the order is what makes the sum bit-identical), then x 1/sum.
void softmax_rows(const float* in, float* out, size_t rows, int n) {
  on_all_cores(rows, n, [&](size_t begin, size_t end) {
    for (size_t r = begin; r < end; ++r) {
      const float* x = in + r * n;
      float* y = out + r * n;
      loops().exp_shifted(x, y, n, loops().row_max(x, n));
      float sum = 0.0f;
      for (int j = 0; j < n; ++j) sum += y[j];
      loops().scale_row(y, n, 1 / sum);
    }
  });
}

// The output takes the input's buffer when the graph no longer needs the input (as MLX's own unary ops do).
void allocate_like(const mx::array& in, mx::array& out) {
  if (in.is_donatable()) {
    out.copy_shared_buffer(in);
  } else {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
}

class CpuKernel : public mx::UnaryPrimitive {
 public:
  using mx::UnaryPrimitive::UnaryPrimitive;

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlxrunner's CPU kernels run on the CPU only");
  }

 protected:
  // Runs `work` on this primitive's CPU stream once the inputs are ready, `out` (already allocated) its output.
  template <typename Work>
  void dispatch(const std::vector<mx::array>& inputs, mx::array& out, Work&& work) {
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& input : inputs) encoder.set_input_array(input);
    encoder.set_output_array(out);
    encoder.dispatch(std::forward<Work>(work));
  }
};

class CpuSoftmax : public CpuKernel {
 public:
  using CpuKernel::CpuKernel;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& in = inputs[0];
    allocate_like(in, out);
    dispatch(inputs, out,
             [in = in.data<float>(), out = out.data<float>(), n = in.shape(-1), rows = in.size() / in.shape(-1)] {
               softmax_rows(in, out, rows, n);
             });
  }

  DEFINE_NAME(CpuSoftmax)
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

class CpuGelu : public CpuKernel {
 public:
  using CpuKernel::CpuKernel;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& in = inputs[0];
    allocate_like(in, out);
    dispatch(inputs, out, [in = in.data<float>(), out = out.data<float>(), n = in.size()] {
      on_all_cores(n, 1, [&](size_t begin, size_t end) { loops().gelu_range(in + begin, out + begin, end - begin); });
    });
  }

  DEFINE_NAME(CpuGelu)
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

// silu(x), or silu(gate) * up with a second input.
class CpuSilu : public CpuKernel {
 public:
  using CpuKernel::CpuKernel;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& in = inputs[0];
    allocate_like(in, out);
    const float* up = inputs.size() > 1 ? inputs[1].data<float>() : nullptr;
    dispatch(inputs, out, [in = in.data<float>(), up, out = out.data<float>(), n = in.size()] {
      on_all_cores(n, 1, [&](size_t begin, size_t end) {
        loops().silu_range(in + begin, up ? up + begin : nullptr, out + begin, end - begin);
      });
    });
  }

  DEFINE_NAME(CpuSilu)
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

class CpuIm2col : public CpuKernel {
 public:
  CpuIm2col(mx::Stream stream, int kernel, int pad_top, int pad_bottom, int pad_width)
      : CpuKernel(stream), kernel_(kernel), pad_top_(pad_top), pad_bottom_(pad_bottom), pad_width_(pad_width) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& in = inputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    dispatch(inputs, out,
             [kernel = kernel_, pad_top = pad_top_, pad_width = pad_width_, src = in.data<float>(),
              dst = out.data<float>(), batch = in.shape(0), height = in.shape(1), width = in.shape(2),
              channels = in.shape(3), out_rows = out.shape(1), out_cols = out.shape(2)] {
               const size_t row_floats = size_t(out_cols) * kernel * kernel * channels;
               on_all_cores(size_t(batch) * out_rows, row_floats, [&](size_t begin, size_t end) {
                 for (size_t r = begin; r < end; ++r) {
                   const int n = int(r / out_rows), oy = int(r % out_rows);
                   float* to = dst + r * row_floats;
                   for (int ox = 0; ox < out_cols; ++ox) {
                     for (int i = 0; i < kernel; ++i) {
                       const int y = oy + i - pad_top;
                       for (int j = 0; j < kernel; ++j, to += channels) {
                         const int x = ox + j - pad_width;
                         if (y < 0 || y >= height || x < 0 || x >= width) {
                           std::fill(to, to + channels, 0.0f);
                         } else {
                           std::copy_n(src + ((size_t(n) * height + y) * width + x) * channels, channels, to);
                         }
                       }
                     }
                   }
                 }
               });
             });
  }

  DEFINE_NAME(CpuIm2col)
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CpuIm2col&>(other);
    return kernel_ == o.kernel_ && pad_top_ == o.pad_top_ && pad_bottom_ == o.pad_bottom_ && pad_width_ == o.pad_width_;
  }

 private:
  int kernel_, pad_top_, pad_bottom_, pad_width_;
};

// The inputs as row-contiguous float32 arrays of one shape, the primitive's output of that shape.
template <typename Kernel>
mx::array run_kernel(std::vector<mx::array> inputs) {
  for (auto& input : inputs) input = mx::contiguous(input);
  auto shape = inputs[0].shape();
  return mx::array(std::move(shape), mx::float32, std::make_shared<Kernel>(mx::default_stream(mx::Device::cpu)),
                   std::move(inputs));
}

}  // namespace

bool on_cpu_kernels(const mx::array& x) {
  return x.dtype() == mx::float32 && mx::default_device() == mx::Device::cpu;
}

mx::array softmax_last_axis(const mx::array& x) {
  return run_kernel<CpuSoftmax>({x});
}

mx::array gelu_erf_cpu(const mx::array& x) {
  return run_kernel<CpuGelu>({x});
}

mx::array silu_cpu(const mx::array& x) {
  return run_kernel<CpuSilu>({x});
}

mx::array gated_silu_cpu(const mx::array& gate, const mx::array& up) {
  return run_kernel<CpuSilu>({gate, up});
}

mx::array im2col_cpu(const mx::array& x, int kernel, int pad_top, int pad_bottom, int pad_width) {
  const int out_rows = x.shape(1) + pad_top + pad_bottom - kernel + 1;
  const int out_cols = x.shape(2) + 2 * pad_width - kernel + 1;
  if (x.ndim() != 4 || out_rows <= 0 || out_cols <= 0) throw std::invalid_argument("im2col: no output for this input");
  auto stream = mx::default_stream(mx::Device::cpu);
  return mx::array({x.shape(0), out_rows, out_cols, kernel * kernel * x.shape(3)}, mx::float32,
                   std::make_shared<CpuIm2col>(stream, kernel, pad_top, pad_bottom, pad_width), {mx::contiguous(x)});
}

}  // namespace mlxr
