"""LoRA files for stable-diffusion.cpp: diffusers/PEFT text-encoder tensors renamed to kohya's `lora_te*` names
(the pinned upstream matches none of `text_encoder.*` on the UNet families and logs them unused), everything else
kept; the tensor bytes copied as they are (any dtype, bf16 included), the file written atomically.

    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight
        -> lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight    (SDXL: lora_te1_, lora_te2_)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pysdcpp.format.checkpoint_io import safetensors_header

from .errors import ConversionError
from .renamed_copy import check_output, write_renamed

# PEFT/diffusers endings and kohya's (what stable-diffusion.cpp reads for a LoRA's down/up matrices and alpha)
_ENDINGS = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight",
            ".lora_A.default.weight": ".lora_down.weight", ".lora_B.default.weight": ".lora_up.weight",
            ".lora.down.weight": ".lora_down.weight", ".lora.up.weight": ".lora_up.weight",
            ".lora_down.weight": ".lora_down.weight", ".lora_up.weight": ".lora_up.weight", ".alpha": ".alpha"}
_TEXT_PREFIXES = ("text_encoder_2.", "text_encoder.")


@dataclass
class LoraReport:
    output: Path
    n_tensors: int
    renamed: dict[str, str] = field(default_factory=dict)   # old name -> kohya name

    def as_dict(self) -> dict:
        return {"output": str(self.output), "tensors": self.n_tensors, "renamed": len(self.renamed)}


def is_lora_file(path: str | os.PathLike) -> bool:
    """True for a safetensors file whose tensors are all adapter tensors (LoRA down/up/alpha, in any naming)."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    try:
        header, _ = safetensors_header(path)
    except (ConversionError, OSError):
        return False
    names = [k for k in header if k != "__metadata__"]
    return bool(names) and all(n.endswith(tuple(_ENDINGS)) for n in names)


def kohya_name(name: str, two_encoders: bool) -> str | None:
    """The kohya name of a diffusers/PEFT text-encoder LoRA tensor; None for any other tensor (kept as it is)."""
    for i, prefix in enumerate(_TEXT_PREFIXES):
        if name.startswith(prefix):
            for ending, new in _ENDINGS.items():
                if name.endswith(ending):
                    module = name[len(prefix):-len(ending)]
                    encoder = ("2" if i == 0 else "1") if two_encoders else ""
                    return f"lora_te{encoder}_{module.replace('.', '_')}{new}"
            return None
    return None


def convert_lora(input_path: str | os.PathLike, output_path: str | os.PathLike, *, overwrite: bool = False
                 ) -> LoraReport:
    """Write `input_path`'s LoRA with its text-encoder tensors in kohya's names to `output_path` (.safetensors)."""
    src, out = Path(input_path), Path(output_path)
    check_output(src, out, overwrite, "LoRA")
    if not is_lora_file(src):
        raise ConversionError(f"{src}: not a LoRA file (every tensor a lora_A/lora_B, lora_down/lora_up or alpha)")
    header, _ = safetensors_header(src)
    names = [k for k in header if k != "__metadata__"]
    two = any(n.startswith(_TEXT_PREFIXES[0]) for n in names)
    renamed = {n: k for n in names if (k := kohya_name(n, two)) is not None}
    n = write_renamed(src, out, renamed, {"pysdcpp.lora_renamed": str(len(renamed))})
    return LoraReport(out, n, renamed)
