#include "nn/cuda_matvec.h"

#include <array>
#include <limits>
#include <stdexcept>

#include "mlx/fast.h"
#include "nn/cuda_kernel_common.h"
#include "nn/slicing.h"

namespace mlxr {

namespace {

// A decode step's product on the tensor cores. A SIMT kernel (a lane unpacks a weight with a shift-free mask, a
// float FMA and a correction) spent ~9 instructions a byte of 4-bit weight; here a lane unpacks two weights with
// one LOP3 into a pair of half-precision values (the bits of 128 + q in a bfloat16, 1024 + q in a float16), scales
// them with one paired FMA, and an mma.sync m16n8k16 does the 256 products of a 16-row tile's step for up to 8
// rows of x at once. The scaled weights are rounded to x's dtype once (as MLX's own dequantize does); the sums are
// float. Measured against the SIMT kernel and MLX with benchmarks/gpu/matvec_bench.py (benchmarks/README.md,
// "Decode products on the tensor cores"): a decode step's products 6-7 % faster than the SIMT kernel's at one row (the
// large ones 8-45 %, the small ones bound by MLX's cost per operation), 2-3x at 4-7 rows.
constexpr const char* kTensorCoreHelpers = R"(
#include "mlx/backend/cuda/device/binary_ops.cuh"
#include "mlx/backend/cuda/device/unary_ops.cuh"

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
  return *reinterpret_cast<const To*>(&from);
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

// Eight consecutive elements of a half-precision array as one 16-byte vector (one load where p is aligned).
template <typename T>
__device__ __forceinline__ uint4 load8(const T* p) {
  if ((reinterpret_cast<unsigned long long>(p) & 15ull) == 0) return *reinterpret_cast<const uint4*>(p);
  unsigned pairs[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    pairs[i] = bits_as<unsigned short>(p[2 * i]) | (static_cast<unsigned>(bits_as<unsigned short>(p[2 * i + 1])) << 16);
  return make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
}

// A 16-byte vector's eight elements as floats, and eight floats rounded to T as one vector.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float (&out)[8]) {
  const unsigned words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = static_cast<float>(bits_as<T>(static_cast<unsigned short>(words[i] & 0xFFFFu)));
    out[2 * i + 1] = static_cast<float>(bits_as<T>(static_cast<unsigned short>(words[i] >> 16)));
  }
}
template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&in)[8]) {
  unsigned words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    words[i] = bits_as<unsigned short>(static_cast<T>(in[2 * i])) |
               (static_cast<unsigned>(bits_as<unsigned short>(static_cast<T>(in[2 * i + 1]))) << 16);
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// silu(gate) * up with MLX's own element-wise functors in T: what the separate gated SiLU (an mx::compile of
// multiply(multiply(g, sigmoid(g)), up)) computes from the rounded product, so the fused kernel's output is the same.
template <typename T>
__device__ __forceinline__ T silu_times(T gate, T up) {
  using mlx::core::cu::Multiply;
  return Multiply{}(Multiply{}(gate, mlx::core::cu::Sigmoid{}(gate)), up);
}

}  // namespace mlxr_tc
)";

// The heads variant's epilogue, in its header only: every call of a `cuda_kernel` hashes the kernel's whole source
// (MLX names the compiled module by it), so the other variants do not carry it.
constexpr const char* kHeadsHelpers = R"(
namespace mlxr_tc {
// Row m of x's outputs of one head (values: its HEAD_DIM outputs) written where attention reads them: a query or key
// head gets the per-head RMSNorm (QK_NORM) and RoPE at position first_position + t as nn/cuda_norm_rope.cpp's kernel
// gives them (the norm's sum over the warp, here), a value head is copied; all heads first, [B, heads, tokens, D]
// (x's tokens a sequence: a run-time value, so that one compiled variant serves every prompt length). One warp;
// lane holds pairs lane, lane + 32, ...
template <typename T, int HEAD_DIM, int Q_HEADS, int KV_HEADS, bool TRADITIONAL, bool QK_NORM>
__device__ __forceinline__ void heads_out(const float* values, int m, int tokens, int head, int lane, const T* q_weight,
                                          const T* k_weight, float eps, const float* inverse_frequencies,
                                          int first_position, T* q_out, T* k_out, T* v_out) {
  const size_t b = m / tokens, t = m % tokens;
  if (head >= Q_HEADS + KV_HEADS) {
    T* dst = v_out + ((b * KV_HEADS + head - Q_HEADS - KV_HEADS) * tokens + t) * HEAD_DIM;
    for (int j = lane; j < HEAD_DIM; j += 32) dst[j] = static_cast<T>(values[j]);
    return;
  }
  constexpr int kHalf = HEAD_DIM / 2, kPairs = (kHalf + 31) / 32;
  float x1[kPairs], x2[kPairs];
  float squares = 0.f;
#pragma unroll
  for (int p = 0; p < kPairs; ++p) {
    const int i = lane + 32 * p;
    const int at1 = TRADITIONAL ? 2 * i : i, at2 = TRADITIONAL ? 2 * i + 1 : i + kHalf;
    x1[p] = i < kHalf ? values[at1] : 0.f;
    x2[p] = i < kHalf ? values[at2] : 0.f;
    squares += x1[p] * x1[p] + x2[p] * x2[p];
  }
  if (QK_NORM) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) squares += __shfl_xor_sync(0xffffffffu, squares, o);
    const float normalizer = rsqrtf(squares / HEAD_DIM + eps);
    const T* w = head < Q_HEADS ? q_weight : k_weight;
#pragma unroll
    for (int p = 0; p < kPairs; ++p) {
      const int i = lane + 32 * p;
      if (i >= kHalf) continue;
      const int at1 = TRADITIONAL ? 2 * i : i, at2 = TRADITIONAL ? 2 * i + 1 : i + kHalf;
      // MLX's rms_norm: the weight times (x * normalizer rounded to T), rounded to T: what RoPE reads.
      const float n1 = static_cast<float>(static_cast<T>(x1[p] * normalizer));
      const float n2 = static_cast<float>(static_cast<T>(x2[p] * normalizer));
      x1[p] = static_cast<float>(static_cast<T>(static_cast<float>(w[at1]) * n1));
      x2[p] = static_cast<float>(static_cast<T>(static_cast<float>(w[at2]) * n2));
    }
  }
  T* dst = head < Q_HEADS ? q_out + ((b * Q_HEADS + head) * tokens + t) * HEAD_DIM
                          : k_out + ((b * KV_HEADS + head - Q_HEADS) * tokens + t) * HEAD_DIM;
#pragma unroll
  for (int p = 0; p < kPairs; ++p) {
    const int i = lane + 32 * p;
    if (i >= kHalf) continue;
    const int at1 = TRADITIONAL ? 2 * i : i, at2 = TRADITIONAL ? 2 * i + 1 : i + kHalf;
    const float theta = static_cast<float>(first_position + static_cast<int>(t)) * inverse_frequencies[i];
    const float c = cos(theta), s = sin(theta);
    dst[at1] = static_cast<T>(x1[p] * c - x2[p] * s);
    dst[at2] = static_cast<T>(x1[p] * s + x2[p] * c);
  }
}
}  // namespace mlxr_tc
)";

constexpr const char* kTensorCoreSource = R"(
  // x [M, K] (T), w [N, K * BITS / 32] uint32, scales and biases [N, K / GROUP] (T) -> out [M, N] (T); BITS 16: w is
  // [N, K] in T itself (a half-precision weight: no scales, biases or unpacking; its pairs go to the mma as they are).
  // A block of W warps computes a tile of 16 rows of out for all M (<= 8 * XT) rows of x (M read from x's shape:
  // one compiled variant serves 1 to 8 rows). Lane (g, t) = (lane / 4, lane % 4) loads 16 bytes of weight rows g and
  // g + 8 of the tile per step, its chunk t of the rows' 64-byte segment; the warps take every W-th segment, U at a
  // time (all loads first), and meet in shared memory.
  // An mma's 16 k-slots are any 16 columns, the same for weights and x: lane t's slots are columns of its own
  // chunk, so it unpacks its words in the order they are stored and reads x at the matching columns.
  // GATED: w's rows are a gate [N / 2, K] then its up projection, and out [M, N / 2] = silu(x gate^T) * (x up^T).
  // A tile is then 8 gate rows (lane row g) and the same 8 up rows (g + 8), so a lane's sums hold both factors of an
  // output; the block writes the 8 outputs (one launch and one write where the gated SiLU took a second kernel).
  // MLXR_HEADS (with MLXR_NORMED): w is a decoder layer's q|k|v projection and a block is one head's HEAD_DIM rows,
  // HEAD_DIM / 16 tiles of W warps each; the head's outputs meet in shared memory and one warp a row of x gives them
  // the q/k RMSNorm (QK_NORM) and RoPE, and writes q, k and v heads first, as the cache and attention take them
  // (the separate q/k kernel of nn/cuda_norm_rope.cpp, the same arithmetic: one operation a layer fewer).
  using namespace mlxr_tc;
  using P = typename Pair<T>::type;
  constexpr int kPerWord = 32 / BITS;
  constexpr int kPerChunk = 4 * kPerWord;     // weights in a lane's 16 bytes: 32 (4-bit), 16 (8-bit), 8 (16-bit)
  constexpr int kMmas = kPerChunk / 4;        // mmas a step: a lane gives 4 slots of each
  constexpr int kXWords = kPerChunk / 2;      // x's chunk as pairs
  int M = 1;  // x's rows: its leading dimensions (handed over as they are: a reshape would be one more operation)
  for (int i = 0; i + 1 < x_ndim; ++i) M *= x_shape[i];
  const int n_rows = w_shape[0];
  const int words_per_row = BITS == 16 ? w_shape[1] / 2 : w_shape[1];
  const unsigned* w_words = reinterpret_cast<const unsigned*>(w);
  const int k = words_per_row * kPerWord;
  const int chunks_per_row = words_per_row / 4;
  const int segments = (chunks_per_row + 3) / 4;
  const int groups_per_row = k / GROUP;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n_out = GATED ? n_rows / 2 : n_rows;
#if MLXR_HEADS
  constexpr int kTiles = HEAD_DIM / 16;  // tiles a block
  const int first_row = static_cast<int>(blockIdx.x) * HEAD_DIM;
  const int tile_slot = warp / W, tile_warp = warp % W;
#else
  constexpr int kTiles = 1;
  const int first_row = static_cast<int>(blockIdx.x) * (GATED ? 8 : 16);
  const int tile_slot = 0, tile_warp = warp;
#endif
  const int tile = first_row + 16 * tile_slot;
  // Past the last row: repeats, not written.
  const int rows[2] = {min(tile + g, n_out - 1), GATED ? n_out + min(tile + g, n_out - 1) : min(tile + g + 8, n_rows - 1)};
  const bool w_aligned = (reinterpret_cast<unsigned long long>(w) & 15ull) == 0;

  float d[XT][4];
#pragma unroll
  for (int n = 0; n < XT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) d[n][i] = 0.f;

#if MLXR_NORMED
  // The product's input is RMSNorm(x + delta) (ADD; RMSNorm(x) otherwise), made here instead of by a kernel of its
  // own, once a block, in shared memory (the host keeps M * K within MLXR_STAGE, K a multiple of 8): every thread
  // stages h = x + delta rounded to T 16 bytes at a time and sums the squares of its part of each row (every block
  // the same way, so all agree); block 0 also writes h to `added` (the residual stream the layer goes on with); then
  // every thread scales its part to the norm's output, which the x-loads below read. A thread issues kBatch loads
  // before it stores anything: a loop that stored each before the next load waited out every load's latency in turn,
  // and a few lanes of a warp normalising x as they read it left the rest idle.
  constexpr int kThreads = 32 * W * kTiles;
  constexpr int kBatch = 4;
  __shared__ __align__(16) T staged[MLXR_STAGE];
  __shared__ float normalizer[8 * XT];
  __shared__ float warp_squares[W * kTiles];
  const int vectors = k / 8;  // 16-byte vectors a row
  for (int m = 0; m < M; ++m) {
    const size_t row = static_cast<size_t>(m) * k;
    float squares = 0.f;
    for (int first = threadIdx.x; first < vectors; first += kBatch * kThreads) {
      uint4 xv[kBatch], dv[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int v = first + b * kThreads;
        if (v < vectors) {
          xv[b] = load8(x + row + 8 * v);
          if (ADD) dv[b] = load8(delta + row + 8 * v);
        }
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int v = first + b * kThreads;
        if (v >= vectors) break;
        float h[8];
        unpack8<T>(xv[b], h);
        if (ADD) {
          float e[8];
          unpack8<T>(dv[b], e);
#pragma unroll
          for (int i = 0; i < 8; ++i) h[i] = static_cast<float>(static_cast<T>(h[i] + e[i]));
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) squares += h[i] * h[i];
        const uint4 hv = ADD ? pack8<T>(h) : xv[b];
        *reinterpret_cast<uint4*>(staged + row + 8 * v) = hv;
        if (ADD && blockIdx.x == 0) *reinterpret_cast<uint4*>(added + row + 8 * v) = hv;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) squares += __shfl_xor_sync(0xffffffffu, squares, o);
    if (lane == 0) warp_squares[warp] = squares;
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.f;
      for (int v = 0; v < W * kTiles; ++v) total += warp_squares[v];
      normalizer[m] = rsqrtf(total / k + __int_as_float(EPS_BITS));
    }
    __syncthreads();
  }
  // MLX's rms_norm: the weight times (h * normalizer rounded to T), rounded to T.
  for (int v = threadIdx.x; v < M * vectors; v += kThreads) {
    const int m = v / vectors, col = 8 * (v % vectors);
    uint4* at = reinterpret_cast<uint4*>(staged + static_cast<size_t>(m) * k + col);
    float h[8], weight[8];
    unpack8<T>(*at, h);
    unpack8<T>(load8(norm_weight + col), weight);
#pragma unroll
    for (int i = 0; i < 8; ++i) h[i] = weight[i] * static_cast<float>(static_cast<T>(h[i] * normalizer[m]));
    *at = pack8<T>(h);
  }
  __syncthreads();
#endif

  for (int s0 = tile_warp; s0 < segments; s0 += W * U) {
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
          const uint4 v = *reinterpret_cast<const uint4*>(w_words + at);
          words[u][h][0] = v.x, words[u][h][1] = v.y, words[u][h][2] = v.z, words[u][h][3] = v.w;
        } else {
#pragma unroll
          for (int i = 0; i < 4; ++i) words[u][h][i] = w_words[at + i];
        }
        if constexpr (BITS != 16) {
          scale[u][h] = scales[static_cast<size_t>(rows[h]) * groups_per_row + group];
          bias[u][h] = biases[static_cast<size_t>(rows[h]) * groups_per_row + group];
        }
      }
#pragma unroll
      for (int n = 0; n < XT; ++n) {
        const int m = g + 8 * n;
#pragma unroll
        for (int v = 0; v < kXWords / 4; ++v) {
          uint4 q = make_uint4(0u, 0u, 0u, 0u);
#if MLXR_NORMED
          if (m < M && in_row) q = *reinterpret_cast<const uint4*>(staged + static_cast<size_t>(m) * k + cc * kPerChunk + 8 * v);
#else
          if (m < M && in_row) q = load8(x + static_cast<size_t>(m) * k + static_cast<size_t>(cc) * kPerChunk + 8 * v);
#endif
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
        } else if constexpr (BITS == 16) {
          // mma j takes pairs 2j (slots 2t, 2t + 1) and 2j + 1 (slots 2t + 8, 2t + 9) of weight and x alike.
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            a[h] = words[u][h][2 * j];
            a[h + 2] = words[u][h][2 * j + 1];
          }
#pragma unroll
          for (int n = 0; n < XT; ++n) {
            b[n][0] = xw[u][n][2 * j];
            b[n][1] = xw[u][n][2 * j + 1];
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
  __shared__ float partial[kTiles][W][8 * XT][16];
#pragma unroll
  for (int n = 0; n < XT; ++n) {
    partial[tile_slot][tile_warp][8 * n + 2 * t][g] = d[n][0];
    partial[tile_slot][tile_warp][8 * n + 2 * t + 1][g] = d[n][1];
    partial[tile_slot][tile_warp][8 * n + 2 * t][g + 8] = d[n][2];
    partial[tile_slot][tile_warp][8 * n + 2 * t + 1][g + 8] = d[n][3];
  }
  __syncthreads();
#if MLXR_HEADS
  __shared__ float head[8 * XT][HEAD_DIM];  // the head's outputs, rounded to T as the product's output would be
#endif
  constexpr int kOutputs = GATED ? 8 : 16;  // outputs a tile writes per row of x
  for (int i = threadIdx.x; i < kTiles * kOutputs * M; i += 32 * W * kTiles) {
    const int slot = i / (kOutputs * M), m = (i / kOutputs) % M, r = i % kOutputs;
    const int row = first_row + 16 * slot + r;
    if (row < n_out) {
      float sum = 0.f;
#pragma unroll
      for (int v = 0; v < W; ++v) sum += partial[slot][v][m][r];
      T value = static_cast<T>(sum);
      if constexpr (GATED) {
        float up = 0.f;
#pragma unroll
        for (int v = 0; v < W; ++v) up += partial[slot][v][m][r + 8];
        value = silu_times(value, static_cast<T>(up));
      }
#if MLXR_HEADS
      head[m][16 * slot + r] = static_cast<float>(value);
#else
      out[static_cast<size_t>(m) * n_out + row] = value;
#endif
    }
  }
#if MLXR_HEADS
  __syncthreads();
  const int tokens = x_shape[x_ndim - 2];  // x is [sequences, tokens, K]
  for (int m = warp; m < M; m += W * kTiles) {  // a warp a row of x
    heads_out<T, HEAD_DIM, Q_HEADS, KV_HEADS, TRADITIONAL, QK_NORM>(
        head[m], m, tokens, blockIdx.x, lane, q_weight, k_weight, __int_as_float(QK_EPS_BITS), inverse_frequencies,
        offsets[offsets_shape[0] == 1 ? 0 : m / tokens], q_out, k_out, v_out);
  }
#endif
)";

// A block is one 16-row tile and W warps that split its rows' 64-byte segments, each issuing the loads of
// kSegmentsPerPass segments before any arithmetic. W starts at kWarpsPerTile and doubles (up to kMaxWarpsPerTile)
// while the product has fewer than kTargetWarps warps and every warp keeps two segments: a product of few rows (a
// 2,560-row o or down projection is 160 tiles) had ~5 warps an SM with 4 warps a tile, far too few loads in flight
// to stream the weight (the H200 profile: 0.6 TB/s for those, 90 % of a 4-bit decode step in these kernels).
constexpr int kWarpsPerTile = 4;
constexpr int kMaxWarpsPerTile = 16;
constexpr int kTargetWarps = 4096;  // ~32 an SM on a 132-SM GPU
constexpr int kSegmentsPerPass = 1;

// The normed variants' stages (elements of x's normed rows in shared memory, rows times K): a launch takes the
// smaller one that holds x, since a larger stage leaves fewer blocks an SM.
constexpr std::array<int, 2> kStageSizes = {8192, kMaxStagedElements};

// A head's block has HEAD_DIM / 16 tiles of warps; at most 1,024 threads. Fewer warps a tile than the plain kernel's,
// each with more segments in flight, so that a 128-wide head is 512 threads: NVRTC does not know the block size, and
// at 1,024 a thread may have only 64 registers.
constexpr int kHeadWarpsPerTile = 2;
constexpr int kHeadSegmentsPerPass = 2;
constexpr int kMaxHeadDim = 128;

using TemplateArgs = std::vector<std::pair<std::string, mx::fast::TemplateArg>>;

// MLXRUNNER_HALF_MATVEC=1 sends half-precision weights' decode products through the kernel too (BITS 16), with its
// fused norms, RoPE and gated SiLU: a measuring switch, off unless set, since MLX's own products of such weights
// already stream at the copy bandwidth and only a GPU can tell whether the fusions win.
bool half_kernels_on() {
  static EnvSwitch half_matvec("MLXRUNNER_HALF_MATVEC");
  return half_matvec.on();
}

// The uint32 words of one of the weight's rows: packed (q: its packing), or pairs of a half-precision weight.
int words_a_row(const mx::array& w, const Quantized* q) {
  return q ? w.shape(1) : w.shape(1) / 2;
}

// The kernel's template arguments for x's dtype, the weight's packing (BITS 16: half precision) and the row count.
TemplateArgs template_args(mx::Dtype dtype, int rows, const Quantized* q, bool gated, int warps = kWarpsPerTile,
                           int segments_per_pass = kSegmentsPerPass) {
  return {{"T", dtype},
          {"BITS", q ? q->spec.bits : 16},
          {"GROUP", q ? q->spec.group_size : 64},
          {"XT", (rows + 7) / 8},
          {"W", warps},
          {"U", segments_per_pass},
          {"GATED", gated}};
}

// The weight's inputs: w, its scales and biases (a half-precision weight has none: x stands in, unread).
std::vector<mx::array> weight_inputs(const mx::array& x, const mx::array& w, const Quantized* q) {
  return {w, q ? q->scales : x, q ? *q->biases : x};
}

// The normed variants' extra arguments: the residual add, the norm's eps.
void add_norm_args(TemplateArgs& args, const NormInput& input) {
  args.emplace_back("ADD", input.delta.has_value());
  args.emplace_back("EPS_BITS", cuda_float_bits(input.eps));
}

// The inputs x, delta and norm_weight of the normed variants, in their own shapes (the kernel reads rows of K, and
// every reshape is one more operation for MLX's host). Without a delta the kernel reads x alone: x stands in for it.
std::vector<mx::array> norm_inputs(const NormInput& input) {
  return {input.x, input.delta.value_or(input.x), input.weight};
}

// Whether the normed variants take this input: a delta like x, the norm's weight [K] in x's dtype.
bool norm_fits(const NormInput& input) {
  const auto& x = input.x;
  const bool delta_fits = !input.delta || (input.delta->shape() == x.shape() && input.delta->dtype() == x.dtype());
  return delta_fits && input.weight.dtype() == x.dtype() && input.weight.ndim() == 1 &&
         input.weight.shape(0) == x.shape(-1);
}

// 16-row tiles (8 outputs when gated) of a product with this many outputs.
int tiles_for(int outputs, bool gated) {
  const int outputs_per_block = gated ? 8 : 16;
  return (outputs + outputs_per_block - 1) / outputs_per_block;
}

std::tuple<int, int, int> grid_for(int tiles, int warps) {
  const long long threads = static_cast<long long>(tiles) * 32 * warps;
  if (threads > std::numeric_limits<int>::max()) throw std::invalid_argument("matvec: too many output rows");
  return {static_cast<int>(threads), 1, 1};
}

// Which of kStageSizes holds x's rows (K in 16-byte vectors), if one does.
std::optional<int> stage_for(const mx::array& x) {
  const long long k = x.shape(-1), elements = static_cast<long long>(rows_of(x)) * k;
  if (k % 8 != 0) return std::nullopt;
  for (int i = 0; i < static_cast<int>(kStageSizes.size()); ++i) {
    if (elements <= kStageSizes[i]) return i;
  }
  return std::nullopt;
}

// The decode product's kernel: its variant's #if branches resolved (`switches`), the helpers it needs as its header.
mx::fast::CustomKernelFunction product_kernel(const std::string& name, const std::vector<std::string>& inputs,
                                              const std::vector<std::string>& outputs, bool normed, bool heads,
                                              int stage = 0) {
  const std::string header = "#define MLXR_STAGE " + std::to_string(stage) + "\n" + kCudaMma + kTensorCoreHelpers +
                             (heads ? kHeadsHelpers : "");
  return cuda_kernel(name, inputs, outputs, kTensorCoreSource, header, true,
                     {{"MLXR_NORMED", normed}, {"MLXR_HEADS", heads}});
}

// A normed variant's kernel for each stage size (each compiles on its first launch).
std::array<mx::fast::CustomKernelFunction, kStageSizes.size()> normed_kernels(const char* name, bool heads,
                                                                              const std::vector<std::string>& inputs,
                                                                              const std::vector<std::string>& outputs) {
  std::array<mx::fast::CustomKernelFunction, kStageSizes.size()> kernels;
  for (size_t i = 0; i < kStageSizes.size(); ++i) {
    kernels[i] = product_kernel(std::string(name) + "_s" + std::to_string(i), inputs, outputs, /*normed=*/true, heads,
                                kStageSizes[i]);
  }
  return kernels;
}

// Whether the kernel takes this product: x half precision with at most kMaxMatvecRows rows, the weight one dense block
// (a strided one would be copied on every call), packed affine 4/8-bit in groups of 32/64/128 or (under the switch)
// half precision in x's dtype with K a multiple of 8.
bool kernel_takes(const mx::array& x, const mx::array& packed, const Quantized* quantized, bool gated) {
  if (!running_on_cuda() || packed.ndim() != 2 || !packed.flags().row_contiguous || !half_precision(x.dtype())) {
    return false;
  }
  const int rows = rows_of(x);
  if (rows < 1 || rows > kMaxMatvecRows || (gated && packed.shape(0) % 2 != 0)) return false;
  if (!quantized) {
    return half_kernels_on() && packed.dtype() == x.dtype() && packed.shape(1) == x.shape(-1) && x.shape(-1) % 8 == 0;
  }
  const auto& q = *quantized;
  const auto& spec = q.spec;
  return spec.mode == "affine" && (spec.bits == 4 || spec.bits == 8) &&
         (spec.group_size == 32 || spec.group_size == 64 || spec.group_size == 128) && q.biases && !q.global_scale &&
         q.scales.dtype() == x.dtype() && q.biases->dtype() == x.dtype() &&
         packed.shape(1) * 32 / spec.bits == x.shape(-1);
}

// The product of x [..., K] and the weight (packed [N, K * bits / 32], or [N, K]): N outputs, N / 2 when gated.
mx::array tensor_core_product(const mx::array& x, const mx::array& w, const Quantized* q, bool gated) {
  static const auto kernel =
      product_kernel("mlxr_qmv_tc", {"x", "w", "scales", "biases"}, {"out"}, /*normed=*/false, /*heads=*/false);
  const int rows = rows_of(x), outputs = gated ? w.shape(0) / 2 : w.shape(0);
  const int tiles = tiles_for(outputs, gated), warps = matvec_warps_per_tile(w.shape(0), words_a_row(w, q), gated);
  auto inputs = weight_inputs(x, w, q);
  inputs.insert(inputs.begin(), x);
  return kernel(inputs, {output_shape(x, outputs)}, {x.dtype()}, grid_for(tiles, warps), {32 * warps, 1, 1},
                template_args(x.dtype(), rows, q, gated, warps), std::nullopt, false, {})[0];
}

}  // namespace

int matvec_warps_per_tile(int rows, int words, bool gated) {
  const int tiles = tiles_for(gated ? rows / 2 : rows, gated), segments = (words * 4 + 63) / 64;
  int warps = kWarpsPerTile;
  while (warps < kMaxWarpsPerTile && static_cast<long long>(tiles) * warps < kTargetWarps &&
         segments >= 4 * warps * kSegmentsPerPass) {
    warps *= 2;
  }
  return warps;
}

std::optional<mx::array> cuda_matvec(const mx::array& x, const mx::array& w, const Quantized* q) {
  if (!kernel_takes(x, w, q, /*gated=*/false)) return std::nullopt;
  return tensor_core_product(x, w, q, /*gated=*/false);
}

std::optional<mx::array> cuda_swiglu_matvec(const mx::array& x, const mx::array& w, const Quantized* q) {
  if (!kernel_takes(x, w, q, /*gated=*/true)) return std::nullopt;
  return tensor_core_product(x, w, q, /*gated=*/true);
}

std::optional<std::pair<mx::array, mx::array>> cuda_normed_matvec(const NormInput& input, const mx::array& packed,
                                                                  const Quantized* q, bool gated) {
  const auto& x = input.x;
  const auto stage = stage_for(x);
  if (!kernel_takes(x, packed, q, gated) || !norm_fits(input) || !stage) return std::nullopt;
  static const auto kernels = normed_kernels("mlxr_qmv_tc_normed", /*heads=*/false,
                                             {"x", "delta", "norm_weight", "w", "scales", "biases"}, {"out", "added"});
  const auto& kernel = kernels[*stage];
  const int rows = rows_of(x), outputs = gated ? packed.shape(0) / 2 : packed.shape(0);
  const int tiles = tiles_for(outputs, gated),
            warps = matvec_warps_per_tile(packed.shape(0), words_a_row(packed, q), gated);
  const bool add = input.delta.has_value();
  auto args = template_args(x.dtype(), rows, q, gated, warps);
  add_norm_args(args, input);
  auto inputs = norm_inputs(input);
  for (auto& weight_input : weight_inputs(x, packed, q)) inputs.push_back(weight_input);
  // Without a delta the unwritten `added` is not used.
  auto out = kernel(inputs, {output_shape(x, outputs), add ? x.shape() : mx::Shape{1}}, {x.dtype(), x.dtype()},
                    grid_for(tiles, warps), {32 * warps, 1, 1}, args, std::nullopt, false, {});
  return std::pair{add ? out[1] : x, out[0]};
}

// MLXRUNNER_QKV_HEADS=0 turns the heads variant off (the normed product and the q/k kernel run instead): a switch for
// measuring what it gains.
bool heads_kernel_on() {
  static EnvSwitch qkv_heads("MLXRUNNER_QKV_HEADS");
  return !qkv_heads.off();
}

std::optional<QkvHeads> cuda_normed_qkv_heads(const NormInput& input, const mx::array& packed, const Quantized* q,
                                              const HeadSplit& split) {
  const auto& x = input.x;
  const auto stage = stage_for(x);
  if (!heads_kernel_on() || x.ndim() != 3 || !kernel_takes(x, packed, q, /*gated=*/false) || !norm_fits(input) ||
      !stage)
    return std::nullopt;
  const int heads = split.q_heads + 2 * split.kv_heads, d = packed.shape(0) / std::max(heads, 1);
  const auto& norms = split.norms;
  const bool norms_fit = !norms || (norms->q_weight.dtype() == x.dtype() && norms->k_weight.dtype() == x.dtype() &&
                                    norms->q_weight.size() == d && norms->k_weight.size() == d);
  if (heads < 1 || d * heads != packed.shape(0) || d % 16 != 0 || d > kMaxHeadDim || !norms_fit ||
      split.rope.inverse_frequencies.size() != d / 2 || split.rope.inverse_frequencies.dtype() != mx::float32) {
    return std::nullopt;
  }
  static const auto kernels = normed_kernels(
      "mlxr_qmv_tc_heads", /*heads=*/true,
      {"x", "delta", "norm_weight", "w", "scales", "biases", "q_weight", "k_weight", "inverse_frequencies", "offsets"},
      {"q_out", "k_out", "v_out", "added"});
  const auto& kernel = kernels[*stage];
  const int b = x.shape(0), t = x.shape(1), rows = b * t;
  const bool add = input.delta.has_value();
  auto args = template_args(x.dtype(), rows, q, /*gated=*/false, kHeadWarpsPerTile, kHeadSegmentsPerPass);
  add_norm_args(args, input);
  args.insert(args.end(), {{"HEAD_DIM", d},
                           {"Q_HEADS", split.q_heads},
                           {"KV_HEADS", split.kv_heads},
                           {"TRADITIONAL", split.rope.traditional},
                           {"QK_NORM", norms.has_value()},
                           {"QK_EPS_BITS", cuda_float_bits(norms ? norms->eps : 0.f)}});
  auto inputs = norm_inputs(input);
  // Without q/k norms the kernel does not read their weights: x stands in for them.
  for (auto& weight_input : weight_inputs(x, packed, q)) inputs.push_back(weight_input);
  inputs.insert(inputs.end(), {norms ? norms->q_weight : inputs[0], norms ? norms->k_weight : inputs[0],
                               split.rope.inverse_frequencies, mx::astype(split.offsets, mx::int32)});
  const int threads = 32 * kHeadWarpsPerTile * (d / 16);
  auto out = kernel(
      inputs,
      {{b, split.q_heads, t, d}, {b, split.kv_heads, t, d}, {b, split.kv_heads, t, d}, add ? x.shape() : mx::Shape{1}},
      {x.dtype(), x.dtype(), x.dtype(), x.dtype()}, {heads * threads, 1, 1}, {threads, 1, 1}, args, std::nullopt, false,
      {});
  return QkvHeads{.sum = add ? out[3] : x, .q = out[0], .k = out[1], .v = out[2]};
}

}  // namespace mlxr
