"""A safetensors file written again under new tensor names: the header rewritten, every tensor's bytes copied as
they are (any dtype), the output appearing only when complete (written under a temporary name, then renamed)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from pysdcpp.format.checkpoint_io import safetensors_header

from .errors import ConversionError


def check_output(src: Path, out: Path, overwrite: bool, what: str) -> None:
    """The checks before writing `what` (a LoRA, a ControlNet) from `src` to `out`: never over the input or an
    existing file (without `overwrite`), into an existing folder, as .safetensors."""
    if not src.exists():
        raise ConversionError(f"{src}: no such file")
    if out.suffix != ".safetensors":
        raise ConversionError(f"a {what} converts to a .safetensors file, not {out.name}")
    if out.exists() and out.resolve() == src.resolve():
        raise ConversionError(f"the output path is the input {what}; refusing to overwrite it")
    if not out.parent.is_dir():
        raise ConversionError(f"{out.parent}: output folder does not exist")
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")


def write_renamed(src: Path, out: Path, renamed: dict[str, str], metadata: dict[str, str]) -> int:
    """Copy safetensors file `src` to `out` with tensor `old` named `renamed[old]` (others keep their names) and
    `metadata` added to its __metadata__; returns the number of tensors."""
    header, start = safetensors_header(src)
    names = [k for k in header if k != "__metadata__"]
    final = [renamed.get(n, n) for n in names]
    if len(set(final)) != len(final):
        raise ConversionError(f"{src}: renaming would give two tensors one name")
    new_header = {renamed.get(k, k): v for k, v in header.items()}
    meta = dict(new_header.get("__metadata__") or {})
    meta.update(metadata)
    new_header["__metadata__"] = meta
    blob = json.dumps(new_header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)   # the data stays 8-byte aligned, as safetensors writers keep it
    tmp = out.with_name(f".{out.name}.partial")
    try:
        with open(src, "rb") as f, open(tmp, "wb") as g:
            g.write(struct.pack("<Q", len(blob)))
            g.write(blob)
            f.seek(start)
            while chunk := f.read(16 << 20):
                g.write(chunk)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return len(names)
