#include "diffusion/flux2_latents.h"

#include <stdexcept>
#include <string>

#include "nn/host.h"

namespace mlxr {

namespace {

void check_image_shape(const mx::array& z, int channel_multiple, int side_multiple, const char* what) {
  if (z.ndim() != 4 || z.shape(1) % channel_multiple || z.shape(2) % side_multiple || z.shape(3) % side_multiple) {
    throw std::invalid_argument(std::string("FLUX.2: ") + what + " takes [B, C, H, W] with C a multiple of " +
                                std::to_string(channel_multiple) + " and H, W multiples of " +
                                std::to_string(side_multiple) + ", got " + shape_string(z.shape()));
  }
}

}  // namespace

std::vector<Flux2Id> flux2_text_ids(int length) {
  std::vector<Flux2Id> ids(length);
  for (int l = 0; l < length; ++l) ids[l] = {0, 0, 0, l};
  return ids;
}

std::vector<Flux2Id> flux2_image_ids(int h, int w, int t) {
  if (h < 0 || w < 0) throw std::invalid_argument("FLUX.2: a token grid cannot have a negative side");
  std::vector<Flux2Id> ids;
  ids.reserve(static_cast<size_t>(h) * w);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) ids.push_back({t, y, x, 0});
  return ids;
}

std::vector<Flux2Id> flux2_ids(const mx::array& ids) {
  auto a = ids;
  if (a.ndim() == 3 && a.shape(0) == 1) a = mx::squeeze(a, 0);
  if (a.ndim() != 2 || a.shape(1) != 4) {
    throw std::invalid_argument("FLUX.2: position ids must be [L, 4], got " + shape_string(ids.shape()));
  }
  a = to_host(mx::astype(a, mx::int32));
  const int32_t* data = a.data<int32_t>();
  std::vector<Flux2Id> out(a.shape(0));
  for (int i = 0; i < a.shape(0); ++i) out[i] = {data[4 * i], data[4 * i + 1], data[4 * i + 2], data[4 * i + 3]};
  return out;
}

mx::array flux2_ids_array(const std::vector<Flux2Id>& ids) {
  std::vector<int32_t> flat;
  flat.reserve(ids.size() * 4);
  for (const auto& id : ids) flat.insert(flat.end(), id.begin(), id.end());
  return mx::array(flat.data(), {static_cast<int>(ids.size()), 4}, mx::int32);
}

mx::array flux2_patchify(const mx::array& z) {
  check_image_shape(z, 1, 2, "patchify");
  const int b = z.shape(0), c = z.shape(1), h = z.shape(2), w = z.shape(3);
  auto patches = mx::transpose(mx::reshape(z, {b, c, h / 2, 2, w / 2, 2}), {0, 1, 3, 5, 2, 4});
  return mx::reshape(patches, {b, c * 4, h / 2, w / 2});
}

mx::array flux2_unpatchify(const mx::array& z) {
  check_image_shape(z, 4, 1, "unpatchify");
  const int b = z.shape(0), c = z.shape(1), h = z.shape(2), w = z.shape(3);
  auto pixels = mx::transpose(mx::reshape(z, {b, c / 4, 2, 2, h, w}), {0, 1, 4, 2, 5, 3});
  return mx::reshape(pixels, {b, c / 4, h * 2, w * 2});
}

mx::array flux2_pack(const mx::array& z) {
  check_image_shape(z, 1, 1, "pack");
  const int b = z.shape(0), c = z.shape(1), h = z.shape(2), w = z.shape(3);
  return mx::transpose(mx::reshape(z, {b, c, h * w}), {0, 2, 1});
}

mx::array flux2_unpack(const mx::array& tokens, int h, int w) {
  if (tokens.ndim() != 3 || tokens.shape(1) != h * w) {
    throw std::invalid_argument("FLUX.2: unpack takes tokens [B, " + std::to_string(h) + " * " + std::to_string(w) +
                                ", C], got " + shape_string(tokens.shape()));
  }
  const int b = tokens.shape(0), c = tokens.shape(2);
  return mx::reshape(mx::transpose(tokens, {0, 2, 1}), {b, c, h, w});
}

}  // namespace mlxr
