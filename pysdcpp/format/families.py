"""The model families pysdcpp knows, described by the configs diffusers uses for them (SD1.5, SD2.1): UNet, VAE,
text encoder and scheduler; what the runtime derives from a family (context width, prediction type) comes from
here."""

from __future__ import annotations

from .errors import FormatError
from .names import FAMILIES

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

VAE_CONFIG = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
              "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
              "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
              "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4}

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

# The prediction type each family's published models use (SD2.1 768 px: v; the 512 px SD2 base: eps).
DEFAULT_PREDICTION = {"sd1": "eps", "sd2": "v"}
_DIFFUSERS_PREDICTION_NAMES = {"eps": "epsilon", "v": "v_prediction"}

SCHEDULER_CONFIGS = {
    family: {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "num_train_timesteps": 1000, "steps_offset": 1,
             "prediction_type": _DIFFUSERS_PREDICTION_NAMES[DEFAULT_PREDICTION[family]]}
    for family in FAMILIES
}

CONTEXT_LENGTH = 77   # tokens of the text encoder's output (the cross-attention keys)


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise FormatError(f"unknown model family {family!r}; pysdcpp knows {', '.join(FAMILIES)}")
    return family


def context_width(family: str) -> int:
    """Width of the text encoder's output, which the UNet's cross-attention reads (768 for SD1.x, 1024 SD2.x)."""
    return int(UNET_CONFIGS[check_family(family)]["cross_attention_dim"])


def family_of_context_width(width: int) -> str | None:
    """The family whose UNet cross-attends to `width`-wide context, or None."""
    return next((f for f in FAMILIES if context_width(f) == width), None)
