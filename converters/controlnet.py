"""ControlNets in diffusers' names (ControlNetModel: the UNet encoder in diffusers names, controlnet_cond_embedding.*,
controlnet_down_blocks.*, controlnet_mid_block.*) written under the original cldm names stable-diffusion.cpp reads
(control_model.: time_embed, input_blocks, middle_block, input_hint_block, zero_convs, middle_block_out), every
tensor's bytes as they are.

    controlnet_cond_embedding.blocks.2.weight -> control_model.input_hint_block.6.weight
    controlnet_down_blocks.3.bias             -> control_model.zero_convs.3.0.bias
    down_blocks.1.attentions.0.proj_in.weight -> control_model.input_blocks.4.1.proj_in.weight
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pysdcpp.format.checkpoint_io import safetensors_header
from pysdcpp.format.families import UNET_CONFIGS

from .errors import ConversionError
from .renamed_copy import check_output, write_renamed
from .sd_layout import _split_prefix, _resnet, unet_name_map

PREFIX = "control_model."
MARKER = "controlnet_cond_embedding.conv_in.weight"   # what only a diffusers ControlNet holds
# the hint encoder: diffusers' convs and their index in cldm's input_hint_block (a Sequential with a SiLU after each
# conv but the last)
HINT_CONVS = {"conv_in": 0, **{f"blocks.{k}": 2 * k + 2 for k in range(6)}, "conv_out": 14}
# the cross-attention (context) width of the family's UNet, read off down_blocks.1's first cross-attention key
_CONTEXT_KEY = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class ControlNetReport:
    output: Path
    family: str
    n_tensors: int

    def as_dict(self) -> dict:
        return {"output": str(self.output), "family": self.family, "tensors": self.n_tensors}


def weights_file(path: str | os.PathLike) -> Path | None:
    """The safetensors file of a diffusers ControlNet (the file, or a folder holding diffusion_pytorch_model
    .safetensors), or None when `path` is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / _WEIGHTS
    if not path.is_file() or path.suffix != ".safetensors":
        return None
    try:
        header, _ = safetensors_header(path)
    except (ConversionError, OSError, ValueError):
        return None
    return path if MARKER in header else None


def _family(header: dict) -> str:
    entry = header.get(_CONTEXT_KEY)
    width = entry["shape"][1] if isinstance(entry, dict) and len(entry.get("shape", ())) == 2 else None
    for family, cfg in UNET_CONFIGS.items():
        if cfg["cross_attention_dim"] == width:
            return family
    raise ConversionError(f"a ControlNet whose cross-attention is {width} wide ({_CONTEXT_KEY}): not one of the "
                          "SD1.x (768), SD2.x (1024) or SDXL (2048) UNets")


def cldm_name(name: str, unet_names: dict[str, tuple[str, bool]]) -> str:
    """The cldm name (under control_model.) of one diffusers ControlNet tensor, or ConversionError."""
    base, _, leaf = name.rpartition(".")
    if base.startswith("controlnet_cond_embedding."):
        conv = base.removeprefix("controlnet_cond_embedding.")
        if conv in HINT_CONVS:
            return f"{PREFIX}input_hint_block.{HINT_CONVS[conv]}.{leaf}"
    elif base.startswith("controlnet_down_blocks."):
        index = base.removeprefix("controlnet_down_blocks.")
        if index.isdigit():
            return f"{PREFIX}zero_convs.{index}.0.{leaf}"
    elif base == "controlnet_mid_block":
        return f"{PREFIX}middle_block_out.0.{leaf}"
    else:
        for prefix in _split_prefix(name):
            if prefix in unet_names:
                ldm, is_resnet = unet_names[prefix]
                rest = name[len(prefix) + 1:]
                return f"{PREFIX}{ldm}.{_resnet(rest) if is_resnet else rest}"
    raise ConversionError(f"unexpected ControlNet tensor {name!r}")


def convert_controlnet(input_path: str | os.PathLike, output_path: str | os.PathLike, *, overwrite: bool = False
                       ) -> ControlNetReport:
    """Write the diffusers ControlNet at `input_path` (file or folder) to `output_path` in cldm names."""
    src, out = Path(input_path), Path(output_path)
    check_output(src, out, overwrite, "ControlNet")
    weights = weights_file(src)
    if weights is None:
        raise ConversionError(f"{src}: not a diffusers ControlNet ({MARKER} missing)")
    header, _ = safetensors_header(weights)
    family = _family(header)
    unet_names = unet_name_map(UNET_CONFIGS[family])
    renamed = {n: cldm_name(n, unet_names) for n in header if n != "__metadata__"}
    n = write_renamed(weights, out, renamed, {"pysdcpp.controlnet_from": "diffusers", "pysdcpp.family": family})
    return ControlNetReport(out, family, n)
