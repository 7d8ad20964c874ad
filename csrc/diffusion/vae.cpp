#include "diffusion/vae.h"

#include <cmath>
#include <optional>

#include "nn/activation.h"
#include "nn/attention.h"

namespace mlxr {

namespace {

// MLX queues operations ahead of the device and holds each queued operation's inputs until it has run (up to ten
// batches of operations ahead), so a decoder built as one graph holds many full-size activations at once. Evaluated
// at each block's end and inside each ResNet block, the decoder holds about one block's working set: 10 bytes per
// output pixel per channel of its second block on the CPU (float32), at every size; as one graph 26-33 (and a
// 1024^2 decode of the tiny test VAE 1,133 MiB instead of 323; benchmarks/README.md).
//
// On the CPU each point waits for what is queued (a wait costs nothing measurable beside the convolutions). On a GPU
// a wait at every point left the device idle while the host built the next part's operations: a 1024^2 decode took
// 80 ms instead of 65 on an H200. There a point waits only for the point before it, so the device runs one part
// while the host builds the next, at the cost of one more part's activations.
thread_local bool in_settling_scope = false;          // inside a decode or encode on this thread
thread_local std::optional<mx::array> still_running;  // a GPU's last point there

void settle(const mx::array& x) {
  if (mx::default_device() != mx::Device::gpu || !in_settling_scope) {
    mx::eval(x);
    return;
  }
  mx::async_eval(x);
  if (still_running) still_running->wait();
  still_running = x;
}

// Held through a decode or encode: at its end, or when a cancellation throws out of it, the thread lets go of its
// last point's array (MLX keeps the buffers of anything still running alive by itself).
struct SettlingScope {
  bool outer = !in_settling_scope;
  SettlingScope() { in_settling_scope = true; }
  ~SettlingScope() {
    if (!outer) return;  // nested in another decode or encode on this thread: the outermost scope ends it
    in_settling_scope = false;
    still_running.reset();
  }
};

// The end of a block: settled, then between_blocks (a cancellation check) if there is one.
void end_block(const mx::array& x, const BetweenBlocks& between_blocks) {
  settle(x);
  if (between_blocks) between_blocks();
}

}  // namespace

ResnetBlock ResnetBlock::load(const Weights& w, int in_channels, int out_channels, const VaeConfig& c) {
  ResnetBlock block{.norm1 = GroupNorm::load(w.sub("norm1"), in_channels, c.norm_num_groups, kVaeNormEps),
                    .norm2 = GroupNorm::load(w.sub("norm2"), out_channels, c.norm_num_groups, kVaeNormEps),
                    .conv1 = Conv2d::load(w.sub("conv1"), in_channels, out_channels, 3),
                    .conv2 = Conv2d::load(w.sub("conv2"), out_channels, out_channels, 3)};
  if (in_channels != out_channels) {
    block.conv_shortcut = Conv2d::load(w.sub("conv_shortcut"), in_channels, out_channels, 1);
  }
  return block;
}

mx::array ResnetBlock::operator()(const mx::array& x) const {
  auto h = conv1(norm1(x, /*then_silu=*/true));
  settle(h);  // the first norm's temporaries go before the second's are queued
  return conv2(norm2(h, /*then_silu=*/true), conv_shortcut ? (*conv_shortcut)(x) : x);
}

VaeAttention VaeAttention::load(const Weights& w, int channels, const VaeConfig& c) {
  return VaeAttention{.group_norm = GroupNorm::load(w.sub("group_norm"), channels, c.norm_num_groups, kVaeNormEps),
                      .projections = AttentionProjections::load(w, channels, true)};
}

mx::array VaeAttention::operator()(const mx::array& x) const {
  const int b = x.shape(0), h = x.shape(1), w = x.shape(2), c = x.shape(3);
  auto tokens = mx::reshape(group_norm(x), {b, 1, h * w, c});  // one head of width C
  auto out = attention_in_query_bands(projections.to_q(tokens), projections.to_k(tokens), projections.to_v(tokens),
                                      kVaeMaxAttentionScores);
  return mx::add(x, mx::reshape(projections.to_out(out), {b, h, w, c}));
}

VaeMidBlock VaeMidBlock::load(const Weights& w, int channels, const VaeConfig& c) {
  VaeMidBlock mid{.resnet0 = ResnetBlock::load(w.sub("resnets.0"), channels, channels, c),
                  .resnet1 = ResnetBlock::load(w.sub("resnets.1"), channels, channels, c)};
  if (c.mid_block_add_attention) {
    mid.attention = VaeAttention::load(w.sub("attentions.0"), channels, c);
  }
  return mid;
}

mx::array VaeMidBlock::operator()(const mx::array& x) const {
  auto h = resnet0(x);
  if (attention) h = (*attention)(h);
  return resnet1(h);
}

namespace {

void check_config(const VaeConfig& c) {
  if (c.block_out_channels.empty() || c.layers_per_block < 1 || c.latent_channels < 1) {
    throw std::invalid_argument(
        "VAE config: block_out_channels, layers_per_block and latent_channels must be positive");
  }
}

}  // namespace

VaeDecoder::VaeDecoder(const VaeConfig& config, const WeightMap& weights)
    : config_((check_config(config), config)),
      conv_in_(Conv2d::load(Weights(weights, "decoder.conv_in"), config.latent_channels,
                            config.block_out_channels.back(), 3)),
      mid_(VaeMidBlock::load(Weights(weights, "decoder.mid_block"), config.block_out_channels.back(), config)),
      norm_out_(GroupNorm::load(Weights(weights, "decoder.conv_norm_out"), config.block_out_channels.front(),
                                config.norm_num_groups, kVaeNormEps)),
      conv_out_(Conv2d::load(Weights(weights, "decoder.conv_out"), config.block_out_channels.front(),
                             config.out_channels, 3)) {
  Weights root(weights);
  if (config.use_post_quant_conv) {
    post_quant_conv_ = Conv2d::load(root.sub("post_quant_conv"), config.latent_channels, config.latent_channels, 1);
  }
  std::vector<int> channels(config.block_out_channels.rbegin(), config.block_out_channels.rend());
  int previous = channels.front();
  for (size_t i = 0; i < channels.size(); ++i) {
    auto w = root.sub("decoder.up_blocks." + std::to_string(i));
    VaeUpBlock block;
    for (int j = 0; j <= config.layers_per_block; ++j) {
      block.resnets.push_back(ResnetBlock::load(w.sub("resnets." + std::to_string(j)), j == 0 ? previous : channels[i],
                                                channels[i], config));
    }
    if (i + 1 < channels.size()) {
      block.upsampler = Conv2d::load(w.sub("upsamplers.0.conv"), channels[i], channels[i], 3);
    }
    up_blocks_.push_back(std::move(block));
    previous = channels[i];
  }
}

mx::array VaeDecoder::operator()(const mx::array& z, const BetweenBlocks& between_blocks) const {
  SettlingScope settling;
  auto x = post_quant_conv_ ? (*post_quant_conv_)(z) : z;
  x = mid_(conv_in_(x));
  end_block(x, between_blocks);
  for (const auto& block : up_blocks_) {
    for (const auto& resnet : block.resnets) {
      x = resnet(x);
      end_block(x, between_blocks);
    }
    if (block.upsampler) {
      x = block.upsampler->upsampled_2x(x);
      settle(x);
    }
  }
  return conv_out_(norm_out_(x, /*then_silu=*/true));
}

namespace {

// diffusers' blend_v / blend_h: the first `extent` rows (columns) of `b` fade in from the last
// `extent` rows (columns) of `a`, weight y / extent for b. `axis` 1 = rows (H), 2 = columns (W).
mx::array blend(const mx::array& a, const mx::array& b, int extent, int axis) {
  extent = std::min({a.shape(axis), b.shape(axis), extent});
  if (extent <= 0) return b;
  std::vector<float> ramp(extent);
  for (int y = 0; y < extent; ++y) ramp[y] = static_cast<float>(y) / static_cast<float>(extent);
  mx::Shape shape{1, 1, 1, 1};
  shape[axis] = extent;
  auto weight_b = mx::reshape(mx::array(ramp.data(), {extent}, mx::float32), shape);
  auto tail_a = mx::slice(a, {0, axis == 1 ? a.shape(1) - extent : 0, axis == 2 ? a.shape(2) - extent : 0, 0},
                          {a.shape(0), a.shape(1), a.shape(2), a.shape(3)});
  auto stop = b.shape();
  stop[axis] = extent;
  auto head_b = mx::slice(b, {0, 0, 0, 0}, stop);
  auto mixed = mx::add(mx::multiply(mx::astype(tail_a, mx::float32), mx::subtract(mx::array(1.0f), weight_b)),
                       mx::multiply(mx::astype(head_b, mx::float32), weight_b));
  auto start = mx::Shape{0, 0, 0, 0};
  start[axis] = extent;
  auto rest = mx::slice(b, start, b.shape());
  return mx::concatenate({mx::astype(mixed, b.dtype()), rest}, axis);
}

}  // namespace

mx::array tiled_pass(const mx::array& x, int tile, int out_tile, float overlap_factor,
                     const std::function<mx::array(const mx::array&)>& network, const BetweenBlocks& between_blocks) {
  const int stride = static_cast<int>(tile * (1 - overlap_factor));
  const int extent = static_cast<int>(out_tile * overlap_factor);
  const int keep = out_tile - extent;
  if (stride <= 0 || keep <= 0) throw std::invalid_argument("VAE tiling: tile too small for the overlap");
  const int h = x.shape(1), w = x.shape(2);
  std::vector<std::vector<mx::array>> rows;
  for (int i = 0; i < h; i += stride) {
    std::vector<mx::array> row;
    for (int j = 0; j < w; j += stride) {
      auto piece = mx::slice(x, {0, i, j, 0}, {x.shape(0), std::min(h, i + tile), std::min(w, j + tile), x.shape(3)});
      auto out = network(piece);
      mx::eval(out);  // one tile's activations at a time: that is the point of tiling
      if (between_blocks) between_blocks();
      row.push_back(out);
    }
    rows.push_back(std::move(row));
  }
  std::vector<mx::array> result_rows;
  for (size_t i = 0; i < rows.size(); ++i) {
    std::vector<mx::array> kept;
    for (size_t j = 0; j < rows[i].size(); ++j) {
      auto t = rows[i][j];
      if (i > 0) t = blend(rows[i - 1][j], t, extent, 1);
      if (j > 0) t = blend(rows[i][j - 1], t, extent, 2);
      rows[i][j] = t;  // diffusers blends in place: later neighbours see the blended tile
      kept.push_back(
          mx::slice(t, {0, 0, 0, 0}, {t.shape(0), std::min(keep, t.shape(1)), std::min(keep, t.shape(2)), t.shape(3)}));
    }
    result_rows.push_back(mx::concatenate(kept, 2));
  }
  return mx::concatenate(result_rows, 1);
}

mx::array VaeDecoder::tiled(const mx::array& z, int tile, float overlap_factor,
                            const BetweenBlocks& between_blocks) const {
  return tiled_pass(
      z, tile, tile * scale_factor(), overlap_factor,
      [&](const mx::array& piece) { return (*this)(piece, between_blocks); }, between_blocks);
}

VaeEncoder::VaeEncoder(const VaeConfig& config, const WeightMap& weights)
    : config_((check_config(config), config)),
      conv_in_(
          Conv2d::load(Weights(weights, "encoder.conv_in"), config.in_channels, config.block_out_channels.front(), 3)),
      mid_(VaeMidBlock::load(Weights(weights, "encoder.mid_block"), config.block_out_channels.back(), config)),
      norm_out_(GroupNorm::load(Weights(weights, "encoder.conv_norm_out"), config.block_out_channels.back(),
                                config.norm_num_groups, kVaeNormEps)),
      // The posterior's mean and log-variance (AutoencoderKL's encoder always has double_z).
      conv_out_(Conv2d::load(Weights(weights, "encoder.conv_out"), config.block_out_channels.back(),
                             2 * config.latent_channels, 3)) {
  Weights root(weights);
  const auto& channels = config.block_out_channels;
  int previous = channels.front();
  for (size_t i = 0; i < channels.size(); ++i) {
    auto w = root.sub("encoder.down_blocks." + std::to_string(i));
    VaeDownBlock block;
    for (int j = 0; j < config.layers_per_block; ++j) {
      block.resnets.push_back(ResnetBlock::load(w.sub("resnets." + std::to_string(j)), j == 0 ? previous : channels[i],
                                                channels[i], config));
    }
    if (i + 1 < channels.size()) {
      block.downsampler = Conv2d::load(w.sub("downsamplers.0.conv"), channels[i], channels[i], 3, 2, 0);
    }
    down_blocks_.push_back(std::move(block));
    previous = channels[i];
  }
  if (config.use_quant_conv) {
    const int moments = 2 * config.latent_channels;
    quant_conv_ = Conv2d::load(root.sub("quant_conv"), moments, moments, 1);
  }
}

mx::array VaeEncoder::operator()(const mx::array& image, const BetweenBlocks& between_blocks) const {
  SettlingScope settling;
  auto x = conv_in_(image);
  for (const auto& block : down_blocks_) {
    for (const auto& resnet : block.resnets) {
      x = resnet(x);
      end_block(x, between_blocks);
    }
    if (block.downsampler) {
      // diffusers' Downsample2D(padding=0) pads (0, 1, 0, 1): one zero row below, one column right.
      x = mx::pad(x, {{0, 0}, {0, 1}, {0, 1}, {0, 0}});
      x = (*block.downsampler)(x);
    }
  }
  x = mid_(x);
  end_block(x, between_blocks);
  x = conv_out_(norm_out_(x, /*then_silu=*/true));
  if (quant_conv_) x = (*quant_conv_)(x);
  // The posterior's mode is its mean: the first latent_channels channels.
  return mx::slice(x, {0, 0, 0, 0}, {x.shape(0), x.shape(1), x.shape(2), config_.latent_channels});
}

mx::array VaeEncoder::tiled(const mx::array& image, int tile, float overlap_factor,
                            const BetweenBlocks& between_blocks) const {
  // Blending the mean alone is blending the moments diffusers blends: the blend is per channel.
  return tiled_pass(
      image, tile, tile / scale_factor(), overlap_factor,
      [&](const mx::array& piece) { return (*this)(piece, between_blocks); }, between_blocks);
}

}  // namespace mlxr
