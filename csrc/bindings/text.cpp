// Text generation: the decoder, its generation loop and sampling.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "bindings/bindings.h"
#include "bindings/config.h"
#include "bindings/network.h"
#include "nn/attention.h"
#include "nn/cuda_matvec.h"
#include "nn/host.h"
#include "text/batch.h"
#include "text/decoder.h"
#include "text/generate.h"
#include "text/sampling.h"
#include "text/token_constraint.h"

namespace mlxr::bindings {

namespace {

// A Python SequenceCache's layers moved out, leaving it empty. Copied instead, the generator's caches and the
// Python object's would share buffers, so neither could be written in place (KVCache::writes_in_place) though
// the Python side never writes: the prompt cache hands a sequence over whole.
std::optional<SequenceCache> taken(SequenceCache* cache) {
  if (!cache) return std::nullopt;
  SequenceCache moved{std::move(cache->layers)};
  cache->layers.clear();
  return moved;
}

// use(the caches taken from `cache`, nullopt without one); if it throws (an argument refused), the caches go back to
// the caller's object first, so a refused request loses no conversation. `use` must move from them only once nothing
// can refuse any more.
template <typename Use>
decltype(auto) with_taken(SequenceCache* cache, Use&& use) {
  auto start = taken(cache);
  try {
    return use(start);
  } catch (...) {
    if (start) cache->layers = std::move(start->layers);
    throw;
  }
}

std::optional<nb::tuple> logprobs_tuple(const std::optional<TokenLogprobs>& lp) {
  if (!lp) return std::nullopt;
  nb::list top;
  for (size_t i = 0; i < lp->top_ids.size(); ++i) top.append(nb::make_tuple(lp->top_ids[i], lp->top_logprobs[i]));
  return nb::make_tuple(lp->logprob, top);
}

void bind_sampling(nb::module_& m) {
  bind_config<SamplerOptions>(
      m, "SamplerOptions", "Sampling options, Ollama's defaults; the order of operations is in csrc/text/sampling.h.");

  nb::class_<Sampler>(m, "Sampler", "Logits -> token with penalties, temperature, top-k/p, min-p, seed.")
      .def(nb::init<const SamplerOptions&, int>(), "options"_a, "vocab_size"_a)
      .def("remember", nb::overload_cast<const mx::array&>(&Sampler::remember), "tokens"_a,
           "Add tokens to the penalty history.")
      .def(
          "sample", [](Sampler& self, const mx::array& logits) { return host_item<int>(self.sample(logits)); },
          "logits"_a, nb::call_guard<nb::gil_scoped_release>(), "Logits [V] -> token id.")
      .def(
          "probabilities",
          [](const Sampler& self, const mx::array& logits) { return evaluated(self.probabilities(logits)); },
          "logits"_a, nb::call_guard<nb::gil_scoped_release>(), "The distribution a draw uses: float32 [V].");
  m.def("splitmix64", &splitmix64, "seed"_a, "counter"_a, "The per-draw key derivation of seeded sampling.");
}

void bind_json(nb::module_& m) {
  nb::class_<SchemaNode>(m, "SchemaNode", "The values one place of a document may hold (text/json_grammar.h).")
      .def(nb::init<>())
      .def_rw("kinds", &SchemaNode::kinds)
      .def_rw("literal_kinds", &SchemaNode::literal_kinds)
      .def_rw("literals", &SchemaNode::literals)
      .def_rw("keys", &SchemaNode::keys)
      .def_rw("key_nodes", &SchemaNode::key_nodes)
      .def_rw("required", &SchemaNode::required)
      .def_rw("additional", &SchemaNode::additional)
      .def_rw("items", &SchemaNode::items)
      .def_rw("min_length", &SchemaNode::min_length)
      .def_rw("max_length", &SchemaNode::max_length)
      .def_rw("min_items", &SchemaNode::min_items)
      .def_rw("max_items", &SchemaNode::max_items);
  nb::class_<JsonSchema>(m, "JsonSchema", "A compiled JSON schema (text/json_schema.py compiles one).")
      .def(
          "__init__",
          [](JsonSchema* self, std::vector<SchemaNode> nodes, int root) {
            new (self) JsonSchema{std::move(nodes), root};
            self->check();
          },
          "nodes"_a, "root"_a)
      .def_prop_ro("root", [](const JsonSchema& self) { return self.root; })
      .def("__len__", [](const JsonSchema& self) { return self.nodes.size(); });

  nb::class_<JsonGrammar>(m, "JsonGrammar",
                          "JSON text, one object (any, or what a schema allows), recognised a byte at a time.")
      .def(nb::init<>())
      .def(nb::init<const JsonSchema&>(), "schema"_a, nb::keep_alive<1, 2>())
      .def(
          "feed", [](JsonGrammar& self, nb::bytes b) { return self.feed(std::string_view(b.c_str(), b.size())); },
          "data"_a, "Take the bytes if JSON allows them next (True), else change nothing (False).")
      .def(
          "accepts",
          [](const JsonGrammar& self, nb::bytes b) { return self.accepts(std::string_view(b.c_str(), b.size())); },
          "data"_a, "Whether the bytes may come next; changes nothing.")
      .def_prop_ro("complete", &JsonGrammar::complete, "Whether the text is one whole JSON object.");

  nb::class_<TokenVocabulary>(m, "TokenVocabulary", "A tokenizer's tokens as bytes, for output held to JSON.")
      .def(
          "__init__",
          [](TokenVocabulary* self, nb::bytes data, const std::vector<int>& lengths) {
            new (self) TokenVocabulary(std::string(data.c_str(), data.size()), lengths);
          },
          "data"_a, "lengths"_a,
          "Every token's bytes one after another; lengths[i]: token i's, or -1 for one never allowed (special).")
      .def("__len__", &TokenVocabulary::size);

  nb::class_<JsonConstraint>(m, "JsonConstraint", "Which tokens may continue a JSON object (text/token_constraint.h).")
      .def(nb::init<const TokenVocabulary&, int>(), "vocabulary"_a, "vocab_size"_a, nb::keep_alive<1, 2>())
      .def(nb::init<const TokenVocabulary&, int, const JsonSchema&>(), "vocabulary"_a, "vocab_size"_a, "schema"_a,
           nb::keep_alive<1, 2>(), nb::keep_alive<1, 4>())
      .def("allows", &JsonConstraint::allows, "token"_a)
      .def("accept", &JsonConstraint::accept, "token"_a)
      .def(
          "mask", [](const JsonConstraint& self) { return evaluated(self.mask()); },
          nb::call_guard<nb::gil_scoped_release>(), "Float32 [vocab_size]: 0 where allowed, -inf elsewhere.")
      .def_prop_ro("complete", &JsonConstraint::complete);
}

void bind_kv_cache(nb::module_& m) {
  nb::class_<KVCache>(m, "KVCache",
                      "One attention layer's key/value cache; window > 0: a rotating cache over the last window "
                      "positions (csrc/text/kv_cache.h).")
      .def(nb::init<int>(), "window"_a = 0)
      .def(
          "update_and_fetch",
          [](KVCache& self, const mx::array& keys, const mx::array& values) {
            auto [k, v] = self.update_and_fetch(keys, values);
            return evaluated(std::vector<mx::array>{k, v});
          },
          "keys"_a, "values"_a, nb::call_guard<nb::gil_scoped_release>(),
          "Append [B, H, T, D] keys/values; the [keys, values] attention then runs over.")
      .def_prop_ro("offset", &KVCache::offset)
      .def_prop_ro("window", &KVCache::window)
      .def_prop_ro("held", &KVCache::held)
      .def_prop_ro("nbytes", &KVCache::nbytes)
      .def_prop_ro("writes_in_place", &KVCache::writes_in_place,
                   "Whether the CUDA attention kernels may write new positions into the buffers in place (no copy "
                   "shares them).")
      .def("reserve", nb::overload_cast<int, const mx::array&>(&KVCache::reserve), "count"_a, "like"_a,
           nb::call_guard<nb::gil_scoped_release>(),
           "The [keys, values] buffers with room for `count` more positions, which the cache now holds and a kernel "
           "writes in place (writes_in_place must hold; like: the new keys [1, H, count, D]).")
      .def("append_buffers", &KVCache::append_buffers, "keys"_a, "values"_a, nb::call_guard<nb::gil_scoped_release>(),
           "Append [1, H, T, D] keys/values (MLX's update) and return the whole [keys, values] buffers.")
      .def("can_trim_to", &KVCache::can_trim_to, "length"_a)
      .def("trim_to", &KVCache::trim_to, "length"_a)
      .def("copy", [](const KVCache& self) { return KVCache(self); }, "A snapshot that later updates leave alone.");
  m.def(
      "sliding_window_mask",
      [](int queries, int keys, int window) { return evaluated(sliding_window_mask(queries, keys, window)); },
      "queries"_a, "keys"_a, "window"_a,
      "Boolean [queries, keys]: which keys each query sees, the queries being the last of the keys' positions.");
}

void bind_decoder(nb::module_& m) {
  bind_config<RopeConfig>(m, "RopeConfig", "A decoder's RoPE: rope_theta and transformers' rope_parameters.");
  bind_config<MoeConfig>(m, "MoeConfig", "A decoder's routed experts (config.json's top-level MoE keys).");
  bind_config<MlaConfig>(m, "MlaConfig", "Multi-head latent attention (config.json's top-level MLA keys).");
  bind_config<DecoderConfig>(m, "DecoderConfig",
                             "transformers' LlamaConfig / Qwen3Config / MistralConfig / Gemma3TextConfig / "
                             "Qwen3MoeConfig / Glm4MoeLiteConfig (config.json).")
      .def_static("defaults", &DecoderConfig::defaults, "architecture"_a,
                  "The defaults of an architecture's transformers config class "
                  "(llama | qwen3 | mistral | gemma3 | qwen3_moe | glm4_moe_lite).")
      .def("window", &DecoderConfig::window, "layer"_a,
           "The layer's sliding window (a token sees itself and window - 1 before it); 0: full attention.");

  bind_network<Decoder>(m, "Decoder",
                        "Llama-family decoder (Llama 2/3, Qwen3, Mistral, Gemma 3 text, Qwen3-MoE, GLM-4.7-Flash).")
      .def(
          "logits",
          [](const Decoder& self, const std::vector<int>& tokens, int chunk) {
            return prompt_logits(self, tokens, chunk);
          },
          "tokens"_a, "chunk"_a = 512, nb::call_guard<nb::gil_scoped_release>(),
          "Float32 logits [T, V] for one prompt, prefilled in chunks.")
      .def(
          "hidden_states",
          [](const Decoder& self, const mx::array& tokens, std::optional<mx::array> mask,
             const std::vector<int>& layers,
             bool final_norm) { return evaluated(self.hidden_states(tokens, mask, layers, final_norm)); },
          "tokens"_a, "attention_mask"_a = nb::none(), "layers"_a, "final_norm"_a = true,
          nb::call_guard<nb::gil_scoped_release>(),
          "Hidden states as transformers numbers them: 0 = embeddings, i = after i layers, last = final norm "
          "(final_norm=False: the last layer's raw output, for a decoder built with a checkpoint's first layers).")
      .def_prop_ro(
          "can_batch", &Decoder::can_batch,
          "Whether sequences decode together (BatchGenerator): no latent attention (MLA) or attention-sink layer.")
      .def("eval_weights", &Decoder::eval_weights, nb::call_guard<nb::gil_scoped_release>(),
           "Read every weight now, a layer at a time (drop your own references to the weight dict first: "
           "the fused projections then free the checkpoint's separate arrays as they go).");

  nb::class_<SequenceCache>(m, "SequenceCache",
                            "One sequence's key/value caches, a layer each (what the prompt cache keeps).")
      .def_prop_ro("length", &SequenceCache::length, "Positions held.")
      .def_prop_ro("nbytes", &SequenceCache::nbytes, "Bytes its buffers hold.")
      .def("can_trim", &SequenceCache::can_trim, "n"_a, "Whether trim(n) would succeed.")
      .def("trim", &SequenceCache::trim, "n"_a,
           "Forget the last n positions in every layer; False (and unchanged) if a layer cannot.")
      .def_prop_ro("writes_in_place", &SequenceCache::writes_in_place,
                   "Whether no copy shares its buffers (the CUDA attention kernels then write its next positions "
                   "in place).")
      .def(
          "copy", [](const SequenceCache& self) { return SequenceCache(self); },
          "An independent copy (cheap: the arrays are shared until one side writes).");

  nb::class_<Generator>(m, "Generator", "Prefill then pipelined decode; iterate to get token ids.")
      .def(
          "__init__",
          [](Generator* self, const Decoder& model, const std::vector<int>& prompt, const SamplerOptions& options,
             int prefill_chunk, int top_logprobs, SequenceCache* cache, int max_tokens, const TokenVocabulary* json,
             const JsonSchema* json_schema, std::optional<mx::array> logit_bias) {
            with_taken(cache, [&](std::optional<SequenceCache>& start) {
              new (self) Generator(model, prompt, options, prefill_chunk, top_logprobs, std::move(start), max_tokens,
                                   json, json_schema, std::move(logit_bias));
            });
          },
          "model"_a, "prompt"_a, "options"_a, "prefill_chunk"_a = 512, "top_logprobs"_a = -1,
          "cache"_a.none() = nb::none(), "max_tokens"_a = -1, "json"_a.none() = nb::none(),
          "json_schema"_a.none() = nb::none(), "logit_bias"_a = nb::none(), nb::keep_alive<1, 2>(),
          nb::keep_alive<1, 9>(), nb::keep_alive<1, 10>(),
          "max_tokens: the answer's budget (-1: none); no step is dispatched past its last token, so the caches "
          "then hold every returned token but the last. json: a TokenVocabulary: the answer is held to one JSON "
          "object (json_complete says when it is whole); json_schema: a JsonSchema it must follow. logit_bias: "
          "float32 [V] added to every draw's logits. cache: caches holding the prompt's first tokens (the prompt "
          "cache's), taken: the object is left empty (whole again if the generator refuses its arguments).")
      .def_prop_ro("json_complete", &Generator::json_complete)
      .def("__iter__", [](nb::handle self) { return self; })
      .def(
          "__next__",
          [](Generator& self) {
            if (self.exhausted()) throw nb::stop_iteration();
            return self.next();
          },
          nb::call_guard<nb::gil_scoped_release>())
      .def("prefill_chunk", &Generator::prefill_chunk, nb::call_guard<nb::gil_scoped_release>(),
           "Prefill the next chunk; returns the prompt tokens still to prefill (0: only the last is left).")
      .def_prop_ro("prompt_left", &Generator::prompt_left,
                   "Prompt tokens not yet in the caches; the first next() runs the last chunk's worth of them.")
      .def("take_cache", &Generator::take_cache,
           "The caches (prompt + every token returned), moved out; the generator is finished.")
      .def_prop_ro("prompt_tokens", &Generator::prompt_tokens)
      .def_prop_ro("position", &Generator::position)
      .def_prop_ro(
          "logprobs", [](const Generator& self) { return logprobs_tuple(self.logprobs()); },
          "(logprob, [(id, logprob), ...] best first) of the token the last __next__ returned; None unless "
          "top_logprobs >= 0 was given.");
}

void bind_batch(nb::module_& m) {
  nb::class_<BatchGenerator>(m, "BatchGenerator",
                             "Several sequences decoded together, one forward per step (csrc/text/batch.h).")
      .def(nb::init<const Decoder&>(), "model"_a, nb::keep_alive<1, 2>())
      .def(
          "add",
          [](BatchGenerator& self, const std::vector<int>& prompt, const SamplerOptions& options, int top_logprobs,
             SequenceCache& cache) {
            return with_taken(&cache, [&](std::optional<SequenceCache>& start) {
              return self.add(prompt, options, top_logprobs, *start);
            });
          },
          "prompt"_a, "options"_a, "top_logprobs"_a, "cache"_a, nb::call_guard<nb::gil_scoped_release>(),
          "A sequence joins; `cache` holds its prompt but the last token (a Generator's prefill), taken: the object "
          "is left empty (whole again if add refuses its arguments). Returns its id.")
      .def("join", &BatchGenerator::join, "generator"_a, nb::call_guard<nb::gil_scoped_release>(),
           "A sequence joins after its Generator (max_tokens=1) returned its first token, computed as a lone run "
           "computes it; the generator is finished. Returns its id; its second token comes from the second step.")
      .def("step", &BatchGenerator::step, nb::call_guard<nb::gil_scoped_release>(),
           "One decode step of every row: [(row id, token)] for the rows whose token the last step computed.")
      .def("remove", &BatchGenerator::remove, "id"_a, nb::call_guard<nb::gil_scoped_release>(),
           "The row leaves; returns its caches (its prompt and every token step() returned for it).")
      .def("position", &BatchGenerator::position, "id"_a, "Positions the row's caches hold.")
      .def(
          "logprobs", [](const BatchGenerator& self, int id) { return logprobs_tuple(self.logprobs(id)); }, "id"_a,
          "(logprob, [(id, logprob), ...]) of the token the last step returned for the row; None unless asked.")
      .def("__len__", &BatchGenerator::size);
  // A decode step of up to this many rows runs our CUDA matrix-vector kernels, one variant per row count.
  m.attr("MATVEC_MAX_ROWS") = kMaxMatvecRows;
  m.attr("MATVEC_MAX_STAGED_ELEMENTS") = kMaxStagedElements;
  m.def(
      "matvec_warps_per_tile", &matvec_warps_per_tile, "rows"_a, "words"_a, "gated"_a = false,
      "The warps a 16-row tile of the CUDA decode product gets for a packed weight [rows, words] (nn/cuda_matvec.h).");
}

}  // namespace

void bind_text(nb::module_& m) {
  bind_sampling(m);
  bind_json(m);
  bind_kv_cache(m);
  bind_decoder(m);
  bind_batch(m);
}

}  // namespace mlxr::bindings
