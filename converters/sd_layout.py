"""Tensor names: diffusers layout -> the names stable-diffusion.cpp loads (LDM for UNet and VAE, HF CLIP
for the text encoders), the Stability single-file layouts mapped as stable-diffusion.cpp's own converter maps them,
and detection of the model's family and UNet variant from its tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pysdcpp.format.checkpoint_io import TensorSource
from pysdcpp.format.detect import (UnetArchitecture, classify, config_from_diffusers_tensors,
                                   config_from_ldm_tensors)
from pysdcpp.format.errors import FormatError
from pysdcpp.format.families import TEXT_ENCODERS, TINY_VAE_VARIANTS
from pysdcpp.format.names import TAE_PREFIX, TEXT2_PREFIX, TEXT2_PROJECTION, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from pysdcpp.format.unet import top_level_parameters, unet_blocks

from .errors import ConversionError

_RESNET_NAMES = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in _RESNET_NAMES:
        raise ConversionError(f"unexpected ResNet parameter {rest!r}")
    return f"{_RESNET_NAMES[head]}.{tail}"


def unet_name_map(cfg: dict) -> dict[str, tuple[str, bool]]:
    """diffusers prefix -> (LDM prefix, is a ResNet), for every block of the UNet walk and the top-level layers."""
    out: dict[str, tuple[str, bool]] = {d: (l, False) for d, l in top_level_parameters(cfg)}
    for b in unet_blocks(cfg):
        if b.kind == "downsample":
            out[f"{b.diffusers}.conv"] = (f"{b.ldm}.op", False)
        elif b.kind == "upsample":
            out[f"{b.diffusers}.conv"] = (f"{b.ldm}.conv", False)
        else:
            out[b.diffusers] = (b.ldm, b.kind == "resnet")
    return out


def _split_prefix(name: str) -> list[str]:
    """Candidate prefixes of a parameter name, longest first (a.b.c.weight -> a.b.c, a.b, a)."""
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)]


def map_unet(tensors: list[TensorSource], config: dict | None = None) -> list[TensorSource]:
    """diffusers UNet tensors -> LDM names. The layout is read back from the tensors; a config (the folder's
    config.json) must describe the same UNet."""
    found = config_from_diffusers_tensors([(t.name, t.shape) for t in tensors], "UNet")
    if config is not None:
        _same_architecture(config, found)
    names = unet_name_map(found)
    out = []
    for t in tensors:
        for prefix in _split_prefix(t.name):
            if prefix in names:
                ldm, is_resnet = names[prefix]
                rest = t.name[len(prefix) + 1:]
                out.append(t.renamed(f"{UNET_PREFIX}{ldm}.{_resnet(rest) if is_resnet else rest}"))
                break
        else:
            raise ConversionError(f"unexpected UNet parameter {t.name!r}")
    return out


def _same_architecture(config: dict, found: dict) -> None:
    try:
        said = classify(config)
    except FormatError as e:
        raise ConversionError(f"unet/config.json: {e}") from None
    held = classify(found)
    if (said.family, said.variant) != (held.family, held.variant):
        raise ConversionError(f"unet/config.json describes a {said.name} UNet, its weights hold a {held.name} one")


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


def text_encoder_name(name: str, second: bool = False) -> str | None:
    """HF CLIP text-model name with or without the `text_model.` prefix (transformers 4 vs 5 saves); `second`:
    SDXL's text_encoder_2, whose pooled-output projection is kept (stable-diffusion.cpp's name, no transpose)."""
    if name.startswith("text_model."):
        name = name[len("text_model."):]
    if second and name == "text_projection.weight":
        return TEXT2_PROJECTION
    if name in ("embeddings.position_ids", "logit_scale") or name.startswith("text_projection."):
        return None
    return (TEXT2_PREFIX if second else TEXT_PREFIX) + name


def map_vae(tensors: list[TensorSource]) -> list[TensorSource]:
    ups = {int(m[1]) for t in tensors if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", t.name))}
    n_up = max(ups) + 1 if ups else 0
    out = []
    for t in tensors:
        name, to_conv = diffusers_vae_name(t.name, n_up)
        reshape = tuple(t.shape) + (1, 1) if to_conv and len(t.shape) == 2 else None
        out.append(t.renamed(VAE_PREFIX + name, reshape))
    return out


def map_tae(tensors: list[TensorSource]) -> list[TensorSource]:
    """diffusers' AutoencoderTiny (TAESD) -> stable-diffusion.cpp's TAE: its own names under TAE_PREFIX."""
    strange = [t.name for t in tensors if not t.name.startswith(("encoder.layers.", "decoder.layers."))]
    if strange or not tensors:
        raise ConversionError("not a tiny autoencoder (diffusers AutoencoderTiny): "
                              + (f"unexpected tensors such as {strange[0]!r}" if strange else "no tensors"))
    return [t.renamed(TAE_PREFIX + t.name) for t in tensors]


def map_text_encoder(tensors: list[TensorSource], second: bool = False) -> list[TensorSource]:
    out = []
    for t in tensors:
        name = text_encoder_name(t.name, second)
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


# OpenCLIP text-encoder names (SD2.x `cond_stage_model.model.`, SDXL `conditioner.embedders.1.model.`) -> the HF
# CLIP names stable-diffusion.cpp's converter gives them (the fused in_proj stays fused; upstream loads it so)
_OPEN_CLIP_TOP = {"ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias",
                  "positional_embedding": "embeddings.position_embedding.weight",
                  "token_embedding.weight": "embeddings.token_embedding.weight", "text_projection": "text_projection"}
_OPEN_CLIP_LAYER = {"attn.in_proj_weight": "self_attn.in_proj.weight", "attn.in_proj_bias": "self_attn.in_proj.bias",
                    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
                    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
                    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
                    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
                    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias"}


def _open_clip_name(rest: str) -> str | None:
    """An OpenCLIP text-model parameter (after `model.`) -> its HF name under `transformer.text_model.`; None for
    what is not the text model (logit_scale, the visual tower)."""
    if rest in _OPEN_CLIP_TOP:
        return _OPEN_CLIP_TOP[rest]
    if m := re.match(r"transformer\.resblocks\.(\d+)\.(.+)", rest):
        if m[2] in _OPEN_CLIP_LAYER:
            return f"encoder.layers.{m[1]}.{_OPEN_CLIP_LAYER[m[2]]}"
        raise ConversionError(f"unexpected OpenCLIP text-encoder parameter {rest!r}")
    return None


# The single-file text-encoder prefixes -> (the prefix stable-diffusion.cpp loads, OpenCLIP naming)
_SINGLE_FILE_TEXT = (("conditioner.embedders.0.transformer.text_model.", TEXT_PREFIX, False),
                     ("conditioner.embedders.1.model.", TEXT2_PREFIX, True),
                     ("cond_stage_model.model.", TEXT_PREFIX, True))


def _single_file_name(name: str) -> str | None:
    """An LDM single file's tensor name -> the name stable-diffusion.cpp's converter writes; None: dropped."""
    if name.startswith(_UNUSED_PREFIXES):
        return None
    for src, dst, open_clip in _SINGLE_FILE_TEXT:
        if name.startswith(src):
            rest = name[len(src):]
            if not open_clip:
                return None if rest == "embeddings.position_ids" else dst + rest
            mapped = _open_clip_name(rest)
            return None if mapped is None else dst + mapped
    return name


def single_file_layout(names: list[str]) -> str:
    if any(n.startswith(UNET_PREFIX) for n in names):
        return "ldm"
    if any(n.startswith("unet.") for n in names):
        return "diffusers"
    return "unknown"


def map_single_file(tensors: list[TensorSource]) -> list[TensorSource]:
    """A one-file checkpoint: LDM names as stable-diffusion.cpp's converter writes them (UNet and VAE unchanged,
    text encoders under the HF CLIP names); a diffusers-layout file (unet./vae./text_encoder[_2].) is mapped."""
    names = [t.name for t in tensors]
    layout = single_file_layout(names)
    if layout == "ldm":
        out = []
        for t in tensors:
            name = _single_file_name(t.name)
            if name is not None:
                out.append(t if name == t.name else t.renamed(name))
        return out
    if layout == "diffusers":
        parts: dict[str, list[TensorSource]] = {"unet": [], "vae": [], "text_encoder": [], "text_encoder_2": []}
        for t in tensors:
            head, _, rest = t.name.partition(".")
            if head in parts:
                parts[head].append(t.renamed(rest))
        return (map_unet(parts["unet"]) + map_vae(parts["vae"]) + map_text_encoder(parts["text_encoder"])
                + map_text_encoder(parts["text_encoder_2"], second=True))
    raise ConversionError(describe_unsupported(names))


# ---- detection ---------------------------------------------------------------------------------

@dataclass
class ModelInfo:
    architecture: UnetArchitecture
    has_text_encoder: bool   # every text encoder of the family
    has_vae: bool            # the autoencoder stable-diffusion.cpp decodes this variant with (a TAE for SDXS)

    @property
    def family(self) -> str:
        return self.architecture.family

    @property
    def variant(self) -> str:
        return self.architecture.variant


def describe_unsupported(names: list[str]) -> str:
    hints = [
        ("double_blocks.", "a Flux transformer"), ("joint_blocks.", "an SD3 MMDiT"),
        ("blocks.0.self_attn", "a DiT/video transformer"), ("time_mixer", "a video UNet (SVD)"),
    ]
    found = [desc for key, desc in hints if any(key in n for n in names)]
    sample = ", ".join(sorted(names)[:5])
    what = found[0] if found else f"an unknown model ({len(names)} tensors, e.g. {sample})"
    return f"unsupported architecture: found {what}; pysdcpp converts the SD1.x, SD2.x and SDXL UNet families"


def detect(tensors: list[TensorSource]) -> ModelInfo:
    """Family and UNet variant of LDM-named tensors (what stable-diffusion.cpp loads)."""
    names = [t.name for t in tensors]
    if not any(n.startswith(UNET_PREFIX + "input_blocks.") for n in names) or any("time_mixer" in n for n in names):
        raise ConversionError(describe_unsupported(names))
    arch = classify(config_from_ldm_tensors([(t.name, t.shape) for t in tensors], "UNet"))
    prefixes = {"text_encoder": TEXT_PREFIX, "text_encoder_2": TEXT2_PREFIX}
    has_text = all(any(n.startswith(prefixes[c]) for n in names) for c in TEXT_ENCODERS[arch.family])
    kl, tiny = (any(n.startswith(p) for n in names) for p in (VAE_PREFIX, TAE_PREFIX))
    wants_tiny = arch.variant in TINY_VAE_VARIANTS
    if tiny and not wants_tiny:
        raise ConversionError(f"a tiny autoencoder (TAESD) with a {arch.name} UNet: stable-diffusion.cpp decodes "
                              "with one only for the SDXS UNets; give this model its KL autoencoder")
    if kl and wants_tiny:
        raise ConversionError(f"a KL autoencoder with a {arch.name} UNet: stable-diffusion.cpp decodes the SDXS "
                              "UNets with their tiny autoencoder (diffusers AutoencoderTiny) only")
    return ModelInfo(arch, has_text, tiny if wants_tiny else kl)
