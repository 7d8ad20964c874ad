// JSON (RFC 8259) as a byte-at-a-time recogniser, for output held to JSON ("JSON mode").
//
// The state is a small trivially copyable value (the open containers are bits of a fixed-size stack), so
// checking whether a token's bytes may come next is a copy and a loop over its bytes: TokenConstraint
// (text/token_constraint.h) does that for a whole vocabulary. Strings must be valid UTF-8 (no overlong forms, no
// surrogates), as a parser reading the answer back requires. The text starts with its '{' and ends with its '}',
// and runs of whitespace are capped: a model held to JSON can otherwise fall into writing blanks for ever.
#pragma once

#include <cstdint>
#include <string_view>

namespace mlxr {

class JsonGrammar {
 public:
  static constexpr int kMaxDepth = 128;      // open objects and arrays at once
  static constexpr int kMaxWhitespace = 20;  // blanks in a row (a newline and 19 of indent; llama.cpp's cap too)

  // The whole text is one object, as OpenAI's JSON mode and Ollama's `format: "json"` ask.
  JsonGrammar() = default;

  // Takes one byte if JSON allows it here (true), else leaves the state as it was (false).
  bool feed(uint8_t byte);
  // Whether every byte of `bytes` may come next, in order; the state is left as it was.
  bool accepts(std::string_view bytes) const;
  // Takes `bytes` whole, or nothing (false).
  bool feed(std::string_view bytes);
  // Whether the text so far is one complete JSON value (nothing may follow it).
  bool complete() const { return mode_ == Mode::kDone; }

 private:
  enum class Mode : uint8_t {
    kValue,         // a value must start (or whitespace)
    kValueOrClose,  // just after '[': a value or ']'
    kKeyOrClose,    // just after '{': a key or '}'
    kKey,           // after ',' in an object: a key
    kColon,         // after a key
    kCommaOrClose,  // after a value in a container
    kString,        // inside a string (a key when in_key_)
    kNumber,        // inside a number (number_ says where)
    kLiteral,       // inside true, false or null
    kDone,          // the top-level value has ended
  };
  enum class Number : uint8_t { kMinus, kZero, kInt, kDot, kFraction, kExponent, kExponentSign, kExponentDigits };

  bool step(uint8_t byte);  // feed without putting the state back on a refusal
  bool feed_structural(uint8_t byte);
  bool feed_string(uint8_t byte);
  bool feed_number(uint8_t byte);
  bool feed_literal(uint8_t byte);
  bool end_number(uint8_t byte);
  bool start_value(uint8_t byte);
  void value_ended();
  bool close(char container);
  bool push(char container);
  char top() const;

  Mode mode_ = Mode::kValue;
  bool in_key_ = false;
  bool escape_ = false;      // after a backslash
  uint8_t hex_left_ = 0;     // hex digits of a \u escape still to come
  uint8_t utf8_left_ = 0;    // continuation bytes still to come
  uint8_t utf8_low_ = 0x80;  // the next continuation byte's range (narrower after E0, ED, F0, F4)
  uint8_t utf8_high_ = 0xBF;
  Number number_ = Number::kInt;
  const char* literal_ = nullptr;  // the rest of true/false/null still to come
  uint8_t whitespace_ = 0;         // blanks in a row
  int depth_ = 0;
  uint64_t arrays_[kMaxDepth / 64] = {};  // bit d: the container at depth d is an array (else an object)
};

}  // namespace mlxr
