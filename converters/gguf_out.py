"""Write tensors to GGUF one at a time (peak memory: about one tensor), with upstream's type rules."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGML_QUANT_VERSION, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import quant_shape_to_byte_shape, quantize

from pysdcpp.format import keys
from pysdcpp.format.checkpoint_io import TensorSource
from pysdcpp.format.names import OUTPUT_TYPES as OUTPUT_TYPE_NAMES

from .errors import ConversionError

# Each output type: its ggml type and its general.file_type (gguf-py's LlamaFileType numbering, which GGUF readers
# know).
_TYPES = {"f32": (Q.F32, LlamaFileType.ALL_F32), "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
          "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0), "q5_1": (Q.Q5_1, LlamaFileType.MOSTLY_Q5_1),
          "q5_0": (Q.Q5_0, LlamaFileType.MOSTLY_Q5_0), "q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
          "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0)}
assert tuple(_TYPES) == OUTPUT_TYPE_NAMES, "the format layer's output types and this table differ"
OUTPUT_TYPES = {name: qtype for name, (qtype, _) in _TYPES.items()}
_BLOCK = {Q.Q8_0: 32, Q.Q5_1: 32, Q.Q5_0: 32, Q.Q4_1: 32, Q.Q4_0: 32}
_SOURCE_TYPES = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16, "F64": Q.F32}

# Tensors that stay in their source type whatever the target (same choices as upstream's converter, so
# files from either tool hold the same types): biases, scales, time/label embeddings, token embeddings.
_KEEP_SUFFIXES = (".bias", ".scale")
_KEEP_SUBSTRINGS = ("time_embed.", "label_emb.", "embedding")

ProgressFn = Callable[[int, int, str], None]

# Metadata arrays: numpy arrays keep their element type; lists must hold strings.
_ARRAY_TYPES = {np.dtype(np.uint8): GGUFValueType.UINT8, np.dtype(np.int8): GGUFValueType.INT8,
                np.dtype(np.uint16): GGUFValueType.UINT16, np.dtype(np.int16): GGUFValueType.INT16,
                np.dtype(np.uint32): GGUFValueType.UINT32, np.dtype(np.int32): GGUFValueType.INT32,
                np.dtype(np.uint64): GGUFValueType.UINT64, np.dtype(np.int64): GGUFValueType.INT64,
                np.dtype(np.float32): GGUFValueType.FLOAT32, np.dtype(np.float64): GGUFValueType.FLOAT64}


def _add_metadata(writer: GGUFWriter, key: str, value: object) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, np.ndarray):
        if value.size == 0:
            raise ConversionError(f"metadata {key}: an empty array (gguf-py writes none; leave the key out)")
        if value.dtype not in _ARRAY_TYPES or value.ndim != 1:
            raise ConversionError(f"metadata {key}: unsupported array ({value.dtype}, {value.ndim}-D)")
        writer.add_key_value(key, value.tolist(), GGUFValueType.ARRAY, sub_type=_ARRAY_TYPES[value.dtype])
    elif isinstance(value, (list, tuple)):
        if not value:
            raise ConversionError(f"metadata {key}: an empty list (gguf-py writes none; leave the key out)")
        if not all(isinstance(v, str) for v in value):
            raise ConversionError(f"metadata {key}: a list value must hold strings (use a numpy array for numbers)")
        writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    else:
        writer.add_string(key, str(value))


def output_type_for(name: str, shape: tuple[int, ...], source: Q, target: Q) -> Q:
    ne0 = shape[-1] if shape else 1
    if target in _BLOCK and ne0 % _BLOCK[target] != 0:
        return source
    if name.endswith(_KEEP_SUFFIXES) or any(s in name for s in _KEEP_SUBSTRINGS):
        return source
    return target


def _encode(data: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    if qtype == Q.BF16:
        # Source BF16 kept as is: the reader widened it to F32 exactly, so truncation restores the bits.
        return (np.ascontiguousarray(data, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def _nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    return n // block * size


def write_gguf(path: str | os.PathLike, tensors: Iterable[TensorSource], target: str,
               metadata: dict[str, object], progress: ProgressFn | None = None,
               type_overrides: dict[str, str] | None = None) -> dict[str, int]:
    """Write `tensors` to `path` (atomically: a temporary file renamed on success). Returns a type histogram.
    `type_overrides`: another output type for some tensors by name (the same type rules apply to it).

    Besides `metadata` (general.name among it, where the caller has one) the file gets gguf-py's standard
    general.file_type and, for quantized types, general.quantization_version."""
    if target not in OUTPUT_TYPES:
        raise ConversionError(f"unknown output type {target!r}; choose one of {', '.join(OUTPUT_TYPES)}")
    qtarget = OUTPUT_TYPES[target]
    overrides = type_overrides or {}
    bad = sorted({v for v in overrides.values() if v not in OUTPUT_TYPES})
    if bad:
        raise ConversionError(f"unknown output type {bad[0]!r}; choose one of {', '.join(OUTPUT_TYPES)}")
    path = Path(path)
    plan = []
    for t in tensors:
        if t.dtype not in _SOURCE_TYPES:
            continue  # integer bookkeeping tensors (e.g. position ids) are not weights
        want = OUTPUT_TYPES[overrides[t.name]] if t.name in overrides else qtarget
        qtype = output_type_for(t.name, t.shape, _SOURCE_TYPES[t.dtype], want)
        plan.append((t, qtype))
    if not plan:
        raise ConversionError("no weight tensors to write")
    names = [t.name for t, _ in plan]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:3]
        raise ConversionError(f"two source tensors map to the same name: {dup}")

    tmp = path.with_name(path.name + ".partial")
    writer = GGUFWriter(tmp, keys.ARCHITECTURE)
    try:
        writer.add_file_type(int(_TYPES[target][1]))
        if qtarget not in (Q.F32, Q.F16):
            writer.add_quantization_version(GGML_QUANT_VERSION)
        for key, value in metadata.items():
            _add_metadata(writer, key, value)
        total = 0
        for t, qtype in plan:
            nbytes = _nbytes(t.shape, qtype)
            total += nbytes
            np_dtype = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}.get(qtype, np.uint8)
            quantized = qtype not in (Q.F32, Q.F16, Q.BF16)
            # The gguf writer takes quantized shapes in bytes per row.
            shape = quant_shape_to_byte_shape(t.shape, qtype) if quantized else t.shape
            writer.add_tensor_info(t.name, shape, np.dtype(np_dtype), nbytes,
                                   raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        done = 0
        histogram: dict[str, int] = {}
        for t, qtype in plan:
            data = t.load()
            if tuple(data.shape) != tuple(t.shape):
                raise ConversionError(f"{t.name}: data shape {data.shape} does not match header shape {t.shape}")
            encoded = _encode(data, qtype)
            writer.write_tensor_data(encoded)
            done += encoded.nbytes
            histogram[qtype.name] = histogram.get(qtype.name, 0) + 1
            if progress:
                progress(done, total, t.name)
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return histogram
