// The process-wide cancel flag of a running generation (cancel.h, pysdcpp_cancel in pysdcpp_ext.h).
#include <atomic>

#include "cancel.h"

extern "C" {
#include "stable-diffusion.h"
#include "pysdcpp_ext.h"
}

namespace {
std::atomic<bool> g_cancel{false};
}

namespace pysdcpp {

bool cancel_requested() {
    return g_cancel.load(std::memory_order_relaxed);
}

}  // namespace pysdcpp

extern "C" SD_API void pysdcpp_cancel(int on) {
    g_cancel.store(on != 0, std::memory_order_relaxed);
}

extern "C" SD_API int pysdcpp_cancel_requested(void) {
    return pysdcpp::cancel_requested() ? 1 : 0;
}
