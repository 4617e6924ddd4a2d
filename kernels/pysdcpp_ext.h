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
/* Text-encoder hidden states [n_tokens, hidden] for `text`; clip_skip <= 0 takes the model's default. */
int pysdcpp_encode_prompt(sd_ctx_t* ctx, const char* text, int clip_skip, pysdcpp_tensor_t* out);
/* One diffusion-model evaluation: x [W, H, C, N], timesteps [N], context [hidden, tokens, N] -> model output. */
int pysdcpp_unet(sd_ctx_t* ctx, const float* x, const int64_t* x_ne, const float* timesteps,
                 const float* context, const int64_t* context_ne, pysdcpp_tensor_t* out);
/* VAE decode of a diffusion latent [W, H, C, N]: the decoder's raw output (about -1..1), before clamping. */
int pysdcpp_decode(sd_ctx_t* ctx, const float* latent, const int64_t* latent_ne, pysdcpp_tensor_t* out);

#ifdef __cplusplus
}
#endif
#endif
