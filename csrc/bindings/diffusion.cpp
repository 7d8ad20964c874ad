// Image generation: the flow-matching schedule, the VAE, the Z-Image and FLUX.2 transformers, their
// denoising loops and FLUX.2's latent layouts.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "bindings/bindings.h"
#include "bindings/config.h"
#include "bindings/network.h"
#include "bindings/progress.h"
#include "diffusion/flow_match.h"
#include "diffusion/flux2_dit.h"
#include "diffusion/flux2_latents.h"
#include "diffusion/vae.h"
#include "diffusion/zimage_dit.h"

namespace mlxr::bindings {

namespace {

void bind_configs(nb::module_& m) {
  bind_config<FlowMatchSchedule>(m, "FlowMatchSchedule",
                                 "FlowMatchEulerDiscreteScheduler's config (scheduler/scheduler_config.json).");
  bind_config<VaeConfig>(m, "VaeConfig", "AutoencoderKL's config (vae/config.json).");
  bind_config<ZImageConfig>(m, "ZImageConfig", "ZImageTransformer2DModel's config (transformer/config.json).");
  bind_config<Flux2Config>(m, "Flux2Config", "Flux2Transformer2DModel's config (transformer/config.json).");
}

void bind_schedule(nb::module_& m) {
  m.def("flow_match_sigmas", &flow_match_sigmas, "base"_a, "schedule"_a, "mu"_a = nb::none(),
        "The N + 1 float32 sigmas (last 0) the scheduler makes from a pipeline's N base sigmas.");
  m.def("linspace", &linspace, "start"_a, "stop"_a, "n"_a, "numpy.linspace in float64.");
  m.attr("DEFAULT_DENOISE_QUEUE_DEPTH") = kDefaultEvalQueueDepth;
}

void bind_step_cache(nb::module_& m) {
  nb::class_<StepCache>(m, "StepCache",
                        "The first-block step cache of one denoising run (diffusers' FirstBlockCache): pass it to a "
                        "denoising loop, then read how many network evaluations ran in full and how many skipped "
                        "their remaining blocks.")
      .def(nb::init<float>(), "threshold"_a,
           "threshold > 0: an evaluation skips its remaining blocks when the first block's residual changed by at "
           "most this relative mean absolute difference since the last computed evaluation.")
      .def_prop_ro("threshold", &StepCache::threshold)
      .def_prop_ro("computed", &StepCache::computed)
      .def_prop_ro("skipped", &StepCache::skipped)
      .def("decisions", &StepCache::decisions, "branch"_a = 0,
           "One bool per evaluation of `branch` (0: conditional, 1: CFG's unconditional), in order: True where the "
           "evaluation ran in full.");
}

// The loop's controls from the bindings' keyword arguments.
DenoiseControl denoise_control(nb::object progress, nb::object check_cancelled, int queue_depth, StepCache* cache) {
  return DenoiseControl{.on_step = step_callback(progress),
                        .between_blocks = cancel_check(check_cancelled),
                        .queue_depth = queue_depth,
                        .cache = cache};
}

void bind_vae(nb::module_& m) {
  bind_network<VaeDecoder>(m, "VaeDecoder", "AutoencoderKL decoder (NHWC in and out).")
      .def(
          "decode",
          [](const VaeDecoder& self, const mx::array& z, int tile, nb::object check_cancelled) {
            auto between_blocks = cancel_check(check_cancelled);
            nb::gil_scoped_release release;
            return evaluated(tile > 0 ? self.tiled(z, tile, kTileOverlapFactor, between_blocks)
                                      : self(z, between_blocks));
          },
          "z"_a, "tile"_a = 0, "check_cancelled"_a = nb::none(),
          "Latents [B, h, w, C] -> image [B, 8h, 8w, 3] in about [-1, 1]; tile > 0 decodes in overlapping "
          "tiles of that many latents (diffusers' tiled_decode). check_cancelled() is called between decoder "
          "blocks and tiles; an exception it raises stops the decode and propagates.")
      .def_prop_ro("scale_factor", &VaeDecoder::scale_factor);

  bind_network<VaeEncoder>(m, "VaeEncoder", "AutoencoderKL encoder (NHWC in and out).")
      .def(
          "encode",
          [](const VaeEncoder& self, const mx::array& x, int tile, nb::object check_cancelled) {
            auto between_blocks = cancel_check(check_cancelled);
            nb::gil_scoped_release release;
            return evaluated(tile > 0 ? self.tiled(x, tile, kTileOverlapFactor, between_blocks)
                                      : self(x, between_blocks));
          },
          "image"_a, "tile"_a = 0, "check_cancelled"_a = nb::none(),
          "Image [B, H, W, 3] in [-1, 1] -> the posterior mean [B, H/8, W/8, C]; tile > 0 encodes in overlapping "
          "tiles of that many pixels (diffusers' _tiled_encode). check_cancelled() is called between encoder "
          "blocks and tiles; an exception it raises stops the encode and propagates.")
      .def_prop_ro("scale_factor", &VaeEncoder::scale_factor);
}

void bind_zimage(nb::module_& m) {
  bind_network<ZImageTransformer>(m, "ZImageTransformer", "Z-Image's S3-DiT (ZImageTransformer2DModel).")
      .def(
          "forward",
          [](const ZImageTransformer& self, const mx::array& latents, const mx::array& t,
             const std::vector<mx::array>& captions) { return evaluated(self.forward(latents, t, captions)); },
          "latents"_a, "t"_a, "captions"_a, nb::call_guard<nb::gil_scoped_release>(),
          "One evaluation: latents [B, C, H, W], t [B] (1 - sigma), one [L, cap_dim] caption per sample -> "
          "the raw model output, float32 [B, C, H, W].")
      .def_prop_ro("dtype", &ZImageTransformer::dtype);

  m.def(
      "zimage_denoise",
      [](const ZImageTransformer& model, const mx::array& latents, const std::vector<float>& sigmas,
         const mx::array& caption, std::optional<mx::array> negative, float guidance, nb::object progress,
         int queue_depth, nb::object check_cancelled, StepCache* cache) {
        auto control = denoise_control(progress, check_cancelled, queue_depth, cache);
        nb::gil_scoped_release release;
        return zimage_denoise(model, latents, sigmas, caption, negative, guidance, control);
      },
      "model"_a, "latents"_a, "sigmas"_a, "caption"_a, "negative"_a = nb::none(), "guidance"_a = 0.0f,
      "progress"_a = nb::none(), "queue_depth"_a = kDefaultEvalQueueDepth, "check_cancelled"_a = nb::none(),
      "cache"_a = nb::none(),
      "The Z-Image Euler loop: float32 latents [1, C, H, W] -> final latents, or None when progress(step, "
      "total) returned False. CFG (pos + guidance * (pos - neg)) when a negative caption is given. At most "
      "queue_depth transformer blocks are queued on the device (0: no bound). check_cancelled() is called "
      "between transformer blocks; an exception it raises stops the loop and propagates. cache: a StepCache.");
}

void bind_flux2(nb::module_& m) {
  bind_network<Flux2Transformer>(m, "Flux2Transformer", "FLUX.2's MM-DiT (Flux2Transformer2DModel, Klein).")
      .def(
          "forward",
          [](const Flux2Transformer& self, const mx::array& hidden, const mx::array& context, const mx::array& timestep,
             const mx::array& img_ids, const mx::array& txt_ids) {
            auto ids = flux2_ids(txt_ids);
            auto image = flux2_ids(img_ids);
            ids.insert(ids.end(), image.begin(), image.end());
            return evaluated(self.forward(hidden, context, timestep, self.rope_table(ids)));
          },
          "hidden_states"_a, "encoder_hidden_states"_a, "timestep"_a, "img_ids"_a, "txt_ids"_a,
          nb::call_guard<nb::gil_scoped_release>(),
          "One evaluation as diffusers calls it: image tokens [B, L, C], text [B, T, J], timestep [B] (t / 1000), "
          "ids [L, 4] and [T, 4] -> the raw output, float32 [B, L, C].")
      .def_prop_ro("dtype", &Flux2Transformer::dtype);

  m.def("flux2_empirical_mu", &flux2_empirical_mu, "image_seq_len"_a, "num_steps"_a,
        "diffusers' compute_empirical_mu (FLUX.2's dynamic-shift mu; noise tokens only).");

  m.def(
      "flux2_denoise",
      [](const Flux2Transformer& model, const mx::array& latents, const mx::array& latent_ids,
         const std::vector<float>& sigmas, const mx::array& prompt, std::optional<mx::array> negative, float guidance,
         std::optional<mx::array> references, std::optional<mx::array> reference_ids, nb::object progress,
         int queue_depth, nb::object check_cancelled, StepCache* cache) {
        auto control = denoise_control(progress, check_cancelled, queue_depth, cache);
        nb::gil_scoped_release release;
        auto ids = flux2_ids(latent_ids);
        std::vector<Flux2Id> ref_ids;
        if (references) {
          if (!reference_ids) throw std::invalid_argument("flux2_denoise: reference tokens need reference_ids");
          ref_ids = flux2_ids(*reference_ids);
        }
        return flux2_denoise(model, latents, ids, sigmas, prompt, negative, guidance, references, ref_ids, control);
      },
      "model"_a, "latents"_a, "latent_ids"_a, "sigmas"_a, "prompt"_a, "negative"_a = nb::none(), "guidance"_a = 1.0f,
      "references"_a = nb::none(), "reference_ids"_a = nb::none(), "progress"_a = nb::none(),
      "queue_depth"_a = kDefaultEvalQueueDepth, "check_cancelled"_a = nb::none(), "cache"_a = nb::none(),
      "The FLUX.2 Klein Euler loop over packed latents [1, L, C] -> final packed latents (float32), or None when "
      "progress(step, total) returned False. True CFG (v_neg + guidance * (v_pos - v_neg)) when a negative "
      "embedding is given; reference-image tokens [1, Lr, C] with their ids condition every call. At most "
      "queue_depth transformer blocks are queued on the device (0: no bound). check_cancelled() is called between "
      "transformer blocks; an exception it raises stops the loop and propagates. cache: a StepCache (the "
      "conditional and unconditional calls keep separate states).");
}

void bind_flux2_latents(nb::module_& m) {
  m.def("flux2_patchify", &flux2_patchify, "z"_a,
        "[B, C, H, W] -> [B, 4C, H/2, W/2], channel c * 4 + dy * 2 + dx (diffusers' _patchify_latents).");
  m.def("flux2_unpatchify", &flux2_unpatchify, "z"_a, "flux2_patchify's inverse.");
  m.def("flux2_pack", &flux2_pack, "z"_a, "[B, C, h, w] -> tokens [B, h * w, C], row-major.");
  m.def("flux2_unpack", &flux2_unpack, "tokens"_a, "h"_a, "w"_a, "flux2_pack's inverse.");
  m.def(
      "flux2_image_ids", [](int h, int w, int t) { return flux2_ids_array(flux2_image_ids(h, w, t)); }, "h"_a, "w"_a,
      "t"_a = 0, "(t, y, x, 0) for every token of an h x w grid, row-major: int32 [h * w, 4].");
}

}  // namespace

void bind_diffusion(nb::module_& m) {
  bind_configs(m);
  bind_schedule(m);
  bind_step_cache(m);
  bind_vae(m);
  bind_zimage(m);
  bind_flux2(m);
  bind_flux2_latents(m);
}

}  // namespace mlxr::bindings
