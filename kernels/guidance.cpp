// The batched-guidance switch and step count (kernels/guidance.h), and their C entry points.
#include "guidance.h"

#include <atomic>

#include "stable-diffusion.h"

namespace pysdcpp {
namespace {
std::atomic<bool> g_batch{false};
std::atomic<int64_t> g_batched{0};
}  // namespace

bool guidance_batch() {
    return g_batch.load(std::memory_order_relaxed);
}

void set_guidance_batch(bool on) {
    g_batch.store(on, std::memory_order_relaxed);
}

void count_batched_step() {
    g_batched.fetch_add(1, std::memory_order_relaxed);
}

int64_t batched_steps(bool reset) {
    return reset ? g_batched.exchange(0) : g_batched.load();
}

}  // namespace pysdcpp

extern "C" SD_API void pysdcpp_set_guidance_batch(int on) {
    pysdcpp::set_guidance_batch(on != 0);
}

extern "C" SD_API int64_t pysdcpp_guidance_batched_steps(int reset) {
    return pysdcpp::batched_steps(reset != 0);
}
