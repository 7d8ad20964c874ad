#include "nn/cpu_kernels.h"

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"
#include "nn/cpu_kernel_loops.h"
#include "nn/erf_coefficients.h"
#include "nn/weights.h"

#ifdef __F16C__  // a build for a CPU with F16C (-march=native): the baseline loops use its conversion too
#include <immintrin.h>
#endif

// Built with -ffp-contract=off (CMakeLists.txt): a * b + c stays two roundings, as in MLX's separate ops;
// only the explicit fmas of MLX's exp fuse.

namespace mlxr {

size_t cpu_cores() {
  static const size_t cores = std::max(1u, std::thread::hardware_concurrency());
  return cores;
}

namespace {

// Below this many elements a kernel stays on the calling thread: starting threads would cost more.
constexpr size_t kElementsPerThread = 1 << 15;

// Threads that live as long as the process, one per core but the caller's, to run on_all_cores's parts: starting
// and joining a thread for each part cost tens of microseconds, and an image's kernels ran ~1000 such parts.
class CoreWorkers {
 public:
  static CoreWorkers& get() {
    static CoreWorkers* const workers = new CoreWorkers(cpu_cores() - 1);
    return *workers;  // never destroyed: its threads wait until the process exits
  }

  // part(0) on the calling thread and part(1) .. part(parts - 1) on the workers; returns when all are done. One
  // caller at a time: another caller meanwhile, or one in a forked child (which has no workers), or one with more
  // parts than workers, runs all of its parts itself.
  void run(size_t parts, const std::function<void(size_t)>& part) {
    std::unique_lock<std::mutex> in_use(in_use_, std::try_to_lock);
    if (!in_use || getpid() != owner_ || parts - 1 > threads_.size()) {
      for (size_t p = 0; p < parts; ++p) part(p);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &part;
      parts_ = parts;
      pending_ = parts - 1;
      ++generation_;
    }
    wake_.notify_all();
    part(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
  }

 private:
  explicit CoreWorkers(size_t count) : owner_(getpid()) {
    for (size_t i = 0; i < count; ++i) threads_.emplace_back([this, i] { serve(i + 1); });
  }

  void serve(size_t index) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (index >= parts_) continue;
      const auto* job = job_;
      lock.unlock();
      (*job)(index);
      lock.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  const pid_t owner_;
  std::mutex in_use_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(size_t)>* job_ = nullptr;
  size_t parts_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
  std::vector<std::thread> threads_;
};

// Runs work(begin, end) over [0, n) in contiguous parts, one per core (the first on the calling thread).
template <typename Work>
void on_all_cores(size_t n, size_t elements_per_item, const Work& work) {
  if (n == 0) return;  // (nothing to split: below, the core count would be clamped to [1, 0])
  const size_t threads = std::clamp<size_t>(n * elements_per_item / kElementsPerThread, 1, std::min(cpu_cores(), n));
  const size_t part = (n + threads - 1) / threads;
  if (threads == 1) return work(0, n);
  CoreWorkers::get().run(threads, [&](size_t t) {
    const size_t begin = t * part, end = std::min(n, begin + part);
    if (begin < end) work(begin, end);
  });
}

}  // namespace

namespace cpu_loops::baseline {
#define MLXR_LOOPS_NAME "baseline"
#include "nn/cpu_kernel_loops.inc"
#undef MLXR_LOOPS_NAME
}  // namespace cpu_loops::baseline

namespace {

// MLXRUNNER_CPU_LOOPS caps the loops taken: "baseline", "avx2" or "avx512" (the default: the best the CPU has). To
// compare them on one machine, and to test the baseline's im2col convolution where the CPU has AVX2.
int loops_level_allowed() {
  const char* value = std::getenv("MLXRUNNER_CPU_LOOPS");
  const std::string_view level = value ? value : "";
  if (level.empty() || level == "avx512") return 2;
  if (level == "avx2") return 1;
  if (level == "baseline") return 0;
  throw std::invalid_argument("MLXRUNNER_CPU_LOOPS: expected baseline, avx2 or avx512, got '" + std::string(level) +
                              "'");
}

// The loops for this machine: AVX-512 where the CPU has it, else AVX2 + FMA where it has both.
const cpu_loops::Loops& loops() {
  static const cpu_loops::Loops& chosen = []() -> const cpu_loops::Loops& {
    [[maybe_unused]] const int allowed = loops_level_allowed();
#ifdef MLXR_AVX2_LOOPS
    const bool avx2 = allowed >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    if (avx2 && allowed >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) {
      return cpu_loops::avx512::loops;
    }
    if (avx2) return cpu_loops::avx2::loops;
#endif
    return cpu_loops::baseline::loops;
  }();
  return chosen;
}

// MLX's softmax kernel for float32 at SIMD width 1 (mlx/backend/cpu/softmax.cpp) over one row: the max, the exps and
// their sum in index order (one accumulator: the order is what makes the sum bit-identical), then x 1/sum. With
// `keep`, the entries it does not keep are first the lowest float, as mx::where(allowed, x, lowest) makes them.
void softmax_row(const float* x, float* y, int n, const bool* keep) {
  if (keep) {
    for (int j = 0; j < n; ++j) y[j] = keep[j] ? x[j] : std::numeric_limits<float>::lowest();
    x = y;
  }
  loops().exp_shifted(x, y, n, loops().row_max(x, n));
  float sum = 0.0f;
  for (int j = 0; j < n; ++j) sum += y[j];
  loops().scale_row(y, n, 1 / sum);
}

// softmax_row over `count` consecutive rows (`n` apart) of x into y; keep_of(r) is row r's `keep` (or nullptr). Rows
// go kRowGroup at a time through the max and the sum, whose one-accumulator chains are most of a row's time.
template <typename KeepOf>
void softmax_consecutive_rows(const float* x, float* y, size_t count, int n, const KeepOf& keep_of) {
  constexpr size_t group = cpu_loops::kRowGroup;
  size_t first = 0;
  for (; first + group <= count; first += group) {
    const float* in = x + first * n;
    bool masked = false;
    for (size_t r = first; r < first + group; ++r) masked = masked || keep_of(r);
    if (masked) {  // every row of the group into y, the entries not kept the lowest float
      for (size_t r = first; r < first + group; ++r) {
        const bool* keep = keep_of(r);
        for (int j = 0; j < n; ++j) {
          y[r * n + j] = !keep || keep[j] ? x[r * n + j] : std::numeric_limits<float>::lowest();
        }
      }
      in = y + first * n;
    }
    float maxes[group], sums[group];
    loops().group_max(in, n, n, maxes);
    for (size_t r = 0; r < group; ++r) loops().exp_shifted(in + r * n, y + (first + r) * n, n, maxes[r]);
    loops().group_sum(y + first * n, n, n, sums);
    for (size_t r = 0; r < group; ++r) loops().scale_row(y + (first + r) * n, n, 1 / sums[r]);
  }
  for (size_t r = first; r < count; ++r) softmax_row(x + r * n, y + r * n, n, keep_of(r));
}

// softmax_row over `rows` rows on every core; `allowed` ([rows / rows_per_mask_row, n] bools) or nullptr.
void softmax_rows(const float* in, float* out, size_t rows, int n, const bool* allowed, size_t rows_per_mask_row) {
  on_all_cores(rows, n, [&](size_t begin, size_t end) {
    softmax_consecutive_rows(in + begin * n, out + begin * n, end - begin, n, [&](size_t r) -> const bool* {
      return allowed ? allowed + (begin + r) / rows_per_mask_row * n : nullptr;
    });
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
    const size_t rows = in.size() / in.shape(-1);
    const bool* allowed = inputs.size() > 1 ? inputs[1].data<bool>() : nullptr;
    const size_t rows_per_mask_row = allowed ? rows / (inputs[1].size() / in.shape(-1)) : rows;
    dispatch(inputs, out,
             [in = in.data<float>(), out = out.data<float>(), n = in.shape(-1), rows, allowed, rows_per_mask_row] {
               softmax_rows(in, out, rows, n, allowed, rows_per_mask_row);
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

// silu(gate) * up over two column ranges of a row-contiguous [rows, W] matrix, each row's ranges read in place.
class CpuSiluColumns : public CpuKernel {
 public:
  CpuSiluColumns(mx::Stream stream, int gate_at, int up_at) : CpuKernel(stream), gate_at_(gate_at), up_at_(up_at) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& fused = inputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    const int width = out.shape(-1), row = fused.shape(-1);
    const size_t rows = width > 0 ? out.size() / width : 0;
    dispatch(inputs, out,
             [in = fused.data<float>(), out = out.data<float>(), gate_at = gate_at_, up_at = up_at_, width, row, rows] {
               on_all_cores(rows, width, [&](size_t begin, size_t end) {
                 for (size_t r = begin; r < end; ++r) {
                   const float* from = in + r * row;
                   loops().silu_range(from + gate_at, from + up_at, out + r * width, width);
                 }
               });
             });
  }

  DEFINE_NAME(CpuSiluColumns)
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CpuSiluColumns&>(other);
    return gate_at_ == o.gate_at_ && up_at_ == o.up_at_;
  }

 private:
  int gate_at_, up_at_;
};

// Pixels per part of a GroupNorm's statistics: a fixed split, so the sums (per part, then part by part) are the
// same whatever the number of cores.
constexpr size_t kStatisticsPartPixels = 4096;

// Per-channel sums over the pixels of one image (see Loops::channel_sums), split in parts over the cores.
std::vector<double> channel_sums(const float* image, size_t pixels, int channels, const float* centre) {
  const size_t parts = (pixels + kStatisticsPartPixels - 1) / kStatisticsPartPixels;
  std::vector<double> partial(parts * channels, 0.0);
  on_all_cores(parts, kStatisticsPartPixels * channels, [&](size_t begin, size_t end) {
    for (size_t part = begin; part < end; ++part) {
      const size_t first = part * kStatisticsPartPixels, count = std::min(kStatisticsPartPixels, pixels - first);
      loops().channel_sums(image + first * channels, count, channels, centre, partial.data() + part * channels);
    }
  });
  std::vector<double> sums(channels, 0.0);
  for (size_t part = 0; part < parts; ++part) {
    for (int c = 0; c < channels; ++c) sums[c] += partial[part * channels + c];
  }
  return sums;
}

// Each channel's group's value: the channel sums added up over the group, divided by `count`, as float32.
std::vector<float> per_group(const std::vector<double>& sums, int groups, double count) {
  const int channels = int(sums.size()), per = channels / groups;
  std::vector<float> values(channels);
  for (int g = 0; g < groups; ++g) {
    double total = 0.0;
    for (int c = g * per; c < (g + 1) * per; ++c) total += sums[c];
    std::fill_n(values.begin() + g * per, per, float(total / count));
  }
  return values;
}

// GroupNorm over one image [pixels, channels]: the group means and variances (biased) from double sums, then
// one pass (x - mean) * (rsqrt(var + eps) * weight) + bias, and SiLU when `silu`.
void group_norm_image(const float* in, float* out, size_t pixels, int channels, const float* weight, const float* bias,
                      int groups, float eps, bool silu) {
  const double count = double(pixels) * (channels / groups);
  const auto mean = per_group(channel_sums(in, pixels, channels, nullptr), groups, count);
  const auto var = per_group(channel_sums(in, pixels, channels, mean.data()), groups, count);
  std::vector<float> scale(channels);
  for (int c = 0; c < channels; ++c) scale[c] = (1.0f / std::sqrt(var[c] + eps)) * weight[c];
  on_all_cores(pixels, channels, [&](size_t begin, size_t end) {
    loops().normalise_rows(in + begin * channels, out + begin * channels, end - begin, channels, mean.data(),
                           scale.data(), bias, silu);
  });
}

class CpuGroupNorm : public CpuKernel {
 public:
  CpuGroupNorm(mx::Stream stream, int groups, float eps, bool silu)
      : CpuKernel(stream), groups_(groups), eps_(eps), silu_(silu) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& in = inputs[0];
    allocate_like(in, out);
    const int channels = in.shape(-1);
    const size_t pixels = in.size() / in.shape(0) / channels;
    dispatch(
        inputs, out,
        [in = in.data<float>(), weight = inputs[1].data<float>(), bias = inputs[2].data<float>(),
         out = out.data<float>(), batch = in.shape(0), pixels, channels, groups = groups_, eps = eps_, silu = silu_] {
          for (int b = 0; b < batch; ++b) {
            const size_t offset = b * pixels * channels;
            group_norm_image(in + offset, out + offset, pixels, channels, weight, bias, groups, eps, silu);
          }
        });
  }

  DEFINE_NAME(CpuGroupNorm)
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CpuGroupNorm&>(other);
    return groups_ == o.groups_ && eps_ == o.eps_ && silu_ == o.silu_;
  }

 private:
  int groups_;
  float eps_;
  bool silu_;
};

// LayerNorm (with a bias) or RMSNorm (without) over the last axis, rows over the cores.
// LayerNorm (with `bias`) or RMSNorm (bias nullptr) of `rows` rows of n floats (n apart) into out, as
// mx::fast::layer_norm / rms_norm compute them; kRowGroup rows at a time where it can (norm_group: the same bits as
// norm_row).
void norm_rows(const float* in, float* out, size_t rows, int n, const float* weight, const float* bias, float eps) {
  const float inverse_n = static_cast<float>(1.0 / n);  // MLX's mean: the sum times float(1 / n)
  size_t r = 0;
  for (; r + cpu_loops::kRowGroup <= rows; r += cpu_loops::kRowGroup)
    loops().norm_group(in + r * n, out + r * n, n, weight, bias, eps, inverse_n);
  for (; r < rows; ++r) loops().norm_row(in + r * n, out + r * n, n, weight, bias, eps, inverse_n);
}

// Rows [begin, end) of `in` normed by norm_rows kRowGroup at a time into a small buffer (their sums' chains overlap;
// the same bits as one by one), each normed row then handed to apply(row, normed): the modulations' pass, which
// combines it with the row's own vectors.
template <typename Apply>
void for_each_normed_row(const float* in, size_t begin, size_t end, int n, const float* weight, const float* bias,
                         float eps, const Apply& apply) {
  std::vector<float> normed(cpu_loops::kRowGroup * n);
  for (size_t first = begin; first < end; first += cpu_loops::kRowGroup) {
    const size_t count = std::min(cpu_loops::kRowGroup, end - first);
    norm_rows(in + first * n, normed.data(), count, n, weight, bias, eps);
    for (size_t r = 0; r < count; ++r) apply(first + r, normed.data() + r * n);
  }
}

class CpuRowNorm : public CpuKernel {
 public:
  CpuRowNorm(mx::Stream stream, float eps) : CpuKernel(stream), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& in = inputs[0];
    allocate_like(in, out);
    const int n = in.shape(-1);
    const float* bias = inputs.size() > 2 ? inputs[2].data<float>() : nullptr;
    dispatch(inputs, out,
             [in = in.data<float>(), weight = inputs[1].data<float>(), bias, out = out.data<float>(), n,
              rows = in.size() / n, eps = eps_] {
               on_all_cores(rows, n, [&](size_t begin, size_t end) {
                 norm_rows(in + begin * n, out + begin * n, end - begin, n, weight, bias, eps);
               });
             });
  }

  DEFINE_NAME(CpuRowNorm)
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const CpuRowNorm&>(other).eps_;
  }

 private:
  float eps_;
};

// The BLAS that MLX's own matrix products call (OpenBLAS or MKL through mlxrunner's shim where it is loaded: a
// global symbol wins over libmlx's reference BLAS, for this library as for libmlx).
extern "C" void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// While this lives, the BLAS behind mlxrunner's shim (OpenBLAS or MKL) computes each product on the calling thread:
// the convolution below runs one product per core itself. MLX's CPU stream, which runs this, is the only BLAS
// caller, so switching the global count is safe (the shim does the same for small products). Without the shim there
// is nothing to switch.
class BlasOnCallingThread {
 public:
  BlasOnCallingThread() {
    if (threads_api().set && (saved_ = threads_api().get()) > 1) threads_api().set(1);
  }
  ~BlasOnCallingThread() {
    if (saved_ > 1) threads_api().set(saved_);
  }
  BlasOnCallingThread(const BlasOnCallingThread&) = delete;
  BlasOnCallingThread& operator=(const BlasOnCallingThread&) = delete;

 private:
  struct ThreadsApi {
    int (*get)() = nullptr;
    void (*set)(int) = nullptr;
  };
  static const ThreadsApi& threads_api() {
    static const ThreadsApi api = [] {
      ThreadsApi found;
      found.get = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "mlxrunner_blas_get_num_threads"));
      found.set = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "mlxrunner_blas_set_num_threads"));
      if (!found.get) found.set = nullptr;
      return found;
    }();
    return api;
  }
  int saved_ = 0;
};

// About this many bytes of im2col matrix per product: the band is written, then read by the product while it is
// still in the core's cache (a 256 x 256 x 32 -> 32 convolution: 15 ms as one 75 MB im2col and one product over
// both cores, 7 ms in bands).
constexpr size_t kBandBytes = size_t{1} << 20;
// At least this many multiply-adds per band product: below about 10^6 OpenBLAS switches to kernels for small
// matrices, whose sums round differently from the big ones' that MLX's one product uses.
constexpr double kMinBandMacs = double(1 << 21);
// Below this many multiply-adds the whole convolution is one product on the calling thread: MLX's own call.
constexpr double kMinSplitMacs = double(1 << 22);

struct ConvShape {
  int batch, height, width, channels, kernel, padding, out_rows, out_cols, out_channels;
  int upsample_shift;  // 1: the input is read as if upsampled 2x (nearest) first; 0: as it is
  int depth() const { return kernel * kernel * channels; }  // one im2col row: the weight's [kh, kw, C] order
  size_t pixels() const { return size_t(batch) * out_rows * out_cols; }
};

// Pixel (y, x) of image n as the convolution reads it (in the upsampled image's coordinates when it upsamples) into
// `to`'s C floats: zeros outside the input, the padding.
void read_pixel(const float* src, const ConvShape& s, size_t n, int y, int x, float* to) {
  const int height = s.height << s.upsample_shift, width = s.width << s.upsample_shift;
  if (y < 0 || y >= height || x < 0 || x >= width) {
    std::fill(to, to + s.channels, 0.0f);
  } else {
    const int sy = y >> s.upsample_shift, sx = x >> s.upsample_shift;
    std::copy_n(src + ((n * s.height + sy) * s.width + sx) * s.channels, s.channels, to);
  }
}

// Rows [first, first + count) of the convolution's im2col matrix (output pixels in [N, Ho, Wo] order) into `to`.
void im2col_rows(const float* src, const ConvShape& s, size_t first, size_t count, float* to) {
  for (size_t r = first; r < first + count; ++r) {
    const int ox = int(r % s.out_cols), oy = int(r / s.out_cols % s.out_rows);
    const size_t n = r / (size_t(s.out_cols) * s.out_rows);
    for (int i = 0; i < s.kernel; ++i) {
      for (int j = 0; j < s.kernel; ++j, to += s.channels)
        read_pixel(src, s, n, oy + i - s.padding, ox + j - s.padding, to);
    }
  }
}

// The convolution as MLX's CPU backend computes it (an im2col matrix times the weight, [pixels, k*k*C] x
// [k*k*C, O], by cblas_sgemm), in bands of pixels: each core builds a band's im2col rows in a small buffer and
// multiplies them into the output's rows. MLX pads and unfolds the whole input with one thread first, into a
// side buffer 9x the input, then runs one product over all cores. `bias` and `residual` (or nullptr) are added to
// each band while it is in the cache: residual + (product + bias), MLX's two adds.
void add_bias_residual(float* out, size_t rows, int channels, const float* bias, const float* residual) {
  for (size_t r = 0; r < rows; ++r, out += channels) {
    if (bias) {
      for (int c = 0; c < channels; ++c) out[c] = out[c] + bias[c];
    }
    if (residual) {
      for (int c = 0; c < channels; ++c) out[c] = residual[c] + out[c];
      residual += channels;
    }
  }
}

void convolve_in_bands(const float* src, const float* weight, const float* bias, const float* residual, float* dst,
                       const ConvShape& s) {
  const size_t depth = s.depth(), pixels = s.pixels();
  const double macs_per_row = double(depth) * s.out_channels;
  size_t band = pixels;
  if (double(pixels) * macs_per_row >= kMinSplitMacs) {
    band = std::max<size_t>(kBandBytes / (depth * sizeof(float)), size_t(kMinBandMacs / macs_per_row) + 1);
  }
  const size_t bands = std::max<size_t>(1, pixels / band);  // the last band takes the remainder
  BlasOnCallingThread one_thread_each;
  on_all_cores(bands, bands > 1 ? kElementsPerThread : 0, [&](size_t begin, size_t end) {
    std::vector<float> columns;
    for (size_t b = begin; b < end; ++b) {
      const size_t first = b * band, count = b + 1 == bands ? pixels - first : band;
      columns.resize(count * depth);
      im2col_rows(src, s, first, count, columns.data());
      cblas_sgemm(kRowMajor, kNoTrans, kTrans, int(count), s.out_channels, int(depth), 1.0f, columns.data(), int(depth),
                  weight, int(depth), 0.0f, dst + first * s.out_channels, s.out_channels);
      if (bias || residual) {
        add_bias_residual(dst + first * s.out_channels, count, s.out_channels, bias,
                          residual ? residual + first * s.out_channels : nullptr);
      }
    }
  });
}

int round_up_to(int n, int multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

// `buffer` sized for n floats from a 64-byte boundary: the block kernels' 16-float weight loads then never straddle
// two cache lines (~8 % of their speed). Returns that first float.
float* cache_aligned(std::vector<float>& buffer, size_t n) {
  buffer.resize(n + 16);
  const auto address = reinterpret_cast<uintptr_t>(buffer.data());
  return buffer.data() + ((64 - address % 64) % 64) / sizeof(float);
}

// The convolution without an im2col matrix (AVX2 + FMA or AVX-512): for each output row the `kernel` input rows it
// reads, zero-padded (and upsampled) into a small buffer, then blocks of conv_pixels pixels x conv_panels panels of
// kConvOutputs channels by cpu_loops' conv_block, the weights packed once per call into panels of kConvOutputs
// channels (the last ones padded with zero weights: a VAE's 3-channel output layer computes 16 or 32 and keeps 3,
// where the im2col bands ran a 9 x C-deep sgemm 3 wide at 4 GMAC/s). Rows split over the cores. On two Zen 4 cores
// 73-102 GMAC/s where the im2col bands and OpenBLAS made 44-89, most gained on narrow and upsampled layers
// (benchmarks/README.md). Each output's multiply-adds run in tap order, as sgemm's do within one block of the depth:
// the same bits up to a few hundred deep products, MLX's within float32 rounding beyond.
bool takes_direct_convolution(const ConvShape&) {
  return loops().conv_block != nullptr;
}

// The output channels rounded up to whole panels.
int panelled_outputs(const ConvShape& s) {
  return round_up_to(s.out_channels, cpu_loops::kConvOutputs);
}

// conv_block over the panels from output `o` on: conv_panels of them, or the last one alone.
void convolve_block(const float* const* rows, int kernel, int channels, const float* panel, size_t panel_stride,
                    float* out, int out_stride, int outputs_left) {
  const auto block =
      outputs_left >= cpu_loops::kConvOutputs * loops().conv_panels ? loops().conv_block : loops().conv_block_one_panel;
  block(rows, kernel, channels, panel, panel_stride, out, out_stride);
}

// The weight [O, k, k, C] as panels [O' / kConvOutputs][k][k][C][kConvOutputs], O' = panelled_outputs (zeros past O),
// into `buffer` from a cache line's start; returns the first panel.
const float* convolution_panels(const float* weight, const ConvShape& s, std::vector<float>& buffer) {
  constexpr int width = cpu_loops::kConvOutputs;
  const size_t taps = size_t(s.kernel) * s.kernel, depth = taps * s.channels;
  const size_t size = depth * panelled_outputs(s);
  float* panels = cache_aligned(buffer, size);
  std::fill(panels, panels + size, 0.0f);
  for (int o = 0; o < s.out_channels; ++o) {
    for (size_t k = 0; k < depth; ++k) panels[((o / width) * depth + k) * width + o % width] = weight[o * depth + k];
  }
  return panels;
}

// Input row `y` of image n as read_pixel reads it, `columns` pixels from column -padding on.
void padded_row(const float* src, const ConvShape& s, size_t n, int y, int columns, float* to) {
  for (int col = 0; col < columns; ++col, to += s.channels) read_pixel(src, s, n, y, col - s.padding, to);
}

// The padded input rows a core's output rows read, `kernel` of them in a ring: consecutive output rows share all but
// one, so each input row is copied once per core rather than `kernel` times.
class PaddedRowRing {
 public:
  PaddedRowRing(const float* src, const ConvShape& s, int columns)
      : src_(src), s_(s), columns_(columns), rows_(size_t(s.kernel) * columns * s.channels), held_(s.kernel, kNone) {}

  // Input row `y` of image n (as padded_row reads it), copied in if the ring does not hold it already.
  const float* row(size_t n, int y) {
    const int slot = ((y % s_.kernel) + s_.kernel) % s_.kernel;
    const int64_t key = int64_t(n) * (int64_t(s_.out_rows) + 2 * s_.kernel) + y + s_.kernel;
    float* at = rows_.data() + size_t(slot) * columns_ * s_.channels;
    if (held_[slot] != key) {
      padded_row(src_, s_, n, y, columns_, at);
      held_[slot] = key;
    }
    return at;
  }

 private:
  static constexpr int64_t kNone = -1;
  const float* src_;
  const ConvShape& s_;
  int columns_;
  std::vector<float> rows_;
  std::vector<int64_t> held_;
};

void convolve_direct(const float* src, const float* weight, const float* bias, const float* residual, float* dst,
                     const ConvShape& s) {
  const int block = loops().conv_pixels, block_outputs = cpu_loops::kConvOutputs * loops().conv_panels;
  constexpr int width = cpu_loops::kConvOutputs;
  std::vector<float> panel_buffer;
  const float* panels = convolution_panels(weight, s, panel_buffer);
  const size_t panel_size = size_t(s.kernel) * s.kernel * s.channels * width;
  const int blocks = (s.out_cols + block - 1) / block, row_pixels = blocks * block;
  const int padded_columns = row_pixels + s.kernel - 1, row_stride = panelled_outputs(s);
  // Blocks whose pixels all lie in the row store straight into the output when it has no padded channels; the rest
  // go to a scratch row and are copied out.
  const int direct_blocks = row_stride == s.out_channels ? s.out_cols / block : 0;
  // on_all_cores splits from kElementsPerThread elements on: counting 64 multiply-adds as one element, from about
  // two million multiply-adds (a 32 x 32 x 16 -> 16 convolution) on.
  const size_t row_macs = size_t(s.out_cols) * s.depth() * s.out_channels;
  on_all_cores(size_t(s.batch) * s.out_rows, row_macs / 64 + 1, [&](size_t begin, size_t end) {
    PaddedRowRing ring(src, s, padded_columns);
    std::vector<float> scratch(size_t(row_pixels) * row_stride);
    std::vector<const float*> input_rows(s.kernel), tap_rows(s.kernel);
    for (size_t r = begin; r < end; ++r) {
      const size_t n = r / s.out_rows, outputs = size_t(s.out_cols) * s.out_channels;
      const int oy = int(r % s.out_rows);
      float* out = dst + r * outputs;
      for (int ky = 0; ky < s.kernel; ++ky) input_rows[ky] = ring.row(n, oy + ky - s.padding);
      for (int o = 0; o < row_stride; o += block_outputs) {
        const float* panel = panels + (o / width) * panel_size;
        for (int b = 0; b < blocks; ++b) {
          for (int ky = 0; ky < s.kernel; ++ky) tap_rows[ky] = input_rows[ky] + size_t(b) * block * s.channels;
          float* to = b < direct_blocks ? out : scratch.data();
          convolve_block(tap_rows.data(), s.kernel, s.channels, panel, panel_size,
                         to + size_t(b) * block * row_stride + o, row_stride, row_stride - o);
        }
      }
      for (int x = direct_blocks * block; x < s.out_cols; ++x) {
        std::copy_n(scratch.data() + size_t(x) * row_stride, s.out_channels, out + size_t(x) * s.out_channels);
      }
      if (bias || residual)
        add_bias_residual(out, s.out_cols, s.out_channels, bias, residual ? residual + r * outputs : nullptr);
    }
  });
}

// One attention's sizes, and the element strides of q, k and v [B, H, L, D] in any layout (the heads-first view of
// [B, L, H, D], say).
struct AttentionShape {
  int batch, heads, kv_heads, queries, keys, depth, value_depth;
  float scale;
  int64_t q_strides[4], k_strides[4], v_strides[4];
  bool mask_per_batch;  // keys_allowed has a row per batch element (else one row)
};

// A head's matrix as mx::matmul hands it to cblas_sgemm (mlx/backend/cpu/matmul.cpp): itself where its rows (or,
// transposed, its columns) are contiguous and packed, else a contiguous copy in `copy`. The same layout matters:
// OpenBLAS's kernels for small products sum a transposed operand differently.
struct BlasOperand {
  const float* data;
  int ld;
  bool transposed;
};
BlasOperand as_matmul_passes(const float* m, int rows, int cols, int64_t row_stride, int64_t col_stride,
                             std::vector<float>& copy) {
  if (col_stride == 1 && row_stride == cols) return {m, cols, false};
  if (row_stride == 1 && col_stride == rows) return {m, rows, true};
  copy.resize(size_t(rows) * cols);
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < cols; ++j) copy[size_t(i) * cols + j] = m[i * row_stride + j * col_stride];
  }
  return {copy.data(), cols, false};
}

struct AttentionScratch {
  std::vector<float> scaled_q, scores, k_copy, v_copy, out_rows, sums;
};

// softmax(scale q k^T) v for one query head, as MLX's CPU attention computes it (mlx/fast.cpp's fallback, its
// products by cblas_sgemm as mx::matmul calls it): q times the scale first, the scores q k^T, the softmax of each
// row (masked keys the lowest float), then the scores times v into out's rows (`out_row_stride` apart). The
// baseline loops' attention: MLX's numbers bit for bit.
void attend_one_head_as_mlx(const float* q, const float* k, const float* v, const bool* keep, float* out,
                            int64_t out_row_stride, const AttentionShape& s, AttentionScratch& scratch) {
  const int queries = s.queries;
  scratch.scaled_q.resize(size_t(queries) * s.depth);
  scratch.scores.resize(size_t(queries) * s.keys);
  float *scaled = scratch.scaled_q.data(), *scores = scratch.scores.data();
  for (int i = 0; i < queries; ++i) {
    for (int d = 0; d < s.depth; ++d) {
      scaled[size_t(i) * s.depth + d] = s.scale * q[i * s.q_strides[2] + d * s.q_strides[3]];
    }
  }
  const auto keys_t = as_matmul_passes(k, s.depth, s.keys, s.k_strides[3], s.k_strides[2], scratch.k_copy);
  cblas_sgemm(kRowMajor, kNoTrans, keys_t.transposed ? kTrans : kNoTrans, queries, s.keys, s.depth, 1.0f, scaled,
              s.depth, keys_t.data, keys_t.ld, 0.0f, scores, s.keys);
  softmax_consecutive_rows(scores, scores, queries, s.keys, [keep](size_t) { return keep; });
  const auto values = as_matmul_passes(v, s.keys, s.value_depth, s.v_strides[2], s.v_strides[3], scratch.v_copy);
  cblas_sgemm(kRowMajor, kNoTrans, values.transposed ? kTrans : kNoTrans, queries, s.value_depth, s.keys, 1.0f, scores,
              s.keys, values.data, values.ld, 0.0f, out, int(out_row_stride));
}

// exp(x - max(x)) over the first n of each of `count` rows (`stride` apart), in place, keys not kept (keep[j] false)
// first set to the lowest float; sums[r] the row's sum of those: the softmax less its division, each row's max and
// sum in vector lanes.
void exp_rows(float* x, size_t count, int n, size_t stride, const bool* keep, float* sums) {
  for (size_t r = 0; r < count; ++r) {
    float* row = x + r * stride;
    if (keep) {
      for (int j = 0; j < n; ++j) row[j] = keep[j] ? row[j] : std::numeric_limits<float>::lowest();
    }
    sums[r] = loops().exp_shifted_sum(row, row, n, loops().wide_max(row, n));
  }
}

// Query rows the direct attention takes at a time: their scores stay in the core's L2 cache from the product that
// makes them to the product that reads them.
constexpr int kAttentionQueryBand = 48;

// The same attention where the loops have the convolution's block kernel (AVX2 or AVX-512), both products by it (a
// 1 x 1 convolution): OpenBLAS spent most of a DiT head's time packing and blocking products this narrow (64 deep
// for the scores, 64 wide for the output; ~60 GMAC/s on one core against ~100 for large ones), and a whole head's
// scores left the cache (an 800-token head's are 2.5 MB). k goes once into panels of 16 keys [keys'/16][D][16] and
// v into panels of 16 value columns [Dv'/16][keys'][16] (keys' and Dv' rounded up to the block's 16 or 32 outputs,
// zeros past the end); queries go in bands of kAttentionQueryBand rows whose scores are made, exponentiated (one
// pass for the max, one for exp and the sum) and multiplied by v while in the cache, each output row divided by its
// sum at the end.
// Each score sums its D products in order and each output its keys' in order: within float32 rounding of MLX's
// numbers, not their bits (MLXRUNNER_CPU_LOOPS=baseline keeps MLX's path).
void attend_one_head_direct(const float* q, const float* k, const float* v, const bool* keep, float* out,
                            int64_t out_row_stride, const AttentionShape& s, AttentionScratch& scratch) {
  constexpr int width = cpu_loops::kConvOutputs;
  const int block = loops().conv_pixels, block_outputs = width * loops().conv_panels, depth = s.depth;
  const int keys = round_up_to(s.keys, block_outputs), values_width = round_up_to(s.value_depth, block_outputs);
  const int band = round_up_to(std::min(s.queries, kAttentionQueryBand), block);
  // Panels filled a 16-wide row at a time (a key's 16 values of one depth, or 16 value columns of one key), zeros past
  // the keys or the value columns.
  float* key_panels = cache_aligned(scratch.k_copy, size_t(keys) * depth);
  for (int first = 0; first < keys; first += width) {
    const int count = std::min(width, s.keys - first);
    for (int d = 0; d < depth; ++d) {
      float* to = key_panels + (size_t(first) * depth + size_t(d) * width);
      const float* from = k + first * s.k_strides[2] + d * s.k_strides[3];
      for (int i = 0; i < count; ++i) to[i] = from[i * s.k_strides[2]];
      std::fill(to + count, to + width, 0.0f);
    }
  }
  float* value_panels = cache_aligned(scratch.v_copy, size_t(values_width) * keys);
  for (int first = 0; first < values_width; first += width) {
    const int count = std::min(width, s.value_depth - first);
    for (int j = 0; j < keys; ++j) {
      float* to = value_panels + (size_t(first) * keys + size_t(j) * width);
      if (j >= s.keys) {
        std::fill(to, to + width, 0.0f);
        continue;
      }
      const float* from = v + j * s.v_strides[2] + first * s.v_strides[3];
      for (int i = 0; i < count; ++i) to[i] = from[i * s.v_strides[3]];
      std::fill(to + count, to + width, 0.0f);
    }
  }
  scratch.scaled_q.resize(size_t(band) * depth);  // every row written (or zeroed) in each band before it is read
  scratch.scores.resize(size_t(band) * keys);
  scratch.out_rows.resize(size_t(band) * values_width);
  scratch.sums.resize(band);
  float *scaled = scratch.scaled_q.data(), *scores = scratch.scores.data(), *rows_out = scratch.out_rows.data();
  for (int first = 0; first < s.queries; first += band) {
    const int count = std::min(band, s.queries - first), padded = round_up_to(count, block);
    for (int i = 0; i < count; ++i) {
      for (int d = 0; d < depth; ++d) {
        scaled[size_t(i) * depth + d] = s.scale * q[(first + i) * s.q_strides[2] + d * s.q_strides[3]];
      }
    }
    std::fill(scaled + size_t(count) * depth, scaled + size_t(padded) * depth, 0.0f);  // rows past the queries
    for (int b = 0; b < padded; b += block) {
      const float* queries_in = scaled + size_t(b) * depth;
      for (int o = 0; o < keys; o += block_outputs) {
        loops().conv_block(&queries_in, 1, depth, key_panels + size_t(o) * depth, size_t(width) * depth,
                           scores + size_t(b) * keys + o, keys);
      }
    }
    exp_rows(scores, count, s.keys, keys, keep, scratch.sums.data());
    for (int i = 0; i < padded; ++i) {  // the padded keys' (and padded rows') weights: zero
      std::fill(scores + size_t(i) * keys + (i < count ? s.keys : 0), scores + size_t(i + 1) * keys, 0.0f);
    }
    for (int b = 0; b < padded; b += block) {
      const float* weights_in = scores + size_t(b) * keys;
      for (int e = 0; e < values_width; e += block_outputs) {
        loops().conv_block(&weights_in, 1, keys, value_panels + size_t(e) * keys, size_t(width) * keys,
                           rows_out + size_t(b) * values_width + e, values_width);
      }
    }
    for (int i = 0; i < count; ++i) {
      const float inverse = 1.0f / scratch.sums[i];
      const float* row = rows_out + size_t(i) * values_width;
      float* to = out + (first + i) * out_row_stride;
      for (int e = 0; e < s.value_depth; ++e) to[e] = row[e] * inverse;
    }
  }
}

void attend_one_head(const float* q, const float* k, const float* v, const bool* keep, float* out,
                     int64_t out_row_stride, const AttentionShape& s, AttentionScratch& scratch) {
  if (loops().conv_block != nullptr) {
    attend_one_head_direct(q, k, v, keep, out, out_row_stride, s, scratch);
  } else {
    attend_one_head_as_mlx(q, k, v, keep, out, out_row_stride, s, scratch);
  }
}

// Every (batch, query head) on its own core's thread, one BLAS thread each: the scores stay in that core's cache
// and no product wakes OpenBLAS's threads (MLX runs two products per head, each split over all cores, with copies
// of k and v and a pass of q * scale in between). `out` is [B, Lq, H, Dv]: the heads side by side, as the
// projection after attention reads them.
void attend_heads(const float* q, const float* k, const float* v, const bool* keys_allowed, float* out,
                  const AttentionShape& s) {
  const int repeats = s.heads / s.kv_heads;
  BlasOnCallingThread one_thread_each;
  on_all_cores(
      size_t(s.batch) * s.heads, size_t(s.queries) * s.keys * (s.depth + s.value_depth), [&](size_t begin, size_t end) {
        AttentionScratch scratch;
        for (size_t head = begin; head < end; ++head) {
          const int b = int(head / s.heads), h = int(head % s.heads), kv = h / repeats;
          const bool* keep = keys_allowed ? keys_allowed + (s.mask_per_batch ? size_t(b) * s.keys : 0) : nullptr;
          attend_one_head(q + b * s.q_strides[0] + h * s.q_strides[1], k + b * s.k_strides[0] + kv * s.k_strides[1],
                          v + b * s.v_strides[0] + kv * s.v_strides[1], keep,
                          out + size_t(b) * s.queries * s.heads * s.value_depth + size_t(h) * s.value_depth,
                          int64_t(s.heads) * s.value_depth, s, scratch);
        }
      });
}

// attend_heads over sequences packed along the token axis of a batch of one: sequence i is the tokens [starts[i],
// starts[i + 1]), attending to itself only. Each (sequence, query head) is one task; the tasks go head by head, so
// that each core's share holds long and short sequences alike.
void attend_packed_heads(const float* q, const float* k, const float* v, float* out, const AttentionShape& s,
                         const std::vector<int>& starts) {
  const int repeats = s.heads / s.kv_heads, sequences = int(starts.size()) - 1;
  size_t work = 0;  // all sequences' scores times their depth: on_all_cores' measure of the whole
  for (int i = 0; i < sequences; ++i) work += size_t(starts[i + 1] - starts[i]) * (starts[i + 1] - starts[i]);
  BlasOnCallingThread one_thread_each;
  on_all_cores(size_t(sequences) * s.heads, work * (s.depth + s.value_depth) / std::max(sequences, 1),
               [&](size_t begin, size_t end) {
                 AttentionScratch scratch;
                 for (size_t task = begin; task < end; ++task) {
                   const int i = int(task % sequences), h = int(task / sequences), kv = h / repeats;
                   AttentionShape one = s;
                   one.queries = one.keys = starts[i + 1] - starts[i];
                   const int64_t first = starts[i];
                   attend_one_head(q + first * s.q_strides[2] + h * s.q_strides[1],
                                   k + first * s.k_strides[2] + kv * s.k_strides[1],
                                   v + first * s.v_strides[2] + kv * s.v_strides[1], nullptr,
                                   out + size_t(first) * s.heads * s.value_depth + size_t(h) * s.value_depth,
                                   int64_t(s.heads) * s.value_depth, one, scratch);
                 }
               });
}

// attention_cpu, or packed_attention_cpu where `sequence_starts` is not empty.
class CpuAttention : public CpuKernel {
 public:
  CpuAttention(mx::Stream stream, float scale, std::vector<int> sequence_starts = {})
      : CpuKernel(stream), scale_(scale), sequence_starts_(std::move(sequence_starts)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    const auto &q = inputs[0], &k = inputs[1], &v = inputs[2];
    auto strides = [](const mx::array& a, int64_t* to) { std::copy_n(a.strides().begin(), 4, to); };
    AttentionShape shape{.batch = q.shape(0),
                         .heads = q.shape(1),
                         .kv_heads = k.shape(1),
                         .queries = q.shape(2),
                         .keys = k.shape(2),
                         .depth = q.shape(3),
                         .value_depth = v.shape(3),
                         .scale = scale_,
                         .mask_per_batch = inputs.size() > 3 && inputs[3].shape(0) > 1};
    strides(q, shape.q_strides);
    strides(k, shape.k_strides);
    strides(v, shape.v_strides);
    const bool* keys_allowed = inputs.size() > 3 ? inputs[3].data<bool>() : nullptr;
    dispatch(inputs, out,
             [q = q.data<float>(), k = k.data<float>(), v = v.data<float>(), keys_allowed, dst = out.data<float>(),
              shape, starts = sequence_starts_] {
               if (starts.empty()) {
                 attend_heads(q, k, v, keys_allowed, dst, shape);
               } else {
                 attend_packed_heads(q, k, v, dst, shape, starts);
               }
             });
  }

  DEFINE_NAME(CpuAttention)
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CpuAttention&>(other);
    return scale_ == o.scale_ && sequence_starts_ == o.sequence_starts_;
  }

 private:
  float scale_;
  std::vector<int> sequence_starts_;
};

// head_norm_rope_cpu (nn/cpu_kernels.h). Inputs: x (its view: token rows `token_stride` apart), then the norm's
// weight when there is one, cos, sin.
class CpuHeadNormRope : public CpuKernel {
 public:
  CpuHeadNormRope(mx::Stream stream, float eps, bool normed) : CpuKernel(stream), eps_(eps), normed_(normed) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    const auto& x = inputs[0];
    const auto &cos = inputs[inputs.size() - 2], &sin = inputs.back();
    const int batch = x.shape(0), tokens = x.shape(1), heads = x.shape(2), depth = x.shape(3);
    const int64_t batch_stride = x.strides()[0], token_stride = x.strides()[1];
    const bool table_per_batch = cos.shape(0) > 1;
    const float* weight = normed_ ? inputs[1].data<float>() : nullptr;
    dispatch(inputs, out,
             [src = x.data<float>(), weight, cos = cos.data<float>(), sin = sin.data<float>(), dst = out.data<float>(),
              batch, tokens, heads, depth, batch_stride, token_stride, table_per_batch, eps = eps_] {
               const int half = depth / 2, row = heads * depth;
               on_all_cores(size_t(batch) * tokens, row, [&](size_t begin, size_t end) {
                 std::vector<float> normed(row);
                 for (size_t bt = begin; bt < end; ++bt) {
                   const size_t b = bt / tokens, t = bt % tokens;
                   const float* in = src + b * batch_stride + t * token_stride;
                   if (weight) {
                     norm_rows(in, normed.data(), heads, depth, weight, nullptr, eps);
                     in = normed.data();
                   }
                   const size_t table = ((table_per_batch ? b : 0) * tokens + t) * half;
                   float* to = dst + bt * row;
                   for (int h = 0; h < heads; ++h) {
                     for (int i = 0; i < half; ++i) {
                       const float x0 = in[h * depth + 2 * i], x1 = in[h * depth + 2 * i + 1];
                       const float c = cos[table + i], s = sin[table + i];
                       to[h * depth + 2 * i] = x0 * c + x1 * -s;
                       to[h * depth + 2 * i + 1] = x0 * s + x1 * c;
                     }
                   }
                 }
               });
             });
  }

  DEFINE_NAME(CpuHeadNormRope)
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CpuHeadNormRope&>(other);
    return eps_ == o.eps_ && normed_ == o.normed_;
  }

 private:
  float eps_;
  bool normed_;
};

// scaled_rms_norm_cpu and gated_residual_cpu (nn/cpu_kernels.h): inputs x, [a,] the norm's weight, then the per-batch
// vector (scale or gate) [B, 1, N]; rows of N.
class CpuModulatedNorm : public CpuKernel {
 public:
  CpuModulatedNorm(mx::Stream stream, float eps, bool residual) : CpuKernel(stream), eps_(eps), residual_(residual) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    allocate_like(inputs[0], out);  // x's buffer when the graph is done with x: each row is read before written
    const auto& x = inputs[0];
    const int n = x.shape(-1), tokens = x.shape(1);
    const float* normed_in = (residual_ ? inputs[1] : x).data<float>();
    dispatch(inputs, out,
             [x = x.data<float>(), normed_in, weight = inputs[inputs.size() - 2].data<float>(),
              vector = inputs.back().data<float>(), dst = out.data<float>(), rows = x.size() / n, n, tokens, eps = eps_,
              residual = residual_] {
               on_all_cores(rows, n, [&](size_t begin, size_t end) {
                 for_each_normed_row(normed_in, begin, end, n, weight, nullptr, eps, [&](size_t row, const float* in) {
                   const float* v = vector + row / tokens * n;  // the row's batch element's scale or gate
                   float* to = dst + row * n;
                   if (residual) {
                     const float* base = x + row * n;
                     for (int j = 0; j < n; ++j) to[j] = base[j] + v[j] * in[j];  // x + gate * norm(a)
                   } else {
                     for (int j = 0; j < n; ++j) to[j] = in[j] * v[j];  // norm(x) * scale
                   }
                 });
               });
             });
  }

  DEFINE_NAME(CpuModulatedNorm)
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CpuModulatedNorm&>(other);
    return eps_ == o.eps_ && residual_ == o.residual_;
  }

 private:
  float eps_;
  bool residual_;
};

// FLUX.2's modulation rows (nn/cpu_kernels.h): kModulate: one_plus_scale * layer_norm(x) + shift (the norm without
// affine parameters); kGatedSum: x + gate * y. Inputs: x, then (one_plus_scale, shift) or (y, gate), the vectors
// [B, 1, N].
class CpuLayerModulation : public CpuKernel {
 public:
  enum Kind { kModulate, kGatedSum };
  CpuLayerModulation(mx::Stream stream, Kind kind, float eps) : CpuKernel(stream), kind_(kind), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    allocate_like(inputs[0], out);  // x's buffer when the graph is done with x: each row is read before written
    const auto& x = inputs[0];
    const int n = x.shape(-1), tokens = x.shape(1);
    dispatch(inputs, out,
             [x = x.data<float>(), first_in = inputs[1].data<float>(), second_in = inputs[2].data<float>(),
              dst = out.data<float>(), rows = x.size() / n, n, tokens, kind = kind_, eps = eps_] {
               // The norm without affine parameters as norm_rows computes it with them: times 1 and plus 0 change
               // no value (but the sign of a zero).
               const std::vector<float> ones(n, 1.0f), zeros(n, 0.0f);
               on_all_cores(rows, n, [&](size_t begin, size_t end) {
                 if (kind == kGatedSum) {
                   for (size_t row = begin; row < end; ++row) {
                     const float *in = x + row * n, *y = first_in + row * n;
                     const float* gate = second_in + row / tokens * n;  // the row's batch element's vector
                     float* to = dst + row * n;
                     for (int j = 0; j < n; ++j) to[j] = in[j] + gate[j] * y[j];
                   }
                   return;
                 }
                 // Each row scaled and shifted by its batch element's vectors.
                 for_each_normed_row(x, begin, end, n, ones.data(), zeros.data(), eps,
                                     [&](size_t row, const float* in) {
                                       const size_t vector_at = row / tokens * n;
                                       const float *scale = first_in + vector_at, *shift = second_in + vector_at;
                                       float* to = dst + row * n;
                                       for (int j = 0; j < n; ++j) to[j] = scale[j] * in[j] + shift[j];
                                     });
               });
             });
  }

  DEFINE_NAME(CpuLayerModulation)
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CpuLayerModulation&>(other);
    return kind_ == o.kind_ && eps_ == o.eps_;
  }

 private:
  Kind kind_;
  float eps_;
};

// y + bias over y's last axis (bias_add_cpu): MLX's add, on every core.
class CpuBiasAdd : public CpuKernel {
 public:
  using CpuKernel::CpuKernel;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& y = inputs[0];
    allocate_like(y, out);
    const int n = y.shape(-1);
    dispatch(inputs, out,
             [y = y.data<float>(), bias = inputs[1].data<float>(), dst = out.data<float>(), n, rows = y.size() / n] {
               on_all_cores(rows, n, [&](size_t begin, size_t end) {
                 for (size_t r = begin; r < end; ++r) {
                   for (int j = 0; j < n; ++j) dst[r * n + j] = y[r * n + j] + bias[j];
                 }
               });
             });
  }

  DEFINE_NAME(CpuBiasAdd)
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

// What follows an encoder's product on its rows (inputs: the product y, its bias, then the rest):
// kGelu: gelu(y + bias); kResidualNorm: layer_norm((y + bias) + residual) with its weight and bias. Each row's
// sums go in the cache once, the bias, residual and activation in the same pass, the ops in MLX's order.
class CpuProductEpilogue : public CpuKernel {
 public:
  enum Kind { kGelu, kResidualNorm };
  CpuProductEpilogue(mx::Stream stream, Kind kind, float eps) : CpuKernel(stream), kind_(kind), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    allocate_like(inputs[0], out);  // y's buffer when the graph is done with y: each row is read before written
    const auto& y = inputs[0];
    const int n = y.shape(-1);
    const bool norm = kind_ == kResidualNorm;
    dispatch(inputs, out,
             [y = y.data<float>(), bias = inputs[1].data<float>(), residual = norm ? inputs[2].data<float>() : nullptr,
              weight = norm ? inputs[3].data<float>() : nullptr, norm_bias = norm ? inputs[4].data<float>() : nullptr,
              dst = out.data<float>(), rows = y.size() / n, n, eps = eps_] {
               on_all_cores(rows, n, [&](size_t begin, size_t end) {
                 constexpr size_t group = cpu_loops::kRowGroup;
                 std::vector<float> sum(group * n);
                 for (size_t first = begin; first < end; first += group) {
                   const size_t count = std::min(group, end - first);
                   for (size_t r = 0; r < count; ++r) {
                     const float* in = y + (first + r) * n;
                     float* to = sum.data() + r * n;
                     for (int j = 0; j < n; ++j) to[j] = in[j] + bias[j];
                     if (residual) {
                       const float* add = residual + (first + r) * n;
                       for (int j = 0; j < n; ++j) to[j] = to[j] + add[j];
                     }
                   }
                   float* to = dst + first * n;
                   if (residual) {
                     norm_rows(sum.data(), to, count, n, weight, norm_bias, eps);
                   } else {
                     loops().gelu_range(sum.data(), to, count * n);
                   }
                 }
               });
             });
  }

  DEFINE_NAME(CpuProductEpilogue)
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CpuProductEpilogue&>(other);
    return kind_ == o.kind_ && eps_ == o.eps_;
  }

 private:
  Kind kind_;
  float eps_;
};

class CpuConv2d : public CpuKernel {
 public:
  CpuConv2d(mx::Stream stream, int padding, bool has_bias, bool has_residual, bool upsample_2x)
      : CpuKernel(stream),
        padding_(padding),
        has_bias_(has_bias),
        has_residual_(has_residual),
        upsample_2x_(upsample_2x) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto &x = inputs[0], &weight = inputs[1];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    const ConvShape shape{.batch = x.shape(0),
                          .height = x.shape(1),
                          .width = x.shape(2),
                          .channels = x.shape(3),
                          .kernel = weight.shape(1),
                          .padding = padding_,
                          .out_rows = out.shape(1),
                          .out_cols = out.shape(2),
                          .out_channels = weight.shape(0),
                          .upsample_shift = upsample_2x_ ? 1 : 0};
    const float* bias = has_bias_ ? inputs[2].data<float>() : nullptr;
    const float* residual = has_residual_ ? inputs.back().data<float>() : nullptr;
    dispatch(inputs, out,
             [src = x.data<float>(), w = weight.data<float>(), bias, residual, dst = out.data<float>(), shape] {
               if (takes_direct_convolution(shape)) {
                 convolve_direct(src, w, bias, residual, dst, shape);
               } else {
                 convolve_in_bands(src, w, bias, residual, dst, shape);
               }
             });
  }

  DEFINE_NAME(CpuConv2d)
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CpuConv2d&>(other);
    return padding_ == o.padding_ && has_bias_ == o.has_bias_ && has_residual_ == o.has_residual_ &&
           upsample_2x_ == o.upsample_2x_;
  }

 private:
  int padding_;
  bool has_bias_, has_residual_, upsample_2x_;
};

// Each input row's sums over its groups of `group` elements ([rows, groups]): the bias terms' factor.
std::vector<float> group_sums(const float* x, size_t rows, int k, int group) {
  std::vector<float> sums(rows * (k / group));
  for (size_t g = 0; g < sums.size(); ++g) {
    float sum = 0.0f;
    for (int i = 0; i < group; ++i) sum += x[g * group + i];
    sums[g] = sum;
  }
  return sums;
}

// Products a core takes at once over its outputs: their rows of x stay in its cache while it sweeps its share of the
// weights (a MoE prompt's thousands of sorted products would otherwise stream every row of x once per output).
constexpr size_t kProductsAtOnce = 8;

// Products of rows of x [X, K] float32 with rows of packed affine weights [.., N, K * bits / 32] (4 or 8 bits) with
// float32 scales and biases [.., N, K / group_size]: out [P, N], product p being x's row x_of(p) times the weight
// matrix weight_of(p). The outputs split over the cores; each core takes its outputs for kProductsAtOnce products in
// turn, so consecutive products of one matrix read its rows from the cache.
template <typename XOf, typename WeightOf>
void affine_products(const float* x, int k, int x_rows, const uint32_t* w, const float* scales, const float* biases,
                     int n, int bits, int group, size_t products, const XOf& x_of, const WeightOf& weight_of,
                     float* y) {
  const int groups = k / group, words = k * bits / 32;
  const auto dot = bits == 4 ? loops().affine_dot_4bit : loops().affine_dot_8bit;
  const auto x_sums = group_sums(x, x_rows, k, group);
  on_all_cores(n, static_cast<size_t>(k) * products, [&](size_t begin, size_t end) {
    for (size_t first = 0; first < products; first += kProductsAtOnce) {
      const size_t last = std::min(products, first + kProductsAtOnce);
      for (size_t o = begin; o < end; ++o) {
        for (size_t p = first; p < last; ++p) {
          const size_t row = static_cast<size_t>(weight_of(p)) * n + o, xr = x_of(p);
          y[p * n + o] = dot(w + row * words, scales + row * groups, biases + row * groups, x + xr * k,
                             x_sums.data() + xr * groups, groups, group);
        }
      }
    }
  });
}

// What the two packed affine kernels below hold: the weights' bits and group size.
class CpuAffineKernel : public CpuKernel {
 public:
  CpuAffineKernel(mx::Stream stream, int bits, int group_size)
      : CpuKernel(stream), bits_(bits), group_size_(group_size) {}

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CpuAffineKernel&>(other);
    return bits_ == o.bits_ && group_size_ == o.group_size_;
  }

 protected:
  int bits_, group_size_;
};

// x [rows, K] times one packed affine weight [N, ..] -> [rows, N] (affine_matvec_cpu).
class CpuAffineMatvec : public CpuAffineKernel {
 public:
  using CpuAffineKernel::CpuAffineKernel;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto &x = inputs[0], &w = inputs[1], &scales = inputs[2], &biases = inputs[3];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    const int k = x.shape(-1), n = w.shape(0), rows = static_cast<int>(x.size() / k);
    dispatch(inputs, out,
             [x = x.data<float>(), w = w.data<uint32_t>(), scales = scales.data<float>(), biases = biases.data<float>(),
              y = out.data<float>(), k, n, rows, bits = bits_, group = group_size_] {
               const auto row = [](size_t p) { return p; };
               const auto only = [](size_t) { return size_t{0}; };
               affine_products(x, k, rows, w, scales, biases, n, bits, group, rows, row, only, y);
             });
  }

  DEFINE_NAME(CpuAffineMatvec)
};

// gather_qmm's products of one row each: inputs x [X, K], stacked weights [E, N, ..], their scales and biases,
// x_of [P] and expert_of [P] (int32) -> [P, N], product p being x row x_of[p] times expert expert_of[p]'s weight.
class CpuGatherAffineMatvec : public CpuAffineKernel {
 public:
  using CpuAffineKernel::CpuAffineKernel;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto &x = inputs[0], &w = inputs[1], &scales = inputs[2], &biases = inputs[3];
    const auto &x_of = inputs[4], &expert_of = inputs[5];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    const int k = x.shape(-1), experts = w.shape(0), n = w.shape(1), rows = x.shape(0);
    const size_t products = x_of.size();
    dispatch(inputs, out,
             [x = x.data<float>(), w = w.data<uint32_t>(), scales = scales.data<float>(), biases = biases.data<float>(),
              x_of = x_of.data<int32_t>(), expert_of = expert_of.data<int32_t>(), y = out.data<float>(), k, n, rows,
              experts, products, bits = bits_, group = group_size_] {
               // Indices come from the router's top k over the experts the loader checked; clamped all the same, so
               // that no index can read past the weights (an exception here, on MLX's stream thread, would end the
               // process).
               const auto clamped = [](const int32_t* index, int count) {
                 return [index, count](size_t p) { return static_cast<size_t>(std::clamp(index[p], 0, count - 1)); };
               };
               affine_products(x, k, rows, w, scales, biases, n, bits, group, products, clamped(x_of, rows),
                               clamped(expert_of, experts), y);
             });
  }

  DEFINE_NAME(CpuGatherAffineMatvec)
};

// What the two half-precision kernels below hold: the dtype they widen to float (bfloat16 or float16).
class CpuHalfKernel : public CpuKernel {
 public:
  CpuHalfKernel(mx::Stream stream, mx::Dtype dtype) : CpuKernel(stream), dtype_(dtype) {}

  bool is_equivalent(const mx::Primitive& other) const override {
    return dtype_ == static_cast<const CpuHalfKernel&>(other).dtype_;
  }

 protected:
  decltype(cpu_loops::Loops::bf16_widen) widener() const {
    return dtype_ == mx::bfloat16 ? loops().bf16_widen : loops().f16_widen;
  }

 private:
  mx::Dtype dtype_;
};

// x [rows, K] float32 times a bfloat16 or float16 weight [N, K] -> [rows, N] float32 (half_matvec_cpu): the outputs
// split over the cores; each core widens a weight row once into a float row of its own, then takes its dot product
// with every row of x (fewer than 32: they stay in the core's cache).
class CpuHalfMatvec : public CpuHalfKernel {
 public:
  using CpuHalfKernel::CpuHalfKernel;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto &x = inputs[0], &w = inputs[1];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    const int k = x.shape(-1), n = w.shape(0);
    const size_t rows = x.size() / k;
    dispatch(inputs, out,
             [x = x.data<float>(), w = static_cast<const uint16_t*>(w.data<void>()), y = out.data<float>(), k, n, rows,
              widen = widener(), dot = loops().dot] {
               on_all_cores(n, static_cast<size_t>(k) * rows, [&](size_t begin, size_t end) {
                 std::vector<float> row(k);
                 for (size_t o = begin; o < end; ++o) {
                   widen(w + o * k, row.data(), k);
                   for (size_t r = 0; r < rows; ++r) y[r * n + o] = dot(row.data(), x + r * k, k);
                 }
               });
             });
  }

  DEFINE_NAME(CpuHalfMatvec)
};

// A bfloat16 or float16 array widened to float32 on every core (mx::astype runs on one: 20 ms for a 12,288 x 1,024
// weight here, as long as its product with 31 rows through our kernel).
class CpuWidenHalf : public CpuHalfKernel {
 public:
  using CpuHalfKernel::CpuHalfKernel;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& in = inputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    const size_t n = in.size() / kWidenChunk;  // whole chunks; the size is a multiple of 8, the rest comes after
    dispatch(inputs, out,
             [in = static_cast<const uint16_t*>(in.data<void>()), y = out.data<float>(), n, size = in.size(),
              widen = widener()] {
               on_all_cores(n, kWidenChunk, [&](size_t begin, size_t end) {
                 for (size_t c = begin; c < end; ++c) widen(in + c * kWidenChunk, y + c * kWidenChunk, kWidenChunk);
               });
               if (size > n * kWidenChunk)
                 widen(in + n * kWidenChunk, y + n * kWidenChunk, static_cast<int>(size - n * kWidenChunk));
             });
  }

  DEFINE_NAME(CpuWidenHalf)

 private:
  static constexpr size_t kWidenChunk = 4096;
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

mx::array masked_softmax_last_axis(const mx::array& x, const mx::array& keys_allowed) {
  const int keys = x.shape(-1), mask_rows = keys_allowed.size() / keys;
  if (x.ndim() < 2 || keys_allowed.dtype() != mx::bool_ || keys_allowed.shape(-1) != keys ||
      (mask_rows != 1 && mask_rows != x.shape(0))) {
    throw std::invalid_argument("masked softmax: keys_allowed must be bool [1 or x's first size, x's last size]");
  }
  auto shape = x.shape();
  return mx::array(std::move(shape), mx::float32, std::make_shared<CpuSoftmax>(mx::default_stream(mx::Device::cpu)),
                   {mx::contiguous(x), mx::contiguous(keys_allowed)});
}

mx::array attention_cpu(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                        const std::optional<mx::array>& keys_allowed) {
  const bool shapes_fit = q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4 && k.shape(0) == q.shape(0) &&
                          v.shape(0) == q.shape(0) && k.shape(1) > 0 && q.shape(1) % k.shape(1) == 0 &&
                          v.shape(1) == k.shape(1) && k.shape(3) == q.shape(3) && v.shape(2) == k.shape(2) &&
                          k.shape(2) > 0;
  const bool mask_fits = !keys_allowed || (keys_allowed->ndim() == 2 && keys_allowed->dtype() == mx::bool_ &&
                                           keys_allowed->shape(1) == k.shape(2) &&
                                           (keys_allowed->shape(0) == 1 || keys_allowed->shape(0) == q.shape(0)));
  if (!shapes_fit || !mask_fits) {
    throw std::invalid_argument(
        "attention_cpu: q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] (Hq a multiple of Hkv), keys_allowed bool [1 or B, "
        "Lk]");
  }
  std::vector<mx::array> inputs{q, k, v};
  if (keys_allowed) inputs.push_back(mx::contiguous(*keys_allowed));
  // The output is [B, Lq, H, Dv], handed back as its [B, H, Lq, Dv] view.
  auto out = mx::array({q.shape(0), q.shape(2), q.shape(1), v.shape(3)}, mx::float32,
                       std::make_shared<CpuAttention>(mx::default_stream(mx::Device::cpu), scale), std::move(inputs));
  return mx::transpose(out, {0, 2, 1, 3});
}

mx::array packed_attention_cpu(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                               const std::vector<int>& lengths) {
  const bool shapes_fit = q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4 && q.shape(0) == 1 && k.shape(0) == 1 &&
                          v.shape(0) == 1 && k.shape(1) > 0 && q.shape(1) % k.shape(1) == 0 &&
                          v.shape(1) == k.shape(1) && k.shape(3) == q.shape(3) && k.shape(2) == q.shape(2) &&
                          v.shape(2) == q.shape(2);
  std::vector<int> starts{0};
  for (int length : lengths) {
    if (length <= 0) throw std::invalid_argument("packed_attention_cpu: every sequence needs at least one token");
    starts.push_back(starts.back() + length);
  }
  if (!shapes_fit || starts.back() != q.shape(2)) {
    throw std::invalid_argument(
        "packed_attention_cpu: q [1, Hq, N, D], k and v [1, Hkv, N, D] (Hq a multiple of Hkv), lengths summing to N");
  }
  auto out = mx::array({1, q.shape(2), q.shape(1), v.shape(3)}, mx::float32,
                       std::make_shared<CpuAttention>(mx::default_stream(mx::Device::cpu), scale, std::move(starts)),
                       {q, k, v});
  return mx::transpose(out, {0, 2, 1, 3});
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

mx::array gated_silu_columns_cpu(const mx::array& fused, int gate_at, int up_at, int width) {
  const int row = fused.ndim() > 0 ? fused.shape(-1) : 0;
  if (fused.ndim() == 0 || width < 0 || gate_at < 0 || up_at < 0 || gate_at + width > row || up_at + width > row) {
    throw std::invalid_argument("gated_silu_columns_cpu: both column ranges must lie within fused's last axis");
  }
  auto shape = fused.shape();
  shape.back() = width;
  return mx::array(std::move(shape), mx::float32,
                   std::make_shared<CpuSiluColumns>(mx::default_stream(mx::Device::cpu), gate_at, up_at),
                   {mx::contiguous(fused)});
}

mx::array group_norm_cpu(const mx::array& x, const mx::array& weight, const mx::array& bias, int groups, float eps,
                         bool then_silu) {
  const int channels = x.shape(-1);
  if (x.ndim() < 2 || groups <= 0 || channels % groups != 0 || weight.size() != size_t(channels) ||
      bias.size() != size_t(channels)) {
    throw std::invalid_argument("group_norm_cpu: x [N, ..., C], C a multiple of groups, weight and bias [C]");
  }
  auto as_float = [](const mx::array& a) { return mx::contiguous(mx::astype(a, mx::float32)); };
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<CpuGroupNorm>(mx::default_stream(mx::Device::cpu), groups, eps, then_silu),
                   {mx::contiguous(x), as_float(weight), as_float(bias)});
}

mx::array layer_norm_cpu(const mx::array& x, const mx::array& weight, const std::optional<mx::array>& bias, float eps) {
  std::vector<mx::array> inputs{x, weight};
  if (bias) inputs.push_back(*bias);
  for (auto& input : inputs) input = mx::contiguous(input);
  return mx::array(x.shape(), mx::float32, std::make_shared<CpuRowNorm>(mx::default_stream(mx::Device::cpu), eps),
                   std::move(inputs));
}

bool cpu_modulation_vector(const mx::array& x, const mx::array& vector) {
  return on_cpu_kernels(x) && x.ndim() == 3 && vector.dtype() == mx::float32 &&
         vector.shape() == mx::Shape{x.shape(0), 1, x.shape(2)};
}

mx::array head_norm_rope_cpu(const mx::array& x, const std::optional<mx::array>& norm_weight, float eps,
                             const mx::array& cos, const mx::array& sin) {
  const int half = x.ndim() == 4 ? x.shape(3) / 2 : 0;
  const bool table_fits = cos.ndim() == 4 && cos.shape() == sin.shape() && cos.dtype() == mx::float32 &&
                          sin.dtype() == mx::float32 && (cos.shape(0) == 1 || cos.shape(0) == x.shape(0)) &&
                          cos.shape(1) == x.shape(1) && cos.shape(2) == 1 && cos.shape(3) == half;
  if (x.ndim() != 4 || x.shape(3) % 2 != 0 || !table_fits ||
      (norm_weight && (norm_weight->dtype() != mx::float32 || norm_weight->size() != size_t(x.shape(3))))) {
    throw std::invalid_argument("head_norm_rope_cpu: x [B, T, H, D] (D even), cos and sin [1 or B, T, 1, D/2] float32");
  }
  // Heads adjacent and each head's D contiguous: the fused projection's column view as it is; else a copy.
  auto view = x.strides()[3] == 1 && x.strides()[2] == x.shape(3) ? x : mx::contiguous(x);
  std::vector<mx::array> inputs{view};
  if (norm_weight) inputs.push_back(*norm_weight);
  inputs.push_back(mx::contiguous(cos));
  inputs.push_back(mx::contiguous(sin));
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<CpuHeadNormRope>(mx::default_stream(mx::Device::cpu), eps, norm_weight.has_value()),
                   std::move(inputs));
}

namespace {

mx::array modulated_norm_cpu(const mx::array& x, const std::optional<mx::array>& a, const mx::array& norm_weight,
                             float eps, const mx::array& vector, const char* name) {
  const bool fits = x.ndim() == 3 && (!a || a->shape() == x.shape()) && norm_weight.dtype() == mx::float32 &&
                    norm_weight.size() == size_t(x.shape(2)) && vector.dtype() == mx::float32 &&
                    vector.shape() == mx::Shape{x.shape(0), 1, x.shape(2)};
  if (!fits) throw std::invalid_argument(std::string(name) + ": x [B, T, N], weight [N], the vector [B, 1, N] float32");
  std::vector<mx::array> inputs{mx::contiguous(x)};
  if (a) inputs.push_back(mx::contiguous(*a));
  inputs.push_back(mx::contiguous(norm_weight));
  inputs.push_back(mx::contiguous(vector));
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<CpuModulatedNorm>(mx::default_stream(mx::Device::cpu), eps, a.has_value()),
                   std::move(inputs));
}

}  // namespace

mx::array scaled_rms_norm_cpu(const mx::array& x, const mx::array& norm_weight, float eps, const mx::array& scale) {
  return modulated_norm_cpu(x, std::nullopt, norm_weight, eps, scale, "scaled_rms_norm_cpu");
}

mx::array gated_residual_cpu(const mx::array& x, const mx::array& a, const mx::array& norm_weight, float eps,
                             const mx::array& gate) {
  return modulated_norm_cpu(x, a, norm_weight, eps, gate, "gated_residual_cpu");
}

namespace {

// Whether v is a float32 vector of y's last size (a bias, a norm's weight).
bool row_vector_of(const mx::array& v, const mx::array& y) {
  return v.ndim() == 1 && v.dtype() == mx::float32 && v.shape(0) == y.shape(-1);
}

}  // namespace

mx::array bias_add_cpu(const mx::array& y, const mx::array& bias) {
  if (y.ndim() < 1 || !row_vector_of(bias, y))
    throw std::invalid_argument("bias_add_cpu: y [..., N] and bias [N], float32");
  return run_kernel<CpuBiasAdd>({y, bias});
}

mx::array bias_gelu_cpu(const mx::array& y, const mx::array& bias) {
  if (y.ndim() < 1 || !row_vector_of(bias, y)) throw std::invalid_argument("bias_gelu_cpu: y [..., N], bias [N]");
  return mx::array(
      y.shape(), mx::float32,
      std::make_shared<CpuProductEpilogue>(mx::default_stream(mx::Device::cpu), CpuProductEpilogue::kGelu, 0.0f),
      {mx::contiguous(y), mx::contiguous(bias)});
}

mx::array bias_residual_layer_norm_cpu(const mx::array& y, const mx::array& bias, const mx::array& residual,
                                       const mx::array& weight, const mx::array& norm_bias, float eps) {
  if (y.ndim() < 1 || residual.shape() != y.shape() || residual.dtype() != mx::float32 || !row_vector_of(bias, y) ||
      !row_vector_of(weight, y) || !row_vector_of(norm_bias, y)) {
    throw std::invalid_argument("bias_residual_layer_norm_cpu: y and residual [..., N], bias, weight, norm_bias [N]");
  }
  return mx::array(
      y.shape(), mx::float32,
      std::make_shared<CpuProductEpilogue>(mx::default_stream(mx::Device::cpu), CpuProductEpilogue::kResidualNorm, eps),
      {mx::contiguous(y), mx::contiguous(bias), mx::contiguous(residual), mx::contiguous(weight),
       mx::contiguous(norm_bias)});
}

namespace {

mx::array layer_modulation_cpu(CpuLayerModulation::Kind kind, const mx::array& x, const mx::array& first,
                               const mx::array& second, float eps, const char* name) {
  const mx::Shape vector_shape{x.ndim() == 3 ? x.shape(0) : 0, 1, x.ndim() == 3 ? x.shape(2) : 0};
  const bool fits =
      x.ndim() == 3 && x.dtype() == mx::float32 && first.dtype() == mx::float32 && second.dtype() == mx::float32 &&
      (kind == CpuLayerModulation::kGatedSum ? first.shape() == x.shape() : first.shape() == vector_shape) &&
      second.shape() == vector_shape;
  if (!fits) throw std::invalid_argument(std::string(name) + ": x [B, T, N] and the vectors [B, 1, N], float32");
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<CpuLayerModulation>(mx::default_stream(mx::Device::cpu), kind, eps),
                   {mx::contiguous(x), mx::contiguous(first), mx::contiguous(second)});
}

}  // namespace

mx::array modulated_layer_norm_cpu(const mx::array& x, const mx::array& shift, const mx::array& one_plus_scale,
                                   float eps) {
  return layer_modulation_cpu(CpuLayerModulation::kModulate, x, one_plus_scale, shift, eps, "modulated_layer_norm_cpu");
}

mx::array gated_sum_cpu(const mx::array& x, const mx::array& y, const mx::array& gate) {
  return layer_modulation_cpu(CpuLayerModulation::kGatedSum, x, y, gate, 0.0f, "gated_sum_cpu");
}

const char* cpu_loops_name() {
  return loops().name;
}

mx::array conv2d_cpu(const mx::array& x, const mx::array& weight, int padding, const CpuConvExtras& extras) {
  const int kernel = weight.shape(1), upsample = extras.upsample_2x ? 2 : 1;
  if (x.ndim() != 4 || weight.ndim() != 4 || weight.shape(2) != kernel || weight.shape(3) != x.shape(3)) {
    throw std::invalid_argument("conv2d_cpu: x [N, H, W, C] and a square weight [O, k, k, C]");
  }
  const int out_rows = upsample * x.shape(1) + 2 * padding - kernel + 1;
  const int out_cols = upsample * x.shape(2) + 2 * padding - kernel + 1;
  if (out_rows <= 0 || out_cols <= 0) throw std::invalid_argument("conv2d_cpu: no output for this input");
  mx::Shape shape{x.shape(0), out_rows, out_cols, weight.shape(0)};
  std::vector<mx::array> inputs{mx::contiguous(x), mx::contiguous(weight)};
  if (extras.bias) {
    if (extras.bias->size() != size_t(weight.shape(0))) throw std::invalid_argument("conv2d_cpu: bias must be [O]");
    inputs.push_back(mx::contiguous(mx::astype(*extras.bias, mx::float32)));
  }
  if (extras.residual) {
    if (extras.residual->shape() != shape)
      throw std::invalid_argument("conv2d_cpu: residual must be the output's shape");
    inputs.push_back(mx::contiguous(mx::astype(*extras.residual, mx::float32)));
  }
  return mx::array(std::move(shape), mx::float32,
                   std::make_shared<CpuConv2d>(mx::default_stream(mx::Device::cpu), padding, extras.bias.has_value(),
                                               extras.residual.has_value(), extras.upsample_2x),
                   std::move(inputs));
}

namespace {

// Whether packed affine weights [.., N, K * bits / 32] with scales and biases [.., N, K / group_size] take our
// kernels against x [..., K] on the CPU.
bool affine_kernel_fits(const mx::array& x, const mx::array& packed, const mx::array& scales, const mx::array& biases,
                        int bits, int group_size) {
  if (!on_cpu_kernels(x) || (bits != 4 && bits != 8) || group_size % 8 != 0 || scales.dtype() != mx::float32 ||
      biases.dtype() != mx::float32 || packed.dtype() != mx::uint32 || packed.ndim() < 2 || x.ndim() < 1) {
    return false;
  }
  const int k = x.shape(-1);
  auto groups_shape = packed.shape();
  groups_shape.back() = k / group_size;
  return k % group_size == 0 && packed.shape(-1) == k * bits / 32 && scales.shape() == groups_shape &&
         biases.shape() == groups_shape;
}

}  // namespace

std::optional<mx::array> affine_matvec_cpu(const mx::array& x, const mx::array& packed, const mx::array& scales,
                                           const mx::array& biases, int bits, int group_size) {
  if (packed.ndim() != 2 || !affine_kernel_fits(x, packed, scales, biases, bits, group_size)) return std::nullopt;
  auto shape = x.shape();
  shape.back() = packed.shape(0);
  return mx::array(std::move(shape), mx::float32,
                   std::make_shared<CpuAffineMatvec>(mx::default_stream(mx::Device::cpu), bits, group_size),
                   {mx::contiguous(x), mx::contiguous(packed), mx::contiguous(scales), mx::contiguous(biases)});
}

std::optional<mx::array> gather_affine_matvec_cpu(const mx::array& x, const mx::array& packed, const mx::array& scales,
                                                  const mx::array& biases, const mx::array& indices, int bits,
                                                  int group_size) {
  if (packed.ndim() != 3 || x.ndim() < 2 || x.shape(-2) != 1 ||
      !affine_kernel_fits(x, packed, scales, biases, bits, group_size)) {
    return std::nullopt;
  }
  const int k = x.shape(-1), n = packed.shape(1);
  const mx::Shape x_batch(x.shape().begin(), x.shape().end() - 2);
  const auto batch = mx::broadcast_shapes(x_batch, indices.shape());
  const int x_rows = static_cast<int>(x.size() / k);
  // Each product's x row and expert, as gather_qmm broadcasts x's leading axes against the indices.
  auto x_of = mx::flatten(mx::broadcast_to(mx::reshape(mx::arange(x_rows, mx::int32), x_batch), batch));
  auto expert_of = mx::flatten(mx::broadcast_to(mx::astype(indices, mx::int32), batch));
  const int products = static_cast<int>(x_of.size());
  auto out = mx::array({products, n}, mx::float32,
                       std::make_shared<CpuGatherAffineMatvec>(mx::default_stream(mx::Device::cpu), bits, group_size),
                       {mx::contiguous(mx::reshape(x, {x_rows, k})), mx::contiguous(packed), mx::contiguous(scales),
                        mx::contiguous(biases), mx::contiguous(x_of), mx::contiguous(expert_of)});
  auto shape = batch;
  shape.insert(shape.end(), {1, n});
  return mx::reshape(out, shape);
}

std::optional<mx::array> half_matvec_cpu(const mx::array& x, const mx::array& weight) {
  if (mx::default_device() != mx::Device::cpu || !half_precision(weight.dtype()) || weight.ndim() != 2 ||
      x.ndim() < 1 || x.shape(-1) != weight.shape(1) || x.shape(-1) % 8 != 0 ||
      !mx::issubdtype(x.dtype(), mx::floating)) {
    return std::nullopt;
  }
  auto shape = x.shape();
  shape.back() = weight.shape(0);
  auto y = mx::array(std::move(shape), mx::float32,
                     std::make_shared<CpuHalfMatvec>(mx::default_stream(mx::Device::cpu), weight.dtype()),
                     {mx::contiguous(mx::astype(x, mx::float32)), mx::contiguous(weight)});
  return mx::astype(y, x.dtype());
}

mx::array widened_to_float32(const mx::array& a) {
  if (mx::default_device() != mx::Device::cpu || !half_precision(a.dtype()) || a.size() % 8 != 0 || a.size() == 0) {
    return mx::astype(a, mx::float32);
  }
  return mx::array(a.shape(), mx::float32,
                   std::make_shared<CpuWidenHalf>(mx::default_stream(mx::Device::cpu), a.dtype()), {mx::contiguous(a)});
}

}  // namespace mlxr
