// What the fused CUDA kernels (nn/cuda_norm_rope, nn/cuda_dit_fusion) share: CUDA snippets compiled into their
// sources (a block-wide sum, row loads and stores), and the host-side checks and launch shapes of row kernels.
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>

#include "mlx/fast.h"
#include "nn/weights.h"

namespace mlxr {

// The sum of a float every thread of a block holds, given to every thread. blockDim.x a multiple of 32, at most
// 1,024; every thread of the block calls it. It may be called more than once in a kernel: the second barrier keeps a
// later call from overwriting the warp sums before every thread has read them.
inline constexpr const char* kCudaBlockSum = R"(
__device__ inline float block_sum(float v) {
  __shared__ float warp_sums[32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += warp_sums[w];
  __syncthreads();
  return total;
}
)";

// The tensor-core product our kernels use (nn/cuda_matvec, nn/cuda_decode_attention): mma.sync m16n8k16 with float
// sums, d += a b for a 16 x 16 tile a (row-major, 4 registers of pairs) and a 16 x 8 tile b (2 registers), the
// overload picked by the half type of the last argument. Which lane holds which elements is PTX's fragment layout
// (tests/unit/cuda_emulator.py emulates it).
inline constexpr const char* kCudaMma = R"(
__device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], __nv_bfloat16) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], __half) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
)";

// Asynchronous copies from global to shared memory (nn/cuda_decode_attention's chunk kernel):
// a stage's copies start, the block computes on the stage before, then waits for them.
inline constexpr const char* kCudaAsyncCopies = R"(
// 16 bytes from global to shared memory without passing through registers (cp.async); wait_async_copies waits for
// every copy this thread started (a block's barrier after it, for every thread's).
__device__ __forceinline__ void copy_16_async(void* shared, const void* global) {
  const unsigned to = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(to), "l"(global));
}
// The copies this thread started since the last commit, as one group; wait_async_copies<N> waits until at most N of
// its groups are still in flight (a block's barrier after it, for every thread's).
__device__ __forceinline__ void commit_async_copies() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wait_async_copies() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
)";

// Row kernels: one block per row of n (a multiple of 4), thread t holding the row's elements in quads of 4
// consecutive ones (one 8-byte load of bfloat16): its quad q is elements 4 (t + q blockDim.x) .. + 3, its held slot k
// element held_index(k); PER_THREAD slots in registers. Every load comes before any store (a store may alias a
// later load, so the compiler cannot move loads above it: a kernel that stored as it went was latency-bound, 14 us
// for a 4,096-wide row on an H200), and quads rather than single elements: the Z-Image step's row kernels read and
// wrote 0.9-1.4 TB/s element by element. For the same reason a kernel loads everything it reads (the row, the
// weights, the per-sample vectors) before its first reduction: loads issued after a block_sum wait behind its
// barriers, one DRAM round trip per phase.
inline constexpr const char* kCudaRowHelpers = R"(
__device__ inline int held_index(int k) {
  return 4 * (threadIdx.x + (k >> 2) * blockDim.x) + (k & 3);
}

template <typename T>
struct alignas(4 * sizeof(T)) Quad {
  T e[4];
};

// Elements j .. j + 3 of p (j a multiple of 4); element by element where p is not aligned to a quad.
template <typename T>
__device__ inline Quad<T> load_quad(const T* p, int j) {
  if (reinterpret_cast<unsigned long long>(p) % sizeof(Quad<T>) == 0) return reinterpret_cast<const Quad<T>*>(p + j)[0];
  Quad<T> q;
#pragma unroll
  for (int e = 0; e < 4; ++e) q.e[e] = p[j + e];
  return q;
}

template <typename T>
__device__ inline void store_quad(T* p, int j, const Quad<T>& q) {
  if (reinterpret_cast<unsigned long long>(p) % sizeof(Quad<T>) == 0) {
    reinterpret_cast<Quad<T>*>(p + j)[0] = q;
    return;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) p[j + e] = q.e[e];
}

// Loads this thread's elements of a row of n into v (0 past its end); returns their sum of squares.
template <int PER_THREAD, typename In>
__device__ inline float load_row(const In* row, int n, float (&v)[PER_THREAD]) {
  float squares = 0.f;
#pragma unroll
  for (int k = 0; k < PER_THREAD; k += 4) {
    const int j = held_index(k);
    const Quad<In> q = j < n ? load_quad(row, j) : Quad<In>{};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      v[k + e] = j < n ? static_cast<float>(q.e[e]) : 0.f;
      squares += v[k + e] * v[k + e];
    }
  }
  return squares;
}

// This thread's elements of a vector of n (a weight, or a per-sample vector read every `step` elements), in T.
template <int PER_THREAD, typename T>
__device__ inline void load_row_vector(T (&out)[PER_THREAD], const T* vector, long long step, int n) {
#pragma unroll
  for (int k = 0; k < PER_THREAD; k += 4) {
    const int j = held_index(k);
    if (j >= n) continue;
    if (step == 1) {
      const Quad<T> q = load_quad(vector, j);
#pragma unroll
      for (int e = 0; e < 4; ++e) out[k + e] = q.e[e];
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) out[k + e] = vector[(j + e) * step];
    }
  }
}

// MLX's rms_norm of a held row: weight * (the row times the normalizer, rounded to T), in T; held as floats (exact).
// The weight's elements are held too (load_row_vector), loaded before the row's reduction like everything a kernel
// reads.
template <int PER_THREAD, typename T>
__device__ inline void norm_row(float (&out)[PER_THREAD], const float (&v)[PER_THREAD], int n, float normalizer,
                                const T (&w)[PER_THREAD]) {
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) {
    out[k] = held_index(k) < n ? static_cast<float>(w[k] * static_cast<T>(v[k] * normalizer)) : 0.f;
  }
}

// Stores this thread's held values (floats holding T values) to a row of n.
template <int PER_THREAD, typename T>
__device__ inline void store_held_row(T* row, const T (&v)[PER_THREAD], int n) {
#pragma unroll
  for (int k = 0; k < PER_THREAD; k += 4) {
    const int j = held_index(k);
    if (j >= n) continue;
    Quad<T> q;
#pragma unroll
    for (int e = 0; e < 4; ++e) q.e[e] = v[k + e];
    store_quad(row, j, q);
  }
}

// The norm times a scale, in T, stored; the weight and the scale held.
template <int PER_THREAD, typename T>
__device__ inline void store_scaled_norm(T* out, const float (&v)[PER_THREAD], int n, float normalizer,
                                         const T (&w)[PER_THREAD], const T (&scale)[PER_THREAD]) {
  float normed[PER_THREAD];
  norm_row(normed, v, n, normalizer, w);
  T scaled[PER_THREAD];
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) scaled[k] = static_cast<T>(normed[k]) * scale[k];
  store_held_row(out, scaled, n);
}

// A residual, h = x + gate * term (the product and the sum in T, as MLX's multiply and add round them), for this
// thread's elements of x and the gate, held: stored, and held in v (0 past the row's end). term holds T values as
// floats. Returns the sum of squares of v (the next norm's).
template <int PER_THREAD, typename T>
__device__ inline float store_residual(T* h, float (&v)[PER_THREAD], const float (&xv)[PER_THREAD],
                                       const T (&g)[PER_THREAD], const float (&term)[PER_THREAD], int n) {
  T sum[PER_THREAD];
  float squares = 0.f;
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) {
    sum[k] = static_cast<T>(xv[k]) + g[k] * static_cast<T>(term[k]);
    v[k] = held_index(k) < n ? static_cast<float>(sum[k]) : 0.f;
    squares += v[k] * v[k];
  }
  store_held_row(h, sum, n);
  return squares;
}
)";

inline constexpr int kCudaMaxPerThread = 32;  // elements a thread of a row kernel holds in registers

// The dtypes our row kernels take: float32 and the half-precision types.
inline bool cuda_float_dtype(mx::Dtype dtype) {
  return dtype == mx::float32 || half_precision(dtype);
}

// Whether the environment variable `name` is "0": the switches that turn a fused kernel off, to measure what it
// gains (MLXRUNNER_DIT_FUSION, MLXRUNNER_QKV_HEADS, MLXRUNNER_BATCH_ATTENTION). Callers keep it in an EnvSwitch.
inline bool switched_off(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::strcmp(value, "0") == 0;
}

// Whether it is "1": the measuring switches that turn a way not yet proven on a GPU on (MLXRUNNER_HALF_MATVEC,
// MLXRUNNER_KERNEL_SOURCES_BY_PATH: both measured slower on the H200 in session 14). Kept in an EnvSwitch, too.
inline bool switched_on(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::strcmp(value, "1") == 0;
}

// The number the environment variable `name` holds, or `unset` where it is not set: the switches that tune a count
// (MLXRUNNER_EARLY_DISPATCH, MLXRUNNER_CHUNK_BLOCKS). Kept in an EnvSwitch, too.
inline long long switch_number(const char* name, long long unset) {
  const char* value = std::getenv(name);
  return value == nullptr ? unset : std::atoll(value);
}

// How many times reread_switches() has run: an EnvSwitch that read its variable before the last call reads it again.
inline std::atomic<int> switches_generation{0};

// Makes every EnvSwitch read its environment variable again at its next use, so that a benchmark can time two
// settings of a switch in one process (the binding `reread_switches`; benchmarks/gpu/follow_up_slack.py
// --same-process): the scatter between processes on one GPU is larger than what one operation a layer changes. Where a
// caller keeps what a switch chose (a kernel object built once), the change reaches only what is built after it.
inline void reread_switches() {
  switches_generation.fetch_add(1, std::memory_order_acq_rel);
}

// One environment switch, read at its first use and kept until reread_switches(): off() where it is "0", on() where it
// is "1", number() its value as a number (`unset` where it is not set). Call sites hold it in a function's static.
class EnvSwitch {
 public:
  EnvSwitch(const char* name, long long unset) : name_(name), unset_(unset) {}
  explicit EnvSwitch(const char* name) : EnvSwitch(name, 0) {}
  bool off() { return refreshed().off_.load(std::memory_order_relaxed); }
  bool on() { return refreshed().on_.load(std::memory_order_relaxed); }
  long long number() { return refreshed().number_.load(std::memory_order_relaxed); }

 private:
  EnvSwitch& refreshed() {
    const int now = switches_generation.load(std::memory_order_acquire);
    if (seen_.load(std::memory_order_acquire) == now) return *this;
    std::lock_guard<std::mutex> lock(mutex_);
    if (seen_.load(std::memory_order_relaxed) != now) {
      off_.store(switched_off(name_), std::memory_order_relaxed);
      on_.store(switched_on(name_), std::memory_order_relaxed);
      number_.store(switch_number(name_, unset_), std::memory_order_relaxed);
      seen_.store(now, std::memory_order_release);
    }
    return *this;
  }
  const char* name_;
  long long unset_;
  std::mutex mutex_;
  std::atomic<int> seen_{-1};
  std::atomic<bool> off_{false}, on_{false};
  std::atomic<long long> number_{0};
};

// A float as the int of its bits (template arguments are ints).
inline int cuda_float_bits(float value) {
  return std::bit_cast<int>(value);
}

inline int cuda_checked_threads(long long threads) {
  if (threads > std::numeric_limits<int>::max()) throw std::invalid_argument("fused kernel: tensor too large");
  return static_cast<int>(threads);
}

// A row kernel's launch: one block per row, 256 threads for rows up to 8,192 wide (hidden sizes of up to 8B-class
// models), 1,024 beyond, each thread holding per_thread elements (the kernels' PER_THREAD; whole quads for the
// kCudaRowHelpers kernels, `in_quads`, which need n a multiple of 4); nullopt where a row would need more than
// kCudaMaxPerThread elements a thread (over 32,768).
struct CudaRowLaunch {
  int per_thread;
  std::tuple<int, int, int> grid, block;
};

inline std::optional<CudaRowLaunch> cuda_row_launch(long long rows, int n, bool in_quads = false) {
  if (in_quads && n % 4 != 0) return std::nullopt;
  const int threads = n <= 256 * kCudaMaxPerThread ? 256 : 1024;
  const int quantum = in_quads ? 4 : 1;  // a thread holds whole quads
  const int per_thread = (n + threads * quantum - 1) / (threads * quantum) * quantum;
  if (per_thread > kCudaMaxPerThread) return std::nullopt;
  return CudaRowLaunch{
      .per_thread = per_thread, .grid = {cuda_checked_threads(rows * threads), 1, 1}, .block = {threads, 1, 1}};
}

// A kCudaRowHelpers kernel's launch with a thread per quad of the row (up to 1,024 threads, then more quads a
// thread): for kernels that run on few rows, a decode step's, where a block's latency is the kernel's time and more
// threads put more loads in flight at once. nullopt where n is not a multiple of 4 or a row would need more than
// kCudaMaxPerThread elements a thread.
inline std::optional<CudaRowLaunch> cuda_quad_row_launch(long long rows, int n) {
  if (n % 4 != 0) return std::nullopt;
  const int quads = n / 4;
  const int threads = std::min(1024, (quads + 31) / 32 * 32);
  const int per_thread = (quads + threads - 1) / threads * 4;
  if (per_thread > kCudaMaxPerThread) return std::nullopt;
  return CudaRowLaunch{
      .per_thread = per_thread, .grid = {cuda_checked_threads(rows * threads), 1, 1}, .block = {threads, 1, 1}};
}

// A kernel's source (or header) as MLX is handed it: without comments, indentation or blank lines, and with every
// `#if NAME` ... [`#else` ...] `#endif` whose NAME is in `switches` resolved to the branch it selects (other
// preprocessor lines are kept). MLX 0.32 rebuilds a custom kernel's whole source at every call and hashes it to name
// the compiled module: ~4 us of host time per 10 KB on the H200 machine, where a 4-bit decode step launches ~140 of
// our kernels; the commented source of the decode product, all its variants included, was 16 KB.
std::string compact_kernel_source(std::string_view source, const std::map<std::string, bool>& switches = {});

// What MLX is handed in place of a kernel source that is written to a file of its own: the one line that #includes
// it by its absolute path, after a mention of each of `inputs`' shape, strides and ndim that the source uses (MLX
// passes those only where the source it is given names them). The file, named by the source's hash, goes to a
// directory this process made for itself (mode 0700, removed at exit). MLX then rebuilds and hashes a few hundred bytes
// at each call instead of the whole source; whether MLX's NVRTC takes the include, and what it saves, is for
// benchmarks/gpu/op_cost.py to measure, so this is behind MLXRUNNER_KERNEL_SOURCES_BY_PATH=1 (off unless set).
std::string kernel_source_included(const std::string& source, const std::vector<std::string>& inputs = {});

// mx::fast::cuda_kernel with its source and header compacted (compact_kernel_source, the same switches for both), and
// both #included from files under MLXRUNNER_KERNEL_SOURCES_BY_PATH=1 (kernel_source_included): the switch is looked at
// on each call, so the kernels kept in statics follow reread_switches.
mx::fast::CustomKernelFunction cuda_kernel(const std::string& name, const std::vector<std::string>& inputs,
                                           const std::vector<std::string>& outputs, std::string_view source,
                                           std::string_view header = "", bool ensure_row_contiguous = true,
                                           const std::map<std::string, bool>& switches = {});

}  // namespace mlxr
