// Python progress callables for the denoising loops.
#pragma once

#include <functional>

#include <nanobind/nanobind.h>

#include "diffusion/flow_match.h"

namespace mlxr::bindings {

namespace nb = nanobind;

// A Python progress callable (step, total) -> bool | None, called with the GIL held; anything but
// an explicit False continues. An exception it raises propagates out of the loop. None: no callback.
StepCallback step_callback(nb::object progress);

// A Python callable () -> None called with the GIL held; an exception it raises propagates (a
// cancelled job's Cancelled). None: no check.
std::function<void()> cancel_check(nb::object check);

}  // namespace mlxr::bindings
