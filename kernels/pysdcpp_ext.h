/* pysdcpp extension API of the accelerated library: component entry points for tests and research.
   Plain C, no preprocessor logic below the guard: the Python binding reads this file as its declarations. */
#ifndef PYSDCPP_EXT_H
#define PYSDCPP_EXT_H
#ifdef __cplusplus
extern "C" {
#endif

/* A float tensor in ggml dimension order (ne[0] is the fastest-varying axis); data is malloc'd by the
   library and released with pysdcpp_tensor_free. */
typedef struct {
    float* data;
    int64_t ne[4];
    int n_dims;
} pysdcpp_tensor_t;

/* Every call returns 0 on success and a non-zero code on failure; pysdcpp_last_error() then says why. */
const char* pysdcpp_last_error(void);
void pysdcpp_tensor_free(pysdcpp_tensor_t* tensor);
int pysdcpp_api_version(void);

/* Token ids the text encoder sees for `text` (BOS, tokens, EOS, padding to whole 77-token chunks). */
int pysdcpp_tokenize(sd_ctx_t* ctx, const char* text, int32_t* out_ids, int capacity, int* out_count);
/* Text-encoder hidden states [n_tokens, hidden] for `text` (the UNet's context); clip_skip <= 0 takes the model's
   default. out_y (may be NULL) receives the UNet's extra input where the model has one (SDXL: the pooled text
   embedding and the size conditioning, original = target = width x height, crop 0, as upstream's generation
   builds it), else n_dims 0 and data NULL. */
int pysdcpp_encode_prompt(sd_ctx_t* ctx, const char* text, int clip_skip, int width, int height,
                          pysdcpp_tensor_t* out_y, pysdcpp_tensor_t* out);
/* One diffusion-model evaluation: x [W, H, C, N], timesteps [N], context [hidden, tokens, N], y [width, N] or NULL
   (the models that take one need it) -> model output. The
   UNet's working memory (and the Winograd filters cached for it) stays between calls, as in a sampling loop,
   until a generation's sampling ends or the context closes. */
int pysdcpp_unet(sd_ctx_t* ctx, const float* x, const int64_t* x_ne, const float* timesteps,
                 const float* context, const int64_t* context_ne, const float* y, const int64_t* y_ne,
                 pysdcpp_tensor_t* out);
/* pysdcpp_unet with a ControlNet (a context made with one): the ControlNet runs on the same x, timesteps, context
   and y with the hint [8 W, 8 H, 3, N] (the control image, 0..1), and its residuals, times control_strength, go
   into the UNet's skip connections and middle block, as a guided sampling step runs them per condition. */
int pysdcpp_unet_controlled(sd_ctx_t* ctx, const float* x, const int64_t* x_ne, const float* timesteps,
                            const float* context, const int64_t* context_ne, const float* y, const int64_t* y_ne,
                            const float* hint, const int64_t* hint_ne, float control_strength,
                            pysdcpp_tensor_t* out);
/* Width of the UNet's extra input y (SDXL: 2816), 0 where it takes none. */
int64_t pysdcpp_unet_y_width(sd_ctx_t* ctx);
/* VAE decode of a diffusion latent [W, H, C, N]: the decoder's raw output, before clamping, about -1..1 (a tiny
   autoencoder's 0..1 output mapped to that range too). */
int pysdcpp_decode(sd_ctx_t* ctx, const float* latent, const int64_t* latent_ne, pysdcpp_tensor_t* out);

/* Convolution algorithms: the context-wide choice (pysdcpp_set_conv_algorithm: IM2COL, or any WINOGRAD value: the
   cost model then picks F(4x4), F(2x2) or im2col and where the filters come from, per layer; the same choice sends
   1x1 convs to pysdcpp_conv2d_1x1's node and group norms to pysdcpp_group_norm's) and the explicit per-call
   variants of pysdcpp_conv2d_3x3
   (WINOGRAD_F4/F2: filters from the cache; WINOGRAD_F4_IN_GRAPH: the filter transform as a graph node;
   WINOGRAD_F4_GGML_GEMM: the products through ggml's GEMM instead of ours; WINOGRAD_F4_SCALAR: our GEMM's portable
   scalar build; WINOGRAD_F4_FUSED/F2_FUSED: the filter transform fused into the products, block by block). */
enum pysdcpp_conv_t {
    PYSDCPP_CONV_IM2COL               = 0,
    PYSDCPP_CONV_DIRECT               = 1,
    PYSDCPP_CONV_WINOGRAD_F4          = 2,
    PYSDCPP_CONV_WINOGRAD_F2          = 3,
    PYSDCPP_CONV_WINOGRAD_F4_IN_GRAPH = 4,
    PYSDCPP_CONV_WINOGRAD_F4_GGML_GEMM = 5,
    PYSDCPP_CONV_WINOGRAD_F4_SCALAR   = 6,
    PYSDCPP_CONV_WINOGRAD_F4_FUSED    = 7,
    PYSDCPP_CONV_WINOGRAD_F2_FUSED    = 8,
    PYSDCPP_CONV_LAST                 = 8
};
void pysdcpp_set_conv_algorithm(int algorithm);
/* What a context with the WINOGRAD algorithm runs for a 3x3 stride-1 conv of x [N, C, H, W] with K output channels:
   IM2COL, WINOGRAD_F4 or F2 (filter transform hoisted: cached within the budget, else transformed in the graph or,
   for large filters, in the products), WINOGRAD_F4_GGML_GEMM (the same with ggml's GEMM, K < 16), or
   WINOGRAD_F4_FUSED or F2_FUSED (small maps: the transform always inside the products). */
int pysdcpp_conv_plan(int64_t N, int64_t C, int64_t H, int64_t W, int64_t K, int pad);
/* How many eligible 3x3 stride-1 convs the graphs built since the last reset (reset != 0 restarts the counts)
   routed each way: counts[0] kept im2col, [1] Winograd with cached filters, [2] with filters transformed in the
   graph, [3] with filters transformed inside the products. */
void pysdcpp_conv_routes(int64_t* counts, int reset);
/* Transformed Winograd filters are cached per weight up to a byte budget (default 1536 MB) while their model
   component computes: released when stable-diffusion.cpp frees the component's compute buffer (end of sampling,
   end of a decode). Layers with few tiles (small maps) never cache: their filters are transformed inside the
   products. A filter's first use in a scope transforms it inside the graph when it is small; layers the cache
   cannot take transform inside the graph, or inside the products when large (docs/benchmarks.md). peak_bytes: most
   bytes cached at once since the last reset (reset != 0 restarts it from the current size). chunk_bytes: the
   tiles of one node go through in chunks whose stages take at most this much (<= 0: the default, 64 MB). */
void pysdcpp_set_winograd_cache_budget(size_t bytes);
// Threads the cached filter transforms (run while a graph is built) use: the context's thread count.
void pysdcpp_set_winograd_threads(int n_threads);
size_t pysdcpp_winograd_cache_default_budget(void);
size_t pysdcpp_winograd_cache_bytes(void);
size_t pysdcpp_winograd_cache_peak_bytes(int reset);
void pysdcpp_winograd_cache_clear(void);
void pysdcpp_set_winograd_chunk_bytes(int64_t bytes);
const char* pysdcpp_conv_last_error(void);
/* One 3x3 stride-1 convolution on host arrays through the graph nodes the models use (no model needed):
   x [N][C][H][W], w [K][C][3][3] (held as F16 when weight_f16), bias [K] or NULL, y [N][K][H+2p-2][W+2p-2].
   Runs `repeat` times; seconds[r] (may be NULL) receives each run's wall time. */
int pysdcpp_conv2d_3x3(const float* x, int64_t N, int64_t C, int64_t H, int64_t W, const float* w, int64_t K,
                       const float* bias, int pad, int weight_f16, int algorithm, int n_threads, int repeat,
                       float* y, double* seconds);

/* The paths of the single-layer harnesses below: UPSTREAM = the ops upstream's graph builds, FAST = our node,
   FAST_SCALAR = our node's portable scalar build. Each returns 0, or 1 with its last_error() set. */
enum pysdcpp_path_t {
    PYSDCPP_PATH_UPSTREAM    = 0,
    PYSDCPP_PATH_FAST        = 1,
    PYSDCPP_PATH_FAST_SCALAR = 2
};
/* One 1x1 stride-1 convolution (kernels/pointwise.h; the context's conv algorithm WINOGRAD routes them there):
   x [N][C][H][W], w [K][C] (held as F16 when weight_f16), bias [K] or NULL, y [N][K][H][W]. */
int pysdcpp_conv2d_1x1(const float* x, int64_t N, int64_t C, int64_t H, int64_t W, const float* w, int64_t K,
                       const float* bias, int weight_f16, int path, int n_threads, int repeat, float* y,
                       double* seconds);
const char* pysdcpp_conv1x1_last_error(void);
/* One group normalisation with its affine step (kernels/groupnorm.h; also routed by the WINOGRAD algorithm):
   x, y [N][C][H][W], gamma and beta [C], C divisible by groups; offset [N][C] added to x first (a ResNet's time
   embedding) or NULL; silu: SiLU of the result. */
int pysdcpp_group_norm(const float* x, int64_t N, int64_t C, int64_t H, int64_t W, int groups, float eps,
                       const float* gamma, const float* beta, const float* offset, int silu, int path, int n_threads,
                       int repeat, float* y, double* seconds);
const char* pysdcpp_group_norm_last_error(void);
/* One GEGLU (kernels/geglu.h; the linear-layer mode FAST routes the UNets' feed-forward gates there):
   p [rows][2D] (value, then gate), y [rows][D] = value * gelu(gate), GELU's tanh form. */
int pysdcpp_geglu(const float* p, int64_t rows, int64_t D, int path, int n_threads, int repeat, float* y,
                  double* seconds);
const char* pysdcpp_geglu_last_error(void);
/* One layer normalisation with its affine step (kernels/layernorm.h; the linear-layer mode FAST routes the
   transformers' layer norms there): x, y [rows][C], gamma [C], beta [C] or NULL. */
int pysdcpp_layer_norm(const float* x, int64_t rows, int64_t C, float eps, const float* gamma, const float* beta,
                       int path, int n_threads, int repeat, float* y, double* seconds);
const char* pysdcpp_layer_norm_last_error(void);

/* Linear layers: the context-wide choice (pysdcpp_set_linear_mode: UPSTREAM = ggml's mul_mat, FAST = our GEMM
   with F32 activations, kernels/linear.h) and the explicit per-call paths of pysdcpp_linear (FAST_SCALAR: our
   GEMM's portable scalar build). pysdcpp_linear: y [rows][N] = x [rows][K] w[N][K]^T (+ bias [N]), w held in F16
   when weight_f16; returns 0, or 1 with pysdcpp_linear_last_error() set. */
enum pysdcpp_linear_t {
    PYSDCPP_LINEAR_UPSTREAM    = 0,
    PYSDCPP_LINEAR_FAST        = 1,
    PYSDCPP_LINEAR_FAST_SCALAR = 2
};
void pysdcpp_set_linear_mode(int mode);
/* The register tile of our GEMM's vector build (Winograd's products, the 1x1 convs, the linear layers), process-wide:
   AUTO = WIDE where the library was built for AVX-512, else NARROW; NARROW = 6 x 16 (8-lane vectors), WIDE =
   12 x 32 (16-lane vectors; correct on any machine, fast where one register holds 16 floats). pysdcpp_gemm_tile
   returns the tile in use (NARROW or WIDE). */
enum pysdcpp_gemm_tile_t {
    PYSDCPP_GEMM_TILE_AUTO   = 0,
    PYSDCPP_GEMM_TILE_NARROW = 1,
    PYSDCPP_GEMM_TILE_WIDE   = 2
};
void pysdcpp_set_gemm_tile(int tile);
int pysdcpp_gemm_tile(void);
int pysdcpp_linear(const float* x, int64_t rows, int64_t K, const float* w, int64_t N, const float* bias,
                   int weight_f16, int path, int n_threads, int repeat, float* y, double* seconds);
const char* pysdcpp_linear_last_error(void);

/* Attention: the context-wide choice (pysdcpp_set_attention_mode: UPSTREAM, or FAST = the accelerated path
   chosen per shape) and the explicit per-call variants of pysdcpp_attention (UPSTREAM_FLASH: upstream's
   flash-attention path). */
enum pysdcpp_attention_t {
    PYSDCPP_ATTN_UPSTREAM       = 0,
    PYSDCPP_ATTN_FAST           = 1,
    PYSDCPP_ATTN_FUSED          = 2,
    PYSDCPP_ATTN_FUSED_SCALAR   = 3,
    PYSDCPP_ATTN_GEMM           = 4,
    PYSDCPP_ATTN_UPSTREAM_FLASH = 5
};
void pysdcpp_set_attention_mode(int mode);
const char* pysdcpp_attention_last_error(void);
/* softmax(q k^T / sqrt(d)) v per head on host arrays: q [N][L_q][C], k and v [N][L_k][C] (C = n_head * d,
   heads side by side in C) -> out [N][L_q][C]. Runs `repeat` times; seconds[r] (may be NULL) receives each
   run's wall time and compute_bytes (may be NULL) the graph's compute buffer size. */
int pysdcpp_attention(const float* q, const float* k, const float* v, int64_t N, int64_t L_q, int64_t L_k,
                      int64_t C, int64_t n_head, int variant, int n_threads, int repeat, float* out,
                      double* seconds, size_t* compute_bytes);

/* ALTER temporal experts (docs/alter-gguf.md). Process-wide, like the conv and attention modes: the binding
   sets the context's routing before each compute. units: n_units names relative to model.diffusion_model.
   ("input_blocks.1.0", "input_blocks.1.1.transformer_blocks.0"); keep: n_experts x n_units, 1 = keep;
   table: 1000 entries, training timestep -> expert. */
enum pysdcpp_alter_semantics_t {
    PYSDCPP_ALTER_REFERENCE = 0,
    PYSDCPP_ALTER_CONSUME   = 1
};
int pysdcpp_alter_set(const char** units, int n_units, int n_experts, const uint8_t* keep, const int32_t* table,
                      int semantics);
void pysdcpp_alter_clear(void);
/* Every UNet evaluation (per batch element) since the last clear: its timestep and expert. Returns the count,
   which may exceed capacity (then only the first `capacity` are written). */
int pysdcpp_alter_history(float* t, int32_t* expert, int capacity);
void pysdcpp_alter_history_clear(void);
/* Tensor-name prefixes a model file may lack (units left out by convert --drop-unused); n = 0 clears. */
void pysdcpp_alter_set_missing_ok(const char** prefixes, int n);

/* Feature inheritance across UNet evaluations (docs/inheritance.md). Process-wide, like ALTER's routing: units are
   named as ALTER's, plus "branch.B" for DeepCache's branch at skip-stack entry B; inherit: n_steps x n_units,
   1 = inherit at that step. Setting or clearing drops every cache. Returns 0, or 1 for bad arguments. */
int pysdcpp_inherit_set(const char** units, int n_units, int n_steps, const uint8_t* inherit);
void pysdcpp_inherit_clear(void);
void pysdcpp_inherit_drop_caches(void);
/* Bytes the caches hold now. */
size_t pysdcpp_inherit_cache_bytes(void);
/* The step (0-based; -1 none) and slot (0 cond, 1 uncond, ...) of the next component UNet evaluation; a
   generation sets them itself, step by step. */
void pysdcpp_inherit_set_evaluation(int step, int slot);
/* Batched guidance (kernels/guidance.h), process-wide: a guided step of a SD1.x/SD2.x/SDXL UNet evaluates cond and
   uncond as one batch-2 evaluation where nothing else tells them apart (no ControlNet, image condition, skip
   layers, PhotoMaker merge, step cache or inheritance plan; conditions of the same shapes); else two batch-1
   evaluations, as upstream. */
void pysdcpp_set_guidance_batch(int on);
/* How many guided steps ran batched since the last reset (process-wide). */
int64_t pysdcpp_guidance_batched_steps(int reset);
/* Records since the last clear, 5 ints each: step, slot, part, unit (-1: a forward begins), action (-1 with it;
   1 computed and cached, 2 inherited). Returns the record count, which may exceed capacity. */
int pysdcpp_inherit_history(int32_t* records, int capacity);
void pysdcpp_inherit_history_clear(void);

/* Cancelling a generation: with the flag on, the sampler stops before its next step (or before the VAE decode)
   and generate_image returns NULL, its buffers freed. The binding clears the flag before every generation. */
void pysdcpp_cancel(int on);
int pysdcpp_cancel_requested(void);

/* A profile of every graph the CPU backend computes between start and stop (patch 0012's hook): thread 0's wall
   time of each node, from its start to the barrier after it, summed per kind. A kind is ggml's op (the unary or
   GLU function for those), MUL_MAT with its weight type and ", im2col" where it is a conv's product; our nodes by
   their label (winograd.gemm, linear, attention.fused, ...). pysdcpp_profile_stop returns the number of kinds;
   pysdcpp_profile_kind(i, ...) writes the i-th kind's name (NUL-terminated, cut to capacity), its node count and
   nanoseconds, and returns 0 (1 for an i out of range). */
void pysdcpp_profile_start(void);
int pysdcpp_profile_stop(void);
int pysdcpp_profile_kind(int i, char* name, int capacity, int64_t* count, int64_t* ns);

#ifdef __cplusplus
}
#endif
#endif
