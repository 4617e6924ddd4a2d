// The node profiler: per-kind wall times of the graphs the CPU backend computes (patch 0012's hook).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "ggml.h"
#include "ggml_helpers.h"
#include "profile.h"

extern "C" {
#include "stable-diffusion.h"
#include "pysdcpp_ext.h"
extern void (*pysdcpp_node_timer)(const struct ggml_tensor* node, int64_t ns);  // patch 0012, ggml-cpu.c
}

namespace {

struct Total {
    int64_t count = 0, ns = 0;
};

std::mutex g_mutex;
std::map<std::string, Total> g_totals;
std::vector<std::pair<std::string, Total>> g_result;

// Each labelled node's function -> its label: upstream's graph code renames some nodes after we build them (the
// UNet's first and last convs become "bench-start" / "bench-end", a graph's last node its result name), and the
// function still says which of ours it is. ggml_custom_4d writes the function first in op_params.
std::mutex g_labels_mutex;
std::map<ggml_custom_op_t, std::string> g_labels;

const ggml_tensor* viewed(const ggml_tensor* t) {
    while (t != nullptr && t->view_src != nullptr) {
        t = t->view_src;
    }
    return t;
}

// "IM2COL 3x3": the kernel size of an im2col (src[0] is the conv's kernel), "" for anything else.
std::string im2col_size(const ggml_tensor* t) {
    if (t == nullptr || t->op != GGML_OP_IM2COL || t->src[0] == nullptr) {
        return "";
    }
    return std::to_string(t->src[0]->ne[0]) + "x" + std::to_string(t->src[0]->ne[1]);
}

std::string kind_of(const ggml_tensor* node) {
    const size_t n = std::strlen(pysdcpp::kLabelPrefix);
    // our custom nodes, and the one ggml op we label (Winograd's product through ggml's GEMM); other ops copy a
    // source's name into theirs ("... (cont)"), so a label is not taken from them
    if ((node->op == GGML_OP_CUSTOM || node->op == GGML_OP_MUL_MAT) &&
        std::strncmp(node->name, pysdcpp::kLabelPrefix, n) == 0) {
        return node->name + n;
    }
    if (node->op == GGML_OP_CUSTOM) {
        std::lock_guard<std::mutex> lock(g_labels_mutex);
        const auto it = g_labels.find(pysdcpp::custom_fun(node));
        if (it != g_labels.end()) {
            return it->second;
        }
    }
    std::string kind = ggml_op_desc(node);
    if (node->op == GGML_OP_IM2COL) {
        return kind + " " + im2col_size(node);
    }
    if (node->op == GGML_OP_MUL_MAT || node->op == GGML_OP_MUL_MAT_ID) {
        // a conv's product (one side an im2col), a layer's (the weights a leaf), or two activations (attention)
        std::string conv;
        for (int i = 0; i < 2 && conv.empty(); i++) {
            conv = im2col_size(viewed(node->src[i]));
        }
        const ggml_tensor* w = viewed(node->src[0]);
        kind += std::string(" ") + ggml_type_name(node->src[0]->type);
        if (!conv.empty()) {
            kind += ", im2col " + conv;
        } else {
            kind += w != nullptr && w->op == GGML_OP_NONE ? " weights" : " activations";
        }
    }
    return kind;
}

void record(const ggml_tensor* node, int64_t ns) {
    const std::string kind = kind_of(node);
    std::lock_guard<std::mutex> lock(g_mutex);
    Total& t = g_totals[kind];
    t.count += 1;
    t.ns += ns;
}

}  // namespace

namespace pysdcpp {

ggml_tensor* labelled(ggml_tensor* node, const char* label) {
    ggml_format_name(node, "%s%s", kLabelPrefix, label);
    if (node->op == GGML_OP_CUSTOM) {
        std::lock_guard<std::mutex> lock(g_labels_mutex);
        g_labels.try_emplace(custom_fun(node), label);
    }
    return node;
}

}  // namespace pysdcpp

extern "C" SD_API void pysdcpp_profile_start(void) {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_totals.clear();
    pysdcpp_node_timer = record;
}

extern "C" SD_API int pysdcpp_profile_stop(void) {
    pysdcpp_node_timer = nullptr;
    std::lock_guard<std::mutex> lock(g_mutex);
    g_result.assign(g_totals.begin(), g_totals.end());
    g_totals.clear();
    return (int)g_result.size();
}

extern "C" SD_API int pysdcpp_profile_kind(int i, char* name, int capacity, int64_t* count, int64_t* ns) {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (i < 0 || i >= (int)g_result.size() || capacity < 1) {
        return 1;
    }
    const std::string& kind = g_result[(size_t)i].first;
    const size_t len        = std::min(kind.size(), (size_t)capacity - 1);
    std::memcpy(name, kind.data(), len);
    name[len] = '\0';
    *count    = g_result[(size_t)i].second.count;
    *ns       = g_result[(size_t)i].second.ns;
    return 0;
}
