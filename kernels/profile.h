// Labels of our graph nodes, which the node profiler (profile.cpp) reports them by.
#pragma once

#include "ggml.h"

namespace pysdcpp {

// Our custom nodes' names start with this; the profiler reports the rest.
inline constexpr const char* kLabelPrefix = "pysdcpp.";

// Names node kLabelPrefix + label (at most 55 characters); returns node.
ggml_tensor* labelled(ggml_tensor* node, const char* label);

}  // namespace pysdcpp
