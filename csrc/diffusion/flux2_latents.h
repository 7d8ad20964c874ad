// FLUX.2's latent layouts and token positions (diffusers' Flux2 pipeline helpers).
//
// The VAE's latents [B, C, H, W] are 2x2-patchified to [B, 4C, H/2, W/2] (BatchNorm-normalised
// there) and packed into tokens [B, H/2 * W/2, 4C], row-major. Every token has a 4-axis position
// (T, H, W, L): text tokens (0, 0, 0, l), the noise (0, y, x, 0), reference image k (10 (k + 1), y, x, 0).
#pragma once

#include <array>
#include <vector>

#include "nn/weights.h"

namespace mlxr {

// One token's position (T, H, W, L).
using Flux2Id = std::array<int, 4>;

// Text ids (0, 0, 0, l), l < length.
std::vector<Flux2Id> flux2_text_ids(int length);
// Image ids (t, y, x, 0) of an h x w token grid, row-major.
std::vector<Flux2Id> flux2_image_ids(int h, int w, int t = 0);

// Ids [L, 4] (any integer dtype) from Python -> host values, and back as int32 [L, 4].
std::vector<Flux2Id> flux2_ids(const mx::array& ids);
mx::array flux2_ids_array(const std::vector<Flux2Id>& ids);

// [B, C, H, W] -> [B, 4C, H/2, W/2]: channel c * 4 + dy * 2 + dx holds pixel (2y + dy, 2x + dx) of channel c.
mx::array flux2_patchify(const mx::array& z);
// flux2_patchify's inverse.
mx::array flux2_unpatchify(const mx::array& z);

// [B, C, h, w] -> tokens [B, h * w, C], row-major.
mx::array flux2_pack(const mx::array& z);
// flux2_pack's inverse (diffusers scatters by ids; for the ids flux2_image_ids makes that is a reshape).
mx::array flux2_unpack(const mx::array& tokens, int h, int w);

}  // namespace mlxr
