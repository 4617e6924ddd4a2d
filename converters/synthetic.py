"""Deterministic random-weight models with the real SD1.5 / SD2.1 / SDXL architectures (and the UNet variants
stable-diffusion.cpp builds), with no download and no torch.

Used by `pysdcpp generate --demo` and by the test suite. The parameter list is derived from the same
configs diffusers uses (written beside the weights as config.json), so diffusers can load the result
strictly; latency does not depend on weight values, image quality does (random weights draw noise).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from pysdcpp.format.families import (SCHEDULER_CONFIGS, TAE_CONFIG, TEXT2_CONFIG, TEXT_CONFIGS, TEXT_ENCODERS,
                                     TINY_VAE_VARIANTS, VAE_CONFIG, VAE_SCALING, check_family, variant_unet_config)
from pysdcpp.format.names import FAMILIES, UNET_PREFIX
from pysdcpp.format.unet import unet_blocks
from pysdcpp.format.vae import vae_blocks

from pysdcpp.format.checkpoint_io import TensorSource

from .sd_layout import map_tae, map_text_encoder, map_unet, map_vae

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


def _transformer(name: str, c: int, ctx: int, linear_proj: bool, depth: int, self_context: bool = False):
    yield from _norm(f"{name}.norm", c)
    proj = (lambda n: _linear(n, c, c)) if linear_proj else (lambda n: _conv(n, c, c, 1))
    yield from proj(f"{name}.proj_in")
    for k in range(depth):
        b = f"{name}.transformer_blocks.{k}"
        yield from _norm(f"{b}.norm1", c)
        yield from _linear(f"{b}.attn1.to_q", c, c, bias=False)
        for q in ("to_k", "to_v"):   # attn1 reads the text too where the config says only_cross_attention
            yield from _linear(f"{b}.attn1.{q}", c, ctx if self_context else c, bias=False)
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
    boc = cfg["block_out_channels"]
    temb = 4 * boc[0]
    yield from _conv("conv_in", boc[0], cfg["in_channels"], 3)
    yield from _linear("time_embedding.linear_1", temb, boc[0])
    yield from _linear("time_embedding.linear_2", temb, temb)
    if cfg.get("addition_embed_type") == "text_time":
        yield from _linear("add_embedding.linear_1", temb, cfg["projection_class_embeddings_input_dim"])
        yield from _linear("add_embedding.linear_2", temb, temb)
    for b in unet_blocks(cfg):
        if b.kind == "resnet":
            yield from _unet_resnet(b.diffusers, b.resnet_in, b.cout, temb)
        elif b.kind == "attention":
            yield from _transformer(b.diffusers, b.cout, cfg["cross_attention_dim"], cfg["use_linear_projection"],
                                    b.depth, b.self_context)
        else:
            yield from _conv(f"{b.diffusers}.conv", b.cout, b.cin, 3)
    yield from _norm("conv_norm_out", boc[0])
    yield from _conv("conv_out", cfg["out_channels"], boc[0], 3)


def _vae_resnet(name: str, cin: int, cout: int):
    yield from _norm(f"{name}.norm1", cin)
    yield from _conv(f"{name}.conv1", cout, cin, 3)
    yield from _norm(f"{name}.norm2", cout)
    yield from _conv(f"{name}.conv2", cout, cout, 3)
    if cin != cout:
        yield from _conv(f"{name}.conv_shortcut", cout, cin, 1)


def vae_parameters(cfg: dict) -> Iterator[tuple[str, tuple[int, ...]]]:
    for b in vae_blocks(cfg):
        if b.kind == "resnet":
            yield from _vae_resnet(b.name, b.cin, b.cout)
        elif b.kind == "attention":
            yield from _norm(f"{b.name}.group_norm", b.cin)
            for q in ("to_q", "to_k", "to_v", "to_out.0"):
                yield from _linear(f"{b.name}.{q}", b.cout, b.cin)
        elif b.kind == "norm":
            yield from _norm(b.name, b.cin)
        else:
            yield from _conv(b.name, b.cout, b.cin, b.kernel)


def _tae_block(name: str, c: int):
    for k in (0, 2, 4):   # three 3x3 convs with activations between them (Sequential indices 0, 2, 4)
        yield from _conv(f"{name}.conv.{k}", c, c, 3)


def tae_parameters(cfg: dict) -> Iterator[tuple[str, tuple[int, ...]]]:
    """diffusers' AutoencoderTiny: encoder and decoder as flat Sequentials (activations and upsamplers take an
    index each and hold nothing), equal channels throughout, so no block has a skip conv."""
    enc, dec = cfg["encoder_block_out_channels"], cfg["decoder_block_out_channels"]
    if len(set(enc)) != 1 or len(set(dec)) != 1:
        raise ValueError("the synthetic tiny autoencoder keeps one channel count throughout")
    c, z = enc[0], cfg["latent_channels"]
    i = 0
    for level, blocks in enumerate(cfg["num_encoder_blocks"]):
        if level == 0:
            yield from _conv(f"encoder.layers.{i}", c, cfg["in_channels"], 3)
        else:   # the stride-2 downsampling conv has no bias
            yield f"encoder.layers.{i}.weight", (c, c, 3, 3)
        i += 1
        for _ in range(blocks):
            yield from _tae_block(f"encoder.layers.{i}", c)
            i += 1
    yield from _conv(f"encoder.layers.{i}", z, c, 3)
    yield from _conv("decoder.layers.0", c, z, 3)
    i = 2   # 1: the activation
    levels = cfg["num_decoder_blocks"]
    for level, blocks in enumerate(levels):
        for _ in range(blocks):
            yield from _tae_block(f"decoder.layers.{i}", c)
            i += 1
        if level < len(levels) - 1:
            i += 1   # the upsampler
            yield f"decoder.layers.{i}.weight", (c, c, 3, 3)   # no bias
        else:
            yield from _conv(f"decoder.layers.{i}", cfg["out_channels"], c, 3)
        i += 1


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
    if cfg["architectures"] == ["CLIPTextModelWithProjection"]:   # SDXL's second encoder: the pooled projection
        yield from _linear("text_projection", cfg["projection_dim"], h, bias=False)


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


def model_configs(family: str, reduced: bool = False, variant: str = "base") -> dict[str, dict]:
    """The diffusers configs of a family's synthetic model (unet, vae, text encoder(s), scheduler). `reduced`: the
    same layout with a tenth of the channels and one text-encoder layer (names, block structure and the
    cross-attention width are the family's, so detection and name mapping see a real SD model) for tests that
    never run it natively."""
    check_family(family)
    configs = {"unet": variant_unet_config(family, variant),
               "vae": dict(TAE_CONFIG) if variant in TINY_VAE_VARIANTS else
               dict(VAE_CONFIG, scaling_factor=VAE_SCALING[family]),
               "text_encoder": dict(TEXT_CONFIGS[family])}
    if "text_encoder_2" in TEXT_ENCODERS[family]:
        configs["text_encoder_2"] = dict(TEXT2_CONFIG)
    configs["scheduler"] = dict(SCHEDULER_CONFIGS[family])
    if reduced:
        unet = configs["unet"]
        unet["block_out_channels"] = [c // 10 for c in unet["block_out_channels"]]
        unet["norm_num_groups"] = 8
        heads = unet["attention_head_dim"]
        # heads 16 wide (SDXS-0.9's one-head first level keeps its one head)
        unet["attention_head_dim"] = ([1 if h == 1 else c // 16 for h, c in zip(heads, unet["block_out_channels"])]
                                      if isinstance(heads, list) else 4)
        if configs["vae"]["_class_name"] == "AutoencoderKL":   # (a tiny autoencoder is small already)
            configs["vae"].update(block_out_channels=[32, 32, 64, 64], norm_num_groups=8)
        # the hidden sizes stay: they are the UNet's context width (SDXL: both side by side) and SDXL's pooled width
        configs["text_encoder"].update(intermediate_size=64, num_attention_heads=4, num_hidden_layers=1,
                                       vocab_size=64, projection_dim=32)
        if "text_encoder_2" in configs:
            configs["text_encoder_2"].update(intermediate_size=64, num_attention_heads=4, num_hidden_layers=1,
                                             vocab_size=64)
    return configs


def component_parameters(family: str, reduced: bool = False, variant: str = "base"
                         ) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    cfg = model_configs(family, reduced, variant)
    vae = tae_parameters if cfg["vae"]["_class_name"] == "AutoencoderTiny" else vae_parameters
    out = {"unet": list(unet_parameters(cfg["unet"])), "vae": list(vae(cfg["vae"]))}
    for name in TEXT_ENCODERS[family]:
        out[name] = list(text_parameters(cfg[name]))
    return out


def synthetic_sources(family: str, seed: int = 0, reduced: bool = False, variant: str = "base"
                      ) -> dict[str, list[TensorSource]]:
    """Lazy random tensors per component, in diffusers layout, F16 (as a half-precision checkpoint holds them, so
    a reference that upcasts them computes with exactly the weights a converted file holds)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    out = {}
    for component, params in component_parameters(family, reduced, variant).items():
        out[component] = [TensorSource(name, shape, "F16", (lambda n=f"{component}.{name}", s=shape:
                                                           random_weight(n, s, seed).astype(np.float16)))
                          for name, shape in params]
    return out


def map_components(parts: dict[str, list[TensorSource]]) -> list[TensorSource]:
    """diffusers components (unet, vae, text_encoder, text_encoder_2) -> the names stable-diffusion.cpp loads."""
    tiny = any(t.name.startswith("decoder.layers.") for t in parts["vae"])
    out = map_unet(parts["unet"]) + (map_tae if tiny else map_vae)(parts["vae"]) + \
        map_text_encoder(parts["text_encoder"])
    if "text_encoder_2" in parts:
        out += map_text_encoder(parts["text_encoder_2"], second=True)
    return out


def ldm_sources(family: str, seed: int = 0, reduced: bool = False, variant: str = "base") -> list[TensorSource]:
    """The synthetic model under the names stable-diffusion.cpp loads (LDM UNet and VAE, HF CLIP text encoders)."""
    return map_components(synthetic_sources(family, seed, reduced, variant))


def write_diffusers_folder(folder: Path, family: str, seed: int = 0, reduced: bool = False,
                           variant: str = "base") -> Path:
    """Write a diffusers pipeline folder (configs + F16 safetensors) of the synthetic model."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    configs = model_configs(family, reduced, variant)
    for component, cfg in configs.items():
        (folder / component).mkdir(parents=True, exist_ok=True)
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        (folder / component / name).write_text(json.dumps(cfg, indent=2))
    for component, sources in synthetic_sources(family, seed, reduced, variant).items():
        tensors = {t.name: t.load() for t in sources}
        fname = "model.safetensors" if component.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
        save_file(tensors, str(folder / component / fname))
        del tensors
    index = {"_class_name": "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", configs["vae"]["_class_name"]],
             "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    if "text_encoder_2" in configs:
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_tiny_autoencoder(path: Path, seed: int = 0) -> Path:
    """A TAESD file (diffusers' AutoencoderTiny names and published shapes, F16 safetensors, random weights): what
    `taesd=` and sd-cli's --taesd load."""
    from safetensors.numpy import save_file

    tensors = {name: random_weight(name, shape, seed).astype(np.float16) for name, shape in tae_parameters(TAE_CONFIG)}
    save_file(tensors, str(path))
    return Path(path)


# The layers a synthetic LoRA adapts: attention projections, feed-forward, proj_in/out, the ResNets' 3x3 convs
# (kohya's LoCon) in the UNet; the attention projections and MLPs of the text encoder.
_LORA_UNET = re.compile(r"\.(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out|conv[12])\.weight$")
_LORA_TEXT = re.compile(r"\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$")
LORA_FORMATS = ("kohya", "peft")


def lora_layers(family: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(component, diffusers name without .weight, weight shape) of every layer a synthetic LoRA adapts."""
    cfg = model_configs(family)
    out = [("unet", n[:-7], s) for n, s in unet_parameters(cfg["unet"]) if _LORA_UNET.search(n)]
    out += [("text_encoder", n[:-7], s) for n, s in text_parameters(cfg["text_encoder"]) if _LORA_TEXT.search(n)]
    return out


def write_lora(path: Path, family: str = "sd1", fmt: str = "kohya", rank: int = 4, seed: int = 0,
               alpha: float | None = None, text_encoder: bool = True) -> Path:
    """A LoRA for the synthetic model with random weights, in kohya's names (`lora_unet_<name with _>.lora_down/
    lora_up.weight` and `.alpha`; LoCon's 3x3 down and 1x1 up for convs) or diffusers/PEFT's (`unet.<name>.lora_A/
    lora_B.weight`, no alpha: scale 1). Each layer's change is about half its weights' spread at weight 1.
    `text_encoder=False`: the UNet's layers only."""
    from safetensors.numpy import save_file

    if fmt not in LORA_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(LORA_FORMATS)}, not {fmt!r}")
    alpha = float(rank) if alpha is None else float(alpha)
    tensors = {}
    for component, name, shape in lora_layers(family):
        if component == "text_encoder" and not text_encoder:
            continue
        cout, cin, k = shape[0], shape[1], (shape[2] if len(shape) == 4 else 1)
        down_shape = (rank, cin, k, k) if len(shape) == 4 else (rank, cin)
        up_shape = (cout, rank, 1, 1) if len(shape) == 4 else (cout, rank)
        down = random_weight(f"lora-down:{name}", down_shape, seed)
        up = random_weight(f"lora-up:{name}", up_shape, seed) * np.float32(0.5 * rank / alpha)   # alpha / rank undone
        if fmt == "kohya":
            key = ("lora_unet_" if component == "unet" else "lora_te_") + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down.astype(np.float16)
            tensors[f"{key}.lora_up.weight"] = up.astype(np.float16)
            tensors[f"{key}.alpha"] = np.array(alpha, dtype=np.float32)
        else:
            key = f"{component}.{name}"
            tensors[f"{key}.lora_A.weight"] = down.astype(np.float16)
            tensors[f"{key}.lora_B.weight"] = up.astype(np.float16)
    save_file(tensors, str(path))
    return Path(path)


def esrgan_parameters(num_block: int = 23, num_feat: int = 64, num_grow: int = 32, scale: int = 4,
                      channels: int = 3) -> Iterator[tuple[str, tuple[int, ...]]]:
    """RRDBNet's tensors in BasicSR's names (Real-ESRGAN x4plus: 23 blocks, 64 features, 32 growth channels)."""
    yield from _conv("conv_first", num_feat, channels, 3)
    for b in range(num_block):
        for r in (1, 2, 3):
            for i in range(1, 6):
                cin, cout = num_feat + (i - 1) * num_grow, num_grow if i < 5 else num_feat
                yield from _conv(f"body.{b}.rdb{r}.conv{i}", cout, cin, 3)
    yield from _conv("conv_body", num_feat, num_feat, 3)
    for i in range(1, {1: 1, 2: 2, 4: 3}[scale]):
        yield from _conv(f"conv_up{i}", num_feat, num_feat, 3)
    yield from _conv("conv_hr", num_feat, num_feat, 3)
    yield from _conv("conv_last", channels, num_feat, 3)


def write_esrgan(path: Path, seed: int = 0, **arch) -> Path:
    """An ESRGAN upscaler with random weights (F16 safetensors; esrgan_parameters' architecture)."""
    from safetensors.numpy import save_file

    tensors = {n: random_weight(f"esrgan:{n}", s, seed).astype(np.float16) for n, s in esrgan_parameters(**arch)}
    save_file(tensors, str(path))
    return Path(path)


_HINT_CONVS = ((0, 3, 16), (2, 16, 16), (4, 16, 32), (6, 32, 32), (8, 32, 96), (10, 96, 96), (12, 96, 256))


def controlnet_sources(family: str = "sd1", seed: int = 0) -> list[TensorSource]:
    """A ControlNet for the synthetic UNet in the original (cldm) names under `control_model.`: the UNet's
    time embedding, input blocks and middle block (its own random weights), a 1x1 zero conv after every input
    block and the middle block, and the 8-conv hint encoder of a 3-channel control image."""
    unet = map_unet(synthetic_sources(family, seed)["unet"])
    keep = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
    out = [t.renamed("control_model." + t.name.removeprefix(UNET_PREFIX)) for t in unet
           if t.name.removeprefix(UNET_PREFIX).startswith(keep)]
    shapes = {t.name: t.shape for t in out}
    channels, i = [], 0
    while f"control_model.input_blocks.{i}.0.weight" in shapes or any(
            n.startswith(f"control_model.input_blocks.{i}.") for n in shapes):
        for name in (f"input_blocks.{i}.0.weight", f"input_blocks.{i}.0.op.weight",
                     f"input_blocks.{i}.0.out_layers.3.weight"):
            if "control_model." + name in shapes:
                c = shapes["control_model." + name][0]
        channels.append(c)
        i += 1
    mid = shapes["control_model.middle_block.2.out_layers.3.weight"][0]
    extra = [(f"zero_convs.{k}.0", c, c, 1) for k, c in enumerate(channels)] + [("middle_block_out.0", mid, mid, 1)]
    extra += [(f"input_hint_block.{k}", cout, cin, 3) for k, cin, cout in _HINT_CONVS]
    extra.append(("input_hint_block.14", channels[0], 256, 3))
    for name, cout, cin, k in extra:
        for tname, shape in _conv(name, cout, cin, k):
            full = f"control_model.{tname}"
            out.append(TensorSource(full, shape, "F16", (lambda n=full, s=shape:
                                                          random_weight(n, s, seed).astype(np.float16))))
    return out


def write_controlnet(path: Path, family: str = "sd1", seed: int = 0) -> Path:
    """controlnet_sources as an F16 safetensors file (what sd-cli's --control-net and `control_net=` load)."""
    from safetensors.numpy import save_file

    save_file({t.name: t.load() for t in controlnet_sources(family, seed)}, str(path))
    return Path(path)
