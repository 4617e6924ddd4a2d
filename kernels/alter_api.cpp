// C entry points of the ALTER routing (see alter.h and pysdcpp_ext.h).
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "alter.h"

extern "C" {
#include "stable-diffusion.h"
#include "pysdcpp_ext.h"
}

extern "C" SD_API int pysdcpp_alter_set(const char** units, int n_units, int n_experts, const uint8_t* keep,
                                        const int32_t* table, int semantics) {
    if (units == nullptr || keep == nullptr || table == nullptr || n_units < 1 || n_experts < 1 ||
        (semantics != PYSDCPP_ALTER_REFERENCE && semantics != PYSDCPP_ALTER_CONSUME)) {
        return 1;
    }
    for (int i = 0; i < 1000; i++) {
        if (table[i] < 0 || table[i] >= n_experts) {
            return 1;
        }
    }
    try {
        pysdcpp::AlterRouting r;
        for (int u = 0; u < n_units; u++) {
            if (units[u] == nullptr) {
                return 1;
            }
            r.units.emplace_back(units[u]);
        }
        r.n_experts = n_experts;
        r.keep.assign(keep, keep + (size_t)n_experts * (size_t)n_units);
        r.table.assign(table, table + 1000);
        r.semantics = semantics == PYSDCPP_ALTER_CONSUME ? pysdcpp::AlterSemantics::consume
                                                         : pysdcpp::AlterSemantics::reference;
        pysdcpp::alter_set(std::move(r));
        return 0;
    } catch (const std::exception&) {
        return 1;
    }
}

extern "C" SD_API void pysdcpp_alter_clear(void) {
    pysdcpp::alter_clear();
}

extern "C" SD_API int pysdcpp_alter_history(float* t, int32_t* expert, int capacity) {
    const auto h = pysdcpp::alter_history();
    for (size_t i = 0; i < h.size() && (int)i < capacity; i++) {
        t[i]      = h[i].t;
        expert[i] = h[i].expert;
    }
    return (int)h.size();
}

extern "C" SD_API void pysdcpp_alter_history_clear(void) {
    pysdcpp::alter_history_clear();
}

extern "C" SD_API void pysdcpp_alter_set_missing_ok(const char** prefixes, int n) {
    std::vector<std::string> p;
    for (int i = 0; i < n; i++) {
        if (prefixes[i] != nullptr) {
            p.emplace_back(prefixes[i]);
        }
    }
    pysdcpp::alter_set_missing_ok(std::move(p));
}
