"""Which UNet a model holds: a diffusers-style config read back from its tensors (diffusers or LDM names), its family
and variant, and the check that stable-diffusion.cpp builds that layout, with a message naming what was found."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from .errors import FormatError
from .families import (UNET_CONFIGS, UPSTREAM_VERSIONS, VARIANT_CHANGES, family_of_context_width,
                       variant_unet_config)
from .names import FAMILIES, UNET_PREFIX
from .unet import MID_BLOCK, MID_RESNET, TOP_LEVEL_PARAMETERS, unet_blocks, unet_config


@dataclass(frozen=True)
class UnetArchitecture:
    family: str       # names.FAMILIES
    variant: str      # names.VARIANTS
    config: dict      # the diffusers config: the model's own, or read back from its tensors

    @property
    def upstream_version(self) -> str:
        return UPSTREAM_VERSIONS[(self.family, self.variant)]

    @property
    def name(self) -> str:
        return self.family if self.variant == "base" else f"{self.family}-{self.variant}"


def _structure(cfg: dict) -> tuple:
    """What fixes a layout for stable-diffusion.cpp: the blocks with their names and attention depths, the input
    channels and whether attn1 reads the text (channel counts are the family's; upstream checks them on load)."""
    blocks = tuple((b.kind, b.ldm, b.depth, b.self_context) for b in unet_blocks(cfg))
    return blocks, int(cfg["in_channels"]), cfg.get("addition_embed_type") == "text_time"


def describe_layout(cfg: dict, short: bool = False) -> str:
    """A one-line account of a UNet layout, for error messages and `pysdcpp inspect` (`short`: the block structure
    only)."""
    cfg = unet_config(cfg)
    blocks = unet_blocks(cfg)
    n = len(cfg["block_out_channels"])
    depths = []
    for level in range(n):
        ds = [b.depth for b in blocks if b.kind == "attention" and b.section == "down" and b.level == level]
        depths.append("-" if not ds else "/".join(str(d) for d in ds))
    mid = {MID_BLOCK: "ResNet+attention+ResNet", MID_RESNET: "one ResNet", None: "none"}[cfg["mid_block_type"]]
    extra = ", SDXL added embedding" if cfg.get("addition_embed_type") == "text_time" else ""
    if short:
        return (f"{n} levels, {cfg['layers_per_block']} ResNet(s) per level, depths {' '.join(depths)}, "
                f"mid {mid}, {cfg['in_channels']} input channels")
    return (f"{n} levels of {cfg['block_out_channels']} channels, {cfg['layers_per_block']} ResNet(s) per level, "
            f"transformer depth per level {' '.join(depths)}, mid block {mid}, {cfg['in_channels']} input channels, "
            f"{cfg['cross_attention_dim']}-wide context{extra}")


def family_of(cfg: dict) -> str | None:
    """The family whose text encoders a UNet's cross-attention reads (768 SD1.x, 1024 SD2.x, 2048 SDXL)."""
    return family_of_context_width(int(cfg.get("cross_attention_dim") or 0))


def classify(config: dict) -> UnetArchitecture:
    """The family and variant of a diffusers UNet config, if stable-diffusion.cpp builds that layout; else a
    FormatError saying what the config holds and what upstream builds."""
    cfg = unet_config(config)
    family = family_of(cfg)
    if family is None:
        widths = ", ".join(f"{f} {UNET_CONFIGS[f]['cross_attention_dim']}" for f in FAMILIES)
        raise FormatError(f"unsupported UNet: cross-attention width {cfg['cross_attention_dim']} is no SD family's "
                          f"({widths}); found {describe_layout(cfg)}")
    found = _structure(cfg)
    for variant in VARIANT_CHANGES[family]:
        if _structure(variant_unet_config(family, variant)) == found:
            return UnetArchitecture(family, variant, cfg)
    hint = ""
    if cfg["layers_per_block"] == 1 and (len(cfg["block_out_channels"]) != 3 or cfg["mid_block_type"] is not None):
        hint = (" This is an assembled layout with one ResNet per level, like BK-SDM base or small: "
                "stable-diffusion.cpp builds only the tiny one (three levels, no mid block).")
    builds = "; ".join(f"{v} ({describe_layout(variant_unet_config(family, v), short=True)})"
                       for v in VARIANT_CHANGES[family])
    raise FormatError(f"stable-diffusion.cpp cannot build this {family} UNet: found {describe_layout(cfg)}.{hint} "
                      f"It builds these {family} layouts: {builds}")


# ---- reading a config back from tensors -------------------------------------------------------------------------

# diffusers parameter -> (fact, the dimension of its torch shape that holds it)
_TOP_FACTS = {"conv_in.weight": ("in_channels", 1), "conv_out.weight": ("out_channels", 0),
              "add_embedding.linear_1.weight": ("y_width", 1)}
# LDM parameter -> diffusers parameter, for the layers outside the blocks (the walk's table)
_DIFFUSERS_TOP = {f"{ldm}.weight": f"{diffusers}.weight" for diffusers, ldm in TOP_LEVEL_PARAMETERS}


class _Facts:
    """What the tensor names and shapes say about the blocks, collected per block."""

    def __init__(self):
        self.down_cout: dict[int, int] = {}
        self.down_resnets: dict[int, set[int]] = defaultdict(set)
        self.down_attn: dict[tuple[int, int], int] = {}     # (block, layer) -> depth
        self.up_attn: dict[tuple[int, int], int] = {}
        self.self_context: dict[int, bool] = {}              # down block -> attn1 reads the text
        self.mid_resnets: set[int] = set()
        self.mid_attention = False
        self.mid_depth = 0
        self.linear_projection: bool | None = None
        self.context_dim = 0
        self.in_channels = self.out_channels = 0
        self.y_width = 0

    def top_level(self, name: str, shape: tuple[int, ...]) -> None:
        """conv_in, conv_out and the added embedding's first linear (diffusers names) give the UNet's in and out
        channels and the width of y."""
        if name in _TOP_FACTS:
            attr, dim = _TOP_FACTS[name]
            setattr(self, attr, shape[dim])

    def depth(self, table, key, k: int) -> None:
        table[key] = max(table.get(key, 0), k + 1)

    def config(self, what: str) -> dict:
        if not self.down_cout:
            raise FormatError(f"{what}: no UNet down-block ResNets found")
        n = max(self.down_cout) + 1
        if sorted(self.down_cout) != list(range(n)):
            raise FormatError(f"{what}: UNet levels {sorted(self.down_cout)} are not consecutive")
        lpb = len(self.down_resnets[0])
        down_types = ["CrossAttnDownBlock2D" if any((i, j) in self.down_attn for j in range(lpb)) else "DownBlock2D"
                      for i in range(n)]
        up_types = ["CrossAttnUpBlock2D" if any((i, j) in self.up_attn for j in range(lpb + 1)) else "UpBlock2D"
                    for i in range(n)]
        mid = MID_BLOCK if self.mid_attention else MID_RESNET if self.mid_resnets else None
        # Levels without attention get a nominal depth: the mid block's for the last level (diffusers and
        # stable-diffusion.cpp give the mid attention the last level's depth), else 1.
        down_depth = [[self.down_attn.get((i, j), 0) if down_types[i].startswith("CrossAttn")
                       else (self.mid_depth or 1) if i == n - 1 else 1 for j in range(lpb)] for i in range(n)]
        up_depth = [[self.up_attn.get((i, j), 0) if up_types[i].startswith("CrossAttn") else 1
                     for j in range(lpb + 1)] for i in range(n)]
        if mid == MID_BLOCK and self.mid_depth != down_depth[-1][-1]:
            raise FormatError(f"{what}: the mid block's attention has depth {self.mid_depth}, the last level's "
                              f"{down_depth[-1][-1]}: not a layout of the SD UNet family")
        cfg = {"block_out_channels": [self.down_cout[i] for i in range(n)], "layers_per_block": lpb,
               "down_block_types": down_types, "up_block_types": up_types, "mid_block_type": mid,
               "transformer_layers_per_block": down_depth, "reverse_transformer_layers_per_block": up_depth,
               "in_channels": self.in_channels, "out_channels": self.out_channels,
               "cross_attention_dim": self.context_dim, "use_linear_projection": bool(self.linear_projection),
               "only_cross_attention": [self.self_context.get(i, False) for i in range(n)]}
        if self.y_width:
            cfg.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                       projection_class_embeddings_input_dim=self.y_width)
        family = family_of(cfg)
        if family is not None:
            # Heads are not in the tensors; stable-diffusion.cpp takes the family's. Where those do not divide the
            # channels (reduced test models) one head per 64 channels stands in: naming and layout ignore heads.
            heads = UNET_CONFIGS[family]["attention_head_dim"]
            per_level = [heads if isinstance(heads, int) else heads[min(i, len(heads) - 1)] for i in range(n)]
            per_level = [h if c % h == 0 else max(1, c // 64) for h, c in zip(per_level, cfg["block_out_channels"])]
            cfg["attention_head_dim"] = per_level[0] if isinstance(heads, int) and len(set(per_level)) == 1 \
                else per_level
        return cfg


def _attention_rest(facts: _Facts, rest: str, shape: tuple[int, ...], level_of_block: int | None):
    """Record what an attention module's parameter says; returns its transformer block index (-1: none)."""
    if m := re.match(r"transformer_blocks\.(\d+)\.(.+)", rest):
        k, tail = int(m[1]), m[2]
        if tail == "attn2.to_k.weight":
            facts.context_dim = int(shape[1])
        if tail == "attn1.to_k.weight" and level_of_block is not None:
            facts.self_context[level_of_block] = int(shape[1]) != int(shape[0])
        return k
    if rest == "proj_in.weight":
        facts.linear_projection = len(shape) == 2
    return -1


def config_from_diffusers_tensors(tensors: Iterable[tuple[str, tuple[int, ...]]], what: str = "UNet") -> dict:
    """A diffusers UNet config read back from diffusers-named UNet tensors (torch shapes, no `unet.` prefix)."""
    f = _Facts()
    for name, shape in tensors:
        shape = tuple(int(s) for s in shape)
        if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
            i, j = int(m[1]), int(m[2])
            f.down_resnets[i].add(j)
            if m[3] == "conv1.weight":
                f.down_cout[i] = shape[0]
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", name):
            k = _attention_rest(f, m[3], shape, int(m[1]))
            f.depth(f.down_attn, (int(m[1]), int(m[2])), k)
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", name):
            k = _attention_rest(f, m[3], shape, None)
            f.depth(f.up_attn, (int(m[1]), int(m[2])), k)
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.", name):
            f.mid_resnets.add(int(m[1]))
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", name):
            f.mid_attention = True
            f.mid_depth = max(f.mid_depth, _attention_rest(f, m[1], shape, None) + 1)
        else:
            f.top_level(name, shape)
    return f.config(what)


def config_from_ldm_tensors(tensors: Iterable[tuple[str, tuple[int, ...]]], what: str = "UNet") -> dict:
    """The same from LDM-named tensors (with the `model.diffusion_model.` prefix; torch shapes), numbered as
    stable-diffusion.cpp numbers them (three input/output slots per level)."""
    f = _Facts()
    stride = 3
    attn_at: dict[str, int] = {}
    up_slots: dict[int, set[int]] = defaultdict(set)
    for name, shape in tensors:
        if not name.startswith(UNET_PREFIX):
            continue
        name, shape = name[len(UNET_PREFIX):], tuple(int(s) for s in shape)
        if m := re.match(r"input_blocks\.(\d+)\.0\.(in_layers\.2\.weight|op\.weight)$", name):
            slot = int(m[1])
            if m[2] == "op.weight":
                continue
            if slot % stride == 0:
                raise FormatError(f"{what}: input block {slot} is a ResNet where a downsampler belongs: more than "
                                  "two ResNets per level, which stable-diffusion.cpp does not build")
            i, j = (slot - 1) // stride, (slot - 1) % stride
            f.down_resnets[i].add(j)
            f.down_cout[i] = shape[0]
        elif m := re.match(r"input_blocks\.(\d+)\.1\.(.+)", name):
            slot = int(m[1])
            i, j = (slot - 1) // stride, (slot - 1) % stride
            k = _attention_rest(f, m[2], shape, i)
            f.depth(f.down_attn, (i, j), k)
        elif m := re.match(r"output_blocks\.(\d+)\.0\.in_layers\.2\.weight$", name):
            up_slots[int(m[1]) // stride].add(int(m[1]) % stride)
        elif m := re.match(r"output_blocks\.(\d+)\.1\.(.+)", name):
            attn_at[m[1]] = max(attn_at.get(m[1], 0), _attention_rest(f, m[2], shape, None) + 1)
        elif m := re.match(r"middle_block\.(\d)\.(.+)", name):
            if m[1] == "1":
                f.mid_attention = True
                f.mid_depth = max(f.mid_depth, _attention_rest(f, m[2], shape, None) + 1)
            else:
                f.mid_resnets.add(int(m[1]) // 2)
        else:
            f.top_level(_DIFFUSERS_TOP.get(name, name), shape)
    # output slots: up block i, layer j <- slot i*3 + j; the tiny UNets keep slots 0..1 of each level's 3
    for slot_s, depth in attn_at.items():
        slot = int(slot_s)
        i, j = slot // stride, slot % stride
        if j in up_slots[i] and depth > 0:
            f.up_attn[(i, j)] = depth
    return f.config(what)


def tensor_shape(shape: tuple[int, ...], gguf_order: bool) -> tuple[int, ...]:
    """Torch dimension order of a shape (GGUF lists dimensions innermost first)."""
    return tuple(reversed(shape)) if gguf_order else tuple(shape)


def architecture_of_tensors(tensors: Iterable[tuple[str, tuple[int, ...]]], what: str = "model") -> UnetArchitecture:
    """Family and variant of a model from its LDM-named tensors (torch shapes)."""
    return classify(config_from_ldm_tensors(tensors, what))
