#include "text/json_grammar.h"

#include <stdexcept>

namespace mlxr {

namespace {

bool is_blank(uint8_t b) {
  return b == ' ' || b == '\t' || b == '\n' || b == '\r';
}
bool is_digit(uint8_t b) {
  return b >= '0' && b <= '9';
}
bool is_hex(uint8_t b) {
  return is_digit(b) || (b >= 'a' && b <= 'f') || (b >= 'A' && b <= 'F');
}

// The kinds a value starting with this byte can be.
uint8_t kinds_starting_with(uint8_t b) {
  switch (b) {
    case '{':
      return SchemaNode::kObject;
    case '[':
      return SchemaNode::kArray;
    case '"':
      return SchemaNode::kString;
    case 't':
    case 'f':
      return SchemaNode::kBoolean;
    case 'n':
      return SchemaNode::kNull;
    default:
      return b == '-' || is_digit(b) ? SchemaNode::kNumber | SchemaNode::kInteger : 0;
  }
}

// A literal text that ends itself (a string's closing quote, true/false/null's last letter); a number's ends only
// at the first byte that cannot continue it.
bool ends_itself(const std::string& text) {
  return !(text[0] == '-' || is_digit(text[0]));
}

uint64_t bit(int i) {
  return uint64_t{1} << i;
}
uint64_t first_bits(size_t n) {
  return n >= 64 ? ~uint64_t{0} : bit(static_cast<int>(n)) - 1;
}

const std::vector<std::string> kBooleans = {"true", "false"};
const std::vector<std::string> kNulls = {"null"};

}  // namespace

void JsonSchema::check() const {
  const int n = static_cast<int>(nodes.size());
  auto in_range = [n](int i) { return i >= 0 && i < n; };
  if (!in_range(root)) throw std::invalid_argument("the schema's root node " + std::to_string(root) + " is missing");
  if (nodes[root].kinds != SchemaNode::kObject || nodes[root].literal_kinds != 0) {
    throw std::invalid_argument("the schema's root must be an object");
  }
  for (int i = 0; i < n; ++i) {
    const auto& node = nodes[i];
    const std::string where = "schema node " + std::to_string(i) + ": ";
    if (node.kinds == 0 || (node.kinds & ~SchemaNode::kAny)) throw std::invalid_argument(where + "bad kinds");
    if (node.literal_kinds & ~node.kinds) throw std::invalid_argument(where + "enum kinds outside its kinds");
    if (node.min_length < 0 || (node.max_length >= 0 && node.max_length < node.min_length) || node.min_items < 0 ||
        (node.max_items >= 0 && node.max_items < node.min_items)) {
      throw std::invalid_argument(where + "a minimum above its maximum");
    }
    if (node.keys.size() != node.key_nodes.size()) throw std::invalid_argument(where + "keys without nodes");
    if (node.keys.size() > SchemaNode::kMaxKeys) {
      throw std::invalid_argument(where + "more than " + std::to_string(SchemaNode::kMaxKeys) + " properties");
    }
    if (node.literals.size() > SchemaNode::kMaxLiterals) {
      throw std::invalid_argument(where + "more than " + std::to_string(SchemaNode::kMaxLiterals) + " enum values");
    }
    if (node.required & ~first_bits(node.keys.size())) throw std::invalid_argument(where + "required keys missing");
    for (int k : node.key_nodes) {
      if (!in_range(k)) throw std::invalid_argument(where + "a property's node is missing");
    }
    if ((node.additional != -1 && !in_range(node.additional)) || !in_range(node.items)) {
      throw std::invalid_argument(where + "a node it names is missing");
    }
    for (const auto& text : node.literals) {
      if (text.empty() || !(kinds_starting_with(text[0]) & node.literal_kinds)) {
        throw std::invalid_argument(where + "an enum value outside its kinds");
      }
    }
  }
}

const JsonSchema& JsonSchema::any_object() {
  static const JsonSchema schema = [] {
    JsonSchema s;
    s.nodes.resize(2);  // 0: any value (its objects take any keys, its arrays any items)
    s.nodes[0].additional = 0;
    s.nodes[1].kinds = SchemaNode::kObject;
    s.nodes[1].additional = 0;
    s.root = 1;
    return s;
  }();
  return schema;
}

JsonGrammar::JsonGrammar(const JsonSchema& schema) : schema_(&schema), value_node_(schema.root) {}

bool JsonGrammar::feed(uint8_t byte) {
  const JsonGrammar before = *this;
  if (step(byte)) return true;
  *this = before;
  return false;
}

bool JsonGrammar::accepts(std::string_view bytes) const {
  JsonGrammar next = *this;
  for (char c : bytes) {
    if (!next.step(static_cast<uint8_t>(c))) return false;
  }
  return true;
}

bool JsonGrammar::feed(std::string_view bytes) {
  JsonGrammar next = *this;
  for (char c : bytes) {
    if (!next.step(static_cast<uint8_t>(c))) return false;
  }
  *this = next;
  return true;
}

bool JsonGrammar::step(uint8_t byte) {
  switch (mode_) {
    case Mode::kString:
      return feed_string(byte);
    case Mode::kNumber:
      return feed_number(byte);
    case Mode::kLiteral:
      return feed_literal(byte);
    case Mode::kDone:
      return false;  // the answer ends with its object
    default:
      return feed_structural(byte);
  }
}

// Between tokens: whitespace, punctuation, the start of a value or a key.
bool JsonGrammar::feed_structural(uint8_t byte) {
  if (is_blank(byte)) return stack_.depth > 0 && whitespace_++ < kMaxWhitespace;  // the text starts with its '{'
  whitespace_ = 0;
  switch (mode_) {
    case Mode::kValue:
      return start_item_or_value(byte);
    case Mode::kValueOrClose:
      return byte == ']' ? close(/*array=*/true) : start_item_or_value(byte);
    case Mode::kKeyOrClose:
      if (byte == '}') return close(/*array=*/false);
      return byte == '"' && start_key();
    case Mode::kKey:
      return byte == '"' && start_key();
    case Mode::kColon:
      if (byte != ':') return false;
      mode_ = Mode::kValue;
      return true;
    case Mode::kCommaOrClose:
      if (byte == ',') {
        if (top().array) {
          const int max_items = node(top().node).max_items;
          mode_ = Mode::kValue;
          value_node_ = node(top().node).items;
          return max_items < 0 || static_cast<int>(top().seen) < max_items;
        }
        mode_ = Mode::kKey;
        return may_add_key();
      }
      if (byte == '}') return close(/*array=*/false);
      if (byte == ']') return close(/*array=*/true);
      return false;
    default:
      return false;
  }
}

// A value, counted when it is an array's item (kValue after a key is an object's value).
bool JsonGrammar::start_item_or_value(uint8_t byte) {
  if (stack_.depth > 0 && top().array) {
    const int max_items = node(top().node).max_items;
    if (max_items >= 0 && static_cast<int>(top().seen) >= max_items) return false;
    ++top().seen;
  }
  return start_value(byte);
}

bool JsonGrammar::start_value(uint8_t byte) {
  const SchemaNode& n = node(value_node_);
  const uint8_t kinds = kinds_starting_with(byte) & n.kinds;
  if (kinds == 0) return false;
  if (kinds & n.literal_kinds) return start_literal(byte, n.literals);  // an enum's value
  switch (byte) {
    case '{':
      mode_ = Mode::kKeyOrClose;
      return push(value_node_, /*array=*/false);
    case '[':
      mode_ = Mode::kValueOrClose;
      if (!push(value_node_, /*array=*/true)) return false;
      value_node_ = n.items;
      return true;
    case '"':
      mode_ = Mode::kString;
      in_key_ = false;
      string_node_ = value_node_;
      string_chars_ = 0;
      return true;
    case 't':
    case 'f':
      return start_literal(byte, kBooleans);
    case 'n':
      return start_literal(byte, kNulls);
    default:  // a number
      mode_ = Mode::kNumber;
      integer_only_ = !(n.kinds & SchemaNode::kNumber);
      number_ = byte == '-' ? Number::kMinus : byte == '0' ? Number::kZero : Number::kInt;
      return true;
  }
}

bool JsonGrammar::start_literal(uint8_t byte, const std::vector<std::string>& texts) {
  uint64_t candidates = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    if (static_cast<uint8_t>(texts[i][0]) == byte) candidates |= bit(static_cast<int>(i));
  }
  if (candidates == 0) return false;
  mode_ = Mode::kLiteral;
  literal_texts_ = &texts;
  literal_candidates_ = candidates;
  literal_length_ = 1;
  return true;
}

bool JsonGrammar::feed_literal(uint8_t byte) {
  const auto& texts = *literal_texts_;
  uint64_t next = 0;
  bool number_ended = false;  // a number literal is whole and this byte cannot continue any candidate
  for (size_t i = 0; i < texts.size(); ++i) {
    if (!(literal_candidates_ & bit(static_cast<int>(i)))) continue;
    const auto& text = texts[i];
    if (static_cast<int>(text.size()) > literal_length_) {
      if (static_cast<uint8_t>(text[literal_length_]) == byte) next |= bit(static_cast<int>(i));
    } else if (!ends_itself(text)) {
      number_ended = true;
    }
  }
  if (next == 0) {
    if (!number_ended) return false;
    value_ended();
    return feed_structural(byte);
  }
  literal_candidates_ = next;
  ++literal_length_;
  for (size_t i = 0; i < texts.size(); ++i) {
    if ((next & bit(static_cast<int>(i))) && static_cast<int>(texts[i].size()) == literal_length_ &&
        ends_itself(texts[i])) {
      value_ended();
      break;
    }
  }
  return true;
}

bool JsonGrammar::start_key() {
  if (!may_add_key()) return false;
  key_candidates_ = first_bits(node(top().node).keys.size());  // a key written before too: it is refused at its end
  mode_ = Mode::kString;
  in_key_ = true;
  key_length_ = 0;
  return true;
}

// Whether the object may take one more key: one it names and has not had, or any other.
bool JsonGrammar::may_add_key() const {
  const SchemaNode& n = node(top().node);
  return (first_bits(n.keys.size()) & ~top().seen) != 0 || n.additional >= 0;
}

bool JsonGrammar::feed_key_byte(uint8_t byte) {
  const SchemaNode& n = node(top().node);
  uint64_t next = 0;
  for (size_t i = 0; i < n.keys.size(); ++i) {
    if (!(key_candidates_ & bit(static_cast<int>(i)))) continue;
    const auto& key = n.keys[i];
    if (static_cast<int>(key.size()) > key_length_ && static_cast<uint8_t>(key[key_length_]) == byte) {
      next |= bit(static_cast<int>(i));
    }
  }
  key_candidates_ = next;
  ++key_length_;
  return (next & ~top().seen) != 0 || n.additional >= 0;
}

bool JsonGrammar::end_key() {
  const SchemaNode& n = node(top().node);
  value_key_ = -1;
  for (size_t i = 0; i < n.keys.size(); ++i) {
    if ((key_candidates_ & bit(static_cast<int>(i))) && static_cast<int>(n.keys[i].size()) == key_length_) {
      value_key_ = static_cast<int>(i);
    }
  }
  if (value_key_ < 0 && n.additional < 0) return false;
  if (value_key_ >= 0 && (top().seen & bit(value_key_))) return false;  // a key once only
  if (value_key_ >= 0) top().seen |= bit(value_key_);
  value_node_ = value_key_ >= 0 ? n.key_nodes[value_key_] : n.additional;
  in_key_ = false;
  mode_ = Mode::kColon;
  return true;
}

bool JsonGrammar::feed_string(uint8_t byte) {
  bool closes = false;
  if (!feed_string_byte(byte, &closes)) return false;
  if (closes) {
    if (in_key_) return end_key();
    if (string_chars_ < node(string_node_).min_length) return false;  // too short yet
    value_ended();
    return true;
  }
  return !in_key_ || feed_key_byte(byte);
}

// One byte of a string's text by JSON's rules (escapes, UTF-8); `closes`: it was the closing quote. A value's
// characters are counted as they begin (a \u escape of a high surrogate and the low one after it are one).
bool JsonGrammar::feed_string_byte(uint8_t byte, bool* closes) {
  if (utf8_left_ > 0) {
    if (byte < utf8_low_ || byte > utf8_high_) return false;
    utf8_low_ = 0x80;
    utf8_high_ = 0xBF;
    --utf8_left_;
    return true;
  }
  if (hex_left_ > 0) {
    if (!is_hex(byte)) return false;
    const int digit = is_digit(byte) ? byte - '0' : (byte | 0x20) - 'a' + 10;
    hex_value_ = static_cast<uint16_t>(hex_value_ * 16 + digit);
    if (--hex_left_ == 0 && !in_key_ && hex_value_ >= 0xD800 && hex_value_ <= 0xDBFF) --string_chars_;
    return true;
  }
  if (escape_) {
    escape_ = false;
    switch (byte) {
      case '"':
      case '\\':
      case '/':
      case 'b':
      case 'f':
      case 'n':
      case 'r':
      case 't':
        return true;
      case 'u':
        hex_left_ = 4;
        hex_value_ = 0;
        return true;
      default:
        return false;
    }
  }
  if (byte == '"') {
    *closes = true;
    return true;
  }
  if (byte < 0x20) return false;  // control characters must be escaped
  if (byte >= 0x80) {
    // A UTF-8 sequence's first byte, and the range its second byte must be in (no overlong forms, no surrogates,
    // nothing above U+10FFFF).
    if (byte >= 0xC2 && byte <= 0xDF) {
      utf8_left_ = 1;
    } else if (byte >= 0xE0 && byte <= 0xEF) {
      utf8_left_ = 2;
      if (byte == 0xE0) utf8_low_ = 0xA0;
      if (byte == 0xED) utf8_high_ = 0x9F;
    } else if (byte >= 0xF0 && byte <= 0xF4) {
      utf8_left_ = 3;
      if (byte == 0xF0) utf8_low_ = 0x90;
      if (byte == 0xF4) utf8_high_ = 0x8F;
    } else {
      return false;
    }
  }
  if (byte == '\\') escape_ = true;
  return in_key_ || count_character();
}

bool JsonGrammar::count_character() {
  const int max_length = node(string_node_).max_length;
  if (max_length >= 0 && string_chars_ >= max_length) return false;
  ++string_chars_;
  return true;
}

bool JsonGrammar::feed_number(uint8_t byte) {
  const bool digit = is_digit(byte), exponent = byte == 'e' || byte == 'E';
  switch (number_) {
    case Number::kMinus:
      if (!digit) return false;
      number_ = byte == '0' ? Number::kZero : Number::kInt;
      return true;
    case Number::kZero:
    case Number::kInt:
      if (digit && number_ == Number::kInt) return true;
      if ((byte == '.' || exponent) && integer_only_) return false;
      if (byte == '.') {
        number_ = Number::kDot;
      } else if (exponent) {
        number_ = Number::kExponent;
      } else {
        return end_number(byte);
      }
      return true;
    case Number::kDot:
      if (!digit) return false;
      number_ = Number::kFraction;
      return true;
    case Number::kFraction:
      if (digit) return true;
      if (!exponent) return end_number(byte);
      number_ = Number::kExponent;
      return true;
    case Number::kExponent:
      if (byte == '+' || byte == '-') {
        number_ = Number::kExponentSign;
      } else if (digit) {
        number_ = Number::kExponentDigits;
      } else {
        return false;
      }
      return true;
    case Number::kExponentSign:
      if (!digit) return false;
      number_ = Number::kExponentDigits;
      return true;
    case Number::kExponentDigits:
      return digit || end_number(byte);
  }
  return false;
}

// A number ends at the first byte that cannot continue it, which then comes after it.
bool JsonGrammar::end_number(uint8_t byte) {
  value_ended();
  return feed_structural(byte);
}

void JsonGrammar::value_ended() {
  mode_ = stack_.depth == 0 ? Mode::kDone : Mode::kCommaOrClose;
}

bool JsonGrammar::push(int node_index, bool array) {
  if (stack_.depth >= kMaxDepth) return false;
  stack_.frames[stack_.depth++] = Frame{node_index, array, 0};
  return true;
}

bool JsonGrammar::close(bool array) {
  if (stack_.depth == 0 || top().array != array) return false;
  if (!array) {
    const uint64_t required = node(top().node).required;
    if ((top().seen & required) != required) return false;  // a required key is still missing
  } else if (static_cast<int>(top().seen) < node(top().node).min_items) {
    return false;  // too few items yet
  }
  --stack_.depth;
  value_ended();
  return true;
}

}  // namespace mlxr
