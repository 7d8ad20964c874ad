#include "nn/cuda_rows_product.h"

#include <algorithm>
#include <string>

#include "mlx/fast.h"
#include "nn/cuda_kernel_common.h"

namespace mlxr {

namespace {

// The shapes the kernel source fixes (the source restates them as constants).
constexpr int kTile = 128;     // rows of W a block multiplies (gated: 64 gate rows and their 64 up rows)
constexpr int kStep = 64;      // K a pipeline stage holds: a whole 128-byte line of each row
constexpr int kThreads = 128;  // four warps, 32 of the tile's W rows each
constexpr int kStages = 4;
constexpr int kRows = 64;  // rows of x a stage holds
// W's and x's stage tiles, rows padded by 8 elements (so that ldmatrix's eight rows fall in different banks).
constexpr int kSharedBytes = kStages * (kTile + kRows) * (kStep + 8) * 2;

// The blocks an H100/H200 holds at once: 132 SMs, two blocks each (108 KB of shared memory a block). A product's
// splits fill them without a second wave: at 288 blocks of a form that fitted 264, every split product took nearly
// two waves' time.
constexpr int kResidentBlocks = 264;
// The most splits: each adds a 32 KB partial tile that the tile's last block reads back alone.
constexpr int kMostSplits = 8;
// A split's fewest pipeline steps: below that, filling the pipeline costs more than the extra blocks gain.
constexpr int kFewestStepsASplit = 4;

// What the emulated test (tests/unit/test_rows_product_kernel.py) replaces: MLX's element-wise functors' headers.
constexpr const char* kRowsProductIncludes = R"(
#include "mlx/backend/cuda/device/binary_ops.cuh"
#include "mlx/backend/cuda/device/unary_ops.cuh"
)";

// The kernel's device functions: ldmatrix and the zero-filling copy (the rest comes from kCudaMma and
// kCudaAsyncCopies), 8 floats stored as one 16-byte vector of T, and a read that skips the SM's L1 (another block's
// partial sums).
constexpr const char* kRowsProductHelpers = R"(
namespace mlxr_rows {
// Four 8 x 8 tiles of 2-byte elements from shared memory (ldmatrix .x4): lanes 8 m .. 8 m + 7 give the addresses of
// tile m's rows, 16 bytes each, and lane l receives, in register m, tile m's elements (l / 4, 2 (l % 4)) and
// (l / 4, 2 (l % 4) + 1): an mma A operand's quarter, or a B operand's half where the rows are B's columns.
__device__ __forceinline__ void load_tiles(unsigned (&r)[4], const void* row) {
  const unsigned at = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(at));
}
// copy_16_async, or 16 zero bytes where `real` is false (a row of x past its last: the global address is not read).
__device__ __forceinline__ void copy_16_async_or_zero(void* shared, const void* global, bool real) {
  const unsigned to = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(to), "l"(global), "r"(real ? 16 : 0));
}
__device__ __forceinline__ float4 load_coherent(const float* p) {
  return __ldcg(reinterpret_cast<const float4*>(p));
}
}  // namespace mlxr_rows
)";

// x [rows, K] times W^T, W [N, K] (gated: silu of the first N / 2 columns times the last), on 128-row tiles of W.
// Block b multiplies tile b / splits over its split's share of K (splits = blocks / tiles). A stage of the pipeline
// (in dynamic shared memory: four stages are 108 KB, two blocks an SM) holds 64 of K (a whole 128-byte line of each
// row) for the tile's 128 W rows and x's 64 rows, padded by 8 elements a row so that ldmatrix's eight rows fall in
// different banks. Warp w multiplies W rows 32 w .. + 31 by x's rows: per 16 of K, two A operands (W) and an ldmatrix
// of x per 16 rows give 4 mma.sync m16n8k16 a 16 rows, the product's transpose (W rows as the mma's rows, x's rows as
// its columns) so that any of 9..64 rows of x fits 8-row columns (16-row groups past x's last are skipped). 128 W
// rows a block (not 64) halve how often every block reads x again from L2: at 64, x's reads from L2 equalled W's from
// memory and the vocabulary head ran at 2.0 TB/s against cuBLAS's 2.65 (H100). Split K's partial tiles go to
// `partials`, where the tile's last block to finish (a counter per tile) adds them in split order.
constexpr const char* kRowsProductSource = R"(
  using namespace mlxr_rows;
  constexpr int kTile = 128, kRows = 64, kStep = 64, kStages = 4;
  constexpr int kPitch = kStep + 8;     // elements a stage row holds
  constexpr int kSumPitch = kTile + 4;  // floats a row of the summed tile holds
  extern __shared__ __align__(16) unsigned char smem[];  // kStages stages of W's tile, then of x's
  __shared__ int finishing;
  T (*w_tile)[kTile][kPitch] = reinterpret_cast<T (*)[kTile][kPitch]>(smem);
  T (*x_tile)[kRows][kPitch] = reinterpret_cast<T (*)[kRows][kPitch]>(smem + kStages * kTile * kPitch * sizeof(T));
  float (*sums)[kSumPitch] = reinterpret_cast<float (*)[kSumPitch]>(smem);  // after the pipeline: its space reused

  const int k = x_shape[x_ndim - 1];
  int rows = 1;
  for (int i = 0; i + 1 < x_ndim; ++i) rows *= x_shape[i];
  const int outputs = GATED ? w_shape[0] / 2 : w_shape[0];
  const int tiles = GATED ? outputs / (kTile / 2) : outputs / kTile;
  const int splits = gridDim.x / tiles;
  const int tile = blockIdx.x / splits, split = blockIdx.x % splits;
  const int k_steps = k / kStep;
  const int first_step = split * k_steps / splits;
  const int steps = (split + 1) * k_steps / splits - first_step;
  const int thread = threadIdx.x, lane = thread & 31, warp = thread >> 5;
  const int warp_rows = 32 * warp;
  const int row_groups = (rows + 15) / 16;  // x's 16-row groups holding rows

  // This thread's rows of each stage (16 apart: eight of W, four of x) and its 16-byte chunk of them. Row r of the
  // tile in W: a gated tile's rows 0..63 are gate rows, 64..127 the up rows of the same outputs.
  const int part = 8 * (thread & 7), first_row = thread >> 3;
  const long long tile_first = GATED ? static_cast<long long>(tile) * (kTile / 2) : static_cast<long long>(tile) * kTile;
  auto w_row = [&](int r) -> long long {
    return GATED && r >= kTile / 2 ? outputs + tile_first + r - kTile / 2 : tile_first + r;
  };
  auto load_stage = [&](int buffer, int step) {
    const long long at = static_cast<long long>(step) * kStep + part;
    for (int r = first_row; r < kTile; r += 16) copy_16_async(&w_tile[buffer][r][part], w + w_row(r) * k + at);
    for (int r = first_row; r < kRows; r += 16) {
      copy_16_async_or_zero(&x_tile[buffer][r][part], x + static_cast<long long>(r < rows ? r : 0) * k + at, r < rows);
    }
  };

  float acc[2][8][4];
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][j][e] = 0.f;
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load_stage(s, first_step + s);
    commit_async_copies();
  }
  for (int i = 0; i < steps; ++i) {
    wait_async_copies<kStages - 2>();
    __syncthreads();  // stage i is in for every thread, and every warp is done with the buffer refilled next
    if (i + kStages - 1 < steps) load_stage((i + kStages - 1) % kStages, first_step + i + kStages - 1);
    commit_async_copies();
    const int buffer = i % kStages;
#pragma unroll
    for (int kk = 0; kk < kStep; kk += 16) {
      unsigned a[2][4];
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        load_tiles(a[m], &w_tile[buffer][warp_rows + 16 * m + (lane & 15)][kk + 8 * (lane >> 4)]);
      }
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        if (p < row_groups) {  // the same for the whole warp; unrolled, so that the sums stay in registers
          unsigned b[4];
          load_tiles(b, &x_tile[buffer][16 * p + (lane & 7) + 8 * (lane >> 4)][kk + 8 * ((lane >> 3) & 1)]);
          const unsigned first[2] = {b[0], b[1]}, second[2] = {b[2], b[3]};
#pragma unroll
          for (int m = 0; m < 2; ++m) {
            mma(acc[m][2 * p], a[m], first, T());
            mma(acc[m][2 * p + 1], a[m], second, T());
          }
        }
      }
    }
  }
  wait_async_copies<0>();
  __syncthreads();  // the pipeline's buffers are free for the sums

  // sums[x row][tile row]
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) sums[8 * j + 2 * t + (e & 1)][warp_rows + 16 * m + g + 8 * (e >> 1)] = acc[m][j][e];
  __syncthreads();

  if (splits > 1) {
    // 4 floats a thread at a time: rows x 32 quads of the tile
    float* tile_parts = partials + static_cast<long long>(tile) * splits * kRows * kTile;
    for (int i = thread; i < rows * (kTile / 4); i += blockDim.x) {
      const int r = i / (kTile / 4), c = 4 * (i % (kTile / 4));
      *reinterpret_cast<float4*>(tile_parts + split * kRows * kTile + r * kTile + c) =
          *reinterpret_cast<const float4*>(&sums[r][c]);
    }
    __threadfence();
    __syncthreads();
    if (thread == 0) {
      finishing = atomicAdd(const_cast<int*>(counters) + tile, 1) == splits - 1;
      if (finishing) next_counters[tile] = 0;  // the next product's counter for this tile
    }
    __syncthreads();
    if (!finishing) return;
    __threadfence();
    for (int i = thread; i < rows * (kTile / 4); i += blockDim.x) {
      const int r = i / (kTile / 4), c = 4 * (i % (kTile / 4));
      float4 total = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int s = 0; s < splits; ++s) {
        const float4 v = load_coherent(tile_parts + s * kRows * kTile + r * kTile + c);
        total.x += v.x;
        total.y += v.y;
        total.z += v.z;
        total.w += v.w;
      }
      *reinterpret_cast<float4*>(&sums[r][c]) = total;
    }
    __syncthreads();
  }

  // Out: 8 columns a thread at a time, one 16-byte store.
  constexpr int kColumns = GATED ? kTile / 2 : kTile;
  for (int i = thread; i < rows * (kColumns / 8); i += blockDim.x) {
    const int r = i / (kColumns / 8), c = 8 * (i % (kColumns / 8));
    unsigned words[4];
    for (int e = 0; e < 4; ++e) {
      T pair[2];
      for (int h = 0; h < 2; ++h) {
        const int column = c + 2 * e + h;
        if (GATED) {  // the product rounded to T, then silu(gate) * up as MLX's functors compute it
          const T gate = static_cast<T>(sums[r][column]), up = static_cast<T>(sums[r][column + kTile / 2]);
          pair[h] = mlx::core::cu::Multiply{}(mlx::core::cu::Multiply{}(gate, mlx::core::cu::Sigmoid{}(gate)), up);
        } else {
          pair[h] = static_cast<T>(sums[r][column]);
        }
      }
      words[e] = *reinterpret_cast<const unsigned short*>(&pair[0]) |
                 (static_cast<unsigned>(*reinterpret_cast<const unsigned short*>(&pair[1])) << 16);
    }
    *reinterpret_cast<uint4*>(out + static_cast<long long>(r) * outputs + tile * kColumns + c) =
        make_uint4(words[0], words[1], words[2], words[3]);
  }
)";

// A weight of at most this many elements is "small" for MLXRUNNER_ROWS_PRODUCT=small: a Qwen3-4B layer's q|k|v (15.7 M)
// and o (10.5 M), not its down (24.9 M) or gate|up.
constexpr long long kSmallWeightElements = 16LL * 1024 * 1024;

// Whether the kernel takes this product (the gated variant takes the same cases: its tiles are 64 gate and 64 up rows).
bool kernel_takes(const mx::array& x, const mx::array& w) {
  if (!running_on_cuda() || !half_precision(x.dtype()) || w.dtype() != x.dtype() || w.ndim() != 2 ||
      !w.flags().row_contiguous || !w.is_available() || x.ndim() < 1) {
    return false;
  }
  const long long rows = static_cast<long long>(x.size()) / std::max(1, x.shape(-1));
  const int k = x.shape(-1), n = w.shape(0);
  return rows >= kRowsProductFewest && rows <= kRowsProductMost && w.shape(1) == k && k % kStep == 0 && n % kTile == 0;
}

mx::array product(const mx::array& x, const mx::array& w, bool gated, RowsProductCounters& counters) {
  static const auto kernel =
      cuda_kernel("mlxr_rows_product", {"x", "w", "counters"}, {"out", "partials", "next_counters"}, kRowsProductSource,
                  std::string(kRowsProductIncludes) + kCudaMma + kCudaAsyncCopies + kRowsProductHelpers,
                  /*ensure_row_contiguous=*/true, {}, kSharedBytes);
  const int outputs = gated ? w.shape(0) / 2 : w.shape(0);
  const int tiles = gated ? outputs / (kTile / 2) : outputs / kTile;
  const int splits = rows_product_splits(tiles, x.shape(-1) / kStep);
  auto shape = x.shape();
  shape.back() = outputs;
  const bool split = splits > 1;
  // Without splits the kernel reads no counters and writes no partial sums: one-element stand-ins.
  static const auto* unread =
      new mx::array(mx::zeros({1}, mx::int32));  // never freed: no static destructor after MLX's
  const mx::Shape partials_shape = split ? mx::Shape{tiles, splits, kRows * kTile} : mx::Shape{1};
  auto outputs_made = kernel({x, w, split ? counters.take(tiles) : *unread},
                             {shape, partials_shape, {split ? tiles : 1}}, {x.dtype(), mx::float32, mx::int32},
                             {cuda_checked_threads(static_cast<long long>(tiles) * splits * kThreads), 1, 1},
                             {kThreads, 1, 1}, {{"T", x.dtype()}, {"GATED", gated}}, std::nullopt, false, {});
  if (split) counters.hand_on(outputs_made[2]);
  return outputs_made[0];
}

}  // namespace

int rows_product_splits(int tiles, int k_steps) {
  const int wanted = std::min(kResidentBlocks / tiles, kMostSplits);
  return std::clamp(std::min(wanted, k_steps / kFewestStepsASplit), 1, std::max(1, k_steps));
}

mx::array RowsProductCounters::take(int tiles) {
  std::lock_guard lock(guard_);
  if (next_ && next_->size() == static_cast<size_t>(tiles)) return *next_;
  return mx::zeros({tiles}, mx::int32);
}

void RowsProductCounters::hand_on(mx::array next) {
  std::lock_guard lock(guard_);
  next_ = std::move(next);
}

bool rows_product_switched_on(const mx::array& w, bool gated) {
  enum class Mode { kOff, kAll, kGated, kSmall };
  static const Mode mode = [] {
    const char* value = std::getenv("MLXRUNNER_ROWS_PRODUCT");
    const std::string set = value ? value : "";
    return set == "1" ? Mode::kAll : set == "gated" ? Mode::kGated : set == "small" ? Mode::kSmall : Mode::kOff;
  }();
  switch (mode) {
    case Mode::kAll:
      return true;
    case Mode::kGated:
      return gated;
    case Mode::kSmall:
      return !gated && static_cast<long long>(w.size()) <= kSmallWeightElements;
    case Mode::kOff:
      break;
  }
  return false;
}

std::optional<mx::array> cuda_rows_product(const mx::array& x, const mx::array& w, RowsProductCounters& counters) {
  if (!kernel_takes(x, w)) return std::nullopt;
  return product(x, w, /*gated=*/false, counters);
}

std::optional<mx::array> cuda_rows_swiglu(const mx::array& x, const mx::array& w, RowsProductCounters& counters) {
  if (!kernel_takes(x, w)) return std::nullopt;
  return product(x, w, /*gated=*/true, counters);
}

}  // namespace mlxr
