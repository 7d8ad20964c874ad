#include "nn/cuda_rows_product.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

#include "mlx/fast.h"
#include "nn/cuda_kernel_common.h"
#include "nn/slicing.h"

namespace mlxr {

namespace {

// A stage's 16-byte pieces go from global to shared memory by cp.async (kCudaAsyncCopies) where both operands are
// 16-byte aligned (a weight's rows are; a view of x may not be), element by element otherwise.
constexpr const char* kRowsProductHelpers = R"(
namespace mlxr_rows {
template <typename T>
__device__ __forceinline__ void stage_piece(T* shared, const T* global, bool aligned) {
  if (aligned) {
    copy_16_async(shared, global);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) shared[e] = global[e];
  }
}
}  // namespace mlxr_rows
)";

// out [rows, N] = x [rows, K] W^T. Block b takes weight tile b % tiles (64 rows: warp w its rows 16 w .. 16 w + 15,
// the A tile of mma.sync m16n8k16) and K split b / tiles; x's rows are the B tiles (8 a tile, up to 8). The stages
// live in dynamic shared memory (the host sizes it: kStages x (64 weight rows + x's rows rounded up to 8) rows of kRow
// elements), so that a stage can be 64 columns deep: a block then has three 8 KB weight stages in flight, where a
// 48 KB static stage set held 4 KB ones and the card's memory went a third idle (session 28: 0.5-1.7 TB/s against
// cuBLAS's 1.7-2.8). Staged rows hold 72 elements (144 bytes), so the fragments' 4-byte reads (lane: row g = lane / 4,
// pair t = lane % 4) fall in 32 different banks. A warp's sums d_i are (weight row g + 8 (i / 2), x row 2 t + (i % 2))
// of its tile. Split blocks write float partials [split, rows, N], then count themselves in `counters` (one int a
// tile, zero between launches); the last to arrive sums the splits in split order, writes out and sets the count back
// to zero.
constexpr const char* kRowsProductSource = R"(
  using namespace mlxr_rows;
  constexpr int kTile = 64, kStep = 64, kStages = 4, kRow = kStep + 8, kPieces = kStep / 8;
  extern __shared__ __align__(16) unsigned char rows_shared[];
  __shared__ int arrived;
  const int N = w_shape[0], K = w_shape[1];
  long long row_count = 1;
  for (int i = 0; i + 1 < x_ndim; ++i) row_count *= x_shape[i];
  const int rows = static_cast<int>(row_count);  // 8 (XT - 1) < rows <= 8 XT
  T* const ws = reinterpret_cast<T*>(rows_shared);  // [kStages][kTile][kRow], then x's [kStages][8 XT][kRow]
  T* const xs = ws + kStages * kTile * kRow;
  const int tiles = N / kTile, splits = gridDim.x / tiles;  // the host launches tiles x splits blocks
  const int tile = blockIdx.x % tiles, split = blockIdx.x / tiles;
  const int steps = K / kStep, per_split = (steps + splits - 1) / splits;
  const int first = split * per_split, last = min(steps, first + per_split);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const bool aligned = ((reinterpret_cast<unsigned long long>(x) | reinterpret_cast<unsigned long long>(w)) & 15) == 0;
  const T* w_tile = w + static_cast<long long>(tile) * kTile * K;
  auto stage_in = [&](int step, int stage) {
    const long long k = static_cast<long long>(step) * kStep;
    T* w_stage = ws + stage * kTile * kRow;
    T* x_stage = xs + stage * 8 * XT * kRow;
    for (int p = threadIdx.x; p < kTile * kPieces; p += blockDim.x) {
      const int row = p / kPieces, piece = p % kPieces;
      stage_piece(w_stage + row * kRow + piece * 8, w_tile + row * static_cast<long long>(K) + k + piece * 8, aligned);
    }
    for (int p = threadIdx.x; p < rows * kPieces; p += blockDim.x) {
      const int row = p / kPieces, piece = p % kPieces;
      stage_piece(x_stage + row * kRow + piece * 8, x + row * static_cast<long long>(K) + k + piece * 8, aligned);
    }
    commit_async_copies();
  };
  float acc[XT][4];
#pragma unroll
  for (int j = 0; j < XT; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
  }
  for (int s = 0; s < kStages - 1; ++s) {
    if (first + s < last) stage_in(first + s, s);
    else commit_async_copies();
  }
  for (int step = first; step < last; ++step) {
    wait_async_copies<kStages - 2>();
    __syncthreads();  // this step's stage is in, and every warp is done with the stage the next copies go to
    const int ahead = step + kStages - 1;
    if (ahead < last) stage_in(ahead, (ahead - first) % kStages);
    else commit_async_copies();
    const int stage = (step - first) % kStages;
    const T* w_stage = ws + stage * kTile * kRow;
    const T* x_stage = xs + stage * 8 * XT * kRow;
#pragma unroll
    for (int kk = 0; kk < kStep; kk += 16) {
      const T* a_at = w_stage + (16 * warp + g) * kRow + kk + 2 * t;
      const unsigned a[4] = {*reinterpret_cast<const unsigned*>(a_at), *reinterpret_cast<const unsigned*>(a_at + 8 * kRow),
                             *reinterpret_cast<const unsigned*>(a_at + 8),
                             *reinterpret_cast<const unsigned*>(a_at + 8 * kRow + 8)};
#pragma unroll
      for (int j = 0; j < XT; ++j) {
        // rows of x past `rows` in the last tile: their stage rows hold whatever was there; their sums are not kept
        const T* b_at = x_stage + (8 * j + g) * kRow + kk + 2 * t;
        const unsigned b[2] = {*reinterpret_cast<const unsigned*>(b_at), *reinterpret_cast<const unsigned*>(b_at + 8)};
        mma(acc[j], a, b, T{});
      }
    }
  }
  const int n_first = tile * kTile + 16 * warp + g;
  // Each sum this thread holds: f(its offset in out [rows, N], its value).
  auto each_sum = [&](auto&& f) {
#pragma unroll
    for (int j = 0; j < XT; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = 8 * j + 2 * t + (i & 1);
        if (r < rows) f(static_cast<long long>(r) * N + n_first + 8 * (i >> 1), acc[j][i]);
      }
    }
  };
  if (splits == 1) {
    each_sum([&](long long at, float sum) { out[at] = static_cast<T>(sum); });
    return;
  }
  float* part = partials + static_cast<long long>(split) * rows * N;
  each_sum([&](long long at, float sum) { part[at] = sum; });
  __threadfence();
  __syncthreads();
  int* count = const_cast<int*>(counters) + tile;
  if (threadIdx.x == 0) arrived = atomicAdd(count, 1);
  __syncthreads();
  if (arrived != splits - 1) return;
  __threadfence();
  // The tile's rows x 64 outputs, a thread a column of consecutive threads (the partials' reads coalesce), the splits
  // summed in order.
  for (int o = threadIdx.x; o < rows * kTile; o += blockDim.x) {
    const long long at = static_cast<long long>(o / kTile) * N + tile * kTile + o % kTile;
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) sum += __ldcg(partials + static_cast<long long>(s) * rows * N + at);
    out[at] = static_cast<T>(sum);
  }
  if (threadIdx.x == 0) *count = 0;
)";

constexpr int kTileRows = 64;                 // weight rows a block (kTile)
constexpr int kStepColumns = 64;              // columns a pipeline stage (kStep)
constexpr int kStages = 4;                    // pipeline stages (kStages)
constexpr int kStagedRow = kStepColumns + 8;  // elements a staged row holds (kRow)
constexpr int kBlocksWanted = 264;  // two blocks an SM of an H100 (132 SMs); MLXRUNNER_ROWS_PRODUCT_BLOCKS sets it
constexpr int kMinStepsASplit = 4;  // a split's pipeline still fills its four stages
constexpr int kThreads = 128;       // four warps

// One int a tile of weight `w`, zero between launches (each tile's last block sets its count back), kept for the
// process. One set a weight, found by its buffer (a model's weights are evaluated at load; the buffer's handle, not
// its data pointer, which on CUDA would move it to unified memory): two products that share no data (multi-head
// latent attention's q and kv projections of one input) may run at once in one CUDA graph. Made from host data, so
// that they are a real buffer (MLX's zeros is a broadcast scalar, which the kernel's row-contiguous inputs would copy
// at every call).
const mx::array& tile_counters(const mx::array& w, int tiles) {
  static std::mutex guard;
  static std::map<std::uintptr_t, mx::array> made;
  std::lock_guard lock(guard);
  const auto key = w.is_available() ? reinterpret_cast<std::uintptr_t>(w.buffer().ptr()) : w.id();
  auto found = made.find(key);
  if (found == made.end() || found->second.size() != static_cast<size_t>(tiles)) {
    const std::vector<int32_t> zeros(tiles, 0);
    auto counters = mx::array(zeros.begin(), {tiles}, mx::int32);
    mx::eval(counters);
    found = made.insert_or_assign(key, std::move(counters)).first;
  }
  return found->second;
}

// The kernel for x_tiles 8-row tiles of x (XT): its stages' shared memory sized for them, so that a few rows leave
// room for more blocks an SM. Each XT is its own source (a template argument), so MLX loads each with its own limit.
const mx::fast::CustomKernelFunction& rows_product_kernel(int x_tiles) {
  static const auto kernels = [] {
    std::vector<mx::fast::CustomKernelFunction> made;
    for (int xt = 1; xt <= kMaxRowsProductRows / 8; ++xt) {
      const int shared_bytes = kStages * (kTileRows + 8 * xt) * kStagedRow * 2;  // half-precision elements
      made.push_back(cuda_kernel("mlxr_rows_product", {"x", "w", "counters"}, {"out", "partials"}, kRowsProductSource,
                                 std::string(kCudaMma) + kCudaAsyncCopies + kRowsProductHelpers,
                                 /*ensure_row_contiguous=*/true, {}, shared_bytes));
    }
    return made;
  }();
  return kernels[x_tiles - 1];
}

}  // namespace

bool rows_product_switched_on() {
  static const bool on = switched_on("MLXRUNNER_ROWS_PRODUCT");
  return on;
}

int rows_product_splits(int n, int k) {
  const int tiles = n / kTileRows, steps = k / kStepColumns;
  static const int blocks =
      static_cast<int>(std::max(1LL, switch_number("MLXRUNNER_ROWS_PRODUCT_BLOCKS", kBlocksWanted)));
  const int wanted = (blocks + tiles - 1) / tiles;
  return std::clamp(wanted, 1, std::max(1, steps / kMinStepsASplit));
}

std::optional<mx::array> cuda_rows_product(const mx::array& x, const mx::array& w) {
  if (!running_on_cuda() || !half_precision(x.dtype()) || w.dtype() != x.dtype() || w.ndim() != 2 || x.ndim() < 1 ||
      x.shape(-1) != w.shape(1) || w.shape(0) % kTileRows != 0 || w.shape(1) % kStepColumns != 0) {
    return std::nullopt;
  }
  const int64_t rows = rows_of(x);
  if (rows < 2 || rows > kMaxRowsProductRows) return std::nullopt;
  const int n = w.shape(0), tiles = n / kTileRows, splits = rows_product_splits(n, w.shape(1));
  const int x_tiles = static_cast<int>((rows + 7) / 8);
  const mx::Shape partials = splits > 1 ? mx::Shape{splits, static_cast<int>(rows), n} : mx::Shape{1};
  return rows_product_kernel(x_tiles)(
      {x, w, tile_counters(w, tiles)}, {output_shape(x, n), partials}, {x.dtype(), mx::float32},
      {cuda_checked_threads(static_cast<long long>(tiles) * splits * kThreads), 1, 1}, {kThreads, 1, 1},
      {{"T", x.dtype()}, {"XT", x_tiles}}, std::nullopt, false, {})[0];
}

}  // namespace mlxr
