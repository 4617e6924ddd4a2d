"""LoRAs of a generation: `loras=` pairs and the prompt's `<lora:name:weight>` tags (sd-cli's syntax: a name is a
path, absolute or in the LoRA folder, with or without .safetensors/.gguf/.pt), checked before any load, and
handed to the library as `sd_lora_t`. stable-diffusion.cpp reads kohya (`lora_unet_...lora_down/up`, `.alpha`)
and diffusers/PEFT (`unet....lora_A/lora_B`) files as they are, except PEFT's text-encoder tensors, which
`pysdcpp convert` renames (converters/lora.py).

Apply modes (the context's `lora_apply_mode`, upstream's): "immediately" adds each LoRA into the weights before
sampling (and removes it later by adding it again with the opposite weight, which F16 rounding makes inexact);
"at_runtime" computes it beside the layers every evaluation (exact, slower); "auto" is immediately unless the
model has quantized weights.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

APPLY_MODES = ("auto", "immediately", "at_runtime")
_log = logging.getLogger("pysdcpp.lora")
EXTENSIONS = (".gguf", ".safetensors", ".pt")
_TAG = re.compile(r"<lora:([^:>]+):([^>]+)>")
_FLOAT_PREFIX = re.compile(r"\s*[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan)", re.IGNORECASE)


def _stof(text: str) -> float | None:
    """The number at the start of `text` as C's strtof reads it (what sd-cli's std::stof takes), else None."""
    m = _FLOAT_PREFIX.match(text)
    return float(m.group(0)) if m else None


def _resolve(name: str, folder: Path) -> Path | None:
    path = Path(name) if os.path.isabs(name) else folder / name
    if path.exists():
        return path
    for ext in EXTENSIONS:
        candidate = Path(str(path) + ext)
        if candidate.exists():
            return candidate
    return None


# How the tensors of the adapters stable-diffusion.cpp reads end (LoRA in kohya's and PEFT's names, LoHa, LoKr, full
# differences)
_LORA_ENDINGS = ("lora_down.weight", "lora_up.weight", "lora.down.weight", "lora.up.weight", "lora_A.weight",
                 "lora_B.weight", "lora_A.default.weight", "lora_B.default.weight", ".hada_w1_a", ".hada_w2_a",
                 ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w2_a", ".diff")


def check_lora_file(path: Path) -> None:
    """A readable file of LoRA tensors, or an error: stable-diffusion.cpp only logs a file it cannot read and
    generates without it."""
    from .errors import ModelLoadError
    from .modelfile import read_model_file

    try:
        mf = read_model_file(path)
    except ModelLoadError as e:
        raise ValueError(f"LoRA {e}") from None
    if not any(t.name.endswith(_LORA_ENDINGS) for t in mf.tensors):
        raise ValueError(f"LoRA {path}: no LoRA tensors in it (lora_down/lora_up, lora_A/lora_B, LoHa, LoKr)")
    peft_text = sum(1 for t in mf.tensors if t.name.startswith(("text_encoder.", "text_encoder_2.")))
    if peft_text:
        # stable-diffusion.cpp turns a UNet model's LoRA names' underscores into dots, "text_encoder." included,
        # and then matches no layer: it logs each tensor as unused.
        _log.warning("LoRA %s: stable-diffusion.cpp leaves out its %d text-encoder tensors in diffusers/PEFT "
                     "names (text_encoder.*); only the UNet's apply (`pysdcpp convert %s -o OUT.safetensors` renames "
                     "them to kohya's lora_te_*, which apply)", path, peft_text, path)


def prompt_loras(prompt: str, folder: str | os.PathLike | None) -> tuple[str, dict[str, float]]:
    """(the prompt without its <lora:...> tags, {normalised path: summed weight}), as sd-cli reads them; a tag whose
    file is not there (sd-cli only warns) or whose weight is not a number is an error."""
    folder = Path(folder) if folder is not None else Path.cwd()
    found: dict[str, float] = {}
    for m in _TAG.finditer(prompt):
        name, raw = m.group(1), m.group(2)
        weight = _stof(raw)
        if weight is None:
            raise ValueError(f"{m.group(0)}: the weight {raw!r} is not a number")
        if name.startswith("|high_noise|"):
            raise ValueError(f"{m.group(0)}: high-noise LoRAs are for video models, not these")
        path = _resolve(name, folder)
        if path is None:
            raise ValueError(f"{m.group(0)}: no LoRA file {name!r} in {folder} (with or without "
                             f"{', '.join(EXTENSIONS)})")
        check_lora_file(path)
        key = os.path.normpath(str(path))
        found[key] = found.get(key, 0.0) + weight
    return _TAG.sub("", prompt), found


def explicit_loras(loras) -> tuple[tuple[str, float], ...]:
    """`loras=` as ((normalised path, weight), ...) sorted by path: a dict {path: weight}, (path, weight) pairs or
    bare paths (weight 1); every file must exist and every weight be finite."""
    found: dict[str, float] = {}
    items = loras.items() if isinstance(loras, dict) else (loras or ())
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            item = (item, 1.0)
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"a LoRA is a (path, weight) pair, not {item!r}")
        path, weight = item
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating)) or not np.isfinite(weight):
            raise ValueError(f"LoRA {path}: the weight must be a finite number, got {weight!r}")
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"LoRA {path}: no such file")
        check_lora_file(p)
        key = os.path.normpath(str(p))
        found[key] = found.get(key, 0.0) + float(weight)
    return tuple(sorted(found.items()))


def checked_loras(loras, prompt: str, folder) -> tuple[str, tuple[tuple[str, float], ...], tuple]:
    """(the prompt without its tags, every LoRA the generation applies as sorted (path, weight) pairs, the explicit
    ones alone): `loras=` and the prompt's tags together, a file named twice with its weights summed."""
    prompt, found = prompt_loras(prompt, folder)
    explicit = explicit_loras(loras)
    for key, weight in explicit:
        found[key] = found.get(key, 0.0) + weight
    return prompt, tuple(sorted(found.items())), explicit


def fill(ffi, g, loras: tuple[tuple[str, float], ...], keep: list) -> None:
    """Point sd_img_gen_params_t `g` at these LoRAs; `keep` holds the C memory alive."""
    if not loras:
        return
    arr = ffi.new("sd_lora_t[]", len(loras))
    for i, (path, weight) in enumerate(loras):
        s = ffi.new("char[]", path.encode("utf-8"))
        keep.append(s)
        arr[i].path, arr[i].multiplier, arr[i].is_high_noise = s, float(weight), False
    keep.append(arr)
    g.loras, g.lora_count = arr, len(loras)
