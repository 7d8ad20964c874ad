#include "text/token_constraint.h"

#include <limits>
#include <stdexcept>

namespace mlxr {

TokenVocabulary::TokenVocabulary(std::string bytes, const std::vector<int>& lengths)
    : bytes_(std::move(bytes)), lengths_(lengths) {
  starts_.reserve(lengths_.size());
  size_t start = 0;
  for (int length : lengths_) {
    starts_.push_back(start);
    if (length > 0) start += static_cast<size_t>(length);
  }
  if (start != bytes_.size()) {
    throw std::invalid_argument("the tokens' lengths add up to " + std::to_string(start) + " bytes, not the " +
                                std::to_string(bytes_.size()) + " given");
  }
}

std::string_view TokenVocabulary::bytes(int token) const {
  if (token < 0 || token >= size() || lengths_[token] <= 0) return {};
  return std::string_view(bytes_).substr(starts_[token], static_cast<size_t>(lengths_[token]));
}

JsonConstraint::JsonConstraint(const TokenVocabulary& vocabulary, int vocab_size, const JsonSchema& schema)
    : vocabulary_(vocabulary), vocab_size_(vocab_size), grammar_(schema) {}

bool JsonConstraint::allows(int token) const {
  const auto bytes = vocabulary_.bytes(token);
  return !bytes.empty() && grammar_.accepts(bytes);  // a token of no bytes would let the answer loop for ever
}

bool JsonConstraint::take(int token) {
  const auto bytes = vocabulary_.bytes(token);
  return !bytes.empty() && grammar_.feed(bytes);  // feed takes the bytes whole or not at all: no check first
}

void JsonConstraint::accept(int token) {
  if (!take(token)) {
    throw std::invalid_argument("token " + std::to_string(token) + " cannot continue the JSON here");
  }
}

mx::array JsonConstraint::mask() const {
  std::vector<float> mask(vocab_size_, -std::numeric_limits<float>::infinity());
  const int n = std::min(vocab_size_, vocabulary_.size());
  for (int token = 0; token < n; ++token) {
    if (allows(token)) mask[token] = 0.0f;
  }
  return mx::array(mask.data(), {vocab_size_}, mx::float32);
}

}  // namespace mlxr
