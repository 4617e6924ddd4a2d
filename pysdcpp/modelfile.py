"""Check a model file before the native library sees it, and read what pysdcpp needs from its header.

The native loader aborts on some malformed inputs; everything it could trip on is caught here first
and reported as a `ModelLoadError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ModelLoadError


@dataclass
class TensorInfo:
    name: str
    type: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class ModelFile:
    path: Path
    format: str  # "gguf" | "safetensors" | "torch"
    tensors: list[TensorInfo]
    metadata: dict[str, object] = field(default_factory=dict)

    @property
    def family(self) -> str | None:
        from converters import keys

        value = self.metadata.get(keys.FAMILY)
        if value is None:
            names = {t.name: t for t in self.tensors}
            k = names.get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
            if k is not None:
                value = {768: "sd1", 1024: "sd2"}.get(int(k.shape[-1] if self.format != "gguf" else k.shape[0]))
        return value

    @property
    def prediction(self) -> str | None:
        from converters import keys

        return self.metadata.get(keys.PREDICTION)  # type: ignore[return-value]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _gguf_value(field_) -> object:
    from gguf import GGUFValueType

    if not field_.types:
        return None
    t = field_.types[0]
    if t == GGUFValueType.STRING:
        return bytes(field_.parts[field_.data[0]]).decode("utf-8", "replace")
    if t == GGUFValueType.ARRAY:
        # Whole arrays (readers such as converters.alter.read_alter need every entry); strings decoded.
        if len(field_.types) < 2 or not field_.data:
            return []
        if field_.types[-1] == GGUFValueType.STRING:
            return [bytes(field_.parts[i]).decode("utf-8", "replace") for i in field_.data]
        return [v for i in field_.data for v in field_.parts[i].tolist()]
    value = field_.parts[field_.data[0]]
    return value.tolist()[0] if isinstance(value, np.ndarray) else value


def read_gguf(path: Path) -> ModelFile:
    from gguf import GGUFReader

    size = path.stat().st_size
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # the reader raises several types on garbage; all mean the same here
        raise ModelLoadError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
    tensors = []
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ModelLoadError(f"{path}: truncated GGUF file: tensor {t.name} ends at byte {end}, "
                                 f"the file has {size}")
        tensors.append(TensorInfo(t.name, t.tensor_type.name, tuple(int(x) for x in t.shape), int(t.n_bytes)))
    if not tensors:
        raise ModelLoadError(f"{path}: the GGUF file holds no tensors")
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = _gguf_value(f)
        except Exception:
            meta[key] = "?"
    return ModelFile(path, "gguf", tensors, meta)


def read_model_file(path: str | os.PathLike) -> ModelFile:
    """Identify and check a model file (GGUF, safetensors or torch zip); raise ModelLoadError if it is unusable."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a folder; convert a diffusers folder first with `pysdcpp convert`")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"{path}: permission denied")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"GGUF":
        return read_gguf(path)
    from converters import ConversionError
    from converters.checkpoint_io import read_checkpoint_file

    fmt = "torch" if head[:2] == b"PK" else "safetensors"
    if fmt == "safetensors" and len(head) == 8:
        n = int.from_bytes(head, "little")
        if not 2 <= n <= min(path.stat().st_size, 100 << 20):
            raise ModelLoadError(f"{path}: not a model file (neither GGUF, safetensors nor a torch checkpoint)")
    try:
        sources = read_checkpoint_file(path)
    except ConversionError as e:
        raise ModelLoadError(str(e)) from None
    except Exception as e:
        raise ModelLoadError(f"{path}: not a model file ({type(e).__name__}: {e})") from None
    itemsize = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4}
    tensors = [TensorInfo(s.name, s.dtype, tuple(s.shape),
                          int(np.prod(s.shape, dtype=np.int64)) * itemsize.get(s.dtype, 1)) for s in sources]
    return ModelFile(path, fmt, tensors, {})
