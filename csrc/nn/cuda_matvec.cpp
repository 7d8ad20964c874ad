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
// Which kernel decode products take (benchmarks/gpu/matvec_bench.py times both).
constexpr bool kTensorCores = true;

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

// The same product on the tensor cores. The SIMT kernel above spends ~9 instructions a byte of 4-bit weight (a
// shift-free unpack, a float FMA and a correction per weight), which bounds it near 2 TB/s on an H200 whatever its
// loads; here a lane unpacks two weights with one LOP3 into a pair of half-precision values (the bits of 128 + q in a
// bfloat16, 1024 + q in a float16), scales them with one paired FMA, and an mma.sync m16n8k16 does the 256 products
// of a 16-row tile's step: ~4 instructions a byte. The scaled weights are rounded to x's dtype once (as MLX's own
// dequantize does); the sums are float.
constexpr const char* kTensorCoreHelpers = R"(
namespace mlxr_tc {
template <typename T> struct Pair;
template <> struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static constexpr unsigned kMagic = 0x43004300u;  // 128 in each bfloat16: 128 + q is exact for q < 128
  __device__ static type broadcast(__nv_bfloat16 v) { return __bfloat162bfloat162(v); }
  __device__ static type from_floats(float lo, float hi) { return __floats2bfloat162_rn(lo, hi); }
};
template <> struct Pair<__half> {
  using type = __half2;
  static constexpr unsigned kMagic = 0x64006400u;  // 1024 in each float16: 1024 + q is exact for q < 1024
  __device__ static type broadcast(__half v) { return __half2half2(v); }
  __device__ static type from_floats(float lo, float hi) { return __floats2half2_rn(lo, hi); }
};

template <typename To, typename From>
__device__ __forceinline__ To bits_as(From from) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To to;
  __builtin_memcpy(&to, &from, sizeof(To));
  return to;
}

// d += a b for a 16 x 16 tile a (row-major, 4 registers of pairs) and a 16 x 8 tile b (2 registers), float sums.
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

// Two 4-bit weights, one in the low nibble of each 16-bit half of bits, as the pair scale * q + bias.
template <typename T>
__device__ __forceinline__ unsigned nibble_pair(unsigned bits, typename Pair<T>::type scale, typename Pair<T>::type bias) {
  using P = typename Pair<T>::type;
  const P magic = bits_as<P>(Pair<T>::kMagic);
  const P q = __hsub2(bits_as<P>((bits & 0x000F000Fu) | Pair<T>::kMagic), magic);  // exact
  return bits_as<unsigned>(__hfma2(q, scale, bias));
}

// Bytes lo and hi of word (8-bit weights) as the pair scale * q + bias, computed in float.
template <typename T>
__device__ __forceinline__ unsigned byte_pair(unsigned word, int lo, float scale, float bias) {
  const float q_lo = __int_as_float(__byte_perm(word, 0x4B000000u, 0x7540 | lo)) - 8388608.f;
  const float q_hi = __int_as_float(__byte_perm(word, 0x4B000000u, 0x7540 | (lo + 1))) - 8388608.f;
  return bits_as<unsigned>(Pair<T>::from_floats(fmaf(q_lo, scale, bias), fmaf(q_hi, scale, bias)));
}
}  // namespace mlxr_tc
)";

constexpr const char* kTensorCoreSource = R"(
  // x [M, K] (T), w [N, K * BITS / 32] uint32, scales and biases [N, K / GROUP] (T) -> out [M, N] (T).
  // A block of W warps computes a tile of 16 rows of out for all M (<= 8 * XT) rows of x. Lane (g, t) = (lane / 4,
  // lane % 4) loads 16 bytes of weight rows g and g + 8 of the tile per step, its chunk t of the rows' 64-byte
  // segment; the warps take every W-th segment, U at a time (all loads first), and meet in shared memory.
  // An mma's 16 k-slots are any 16 columns, the same for weights and x: lane t's slots are columns of its own
  // chunk, so it unpacks its words in the order they are stored and reads x at the matching columns.
  using namespace mlxr_tc;
  using P = typename Pair<T>::type;
  constexpr int kPerWord = 32 / BITS;
  constexpr int kPerChunk = 4 * kPerWord;     // weights in a lane's 16 bytes: 32 (4-bit) or 16 (8-bit)
  constexpr int kMmas = kPerChunk / 4;        // mmas a step: a lane gives 4 slots of each
  constexpr int kXWords = kPerChunk / 2;      // x's chunk as pairs
  const int n_rows = w_shape[0];
  const int words_per_row = w_shape[1];
  const int k = words_per_row * kPerWord;
  const int chunks_per_row = words_per_row / 4;
  const int segments = (chunks_per_row + 3) / 4;
  const int groups_per_row = k / GROUP;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile = static_cast<int>(blockIdx.x) * 16;
  const int rows[2] = {min(tile + g, n_rows - 1), min(tile + g + 8, n_rows - 1)};  // past the last: repeats, not written
  const bool w_aligned = (reinterpret_cast<unsigned long long>(w) & 15ull) == 0;
  const bool x_aligned = (reinterpret_cast<unsigned long long>(x) & 15ull) == 0;

  float d[XT][4];
#pragma unroll
  for (int n = 0; n < XT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) d[n][i] = 0.f;

  for (int s0 = warp; s0 < segments; s0 += W * U) {
    unsigned words[U][2][4];
    T scale[U][2], bias[U][2];
    unsigned xw[U][XT][kXWords];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = (s0 + u * W) * 4 + t;
      const bool in_row = c < chunks_per_row;
      const int cc = in_row ? c : chunks_per_row - 1;  // past the row's end: x is zero there
      const int group = cc * kPerChunk / GROUP;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const size_t at = static_cast<size_t>(rows[h]) * words_per_row + 4 * cc;
        if (w_aligned) {
          const uint4 v = *reinterpret_cast<const uint4*>(w + at);
          words[u][h][0] = v.x, words[u][h][1] = v.y, words[u][h][2] = v.z, words[u][h][3] = v.w;
        } else {
#pragma unroll
          for (int i = 0; i < 4; ++i) words[u][h][i] = w[at + i];
        }
        scale[u][h] = scales[static_cast<size_t>(rows[h]) * groups_per_row + group];
        bias[u][h] = biases[static_cast<size_t>(rows[h]) * groups_per_row + group];
      }
#pragma unroll
      for (int n = 0; n < XT; ++n) {
        const int m = g + 8 * n;
        const T* xm = x + static_cast<size_t>(m) * k + static_cast<size_t>(cc) * kPerChunk;
#pragma unroll
        for (int v = 0; v < kXWords / 4; ++v) {
          uint4 q = make_uint4(0u, 0u, 0u, 0u);
          if (m < M && in_row) {
            if (x_aligned) {
              q = *reinterpret_cast<const uint4*>(xm + 8 * v);
            } else {
              unsigned short e[8];
#pragma unroll
              for (int i = 0; i < 8; ++i) e[i] = bits_as<unsigned short>(xm[8 * v + i]);
              unsigned pairs[4];
#pragma unroll
              for (int i = 0; i < 4; ++i) pairs[i] = e[2 * i] | (static_cast<unsigned>(e[2 * i + 1]) << 16);
              q = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
            }
          }
          xw[u][n][4 * v] = q.x, xw[u][n][4 * v + 1] = q.y, xw[u][n][4 * v + 2] = q.z, xw[u][n][4 * v + 3] = q.w;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (s0 + u * W >= segments) break;
#pragma unroll
      for (int j = 0; j < kMmas; ++j) {
        unsigned a[4], b[XT][2];
        if constexpr (BITS == 4) {
          // mma j takes word j / 2: nibbles (s, s + 4) at slots 2t, 2t + 1 and (s + 1, s + 5) at 2t + 8, 2t + 9,
          // s = 2 (j % 2); x's pairs for them are built from its chunk with one byte permute each.
          const int word = j >> 1, shift = 8 * (j & 1);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const P s = Pair<T>::broadcast(scale[u][h]), o = Pair<T>::broadcast(bias[u][h]);
            a[h] = nibble_pair<T>(words[u][h][word] >> shift, s, o);
            a[h + 2] = nibble_pair<T>(words[u][h][word] >> (shift + 4), s, o);
          }
#pragma unroll
          for (int n = 0; n < XT; ++n) {
            // x at the word's 8 columns as 4 pairs (2r, 2r + 1): columns s and s + 4 are the low halves of pairs
            // j % 2 and j % 2 + 2, columns s + 1 and s + 5 their high halves.
            const unsigned* xs = xw[u][n] + 4 * word;
            b[n][0] = __byte_perm(xs[j & 1], xs[(j & 1) + 2], 0x5410u);
            b[n][1] = __byte_perm(xs[j & 1], xs[(j & 1) + 2], 0x7632u);
          }
        } else {
          // mma j takes word j: bytes 0, 1 at slots 2t, 2t + 1 and bytes 2, 3 at 2t + 8, 2t + 9: x's own pairs.
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float s = static_cast<float>(scale[u][h]), o = static_cast<float>(bias[u][h]);
            a[h] = byte_pair<T>(words[u][h][j], 0, s, o);
            a[h + 2] = byte_pair<T>(words[u][h][j], 2, s, o);
          }
#pragma unroll
          for (int n = 0; n < XT; ++n) {
            b[n][0] = xw[u][n][2 * j];
            b[n][1] = xw[u][n][2 * j + 1];
          }
        }
#pragma unroll
        for (int n = 0; n < XT; ++n) mma(d[n], a, b[n], T{});
      }
    }
  }

  // d[n] holds out[m][row] for rows tile + g (d[n][0..1]) and tile + g + 8 (d[n][2..3]), m = 8 n + 2 t (+ 1).
  __shared__ float partial[W][8 * XT][16];
#pragma unroll
  for (int n = 0; n < XT; ++n) {
    partial[warp][8 * n + 2 * t][g] = d[n][0];
    partial[warp][8 * n + 2 * t + 1][g] = d[n][1];
    partial[warp][8 * n + 2 * t][g + 8] = d[n][2];
    partial[warp][8 * n + 2 * t + 1][g + 8] = d[n][3];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * M; i += 32 * W) {
    const int m = i / 16, r = i % 16;
    if (tile + r < n_rows) {
      float sum = 0.f;
#pragma unroll
      for (int v = 0; v < W; ++v) sum += partial[v][m][r];
      out[static_cast<size_t>(m) * n_rows + tile + r] = static_cast<T>(sum);
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

// The tensor-core kernel's shape: a block is one 16-row tile and W warps that split its rows' segments, W doubled
// from 1 while the product has fewer than kTensorCoreTargetWarps warps and each warp keeps 2 U segments of the row;
// U segments of loads are issued before any arithmetic. Chosen on an H200 with benchmarks/gpu/matvec_bench.py.
constexpr int kTensorCoreTargetWarps = 4096;
constexpr int kTensorCoreMaxWarps = 8;
constexpr int kTensorCoreSegmentsPerPass = 2;

int tensor_core_warps(int n, int k, int bits) {
  const long long tiles = (n + 15) / 16;
  const int segments = (k * bits / 32 / 4 + 3) / 4;  // 64-byte segments of a row
  int warps = 1;
  while (warps < kTensorCoreMaxWarps && tiles * warps < kTensorCoreTargetWarps &&
         segments >= 4 * warps * kTensorCoreSegmentsPerPass) {
    warps *= 2;
  }
  return warps;
}

mx::array launch_tensor_cores(const std::vector<mx::array>& inputs, int n, int rows, int bits, int group_size) {
  static auto kernel = mx::fast::cuda_kernel("mlxr_qmv_tc", {"x", "w", "scales", "biases"}, {"out"}, kTensorCoreSource,
                                             kTensorCoreHelpers, true);
  const int k = inputs[0].shape(-1);
  const int warps = tensor_core_warps(n, k, bits);
  const long long threads = static_cast<long long>((n + 15) / 16) * 32 * warps;
  if (threads > std::numeric_limits<int>::max()) throw std::invalid_argument("matvec: too many output rows");
  const auto dtype = inputs[0].dtype();
  return kernel(inputs, {{rows, n}}, {dtype}, {static_cast<int>(threads), 1, 1}, {32 * warps, 1, 1},
                {{"T", dtype},
                 {"BITS", bits},
                 {"GROUP", group_size},
                 {"M", rows},
                 {"XT", (rows + 7) / 8},
                 {"W", warps},
                 {"U", kTensorCoreSegmentsPerPass}},
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
  if (kTensorCores) {
    return mx::reshape(launch_tensor_cores({x2, packed, q.scales, *q.biases}, n, rows, spec.bits, spec.group_size),
                       output_shape(x, n));
  }
  static auto kernel =
      mx::fast::cuda_kernel("mlxr_qmv", {"x", "w", "scales", "biases"}, {"out"}, kQuantizedSource, "", true);
  return mx::reshape(launch(kernel, {x2, packed, q.scales, *q.biases}, n, rows, spec.bits, spec.group_size),
                     output_shape(x, n));
}

}  // namespace mlxr
