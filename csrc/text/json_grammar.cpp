#include "text/json_grammar.h"

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

}  // namespace

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

// Between tokens: whitespace, punctuation, the start of a value.
bool JsonGrammar::feed_structural(uint8_t byte) {
  if (is_blank(byte)) return depth_ > 0 && whitespace_++ < kMaxWhitespace;  // the text starts with its '{'
  whitespace_ = 0;
  switch (mode_) {
    case Mode::kValue:
      return start_value(byte);
    case Mode::kValueOrClose:
      return byte == ']' ? close('a') : start_value(byte);
    case Mode::kKeyOrClose:
      if (byte == '}') return close('o');
      [[fallthrough]];
    case Mode::kKey:
      if (byte != '"') return false;
      mode_ = Mode::kString;
      in_key_ = true;
      return true;
    case Mode::kColon:
      if (byte != ':') return false;
      mode_ = Mode::kValue;
      return true;
    case Mode::kCommaOrClose:
      if (byte == ',') {
        mode_ = top() == 'o' ? Mode::kKey : Mode::kValue;
        return true;
      }
      if (byte == '}') return close('o');
      if (byte == ']') return close('a');
      return false;
    default:
      return false;
  }
}

bool JsonGrammar::start_value(uint8_t byte) {
  if (depth_ == 0 && byte != '{') return false;  // the text is one object
  switch (byte) {
    case '{':
      mode_ = Mode::kKeyOrClose;
      return push('o');
    case '[':
      mode_ = Mode::kValueOrClose;
      return push('a');
    case '"':
      mode_ = Mode::kString;
      in_key_ = false;
      return true;
    case 't':
      literal_ = "rue";
      break;
    case 'f':
      literal_ = "alse";
      break;
    case 'n':
      literal_ = "ull";
      break;
    case '-':
      mode_ = Mode::kNumber;
      number_ = Number::kMinus;
      return true;
    default:
      if (!is_digit(byte)) return false;
      mode_ = Mode::kNumber;
      number_ = byte == '0' ? Number::kZero : Number::kInt;
      return true;
  }
  mode_ = Mode::kLiteral;
  return true;
}

bool JsonGrammar::feed_string(uint8_t byte) {
  if (utf8_left_ > 0) {
    if (byte < utf8_low_ || byte > utf8_high_) return false;
    utf8_low_ = 0x80;
    utf8_high_ = 0xBF;
    --utf8_left_;
    return true;
  }
  if (hex_left_ > 0) {
    if (!is_hex(byte)) return false;
    --hex_left_;
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
        return true;
      default:
        return false;
    }
  }
  if (byte == '"') {
    if (in_key_) {
      in_key_ = false;
      mode_ = Mode::kColon;
    } else {
      value_ended();
    }
    return true;
  }
  if (byte == '\\') {
    escape_ = true;
    return true;
  }
  if (byte < 0x20) return false;  // control characters must be escaped
  if (byte < 0x80) return true;
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
      if (byte == '.')
        number_ = Number::kDot;
      else if (exponent)
        number_ = Number::kExponent;
      else
        return end_number(byte);
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
      if (byte == '+' || byte == '-')
        number_ = Number::kExponentSign;
      else if (digit)
        number_ = Number::kExponentDigits;
      else
        return false;
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

bool JsonGrammar::feed_literal(uint8_t byte) {
  if (static_cast<uint8_t>(*literal_) != byte) return false;
  if (*++literal_ == '\0') value_ended();
  return true;
}

void JsonGrammar::value_ended() {
  mode_ = depth_ == 0 ? Mode::kDone : Mode::kCommaOrClose;
}

bool JsonGrammar::push(char container) {
  if (depth_ >= kMaxDepth) return false;
  const uint64_t bit = uint64_t{1} << (depth_ % 64);
  if (container == 'a')
    arrays_[depth_ / 64] |= bit;
  else
    arrays_[depth_ / 64] &= ~bit;
  ++depth_;
  return true;
}

char JsonGrammar::top() const {
  const int d = depth_ - 1;
  return (arrays_[d / 64] >> (d % 64)) & 1 ? 'a' : 'o';
}

bool JsonGrammar::close(char container) {
  if (depth_ == 0 || top() != container) return false;
  --depth_;
  value_ended();
  return true;
}

}  // namespace mlxr
