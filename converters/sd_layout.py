"""Tensor names: diffusers layout -> the names stable-diffusion.cpp loads (LDM for UNet and VAE, HF CLIP
for the text encoder), and detection of the model family from names and shapes (SD1.x / SD2.x).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pysdcpp.format.checkpoint_io import TensorSource
from pysdcpp.format.families import context_width, family_of_context_width
from pysdcpp.format.names import FAMILIES, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX

from .errors import ConversionError

_RESNET_NAMES = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in _RESNET_NAMES:
        raise ConversionError(f"unexpected ResNet parameter {rest!r}")
    return f"{_RESNET_NAMES[head]}.{tail}"


@dataclass
class UnetShape:
    """What the name mapping needs to know of a diffusers UNet: resnets per block, attention per up block."""

    layers_per_block: int
    up_blocks_with_attention: frozenset[int]


def unet_shape_from_names(names: list[str]) -> UnetShape:
    down_resnets = {int(m.group(1)) for n in names if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", n))}
    if not down_resnets:
        raise ConversionError("no down_blocks.0.resnets.* tensors: not a diffusers SD UNet")
    with_attn = frozenset(int(m.group(1)) for n in names if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", n)))
    return UnetShape(max(down_resnets) + 1, with_attn)


def diffusers_unet_name(name: str, shape: UnetShape) -> str:
    """Map one diffusers UNet parameter name to its LDM name (without the model prefix)."""
    for src, dst in _UNET_TOP.items():
        if name.startswith(src + "."):
            return dst + name[len(src):]
    lpb = shape.layers_per_block
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{i * (lpb + 1) + j + 1}.0.{_resnet(rest)}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", name):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{i * (lpb + 1) + j + 1}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name):
        i, rest = int(m[1]), m[2]
        return f"input_blocks.{(i + 1) * (lpb + 1)}.0.op.{rest}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", name):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", name):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{i * (lpb + 1) + j}.0.{_resnet(rest)}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", name):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{i * (lpb + 1) + j}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name):
        i, rest = int(m[1]), m[2]
        slot = 2 if i in shape.up_blocks_with_attention else 1
        return f"output_blocks.{i * (lpb + 1) + lpb}.{slot}.conv.{rest}"
    raise ConversionError(f"unexpected UNet parameter {name!r}")


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
             "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut.", "nin_shortcut.", 1) if rest.startswith("conv_shortcut.") else rest


def diffusers_vae_name(name: str, n_up_blocks: int) -> tuple[str, bool]:
    """Map one diffusers VAE parameter name to LDM; the flag says a linear attention weight becomes a 1x1 conv."""
    if name.startswith(("quant_conv.", "post_quant_conv.")):
        return name, False
    m = re.match(r"(encoder|decoder)\.(.+)", name)
    if not m:
        raise ConversionError(f"unexpected VAE parameter {name!r}")
    part, rest = m[1], m[2]
    if rest.startswith(("conv_in.", "conv_out.")):
        return name, False
    if rest.startswith("conv_norm_out."):
        return f"{part}.norm_out.{rest[len('conv_norm_out.'):]}", False
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        return f"{part}.mid.block_{int(m[1]) + 1}.{_vae_resnet(m[2])}", False
    if m := re.match(r"mid_block\.attentions\.0\.(.+?)\.(weight|bias)$", rest):
        if m[1] not in _VAE_ATTN:
            raise ConversionError(f"unexpected VAE attention parameter {name!r}")
        dst = _VAE_ATTN[m[1]]
        return f"{part}.mid.attn_1.{dst}.{m[2]}", dst != "norm" and m[2] == "weight"
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{part}.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}", False
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest):
        return f"{part}.down.{m[1]}.downsample.conv.{m[2]}", False
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{part}.up.{n_up_blocks - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}", False
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest):
        return f"{part}.up.{n_up_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    raise ConversionError(f"unexpected VAE parameter {name!r}")


def text_encoder_name(name: str) -> str | None:
    """HF CLIP text-model name with or without the `text_model.` prefix (transformers 4 vs 5 saves)."""
    if name.startswith("text_model."):
        name = name[len("text_model."):]
    if name in ("embeddings.position_ids", "logit_scale") or name.startswith("text_projection."):
        return None
    return TEXT_PREFIX + name


def map_unet(tensors: list[TensorSource]) -> list[TensorSource]:
    shape = unet_shape_from_names([t.name for t in tensors])
    return [t.renamed(UNET_PREFIX + diffusers_unet_name(t.name, shape)) for t in tensors]


def map_vae(tensors: list[TensorSource]) -> list[TensorSource]:
    ups = {int(m[1]) for t in tensors if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", t.name))}
    n_up = max(ups) + 1 if ups else 0
    out = []
    for t in tensors:
        name, to_conv = diffusers_vae_name(t.name, n_up)
        reshape = tuple(t.shape) + (1, 1) if to_conv and len(t.shape) == 2 else None
        out.append(t.renamed(VAE_PREFIX + name, reshape))
    return out


def map_text_encoder(tensors: list[TensorSource]) -> list[TensorSource]:
    out = []
    for t in tensors:
        name = text_encoder_name(t.name)
        if name is not None:
            out.append(t.renamed(name))
    return out


# ---- single files ------------------------------------------------------------------------------

# Tensors that are training state, not weights; stable-diffusion.cpp ignores them too.
_UNUSED_PREFIXES = ("model_ema.", "cond_stage_model.transformer.text_model.embeddings.position_ids",
                    "cond_stage_model.model.logit_scale", "embedding_manager", "denoiser.sigmas",
                    "first_stage_model.bn.", "betas", "alphas_cumprod", "alphas_cumprod_prev",
                    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                    "model_ema", "lvlb_weights", "logvar")


def single_file_layout(names: list[str]) -> str:
    if any(n.startswith(UNET_PREFIX) for n in names):
        return "ldm"
    if any(n.startswith("unet.") for n in names):
        return "diffusers"
    return "unknown"


def map_single_file(tensors: list[TensorSource]) -> list[TensorSource]:
    """A one-file checkpoint: LDM names pass through; a diffusers-layout file (unet./vae./text_encoder.) is mapped."""
    names = [t.name for t in tensors]
    layout = single_file_layout(names)
    if layout == "ldm":
        return [t for t in tensors if not t.name.startswith(_UNUSED_PREFIXES)]
    if layout == "diffusers":
        parts: dict[str, list[TensorSource]] = {"unet": [], "vae": [], "text_encoder": []}
        for t in tensors:
            head, _, rest = t.name.partition(".")
            if head in parts:
                parts[head].append(t.renamed(rest))
        return map_unet(parts["unet"]) + map_vae(parts["vae"]) + map_text_encoder(parts["text_encoder"])
    raise ConversionError(describe_unsupported(names))


# ---- detection ---------------------------------------------------------------------------------

@dataclass
class ModelInfo:
    family: str  # names.FAMILIES
    context_dim: int
    has_text_encoder: bool
    has_vae: bool


def describe_unsupported(names: list[str]) -> str:
    hints = [
        ("double_blocks.", "a Flux transformer"), ("joint_blocks.", "an SD3 MMDiT"),
        ("conditioner.embedders.1", "an SDXL checkpoint"), ("label_emb.", "an SDXL-style UNet"),
        ("add_embedding.", "an SDXL diffusers UNet"), ("blocks.0.self_attn", "a DiT/video transformer"),
    ]
    found = [desc for key, desc in hints if any(key in n for n in names)]
    sample = ", ".join(sorted(names)[:5])
    what = found[0] if found else f"an unknown model ({len(names)} tensors, e.g. {sample})"
    return f"unsupported architecture: found {what}; pysdcpp converts SD1.x and SD2.x models"


def detect(tensors: list[TensorSource]) -> ModelInfo:
    names = {t.name: t for t in tensors}
    if any("label_emb." in n for n in names) or any(n.startswith("cond_stage_model.1.") for n in names):
        raise ConversionError(describe_unsupported(list(names)))
    k = names.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if k is None:
        raise ConversionError(describe_unsupported(list(names)))
    context_dim = int(k.shape[1])
    family = family_of_context_width(context_dim)
    if family is None:
        known = ", ".join(f"{f} has {context_width(f)}" for f in FAMILIES)
        raise ConversionError(f"unsupported architecture: a UNet with cross-attention width {context_dim} "
                              f"({known})")
    has_text = any(n.startswith("cond_stage_model.") for n in names)
    has_vae = any(n.startswith(VAE_PREFIX) for n in names)
    return ModelInfo(family, context_dim, has_text, has_vae)
