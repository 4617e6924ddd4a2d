"""The name lists both sides accept: model families, output types, prediction types, ALTER's unit kinds and skip
semantics, and the tensor-name prefixes of the files stable-diffusion.cpp loads."""

FAMILIES = ("sd1", "sd2", "sdxl")
# UNet variants of a family: the layouts stable-diffusion.cpp builds (families.ARCHITECTURES says which family has
# which). base: the family's own UNet; inpaint/pix2pix: extra conv_in channels (9: latent, mask, masked image; 8:
# latent, image); tiny: one ResNet per level, three levels, no mid block (BK-SDM-Tiny); sdxs: the SDXS UNets;
# ssd-1b, vega: Segmind's distilled SDXL UNets.
VARIANTS = ("base", "inpaint", "pix2pix", "tiny", "sdxs", "ssd-1b", "vega")
# Output types of the converter, in the order `--type` lists them.
OUTPUT_TYPES = ("f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
PREDICTIONS = ("eps", "v")
# diffusers' scheduler-config names of the prediction types
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}

N_TIMESTEPS = 1000                         # training timesteps an ALTER timestep table covers
UNIT_KINDS = ("transformer", "resnet")     # what an ALTER unit is
SKIP_SEMANTICS = ("reference", "consume")  # how a skipped up-block ResNet treats its skip tensor (alter-gguf.md)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# A tiny autoencoder (TAESD; diffusers' AutoencoderTiny) under its own diffusers names: what stable-diffusion.cpp
# decodes the SDXS models with (families.TINY_VAE_VARIANTS)
TAE_PREFIX = "tae."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
# SDXL's second text encoder (OpenCLIP ViT-bigG) under the HF CLIP names stable-diffusion.cpp loads, with its
# pooled-output projection beside it
TEXT2_PREFIX = "cond_stage_model.1.transformer.text_model."
TEXT2_PROJECTION = "cond_stage_model.1.transformer.text_projection.weight"
