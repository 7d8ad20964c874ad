// JSON (RFC 8259) as a byte-at-a-time recogniser, for output held to JSON: any object ("JSON mode"), or the
// documents a JSON schema allows (text/json_schema.py compiles the schema into the nodes below).
//
// Checking whether a token's bytes may come next is a copy of the state and a loop over its bytes: TokenConstraint
// (text/token_constraint.h) does that for a whole vocabulary, so the state is small (the copy takes only the open
// containers). Strings must be valid UTF-8 (no overlong forms, no surrogates), as a parser reading the answer back
// requires. The text is its object: it starts with the '{' and ends with the '}'. Runs of whitespace are capped: a
// model held to JSON can otherwise fall into writing blanks for ever.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace mlxr {

// The values one place of a document may hold.
struct SchemaNode {
  enum Kind : uint8_t {
    kObject = 1,
    kArray = 2,
    kString = 4,
    kNumber = 8,  // any number
    kInteger = 16,
    kBoolean = 32,
    kNull = 64,
    kAny = 127,
  };
  static constexpr int kMaxKeys = 64;      // properties an object node may name
  static constexpr int kMaxLiterals = 64;  // values an enum may list

  uint8_t kinds = kAny;
  uint8_t literal_kinds = 0;          // the kinds whose values must be one of `literals` (enum, const)
  std::vector<std::string> literals;  // those values as canonical JSON text (UTF-8, not ASCII-escaped)
  std::vector<std::string> keys;      // an object's properties, as JSON string contents (escaped, no quotes)
  std::vector<int> key_nodes;         // each property's value
  uint64_t required = 0;              // bit i: keys[i] must be present
  int additional = -1;                // the node of any other key's value; -1: no other keys
  int items = 0;                      // the node of an array's items
  int min_length = 0;                 // a string's characters (code points), at least
  int max_length = -1;                // and at most (-1: any number)
  int min_items = 0;                  // an array's items, at least
  int max_items = -1;                 // and at most (-1: any number)
};

// A compiled schema: its nodes and the root's. Node 0 is any value by convention (kAny, additional 0, items 0).
struct JsonSchema {
  std::vector<SchemaNode> nodes;
  int root = 0;

  // Throws std::invalid_argument naming what is inconsistent (a node index out of range, too many keys, a root that
  // is not an object...).
  void check() const;
  // Any JSON object: JSON mode.
  static const JsonSchema& any_object();
};

class JsonGrammar {
 public:
  static constexpr int kMaxDepth = 128;      // open objects and arrays at once
  static constexpr int kMaxWhitespace = 20;  // blanks in a row (a newline and 19 of indent; llama.cpp's cap too)

  // Held to `schema` (kept alive by the caller); by default any object.
  explicit JsonGrammar(const JsonSchema& schema = JsonSchema::any_object());

  // Takes one byte if the text may go on with it (true), else leaves the state as it was (false).
  bool feed(uint8_t byte);
  // Whether every byte of `bytes` may come next, in order; the state is left as it was.
  bool accepts(std::string_view bytes) const;
  // Takes `bytes` whole, or nothing (false).
  bool feed(std::string_view bytes);
  // Whether the text so far is one complete document (nothing may follow it).
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
    kLiteral,       // inside one of a set of literal texts (true/false/null, an enum's values)
    kDone,          // the document has ended
  };
  enum class Number : uint8_t { kMinus, kZero, kInt, kDot, kFraction, kExponent, kExponentSign, kExponentDigits };
  struct Frame {
    int node;
    bool array;
    uint64_t seen;  // an object's keys written so far; an array's items begun so far
  };
  // The open containers. A copy takes only those (a token's check copies the state: most of it is unused).
  struct Stack {
    int depth = 0;
    std::array<Frame, kMaxDepth> frames;

    Stack() = default;
    Stack(const Stack& other) { *this = other; }
    Stack& operator=(const Stack& other) {
      depth = other.depth;
      std::copy_n(other.frames.begin(), depth, frames.begin());
      return *this;
    }
  };

  bool step(uint8_t byte);  // feed without putting the state back on a refusal
  bool feed_structural(uint8_t byte);
  bool feed_string(uint8_t byte);
  bool feed_key_byte(uint8_t byte);
  bool end_key();
  bool feed_number(uint8_t byte);
  bool end_number(uint8_t byte);
  bool feed_literal(uint8_t byte);
  bool start_value(uint8_t byte);
  bool start_item_or_value(uint8_t byte);
  bool count_character();
  bool feed_string_byte(uint8_t byte, bool* closes);
  bool start_literal(uint8_t byte, const std::vector<std::string>& texts);
  bool start_key();
  bool may_add_key() const;
  void value_ended();
  bool close(bool array);
  bool push(int node, bool array);
  const SchemaNode& node(int index) const { return schema_->nodes[index]; }
  Frame& top() { return stack_.frames[stack_.depth - 1]; }
  const Frame& top() const { return stack_.frames[stack_.depth - 1]; }

  const JsonSchema* schema_;
  Mode mode_ = Mode::kValue;
  int value_node_;           // the node of the value about to start
  bool in_key_ = false;      // the string is an object's key
  bool escape_ = false;      // after a backslash
  uint8_t hex_left_ = 0;     // hex digits of a \u escape still to come
  uint16_t hex_value_ = 0;   // the escape's code unit so far
  int string_node_ = 0;      // the node of the string value being written
  int string_chars_ = 0;     // its characters so far
  uint8_t utf8_left_ = 0;    // continuation bytes still to come
  uint8_t utf8_low_ = 0x80;  // the next continuation byte's range (narrower after E0, ED, F0, F4)
  uint8_t utf8_high_ = 0xBF;
  uint64_t key_candidates_ = 0;  // the declared keys the key's text so far can still be (written ones too)
  int key_length_ = 0;           // bytes of the key's text so far
  int value_key_ = -1;           // the key whose value comes next (-1: another key's)
  Number number_ = Number::kInt;
  bool integer_only_ = false;
  const std::vector<std::string>* literal_texts_ = nullptr;  // kLiteral: the texts the value can be
  uint64_t literal_candidates_ = 0;                          // which of them it still can be
  int literal_length_ = 0;
  uint8_t whitespace_ = 0;  // blanks in a row
  Stack stack_;
};

}  // namespace mlxr
