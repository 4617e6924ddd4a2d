"""The one walk over a UNet of the SD family (SD1.x, SD2.x, SDXL and the variants stable-diffusion.cpp builds): its
blocks in graph order, with LDM and diffusers names, channels, latent level and attention shape, read from a
diffusers UNet config. ALTER's prunable units, the MAC counts, the synthetic models' parameters, the name mapping of
the converters and the benchmarks' shapes are all derived from it."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FormatError
from .families import UNET_CONFIGS
from .names import UNET_PREFIX

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK = "UNetMidBlock2DCrossAttn"      # ResNet, attention, ResNet
MID_RESNET = "UNetMidBlock2D"             # (as diffusers builds it for a UNet2DConditionModel) one ResNet
MID_TYPES = (MID_BLOCK, MID_RESNET, None)  # None: no mid block (the tiny UNets)


def normalize_unet_config(config: dict) -> dict:
    """A diffusers UNet config with ALTER's `Pruned` class-name suffixes removed."""

    def strip(name):
        return name[: -len("Pruned")] if isinstance(name, str) and name.endswith("Pruned") else name

    out = dict(config)
    for key in ("_class_name", "mid_block_type"):
        if key in out:
            out[key] = strip(out[key])
    for key in ("down_block_types", "up_block_types"):
        if key in out:
            out[key] = [strip(n) for n in out[key]]
    return out


def is_alter_config(config: dict | None) -> bool:
    """True for the UNet config of an ALTER run (block class names with a `Pruned` suffix)."""
    if not config:
        return False
    names = [config.get("_class_name", ""), config.get("mid_block_type", "")]
    names += list(config.get("down_block_types", [])) + list(config.get("up_block_types", []))
    return any(isinstance(n, str) and n.endswith("Pruned") for n in names)


def unet_config(family_or_config: str | dict) -> dict:
    """The (normalized, checked) UNet config of a family name ("sd1", "sd2", "sdxl": its base UNet) or of a
    diffusers config dict."""
    if isinstance(family_or_config, str):
        if family_or_config not in UNET_CONFIGS:
            raise FormatError(f"an SD1.x, SD2.x or SDXL family name is needed, not {family_or_config!r}")
        family_or_config = UNET_CONFIGS[family_or_config]
    cfg = normalize_unet_config(family_or_config)
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block"):
        if key not in cfg:
            raise FormatError(f"UNet config has no {key!r}: not a diffusers UNet2DConditionModel config")
    if not isinstance(cfg["layers_per_block"], int) or cfg["layers_per_block"] < 1:
        raise FormatError("UNet configs with a per-block layers_per_block list are not supported")
    n = len(cfg["block_out_channels"])
    if len(cfg["down_block_types"]) != n or len(cfg["up_block_types"]) != n:
        raise FormatError("UNet config: block type lists and block_out_channels differ in length")
    bad = [t for t in cfg["down_block_types"] if t not in _DOWN] + [t for t in cfg["up_block_types"] if t not in _UP]
    if bad:
        raise FormatError(f"UNet config: block type {bad[0]!r} is not a block of the SD UNet family")
    cfg.setdefault("mid_block_type", MID_BLOCK)
    if cfg["mid_block_type"] not in MID_TYPES:
        raise FormatError(f"UNet config: mid block {cfg['mid_block_type']!r} is not one of the SD UNet family "
                          f"({', '.join(str(t) for t in MID_TYPES)})")
    if cfg.get("addition_embed_type") not in (None, "text_time"):
        raise FormatError(f"UNet config: added embedding {cfg['addition_embed_type']!r} is not SDXL's text_time")
    cfg.setdefault("in_channels", 4)
    cfg.setdefault("out_channels", 4)
    cfg.setdefault("cross_attention_dim", 768)
    return cfg


def _per_layer(value, n_blocks: int, n_layers: int, what: str) -> list[list[int]]:
    """An int, a per-block list, or a per-block list of per-layer lists -> per block, per layer."""
    if isinstance(value, int):
        return [[value] * n_layers for _ in range(n_blocks)]
    value = list(value)
    if len(value) != n_blocks:
        raise FormatError(f"UNet config: {what} has {len(value)} entries for {n_blocks} blocks")
    out = []
    for v in value:
        layers = [v] * n_layers if isinstance(v, int) else list(v)
        if len(layers) != n_layers or not all(isinstance(x, int) and x >= 0 for x in layers):
            raise FormatError(f"UNet config: {what} entry {v!r} does not give {n_layers} layer depths")
        out.append(layers)
    return out


def attention_depths(cfg: dict) -> tuple[list[list[int]], list[list[int]]]:
    """Transformer blocks of each attention module: (per down block per layer, per up block per layer), diffusers'
    transformer_layers_per_block and reverse_transformer_layers_per_block."""
    n, lpb = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    tl = cfg.get("transformer_layers_per_block", 1)
    down = _per_layer(tl, n, lpb, "transformer_layers_per_block")
    reverse = cfg.get("reverse_transformer_layers_per_block")
    if reverse is not None:
        up = _per_layer(reverse, n, lpb + 1, "reverse_transformer_layers_per_block")
    elif isinstance(tl, int) or all(isinstance(v, int) for v in tl):
        up = [[layers[0]] * (lpb + 1) for layers in reversed(down)]
    else:
        raise FormatError("UNet config: per-layer transformer_layers_per_block needs "
                          "reverse_transformer_layers_per_block")
    return down, up


def transformer_depths(cfg: dict) -> list[int]:
    """Transformer blocks of the first attention module of each down level (and, last, the mid block's depth)."""
    return [layers[0] for layers in attention_depths(cfg)[0]]


def attention_heads(cfg: dict, level: int) -> tuple[int, int]:
    """(heads, head width) of the attention at a level, as stable-diffusion.cpp reads the config: diffusers'
    `attention_head_dim` (or `num_attention_heads`) gives the number of heads."""
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    if not isinstance(heads, int) and len(heads) != len(cfg["block_out_channels"]):
        raise FormatError(f"UNet config: attention_head_dim has {len(heads)} entries for "
                          f"{len(cfg['block_out_channels'])} levels")
    h = int(heads if isinstance(heads, int) else heads[level])
    c = cfg["block_out_channels"][level]
    if h < 1 or c % h:
        raise FormatError(f"UNet config: {h} attention heads do not divide {c} channels at level {level}")
    return h, c // h


def ldm_stride(cfg: dict) -> int:
    """Input/output block slots per level in the LDM names: layers_per_block + 1, and 3 for the one-ResNet tiny
    UNets (stable-diffusion.cpp numbers them as if the second ResNet were there)."""
    return max(3, cfg["layers_per_block"] + 1)


@dataclass(frozen=True)
class UnetBlock:
    """One block of the UNet graph: a ResNet, an attention module (a stack of `depth` transformer blocks), a
    downsampler (stride-2 conv) or an upsampler (nearest x2, then a 3x3 conv)."""

    kind: str        # "resnet" | "attention" | "downsample" | "upsample"
    ldm: str         # LDM name relative to model.diffusion_model.: input_blocks.1.0, middle_block.1, ...
    diffusers: str   # down_blocks.0.resnets.0, mid_block.attentions.0, up_blocks.1.upsamplers.0, ...
    section: str     # "down" | "mid" | "up"
    block: int       # the diffusers block index (0 in the mid block)
    block_type: str  # CrossAttnDownBlock2D, UpBlock2D, UNetMidBlock2DCrossAttn ...
    index: int       # position inside the diffusers block (resnets.j / attentions.j)
    cin: int         # input channels (up-block ResNets: without the concatenated skip)
    cout: int
    level: int       # latent level the block computes at: 0 = the latent's size, k = after k downsamplers
    skip: int = 0    # channels of the skip tensor an up-block ResNet concatenates
    depth: int = 0   # transformer blocks of an attention module
    heads: int = 0   # attention heads of an attention module
    self_context: bool = False  # attn1 attends to the text context too (SDXS-0.9's first level)

    @property
    def resnet_in(self) -> int:
        """Channels entering a ResNet's first conv (input plus skip)."""
        return self.cin + self.skip


def unet_blocks(family_or_config: str | dict) -> list[UnetBlock]:
    """Every block of the UNet in graph order (input blocks, middle block, output blocks)."""
    cfg = unet_config(family_or_config)
    boc, lpb = cfg["block_out_channels"], cfg["layers_per_block"]
    n, stride = len(boc), ldm_stride(cfg)
    down_depth, up_depth = attention_depths(cfg)
    only_cross = cfg.get("only_cross_attention", False)
    only_cross = [bool(only_cross)] * n if isinstance(only_cross, bool) else list(only_cross)
    out: list[UnetBlock] = []

    def attention(ldm, diffusers, section, i, btype, j, c, level, depth):
        heads = attention_heads(cfg, level)[0]
        out.append(UnetBlock("attention", ldm, diffusers, section, i, btype, j, c, c, level, depth=depth,
                             heads=heads, self_context=only_cross[level]))

    skips = [boc[0]]   # channels pushed onto the skip stack, conv_in first
    for i, btype in enumerate(cfg["down_block_types"]):
        cin, cout = (boc[i - 1] if i else boc[0]), boc[i]
        for j in range(lpb):
            slot = i * stride + j + 1
            out.append(UnetBlock("resnet", f"input_blocks.{slot}.0", f"down_blocks.{i}.resnets.{j}", "down", i,
                                 btype, j, cin if j == 0 else cout, cout, i))
            if btype.startswith("CrossAttn"):
                attention(f"input_blocks.{slot}.1", f"down_blocks.{i}.attentions.{j}", "down", i, btype, j, cout,
                          i, down_depth[i][j])
            skips.append(cout)
        if i < n - 1:
            out.append(UnetBlock("downsample", f"input_blocks.{(i + 1) * stride}.0",
                                 f"down_blocks.{i}.downsamplers.0", "down", i, btype, 0, cout, cout, i + 1))
            skips.append(cout)
    c, mid = boc[-1], cfg["mid_block_type"]
    if mid is not None:
        out.append(UnetBlock("resnet", "middle_block.0", "mid_block.resnets.0", "mid", 0, mid, 0, c, c, n - 1))
    if mid == MID_BLOCK:
        attention("middle_block.1", "mid_block.attentions.0", "mid", 0, mid, 0, c, n - 1, down_depth[-1][-1])
        out.append(UnetBlock("resnet", "middle_block.2", "mid_block.resnets.1", "mid", 0, mid, 1, c, c, n - 1))
    rev = list(reversed(boc))
    prev = rev[0]
    for i, btype in enumerate(cfg["up_block_types"]):
        cout, level = rev[i], n - 1 - i
        has_attention = btype.startswith("CrossAttn")
        for j in range(lpb + 1):
            slot = i * stride + j
            out.append(UnetBlock("resnet", f"output_blocks.{slot}.0", f"up_blocks.{i}.resnets.{j}", "up", i, btype,
                                 j, prev if j == 0 else cout, cout, level, skip=skips.pop()))
            if has_attention:
                attention(f"output_blocks.{slot}.1", f"up_blocks.{i}.attentions.{j}", "up", i, btype, j, cout,
                          level, up_depth[i][j])
        if i < n - 1:
            # after the attention if there is one; upstream's tiny UNets put the first upsampler at .1 regardless
            sub = 2 if has_attention and not (lpb == 1 and i == 0) else 1
            out.append(UnetBlock("upsample", f"output_blocks.{i * stride + stride - 1}.{sub}",
                                 f"up_blocks.{i}.upsamplers.0", "up", i, btype, 0, cout, cout, level - 1))
        prev = cout
    return out


def inheritable_units(family_or_config: str | dict) -> list[str]:
    """The units feature inheritance can reuse (docs/inheritance.md), in graph order: every ResNet (its residual
    branch; a shortcut that changes the channel count stays computed) and every transformer block."""
    out = []
    for b in unet_blocks(family_or_config):
        if b.kind == "resnet":
            out.append(b.ldm)
        elif b.kind == "attention":
            out += [f"{b.ldm}.transformer_blocks.{k}" for k in range(b.depth)]
    return out


def skip_entries(family_or_config: str | dict) -> int:
    """Entries of the skip stack (conv_in's output and every input block's): DeepCache's branches are 0 to this
    minus 1."""
    return 1 + len({b.ldm.split(".")[1] for b in unet_blocks(family_or_config) if b.section == "down"})


def below_branch(family_or_config: str | dict, branch: int) -> set[str]:
    """The blocks (LDM names) below DeepCache's branch at skip-stack entry `branch`: the input blocks pushing a
    later entry, the middle block, and the output blocks popping one (in the dense UNet's order)."""
    blocks = unet_blocks(family_or_config)
    slots = {s: sorted({int(b.ldm.split(".")[1]) for b in blocks if b.section == s}) for s in ("down", "up")}
    out = set()
    for b in blocks:
        if b.section == "mid":
            out.add(b.ldm)
            continue
        k = slots[b.section].index(int(b.ldm.split(".")[1]))
        # input slot k pushes entry k + 1 (conv_in pushed entry 0); output position k pops entry n - 1 - k
        if (k + 1 > branch) if b.section == "down" else (k < len(slots["up"]) - 1 - branch):
            out.add(b.ldm)
    return out


# (diffusers, LDM) names of the UNet's layers outside the blocks: time and SDXL's added embedding, conv_in, the
# output norm and conv
TOP_LEVEL_PARAMETERS = (("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
                        ("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2"),
                        ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"))


def top_level_parameters(cfg: dict) -> list[tuple[str, str]]:
    """TOP_LEVEL_PARAMETERS of a UNet: the added embedding's only where the config has SDXL's."""
    text_time = cfg.get("addition_embed_type") == "text_time"
    return [(d, l) for d, l in TOP_LEVEL_PARAMETERS if text_time or not d.startswith("add_embedding.")]


def level_sizes(n_levels: int, latent_h: int, latent_w: int) -> list[tuple[int, int]]:
    """(h, w) of each latent level: every downsampler is a 3x3 stride-2 conv with padding 1."""
    sizes = [(latent_h, latent_w)]
    for _ in range(n_levels - 1):
        h, w = sizes[-1]
        sizes.append(((h - 1) // 2 + 1, (w - 1) // 2 + 1))
    return sizes


# ---- ALTER's prunable units ------------------------------------------------------------------------

@dataclass(frozen=True)
class PrunableUnit:
    """One unit ALTER can skip: a BasicTransformerBlock or a ResNet."""

    index: int      # position in ALTER order (the column of a mask row)
    name: str       # LDM name relative to `model.diffusion_model.`, e.g. input_blocks.1.1.transformer_blocks.0
    kind: str       # names.UNIT_KINDS
    diffusers: str  # e.g. down_blocks.0.attentions.0.transformer_blocks.0, up_blocks.1.resnets.2
    group: int      # ALTER block group: down blocks, then up blocks, then the mid block
    block: str      # the diffusers block type holding it: CrossAttnDownBlock2D, UpBlock2D, UNetMidBlock2DCrossAttn ...


def _unit_pieces(family_or_config: str | dict) -> list[list[list[tuple[str, str, str, str]]]]:
    """ALTER groups (down blocks, up blocks, then the mid block) -> pieces (each attention module's transformer
    blocks, then the block's ResNets) -> units (ldm name, kind, diffusers name, block type)."""
    blocks = unet_blocks(family_or_config)
    keys = sorted({(b.section, b.block) for b in blocks if b.section != "mid"}, key=lambda k: (k[0] != "down", k[1]))
    groups = []
    for section, index in keys + [("mid", 0)]:
        members = [b for b in blocks if (b.section, b.block) == (section, index)]
        pieces = [[(f"{b.ldm}.transformer_blocks.{k}", "transformer", f"{b.diffusers}.transformer_blocks.{k}",
                    b.block_type) for k in range(b.depth)] for b in members if b.kind == "attention"]
        # A ResNet that changes the channel count cannot be skipped.
        pieces.append([(b.ldm, "resnet", b.diffusers, b.block_type) for b in members
                       if b.kind == "resnet" and b.cin == b.cout])
        groups.append([p for p in pieces if p])
    return groups


def prunable_units(family_or_config: str | dict) -> list[PrunableUnit]:
    """The prunable units of an SD1.x/SD2.x UNet in ALTER order (34 for the standard configs)."""
    out = []
    for g, pieces in enumerate(_unit_pieces(family_or_config)):
        for piece in pieces:
            for ldm, kind, diff, btype in piece:
                out.append(PrunableUnit(len(out), ldm, kind, diff, g, btype))
    return out


def piece_structure(family_or_config: str | dict) -> list[list[int]]:
    """ALTER's nested piece sizes (its `p_structures`): per group, the size of each piece."""
    return [[len(p) for p in pieces] for pieces in _unit_pieces(family_or_config)]


def unit_prefix(name: str) -> str:
    """Prefix of every GGUF tensor belonging to a unit (the trailing dot keeps output_blocks.1 off output_blocks.10)."""
    return f"{UNET_PREFIX}{name}."
