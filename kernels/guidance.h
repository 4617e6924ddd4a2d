// Batched guidance: whether a guided step evaluates cond and uncond as one batch-2 UNet evaluation (the process-wide
// switch the binding sets per generation; the sampler's patch decides per step where batching is exact), and a
// count of the steps that did.
#pragma once

#include <cstdint>

namespace pysdcpp {

bool guidance_batch();
void set_guidance_batch(bool on);
void count_batched_step();
int64_t batched_steps(bool reset);

}  // namespace pysdcpp
