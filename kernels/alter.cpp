// ALTER routing state and the skip decisions the patched UNet asks for (see alter.h).
#include "alter.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <unordered_set>

namespace pysdcpp {
namespace {

struct State {
    AlterRouting routing;
    std::vector<std::unordered_set<std::string>> skipped;  // per expert
};

std::mutex g_mutex;
std::shared_ptr<const State> g_state;  // replaced wholesale; graph builders hold a reference while they build
std::vector<AlterEvaluation> g_history;
std::vector<std::string> g_missing_ok;

// The graph being built (the builder's thread): its routing and expert, and the attention layer in progress.
thread_local std::shared_ptr<const State> t_state;
thread_local int t_expert = -1;
thread_local std::string t_layer;

}  // namespace

void alter_set(AlterRouting routing) {
    auto state     = std::make_shared<State>();
    const size_t U = routing.units.size();
    state->skipped.resize((size_t)routing.n_experts);
    for (int e = 0; e < routing.n_experts; e++) {
        for (size_t u = 0; u < U; u++) {
            if (routing.keep[(size_t)e * U + u] == 0) {
                state->skipped[(size_t)e].insert(routing.units[u]);
            }
        }
    }
    state->routing = std::move(routing);
    std::lock_guard<std::mutex> lock(g_mutex);
    g_state = std::move(state);
}

void alter_clear() {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_state.reset();
}

bool alter_active() {
    std::lock_guard<std::mutex> lock(g_mutex);
    return g_state != nullptr;
}

int alter_expert_for(float t) {
    std::shared_ptr<const State> state;
    {
        std::lock_guard<std::mutex> lock(g_mutex);
        state = g_state;
    }
    if (state == nullptr || state->routing.table.empty() || !std::isfinite(t)) {
        return -1;
    }
    const long idx = std::lround(std::min(999.0f, std::max(0.0f, t)));
    return state->routing.table[(size_t)idx];
}

AlterExpertScope::AlterExpertScope(int expert, const float* ts, int64_t n) : previous_(t_expert) {
    {
        std::lock_guard<std::mutex> lock(g_mutex);
        t_state = g_state;
        if (g_state != nullptr) {
            for (int64_t i = 0; i < n; i++) {
                g_history.push_back({ts[i], expert});
            }
        }
    }
    t_expert = t_state != nullptr && expert >= 0 && expert < t_state->routing.n_experts ? expert : -1;
}

AlterExpertScope::~AlterExpertScope() {
    t_expert = previous_;
    if (t_expert < 0) {
        t_state.reset();
    }
}

AlterLayerScope::AlterLayerScope(const std::string& layer) : previous_(t_layer) {
    t_layer = layer;
}

AlterLayerScope::~AlterLayerScope() {
    t_layer = previous_;
}

const std::string& alter_layer() {
    return t_layer;
}

bool alter_skip(const std::string& unit) {
    if (t_expert < 0 || t_state == nullptr) {
        return false;
    }
    const auto& set = t_state->skipped[(size_t)t_expert];
    return set.find(unit) != set.end();
}

bool alter_skip_block(const std::string& block) {
    if (t_layer.empty()) {
        return false;
    }
    return alter_skip(t_layer + "." + block);
}

UpResAction alter_up_resblock(const std::string& unit, bool block_has_attention) {
    if (!alter_skip(unit)) {
        return UpResAction::run;
    }
    if (block_has_attention || t_state->routing.semantics == AlterSemantics::consume) {
        return UpResAction::pop_and_discard;
    }
    return UpResAction::keep_skip;
}

std::vector<AlterEvaluation> alter_history() {
    std::lock_guard<std::mutex> lock(g_mutex);
    return g_history;
}

void alter_history_clear() {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_history.clear();
}

ggml_tensor* batch_slice(ggml_context* ctx, ggml_tensor* t, int dim, int64_t i, int64_t N) {
    if (t == nullptr || t->ne[dim] != N || N == 1) {
        return t;
    }
    int64_t ne[4] = {t->ne[0], t->ne[1], t->ne[2], t->ne[3]};
    ne[dim]       = 1;
    return ggml_view_4d(ctx, t, ne[0], ne[1], ne[2], ne[3], t->nb[1], t->nb[2], t->nb[3], (size_t)i * t->nb[dim]);
}

void alter_set_missing_ok(std::vector<std::string> prefixes) {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_missing_ok = std::move(prefixes);
}

}  // namespace pysdcpp

bool pysdcpp_tensor_may_be_missing(const std::string& name) {
    std::lock_guard<std::mutex> lock(pysdcpp::g_mutex);
    for (const auto& p : pysdcpp::g_missing_ok) {
        if (name.compare(0, p.size(), p) == 0) {
            return true;
        }
    }
    return false;
}
