"""Deterministic random-weight models with the real SD1.5 / SD2.1 architectures, with no download and no torch.

Used by `pysdcpp generate --demo` and by the test suite. The parameter list is derived from the same
configs diffusers uses (written beside the weights as config.json), so diffusers can load the result
strictly; latency does not depend on weight values, image quality does (random weights draw noise).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from .checkpoint_io import TensorSource

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

SCHEDULER_CONFIGS = {
    family: {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "num_train_timesteps": 1000, "steps_offset": 1,
             "prediction_type": "epsilon" if family == "sd1" else "v_prediction"}
    for family in ("sd1", "sd2")
}


# ---- parameter lists (name, shape) in diffusers layout ------------------------------------------

def _norm(name: str, c: int):
    yield f"{name}.weight", (c,)
    yield f"{name}.bias", (c,)


def _linear(name: str, cout: int, cin: int, bias: bool = True):
    yield f"{name}.weight", (cout, cin)
    if bias:
        yield f"{name}.bias", (cout,)


def _conv(name: str, cout: int, cin: int, k: int):
    yield f"{name}.weight", (cout, cin, k, k)
    yield f"{name}.bias", (cout,)


def _unet_resnet(name: str, cin: int, cout: int, temb: int):
    yield from _norm(f"{name}.norm1", cin)
    yield from _conv(f"{name}.conv1", cout, cin, 3)
    yield from _linear(f"{name}.time_emb_proj", cout, temb)
    yield from _norm(f"{name}.norm2", cout)
    yield from _conv(f"{name}.conv2", cout, cout, 3)
    if cin != cout:
        yield from _conv(f"{name}.conv_shortcut", cout, cin, 1)


def _transformer(name: str, c: int, ctx: int, linear_proj: bool):
    yield from _norm(f"{name}.norm", c)
    proj = (lambda n: _linear(n, c, c)) if linear_proj else (lambda n: _conv(n, c, c, 1))
    yield from proj(f"{name}.proj_in")
    b = f"{name}.transformer_blocks.0"
    yield from _norm(f"{b}.norm1", c)
    for q in ("to_q", "to_k", "to_v"):
        yield from _linear(f"{b}.attn1.{q}", c, c, bias=False)
    yield from _linear(f"{b}.attn1.to_out.0", c, c)
    yield from _norm(f"{b}.norm2", c)
    yield from _linear(f"{b}.attn2.to_q", c, c, bias=False)
    yield from _linear(f"{b}.attn2.to_k", c, ctx, bias=False)
    yield from _linear(f"{b}.attn2.to_v", c, ctx, bias=False)
    yield from _linear(f"{b}.attn2.to_out.0", c, c)
    yield from _norm(f"{b}.norm3", c)
    yield from _linear(f"{b}.ff.net.0.proj", 8 * c, c)
    yield from _linear(f"{b}.ff.net.2", c, 4 * c)
    yield from proj(f"{name}.proj_out")


def unet_parameters(cfg: dict) -> Iterator[tuple[str, tuple[int, ...]]]:
    boc, lpb, ctx = cfg["block_out_channels"], cfg["layers_per_block"], cfg["cross_attention_dim"]
    lin = cfg["use_linear_projection"]
    temb = 4 * boc[0]
    yield from _conv("conv_in", boc[0], cfg["in_channels"], 3)
    yield from _linear("time_embedding.linear_1", temb, boc[0])
    yield from _linear("time_embedding.linear_2", temb, temb)
    cout = boc[0]
    for i, kind in enumerate(cfg["down_block_types"]):
        cin, cout = cout, boc[i]
        for j in range(lpb):
            yield from _unet_resnet(f"down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout, temb)
            if kind.startswith("CrossAttn"):
                yield from _transformer(f"down_blocks.{i}.attentions.{j}", cout, ctx, lin)
        if i < len(boc) - 1:
            yield from _conv(f"down_blocks.{i}.downsamplers.0.conv", cout, cout, 3)
    yield from _unet_resnet("mid_block.resnets.0", boc[-1], boc[-1], temb)
    yield from _transformer("mid_block.attentions.0", boc[-1], ctx, lin)
    yield from _unet_resnet("mid_block.resnets.1", boc[-1], boc[-1], temb)
    rev = list(reversed(boc))
    prev = rev[0]
    for i, kind in enumerate(cfg["up_block_types"]):
        cout, cin = rev[i], rev[min(i + 1, len(rev) - 1)]
        for j in range(lpb + 1):
            skip = cin if j == lpb else cout
            res_in = prev if j == 0 else cout
            yield from _unet_resnet(f"up_blocks.{i}.resnets.{j}", res_in + skip, cout, temb)
            if kind.startswith("CrossAttn"):
                yield from _transformer(f"up_blocks.{i}.attentions.{j}", cout, ctx, lin)
        if i < len(rev) - 1:
            yield from _conv(f"up_blocks.{i}.upsamplers.0.conv", cout, cout, 3)
        prev = cout
    yield from _norm("conv_norm_out", boc[0])
    yield from _conv("conv_out", cfg["out_channels"], boc[0], 3)


def _vae_resnet(name: str, cin: int, cout: int):
    yield from _norm(f"{name}.norm1", cin)
    yield from _conv(f"{name}.conv1", cout, cin, 3)
    yield from _norm(f"{name}.norm2", cout)
    yield from _conv(f"{name}.conv2", cout, cout, 3)
    if cin != cout:
        yield from _conv(f"{name}.conv_shortcut", cout, cin, 1)


def _vae_mid(prefix: str, c: int):
    yield from _vae_resnet(f"{prefix}.mid_block.resnets.0", c, c)
    a = f"{prefix}.mid_block.attentions.0"
    yield from _norm(f"{a}.group_norm", c)
    for q in ("to_q", "to_k", "to_v", "to_out.0"):
        yield from _linear(f"{a}.{q}", c, c)
    yield from _vae_resnet(f"{prefix}.mid_block.resnets.1", c, c)


def vae_parameters(cfg: dict) -> Iterator[tuple[str, tuple[int, ...]]]:
    boc, lpb, lat = cfg["block_out_channels"], cfg["layers_per_block"], cfg["latent_channels"]
    yield from _conv("encoder.conv_in", boc[0], cfg["in_channels"], 3)
    cout = boc[0]
    for i in range(len(boc)):
        cin, cout = cout, boc[i]
        for j in range(lpb):
            yield from _vae_resnet(f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
        if i < len(boc) - 1:
            yield from _conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", cout, cout, 3)
    yield from _vae_mid("encoder", boc[-1])
    yield from _norm("encoder.conv_norm_out", boc[-1])
    yield from _conv("encoder.conv_out", 2 * lat, boc[-1], 3)
    yield from _conv("quant_conv", 2 * lat, 2 * lat, 1)
    yield from _conv("post_quant_conv", lat, lat, 1)
    yield from _conv("decoder.conv_in", boc[-1], lat, 3)
    yield from _vae_mid("decoder", boc[-1])
    rev = list(reversed(boc))
    prev = rev[0]
    for i in range(len(rev)):
        cout = rev[i]
        for j in range(lpb + 1):
            yield from _vae_resnet(f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else cout, cout)
        if i < len(rev) - 1:
            yield from _conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", cout, cout, 3)
        prev = cout
    yield from _norm("decoder.conv_norm_out", boc[0])
    yield from _conv("decoder.conv_out", cfg["out_channels"], boc[0], 3)


def text_parameters(cfg: dict) -> Iterator[tuple[str, tuple[int, ...]]]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    yield "text_model.embeddings.token_embedding.weight", (cfg["vocab_size"], h)
    yield "text_model.embeddings.position_embedding.weight", (cfg["max_position_embeddings"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"text_model.encoder.layers.{i}"
        for q in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield from _linear(f"{p}.self_attn.{q}", h, h)
        yield from _norm(f"{p}.layer_norm1", h)
        yield from _linear(f"{p}.mlp.fc1", inter, h)
        yield from _linear(f"{p}.mlp.fc2", h, inter)
        yield from _norm(f"{p}.layer_norm2", h)
    yield from _norm("text_model.final_layer_norm", h)


# ---- values ------------------------------------------------------------------------------------

def random_weight(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A deterministic tensor for `name`: N(0, 1/fan_in) weights, unit norms, small biases and embeddings.

    Seeded by (seed, name) so any one tensor can be regenerated alone, in any order.
    """
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    is_norm = any(k in name for k in ("norm", "layer_norm")) and len(shape) == 1
    if is_norm and name.endswith(".weight"):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith(".bias"):
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    if "embedding" in name:
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    out = rng.standard_normal(shape, dtype=np.float32)
    out *= np.float32(1.0 / np.sqrt(fan_in))
    return out


def component_parameters(family: str) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    return {"unet": list(unet_parameters(UNET_CONFIGS[family])), "vae": list(vae_parameters(VAE_CONFIG)),
            "text_encoder": list(text_parameters(TEXT_CONFIGS[family]))}


def synthetic_sources(family: str, seed: int = 0) -> dict[str, list[TensorSource]]:
    """Lazy random tensors per component, in diffusers layout."""
    if family not in UNET_CONFIGS:
        raise ValueError(f"family must be one of {', '.join(UNET_CONFIGS)}, not {family!r}")
    out = {}
    for component, params in component_parameters(family).items():
        out[component] = [TensorSource(name, shape, "F32",
                                       (lambda n=f"{component}.{name}", s=shape: random_weight(n, s, seed)))
                          for name, shape in params]
    return out


def write_diffusers_folder(folder: Path, family: str, seed: int = 0, dtype: str = "float32") -> Path:
    """Write a diffusers pipeline folder (configs + safetensors) of the synthetic model."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    configs = {"unet": UNET_CONFIGS[family], "vae": VAE_CONFIG, "text_encoder": TEXT_CONFIGS[family],
               "scheduler": SCHEDULER_CONFIGS[family]}
    for component, cfg in configs.items():
        (folder / component).mkdir(parents=True, exist_ok=True)
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        (folder / component / name).write_text(json.dumps(cfg, indent=2))
    for component, sources in synthetic_sources(family, seed).items():
        tensors = {t.name: t.load().astype(dtype) for t in sources}
        fname = "model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors"
        save_file(tensors, str(folder / component / fname))
        del tensors
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"]}, indent=2))
    return folder
