// Feature inheritance across UNet evaluations (A-SDM, DeepCache; docs/inheritance.md): per evaluation, a plan
// marks units that reuse what they contributed when they were last computed instead of computing it again.
//
// Units, named as in stable-diffusion.cpp's UNet relative to model.diffusion_model. (the names of alter.h):
//   ResNet "input_blocks.1.0": inherits its residual branch (out_layers' output); the skip path (identity or
//     the 1x1 skip_connection) is computed;
//   transformer block "input_blocks.1.1.transformer_blocks.0": inherits what it added to its input;
//   DeepCache branch "branch.B": everything below entry B of the skip stack (the input blocks that push entries
//     B+1.., the middle block, the output blocks that pop them) is left out and the hidden state entering the
//     first output block that pops entry B is the one from the last computed evaluation.
// A cache entry belongs to (slot, part, unit): the slot is the condition of a guided step (0 cond, 1 uncond,
// 2 image condition, ...), the part 0 for a whole batch, i+1 for batch element i built alone. An entry is used
// only by an evaluation of the same input geometry (latent and context shapes); otherwise the unit is computed.
// ALTER comes first: a unit its expert skips is skipped, neither computed nor inherited.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ggml.h"

namespace pysdcpp {

struct InheritPlan {
    std::vector<std::string> units;
    int n_steps = 0;
    std::vector<uint8_t> inherit;  // n_steps x units, 1 = inherit at that step
};

// Process-wide plan (the binding sets it before a generation or a run of component calls). Setting or clearing
// a plan drops every cache. A plan holds at most one DeepCache branch: false (and nothing changed) otherwise.
bool inherit_set(InheritPlan plan);
void inherit_clear();
bool inherit_active();  // a plan is set
void inherit_drop_caches();
size_t inherit_cache_bytes();

// The evaluation about to be built: its step index (0-based; -1: no step, every unit computed) and slot.
void inherit_set_evaluation(int step, int slot);

enum class InheritAction : int { compute = 0, compute_and_store = 1, inherit = 2 };

// One UNet forward being built: its part and input geometry. Queries outside such a scope answer `compute`.
class InheritForwardScope {
public:
    InheritForwardScope(int part, const ggml_tensor* x, const ggml_tensor* context);
    ~InheritForwardScope();
    InheritForwardScope(const InheritForwardScope&)            = delete;
    InheritForwardScope& operator=(const InheritForwardScope&) = delete;

private:
    bool previous_;
};

// The ResNet being built (resblock_forward), for inherit_resblock().
class InheritUnitScope {
public:
    explicit InheritUnitScope(const std::string& unit);
    ~InheritUnitScope();
    InheritUnitScope(const InheritUnitScope&)            = delete;
    InheritUnitScope& operator=(const InheritUnitScope&) = delete;

private:
    std::string previous_;
};

// What the current evaluation does with `unit` (recorded in the history once per forward and unit).
InheritAction inherit_action(const std::string& unit);
// The same for the ResNet of the current InheritUnitScope.
InheritAction inherit_resblock();
// DeepCache: the branch entry B of the plan (-1: the plan has no branch), and the action for it.
int inherit_branch(InheritAction* action);

// The cached tensor of `unit` for the current forward (inherit_action said inherit).
ggml_tensor* inherit_load(ggml_context* ctx, const std::string& unit);
// `value`, passed through; at compute time value - minus (minus: nullptr for none) goes into unit's cache.
ggml_tensor* inherit_store(ggml_context* ctx, const std::string& unit, ggml_tensor* value,
                           ggml_tensor* minus = nullptr);
// The ResNet of the current InheritUnitScope.
const std::string& inherit_current_unit();

// Actions since the last clear, for the binding: one record per forward (unit -1, action -1) followed by one
// per unit of the plan it computed-and-stored or inherited.
struct InheritRecord {
    int step, slot, part, unit, action;
};
std::vector<InheritRecord> inherit_history();
void inherit_history_clear();

}  // namespace pysdcpp
