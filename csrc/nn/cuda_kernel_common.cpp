#include "nn/cuda_kernel_common.h"

#include <stdlib.h>  // mkdtemp

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
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

namespace {

bool kernel_sources_by_path() {
  static EnvSwitch by_path("MLXRUNNER_KERNEL_SOURCES_BY_PATH");
  return by_path.on();
}

// A directory of this process's own, made once: no other user can change the files NVRTC reads from it. MLX compiles
// a kernel within the process that launches it, so the directory goes when the process exits.
const std::filesystem::path& kernel_source_dir() {
  static const std::filesystem::path dir = [] {
    static std::string made = (std::filesystem::temp_directory_path() / "mlxrunner-kernels-XXXXXX").string();
    if (mkdtemp(made.data()) == nullptr) {
      throw std::runtime_error("cannot make a directory for the CUDA kernels' sources under " +
                               std::filesystem::temp_directory_path().string());
    }
    std::atexit([] {
      std::error_code ignored;
      std::filesystem::remove_all(made, ignored);
    });
    return std::filesystem::path(made);
  }();
  return dir;
}

}  // namespace

std::string kernel_source_included(const std::string& source, const std::vector<std::string>& inputs) {
  std::string mentions;
  for (const auto& input : inputs) {
    for (const char* suffix : {"_shape", "_strides", "_ndim"}) {
      if (source.find(input + suffix) != std::string::npos) mentions += "(void)" + input + suffix + ";";
    }
  }
  char hash[17];
  std::snprintf(hash, sizeof(hash), "%016zx", std::hash<std::string>{}(source));
  const auto path = kernel_source_dir() / (std::string(hash) + ".cuh");
  if (!std::filesystem::exists(path)) {
    // Written whole under another name, then renamed: a compile on another thread never reads half a file.
    auto partial = path;
    partial += "." + std::to_string(std::hash<std::thread::id>{}(std::this_thread::get_id())) + ".part";
    {
      std::ofstream file(partial, std::ios::binary);
      file << source;
      if (!file) throw std::runtime_error("cannot write a CUDA kernel's source to " + partial.string());
    }
    std::filesystem::rename(partial, path);
  }
  return mentions + (mentions.empty() ? "" : "\n") + "#include \"" + path.string() + "\"\n";
}

mx::fast::CustomKernelFunction cuda_kernel(const std::string& name, const std::vector<std::string>& inputs,
                                           const std::vector<std::string>& outputs, std::string_view source,
                                           std::string_view header, bool ensure_row_contiguous,
                                           const std::map<std::string, bool>& switches) {
  const auto body = compact_kernel_source(source, switches);
  const auto head = compact_kernel_source(header, switches);
  auto given = mx::fast::cuda_kernel(name, inputs, outputs, body, head, ensure_row_contiguous);
  // The #included form, made at its first call under MLXRUNNER_KERNEL_SOURCES_BY_PATH=1. The switch is looked at on
  // every call (the kernels are kept in statics), so that a benchmark can time both forms in one process
  // (reread_switches): the scatter between processes is larger than what the form changes.
  struct Included {
    std::once_flag made;
    mx::fast::CustomKernelFunction kernel;
  };
  auto included = std::make_shared<Included>();
  auto make_included = [=] {
    included->kernel = mx::fast::cuda_kernel(name, inputs, outputs, kernel_source_included(body, inputs),
                                             head.empty() ? head : kernel_source_included(head), ensure_row_contiguous);
  };
  return [given = std::move(given), included, make_included](
             const std::vector<mx::array>& in, const std::vector<mx::Shape>& shapes,
             const std::vector<mx::Dtype>& dtypes, std::tuple<int, int, int> grid, std::tuple<int, int, int> group,
             std::vector<std::pair<std::string, mx::fast::TemplateArg>> template_args, std::optional<float> init,
             bool verbose, mx::StreamOrDevice stream) {
    if (!kernel_sources_by_path())
      return given(in, shapes, dtypes, grid, group, std::move(template_args), init, verbose, stream);
    std::call_once(included->made, make_included);
    return included->kernel(in, shapes, dtypes, grid, group, std::move(template_args), init, verbose, stream);
  };
}

}  // namespace mlxr
