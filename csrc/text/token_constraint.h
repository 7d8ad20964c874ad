// Generation held to JSON, a token at a time: which tokens of the vocabulary may come next.
//
// The generator asks `allows` of the token its sampler drew; only when that is refused does it build the whole
// vocabulary's mask and draw again from what the mask leaves (llama.cpp's order: a capable model's draw is
// nearly always allowed, and checking one token costs nothing against checking 150,000). Drawing first and
// redrawing from the masked distribution on a refusal gives each allowed token exactly its masked probability.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "nn/weights.h"
#include "text/json_grammar.h"

namespace mlxr {

// A tokenizer's tokens as the bytes they write; built once per model.
class TokenVocabulary {
 public:
  // `bytes` holds every token's bytes one after another; lengths[i] is token i's length, or -1 for a token that
  // never belongs in JSON text (special and added tokens such as end-of-turn markers).
  TokenVocabulary(std::string bytes, const std::vector<int>& lengths);

  int size() const { return static_cast<int>(lengths_.size()); }
  // Token i's bytes; empty for a token that is never allowed.
  std::string_view bytes(int token) const;

 private:
  std::string bytes_;
  std::vector<size_t> starts_;
  std::vector<int> lengths_;
};

class JsonConstraint {
 public:
  // vocab_size: the logits' width, which may exceed the tokenizer's (padded embedding rows are never allowed).
  // schema: what the object must hold (kept alive by the caller); by default any object.
  JsonConstraint(const TokenVocabulary& vocabulary, int vocab_size,
                 const JsonSchema& schema = JsonSchema::any_object());

  bool allows(int token) const;
  // Takes the token if it is allowed (one walk of its bytes, where allows() then accept() would make two);
  // otherwise changes nothing and returns false.
  bool take(int token);
  // Takes an allowed token (std::invalid_argument otherwise).
  void accept(int token);
  // Float32 [vocab_size]: 0 where a token is allowed, -inf elsewhere.
  mx::array mask() const;
  // Whether the text so far is a whole object: the answer ends there.
  bool complete() const { return grammar_.complete(); }

 private:
  const TokenVocabulary& vocabulary_;
  int vocab_size_;
  JsonGrammar grammar_;
};

}  // namespace mlxr
