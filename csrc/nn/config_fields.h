// How a config struct lists its fields, once: each field's name is also its config.json key and its
// Python attribute.
//
//   struct ZImageConfig {
//     int dim = 3840;
//     ...
//     MLXR_CONFIG_FIELDS(ZImageConfig, dim, ...)
//   };
//
// defines `template <class Visit> static void fields(Visit&& field)`, which calls
// field("dim", &ZImageConfig::dim) and so on for every name listed, in order. bindings/config.h
// builds the Python class (properties, from_dict, to_dict, ==, repr) from that alone.
#pragma once

#define MLXR_CONFIG_FIELDS(Config, ...)                       \
  template <class Visit>                                      \
  static void fields(Visit&& field) {                         \
    MLXR_FOR_EACH_NAME(MLXR_VISIT_FIELD, Config, __VA_ARGS__) \
  }

#define MLXR_VISIT_FIELD(Config, name) field(#name, &Config::name);

// MLXR_FOR_EACH_NAME(macro, arg, a, b, ...) expands to macro(arg, a) macro(arg, b) ...: the usual
// __VA_OPT__ recursion, rescanned 4^3 = 64 times (so up to 64 names).
#define MLXR_FOR_EACH_NAME(macro, arg, ...) __VA_OPT__(MLXR_RESCAN(MLXR_FOR_EACH_NAME_STEP(macro, arg, __VA_ARGS__)))
#define MLXR_FOR_EACH_NAME_STEP(macro, arg, name, ...) \
  macro(arg, name) __VA_OPT__(MLXR_FOR_EACH_NAME_AGAIN MLXR_EMPTY_PARENS(macro, arg, __VA_ARGS__))
#define MLXR_EMPTY_PARENS ()
#define MLXR_FOR_EACH_NAME_AGAIN() MLXR_FOR_EACH_NAME_STEP
#define MLXR_RESCAN(...) MLXR_RESCAN3(MLXR_RESCAN3(MLXR_RESCAN3(MLXR_RESCAN3(__VA_ARGS__))))
#define MLXR_RESCAN3(...) MLXR_RESCAN2(MLXR_RESCAN2(MLXR_RESCAN2(MLXR_RESCAN2(__VA_ARGS__))))
#define MLXR_RESCAN2(...) MLXR_RESCAN1(MLXR_RESCAN1(MLXR_RESCAN1(MLXR_RESCAN1(__VA_ARGS__))))
#define MLXR_RESCAN1(...) __VA_ARGS__
