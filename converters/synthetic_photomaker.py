"""A deterministic random-weight PhotoMaker (v1) file in the layout stable-diffusion.cpp reads, for the tests: the
whole ID encoder (CLIP ViT-L/14's vision tower and the fuse MLPs, 303 M parameters; 654 MB, F16 with the norms and
embeddings F32) and a UNet LoRA on a few SDXL attentions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pysdcpp.format.families import UNET_CONFIGS
from pysdcpp.format.photomaker import id_encoder_shapes, lora_names

from .synthetic import random_weight

LORA_RANK = 4
# SDXL attentions the fixture's LoRA covers (diffusers' module paths), one per level kind: every projection of
# self- and cross-attention. The widths come from the UNet config (level 1: 640, the middle and level 2: 1280).
LORA_ATTENTIONS = (("down_blocks.1.attentions.0.transformer_blocks.0", 1),
                   ("mid_block.attentions.0.transformer_blocks.0", 2),
                   ("up_blocks.1.attentions.2.transformer_blocks.1", 1))


def photomaker_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """name -> F16 array: the ID encoder (norms and embeddings F32, as the library keeps them) and the LoRA."""
    out = {}
    for name, shape in id_encoder_shapes().items():
        w = random_weight(f"pmid.{name}", shape, seed)
        out[name] = w if w.ndim == 1 or "position_embedding" in name else w.astype(np.float16)
    cfg = UNET_CONFIGS["sdxl"]
    context = cfg["cross_attention_dim"]
    for module, level in LORA_ATTENTIONS:
        width = cfg["block_out_channels"][level]
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out"):
                cin = context if attn == "attn2" and proj in ("to_k", "to_v") else width
                down, up = lora_names(f"{module}.{attn}", proj)
                out[down] = random_weight(down, (LORA_RANK, cin), seed).astype(np.float16)
                out[up] = random_weight(up, (width, LORA_RANK), seed).astype(np.float16)
    return out


def write_photomaker(path: Path, seed: int = 0) -> Path:
    """photomaker_tensors as a safetensors file (what sd-cli's --photo-maker and `photo_maker=` load)."""
    from safetensors.numpy import save_file

    save_file(photomaker_tensors(seed), str(path))
    return Path(path)
