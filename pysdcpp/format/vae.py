"""The one walk over the SD VAE (AutoencoderKL): its layers in order with diffusers names, channels and scale,
read from a diffusers VAE config. The synthetic models' parameters and the benchmarks' conv shapes come from it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VaeBlock:
    """A layer of the VAE: a plain conv, a ResNet (two 3x3 convs), the mid-block attention or a group norm."""

    kind: str     # "conv" | "resnet" | "attention" | "norm"
    name: str     # diffusers name: encoder.down_blocks.0.resnets.1, decoder.conv_in, quant_conv ...
    cin: int
    cout: int
    shift: int    # the map it computes on is the image's size >> shift (the latent's is n_levels - 1)
    kernel: int = 3
    stride: int = 1


def vae_blocks(cfg: dict) -> list[VaeBlock]:
    boc, lpb, lat = cfg["block_out_channels"], cfg["layers_per_block"], cfg["latent_channels"]
    n = len(boc)
    out = [VaeBlock("conv", "encoder.conv_in", cfg["in_channels"], boc[0], 0)]
    cout = boc[0]
    for i in range(n):
        cin, cout = cout, boc[i]
        for j in range(lpb):
            out.append(VaeBlock("resnet", f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout, i))
        if i < n - 1:
            out.append(VaeBlock("conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", cout, cout, i + 1, stride=2))

    def mid(part: str) -> list[VaeBlock]:
        c = boc[-1]
        return [VaeBlock("resnet", f"{part}.mid_block.resnets.0", c, c, n - 1),
                VaeBlock("attention", f"{part}.mid_block.attentions.0", c, c, n - 1),
                VaeBlock("resnet", f"{part}.mid_block.resnets.1", c, c, n - 1)]

    out += mid("encoder")
    out += [VaeBlock("norm", "encoder.conv_norm_out", boc[-1], boc[-1], n - 1),
            VaeBlock("conv", "encoder.conv_out", boc[-1], 2 * lat, n - 1),
            VaeBlock("conv", "quant_conv", 2 * lat, 2 * lat, n - 1, kernel=1),
            VaeBlock("conv", "post_quant_conv", lat, lat, n - 1, kernel=1),
            VaeBlock("conv", "decoder.conv_in", lat, boc[-1], n - 1)]
    out += mid("decoder")
    rev = list(reversed(boc))
    prev = rev[0]
    for i in range(n):
        cout = rev[i]
        for j in range(lpb + 1):
            out.append(VaeBlock("resnet", f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else cout, cout,
                                n - 1 - i))
        if i < n - 1:
            out.append(VaeBlock("conv", f"decoder.up_blocks.{i}.upsamplers.0.conv", cout, cout, n - 2 - i))
        prev = cout
    out += [VaeBlock("norm", "decoder.conv_norm_out", boc[0], boc[0], 0),
            VaeBlock("conv", "decoder.conv_out", boc[0], cfg["out_channels"], 0)]
    return out
