"""Multiply-accumulates of one UNet evaluation, dense and per ALTER unit, counted over unet.unet_blocks (what
ALTER's cost accounting weighs units by; alter-format.md section 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .families import CONTEXT_LENGTH
from .unet import UnetBlock, below_branch, level_sizes, prunable_units, unet_blocks, unet_config


@dataclass
class UnetMacs:
    """Multiply-accumulates of one UNet evaluation: convolutions, linear layers and the two attention matmuls
    (Q K^T and P V). Norms, activations, softmax and additions are not counted."""

    dense: int
    units: list[str]
    unit_macs: list[int]
    latent_h: int
    latent_w: int
    batch: int

    @property
    def per_unit(self) -> dict[str, int]:
        return dict(zip(self.units, self.unit_macs))

    def with_mask(self, keep: Sequence[bool]) -> int:
        """MACs with the units where `keep` is False skipped (dense minus their MACs)."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (len(self.units),):
            raise ValueError(f"keep mask has {keep.size} entries, expected {len(self.units)}")
        return self.dense - int(sum(m for m, k in zip(self.unit_macs, keep) if not k))

    def experts(self, routing) -> list[int]:
        """MACs of each expert of an AlterRouting."""
        if routing.units != self.units:
            raise ValueError("the routing's units are not this UNet's prunable units")
        return [self.with_mask(m) for m in routing.masks]


def resnet_macs(cin: int, cout: int, hw: int, temb: int) -> int:
    """Two 3x3 convs, the time-embedding projection, and a 1x1 shortcut where the channel count changes."""
    return 9 * cin * cout * hw + temb * cout + 9 * cout * cout * hw + (cin * cout * hw if cin != cout else 0)


def transformer_block_macs(c: int, hw: int, context_dim: int, context_len: int) -> int:
    """Self-attention (4 projections + Q K^T + P V), cross-attention over the context, GEGLU feed-forward."""
    self_attn = 4 * c * c * hw + 2 * hw * hw * c
    cross = 2 * c * c * hw + 2 * context_dim * c * context_len + 2 * hw * context_len * c
    return self_attn + cross + 12 * c * c * hw   # feed-forward: c -> 8c (GEGLU), 4c -> c


def unet_macs(family_or_config: str | dict, latent_h: int, latent_w: int, batch: int = 1,
              context_len: int = CONTEXT_LENGTH) -> UnetMacs:
    """Dense and per-unit MACs of one UNet evaluation on a latent_h x latent_w latent."""
    cfg = unet_config(family_or_config)
    boc, ctx = cfg["block_out_channels"], cfg["cross_attention_dim"]
    temb = 4 * boc[0]
    sizes = level_sizes(len(boc), latent_h, latent_w)
    units = prunable_units(cfg)
    per_unit: dict[str, int] = {}
    # the time embedding's two linears, conv_in and conv_out
    other = boc[0] * temb + temb * temb + 9 * (cfg["in_channels"] + cfg["out_channels"]) * boc[0] * latent_h * latent_w

    def hw(b: UnetBlock) -> int:
        h, w = sizes[b.level]
        return h * w

    for b in unet_blocks(cfg):
        if b.kind == "resnet":
            per_unit[b.ldm] = resnet_macs(b.resnet_in, b.cout, hw(b), temb)
        elif b.kind == "attention":
            other += 2 * b.cout * b.cout * hw(b)   # proj_in + proj_out (1x1 conv or linear: the same MACs)
            for k in range(b.depth):
                per_unit[f"{b.ldm}.transformer_blocks.{k}"] = transformer_block_macs(b.cout, hw(b), ctx, context_len)
        else:   # the down- and upsamplers' 3x3 convs, at their output size
            other += 9 * b.cin * b.cout * hw(b)
    unit_names = [u.name for u in units]
    other += sum(m for name, m in per_unit.items() if name not in set(unit_names))
    unit_macs = [batch * per_unit[name] for name in unit_names]
    dense = batch * other + sum(unit_macs)
    return UnetMacs(dense, unit_names, unit_macs, latent_h, latent_w, batch)


def evaluation_macs(family_or_config: str | dict, latent_h: int, latent_w: int, *, skipped=(), inherited=(),
                    branch: int | None = None, batch: int = 1, context_len: int = CONTEXT_LENGTH) -> int:
    """MACs one evaluation spends with the units in `skipped` (ALTER) left out, those in `inherited` reused (a
    ResNet still computes a shortcut that changes the channel count) and, with `branch`, everything below
    DeepCache's branch at that skip-stack entry reused (docs/inheritance.md)."""
    cfg = unet_config(family_or_config)
    boc, ctx = cfg["block_out_channels"], cfg["cross_attention_dim"]
    temb = 4 * boc[0]
    sizes = level_sizes(len(boc), latent_h, latent_w)
    skipped, inherited = set(skipped), set(inherited)
    total = boc[0] * temb + temb * temb + 9 * (cfg["in_channels"] + cfg["out_channels"]) * boc[0] * latent_h * latent_w
    left_out = below_branch(cfg, branch) if branch is not None else set()
    for b in unet_blocks(cfg):
        if b.ldm in left_out:
            continue
        hw = sizes[b.level][0] * sizes[b.level][1]
        if b.kind == "resnet":
            if b.ldm in skipped:
                continue
            shortcut = b.resnet_in * b.cout * hw if b.resnet_in != b.cout else 0
            total += shortcut if b.ldm in inherited else resnet_macs(b.resnet_in, b.cout, hw, temb)
        elif b.kind == "attention":
            total += 2 * b.cout * b.cout * hw
            total += sum(transformer_block_macs(b.cout, hw, ctx, context_len) for k in range(b.depth)
                         if f"{b.ldm}.transformer_blocks.{k}" not in skipped | inherited)
        else:
            total += 9 * b.cin * b.cout * hw
    return batch * total
