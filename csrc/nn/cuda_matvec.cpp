#include "nn/cuda_matvec.h"

#include <limits>
#include <stdexcept>

#include "mlx/fast.h"

namespace mlxr {

namespace {

// Rows of out a block computes (for every row of x at once), and the warps that share them, each taking
// every W-th stretch of 512 bytes of the rows. Chosen on an H200 among (W, R) = (1, 4), (2, 2), (4, 1),
// (4, 2), (4, 4), (8, 1), (8, 2) by the time of a 4-bit decode step's products for the Qwen3-4B and Llama-3-8B
// shapes (benchmarks/README.md, "4-bit products"): one warp, four rows, whose x chunk serves all four.
constexpr int kRowsPerBlock = 4;
constexpr int kWarpsPerBlock = 1;
// Chunks of each row a lane loads before it multiplies (benchmarks/gpu/matvec_bench.py times 1, 2 and 4; 1 is the
// kernel the "4-bit products" figures were measured with).
constexpr int kChunksPerPass = 1;

constexpr const char* kQuantizedSource = R"(
  // x [M, K] (T), w [N, K * BITS / 32] uint32, scales and biases [N, K / GROUP] (T) -> out [M, N] (T).
  // A block of W warps computes R rows of out for all M rows of x. Lane l of warp v takes the rows' 16-byte
  // chunks 32 v + l, 32 (v + W) + l, ...: each warp reads 512 contiguous bytes of a row per step, and the W
  // warps' partial sums meet in shared memory.
  constexpr int kPerWord = 32 / BITS;      // weights per uint32
  constexpr int kPerHalf = kPerWord / 2;   // weights per 16-bit half
  constexpr int kPerChunk = 4 * kPerWord;  // weights per 16-byte chunk
  constexpr unsigned kMask = (1u << BITS) - 1u;
  const int n_rows = w_shape[0];
  const int words_per_row = w_shape[1];
  const int k = words_per_row * kPerWord;
  const int chunks_per_row = words_per_row / 4;
  const int groups_per_row = k / GROUP;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int first_row = static_cast<int>(blockIdx.x) * R;
  const bool x_aligned = (reinterpret_cast<unsigned long long>(x) & 15ull) == 0;
  const bool w_aligned = (reinterpret_cast<unsigned long long>(w) & 15ull) == 0;

  float acc[M][R];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

  // Each pass takes U chunks of each of the R rows, every weight load issued before any arithmetic (U = 1: a chunk's
  // arithmetic waits out its loads' memory latency).
  for (int c0 = warp * 32 + lane; c0 < chunks_per_row; c0 += 32 * W * U) {
    unsigned words[U][R][4];
    float scale[U][R], bias[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = min(c0 + u * 32 * W, chunks_per_row - 1);  // past the row's end: repeats its last chunk, not summed
      const int group = c * kPerChunk / GROUP;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int row = min(first_row + r, n_rows - 1);  // past the last row: repeats it, not written
        const size_t at = static_cast<size_t>(row) * words_per_row + 4 * c;
        if (w_aligned) {
          const uint4 v = *reinterpret_cast<const uint4*>(w + at);
          words[u][r][0] = v.x;
          words[u][r][1] = v.y;
          words[u][r][2] = v.z;
          words[u][r][3] = v.w;
        } else {
#pragma unroll
          for (int i = 0; i < 4; ++i) words[u][r][i] = w[at + i];
        }
        scale[u][r] = static_cast<float>(scales[static_cast<size_t>(row) * groups_per_row + group]);
        bias[u][r] = static_cast<float>(biases[static_cast<size_t>(row) * groups_per_row + group]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * 32 * W;
      if (c >= chunks_per_row) break;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        // The chunk's inputs as float, each divided by the place value its weight is read at (a weight masked
        // in place inside its 16-bit half is q * 2^(BITS * j)): powers of two, so exact.
        const T* xm = x + static_cast<size_t>(m) * k + static_cast<size_t>(c) * kPerChunk;
        float xs[kPerChunk];
        if (x_aligned) {
#pragma unroll
          for (int v = 0; v < kPerChunk / 8; ++v) {
            const uint4 packed = *reinterpret_cast<const uint4*>(xm + 8 * v);
            const T* eight = reinterpret_cast<const T*>(&packed);
#pragma unroll
            for (int i = 0; i < 8; ++i) xs[8 * v + i] = static_cast<float>(eight[i]);
          }
        } else {
#pragma unroll
          for (int i = 0; i < kPerChunk; ++i) xs[i] = static_cast<float>(xm[i]);
        }
        float x_sum = 0.f;
#pragma unroll
        for (int i = 0; i < kPerChunk; ++i) {
          x_sum += xs[i];
          xs[i] *= __int_as_float((127 - BITS * (i % kPerHalf)) << 23);  // 2^-(BITS * j)
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          // sum of x q over the chunk; the affine weight is scale * q + bias.
          float dot = 0.f;
#pragma unroll
          for (int wi = 0; wi < 4; ++wi) {
            const unsigned halves[2] = {words[u][r][wi] & 0xFFFFu, words[u][r][wi] >> 16};
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
              for (int j = 0; j < kPerHalf; ++j) {
                // 2^23 + q * 2^(BITS * j) as a float's bits (the value, < 2^16, fills the mantissa), minus 2^23.
                const float q = __int_as_float((halves[h] & (kMask << (BITS * j))) | 0x4B000000u) - 8388608.f;
                dot = fmaf(xs[wi * kPerWord + h * kPerHalf + j], q, dot);
              }
          }
          acc[m][r] += scale[u][r] * dot + bias[u][r] * x_sum;
        }
      }
    }
  }

  __shared__ float partial[W][M][R];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float v = acc[m][r];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0) partial[warp][m][r] = v;
    }
  __syncthreads();
  if (threadIdx.x < M * R) {
    const int m = threadIdx.x / R, r = threadIdx.x % R;
    if (first_row + r < n_rows) {
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < W; ++i) sum += partial[i][m][r];
      out[static_cast<size_t>(m) * n_rows + first_row + r] = static_cast<T>(sum);
    }
  }
)";

bool half_precision(mx::Dtype dtype) {
  return dtype == mx::bfloat16 || dtype == mx::float16;
}

// x's leading dimensions flattened: [rows, K].
int rows_of(const mx::array& x) {
  return static_cast<int>(x.size() / x.shape(-1));
}

mx::Shape output_shape(const mx::array& x, int n) {
  auto shape = x.shape();
  shape.back() = n;
  return shape;
}

mx::array launch(const mx::fast::CustomKernelFunction& kernel, const std::vector<mx::array>& inputs, int n, int rows,
                 int bits, int group_size) {
  const long long threads = static_cast<long long>((n + kRowsPerBlock - 1) / kRowsPerBlock) * 32 * kWarpsPerBlock;
  if (threads > std::numeric_limits<int>::max()) throw std::invalid_argument("matvec: too many output rows");
  const auto dtype = inputs[0].dtype();
  return kernel(inputs, {{rows, n}}, {dtype}, {static_cast<int>(threads), 1, 1}, {32 * kWarpsPerBlock, 1, 1},
                {{"T", dtype},
                 {"BITS", bits},
                 {"GROUP", group_size},
                 {"M", rows},
                 {"R", kRowsPerBlock},
                 {"W", kWarpsPerBlock},
                 {"U", kChunksPerPass}},
                std::nullopt, false, {})[0];
}

}  // namespace

std::optional<mx::array> cuda_quantized_matvec(const mx::array& x, const mx::array& packed, const Quantized& q) {
  // The kernel indexes the weight as one dense block (a strided one would be copied on every call).
  if (!running_on_cuda() || packed.ndim() != 2 || !packed.flags().row_contiguous || !half_precision(x.dtype())) {
    return std::nullopt;
  }
  const int k = x.shape(-1), rows = rows_of(x), n = packed.shape(0);
  if (rows < 1 || rows > kMaxMatvecRows) return std::nullopt;
  auto x2 = mx::reshape(x, {rows, k});
  const auto& spec = q.spec;
  const bool supported = spec.mode == "affine" && (spec.bits == 4 || spec.bits == 8) &&
                         (spec.group_size == 32 || spec.group_size == 64 || spec.group_size == 128) && q.biases &&
                         !q.global_scale && q.scales.dtype() == x.dtype() && q.biases->dtype() == x.dtype() &&
                         packed.shape(1) * 32 / spec.bits == k;
  if (!supported) return std::nullopt;
  static auto kernel =
      mx::fast::cuda_kernel("mlxr_qmv", {"x", "w", "scales", "biases"}, {"out"}, kQuantizedSource, "", true);
  return mx::reshape(launch(kernel, {x2, packed, q.scales, *q.biases}, n, rows, spec.bits, spec.group_size),
                     output_shape(x, n));
}

}  // namespace mlxr
