#include "nn/cuda_kernel_common.h"

#include <stdexcept>
#include <vector>

namespace mlxr {

namespace {

std::string_view trimmed(std::string_view line) {
  const auto first = line.find_first_not_of(" \t\r");
  if (first == std::string_view::npos) return {};
  const auto last = line.find_last_not_of(" \t\r");
  return line.substr(first, last - first + 1);
}

// The line without a `//` comment (one outside a string literal).
std::string_view without_comment(std::string_view line) {
  bool in_string = false;
  for (size_t i = 0; i < line.size(); ++i) {
    if (line[i] == '"' && (i == 0 || line[i - 1] != '\\')) in_string = !in_string;
    if (!in_string && line[i] == '/' && i + 1 < line.size() && line[i + 1] == '/') return line.substr(0, i);
  }
  return line;
}

// The switch a `#if NAME` line tests, if it is one of `switches`.
std::optional<bool> switch_of(std::string_view line, const std::map<std::string, bool>& switches) {
  if (!line.starts_with("#if ")) return std::nullopt;
  const auto found = switches.find(std::string(trimmed(line.substr(4))));
  if (found == switches.end()) return std::nullopt;
  return found->second;
}

}  // namespace

std::string compact_kernel_source(std::string_view source, const std::map<std::string, bool>& switches) {
  // One entry per open #if: whether its current branch is kept, and whether it is a resolved switch (else the
  // directive itself is kept for the compiler).
  struct Open {
    bool keep, resolved;
  };
  std::vector<Open> open;
  const auto kept = [&open] {
    for (const auto& o : open)
      if (!o.keep) return false;
    return true;
  };
  std::string out;
  out.reserve(source.size());
  size_t start = 0;
  while (start < source.size()) {
    auto end = source.find('\n', start);
    if (end == std::string_view::npos) end = source.size();
    const auto line = trimmed(without_comment(source.substr(start, end - start)));
    start = end + 1;
    if (line.empty()) continue;
    if (line.starts_with("#if")) {
      const auto value = switch_of(line, switches);
      const bool outer = kept();
      open.push_back({value.value_or(true), value.has_value()});
      if (value || !outer) continue;
    } else if (line.starts_with("#elif") && !open.empty() && open.back().resolved) {
      throw std::invalid_argument("compact_kernel_source: #elif after a switch's #if");
    } else if (!open.empty() && (line == "#else" || line.starts_with("#endif"))) {
      const Open closing = open.back();
      if (line == "#else") {
        open.back().keep = closing.resolved ? !closing.keep : closing.keep;
      } else {
        open.pop_back();
      }
      if (closing.resolved || !kept()) continue;
    } else if (!kept()) {
      continue;
    }
    out.append(line);
    out.push_back('\n');
  }
  if (!open.empty()) throw std::invalid_argument("compact_kernel_source: an #if without its #endif");
  return out;
}

}  // namespace mlxr
