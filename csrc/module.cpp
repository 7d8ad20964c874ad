// nanobind bindings for mlxrunner._core. Bindings only: the work lives in nn/, embed/, ...
//
// mx.array crosses the boundary because this module shares nanobind's type registry with
// mlx.core (NB_DOMAIN mlx in CMakeLists.txt) and imports mlx.core before anything is bound.
// Long computations release the GIL and are evaluated before returning, so Python threads
// (the aiohttp loop) keep running while MLX works.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unordered_map.h>
#include <nanobind/stl/vector.h>

#include "nn/host.h"
#include "diffusion/flow_match.h"
#include "diffusion/flux2_dit.h"
#include "diffusion/vae.h"
#include "diffusion/zimage_dit.h"
#include "embed/bert.h"
#include "sampling.h"
#include "text/decoder.h"
#include "text/generate.h"
#include "mlx/version.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

namespace {

void bind_building_blocks(nb::module_& m) {
  m.def("gelu", [](const mx::array& x) { return mlxr::gelu(x); }, "x"_a,
        "Exact (erf) GELU, as torch.nn.functional.gelu.");
  m.def("linear",
        [](const mx::array& x, const mx::array& weight, std::optional<mx::array> bias) {
          return mlxr::Linear{weight, bias}(x);
        },
        "x"_a, "weight"_a, "bias"_a = nb::none(), "x @ weight.T + bias, weight stored [out, in] as in PyTorch.");
  m.def("pool",
        [](const mx::array& hidden, const mx::array& mask, const std::string& mode) {
          return mlxr::pool(hidden, mask, mlxr::pooling_from_name(mode));
        },
        "hidden"_a, "attention_mask"_a, "mode"_a = "mean",
        "Pool hidden states [B, T, H] over unmasked tokens: mean, cls, max or mean_sqrt_len.");
  m.def("l2_normalize", &mlxr::l2_normalize, "x"_a, "Row-wise L2 normalisation (eps 1e-12).");
}

void bind_bert(nb::module_& m) {
  nb::class_<mlxr::BertConfig>(m, "BertConfig")
      .def(nb::init<>())
      .def_rw("vocab_size", &mlxr::BertConfig::vocab_size)
      .def_rw("hidden_size", &mlxr::BertConfig::hidden_size)
      .def_rw("num_hidden_layers", &mlxr::BertConfig::num_hidden_layers)
      .def_rw("num_attention_heads", &mlxr::BertConfig::num_attention_heads)
      .def_rw("intermediate_size", &mlxr::BertConfig::intermediate_size)
      .def_rw("max_position_embeddings", &mlxr::BertConfig::max_position_embeddings)
      .def_rw("type_vocab_size", &mlxr::BertConfig::type_vocab_size)
      .def_rw("layer_norm_eps", &mlxr::BertConfig::layer_norm_eps)
      .def_rw("hidden_act", &mlxr::BertConfig::hidden_act);

  nb::class_<mlxr::BertEncoder>(m, "BertEncoder",
                                "BERT encoder (transformers' BertModel) with sentence-transformers pooling.")
      .def(nb::init<const mlxr::BertConfig&, const mlxr::WeightMap&>(), "config"_a, "weights"_a)
      .def(
          "forward",
          [](const mlxr::BertEncoder& self, const mx::array& ids, const mx::array& mask,
             std::optional<mx::array> token_types) {
            auto out = self.forward(ids, mask, token_types);
            mx::eval(out);
            return out;
          },
          "input_ids"_a, "attention_mask"_a, "token_type_ids"_a = nb::none(),
          nb::call_guard<nb::gil_scoped_release>(), "Last hidden state [B, T, H].")
      .def(
          "embed",
          [](const mlxr::BertEncoder& self, const mx::array& ids, const mx::array& mask, const std::string& pooling,
             bool normalize) {
            auto out = self.embed(ids, mask, mlxr::pooling_from_name(pooling), normalize);
            mx::eval(out);
            return out;
          },
          "input_ids"_a, "attention_mask"_a, "pooling"_a = "mean", "normalize"_a = true,
          nb::call_guard<nb::gil_scoped_release>(), "One float32 vector per input row: [B, H].")
      .def_prop_ro("hidden_size", [](const mlxr::BertEncoder& self) { return self.config().hidden_size; })
      .def_prop_ro("max_positions",
                   [](const mlxr::BertEncoder& self) { return self.config().max_position_embeddings; });
}

void bind_sampling(nb::module_& m) {
  nb::class_<mlxr::SamplerOptions>(m, "SamplerOptions",
                                   "Sampling options; the order of operations is documented in csrc/sampling.h.")
      .def(nb::init<>())
      .def_rw("temperature", &mlxr::SamplerOptions::temperature)
      .def_rw("top_k", &mlxr::SamplerOptions::top_k)
      .def_rw("top_p", &mlxr::SamplerOptions::top_p)
      .def_rw("min_p", &mlxr::SamplerOptions::min_p)
      .def_rw("repeat_penalty", &mlxr::SamplerOptions::repeat_penalty)
      .def_rw("repeat_last_n", &mlxr::SamplerOptions::repeat_last_n)
      .def_rw("presence_penalty", &mlxr::SamplerOptions::presence_penalty)
      .def_rw("frequency_penalty", &mlxr::SamplerOptions::frequency_penalty)
      .def_rw("seed", &mlxr::SamplerOptions::seed);

  nb::class_<mlxr::Sampler>(m, "Sampler", "Logits -> token with penalties, temperature, top-k/p, min-p, seed.")
      .def(nb::init<const mlxr::SamplerOptions&, int>(), "options"_a, "vocab_size"_a)
      .def("remember", &mlxr::Sampler::remember, "tokens"_a, "Add tokens to the penalty history.")
      .def(
          "sample",
          [](mlxr::Sampler& self, const mx::array& logits) {
            return mlxr::host_item<int>(self.sample(logits));
          },
          "logits"_a, nb::call_guard<nb::gil_scoped_release>(), "Logits [V] -> token id.")
      .def(
          "probabilities",
          [](const mlxr::Sampler& self, const mx::array& logits) {
            auto p = self.probabilities(logits);
            mx::eval(p);
            return p;
          },
          "logits"_a, nb::call_guard<nb::gil_scoped_release>(), "The distribution a draw uses: float32 [V].");
  m.def("splitmix64", &mlxr::splitmix64, "seed"_a, "counter"_a, "The per-draw key derivation of seeded sampling.");
}

void bind_decoder(nb::module_& m) {
  nb::class_<mlxr::RopeConfig>(m, "RopeConfig")
      .def(nb::init<>())
      .def_rw("dims", &mlxr::RopeConfig::dims)
      .def_rw("base", &mlxr::RopeConfig::base)
      .def_rw("traditional", &mlxr::RopeConfig::traditional)
      .def_rw("type", &mlxr::RopeConfig::type)
      .def_rw("factor", &mlxr::RopeConfig::factor)
      .def_rw("low_freq_factor", &mlxr::RopeConfig::low_freq_factor)
      .def_rw("high_freq_factor", &mlxr::RopeConfig::high_freq_factor)
      .def_rw("original_max_position", &mlxr::RopeConfig::original_max_position);

  nb::class_<mlxr::DecoderConfig>(m, "DecoderConfig")
      .def(nb::init<>())
      .def_rw("architecture", &mlxr::DecoderConfig::architecture)
      .def_rw("vocab_size", &mlxr::DecoderConfig::vocab_size)
      .def_rw("hidden_size", &mlxr::DecoderConfig::hidden_size)
      .def_rw("num_hidden_layers", &mlxr::DecoderConfig::num_hidden_layers)
      .def_rw("num_attention_heads", &mlxr::DecoderConfig::num_attention_heads)
      .def_rw("num_key_value_heads", &mlxr::DecoderConfig::num_key_value_heads)
      .def_rw("head_dim", &mlxr::DecoderConfig::head_dim)
      .def_rw("intermediate_size", &mlxr::DecoderConfig::intermediate_size)
      .def_rw("rms_norm_eps", &mlxr::DecoderConfig::rms_norm_eps)
      .def_rw("tie_word_embeddings", &mlxr::DecoderConfig::tie_word_embeddings)
      .def_rw("attention_bias", &mlxr::DecoderConfig::attention_bias)
      .def_rw("mlp_bias", &mlxr::DecoderConfig::mlp_bias)
      .def_rw("rope", &mlxr::DecoderConfig::rope);

  nb::class_<mlxr::Decoder>(m, "Decoder", "Llama-family decoder (Llama 2/3, Qwen3).")
      .def(nb::init<const mlxr::DecoderConfig&, const mlxr::WeightMap&>(), "config"_a, "weights"_a)
      .def(
          "logits",
          [](const mlxr::Decoder& self, const std::vector<int>& tokens, int chunk) {
            return mlxr::prompt_logits(self, tokens, chunk);
          },
          "tokens"_a, "chunk"_a = 512, nb::call_guard<nb::gil_scoped_release>(),
          "Float32 logits [T, V] for one prompt, prefilled in chunks.")
      .def(
          "hidden_states",
          [](const mlxr::Decoder& self, const mx::array& tokens, std::optional<mx::array> mask,
             const std::vector<int>& layers) {
            auto out = self.hidden_states(tokens, mask, layers);
            mx::eval(out);
            return out;
          },
          "tokens"_a, "attention_mask"_a = nb::none(), "layers"_a, nb::call_guard<nb::gil_scoped_release>(),
          "Hidden states as transformers numbers them: 0 = embeddings, i = after i layers, last = final norm.")
      .def("eval_weights", &mlxr::Decoder::eval_weights,
           "Read every weight now, a layer at a time (drop your own references to the weight dict first: "
           "the fused projections then free the checkpoint's separate arrays as they go).")
      .def_prop_ro("vocab_size", [](const mlxr::Decoder& self) { return self.config().vocab_size; });

  nb::class_<mlxr::Generator>(m, "Generator", "Prefill then pipelined decode; iterate to get token ids.")
      .def(nb::init<const mlxr::Decoder&, const std::vector<int>&, const mlxr::SamplerOptions&, int>(), "model"_a,
           "prompt"_a, "options"_a, "prefill_chunk"_a = 512, nb::keep_alive<1, 2>())
      .def("__iter__", [](nb::handle self) { return self; })
      .def("__next__", &mlxr::Generator::next, nb::call_guard<nb::gil_scoped_release>())
      .def_prop_ro("prompt_tokens", &mlxr::Generator::prompt_tokens)
      .def_prop_ro("position", &mlxr::Generator::position);
}


// A Python progress callable (step, total) -> bool | None, called with the GIL held; anything but
// an explicit False continues. An exception it raises propagates out of the loop.
mlxr::StepCallback step_callback(nb::object progress) {
  if (progress.is_none()) return {};
  return [progress](int step, int total) {
    nb::gil_scoped_acquire gil;
    nb::object result = progress(step, total);
    return !(result.is_valid() && nb::isinstance<nb::bool_>(result) && !nb::cast<bool>(result));
  };
}

void bind_diffusion(nb::module_& m) {
  nb::class_<mlxr::FlowMatchSchedule>(m, "FlowMatchSchedule", "The scheduler config of FlowMatchEulerDiscreteScheduler.")
      .def(nb::init<>())
      .def_rw("num_train_timesteps", &mlxr::FlowMatchSchedule::num_train_timesteps)
      .def_rw("shift", &mlxr::FlowMatchSchedule::shift)
      .def_rw("use_dynamic_shifting", &mlxr::FlowMatchSchedule::use_dynamic_shifting)
      .def_rw("time_shift_type", &mlxr::FlowMatchSchedule::time_shift_type);
  m.def("flow_match_sigmas", &mlxr::flow_match_sigmas, "base"_a, "schedule"_a, "mu"_a = nb::none(),
        "The N + 1 float32 sigmas (last 0) the scheduler makes from a pipeline's N base sigmas.");
  m.def("linspace", &mlxr::linspace, "start"_a, "stop"_a, "n"_a, "numpy.linspace in float64.");

  nb::class_<mlxr::VaeConfig>(m, "VaeConfig", "AutoencoderKL's config (vae/config.json).")
      .def(nb::init<>())
      .def_rw("in_channels", &mlxr::VaeConfig::in_channels)
      .def_rw("out_channels", &mlxr::VaeConfig::out_channels)
      .def_rw("latent_channels", &mlxr::VaeConfig::latent_channels)
      .def_rw("block_out_channels", &mlxr::VaeConfig::block_out_channels)
      .def_rw("layers_per_block", &mlxr::VaeConfig::layers_per_block)
      .def_rw("norm_num_groups", &mlxr::VaeConfig::norm_num_groups)
      .def_rw("norm_eps", &mlxr::VaeConfig::norm_eps)
      .def_rw("mid_block_add_attention", &mlxr::VaeConfig::mid_block_add_attention)
      .def_rw("use_quant_conv", &mlxr::VaeConfig::use_quant_conv)
      .def_rw("use_post_quant_conv", &mlxr::VaeConfig::use_post_quant_conv)
      .def_rw("double_z", &mlxr::VaeConfig::double_z);

  nb::class_<mlxr::VaeDecoder>(m, "VaeDecoder", "AutoencoderKL decoder (NHWC in and out).")
      .def(nb::init<const mlxr::VaeConfig&, const mlxr::WeightMap&>(), "config"_a, "weights"_a)
      .def(
          "decode",
          [](const mlxr::VaeDecoder& self, const mx::array& z, int tile) {
            auto out = tile > 0 ? self.tiled(z, tile) : self(z);
            mx::eval(out);
            return out;
          },
          "z"_a, "tile"_a = 0, nb::call_guard<nb::gil_scoped_release>(),
          "Latents [B, h, w, C] -> image [B, 8h, 8w, 3] in about [-1, 1]; tile > 0 decodes in overlapping "
          "tiles of that many latents (diffusers' tiled_decode).")
      .def_prop_ro("scale_factor", &mlxr::VaeDecoder::scale_factor);

  nb::class_<mlxr::VaeEncoder>(m, "VaeEncoder", "AutoencoderKL encoder (NHWC in and out).")
      .def(nb::init<const mlxr::VaeConfig&, const mlxr::WeightMap&>(), "config"_a, "weights"_a)
      .def(
          "encode",
          [](const mlxr::VaeEncoder& self, const mx::array& x) {
            auto out = self(x);
            mx::eval(out);
            return out;
          },
          "image"_a, nb::call_guard<nb::gil_scoped_release>(),
          "Image [B, H, W, 3] in [-1, 1] -> the posterior mean [B, H/8, W/8, C].");

  nb::class_<mlxr::ZImageConfig>(m, "ZImageConfig", "ZImageTransformer2DModel's config (transformer/config.json).")
      .def(nb::init<>())
      .def_rw("dim", &mlxr::ZImageConfig::dim)
      .def_rw("n_heads", &mlxr::ZImageConfig::n_heads)
      .def_rw("n_kv_heads", &mlxr::ZImageConfig::n_kv_heads)
      .def_rw("n_layers", &mlxr::ZImageConfig::n_layers)
      .def_rw("n_refiner_layers", &mlxr::ZImageConfig::n_refiner_layers)
      .def_rw("in_channels", &mlxr::ZImageConfig::in_channels)
      .def_rw("patch_size", &mlxr::ZImageConfig::patch_size)
      .def_rw("f_patch_size", &mlxr::ZImageConfig::f_patch_size)
      .def_rw("cap_feat_dim", &mlxr::ZImageConfig::cap_feat_dim)
      .def_rw("norm_eps", &mlxr::ZImageConfig::norm_eps)
      .def_rw("qk_norm", &mlxr::ZImageConfig::qk_norm)
      .def_rw("rope_theta", &mlxr::ZImageConfig::rope_theta)
      .def_rw("t_scale", &mlxr::ZImageConfig::t_scale)
      .def_rw("axes_dims", &mlxr::ZImageConfig::axes_dims)
      .def_rw("axes_lens", &mlxr::ZImageConfig::axes_lens);

  nb::class_<mlxr::ZImageTransformer>(m, "ZImageTransformer", "Z-Image's S3-DiT (ZImageTransformer2DModel).")
      .def(nb::init<const mlxr::ZImageConfig&, const mlxr::WeightMap&>(), "config"_a, "weights"_a)
      .def(
          "forward",
          [](const mlxr::ZImageTransformer& self, const mx::array& latents, const mx::array& t,
             const std::vector<mx::array>& captions) {
            auto out = self.forward(latents, t, captions);
            mx::eval(out);
            return out;
          },
          "latents"_a, "t"_a, "captions"_a, nb::call_guard<nb::gil_scoped_release>(),
          "One evaluation: latents [B, C, H, W], t [B] (1 - sigma), one [L, cap_dim] caption per sample -> "
          "the raw model output, float32 [B, C, H, W].")
      .def_prop_ro("dtype", &mlxr::ZImageTransformer::dtype);

  m.def(
      "zimage_denoise",
      [](const mlxr::ZImageTransformer& model, const mx::array& latents, const std::vector<float>& sigmas,
         const mx::array& caption, std::optional<mx::array> negative, float guidance, nb::object progress) {
        auto on_step = step_callback(progress);
        nb::gil_scoped_release release;
        return mlxr::zimage_denoise(model, latents, sigmas, caption, negative, guidance, on_step);
      },
      "model"_a, "latents"_a, "sigmas"_a, "caption"_a, "negative"_a = nb::none(), "guidance"_a = 0.0f,
      "progress"_a = nb::none(),
      "The Z-Image Euler loop: float32 latents [1, C, H, W] -> final latents, or None when progress(step, "
      "total) returned False. CFG (pos + guidance * (pos - neg)) when a negative caption is given.");
}

void bind_flux2(nb::module_& m) {
  nb::class_<mlxr::Flux2Config>(m, "Flux2Config", "Flux2Transformer2DModel's config (transformer/config.json).")
      .def(nb::init<>())
      .def_rw("in_channels", &mlxr::Flux2Config::in_channels)
      .def_rw("out_channels", &mlxr::Flux2Config::out_channels)
      .def_rw("num_layers", &mlxr::Flux2Config::num_layers)
      .def_rw("num_single_layers", &mlxr::Flux2Config::num_single_layers)
      .def_rw("attention_head_dim", &mlxr::Flux2Config::attention_head_dim)
      .def_rw("num_attention_heads", &mlxr::Flux2Config::num_attention_heads)
      .def_rw("joint_attention_dim", &mlxr::Flux2Config::joint_attention_dim)
      .def_rw("timestep_guidance_channels", &mlxr::Flux2Config::timestep_guidance_channels)
      .def_rw("mlp_ratio", &mlxr::Flux2Config::mlp_ratio)
      .def_rw("axes_dims_rope", &mlxr::Flux2Config::axes_dims_rope)
      .def_rw("rope_theta", &mlxr::Flux2Config::rope_theta)
      .def_rw("eps", &mlxr::Flux2Config::eps)
      .def_rw("guidance_embeds", &mlxr::Flux2Config::guidance_embeds);

  nb::class_<mlxr::Flux2Transformer>(m, "Flux2Transformer", "FLUX.2's MM-DiT (Flux2Transformer2DModel, Klein).")
      .def(nb::init<const mlxr::Flux2Config&, const mlxr::WeightMap&>(), "config"_a, "weights"_a)
      .def(
          "forward",
          [](const mlxr::Flux2Transformer& self, const mx::array& hidden, const mx::array& context,
             const mx::array& timestep, const mx::array& img_ids, const mx::array& txt_ids) {
            auto ids = mlxr::flux2_ids(txt_ids);
            auto image = mlxr::flux2_ids(img_ids);
            ids.insert(ids.end(), image.begin(), image.end());
            auto out = self.forward(hidden, context, timestep, self.rope_table(ids));
            mx::eval(out);
            return out;
          },
          "hidden_states"_a, "encoder_hidden_states"_a, "timestep"_a, "img_ids"_a, "txt_ids"_a,
          nb::call_guard<nb::gil_scoped_release>(),
          "One evaluation as diffusers calls it: image tokens [B, L, C], text [B, T, J], timestep [B] (t / 1000), "
          "ids [L, 4] and [T, 4] -> the raw output, float32 [B, L, C].")
      .def_prop_ro("dtype", &mlxr::Flux2Transformer::dtype);

  m.def("flux2_empirical_mu", &mlxr::flux2_empirical_mu, "image_seq_len"_a, "num_steps"_a,
        "diffusers' compute_empirical_mu (FLUX.2's dynamic-shift mu; noise tokens only).");

  m.def(
      "flux2_denoise",
      [](const mlxr::Flux2Transformer& model, const mx::array& latents, const mx::array& latent_ids,
         const std::vector<float>& sigmas, const mx::array& prompt, std::optional<mx::array> negative, float guidance,
         std::optional<mx::array> references, std::optional<mx::array> reference_ids, nb::object progress) {
        auto on_step = step_callback(progress);
        nb::gil_scoped_release release;
        auto ids = mlxr::flux2_ids(latent_ids);
        std::vector<mlxr::Flux2Id> ref_ids;
        if (references) {
          if (!reference_ids) throw std::invalid_argument("flux2_denoise: reference tokens need reference_ids");
          ref_ids = mlxr::flux2_ids(*reference_ids);
        }
        return mlxr::flux2_denoise(model, latents, ids, sigmas, prompt, negative, guidance, references, ref_ids,
                                   on_step);
      },
      "model"_a, "latents"_a, "latent_ids"_a, "sigmas"_a, "prompt"_a, "negative"_a = nb::none(),
      "guidance"_a = 1.0f, "references"_a = nb::none(), "reference_ids"_a = nb::none(), "progress"_a = nb::none(),
      "The FLUX.2 Klein Euler loop over packed latents [1, L, C] -> final packed latents (float32), or None when "
      "progress(step, total) returned False. True CFG (v_neg + guidance * (v_pos - v_neg)) when a negative "
      "embedding is given; reference-image tokens [1, Lr, C] with their ids condition every call.");
}

}  // namespace

NB_MODULE(_core, m) {
  // Registers mx.array with nanobind before any binding mentions it.
  nb::module_::import_("mlx.core");
  m.doc() = "mlxrunner's C++ core: networks, loops and sampling over MLX's C++ API.";
  m.attr("mlx_version") = mx::version();

  // C++ exceptions carry the message Python shows: invalid_argument -> ValueError.
  bind_building_blocks(m);
  bind_bert(m);
  bind_sampling(m);
  bind_decoder(m);
  bind_diffusion(m);
  bind_flux2(m);
}
