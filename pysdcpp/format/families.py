"""The model families pysdcpp knows, described by the configs diffusers uses for them (SD1.5, SD2.1, SDXL 1.0):
UNet, VAE, text encoders and scheduler; the UNet variants of each family stable-diffusion.cpp builds (inpaint,
pix2pix, the tiny and distilled UNets), as diffusers configs; what the runtime derives from a family (context width,
prediction type, the UNet's extra input) comes from here."""

from __future__ import annotations

from .errors import FormatError
from .names import FAMILIES, VARIANTS

UNET_CONFIGS = {
    "sd1": {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
            "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                 "DownBlock2D"],
            "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
            "out_channels": 4, "sample_size": 64,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "use_linear_projection": False},
}
UNET_CONFIGS["sd2"] = dict(UNET_CONFIGS["sd1"], attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                           use_linear_projection=True, upcast_attention=True, sample_size=96)
# SDXL: three levels, no attention at the first, transformer stacks of depth 2 and 10, 64-wide heads, 2048-wide
# context (both text encoders' hidden states side by side), and the "text_time" added embedding: the pooled text
# embedding (1280) and six size/crop numbers, each embedded in 256 sinusoids, projected to the time embedding.
UNET_CONFIGS["sdxl"] = dict(UNET_CONFIGS["sd1"], addition_embed_type="text_time", addition_time_embed_dim=256,
                            attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
                            cross_attention_dim=2048, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
                                                                        "CrossAttnDownBlock2D"],
                            projection_class_embeddings_input_dim=2816, sample_size=128,
                            transformer_layers_per_block=[1, 2, 10],
                            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                            use_linear_projection=True)

# What each variant changes in its family's UNet config (stable-diffusion.cpp's src/unet.hpp fixes these layouts;
# model.h names them). A variant missing from a family's table is one upstream does not build.
_TINY = {"block_out_channels": [320, 640, 1280], "layers_per_block": 1, "mid_block_type": None,
         "down_block_types": ["CrossAttnDownBlock2D"] * 3, "up_block_types": ["CrossAttnUpBlock2D"] * 3}
VARIANT_CHANGES: dict[str, dict[str, dict]] = {
    "sd1": {"base": {}, "inpaint": {"in_channels": 9}, "pix2pix": {"in_channels": 8},
            "tiny": dict(_TINY),
            # SDXS-512: the tiny layout without attention at the first level
            "sdxs": dict(_TINY, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                         up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])},
    "sd2": {"base": {}, "inpaint": {"in_channels": 9},
            "tiny": dict(_TINY, attention_head_dim=[5, 10, 20]),
            # SDXS-0.9: the tiny layout whose first-level transformers attend to the text twice (attn1 is a
            # cross-attention too) with one 320-wide head
            "sdxs": dict(_TINY, attention_head_dim=[1, 10, 20], only_cross_attention=[True, False, False])},
    "sdxl": {"base": {}, "inpaint": {"in_channels": 9}, "pix2pix": {"in_channels": 8},
             # Segmind's distilled SDXL UNets: the mid block is one ResNet; SSD-1B thins the attention stacks
             "ssd-1b": {"mid_block_type": "UNetMidBlock2D",
                        "transformer_layers_per_block": [[1, 1], [2, 2], [4, 4]],
                        "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], [1, 1, 1]]},
             "vega": {"mid_block_type": "UNetMidBlock2D", "transformer_layers_per_block": [0, 1, 2]}},
}
# stable-diffusion.cpp's name of each (family, variant) it builds (src/model.h's SDVersion)
UPSTREAM_VERSIONS = {
    ("sd1", "base"): "SD1", ("sd1", "inpaint"): "SD1_INPAINT", ("sd1", "pix2pix"): "SD1_PIX2PIX",
    ("sd1", "tiny"): "SD1_TINY_UNET", ("sd1", "sdxs"): "SDXS_512_DS",
    ("sd2", "base"): "SD2", ("sd2", "inpaint"): "SD2_INPAINT", ("sd2", "tiny"): "SD2_TINY_UNET",
    ("sd2", "sdxs"): "SDXS_09",
    ("sdxl", "base"): "SDXL", ("sdxl", "inpaint"): "SDXL_INPAINT", ("sdxl", "pix2pix"): "SDXL_PIX2PIX",
    ("sdxl", "ssd-1b"): "SDXL_SSD1B", ("sdxl", "vega"): "SDXL_VEGA",
}
assert set(UPSTREAM_VERSIONS) == {(f, v) for f, t in VARIANT_CHANGES.items() for v in t}
assert all(v in VARIANTS for t in VARIANT_CHANGES.values() for v in t)


def variant_unet_config(family: str, variant: str = "base") -> dict:
    """The diffusers UNet config of a family's variant (the published model's layout, at its full size)."""
    check_family(family)
    if variant not in VARIANT_CHANGES[family]:
        known = ", ".join(VARIANT_CHANGES[family])
        raise FormatError(f"stable-diffusion.cpp builds no {variant!r} variant of {family} (it builds {known})")
    return dict(UNET_CONFIGS[family], **VARIANT_CHANGES[family][variant])


VAE_CONFIG = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
              "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
              "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
              "up_block_types": ["UpDecoderBlock2D"] * 4}

# diffusers' AutoencoderTiny (TAESD) with its published defaults: 64 channels throughout, blocks per level
# (encoder 1, 3, 3, 3; decoder 3, 3, 3, 1), ReLU, latents used as they are (scaling factor 1).
TAE_CONFIG = {"_class_name": "AutoencoderTiny", "act_fn": "relu", "in_channels": 3, "out_channels": 3,
              "latent_channels": 4, "encoder_block_out_channels": [64, 64, 64, 64],
              "decoder_block_out_channels": [64, 64, 64, 64], "num_encoder_blocks": [1, 3, 3, 3],
              "num_decoder_blocks": [3, 3, 3, 1], "upsampling_scaling_factor": 2, "latent_magnitude": 3,
              "latent_shift": 0.5, "scaling_factor": 1.0, "shift_factor": 0.0, "force_upcast": False}
# The UNet variants stable-diffusion.cpp decodes with a tiny autoencoder (its SDXS versions: every VAE tensor of
# such a file is read as the TAE's), and only those.
TINY_VAE_VARIANTS = ("sdxs",)

# Text encoders by family; SDXL has two: CLIP ViT-L (as SD1.x) and OpenCLIP ViT-bigG with its projection
# (diffusers' text_encoder_2, a CLIPTextModelWithProjection).
TEXT_CONFIGS = {
    "sd1": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 768,
            "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
            "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-05, "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2,
            "pad_token_id": 1, "torch_dtype": "float32"},
    "sd2": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 1024,
            "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
            "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu",
            "layer_norm_eps": 1e-05, "projection_dim": 512, "bos_token_id": 0, "eos_token_id": 2,
            "pad_token_id": 1, "torch_dtype": "float32"},
}
TEXT_CONFIGS["sdxl"] = dict(TEXT_CONFIGS["sd1"])
TEXT2_CONFIG = {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
                "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
                "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu", "layer_norm_eps": 1e-05,
                "projection_dim": 1280, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
                "torch_dtype": "float32"}
# The text encoders of a family, by diffusers folder name
TEXT_ENCODERS = {"sd1": ("text_encoder",), "sd2": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}

# The prediction type each family's published models use (SD2.1 768 px: v; the 512 px SD2 base: eps).
DEFAULT_PREDICTION = {"sd1": "eps", "sd2": "v", "sdxl": "eps"}
_DIFFUSERS_PREDICTION_NAMES = {"eps": "epsilon", "v": "v_prediction"}

SCHEDULER_CONFIGS = {
    family: {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "num_train_timesteps": 1000, "steps_offset": 1,
             "prediction_type": _DIFFUSERS_PREDICTION_NAMES[DEFAULT_PREDICTION[family]]}
    for family in FAMILIES
}

CONTEXT_LENGTH = 77   # tokens of the text encoder's output (the cross-attention keys)
# SDXL's VAE: SD's architecture with another latent scale (and, in F16, activations that overflow: upstream keeps
# its decoder in F32 unless the file is the fp16-fixed one)
VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise FormatError(f"unknown model family {family!r}; pysdcpp knows {', '.join(FAMILIES)}")
    return family


def context_width(family: str) -> int:
    """Width of the text encoders' output, which the UNet's cross-attention reads (768 SD1.x, 1024 SD2.x, 2048
    SDXL)."""
    return int(UNET_CONFIGS[check_family(family)]["cross_attention_dim"])


def default_image_size(family: str | None) -> int:
    """The side (px) a family's published models are made for: SD1.x 512, SD2.x 768, SDXL 1024 (None: 512)."""
    return 512 if family is None else 8 * int(UNET_CONFIGS[check_family(family)]["sample_size"])


def y_width(family: str) -> int:
    """Width of the UNet's extra input `y` (SDXL: pooled text embedding and size conditioning, 2816), 0: none."""
    return int(UNET_CONFIGS[check_family(family)].get("projection_class_embeddings_input_dim") or 0)


def family_of_context_width(width: int) -> str | None:
    """The family whose UNet cross-attends to `width`-wide context, or None."""
    return next((f for f in FAMILIES if context_width(f) == width), None)
