// One binding for every config struct: a struct that lists its fields once,
//
//   template <class Visit> static void fields(Visit&& field) { field("dim", &ZImageConfig::dim); ... }
//
// (the name is the config.json key and the Python attribute), becomes a Python class with
//   - a property per field, type-checked on assignment;
//   - from_dict(values): the fields whose keys `values` has, the rest left at the struct's defaults;
//     unknown keys are ignored and None counts as absent (JSON null), so a config.json can be passed
//     as it is; a nested config (DecoderConfig.rope) comes from a nested dict;
//   - updated(values): the same over this config's values instead of the defaults (a nested dict
//     updates the nested config);
//   - to_dict(), __repr__ and == over the fields.
// A value of the wrong type or out of range for the C++ field is a ValueError that names the key:
// "dim: expected an integer, got 'abc'".
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace mlxr::bindings {

namespace nb = nanobind;

// Whether T lists its fields (a config struct).
struct AnyField {
  template <class Member>
  void operator()(const char*, Member) const {}
};
template <class T, class = void>
struct is_config : std::false_type {};
template <class T>
struct is_config<T, std::void_t<decltype(T::fields(AnyField{}))>> : std::true_type {};
template <class T>
constexpr bool is_config_v = is_config<T>::value;

template <class T>
struct is_optional : std::false_type {};
template <class T>
struct is_optional<std::optional<T>> : std::true_type {};

template <class T>
struct is_vector : std::false_type {};
template <class T>
struct is_vector<std::vector<T>> : std::true_type {};

// The type of the field a member pointer names.
template <class Config, class Member>
using field_t = std::remove_reference_t<decltype(std::declval<Config&>().*std::declval<Member>())>;

[[noreturn]] inline void bad_value(const std::string& key, const std::string& expected, nb::handle value) {
  throw std::invalid_argument(key + ": expected " + expected + ", got " + nb::repr(value).c_str());
}

[[noreturn]] inline void out_of_range(const std::string& key, nb::handle value, const char* type) {
  throw std::invalid_argument(key + ": " + nb::repr(value).c_str() + " is out of range for " + type);
}

// A float as the shortest decimal that reads back as the same float (1e-05, not 9.999999747378752e-06),
// so that to_dict() gives back the numbers a config.json wrote.
inline double shortest_decimal(float value) {
  if (!std::isfinite(value)) return value;
  char text[32];
  auto end = std::to_chars(text, text + sizeof(text), value).ptr;
  *end = '\0';
  return std::strtod(text, nullptr);
}

template <class Config>
Config config_updated(Config config, const nb::dict& values, const std::string& prefix = "");
template <class Config>
Config config_from_dict(const nb::dict& values, const std::string& prefix = "") {
  return config_updated(Config{}, values, prefix);
}
template <class Config>
nb::dict config_to_dict(const Config& config);

// An integer field. JSON has one number type: 2.0 is the integer 2, 2.5 is not an integer.
template <class T>
T integer_from_python(nb::handle value, const std::string& key) {
  nb::object number = nb::borrow(value);
  if (PyFloat_Check(value.ptr())) {
    const double d = PyFloat_AsDouble(value.ptr());
    if (!std::isfinite(d) || d != std::floor(d)) bad_value(key, "an integer", value);
    number = nb::steal(PyLong_FromDouble(d));
  } else if (PyBool_Check(value.ptr()) || !PyLong_Check(value.ptr())) {
    bad_value(key, "an integer", value);
  }
  if constexpr (std::is_signed_v<T>) {
    int overflow = 0;
    const long long n = PyLong_AsLongLongAndOverflow(number.ptr(), &overflow);
    if (overflow || n < std::numeric_limits<T>::min() || n > std::numeric_limits<T>::max()) {
      out_of_range(key, value, sizeof(T) == 4 ? "a 32-bit integer" : "a 64-bit integer");
    }
    return static_cast<T>(n);
  } else {
    const unsigned long long n = PyLong_AsUnsignedLongLong(number.ptr());  // negative: an OverflowError
    if ((n == static_cast<unsigned long long>(-1) && PyErr_Occurred()) || n > std::numeric_limits<T>::max()) {
      PyErr_Clear();
      out_of_range(key, value, sizeof(T) == 4 ? "an unsigned 32-bit integer" : "an unsigned 64-bit integer");
    }
    return static_cast<T>(n);
  }
}

// A float or double field, from a Python int or float.
template <class T>
T number_from_python(nb::handle value, const std::string& key) {
  if (PyBool_Check(value.ptr()) || !(PyFloat_Check(value.ptr()) || PyLong_Check(value.ptr()))) {
    bad_value(key, "a number", value);
  }
  const double d = PyFloat_AsDouble(value.ptr());
  if (d == -1.0 && PyErr_Occurred()) {  // an int too large for a double
    PyErr_Clear();
    out_of_range(key, value, "a double");
  }
  if (std::isfinite(d) && std::abs(d) > std::numeric_limits<T>::max()) out_of_range(key, value, "a float");
  return static_cast<T>(d);
}

// Python value -> a C++ field of type T; `key` names it in errors.
template <class T>
T from_python(nb::handle value, const std::string& key) {
  if constexpr (std::is_same_v<T, bool>) {
    if (!PyBool_Check(value.ptr())) bad_value(key, "true or false", value);
    return value.ptr() == Py_True;
  } else if constexpr (std::is_integral_v<T>) {
    return integer_from_python<T>(value, key);
  } else if constexpr (std::is_floating_point_v<T>) {
    return number_from_python<T>(value, key);
  } else if constexpr (std::is_same_v<T, std::string>) {
    if (!PyUnicode_Check(value.ptr())) bad_value(key, "a string", value);
    return nb::cast<std::string>(value);
  } else if constexpr (is_optional<T>::value) {
    if (value.is_none()) return std::nullopt;
    return from_python<typename T::value_type>(value, key);
  } else if constexpr (is_vector<T>::value) {
    if (!PyList_Check(value.ptr()) && !PyTuple_Check(value.ptr())) bad_value(key, "a list", value);
    T out;
    size_t i = 0;
    for (nb::handle item : value) {
      out.push_back(from_python<typename T::value_type>(item, key + "[" + std::to_string(i++) + "]"));
    }
    return out;
  } else if constexpr (is_config_v<T>) {
    if (nb::isinstance<T>(value)) return nb::cast<T>(value);
    if (!PyDict_Check(value.ptr())) bad_value(key, "a dict", value);
    return config_from_dict<T>(nb::borrow<nb::dict>(value), key + ".");
  } else {
    static_assert(std::is_void_v<T>, "a config field of a type config.h cannot convert");
  }
}

// A C++ field -> its Python value (nested configs as dicts).
template <class T>
nb::object to_python(const T& value) {
  if constexpr (std::is_same_v<T, float>) {
    return nb::float_(shortest_decimal(value));
  } else if constexpr (is_optional<T>::value) {
    return value ? to_python(*value) : nb::none();
  } else if constexpr (is_vector<T>::value) {
    nb::list out;
    for (const auto& item : value) out.append(to_python(item));
    return out;
  } else if constexpr (is_config_v<T>) {
    return config_to_dict(value);
  } else {
    return nb::cast(value);
  }
}

template <class Config>
Config config_updated(Config config, const nb::dict& values, const std::string& prefix) {
  Config::fields([&](const char* key, auto member) {
    if (!values.contains(key)) return;
    nb::object value = values[key];
    using Field = field_t<Config, decltype(member)>;
    // null keeps the default, but says "none" to a field that can be none (MLA's q_lora_rank: one q_proj).
    if (value.is_none() && !is_optional<Field>::value) return;
    if constexpr (is_config_v<Field>) {
      if (PyDict_Check(value.ptr())) {
        config.*member = config_updated(config.*member, nb::borrow<nb::dict>(value), prefix + key + ".");
        return;
      }
    }
    config.*member = from_python<Field>(value, prefix + key);
  });
  return config;
}

template <class Config>
nb::dict config_to_dict(const Config& config) {
  nb::dict out;
  Config::fields([&](const char* key, auto member) { out[key] = to_python(config.*member); });
  return out;
}

template <class Config>
bool configs_equal(const Config& a, const Config& b) {
  bool equal = true;
  Config::fields([&](const char*, auto member) {
    if constexpr (is_config_v<field_t<Config, decltype(member)>>) {
      equal = equal && configs_equal(a.*member, b.*member);
    } else {
      equal = equal && a.*member == b.*member;
    }
  });
  return equal;
}

template <class Config>
std::string config_repr(const char* name, const Config& config) {
  std::string out = std::string(name) + "(";
  bool first = true;
  Config::fields([&](const char* key, auto member) {
    using T = field_t<Config, decltype(member)>;
    out += std::string(first ? "" : ", ") + key + "=";
    if constexpr (is_config_v<T>) {
      out += nb::repr(nb::cast(config.*member)).c_str();
    } else {
      out += nb::repr(to_python(config.*member)).c_str();
    }
    first = false;
  });
  return out + ")";
}

// Binds Config as `name` in `scope`.
template <class Config>
nb::class_<Config> bind_config(nb::handle scope, const char* name, const char* doc) {
  using namespace nb::literals;
  nb::class_<Config> cls(scope, name, doc);
  cls.def(nb::init<>(), "The defaults.");
  Config::fields([&](const char* key, auto member) {
    using T = field_t<Config, decltype(member)>;
    auto set = [member, key](Config& config, nb::handle value) { config.*member = from_python<T>(value, key); };
    auto setter_takes_none = nb::for_setter(nb::arg("value").none());  // an optional field's None
    if constexpr (is_config_v<T>) {
      // The nested config itself (properties return references into their owner), so that
      // config.rope.rope_theta = ... changes this config.
      cls.def_prop_rw(
          key, [member](Config& config) -> T& { return config.*member; }, set, setter_takes_none);
    } else {
      cls.def_prop_rw(
          key, [member](const Config& config) { return to_python(config.*member); }, set, setter_takes_none);
    }
  });
  cls.def_static(
      "from_dict", [](const nb::dict& values) { return config_from_dict<Config>(values); }, "values"_a,
      "The config with the fields `values` names (e.g. a parsed config.json); defaults for the rest. "
      "Unknown keys are ignored and None counts as absent.");
  cls.def(
      "updated", [](const Config& self, const nb::dict& values) { return config_updated(self, values); }, "values"_a,
      "A copy with the fields `values` names replaced, as from_dict does over the defaults.");
  cls.def("to_dict", &config_to_dict<Config>, "Every field by its config.json key.");
  cls.def("__repr__", [name](const Config& config) { return config_repr(name, config); });
  cls.def(
      "__eq__", [](const Config& a, const Config& b) { return configs_equal(a, b); }, nb::is_operator());
  cls.attr("__hash__") = nb::none();  // mutable, compared by value
  return cls;
}

}  // namespace mlxr::bindings
