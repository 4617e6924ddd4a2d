"""Check a model file before the native library sees it, and read what pysdcpp needs from its header.

The native loader aborts on some malformed inputs; everything it could trip on is caught here first
and reported as a `ModelLoadError`.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ModelLoadError
from .format.checkpoint_io import checkpoint_format, read_checkpoint_file
from .format.errors import FormatError
from .format import keys
from .format.detect import UnetArchitecture, architecture_of_tensors, tensor_shape
from .format.families import variant_unet_config
from .format.names import FAMILIES, TAE_PREFIX, TEXT2_PREFIX, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX


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

    @functools.cached_property
    def architecture(self) -> UnetArchitecture | None:
        """The UNet's family and variant, read from its tensors (None: no UNet of the SD family stable-diffusion.cpp
        builds)."""
        tensors = [(t.name, tensor_shape(t.shape, self.format == "gguf")) for t in self.tensors
                   if t.name.startswith(UNET_PREFIX)]
        try:
            return architecture_of_tensors(tensors, str(self.path))
        except FormatError:
            return None

    @property
    def family(self) -> str | None:
        value = self.metadata.get(keys.FAMILY)
        if value is None and self.architecture is not None:
            value = self.architecture.family
        return value

    @property
    def variant(self) -> str | None:
        value = self.metadata.get(keys.VARIANT)
        if value is None and self.architecture is not None:
            value = self.architecture.variant
        return value if value is not None or self.metadata.get(keys.FAMILY) is None else "base"

    @property
    def unet_layout(self) -> dict | None:
        """The UNet's diffusers config: read from its tensors, else (a file that leaves units out) the published
        layout of the family and variant its metadata names; None when neither is known."""
        leaves_out = bool(self.metadata.get(keys.ALTER_DROPPED_UNITS))   # its tensors no longer show the layout
        if self.architecture is not None and not leaves_out:
            return self.architecture.config
        if self.family in FAMILIES:
            try:
                return variant_unet_config(self.family, self.variant or "base")
            except FormatError:
                return None
        return None

    @property
    def few_step(self) -> str | None:
        """The few-step kind the file records (sampling.FEW_STEP_KINDS: turbo, lcm), None for a usual model."""
        return self.metadata.get(keys.FEW_STEP)  # type: ignore[return-value]

    @property
    def prediction(self) -> str | None:
        return self.metadata.get(keys.PREDICTION)  # type: ignore[return-value]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


# ---- GGUF: every check ggml's gguf_init_from_file makes, and the data section inside the file ----------------
# The native loader reads GGUF headers with ggml's reader; what that rejects goes to stable-diffusion.cpp's
# fallback reader, which aborts the process on some inputs (an absurd name length), and ggml itself aborts or
# divides by zero on others (a non-u32 general.alignment, an empty key, a dimension of 0). So a file reaches the
# native library only when ggml's reader would accept it, and when its tensor data lies inside the file.

_GGUF_VERSIONS = (2, 3)
_GGUF_MAX_STRING = 1 << 30          # ggml's GGUF_MAX_STRING_LENGTH
_GGUF_MAX_ARRAY = 1 << 30           # ggml's GGUF_MAX_ARRAY_ELEMENTS
_GGML_MAX_NAME = 128                # both libraries are built with -DGGML_MAX_NAME=128 (names up to 127 bytes)
_GGML_MAX_DIMS = 4
_GGML_TYPE_COUNT = 41               # GGML_TYPE_COUNT of the ggml both libraries are built with
_INT64_MAX = (1 << 63) - 1
# GGUF value types: id -> (struct format, bytes) for the fixed-size ones; 8 is a string, 9 an array
_GGUF_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
                 6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_UINT32 = 8, 9, 4
_MIN_KV_BYTES = 8 + 1 + 4 + 1       # key length, a 1-byte key, type, the smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8   # name length (empty name), n_dims 0, type, offset


@functools.lru_cache(maxsize=None)
def _ggml_types() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, block size, bytes per block), for the types the native ggml knows."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return {int(t): (GGMLQuantizationType(t).name, int(blck), int(size))
            for t, (blck, size) in GGML_QUANT_SIZES.items() if int(t) < _GGML_TYPE_COUNT and blck > 0}


class _GGUFParser:
    """Reads a GGUF header field by field, never past the end of the file, never trusting a count or a length."""

    def __init__(self, f, path: Path, size: int):
        self.f, self.path, self.size, self.pos = f, path, size, 0

    def fail(self, what: str):
        raise ModelLoadError(f"{self.path}: corrupt GGUF file: {what}")

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise ModelLoadError(f"{self.path}: truncated GGUF file: {what} at byte {self.pos} needs {n} bytes, "
                                 f"the file has {self.size}")
        data = self.f.read(n)
        if len(data) != n:
            raise ModelLoadError(f"{self.path}: truncated GGUF file: could not read {what} at byte {self.pos}")
        self.pos += n
        return data

    def unpack(self, fmt: str, n: int, what: str):
        return struct.unpack(fmt, self.take(n, what))[0]

    def string(self, what: str) -> bytes:
        n = self.unpack("<Q", 8, f"the length of {what}")
        if n > _GGUF_MAX_STRING:
            self.fail(f"{what} claims a length of {n} bytes (at most {_GGUF_MAX_STRING})")
        if n > self.size - self.pos:
            raise ModelLoadError(f"{self.path}: truncated GGUF file: {what} at byte {self.pos} claims {n} bytes, "
                                 f"the file has {self.size - self.pos} left")
        return self.take(n, what)

    def value(self, vtype: int, what: str):
        if vtype == _GGUF_STRING:
            return self.string(what).decode("utf-8", "replace")
        fmt, n = _GGUF_SCALARS[vtype]
        return self.unpack(fmt, n, what)

    def kv(self, i: int, n_kv: int, seen: set) -> tuple[str, object]:
        raw = self.string(f"the key of metadata entry {i} of {n_kv}")
        key = raw.decode("utf-8", "replace")
        if not raw:
            self.fail(f"metadata entry {i} of {n_kv} has an empty key")
        if raw in seen:
            self.fail(f"metadata key {key!r} appears twice")
        seen.add(raw)
        vtype = self.unpack("<I", 4, f"the type of metadata {key!r}")
        if vtype == _GGUF_ARRAY:
            etype = self.unpack("<I", 4, f"the element type of metadata {key!r}")
            n = self.unpack("<Q", 8, f"the length of metadata {key!r}")
            if etype not in _GGUF_SCALARS and etype != _GGUF_STRING:
                self.fail(f"metadata {key!r} is an array of unknown type {etype}" if etype != _GGUF_ARRAY
                          else f"metadata {key!r} is an array of arrays (not allowed in GGUF)")
            least = 8 if etype == _GGUF_STRING else _GGUF_SCALARS[etype][1]
            if n > _GGUF_MAX_ARRAY or n * least > self.size - self.pos:
                self.fail(f"metadata {key!r} claims {n} array entries; the {self.size - self.pos} bytes left in "
                          f"the file hold at most {(self.size - self.pos) // least}")
            if etype == _GGUF_STRING:
                value = [self.value(etype, f"entry {j} of metadata {key!r}") for j in range(n)]
            else:
                fmt, size = _GGUF_SCALARS[etype]
                value = np.frombuffer(self.take(n * size, f"metadata {key!r}"), dtype=fmt).tolist()
        elif vtype in _GGUF_SCALARS or vtype == _GGUF_STRING:
            value = self.value(vtype, f"metadata {key!r}")
        else:
            self.fail(f"metadata {key!r} has unknown value type {vtype}")
        if key == "general.alignment":
            if vtype != _GGUF_UINT32:
                self.fail("general.alignment must be a single uint32")   # ggml aborts on anything else
            if value == 0 or value & (value - 1):
                self.fail(f"general.alignment {value} is not a power of 2")
        return key, value

    def tensor_info(self, i: int, n_tensors: int, types: dict, seen: set) -> tuple[str, int, tuple, int, int]:
        raw = self.string(f"the name of tensor {i} of {n_tensors}")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"the name of tensor {i} of {n_tensors} is not UTF-8 text")
        if len(raw) >= _GGML_MAX_NAME:
            self.fail(f"tensor name {name[:80]!r}... is {len(raw)} bytes long (at most {_GGML_MAX_NAME - 1})")
        if raw in seen:
            self.fail(f"tensor {name} appears twice")
        seen.add(raw)
        n_dims = self.unpack("<I", 4, f"the dimension count of tensor {name}")
        if n_dims > _GGML_MAX_DIMS:
            self.fail(f"tensor {name} has {n_dims} dimensions (at most {_GGML_MAX_DIMS})")
        shape = tuple(self.unpack("<q", 8, f"the shape of tensor {name}") for _ in range(n_dims))
        if any(d <= 0 for d in shape):
            self.fail(f"tensor {name} has shape {list(shape)}: every dimension must be at least 1")
        n_elements = 1
        for d in shape:
            n_elements *= d
        if n_elements > _INT64_MAX:
            self.fail(f"tensor {name} has shape {list(shape)}: {n_elements} elements overflow 64 bits")
        ggml_type = self.unpack("<I", 4, f"the type of tensor {name}")
        if ggml_type not in types:
            self.fail(f"tensor {name} has unknown ggml type {ggml_type}")
        type_name, blck, type_size = types[ggml_type]
        if shape and shape[0] % blck:
            self.fail(f"tensor {name} of type {type_name} has rows of {shape[0]} elements, not a multiple of its "
                      f"block size {blck}")
        offset = self.unpack("<Q", 8, f"the data offset of tensor {name}")
        return name, ggml_type, shape, offset, n_elements // blck * type_size


def read_gguf(path: Path) -> ModelFile:
    """Check a GGUF file as ggml's reader does (and its tensor data against the file's size); read its header."""
    from gguf import GGMLQuantizationType

    size = path.stat().st_size
    types = _ggml_types()
    with open(path, "rb") as f:
        p = _GGUFParser(f, path, size)
        if p.take(4, "the magic") != b"GGUF":
            p.fail("no GGUF magic")
        version = p.unpack("<I", 4, "the version")
        if version not in _GGUF_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            hint = (" (a big-endian file? only little-endian GGUF is supported)" if swapped in _GGUF_VERSIONS
                    else "")
            p.fail(f"GGUF version {version}{hint}; supported versions are 2 and 3")
        n_tensors = p.unpack("<q", 8, "the tensor count")
        n_kv = p.unpack("<q", 8, "the metadata count")
        left = size - p.pos
        if not 0 <= n_tensors <= left // _MIN_TENSOR_INFO_BYTES:
            p.fail(f"the header claims {n_tensors} tensors; a file of {size} bytes has room for at most "
                   f"{left // _MIN_TENSOR_INFO_BYTES}")
        if not 0 <= n_kv <= left // _MIN_KV_BYTES:
            p.fail(f"the header claims {n_kv} metadata entries; a file of {size} bytes has room for at most "
                   f"{left // _MIN_KV_BYTES}")
        meta: dict[str, object] = {}
        seen: set = set()
        for i in range(n_kv):
            key, value = p.kv(i, n_kv, seen)
            meta[key] = value
        alignment = int(meta.get("general.alignment", 32))
        seen = set()
        infos = [p.tensor_info(i, n_tensors, types, seen) for i in range(n_tensors)]
    data_start = -(-p.pos // alignment) * alignment
    tensors = []
    expected = 0
    for name, ggml_type, shape, offset, nbytes in infos:
        end = data_start + offset + nbytes
        if end > size:
            raise ModelLoadError(f"{path}: truncated or corrupt GGUF file: the data of tensor {name} ends at byte "
                                 f"{end}, past the end of the file ({size} bytes)")
        if offset != expected:   # ggml requires the data of each tensor to follow the last one's, aligned
            raise ModelLoadError(f"{path}: corrupt GGUF file: tensor {name} has data offset {offset}, expected "
                                 f"{expected} (tensor data must be contiguous, in header order)")
        expected += -(-nbytes // alignment) * alignment
        tensors.append(TensorInfo(name, GGMLQuantizationType(ggml_type).name, shape, nbytes))
    if not tensors:
        raise ModelLoadError(f"{path}: the GGUF file holds no tensors")
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
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: empty file")
    fmt = checkpoint_format(path)
    if fmt == "gguf":
        return read_gguf(path)
    if fmt not in ("safetensors", "torch"):
        raise ModelLoadError(f"{path}: not a model file (neither GGUF, safetensors nor a torch checkpoint)")
    try:
        sources = read_checkpoint_file(path)
    except FormatError as e:
        raise ModelLoadError(str(e)) from None
    except Exception as e:
        raise ModelLoadError(f"{path}: not a model file ({type(e).__name__}: {e})") from None
    if not sources:
        raise ModelLoadError(f"{path}: the {fmt} file holds no tensors")
    tensors = [TensorInfo(s.name, s.dtype, tuple(s.shape), s.nbytes) for s in sources]
    return ModelFile(path, fmt, tensors, {})


def read_tiny_autoencoder(path: str | os.PathLike) -> ModelFile:
    """A TAESD file for `taesd=` (diffusers' AutoencoderTiny names, bare or under TAE_PREFIX as in our GGUFs), or
    ModelLoadError: stable-diffusion.cpp would only warn and decode with the full VAE."""
    mf = read_model_file(path)
    names = [t.name[len(TAE_PREFIX):] if t.name.startswith(TAE_PREFIX) else t.name for t in mf.tensors]
    if not any(n.startswith("decoder.layers.") for n in names):
        raise ModelLoadError(f"{mf.path}: not a tiny autoencoder (TAESD; diffusers' AutoencoderTiny): no "
                             "decoder.layers.* tensors")
    return mf


def read_control_net(path: str | os.PathLike) -> ModelFile:
    """A ControlNet file for `control_net=` (the original cldm names, with or without `control_model.`), or
    ModelLoadError before anything loads."""
    mf = read_model_file(path)
    names = [t.name.removeprefix("control_model.") for t in mf.tensors]
    if not any(n.startswith("input_hint_block.") for n in names) or not any(n.startswith("zero_convs.")
                                                                          for n in names):
        raise ModelLoadError(f"{mf.path}: not a ControlNet in the original names (input_hint_block.*, zero_convs.*; "
                             "stable-diffusion.cpp reads those)")
    return mf


# Where the tensors of the other components live: a separate UNet file holding one of these is a whole model.
_OTHER_COMPONENTS = (VAE_PREFIX, TAE_PREFIX, TEXT_PREFIX, TEXT2_PREFIX, "cond_stage_model.", "conditioner.")


def with_unet(model: ModelFile, unet: ModelFile) -> ModelFile:
    """`model` as stable-diffusion.cpp loads it with `unet` as its diffusion model (sd-cli's --diffusion-model):
    each tensor of `unet`, under model.diffusion_model. (added where its name lacks it, as upstream adds it),
    replaces the model's tensor of that name or joins them. What describes the UNet (family, variant, few-step
    kind, prediction, ALTER routing) comes from the UNet file alone; its family and variant are read from the
    merged tensors where it does not name them."""
    for f in (model, unet):
        if f.format != "gguf":
            raise ModelLoadError(f"{f.path}: a separate UNet and its model must be GGUF files (`pysdcpp convert` "
                                 "writes them)")
    other = next((t.name for t in unet.tensors if t.name.startswith(_OTHER_COMPONENTS)), None)
    if other is not None:
        raise ModelLoadError(f"{unet.path}: holds {other}, which is not a UNet tensor; a separate UNet file holds "
                             "the UNet only (pass a whole model as the model)")
    replacing = {}
    for t in unet.tensors:
        name = t.name if t.name.startswith(UNET_PREFIX) else UNET_PREFIX + t.name
        replacing[name] = TensorInfo(name, t.type, t.shape, t.nbytes)
    tensors = [replacing.pop(t.name, t) for t in model.tensors] + list(replacing.values())
    metadata = {k: v for k, v in model.metadata.items() if not keys.describes_unet(k)}
    metadata.update({k: v for k, v in unet.metadata.items() if keys.describes_unet(k)})
    return ModelFile(model.path, model.format, tensors, metadata)
