"""The name lists both sides accept: model families, output types, prediction types, ALTER's unit kinds and skip
semantics, and the tensor-name prefixes of the files stable-diffusion.cpp loads."""

FAMILIES = ("sd1", "sd2")
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
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
