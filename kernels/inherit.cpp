// Feature inheritance state, the per-unit decisions the patched UNet asks for, and the two graph ops that move a
// unit's contribution into and out of its cache (see inherit.h).
#include "inherit.h"
#include "profile.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <unordered_map>

namespace pysdcpp {
namespace {

struct Entry {
    std::vector<float> data;
    int64_t ne[4] = {0, 0, 0, 0};
    std::string geometry;  // of the forward that stored it
    bool valid = false;    // set when the storing graph ran
};

struct State {
    InheritPlan plan;
    std::unordered_map<std::string, int> index;
    int branch_unit = -1;  // the plan's "branch.B" unit, if any
    int branch      = -1;  // its B
};

const char kBranchPrefix[] = "branch.";

using Key = std::tuple<int, int, std::string>;  // slot, part, unit

std::mutex g_mutex;
std::shared_ptr<const State> g_state;
std::map<Key, Entry> g_cache;  // node-based: an Entry's address is stable while graphs that use it run
int g_step = -1;
int g_slot = 0;
std::vector<InheritRecord> g_history;

// The forward being built (the builder's thread).
thread_local bool t_in_forward = false;
thread_local int t_part        = 0;
thread_local std::string t_geometry;
thread_local std::shared_ptr<const State> t_state;
thread_local std::string t_unit;

std::string geometry_of(const ggml_tensor* x, const ggml_tensor* context) {
    std::string g;
    for (const ggml_tensor* t : {x, context}) {
        for (int d = 0; d < 4; d++) {
            g += std::to_string(t != nullptr ? t->ne[d] : 0) + ",";
        }
    }
    return g;
}

// Copy a contiguous range of floats, split over the op's threads.
void split_copy(float* dst, const float* src, const float* minus, int64_t n, int ith, int nth) {
    const int64_t per = (n + nth - 1) / nth;
    const int64_t lo  = std::min<int64_t>(n, per * ith);
    const int64_t hi  = std::min<int64_t>(n, lo + per);
    if (minus == nullptr) {
        if (hi > lo) {
            std::memcpy(dst + lo, src + lo, (size_t)(hi - lo) * sizeof(float));
        }
    } else {
        for (int64_t i = lo; i < hi; i++) {
            dst[i] = src[i] - minus[i];
        }
    }
}

void load_node(ggml_tensor* dst, int ith, int nth, void* userdata) {
    const Entry* e = static_cast<const Entry*>(userdata);
    split_copy(static_cast<float*>(dst->data), e->data.data(), nullptr, ggml_nelements(dst), ith, nth);
}

void store_node(ggml_tensor* dst, int ith, int nth, void* userdata) {
    Entry* e                 = static_cast<Entry*>(userdata);
    const ggml_tensor* value = dst->src[0];
    const ggml_tensor* minus = dst->src[1];
    const int64_t n          = ggml_nelements(dst);
    split_copy(static_cast<float*>(dst->data), static_cast<const float*>(value->data), nullptr, n, ith, nth);
    split_copy(e->data.data(), static_cast<const float*>(value->data),
               minus != nullptr ? static_cast<const float*>(minus->data) : nullptr, n, ith, nth);
    if (ith == 0) {
        e->valid = true;  // read only when the next graph is built, after this one has finished
    }
}

ggml_tensor* contiguous_f32(ggml_context* ctx, ggml_tensor* t) {
    if (t->type != GGML_TYPE_F32) {
        return ggml_cast(ctx, t, GGML_TYPE_F32);
    }
    return ggml_is_contiguous(t) ? t : ggml_cont(ctx, t);
}

}  // namespace

bool inherit_set(InheritPlan plan) {
    auto state = std::make_shared<State>();
    for (size_t u = 0; u < plan.units.size(); u++) {
        state->index[plan.units[u]] = (int)u;
        if (plan.units[u].compare(0, sizeof(kBranchPrefix) - 1, kBranchPrefix) == 0) {
            if (state->branch_unit >= 0) {
                return false;  // one DeepCache branch per plan
            }
            state->branch_unit = (int)u;
            state->branch      = std::atoi(plan.units[u].c_str() + sizeof(kBranchPrefix) - 1);
        }
    }
    state->plan = std::move(plan);
    std::lock_guard<std::mutex> lock(g_mutex);
    g_state = std::move(state);
    g_cache.clear();
    return true;
}

void inherit_clear() {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_state.reset();
    g_cache.clear();
    g_step = -1;
    g_slot = 0;
}

bool inherit_active() {
    std::lock_guard<std::mutex> lock(g_mutex);
    return g_state != nullptr;
}

void inherit_drop_caches() {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_cache.clear();
}

size_t inherit_cache_bytes() {
    std::lock_guard<std::mutex> lock(g_mutex);
    size_t bytes = 0;
    for (const auto& kv : g_cache) {
        bytes += kv.second.data.size() * sizeof(float);
    }
    return bytes;
}

void inherit_set_evaluation(int step, int slot) {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_step = step;
    g_slot = slot;
}

InheritForwardScope::InheritForwardScope(int part, const ggml_tensor* x, const ggml_tensor* context)
    : previous_(t_in_forward) {
    std::lock_guard<std::mutex> lock(g_mutex);
    t_state      = g_state;
    t_in_forward = t_state != nullptr;
    t_part       = part;
    t_geometry   = geometry_of(x, context);
    if (t_in_forward) {
        g_history.push_back({g_step, g_slot, part, -1, -1});
    }
}

InheritForwardScope::~InheritForwardScope() {
    t_in_forward = previous_;
    if (!t_in_forward) {
        t_state.reset();
    }
}

InheritUnitScope::InheritUnitScope(const std::string& unit) : previous_(t_unit) {
    t_unit = unit;
}

InheritUnitScope::~InheritUnitScope() {
    t_unit = previous_;
}

const std::string& inherit_current_unit() {
    return t_unit;
}

InheritAction inherit_action(const std::string& unit) {
    if (!t_in_forward || t_state == nullptr || unit.empty()) {
        return InheritAction::compute;
    }
    const auto it = t_state->index.find(unit);
    if (it == t_state->index.end()) {
        return InheritAction::compute;
    }
    const int u = it->second;
    std::lock_guard<std::mutex> lock(g_mutex);
    const InheritPlan& plan = t_state->plan;
    InheritAction action    = InheritAction::compute_and_store;
    if (g_step >= 0 && g_step < plan.n_steps && plan.inherit[(size_t)g_step * plan.units.size() + (size_t)u] != 0) {
        const auto e = g_cache.find(Key(g_slot, t_part, unit));
        if (e != g_cache.end() && e->second.valid && e->second.geometry == t_geometry) {
            action = InheritAction::inherit;
        }  // else nothing to inherit yet (or from another geometry): computed, and cached for the next step
    }
    g_history.push_back({g_step, g_slot, t_part, u, (int)action});
    return action;
}

InheritAction inherit_resblock() {
    return inherit_action(t_unit);
}

int inherit_branch(InheritAction* action) {
    *action = InheritAction::compute;
    if (!t_in_forward || t_state == nullptr || t_state->branch_unit < 0) {
        return -1;
    }
    *action = inherit_action(t_state->plan.units[(size_t)t_state->branch_unit]);
    return t_state->branch;
}

ggml_tensor* inherit_load(ggml_context* ctx, const std::string& unit) {
    const Entry* e;
    {
        std::lock_guard<std::mutex> lock(g_mutex);
        e = &g_cache.at(Key(g_slot, t_part, unit));
    }
    return labelled(ggml_custom_4d(ctx, GGML_TYPE_F32, e->ne[0], e->ne[1], e->ne[2], e->ne[3], nullptr, 0, load_node,
                                   GGML_N_TASKS_MAX, const_cast<Entry*>(e)),
                    "inherit.load");
}

ggml_tensor* inherit_store(ggml_context* ctx, const std::string& unit, ggml_tensor* value, ggml_tensor* minus) {
    value = contiguous_f32(ctx, value);
    if (minus != nullptr) {
        minus = contiguous_f32(ctx, minus);
        GGML_ASSERT(ggml_are_same_shape(value, minus));
    }
    Entry* e;
    {
        std::lock_guard<std::mutex> lock(g_mutex);
        e = &g_cache[Key(g_slot, t_part, unit)];
        e->data.assign((size_t)ggml_nelements(value), 0.0f);
        for (int d = 0; d < 4; d++) {
            e->ne[d] = value->ne[d];
        }
        e->geometry = t_geometry;
        e->valid    = false;
    }
    ggml_tensor* args[2] = {value, minus};
    return labelled(ggml_custom_4d(ctx, GGML_TYPE_F32, value->ne[0], value->ne[1], value->ne[2], value->ne[3], args,
                                   minus != nullptr ? 2 : 1, store_node, GGML_N_TASKS_MAX, e),
                    "inherit.store");
}

std::vector<InheritRecord> inherit_history() {
    std::lock_guard<std::mutex> lock(g_mutex);
    return g_history;
}

void inherit_history_clear() {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_history.clear();
}

}  // namespace pysdcpp
