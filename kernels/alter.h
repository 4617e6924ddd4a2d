// ALTER temporal experts in the accelerated library: per UNet evaluation, the timestep picks an expert and the
// graph is built without that expert's pruned units (docs/alter-gguf.md; the Python side loads the routing from
// the GGUF metadata and hands it over before every compute).
//
// Units are named as in stable-diffusion.cpp's UNet, relative to model.diffusion_model.: ResNets
// "input_blocks.1.0", "middle_block.2", "output_blocks.3.0"; transformer blocks
// "input_blocks.1.1.transformer_blocks.0". What skipping means (alter-format.md section 3):
//   transformer block: bypassed (hidden unchanged); the surrounding SpatialTransformer still runs;
//   ResNet in a down block or the middle block: identity;
//   ResNet in an up block with attention: its skip tensor is popped and concatenated as usual, then discarded;
//   ResNet in an up block without attention: `reference` semantics do not pop (the next kept ResNet consumes
//   that skip; leftovers are dropped at the end of the block), `consume` semantics pop and discard.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ggml.h"

namespace pysdcpp {

enum class AlterSemantics : int { reference = 0, consume = 1 };

// What an up-block ResNet does under the current expert.
enum class UpResAction : int { run = 0, pop_and_discard = 1, keep_skip = 2 };

struct AlterRouting {
    std::vector<std::string> units;
    int n_experts = 0;
    std::vector<uint8_t> keep;       // n_experts x units, 1 = keep
    std::vector<int32_t> table;      // 1000 entries: timestep -> expert
    AlterSemantics semantics = AlterSemantics::reference;
};

// Process-wide routing (the binding sets it before each compute, like the conv and attention modes).
void alter_set(AlterRouting routing);
void alter_clear();
bool alter_active();

// The expert for a (possibly fractional) timestep: rounded to the nearest integer, clamped to 0..999.
int alter_expert_for(float t);

// Graph-build scope: while alive, alter_skip() answers for `expert` (-1: nothing is skipped). Records the
// evaluation of the n batch elements with timesteps ts[0..n) in the history the binding reads back.
class AlterExpertScope {
public:
    AlterExpertScope(int expert, const float* ts, int64_t n);
    ~AlterExpertScope();
    AlterExpertScope(const AlterExpertScope&)            = delete;
    AlterExpertScope& operator=(const AlterExpertScope&) = delete;

private:
    int previous_;
};

// Scope naming the attention layer being built ("input_blocks.1.1"), so its transformer blocks can ask.
class AlterLayerScope {
public:
    explicit AlterLayerScope(const std::string& layer);
    ~AlterLayerScope();
    AlterLayerScope(const AlterLayerScope&)            = delete;
    AlterLayerScope& operator=(const AlterLayerScope&) = delete;

private:
    std::string previous_;
};

// The attention layer of the current AlterLayerScope ("" outside one).
const std::string& alter_layer();

// Is this unit skipped by the expert of the current scope?
bool alter_skip(const std::string& unit);
// Is transformer block `block` ("transformer_blocks.0") of the current attention layer skipped?
bool alter_skip_block(const std::string& block);
// The action for an up-block ResNet.
UpResAction alter_up_resblock(const std::string& unit, bool block_has_attention);

// Evaluations since the last clear: timestep and expert of each (one entry per batch element).
struct AlterEvaluation {
    float t;
    int expert;
};
std::vector<AlterEvaluation> alter_history();
void alter_history_clear();

// Batch element i of a graph input whose batch axis is `dim` (N elements), as a view; inputs broadcast over the
// batch (that axis has size 1) and nullptr come back as they are.
ggml_tensor* batch_slice(ggml_context* ctx, ggml_tensor* t, int dim, int64_t i, int64_t N);

// Tensor names a file may lack (units left out by --drop-unused): the loader does not insist on them.
void alter_set_missing_ok(std::vector<std::string> prefixes);

}  // namespace pysdcpp

// Called from the patched model loader (plain C++ linkage, declared there).
bool pysdcpp_tensor_may_be_missing(const std::string& name);
