"""PyTorch reference of ALTER's eval path (alter-format.md section 3), independent of pysdcpp's code.

`alter_unet_forward` evaluates a diffusers UNet2DConditionModel (SD1.x/SD2.x/SDXL layout) with the prunable
units whose keep flag is False bypassed. The unit order is derived here from the module tree, not taken
from pysdcpp.converters.alter, so tests can hold one against the other. With `deepcache`, it also cuts
DeepCache's branch as DeepCache's paper defines it: between full steps only the blocks above skip-stack entry B
run, on the hidden state the last full step fed the first of the remaining up-path blocks.
"""

from __future__ import annotations

from typing import Sequence

import torch

SEMANTICS = ("reference", "consume")


def alter_units(unet) -> list[tuple[str, str]]:
    """(kind, diffusers module path) of every prunable unit, in ALTER order: down blocks, up blocks, mid block;
    inside a block each attention's transformer blocks, then the ResNets that keep the channel count."""
    out: list[tuple[str, str]] = []

    def block_units(prefix, block, prev_channels):
        for j, attn in enumerate(getattr(block, "attentions", None) or []):
            for k in range(len(attn.transformer_blocks)):
                out.append(("transformer", f"{prefix}.attentions.{j}.transformer_blocks.{k}"))
        for j, resnet in enumerate(block.resnets):
            if j == 0 and prev_channels != resnet.out_channels:
                continue
            out.append(("resnet", f"{prefix}.resnets.{j}"))

    for i, block in enumerate(unet.down_blocks):
        block_units(f"down_blocks.{i}", block, block.resnets[0].in_channels)
    prev = unet.mid_block.resnets[-1].out_channels
    for i, block in enumerate(unet.up_blocks):
        block_units(f"up_blocks.{i}", block, prev)
        prev = block.resnets[-1].out_channels
    block_units("mid_block", unet.mid_block, unet.mid_block.resnets[0].in_channels)
    return out


def _spatial_transformer(attn, h, encoder_hidden_states, skipped_blocks: set[int]):
    """Transformer2DModel on continuous input, with some BasicTransformerBlocks bypassed (norm, proj_in,
    proj_out and the outer residual always run)."""
    batch, _, height, width = h.shape
    residual = h
    x = attn.norm(h)
    if attn.use_linear_projection:
        inner = x.shape[1]
        x = attn.proj_in(x.permute(0, 2, 3, 1).reshape(batch, height * width, inner))
    else:
        x = attn.proj_in(x)
        inner = x.shape[1]
        x = x.permute(0, 2, 3, 1).reshape(batch, height * width, inner)
    for k, block in enumerate(attn.transformer_blocks):
        if k not in skipped_blocks:
            x = block(x, encoder_hidden_states=encoder_hidden_states)
    if attn.use_linear_projection:
        x = attn.proj_out(x).reshape(batch, height, width, inner).permute(0, 3, 1, 2).contiguous()
    else:
        x = attn.proj_out(x.reshape(batch, height, width, inner).permute(0, 3, 1, 2).contiguous())
    return x + residual


def alter_unet_forward(unet, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                       keep: Sequence[bool], semantics: str = "reference", y: torch.Tensor | None = None,
                       deepcache: dict | None = None, control: tuple | None = None) -> torch.Tensor:
    """The UNet's output (the `.sample` of a plain forward) with the units where keep[i] is False skipped; `y`:
    SDXL's added-embedding input (pooled text and size embeddings), projected and added to the time embedding.

    semantics: "reference" (a skipped ResNet of a plain UpBlock2D leaves its skip tensor for the next kept
    ResNet; leftovers are dropped) or "consume" (it pops its skip tensor and discards it).

    deepcache: {"branch": B, "inherit": bool, "cache": dict}. A full step (inherit False) stores in `cache` the
    hidden state entering the up-path block that pops skip entry B (the dense order: the last entry is popped
    first). An inheriting step runs conv_in and the down blocks up to the one pushing entry B, then that block and
    the ones after it on the stored hidden state; nothing in between runs, whatever `keep` says.

    control: a ControlNet's (down residuals, mid residual), as diffusers' ControlNetModel returns them: the k-th
    residual is added to the k-th skip-stack entry (whichever ResNet pops it) and the mid residual to the middle
    block's output, as UNet2DConditionModel adds them.
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}")
    units = alter_units(unet)
    keep = [bool(k) for k in keep]
    if len(keep) != len(units):
        raise ValueError(f"keep has {len(keep)} entries, the UNet has {len(units)} prunable units")
    skipped = {path for (_, path), k in zip(units, keep) if not k}

    def skipped_blocks(prefix, attn):
        return {k for k in range(len(attn.transformer_blocks)) if f"{prefix}.transformer_blocks.{k}" in skipped}

    if not torch.is_tensor(timestep):
        timestep = torch.tensor([timestep], dtype=torch.float64 if isinstance(timestep, float) else torch.int64)
    elif timestep.dim() == 0:
        timestep = timestep[None]
    t_emb = unet.time_proj(timestep.expand(sample.shape[0])).to(dtype=sample.dtype)
    emb = unet.time_embedding(t_emb)
    if y is not None:
        emb = emb + unet.add_embedding(y.to(dtype=emb.dtype))

    n_entries = 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in unet.down_blocks)
    cut = None   # the first up-path block (in build order) that runs at an inheriting step
    inherit = False
    if deepcache is not None:
        branch, inherit = int(deepcache["branch"]), bool(deepcache["inherit"])
        if not 0 <= branch < n_entries:
            raise ValueError(f"branch must be a skip-stack entry 0..{n_entries - 1}, got {branch}")
        cut = n_entries - 1 - branch
        if inherit and "h" not in deepcache["cache"]:
            raise ValueError("an inheriting step needs a full step before it")

    h = unet.conv_in(sample)
    stack = [h]
    for i, block in enumerate(unet.down_blocks):
        if inherit and len(stack) > branch:
            break
        attentions = getattr(block, "attentions", None) or []
        for j, resnet in enumerate(block.resnets):
            if inherit and len(stack) > branch:
                break
            if f"down_blocks.{i}.resnets.{j}" not in skipped:
                h = resnet(h, emb)
            if attentions:
                h = _spatial_transformer(attentions[j], h, encoder_hidden_states,
                                         skipped_blocks(f"down_blocks.{i}.attentions.{j}", attentions[j]))
            stack.append(h)
        if block.downsamplers is not None and not (inherit and len(stack) > branch):
            h = block.downsamplers[0](h)
            stack.append(h)

    if control is not None:
        if deepcache is not None:
            raise ValueError("control residuals with deepcache: not modelled here")
        down_res, mid_res = control
        if len(down_res) != len(stack):
            raise ValueError(f"{len(down_res)} down residuals for {len(stack)} skip-stack entries")
        stack = [s + r for s, r in zip(stack, down_res)]
    if inherit:
        stack += [None] * (n_entries - len(stack))   # the entries the cut blocks would push: popped, never read
    else:
        mid = unet.mid_block
        if "mid_block.resnets.0" not in skipped:
            h = mid.resnets[0](h, emb)
        for j, (attn, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:])):
            h = _spatial_transformer(attn, h, encoder_hidden_states,
                                     skipped_blocks(f"mid_block.attentions.{j}", attn))
            if f"mid_block.resnets.{j + 1}" not in skipped:
                h = resnet(h, emb)
        if control is not None:
            h = h + control[1]

    n_up = len(unet.up_blocks)
    k = -1   # the up-path block's index in build order
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        skips, stack = stack[-n:], stack[:-n]   # each up block gets exactly its own slice of the stack
        attentions = getattr(block, "attentions", None) or []
        for j, resnet in enumerate(block.resnets):
            k += 1
            if cut is not None and k == cut:
                if inherit:
                    h = deepcache["cache"]["h"]
                else:
                    deepcache["cache"]["h"] = h
            if inherit and k < cut:
                skips.pop()
                continue
            if f"up_blocks.{i}.resnets.{j}" in skipped:
                if attentions or semantics == "consume":
                    skips.pop()   # popped (and concatenated), then the ResNet's output is the hidden state before it
            else:
                h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
            if attentions:
                h = _spatial_transformer(attentions[j], h, encoder_hidden_states,
                                         skipped_blocks(f"up_blocks.{i}.attentions.{j}", attentions[j]))
        if inherit and k < cut:
            continue
        if block.upsamplers is not None and i < n_up - 1:
            target = stack[-1].shape[2:]
            size = None if (target[0] == 2 * h.shape[2] and target[1] == 2 * h.shape[3]) else target
            h = block.upsamplers[0](h, size)

    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)
