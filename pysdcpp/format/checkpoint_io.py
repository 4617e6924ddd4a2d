"""Read tensors from checkpoint files without torch: safetensors (memory-mapped) and torch zip pickles.

Every reader yields `TensorSource`s that load their data only when asked, so a converter can stream
a model tensor by tensor.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import ConversionError


@dataclass
class TensorSource:
    """One tensor of a checkpoint: its name, shape and dtype, and a loader for its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "F32", "F16", "BF16", "F64", "I64", ...
    load: Callable[[], np.ndarray]

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


def read_safetensors(path: str | os.PathLike) -> list[TensorSource]:
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > min(size - 8, 100 << 20):
            raise ConversionError(f"{path}: not a safetensors file (bad header length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    base = 8 + n
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        if dtype not in _ST_DTYPES:
            raise ConversionError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        shape = tuple(int(d) for d in info["shape"])
        start, end = (int(x) for x in info["data_offsets"])
        np_dtype = np.dtype(_ST_DTYPES[dtype])
        if end - start != int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize or base + end > size:
            raise ConversionError(f"{path}: tensor {name} lies outside the file (truncated or corrupt)")

        # Plain reads, not a memory map: streamed tensors do not stay resident after use.
        def load(start=start, end=end, np_dtype=np_dtype, shape=shape, dtype=dtype):
            buf = bytearray(end - start)
            with open(path, "rb") as f:
                f.seek(base + start)
                if f.readinto(buf) != len(buf):
                    raise ConversionError(f"{path}: file ended early reading {name}")
            return _as_float(np.frombuffer(buf, dtype=np_dtype).reshape(shape), dtype)

        out.append(TensorSource(name, shape, dtype, load))
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


def _rebuild_tensor(storage, storage_offset, size, stride, *_args):
    return LazyTorchTensor(storage, int(storage_offset), tuple(size), tuple(stride))


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
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: the checkpoint holds more than "
                                     "tensors, and loading it could run arbitrary code")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, _numel = pid
        if isinstance(storage_type, _DType):
            kind = _TORCH_DTYPE_NAMES[storage_type.name]
        elif isinstance(storage_type, _StorageType):
            kind = storage_type.kind
        else:
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        return _StorageRef(kind, str(key))


def load_torch_pickle(path: str | os.PathLike):
    """Unpickle a torch zip checkpoint into plain containers whose tensors are `LazyTorchTensor`s."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic[:1] == b"\x80":
            raise ConversionError(f"{path}: legacy (pre-1.6, non-zip) torch pickle; re-save it with a current torch "
                                  "or convert it to safetensors first")
        raise ConversionError(f"{path}: not a torch checkpoint (not a zip archive)")
    zf = zipfile.ZipFile(path)
    pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkl:
        raise ConversionError(f"{path}: zip archive without data.pkl: not a torch checkpoint")
    prefix = pkl[0][: -len("data.pkl")]
    try:
        with zf.open(pkl[0]) as f:
            obj = RestrictedUnpickler(f, zf, prefix).load()
    except pickle.UnpicklingError as e:
        raise ConversionError(f"{path}: {e}") from None
    except (EOFError, zipfile.BadZipFile, ValueError) as e:
        raise ConversionError(f"{path}: corrupt torch checkpoint ({e})") from None
    return obj, zf, prefix


def lazy_tensor_loader(t: LazyTorchTensor, zf: zipfile.ZipFile, prefix: str) -> Callable[[], np.ndarray]:
    dtype_name, np_dtype = _TORCH_STORAGES[t.storage.kind]
    itemsize = np.dtype(np_dtype).itemsize

    def load() -> np.ndarray:
        raw = zf.read(f"{prefix}data/{t.storage.key}")
        flat = np.frombuffer(raw, dtype=np_dtype)
        if not t.shape:
            arr = flat[t.offset: t.offset + 1].reshape(())
        else:
            arr = np.lib.stride_tricks.as_strided(flat[t.offset:], shape=t.shape,
                                                  strides=tuple(s * itemsize for s in t.stride))
            arr = np.ascontiguousarray(arr)
        return _as_float(arr, dtype_name)

    return load


def torch_dtype_name(t: LazyTorchTensor) -> str:
    return _TORCH_STORAGES[t.storage.kind][0]


def iter_tensors(obj, prefix: str = "") -> Iterator[tuple[str, LazyTorchTensor]]:
    if isinstance(obj, LazyTorchTensor):
        yield prefix.rstrip("."), obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{prefix}{k}.")


def read_torch_checkpoint(path: str | os.PathLike) -> list[TensorSource]:
    obj, zf, prefix = load_torch_pickle(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    out = []
    for name, t in iter_tensors(obj):
        out.append(TensorSource(name, t.shape, torch_dtype_name(t), lazy_tensor_loader(t, zf, prefix)))
    if not out:
        raise ConversionError(f"{path}: no tensors found in the checkpoint")
    return out


def read_checkpoint_file(path: str | os.PathLike) -> list[TensorSource]:
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return read_torch_checkpoint(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        return read_torch_checkpoint(path)
    return read_safetensors(path)
