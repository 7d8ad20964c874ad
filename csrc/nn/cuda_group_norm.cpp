#include "nn/cuda_group_norm.h"

#include "nn/cuda_kernel_common.h"

namespace mlxr {

namespace {

// Elements a block of the sums kernel reads: with 256 threads, 256 a thread (32 pixels of 8 channels at 128
// channels). A 1024^2 image of 128 channels is 2,048 blocks, enough to fill the GPU; their sums are 0.5 MB.
constexpr int kSumsChunkElements = 65536;
constexpr int kThreads = 256;

// One block per (image, chunk of pixels); a pixel's C channels are C / 8 lanes' 16-byte loads, ROWS pixels a pass.
// Each thread sums its 8 channels' (x - s) and (x - s)^2 over its pixels of the chunk; the block then adds its rows
// (shared memory), then each group's channels, and thread g writes group g's two sums: sums [B * chunks, GROUPS, 2].
constexpr const char* kGroupNormSums = R"(
  constexpr int LANES = C / 8;
  constexpr int ROWS = 256 / LANES;
  constexpr int PER_GROUP = C / GROUPS;
  struct alignas(8 * sizeof(T)) Vec { T e[8]; };
  const long long pixels = static_cast<long long>(x_shape[1]) * x_shape[2];
  const long long chunks = (pixels + CHUNK_PIXELS - 1) / CHUNK_PIXELS;
  const long long b = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const int lane = threadIdx.x % LANES, r = threadIdx.x / LANES;
  const T* image = x + b * pixels * C;
  const bool aligned = reinterpret_cast<unsigned long long>(x) % sizeof(Vec) == 0;
  float shift[8], s[8], q[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    shift[e] = static_cast<float>(image[(8 * lane + e) / PER_GROUP * PER_GROUP]);
    s[e] = 0.f;
    q[e] = 0.f;
  }
  const long long end = min(pixels, (chunk + 1) * CHUNK_PIXELS);
#pragma unroll 4
  for (long long p = chunk * CHUNK_PIXELS + r; p < end; p += ROWS) {
    const T* at = image + p * C + 8 * lane;
    Vec v;
    if (aligned) {
      v = *reinterpret_cast<const Vec*>(at);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) v.e[e] = at[e];
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float d = static_cast<float>(v.e[e]) - shift[e];
      s[e] += d;
      q[e] += d * d;
    }
  }
  __shared__ float partial[2][256][8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    partial[0][threadIdx.x][e] = s[e];
    partial[1][threadIdx.x][e] = q[e];
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < LANES) {
    for (int row = 1; row < ROWS; ++row) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        s[e] += partial[0][row * LANES + lane][e];
        q[e] += partial[1][row * LANES + lane][e];
      }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      partial[0][lane][e] = s[e];
      partial[1][lane][e] = q[e];
    }
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < GROUPS) {
    const int g = threadIdx.x;
    float group_s = 0.f, group_q = 0.f;
    for (int c = g * PER_GROUP; c < (g + 1) * PER_GROUP; ++c) {
      group_s += partial[0][c / 8][c % 8];
      group_q += partial[1][c / 8][c % 8];
    }
    float* out = sums + (static_cast<long long>(blockIdx.x) * GROUPS + g) * 2;
    out[0] = group_s;
    out[1] = group_q;
  }
)";

// A thread per 8 consecutive channels of a pixel. sums [B, GROUPS, 2]: the chunks' sums added. The mean is s + S1 / n,
// the (biased) variance S2 / n - (S1 / n)^2; then MLX's normalise pass: (x - mean) * (rsqrt(var + eps) * weight) +
// bias in float32, SiLU as x * sigmoid(x), rounded once to T.
constexpr const char* kGroupNormApply = R"(
  constexpr int PER_GROUP = C / GROUPS;
  struct alignas(8 * sizeof(T)) Vec { T e[8]; };
  const long long pixels = static_cast<long long>(x_shape[1]) * x_shape[2];
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= x_shape[0] * pixels * (C / 8)) return;
  const int c0 = static_cast<int>(i % (C / 8)) * 8;
  const long long b = i / (pixels * (C / 8));
  const T* image = x + b * pixels * C;
  const bool aligned = reinterpret_cast<unsigned long long>(x) % sizeof(Vec) == 0 &&
                       reinterpret_cast<unsigned long long>(out) % sizeof(Vec) == 0;
  Vec v;
  if (aligned) {
    v = reinterpret_cast<const Vec*>(x)[i];
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) v.e[e] = x[8 * i + e];
  }
  const float count = static_cast<float>(pixels) * PER_GROUP;
  const float eps = __int_as_float(EPS_BITS);
  Vec result;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int c = c0 + e, g = c / PER_GROUP;
    const float* group = sums + (b * GROUPS + g) * 2;
    const float shifted_mean = group[0] / count;
    const float var = fmaxf(group[1] / count - shifted_mean * shifted_mean, 0.f);
    const float mean = static_cast<float>(image[g * PER_GROUP]) + shifted_mean;
    const float scale = rsqrtf(var + eps) * static_cast<float>(weight[c]);
    float y = (static_cast<float>(v.e[e]) - mean) * scale + static_cast<float>(bias[c]);
#if SILU
    y = y * (1.f / (1.f + expf(-y)));
#endif
    result.e[e] = static_cast<T>(y);
  }
  if (aligned) {
    reinterpret_cast<Vec*>(out)[i] = result;
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) out[8 * i + e] = result.e[e];
  }
)";

bool vae_fusion_on_cuda() {
  static EnvSwitch vae_fusion("MLXRUNNER_VAE_FUSION");
  return !vae_fusion.off() && running_on_cuda();
}

}  // namespace

std::optional<mx::array> cuda_group_norm(const mx::array& x, const GroupNorm& norm, bool then_silu) {
  if (!vae_fusion_on_cuda() || x.ndim() != 4 || !half_precision(x.dtype()) || x.size() == 0) return std::nullopt;
  const int b = x.shape(0), c = x.shape(3), groups = norm.groups;
  if (c % 8 != 0 || kThreads % (c / 8) != 0 || groups > kThreads || c % groups != 0) return std::nullopt;
  if (norm.weight.shape() != mx::Shape{c} || norm.bias.shape() != mx::Shape{c}) return std::nullopt;
  const long long pixels = static_cast<long long>(x.shape(1)) * x.shape(2);
  const int chunk_pixels = kSumsChunkElements / c;
  const long long chunks = (pixels + chunk_pixels - 1) / chunk_pixels;
  static auto sums_kernel = cuda_kernel("mlxr_group_norm_sums", {"x"}, {"sums"}, kGroupNormSums, "", true);
  static auto apply = cuda_kernel("mlxr_group_norm", {"x", "sums", "weight", "bias"}, {"out"}, kGroupNormApply,
                                  "#define SILU 0\n", true);
  static auto apply_silu = cuda_kernel("mlxr_group_norm_silu", {"x", "sums", "weight", "bias"}, {"out"},
                                       kGroupNormApply, "#define SILU 1\n", true);
  const std::tuple<int, int, int> block{kThreads, 1, 1};
  auto chunk_sums = sums_kernel({x}, {{b, static_cast<int>(chunks), groups, 2}}, {mx::float32},
                                {cuda_checked_threads(b * chunks * kThreads), 1, 1}, block,
                                {{"T", x.dtype()}, {"C", c}, {"GROUPS", groups}, {"CHUNK_PIXELS", chunk_pixels}},
                                std::nullopt, false, {})[0];
  auto group_sums = mx::sum(chunk_sums, 1);  // [B, GROUPS, 2]
  const long long vectors = b * pixels * (c / 8);
  const std::tuple<int, int, int> grid{cuda_checked_threads((vectors + kThreads - 1) / kThreads * kThreads), 1, 1};
  auto& kernel = then_silu ? apply_silu : apply;
  return kernel({x, group_sums, norm.weight, norm.bias}, {x.shape()}, {x.dtype()}, grid, block,
                {{"T", x.dtype()}, {"C", c}, {"GROUPS", groups}, {"EPS_BITS", cuda_float_bits(norm.eps)}}, std::nullopt,
                false, {})[0];
}

}  // namespace mlxr
