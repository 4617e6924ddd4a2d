// Cancelling a generation between steps: the binding raises the flag (its progress callback saw a stop request)
// and the patched sampler checks it before each step and before the VAE decode, then fails the generation the way
// a failed compute does (buffers freed, generate_image returns NULL).
#pragma once

namespace pysdcpp {

bool cancel_requested();

}  // namespace pysdcpp
