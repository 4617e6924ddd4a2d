"""Read tensors from checkpoint files without torch: safetensors (memory-mapped) and torch zip pickles.

Every reader yields `TensorSource`s that load their data only when asked, so a converter can stream
a model tensor by tensor.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import FormatError


@dataclass
class TensorSource:
    """One tensor of a checkpoint: its name, shape and dtype, and a loader for its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "F32", "F16", "BF16", "F64", "I64", ...
    load: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(_ST_DTYPES.get(self.dtype, np.uint8)).itemsize

    def renamed(self, name: str, reshape: tuple[int, ...] | None = None) -> "TensorSource":
        if reshape is None:
            return TensorSource(name, self.shape, self.dtype, self.load)
        load = self.load
        return TensorSource(name, reshape, self.dtype, lambda: load().reshape(reshape))


_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _as_float(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return bf16_to_f32(array)
    return array


_ST_MAX_HEADER = 100 << 20   # the safetensors library's own limit on the JSON header


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise _DuplicateKey(dup)
    return dict(pairs)


def _is_dims(value) -> bool:
    """A shape or stride as checkpoints store it: a list or tuple of non-negative 64-bit integers."""
    return isinstance(value, (list, tuple)) and all(type(d) is int and 0 <= d < 1 << 63 for d in value)


def _n_elements(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(the JSON header, where the data starts) of a safetensors file, checked to be a JSON object."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n < 2:
            raise FormatError(f"{path}: not a safetensors file (header length {n})")
        if n > size - 8:
            raise FormatError(f"{path}: truncated or not a safetensors file: the header length is {n} bytes, "
                              f"the file has {size - 8} after it")
        if n > _ST_MAX_HEADER:
            raise FormatError(f"{path}: not a safetensors file (a {n}-byte header; at most {_ST_MAX_HEADER})")
        raw = f.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise FormatError(f"{path}: corrupt safetensors header: {e.args[0]!r} appears twice") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    except RecursionError:
        raise FormatError(f"{path}: not a safetensors file (header is JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: not a safetensors file (the header is a JSON {type(header).__name__}, "
                          "not an object)")
    return header, 8 + n


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string entries of a safetensors file's __metadata__ (e.g. Stability's modelspec.* fields); {} if none."""
    header, _ = safetensors_header(Path(path))
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        return {}
    return {str(k): v for k, v in meta.items() if isinstance(v, str)}


def read_safetensors(path: str | os.PathLike) -> list[TensorSource]:
    """The tensors of a safetensors file, after checking its header: a JSON object whose every entry has a known
    dtype, a shape and data_offsets that match it, inside the file and overlapping no other tensor's."""
    path = Path(path)
    size = path.stat().st_size
    header, base = safetensors_header(path)
    out = []
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise FormatError(f"{where}: its header entry is not an object with dtype, shape and data_offsets")
        dtype = info.get("dtype")
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise FormatError(f"{where} has unsupported dtype {dtype!r:.40}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not _is_dims(shape):
            raise FormatError(f"{where}: shape {shape!r:.80} is not a list of non-negative integers")
        shape = tuple(shape)
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and _is_dims(offsets) and offsets[0] <= offsets[1]):
            raise FormatError(f"{where}: data_offsets {offsets!r:.80} is not [start, end] with 0 <= start <= end")
        start, end = offsets
        np_dtype = np.dtype(_ST_DTYPES[dtype])
        if base + end > size:
            raise FormatError(f"{where} lies outside the file: its data ends at byte {base + end}, the file has "
                              f"{size} (truncated or corrupt)")
        nbytes = _n_elements(shape) * np_dtype.itemsize
        if end - start != nbytes:
            raise FormatError(f"{where}: {dtype} of shape {list(shape)} is {nbytes} bytes, its data_offsets "
                              f"[{start}, {end}] hold {end - start}")
        if nbytes:
            spans.append((start, end, name))

        # Plain reads, not a memory map: streamed tensors do not stay resident after use.
        def load(start=start, end=end, np_dtype=np_dtype, shape=shape, dtype=dtype, name=name):
            buf = bytearray(end - start)
            with open(path, "rb") as f:
                f.seek(base + start)
                if f.readinto(buf) != len(buf):
                    raise FormatError(f"{path}: file ended early reading {name}")
            return _as_float(np.frombuffer(buf, dtype=np_dtype).reshape(shape), dtype)

        out.append(TensorSource(name, shape, dtype, load))
    spans.sort()
    for (_, a_end, a), (b_start, _, b) in zip(spans, spans[1:]):
        if b_start < a_end:
            raise FormatError(f"{path}: corrupt safetensors header: the data of tensors {a!r} and {b!r} overlap")
    return out


# ---- torch zip pickles -------------------------------------------------------------------------

_TORCH_STORAGES = {
    "FloatStorage": ("F32", np.float32), "HalfStorage": ("F16", np.float16),
    "BFloat16Storage": ("BF16", np.uint16), "DoubleStorage": ("F64", np.float64),
    "LongStorage": ("I64", np.int64), "IntStorage": ("I32", np.int32), "ShortStorage": ("I16", np.int16),
    "CharStorage": ("I8", np.int8), "ByteStorage": ("U8", np.uint8), "BoolStorage": ("BOOL", np.bool_),
}
_TORCH_DTYPE_NAMES = {"float32": "FloatStorage", "float": "FloatStorage", "float16": "HalfStorage",
                      "half": "HalfStorage", "bfloat16": "BFloat16Storage", "float64": "DoubleStorage",
                      "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage",
                      "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage"}


@dataclass
class _StorageRef:
    kind: str
    key: str


@dataclass
class LazyTorchTensor:
    """What the restricted unpickler rebuilds in place of a torch tensor."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _StorageType:
    def __init__(self, kind: str):
        self.kind = kind


class _DType:
    def __init__(self, name: str):
        self.name = name


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asks for something the restricted unpickler does not build (a global, a storage, a tensor)."""


def _rebuild_tensor(storage, storage_offset, size, stride, *_args):
    if not isinstance(storage, _StorageRef):
        raise RefusedPickle(f"a tensor without a storage (found {type(storage).__name__})")
    if (not _is_dims(size) or not _is_dims(stride) or len(size) != len(stride) or type(storage_offset) is not int
            or storage_offset < 0):
        raise RefusedPickle(f"a tensor with an invalid shape {size!r:.60}, stride {stride!r:.60} or "
                            f"offset {storage_offset!r:.20}")
    return LazyTorchTensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *_args):
    return data


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors, containers and plain values; refuses every other global, so no code can run."""

    _ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("builtins", "set"): set,
        ("builtins", "dict"): dict,
        ("builtins", "list"): list,
        ("builtins", "tuple"): tuple,
        ("builtins", "slice"): slice,
    }

    def __init__(self, file, zf: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.zf = zf
        self.prefix = prefix

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _TORCH_STORAGES:
            return _StorageType(name)
        if module == "torch" and name in _TORCH_DTYPE_NAMES:
            return _DType(name)
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return lambda func, _type, args, _state: func(*args)
        if module == "torch" and name == "Tensor":
            return object
        if module == "pytorch_lightning.callbacks.model_checkpoint" or module.startswith("numpy"):
            # Training bookkeeping in some LDM checkpoints: never needed for weights.
            return lambda *a, **k: None
        raise RefusedPickle(f"refusing to load global {module}.{name}: the checkpoint holds more than "
                            "tensors, and loading it could run arbitrary code")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise RefusedPickle(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, _numel = pid
        if isinstance(storage_type, _DType):
            kind = _TORCH_DTYPE_NAMES[storage_type.name]
        elif isinstance(storage_type, _StorageType):
            kind = storage_type.kind
        else:
            raise RefusedPickle(f"unsupported storage type {storage_type!r}")
        return _StorageRef(kind, str(key))


def load_torch_pickle(path: str | os.PathLike):
    """Unpickle a torch zip checkpoint into plain containers whose tensors are `LazyTorchTensor`s."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic[:1] == b"\x80":
            raise FormatError(f"{path}: legacy (pre-1.6, non-zip) torch pickle; re-save it with a current torch "
                              "or convert it to safetensors first")
        raise FormatError(f"{path}: not a torch checkpoint (not a zip archive)")
    try:
        zf = zipfile.ZipFile(path)
        names = zf.namelist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        raise FormatError(f"{path}: corrupt zip archive ({e})") from None
    try:
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise FormatError(f"{path}: zip archive without data.pkl: not a torch checkpoint")
        # The native loader reads every member whose name contains data.pkl: one, or which one is the checkpoint?
        pickles = [n for n in names if "data.pkl" in n]
        if len(pickles) > 1:
            raise FormatError(f"{path}: the archive holds {len(pickles)} pickles ({', '.join(pickles[:3])}): not a "
                              "torch checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names:
            try:
                order = zf.read(f"{prefix}byteorder").strip()
            except Exception as e:
                raise FormatError(f"{path}: corrupt zip archive ({type(e).__name__}: {e})") from None
            if order != b"little":
                raise FormatError(f"{path}: a {order[:10].decode('ascii', 'replace')!r}-endian torch checkpoint; "
                                  "only little-endian ones are supported")
        try:
            with zf.open(pkl[0]) as f:
                obj = RestrictedUnpickler(f, zf, prefix).load()
        except RefusedPickle as e:
            raise FormatError(f"{path}: {e}") from None
        except Exception as e:   # nothing but the allowed constructors ran: any other error is a corrupt pickle
            raise FormatError(f"{path}: corrupt torch checkpoint ({type(e).__name__}: {e})") from None
    except BaseException:
        zf.close()
        raise
    return obj, zf, prefix


_MAX_EXPANDED = 1 << 32


def _storage_extent(t: LazyTorchTensor, zf: zipfile.ZipFile, prefix: str, name: str = "") -> tuple[str, int]:
    """(the storage record of a tensor, the bytes of it the tensor spans); FormatError if the record is missing or
    too short, so that no read goes past a record's end."""
    itemsize = np.dtype(_TORCH_STORAGES[t.storage.kind][1]).itemsize
    record = f"{prefix}data/{t.storage.key}"
    what = f"{zf.filename}: tensor {name or '(unnamed)'}"
    try:
        have = zf.getinfo(record).file_size
    except KeyError:
        raise FormatError(f"{what} points to storage record {record}, which the archive does not hold") from None
    if any(d == 0 for d in t.shape):
        return record, 0
    last = t.offset + sum((d - 1) * s for d, s in zip(t.shape, t.stride))
    need = (last + 1) * itemsize
    if need > have:
        raise FormatError(f"{what} of shape {list(t.shape)} needs {need} bytes of storage record {record}, which "
                          f"holds {have}")
    size = _n_elements(t.shape) * itemsize
    if size > max(have, _MAX_EXPANDED):   # zero strides repeat a small storage: allowed, within reason
        raise FormatError(f"{what} of shape {list(t.shape)} would be {size} bytes, from a storage record of {have}")
    return record, need


def lazy_tensor_loader(t: LazyTorchTensor, zf: zipfile.ZipFile, prefix: str,
                       name: str = "") -> Callable[[], np.ndarray]:
    dtype_name, np_dtype = _TORCH_STORAGES[t.storage.kind]
    itemsize = np.dtype(np_dtype).itemsize

    def load() -> np.ndarray:
        record, need = _storage_extent(t, zf, prefix, name)
        if need == 0:
            return _as_float(np.zeros(t.shape, dtype=np_dtype), dtype_name)
        try:
            with zf.open(record) as f:
                raw = f.read(need)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
            raise FormatError(f"{zf.filename}: corrupt storage record {record} ({type(e).__name__}: {e})") from None
        if len(raw) != need:
            raise FormatError(f"{zf.filename}: storage record {record} ended after {len(raw)} of {need} bytes")
        flat = np.frombuffer(raw, dtype=np_dtype)
        if not t.shape:
            arr = flat[t.offset: t.offset + 1].reshape(())
        else:   # within the record: _storage_extent checked the last element the strides reach
            arr = np.lib.stride_tricks.as_strided(flat[t.offset:], shape=t.shape,
                                                  strides=tuple(s * itemsize for s in t.stride))
            arr = np.ascontiguousarray(arr)
        return _as_float(arr, dtype_name)

    return load


def torch_dtype_name(t: LazyTorchTensor) -> str:
    return _TORCH_STORAGES[t.storage.kind][0]


def iter_tensors(obj, prefix: str = "") -> Iterator[tuple[str, LazyTorchTensor]]:
    """(dotted name, tensor) for every tensor in nested dicts, depth first in order; iterative, so a pickle's
    deep or cyclic containers cannot exhaust the stack."""
    stack = [iter([(prefix, obj)])]
    active: list[int] = []   # ids of the dicts being walked: a dict that contains itself is walked once
    while stack:
        try:
            name, value = next(stack[-1])
        except StopIteration:
            stack.pop()
            if active:
                active.pop()
            continue
        if isinstance(value, LazyTorchTensor):
            yield name.rstrip("."), value
        elif isinstance(value, dict) and id(value) not in active:
            if len(stack) > 64:
                raise FormatError(f"containers nested more than 64 deep around {name[:100]!r}")
            active.append(id(value))
            stack.append(iter([(f"{name}{k}.", v) for k, v in value.items()]))


def read_torch_checkpoint(path: str | os.PathLike) -> list[TensorSource]:
    obj, zf, prefix = load_torch_pickle(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    out = []
    try:
        try:
            found = list(iter_tensors(obj))
        except FormatError as e:
            raise FormatError(f"{path}: {e}") from None
        for name, t in found:
            _storage_extent(t, zf, prefix, name)   # every record there and long enough before anyone reads one
            out.append(TensorSource(name, t.shape, torch_dtype_name(t), lazy_tensor_loader(t, zf, prefix, name)))
        if not out:
            raise FormatError(f"{path}: no tensors found in the checkpoint")
    except BaseException:
        zf.close()
        raise
    return out


def checkpoint_format(path: str | os.PathLike) -> str | None:
    """What a file holds, by its first bytes: "gguf", "safetensors" (a length, then a JSON object), "torch" (a zip,
    or a pickle: a legacy torch file); by its suffix when they show none of these; None if neither tells."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"
    if path.suffix.lower() == ".safetensors":
        return "safetensors"
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        return "torch"
    return None


def read_checkpoint_file(path: str | os.PathLike) -> list[TensorSource]:
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file")
    if path.is_dir():
        raise FormatError(f"{path} is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise FormatError(f"{path}: empty file")
    fmt = checkpoint_format(path)
    if fmt == "gguf":
        raise FormatError(f"{path}: already a GGUF file, not a checkpoint to convert")
    if fmt == "torch":
        return read_torch_checkpoint(path)
    if fmt == "safetensors":
        return read_safetensors(path)
    raise FormatError(f"{path}: not a checkpoint (neither safetensors nor a torch zip)")
