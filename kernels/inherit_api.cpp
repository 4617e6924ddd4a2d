// C entry points of feature inheritance (see inherit.h and pysdcpp_ext.h).
#include <exception>
#include <string>
#include <vector>

#include "inherit.h"

extern "C" {
#include "stable-diffusion.h"
#include "pysdcpp_ext.h"
}

extern "C" SD_API int pysdcpp_inherit_set(const char** units, int n_units, int n_steps, const uint8_t* inherit) {
    if (units == nullptr || inherit == nullptr || n_units < 1 || n_steps < 1) {
        return 1;
    }
    try {
        pysdcpp::InheritPlan plan;
        for (int u = 0; u < n_units; u++) {
            if (units[u] == nullptr || units[u][0] == '\0') {
                return 1;
            }
            plan.units.emplace_back(units[u]);
        }
        plan.n_steps = n_steps;
        plan.inherit.assign(inherit, inherit + (size_t)n_steps * (size_t)n_units);
        return pysdcpp::inherit_set(std::move(plan)) ? 0 : 1;
    } catch (const std::exception&) {
        return 1;
    }
}

extern "C" SD_API void pysdcpp_inherit_clear(void) {
    pysdcpp::inherit_clear();
}

extern "C" SD_API void pysdcpp_inherit_drop_caches(void) {
    pysdcpp::inherit_drop_caches();
}

extern "C" SD_API size_t pysdcpp_inherit_cache_bytes(void) {
    return pysdcpp::inherit_cache_bytes();
}

extern "C" SD_API void pysdcpp_inherit_set_evaluation(int step, int slot) {
    pysdcpp::inherit_set_evaluation(step, slot);
}

extern "C" SD_API int pysdcpp_inherit_history(int32_t* records, int capacity) {
    const auto h = pysdcpp::inherit_history();
    for (size_t i = 0; i < h.size() && (int)i < capacity; i++) {
        const int32_t r[5] = {h[i].step, h[i].slot, h[i].part, h[i].unit, h[i].action};
        for (int k = 0; k < 5; k++) {
            records[5 * i + k] = r[k];
        }
    }
    return (int)h.size();
}

extern "C" SD_API void pysdcpp_inherit_history_clear(void) {
    pysdcpp::inherit_history_clear();
}
