// The process-wide cache of transformed filters (winograd_cache.cpp), private to the Winograd files: the graph
// builder takes cached U from it, the conv hook asks it where a hoisted layer's U comes from.
#pragma once

#include "ggml.h"
#include "winograd.h"

namespace pysdcpp {

// U for weight w from the cache, computed now if absent (no budget check: the caller decided).
const float* cached_filter(const ggml_tensor* w, int m, bool packed);

// Where the transformed filters of a layer whose transform is hoisted (winograd_plan) come from at this graph
// build (the cost model's memory half); a `cached` answer has put them in the cache.
FilterSource plan_filter(const ggml_tensor* w, int m, bool packed);

}  // namespace pysdcpp
