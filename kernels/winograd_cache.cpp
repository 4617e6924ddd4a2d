// The hoisted dependent stage: transformed filters cached per weight tensor for a component's scope under a byte
// budget (lookup, insert, release, byte and peak counters), and where a hoisted layer's U comes from (plan_filter).
#include "winograd_cache.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <vector>

#include "ggml-cpu.h"
#include "gemm.h"
#include "winograd_transforms.h"

namespace pysdcpp {

namespace {

void split(int64_t n, int ith, int nth, int64_t* b, int64_t* e) {
    const int64_t per = (n + nth - 1) / nth;
    *b                = std::min<int64_t>(n, per * ith);
    *e                = std::min<int64_t>(n, *b + per);
}

// Output channels [k0, k1) of thread ith: whole panels of the packed layout (no two threads share one).
void split_channels(int64_t K, bool packed, int ith, int nth, int64_t* k0, int64_t* k1) {
    if (!packed) {
        split(K, ith, nth, k0, k1);
        return;
    }
    split((K + kGemmPanel - 1) / kGemmPanel, ith, nth, k0, k1);
    *k0 = std::min(K, *k0 * kGemmPanel);
    *k1 = std::min(K, *k1 * kGemmPanel);
}

// ---- the dependent stage, hoisted: transformed filters cached per weight tensor ----------------------------
//
// Graphs are rebuilt at every evaluation, but the weights do not change: the filter transform runs once per
// weight and scope, and later graphs read the cached U as a leaf tensor. A scope is the life of a model
// component's compute buffer in stable-diffusion.cpp (a whole sampling loop for the UNet, one decode for the
// VAE): patch 0005 reports the end of it (pysdcpp_weights_released) and the component's filters go with it, so
// the memory they take is only held while that component runs (per-generation hoisting).
// Key: the weight's address, shape and type, the tile size and U's layout, plus a fingerprint of its first and last bytes (a guard against a
// freed model's address being reused; the binding also clears the cache whenever a context closes).

struct FilterKey {
    const void* data;
    int64_t C, K;
    int type, m;
    bool packed;
    bool operator<(const FilterKey& o) const {
        return std::tie(data, C, K, type, m, packed) < std::tie(o.data, o.C, o.K, o.type, o.m, o.packed);
    }
};

struct CachedFilter {
    std::vector<float> U;  // [alpha^2][K][C], or packed per position (FilterKey::packed)
    uint64_t fingerprint;
    const void* owner;  // the weight's backend buffer: the scope it belongs to
};

std::mutex g_cache_mutex;
std::map<FilterKey, std::unique_ptr<CachedFilter>> g_cache;
std::map<FilterKey, const void*> g_seen;  // weights a graph of the current scope has used, not cached (-> owner)
size_t g_cache_bytes  = 0;
size_t g_cache_peak   = 0;  // most bytes cached at once since the last reset
size_t g_cache_budget = kDefaultCacheBudget;
std::atomic<int> g_threads{0};  // threads of the compute the graphs are built for (set_winograd_threads); 0: unknown

uint64_t weight_fingerprint(const ggml_tensor* w) {
    const size_t n     = ggml_nbytes(w);
    const size_t probe = std::min<size_t>(n, 256);
    uint64_t h         = 1469598103934665603ull;
    const auto* bytes  = (const unsigned char*)w->data;
    for (size_t i = 0; i < probe; i++) {
        h = (h ^ bytes[i]) * 1099511628211ull;
        h = (h ^ bytes[n - 1 - i]) * 1099511628211ull;
    }
    return h;
}

FilterKey key_of(const ggml_tensor* w, int m, bool packed) {
    return FilterKey{w->data, w->ne[2], w->ne[3], (int)w->type, m, packed};
}

// Floats of U: alpha^2 positions of K x C (packed: K rounded up to whole panels, positions position_floats apart).
int64_t filter_floats(int64_t C, int64_t K, int m, bool packed) {
    return (m + 2) * (m + 2) * (packed ? position_floats(C, K) : C * K);
}

size_t filter_bytes(const ggml_tensor* w, int m, bool packed) {
    return (size_t)filter_floats(w->ne[2], w->ne[3], m, packed) * sizeof(float);
}

// The cached U of w, or nullptr. Call with g_cache_mutex held.
const float* lookup_locked(const ggml_tensor* w, int m, bool packed) {
    auto it = g_cache.find(key_of(w, m, packed));
    if (it == g_cache.end()) {
        return nullptr;
    }
    if (it->second->fingerprint == weight_fingerprint(w)) {
        return it->second->U.data();
    }
    g_cache_bytes -= it->second->U.size() * sizeof(float);
    g_cache.erase(it);
    return nullptr;
}

// Computes U for w (once per weight and scope) on as many threads as the compute runs with, and caches it. Call
// with g_cache_mutex held.
const float* insert_locked(const ggml_tensor* w, int m, bool packed) {
    const int64_t C = w->ne[2], K = w->ne[3];
    auto entry         = std::make_unique<CachedFilter>();
    entry->fingerprint = weight_fingerprint(w);
    entry->owner       = w->buffer;
    entry->U.resize((size_t)filter_floats(C, K, m, packed));
    ggml_cpu_init();  // F16 conversion tables where the CPU has no conversion instructions (idempotent)
    const int nth = std::max(1, std::min(g_threads.load(std::memory_order_relaxed), 16));  // unknown (0): 1
    std::vector<std::thread> pool;
    for (int i = 0; i < nth; i++) {
        pool.emplace_back([&, i]() {
            int64_t k0, k1;
            split_channels(K, packed, i, nth, &k0, &k1);
            if (k0 < k1) {
                transform_filters(w, m, packed, entry->U.data(), k0, k1);
            }
        });
    }
    for (auto& t : pool) {
        t.join();
    }
    g_cache_bytes += entry->U.size() * sizeof(float);
    g_cache_peak = std::max(g_cache_peak, g_cache_bytes);
    g_seen.erase(key_of(w, m, packed));
    const float* U = entry->U.data();
    g_cache[key_of(w, m, packed)] = std::move(entry);
    return U;
}

}  // namespace

const float* cached_filter(const ggml_tensor* w, int m, bool packed) {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    if (const float* U = lookup_locked(w, m, packed)) {
        return U;
    }
    return insert_locked(w, m, packed);
}

FilterSource plan_filter(const ggml_tensor* w, int m, bool packed) {
    const size_t bytes = filter_bytes(w, m, packed);
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    if (lookup_locked(w, m, packed) != nullptr) {
        return FilterSource::cached;
    }
    const FilterKey key  = key_of(w, m, packed);
    const bool first_use = g_seen.emplace(key, w->buffer).second;
    // A U transformed in the graph lives in the compute buffer, which keeps its peak size for the whole scope:
    // small filters only.
    const bool in_graph_ok = bytes <= kMaxInGraphBytes;
    // The first use of a small filter transforms in the graph: a component evaluated once per scope (the VAE
    // decode) then never holds its transformed filters beyond the layer that uses them.
    if (first_use && in_graph_ok) {
        return FilterSource::in_graph;
    }
    if (g_cache_bytes + bytes <= g_cache_budget) {
        insert_locked(w, m, packed);
        return FilterSource::cached;
    }
    // Over budget: a whole U per evaluation where it is small, else the transform inside the products (on these
    // maps the in-graph U measured faster: its products run as one GEMM over all tiles).
    return in_graph_ok ? FilterSource::in_graph : FilterSource::fused;
}

void winograd_cache_clear() {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    g_cache.clear();
    g_seen.clear();
    g_cache_bytes = 0;
}

void winograd_release(const void* owner) {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    for (auto it = g_cache.begin(); it != g_cache.end();) {
        if (it->second->owner == owner) {
            g_cache_bytes -= it->second->U.size() * sizeof(float);
            it = g_cache.erase(it);
        } else {
            ++it;
        }
    }
    for (auto it = g_seen.begin(); it != g_seen.end();) {
        it = it->second == owner ? g_seen.erase(it) : std::next(it);
    }
}

size_t winograd_cache_bytes() {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    return g_cache_bytes;
}

size_t winograd_cache_peak_bytes(bool reset) {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    const size_t peak = g_cache_peak;
    if (reset) {
        g_cache_peak = g_cache_bytes;
    }
    return peak;
}

void set_winograd_cache_budget(size_t bytes) {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    g_cache_budget = bytes;
}

void set_winograd_threads(int n) {
    g_threads.store(n > 0 ? n : 0, std::memory_order_relaxed);
}

}  // namespace pysdcpp

void pysdcpp_weights_released(const void* buffer) {
    if (buffer != nullptr) {
        pysdcpp::winograd_release(buffer);
    }
}
