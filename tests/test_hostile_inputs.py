"""Malformed and hostile inputs, made here from a few hand-written bytes, through every entry point:
`StableDiffusion(...)`, `pysdcpp.modelfile.read_model_file`, `pysdcpp.converters.convert`, and the CLI's `generate`,
`inspect` and `convert`. Each must end in a Python exception whose message says what is wrong and names the file;
none may abort the process (the native loader's asserts, and a division by zero in ggml's GGUF reader, take the host
down: pysdcpp.modelfile checks GGUF headers and tensor bounds in Python first, and every load attempt here also
runs in a child process, which must exit normally); no code in a pickle may run (each payload would create a marker
file, which must never appear); and no output file may be left behind.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import pysdcpp
from pysdcpp import ModelLoadError, StableDiffusion
from pysdcpp._converters import converters, submodule
from pysdcpp.cli import main
from pysdcpp.format.errors import FormatError
from pysdcpp.modelfile import read_model_file

convert = converters().convert   # the installed converters, or a source checkout's converters/ folder
synthetic = submodule("synthetic")
read_pruning_mask = submodule("alter").read_pruning_mask

MARKER = "PWNED"   # every payload below would create a file whose name starts with this in the corpus folder


# ---- GGUF by hand ---------------------------------------------------------------------------------------------

def _str(b: bytes | str) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def _kv(key: bytes | str, vtype: int, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", vtype) + payload


def _kv_str(key: str, value: str) -> bytes:
    return _kv(key, 8, _str(value))


def _tensor_info(name: bytes | str, dims, ggml_type: int = 0, offset: int = 0, n_dims: int | None = None) -> bytes:
    n = len(dims) if n_dims is None else n_dims
    return (_str(name) + struct.pack("<I", n) + b"".join(struct.pack("<q", d) for d in dims)
            + struct.pack("<I", ggml_type) + struct.pack("<Q", offset))


def _gguf(tensors=(), kvs=(), data: bytes = b"", version: int = 3, n_tensors: int | None = None,
          n_kv: int | None = None, align: int = 32) -> bytes:
    head = (b"GGUF" + struct.pack("<I", version)
            + struct.pack("<Q", len(tensors) if n_tensors is None else n_tensors % (1 << 64))
            + struct.pack("<Q", len(kvs) if n_kv is None else n_kv % (1 << 64)) + b"".join(kvs) + b"".join(tensors))
    return head + b"\0" * (-len(head) % align) + data


def _one_tensor(dims, ggml_type: int = 0, kvs=(), **kw) -> bytes:
    """A GGUF of one tensor `a` with 64 bytes of zero data (enough for every valid shape used here)."""
    return _gguf([_tensor_info("model.diffusion_model.a", dims, ggml_type, **kw)], kvs, b"\0" * 64)


def _valid_gguf(path: Path) -> bytes:
    """A small well-formed GGUF written by the gguf package: metadata and two tiny F32 tensors."""
    from gguf import GGUFWriter

    w = GGUFWriter(path, "stable-diffusion")
    w.add_string("pysdcpp.model.family", "sd1")
    w.add_array("pysdcpp.test.list", [1, 2, 3])
    w.add_tensor("model.diffusion_model.x", np.arange(16, dtype=np.float32).reshape(4, 4))
    w.add_tensor("model.diffusion_model.y", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    path.unlink()
    return data


def _cut(where: str) -> Callable[[Path], bytes]:
    def make(d: Path) -> bytes:
        data = _valid_gguf(d / "valid-for-cutting.gguf")
        infos = data.index(b"model.diffusion_model.x") - 8
        second = data.index(b"model.diffusion_model.y")
        return data[:{"header": 14, "kv": (24 + infos) // 2, "infos": second + 3, "data": len(data) - 8}[where]]
    return make


# ---- safetensors by hand --------------------------------------------------------------------------------------

def _st(header, data: bytes = b"", n: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def _st_one(**entry) -> bytes:
    info = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]} | entry
    return _st({"model.diffusion_model.a": info}, b"\0" * 16)


# ---- pickles and torch zips by hand ---------------------------------------------------------------------------

class _Payload:
    """Pickles as a call of `fn(*args)`: what a hostile checkpoint holds."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class _Storage:
    def __init__(self, key: str, numel: int, kind):
        self.key, self.numel, self.kind = key, numel, kind


class _TensorRef:
    """Pickles as torch pickles a tensor: _rebuild_tensor_v2 of a persistent storage id (any shape and strides)."""

    def __init__(self, key: str, shape, stride=None, offset: int = 0, numel: int | None = None,
                 kind=torch.FloatStorage):
        stride = stride if stride is not None else tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        self.storage = _Storage(key, 2 if numel is None else numel, kind)
        self.shape, self.stride, self.offset = tuple(shape), tuple(stride), offset

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, self.offset, self.shape, self.stride, False,
                                                 collections.OrderedDict())


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return "storage", obj.kind, obj.key, "cpu", obj.numel
        return None


def _torch_pickle(obj, protocol: int = 2) -> bytes:
    import io

    buf = io.BytesIO()
    _TorchPickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def _zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def _torch_zip(pkl: bytes, records: dict[str, bytes] | None = None, extra: dict[str, bytes] | None = None,
               prefix: str = "archive/") -> Callable[[Path], bytes]:
    """A torch-zip checkpoint (data.pkl, byteorder, version, data/<key> records) with the given pickle."""
    members = {f"{prefix}data.pkl": pkl, f"{prefix}byteorder": b"little", f"{prefix}version": b"3\n"}
    members |= {f"{prefix}data/{k}": v for k, v in (records or {}).items()}
    return _plain_zip(members | (extra or {}))


def _torch_save(edit: Callable[[dict[str, bytes]], dict[str, bytes]] | None = None, obj=None) -> Callable:
    """A real torch.save checkpoint (two small F16 tensors, LDM-style names), its members then edited."""
    def make(d: Path) -> bytes:
        tmp = d / ".torch-save.ckpt"
        state = obj if obj is not None else {"state_dict": {
            "model.diffusion_model.x": torch.arange(6, dtype=torch.float16).reshape(2, 3),
            "model.diffusion_model.y": torch.ones(4, dtype=torch.float16)}}
        torch.save(state, str(tmp))
        if edit is not None:
            with zipfile.ZipFile(tmp) as z:
                members = {n: z.read(n) for n in z.namelist()}
            tmp.unlink()
            _zip(tmp, edit(members))
        data = tmp.read_bytes()
        tmp.unlink()
        return data
    return make


def _drop_records(members: dict[str, bytes]) -> dict[str, bytes]:
    return {n: v for n, v in members.items() if "/data/" not in n}


def _short_records(members: dict[str, bytes]) -> dict[str, bytes]:
    return {n: (v[:3] if "/data/" in n else v) for n, v in members.items()}


def _extra_members(members: dict[str, bytes]) -> dict[str, bytes]:
    prefix = next(n for n in members if n.endswith("data.pkl"))[: -len("data.pkl")]
    return members | {f"{prefix}extra/notes.txt": b"not part of a checkpoint", "../outside.txt": b"x",
                      f"{prefix}code/evil.py": b"import os; os.system('touch PWNED-extra')"}


def _second_pickle(members: dict[str, bytes]) -> dict[str, bytes]:
    prefix = next(n for n in members if n.endswith("data.pkl"))[: -len("data.pkl")]
    return members | {f"{prefix}data.pkl.orig": members[f"{prefix}data.pkl"]}


def _big_endian(members: dict[str, bytes]) -> dict[str, bytes]:
    return {n: (b"big" if n.endswith("/byteorder") else v) for n, v in members.items()}


def _hostile(case: str) -> Callable[[Path], object]:
    """The payload of a hostile pickle: each would create <corpus>/PWNED-<case> if it ran."""
    def payload(d: Path):
        marker = str(d / f"{MARKER}-{case}")
        return {
            "os_system": _Payload(os.system, f"touch {marker}"),
            "eval": _Payload(eval, f"open({marker!r}, 'w')"),
            "exec": _Payload(exec, f"open({marker!r}, 'w')"),
            "subprocess": _Payload(subprocess.check_call, ["touch", marker]),
            "getattr": _Payload(getattr, _Payload(__import__, "os"), "system"),
            "numpy_runstring": _Payload(np.testing._private.utils.runstring,
                                        f"open({marker!r}, 'w')", {}),
            "rebuild_from_type": _Payload(torch._tensor._rebuild_from_type_v2, os.system, object,
                                          (f"touch {marker}",), {}),
        }[case]
    return payload


def _hostile_zip(case: str, protocol: int = 2) -> Callable[[Path], bytes]:
    def make(d: Path) -> bytes:
        state = {"state_dict": {"model.diffusion_model.x": _TensorRef("0", (2,)), "evil": _hostile(case)(d)}}
        return _torch_zip(_torch_pickle(state, protocol), {"0": b"\0" * 8})(d)
    return make


def _hostile_torch_save(case: str) -> Callable[[Path], bytes]:
    def make(d: Path) -> bytes:
        return _torch_save(obj={"state_dict": {"model.diffusion_model.x": torch.ones(2)}, "evil": _hostile(case)(d)})(d)
    return make


def _legacy_pickle(d: Path) -> bytes:
    # What torch.save wrote before 1.6 (a bare pickle stream), here with a payload.
    return pickle.dumps({"state_dict": {}, "x": _hostile("os_system")(d)}, protocol=2)


def _plain_zip(members: dict[str, bytes]) -> Callable[[Path], bytes]:
    def make(d: Path) -> bytes:
        tmp = d / ".zip-in-progress"
        _zip(tmp, members)
        data = tmp.read_bytes()
        tmp.unlink()
        return data
    return make


# ---- the corpus -----------------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    suffix: str
    make: Callable[[Path], bytes] | bytes
    match: str                       # what read_model_file's / StableDiffusion's message must say (a regex)
    convert_match: str | None = None  # what convert's must say (default: `match`)
    readable: bool = False           # well-formed, just not a Stable Diffusion model: read_model_file accepts it


_GGUF_CONVERT = "already a GGUF file"
NOT_SD = "unsupported architecture: found an unknown model"   # convert's message for checkpoints of other models
CASES = [
    # anything
    Case("empty", ".gguf", b"", "empty file"),
    Case("empty_safetensors", ".safetensors", b"", "empty file"),
    Case("empty_ckpt", ".ckpt", b"", "empty file"),
    Case("garbage_gguf", ".gguf", np.random.default_rng(1).bytes(4096), "not a model file",
         "not a checkpoint"),
    Case("garbage_safetensors", ".safetensors", np.random.default_rng(2).bytes(4096),
         "truncated or not a safetensors file"),
    Case("garbage_ckpt", ".ckpt", b"\x13" + np.random.default_rng(3).bytes(4095), "not a zip archive"),
    # GGUF: truncated
    Case("gguf_magic_only", ".gguf", b"GGUF", "truncated GGUF file: the version", _GGUF_CONVERT),
    Case("gguf_cut_in_header", ".gguf", _cut("header"), "truncated GGUF file: the tensor count", _GGUF_CONVERT),
    Case("gguf_cut_in_metadata", ".gguf", _cut("kv"), "truncated GGUF file: .*metadata", _GGUF_CONVERT),
    Case("gguf_cut_in_tensor_infos", ".gguf", _cut("infos"), "truncated GGUF file: .*tensor", _GGUF_CONVERT),
    Case("gguf_cut_in_data", ".gguf", _cut("data"), "truncated or corrupt GGUF file: the data of tensor "
         "model.diffusion_model.y ends at byte", _GGUF_CONVERT),
    # GGUF: absurd counts
    Case("gguf_2e60_tensors", ".gguf", _gguf([_tensor_info("a", [4])], data=b"\0" * 32, n_tensors=2 ** 60),
         "claims 1152921504606846976 tensors; a file of 96 bytes has room for at most", _GGUF_CONVERT),
    Case("gguf_negative_tensor_count", ".gguf", _gguf([_tensor_info("a", [4])], data=b"\0" * 32, n_tensors=-5),
         "claims -5 tensors", _GGUF_CONVERT),
    Case("gguf_2e60_metadata", ".gguf", _gguf([_tensor_info("a", [4])], data=b"\0" * 32, n_kv=2 ** 60),
         "claims 1152921504606846976 metadata entries", _GGUF_CONVERT),
    Case("gguf_no_tensors", ".gguf", _gguf([], [_kv_str("general.architecture", "sd")]), "holds no tensors",
         _GGUF_CONVERT),
    # GGUF: absurd tensors
    Case("gguf_99_dims", ".gguf", _one_tensor([2] * 99), "has 99 dimensions \\(at most 4\\)", _GGUF_CONVERT),
    Case("gguf_99_dims_claimed", ".gguf", _one_tensor([], n_dims=99), "has 99 dimensions", _GGUF_CONVERT),
    Case("gguf_5_dims", ".gguf", _one_tensor([1, 1, 1, 1, 4]), "has 5 dimensions", _GGUF_CONVERT),
    Case("gguf_zero_dim", ".gguf", _one_tensor([4, 0]), r"shape \[4, 0\]: every dimension must be at least 1",
         _GGUF_CONVERT),   # ggml's reader divides by it: SIGFPE
    Case("gguf_negative_dim", ".gguf", _one_tensor([4, -1]), "every dimension must be at least 1", _GGUF_CONVERT),
    Case("gguf_dims_overflow", ".gguf", _one_tensor([2 ** 40, 2 ** 40]), "overflow 64 bits", _GGUF_CONVERT),
    Case("gguf_huge_tensor", ".gguf", _one_tensor([2 ** 20, 2 ** 20]), "past the end of the file", _GGUF_CONVERT),
    Case("gguf_offset_beyond_end", ".gguf", _one_tensor([4], offset=2 ** 40), "past the end of the file",
         _GGUF_CONVERT),
    Case("gguf_offset_gap", ".gguf", _one_tensor([4], offset=32), "data offset 32, expected 0", _GGUF_CONVERT),
    Case("gguf_unknown_type", ".gguf", _one_tensor([4], 99), "unknown ggml type 99", _GGUF_CONVERT),
    Case("gguf_removed_type", ".gguf", _one_tensor([32], 4), "unknown ggml type 4", _GGUF_CONVERT),
    Case("gguf_type_newer_than_ggml", ".gguf", _one_tensor([128], 41), "unknown ggml type 41", _GGUF_CONVERT),
    Case("gguf_row_not_whole_blocks", ".gguf", _one_tensor([4], 8), "Q8_0 has rows of 4 elements, not a multiple",
         _GGUF_CONVERT),
    Case("gguf_name_too_long", ".gguf", _gguf([_tensor_info("a" * 128, [4])], data=b"\0" * 32), "128 bytes long",
         _GGUF_CONVERT),
    Case("gguf_name_length_2e62", ".gguf", _gguf(n_tensors=1)[:24] + struct.pack("<Q", 2 ** 62) + b"\0" * 64,
         "the name of tensor 0 of 1 claims a length of 4611686018427387904", _GGUF_CONVERT),
    Case("gguf_name_not_utf8", ".gguf", _gguf([_tensor_info(b"\xff\xfe", [4])], data=b"\0" * 32), "not UTF-8",
         _GGUF_CONVERT),
    Case("gguf_duplicate_tensor", ".gguf", _gguf([_tensor_info("a", [4]), _tensor_info("a", [4], offset=32)],
                                                 data=b"\0" * 64), "tensor a appears twice", _GGUF_CONVERT),
    # GGUF: versions
    Case("gguf_version_1", ".gguf", _one_tensor([4]).replace(b"GGUF\x03", b"GGUF\x01", 1), "version 1;",
         _GGUF_CONVERT),
    Case("gguf_version_4", ".gguf", _one_tensor([4]).replace(b"GGUF\x03", b"GGUF\x04", 1), "version 4;",
         _GGUF_CONVERT),
    Case("gguf_version_0", ".gguf", _one_tensor([4]).replace(b"GGUF\x03", b"GGUF\x00", 1), "version 0;",
         _GGUF_CONVERT),
    Case("gguf_big_endian", ".gguf", _gguf([_tensor_info("a", [4])], data=b"\0" * 32, version=0x03000000),
         "big-endian", _GGUF_CONVERT),
    # GGUF: metadata
    Case("gguf_empty_key", ".gguf", _one_tensor([4], kvs=[_kv(b"", 4, b"\1\0\0\0")]), "has an empty key",
         _GGUF_CONVERT),   # ggml asserts on it
    Case("gguf_duplicate_key", ".gguf", _one_tensor([4], kvs=[_kv_str("k", "x"), _kv_str("k", "y")]),
         "metadata key 'k' appears twice", _GGUF_CONVERT),
    Case("gguf_alignment_string", ".gguf", _one_tensor([4], kvs=[_kv_str("general.alignment", "32")]),
         "general.alignment must be a single uint32", _GGUF_CONVERT),   # ggml aborts on it
    Case("gguf_alignment_array", ".gguf",
         _one_tensor([4], kvs=[_kv("general.alignment", 9, struct.pack("<IQII", 4, 2, 32, 32))]),
         "general.alignment must be a single uint32", _GGUF_CONVERT),
    Case("gguf_alignment_3", ".gguf", _one_tensor([4], kvs=[_kv("general.alignment", 4, struct.pack("<I", 3))]),
         "general.alignment 3 is not a power of 2", _GGUF_CONVERT),
    Case("gguf_unknown_value_type", ".gguf", _one_tensor([4], kvs=[_kv("k", 77, b"\0" * 8)]),
         "metadata 'k' has unknown value type 77", _GGUF_CONVERT),
    Case("gguf_array_of_arrays", ".gguf", _one_tensor([4], kvs=[_kv("k", 9, struct.pack("<IQIQI", 9, 1, 4, 1, 0))]),
         "array of arrays", _GGUF_CONVERT),
    Case("gguf_string_length_2e50", ".gguf", _one_tensor([4], kvs=[_kv("k", 8, struct.pack("<Q", 2 ** 50))]),
         "metadata 'k' claims a length of 1125899906842624 bytes", _GGUF_CONVERT),
    Case("gguf_string_past_end", ".gguf", _one_tensor([4], kvs=[_kv("k", 8, struct.pack("<Q", 5000))]),
         "truncated GGUF file: metadata 'k'.* claims 5000 bytes", _GGUF_CONVERT),
    Case("gguf_array_length_2e50", ".gguf", _one_tensor([4], kvs=[_kv("k", 9, struct.pack("<IQ", 4, 2 ** 50))]),
         "metadata 'k' claims 1125899906842624 array entries", _GGUF_CONVERT),
    Case("gguf_scalar_tensor", ".gguf", _gguf([_tensor_info("model.diffusion_model.a", [])], data=b"\0" * 32),
         "could not load", _GGUF_CONVERT, readable=True),
    Case("gguf_not_sd", ".gguf", lambda d: _valid_gguf(d / ".valid.gguf"), "could not load", _GGUF_CONVERT,
         readable=True),
    Case("gguf_name_127_bytes", ".gguf", _gguf([_tensor_info("a" * 127, [4])], data=b"\0" * 32),
         "could not load", _GGUF_CONVERT, readable=True),
    # safetensors: lying headers
    Case("st_header_length_past_end", ".safetensors", _st({}, n=10 ** 6),
         "the header length is 1000000 bytes, the file has 2"),
    Case("st_header_length_0", ".safetensors", _st(b"{}", n=0) + b"{}", "header length 0"),
    Case("st_header_not_json", ".safetensors", _st(b"{this is not json}"), "header is not JSON"),
    Case("st_header_not_utf8", ".safetensors", _st(b"\xff\xfe\xfd\xfc"), "header is not JSON"),
    Case("st_header_list", ".safetensors", _st([1, 2, 3]), "the header is a JSON list, not an object"),
    Case("st_header_string", ".safetensors", _st("tensors"), "the header is a JSON str, not an object"),
    Case("st_header_nested_100000_deep", ".safetensors", _st(b"{\"a\":" + b"[" * 100000 + b"]" * 100000 + b"}"),
         "nested too deeply"),
    Case("st_entry_not_object", ".safetensors", _st({"model.diffusion_model.a": [0, 16]}, b"\0" * 16),
         "its header entry is not an object"),
    Case("st_unknown_dtype", ".safetensors", _st_one(dtype="F17"), "unsupported dtype 'F17'"),
    Case("st_dtype_not_string", ".safetensors", _st_one(dtype=["F32"]), "unsupported dtype"),
    Case("st_missing_dtype", ".safetensors", _st_one(dtype=None), "unsupported dtype None"),
    Case("st_negative_shape", ".safetensors", _st_one(shape=[-2, -2]), "shape .* not a list of non-negative"),
    Case("st_float_shape", ".safetensors", _st_one(shape=[2.0, 2]), "not a list of non-negative integers"),
    Case("st_shape_not_list", ".safetensors", _st_one(shape="2x2"), "not a list of non-negative integers"),
    Case("st_huge_shape", ".safetensors", _st_one(shape=[2 ** 62, 2 ** 62]), "hold 16"),
    Case("st_offsets_past_end", ".safetensors", _st_one(data_offsets=[0, 1 << 40], shape=[1 << 38]),
         "lies outside the file"),
    Case("st_offsets_wrong_size", ".safetensors", _st_one(data_offsets=[0, 12]),
         r"F32 of shape \[2, 2\] is 16 bytes, its data_offsets \[0, 12\] hold 12"),
    Case("st_offsets_reversed", ".safetensors", _st_one(data_offsets=[16, 0]), "not \\[start, end\\]"),
    Case("st_offsets_missing", ".safetensors", _st_one(data_offsets=None), "data_offsets None"),
    Case("st_offsets_strings", ".safetensors", _st_one(data_offsets=["0", "16"]), "data_offsets"),
    Case("st_offsets_overlap", ".safetensors",
         _st({"model.diffusion_model.a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "model.diffusion_model.b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24),
         "the data of tensors 'model.diffusion_model.a' and 'model.diffusion_model.b' overlap"),
    Case("st_duplicate_tensor", ".safetensors",
         _st(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
             b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4), "'a' appears twice"),
    Case("st_truncated", ".safetensors", _st_one()[:-5], "lies outside the file"),
    Case("st_no_tensors", ".safetensors", _st({"__metadata__": {"format": "pt"}}), "holds no tensors",
         NOT_SD),
    Case("st_zero_size_huge_dims", ".safetensors", _st_one(shape=[2 ** 62, 2 ** 62, 0], data_offsets=[0, 0]),
         "could not load", NOT_SD, readable=True),
    Case("st_10_dims", ".safetensors", _st_one(shape=[1] * 9 + [4]), "could not load", NOT_SD, readable=True),
    Case("st_not_sd", ".safetensors", _st_one(), "could not load", NOT_SD, readable=True),
    # torch: not a zip, broken zips
    Case("ckpt_legacy_pickle_payload", ".ckpt", _legacy_pickle, "legacy \\(pre-1.6, non-zip\\) torch pickle"),
    Case("ckpt_legacy_pickle_other_suffix", ".model", _legacy_pickle, "legacy", "legacy"),
    Case("ckpt_zip_magic_then_garbage", ".ckpt", b"PK\x03\x04" + np.random.default_rng(4).bytes(500),
         "not a zip archive"),
    Case("ckpt_truncated", ".ckpt", lambda d: _torch_save()(d)[:300], "not a zip archive"),
    Case("ckpt_no_data_pkl", ".ckpt", _plain_zip({"archive/version": b"3", "archive/data/0": b"\0" * 8}),
         "without data.pkl"),
    Case("ckpt_empty_pickle", ".ckpt", _torch_zip(b""), "corrupt torch checkpoint \\(EOFError"),
    Case("ckpt_pickle_garbage", ".ckpt", _torch_zip(b"\x80\x02}q\x00(X\x01\x00\x00\x00a\xff\xff"),
         "corrupt torch checkpoint \\(UnpicklingError: invalid load key"),
    Case("ckpt_ext_opcode", ".ckpt", _torch_zip(b"\x80\x02\x82\x01."), "corrupt torch checkpoint"),
    # torch: hostile pickles (every global outside tensors and plain containers is refused; nothing runs)
    Case("ckpt_os_system", ".ckpt", _hostile_zip("os_system"), "refusing to load global posix.system"),
    Case("ckpt_builtins_eval", ".ckpt", _hostile_zip("eval"), "refusing to load global (__builtin__|builtins).eval"),
    Case("ckpt_builtins_exec_protocol4", ".ckpt", _hostile_zip("exec", protocol=4),
         "refusing to load global (__builtin__|builtins).exec"),
    Case("ckpt_subprocess", ".ckpt", _hostile_zip("subprocess"),
         "refusing to load global (commands|subprocess).check_call"),
    Case("ckpt_getattr_chain", ".ckpt", _hostile_zip("getattr"),
         "refusing to load global (__builtin__|builtins).getattr"),
    Case("ckpt_rebuild_from_type_payload", ".ckpt", _hostile_zip("rebuild_from_type"),
         "refusing to load global posix.system"),
    Case("ckpt_torch_save_os_system", ".ckpt", _hostile_torch_save("os_system"),
         "refusing to load global posix.system"),
    Case("ckpt_torch_save_subprocess", ".pt", _hostile_torch_save("subprocess"),
         "refusing to load global (commands|subprocess).check_call"),
    # numpy globals are stubs returning None: runstring's code never runs, the checkpoint then has one tensor
    Case("ckpt_numpy_runstring", ".ckpt", _hostile_zip("numpy_runstring"), "could not load",
         NOT_SD, readable=True),
    # torch: archives whose members lie
    Case("ckpt_extra_members", ".ckpt", _torch_save(_extra_members), "could not load", NOT_SD,
         readable=True),
    Case("ckpt_second_data_pkl", ".ckpt", _torch_save(_second_pickle), "holds 2 pickles"),
    Case("ckpt_missing_data_records", ".ckpt", _torch_save(_drop_records),
         "points to storage record .*data/0, which the archive does not hold"),
    Case("ckpt_storage_key_missing", ".ckpt",
         _torch_zip(_torch_pickle({"model.diffusion_model.x": _TensorRef("7", (2,))}), {"0": b"\0" * 8}),
         "tensor model.diffusion_model.x points to storage record archive/data/7"),
    Case("ckpt_records_too_short", ".ckpt", _torch_save(_short_records), "needs 12 bytes of storage record"),
    Case("ckpt_strides_past_record", ".ckpt",
         _torch_zip(_torch_pickle({"model.diffusion_model.x": _TensorRef("0", (2, 2), stride=(10 ** 9, 1))}),
                    {"0": b"\0" * 16}), "needs 4000000008 bytes of storage record archive/data/0, which holds 16"),
    Case("ckpt_offset_past_record", ".ckpt",
         _torch_zip(_torch_pickle({"model.diffusion_model.x": _TensorRef("0", (2,), offset=1000)}),
                    {"0": b"\0" * 8}), "needs 4008 bytes"),
    Case("ckpt_zero_strides_huge", ".ckpt",
         _torch_zip(_torch_pickle({"model.diffusion_model.x": _TensorRef("0", (2 ** 30, 2 ** 30), stride=(0, 0))}),
                    {"0": b"\0" * 8}), "would be 4611686018427387904 bytes"),
    Case("ckpt_shape_not_ints", ".ckpt",
         _torch_zip(_torch_pickle({"model.diffusion_model.x": _TensorRef("0", ("a", "b"), stride=(1, 1))}),
                    {"0": b"\0" * 8}), "a tensor with an invalid shape"),
    Case("ckpt_negative_stride", ".ckpt",
         _torch_zip(_torch_pickle({"model.diffusion_model.x": _TensorRef("0", (2,), stride=(-1,))}),
                    {"0": b"\0" * 8}), "a tensor with an invalid shape"),
    Case("ckpt_big_endian", ".ckpt", _torch_save(_big_endian), "'big'-endian torch checkpoint"),
    Case("ckpt_no_tensors", ".ckpt", _torch_zip(_torch_pickle({"state_dict": {}, "epoch": 3})), "no tensors found"),
    Case("ckpt_cyclic_dict", ".ckpt", _torch_zip(
        b"\x80\x02}q\x00X\x01\x00\x00\x00ah\x00s."), "no tensors found"),   # {"a": <itself>}
]
CASE = {c.name: c for c in CASES}
REJECTED = [c.name for c in CASES if not c.readable]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hostile-corpus")
    out = {}
    for c in CASES:
        data = c.make(d) if callable(c.make) else c.make
        p = d / f"{c.name}{c.suffix}"
        p.write_bytes(data)
        out[c.name] = p
    return out


@pytest.fixture(autouse=True)
def _no_payload_ran(request):
    """After every test: no payload created its marker (nothing in any pickle ran)."""
    yield
    if "corpus" in request.fixturenames:
        folder = next(iter(request.getfixturevalue("corpus").values())).parent
        ran = sorted(p.name for p in folder.glob(f"{MARKER}*"))
        assert not ran, f"code in a pickle ran: {ran}"


@pytest.fixture(autouse=True, scope="module")
def _quiet_root_logger():
    """The CLI calls logging.basicConfig; with a handler on the root logger that is a no-op, so the native
    library's log lines stay out of the one-line messages checked here."""
    handler = logging.NullHandler()
    logging.getLogger().addHandler(handler)
    yield
    logging.getLogger().removeHandler(handler)


def _names_file(message: str, path: Path) -> None:
    assert path.name in message, f"the message does not name the file: {message}"


def _one_line_error(result, path: Path | None) -> str:
    """A CLI failure: exit code 1 and one line, `Error: ...` naming the file; no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    if path is not None:
        _names_file(lines[0], path)
    return lines[0]


# ---- read_model_file and StableDiffusion(...), in this process ----------------------------------------------------

@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_read_model_file(corpus, name):
    case, path = CASE[name], corpus[name]
    if case.readable:
        mf = read_model_file(path)
        assert mf.tensors
        return
    with pytest.raises(ModelLoadError, match=case.match) as e:
        read_model_file(path)
    _names_file(str(e.value), path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", REJECTED)
def test_stable_diffusion_rejects_before_native_code(corpus, name):
    """Files the Python checks refuse never reach the native loader, so this runs in the test process (the child
    process test below covers the ones that do reach it)."""
    path = corpus[name]
    with pytest.raises(ModelLoadError):
        read_model_file(path)   # guards the next line: only a refused file is handed to StableDiffusion here
    with pytest.raises(ModelLoadError, match=CASE[name].match) as e:
        StableDiffusion(path, threads=1)
    _names_file(str(e.value), path)


@pytest.mark.parametrize("name", ["gguf_zero_dim", "gguf_alignment_string", "st_offsets_overlap",
                                  "ckpt_os_system", "ckpt_strides_past_record"])
def test_bad_vae_file(corpus, sd15_f16, name):
    path = corpus[name]
    with pytest.raises(ModelLoadError):
        read_model_file(path)   # guards the next line, as above
    with pytest.raises(ModelLoadError, match=CASE[name].match) as e:
        StableDiffusion(sd15_f16, vae=path, threads=1)
    _names_file(str(e.value), path)


# ---- every load in a child process: it must exit normally --------------------------------------------------------

_CHILD = r"""
import json, logging, sys
from pathlib import Path
from click.testing import CliRunner
import pysdcpp
from pysdcpp.cli import main

logging.getLogger().addHandler(logging.NullHandler())   # keep the native log out of the CLI's output
cases, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
for name, path in cases:
    print(json.dumps({"start": name}), flush=True)
    res = {"case": name, "error": None, "message": ""}
    try:
        pysdcpp.StableDiffusion(path, threads=1).close()
    except Exception as e:
        res.update(error=type(e).__name__, message=str(e))
    png = out / (name + ".png")
    r = CliRunner().invoke(main, ["generate", path, "-p", "x", "-W", "64", "-H", "64", "--steps", "1", "-t", "1",
                                  "-o", str(png)])
    res.update(cli_exit=r.exit_code, cli_output=r.output, cli_exception=repr(r.exception), png=png.exists())
    print(json.dumps(res), flush=True)
"""


@pytest.fixture(scope="module")
def child_results(corpus, tmp_path_factory) -> dict[str, dict]:
    """StableDiffusion(path) and `pysdcpp generate path` for every case, in child processes: a case that kills its
    process is recorded with the signal and the rest go on in a new one."""
    work = tmp_path_factory.mktemp("hostile-child")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(pysdcpp.__file__).resolve().parent.parent)]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    results: dict[str, dict] = {}
    todo = [c.name for c in CASES]
    while todo:
        (work / "cases.json").write_text(json.dumps([[n, str(corpus[n])] for n in todo]))
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(work / "cases.json"), str(work)], env=env,
                              capture_output=True, text=True, timeout=600)
        started = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if "start" in msg:
                started = msg["start"]
            else:
                results[msg["case"]] = msg | {"returncode": 0}
                started = None
        if started is None and proc.returncode != 0:   # died outside any case
            results.update({n: {"returncode": proc.returncode, "stderr": proc.stderr[-2000:]} for n in todo
                            if n not in results})
        elif started is not None:
            results[started] = {"returncode": proc.returncode, "stderr": proc.stderr[-2000:]}
        todo = [n for n in todo if n not in results]
    return results


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_stable_diffusion_in_child_process(corpus, child_results, name):
    r = child_results[name]
    assert r["returncode"] == 0, f"the process died (exit {r['returncode']}) loading {name}: {r.get('stderr')}"
    path = corpus[name]
    assert r["error"] == "ModelLoadError", r
    assert re.search(CASE[name].match, r["message"]), r["message"]
    _names_file(r["message"], path)
    assert r["cli_exit"] == 1 and "SystemExit" in r["cli_exception"], r
    assert "Traceback" not in r["cli_output"] and r["cli_output"].startswith("Error: "), r["cli_output"]
    assert not r["png"]


@pytest.mark.parametrize("name", REJECTED)
def test_cli_generate(corpus, name, tmp_path):
    path = corpus[name]
    with pytest.raises(ModelLoadError):
        read_model_file(path)   # refused in Python: the command never reaches the native loader
    out = tmp_path / "out.png"
    result = CliRunner().invoke(main, ["generate", str(path), "-p", "x", "-W", "64", "-H", "64", "--steps", "1",
                                       "-o", str(out)])
    assert re.search(CASE[name].match, _one_line_error(result, path))
    assert list(tmp_path.iterdir()) == []


# ---- inspect and convert -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_cli_inspect(corpus, name):
    path = corpus[name]
    result = CliRunner().invoke(main, ["inspect", str(path)])
    if CASE[name].readable:
        assert result.exit_code == 0, result.output
        return
    assert re.search(CASE[name].match, _one_line_error(result, path))


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_convert(corpus, name, tmp_path):
    path, case = corpus[name], CASE[name]
    with pytest.raises(FormatError, match=case.convert_match or case.match) as e:
        convert(path, tmp_path / "out.gguf")
    assert list(tmp_path.iterdir()) == [], "convert left a file behind"
    assert "\n" not in str(e.value)
    if case.convert_match != NOT_SD:   # see test_convert_of_another_model_names_the_file
        _names_file(str(e.value), path)


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_cli_convert(corpus, name, tmp_path):
    path, case = corpus[name], CASE[name]
    result = CliRunner().invoke(main, ["convert", str(path), "-o", str(tmp_path / "out.gguf")])
    line = _one_line_error(result, path if case.convert_match != NOT_SD else None)
    assert re.search(case.convert_match or case.match, line), line
    assert list(tmp_path.iterdir()) == []


def test_convert_of_another_model_names_the_file(corpus, tmp_path):
    path = corpus["st_not_sd"]
    with pytest.raises(FormatError) as e:
        convert(path, tmp_path / "out.gguf")
    _names_file(str(e.value), path)


# ---- the converter's readers, called directly --------------------------------------------------------------------

@pytest.mark.parametrize("name", [c.name for c in CASES if c.suffix != ".gguf" and not c.readable
                                  and c.convert_match != NOT_SD])
def test_read_checkpoint_file(corpus, name):
    from pysdcpp.format.checkpoint_io import read_checkpoint_file

    case, path = CASE[name], corpus[name]
    with pytest.raises(FormatError, match=case.convert_match or case.match):
        # readers are lazy: load every tensor too, as a conversion would
        for t in read_checkpoint_file(path):
            t.load()


def test_loads_stay_inside_records(tmp_path):
    """A tensor whose strides reach past its storage record is refused when read, not read out of bounds (the
    loader the ALTER mask reader calls directly)."""
    from pysdcpp.format.checkpoint_io import lazy_tensor_loader, load_torch_pickle

    p = tmp_path / "m.pth"
    p.write_bytes(_torch_zip(_torch_pickle([_TensorRef("0", (4, 4), stride=(4, 1)),
                                            _TensorRef("0", (4, 4), stride=(5, 1))]), {"0": b"\0" * 64})(tmp_path))
    obj, zf, prefix = load_torch_pickle(p)
    assert lazy_tensor_loader(obj[0], zf, prefix)().shape == (4, 4)
    with pytest.raises(FormatError, match="needs 76 bytes of storage record archive/data/0, which holds 64"):
        lazy_tensor_loader(obj[1], zf, prefix)()


# ---- ALTER masks: pruning_mask.pth (hostile pickles) and JSON files of the wrong shape --------------------------

def _mask_groups(value: float = 1.0) -> list:
    """pruning_mask.pth's layout for the SD1.5 UNet: groups of (1000, piece) 0/1 tensors."""
    from pysdcpp.format.unet import piece_structure

    return [[torch.full((1000, w), value) for w in pieces] for pieces in piece_structure("sd1")]


def _mask_file(kind: str) -> Callable[[Path], bytes]:
    def make(d: Path) -> bytes:
        if kind == "os_system":
            return _torch_zip(_torch_pickle([[_hostile("os_system")(d)]]))(d)
        if kind == "eval_in_group":
            return _torch_zip(_torch_pickle([[_TensorRef("0", (1000, 1))], [_hostile("eval")(d)]]),
                              {"0": b"\0" * 4000})(d)
        if kind == "legacy":
            return pickle.dumps([[_hostile("os_system")(d)]], protocol=2)
        if kind == "torch_save_subprocess":
            return _torch_save(obj=[[torch.ones(1000, 1), _hostile("subprocess")(d)]])(d)
        if kind == "dict":
            return _torch_save(obj={"masks": torch.ones(1000, 1)})(d)
        if kind == "wrong_pieces":
            return _torch_save(obj=[[torch.ones(1000, 3)]])(d)
        if kind == "values_2":
            return _torch_save(obj=_mask_groups(2.0))(d)
        if kind == "missing_records":
            return _torch_save(_drop_records, obj=_mask_groups())(d)
        if kind == "strides_past_record":
            from pysdcpp.format.unet import piece_structure

            groups = [[_TensorRef(f"{gi}-{pi}", (1000, w), numel=1000 * w) for pi, w in enumerate(pieces)]
                      for gi, pieces in enumerate(piece_structure("sd1"))]
            groups[0][0] = _TensorRef("0-0", (1000, 1), stride=(10 ** 6, 1))
            records = {f"{gi}-{pi}": b"\0" * (4000 * w) for gi, pieces in enumerate(piece_structure("sd1"))
                       for pi, w in enumerate(pieces)}
            return _torch_zip(_torch_pickle(groups), records)(d)
        raise KeyError(kind)
    return make


MASK_CASES = {
    "os_system": "refusing to load global posix.system",
    "eval_in_group": "refusing to load global (__builtin__|builtins).eval",
    "legacy": "legacy",
    "torch_save_subprocess": "refusing to load global (commands|subprocess).check_call",
    "dict": "expected a nested list of mask tensors",
    "wrong_pieces": "do not match this UNet's prunable units",
    "values_2": "mask values must be exactly 0 or 1, found \\[2.0",
    "missing_records": "which the archive does not hold",
    "strides_past_record": "needs 3996000004 bytes of storage record",
}


@pytest.fixture(scope="module")
def reduced_folder(tmp_path_factory) -> Path:
    """A reduced SD1.5 diffusers folder (same layout, few channels): the base of the ALTER folders below."""
    return synthetic.write_diffusers_folder(tmp_path_factory.mktemp("reduced") / "sd1-reduced", "sd1", 0, True)


@pytest.fixture(scope="module")
def mask_corpus(corpus) -> dict[str, Path]:
    d = next(iter(corpus.values())).parent / "masks"
    d.mkdir()
    out = {}
    for kind in MASK_CASES:
        (d / kind).mkdir()
        p = d / kind / "pruning_mask.pth"
        p.write_bytes(_mask_file(kind)(next(iter(corpus.values())).parent))
        out[kind] = p
    return out


def _alter_folder(reduced: Path, mask: Path, where: Path) -> Path:
    """An ALTER output folder: the reduced model's components and a pruning_mask.pth."""
    folder = where / "alter-run"
    folder.mkdir()
    for component in reduced.iterdir():
        (folder / component.name).symlink_to(component)
    shutil.copy(mask, folder / "pruning_mask.pth")
    return folder


@pytest.mark.parametrize("kind", list(MASK_CASES))
def test_pruning_mask_reader(corpus, mask_corpus, kind):
    with pytest.raises(FormatError, match=MASK_CASES[kind]) as e:
        read_pruning_mask(mask_corpus[kind], "sd1")
    _names_file(str(e.value), mask_corpus[kind])


@pytest.mark.parametrize("kind", list(MASK_CASES))
def test_pruning_mask_convert(corpus, mask_corpus, reduced_folder, kind, tmp_path):
    folder = _alter_folder(reduced_folder, mask_corpus[kind], tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FormatError, match=MASK_CASES[kind]):
        convert(folder, out / "alter.gguf")
    result = CliRunner().invoke(main, ["convert", str(folder), "-o", str(out / "alter.gguf")])
    assert re.search(MASK_CASES[kind], _one_line_error(result, Path("pruning_mask.pth")))
    assert list(out.iterdir()) == []


def test_pruning_mask_reader_accepts_a_good_file(corpus, tmp_path):
    """The baseline the cases above break: a well-formed mask file reads."""
    p = tmp_path / "pruning_mask.pth"
    p.write_bytes(_torch_save(obj=_mask_groups(1.0))(tmp_path))
    routing = read_pruning_mask(p, "sd1")
    assert routing.masks.all()


_UNITS = 34   # prunable units of the SD1.x UNet


def _json_masks() -> dict[str, tuple[object, str]]:
    ones = [[1] * _UNITS]
    return {
        "not_json": (b"{experts: [[1, 0]]", "not valid JSON"),
        "not_utf8": (b"\xff\xfe\x00{", "not valid JSON"),
        "list": ([[1] * _UNITS], "must hold a JSON object"),
        "unknown_key": ({"experts": ones, "routing": 1}, "unknown key 'routing'"),
        "rows_too_short": ({"experts": [[1] * (_UNITS - 1)]}, f"must have {_UNITS} entries.*found lengths \\[33\\]"),
        "rows_ragged": ({"experts": [[1] * _UNITS, [1] * 3], "timestep_expert": [0] * 1000},
                        "found lengths \\[3, 34\\]"),
        "experts_not_list": ({"experts": "all"}, "must be a non-empty list of lists"),
        "experts_empty": ({"experts": []}, "must be a non-empty list of lists"),
        "values_2": ({"experts": [[2] * _UNITS]}, "mask values must be exactly 0 or 1"),
        "values_strings": ({"experts": [["1"] * _UNITS]}, "only the numbers 0 and 1"),
        "timestep_masks_999": ({"timestep_masks": [[1] * _UNITS] * 999}, "one row per timestep \\(1000\\), found 999"),
        "timestep_expert_short": ({"experts": ones * 2, "timestep_expert": [0] * 10}, "a list of 1000 integers"),
        "timestep_expert_range": ({"experts": ones * 2, "timestep_expert": [5] * 1000}, "refers to expert 5"),
        "no_table": ({"experts": ones * 2}, "2 experts but no 'timestep_expert' table"),
        "unknown_unit": ({"units": ["output_blocks.99.0"], "experts": [[0]]}, "unknown unit 'output_blocks.99.0'"),
        "units_vs_rows": ({"units": ["input_blocks.1.0", "input_blocks.2.0"], "experts": [[1, 0, 1]]},
                          "must have 2 entries"),
        "both_kinds": ({"experts": ones, "timestep_masks": ones}, "either 'timestep_masks' or 'experts'"),
        "version_2": ({"version": 2, "experts": ones}, "version 2"),
    }


@pytest.fixture(scope="module")
def json_masks(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("json-masks")
    out = {}
    for name, (doc, _) in _json_masks().items():
        p = d / f"{name}.json"
        p.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
        out[name] = p
    return out


@pytest.mark.parametrize("name", list(_json_masks()))
def test_json_masks_stable_diffusion(sd15_f16, json_masks, name):
    """Checked before the native library loads anything (so in this process)."""
    with pytest.raises(ValueError, match=_json_masks()[name][1]) as e:
        StableDiffusion(sd15_f16, alter_masks=json_masks[name], threads=1)
    _names_file(str(e.value), json_masks[name])


@pytest.mark.parametrize("name", list(_json_masks()))
def test_json_masks_cli(sd15_f16, reduced_folder, json_masks, name, tmp_path):
    match = _json_masks()[name][1]
    png = tmp_path / "out.png"
    result = CliRunner().invoke(main, ["generate", str(sd15_f16), "-p", "x", "-W", "64", "-H", "64", "--steps", "1",
                                       "--alter-masks", str(json_masks[name]), "-o", str(png)])
    assert re.search(match, _one_line_error(result, json_masks[name]))
    with pytest.raises(FormatError, match=match):
        convert(reduced_folder, tmp_path / "out.gguf", alter_masks=json_masks[name])
    result = CliRunner().invoke(main, ["convert", str(reduced_folder), "--alter-masks", str(json_masks[name]),
                                       "-o", str(tmp_path / "out.gguf")])
    assert re.search(match, _one_line_error(result, json_masks[name]))
    assert list(tmp_path.iterdir()) == []


# ---- the GGUF checks accept what they should ---------------------------------------------------------------------

def test_gguf_header_reads_as_gguf_package_reads_it(tmp_path, sd15_f16):
    """pysdcpp.modelfile's own GGUF parser gives the metadata and tensor list the gguf package's reader gives, on a
    file with every kind of metadata value and on the SD1.5 fixture."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    p = tmp_path / "kinds.gguf"
    w = GGUFWriter(p, "stable-diffusion")
    w.add_string("s", "h\u00e9llo")
    w.add_uint8("u8", 200)
    w.add_int8("i8", -3)
    w.add_uint16("u16", 60000)
    w.add_int16("i16", -300)
    w.add_uint32("u32", 4000000000)
    w.add_int32("i32", -5)
    w.add_float32("f32", 0.1)
    w.add_bool("b", True)
    w.add_uint64("u64", 2 ** 63 + 5)
    w.add_int64("i64", -2 ** 40)
    w.add_float64("f64", 0.1)
    w.add_array("ai", [1, 2, 3])
    w.add_array("af", [0.5, 0.25])
    w.add_array("as", ["a", "bc", ""])
    w.add_array("ab", [True, False])
    w.add_array("empty", [])
    w.add_custom_alignment(64)
    w.add_tensor("a", np.ones((3, 5), np.float32))
    w.add_tensor("b", np.ones((7,), np.float16))
    w.add_tensor("c", np.ones((2, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    def reference(path):
        r = GGUFReader(path)
        meta = {}
        for key, f in r.fields.items():
            if key.startswith("GGUF."):
                continue
            if f.types[0] == GGUFValueType.STRING:
                meta[key] = bytes(f.parts[f.data[0]]).decode()
            elif f.types[0] == GGUFValueType.ARRAY:
                meta[key] = ([bytes(f.parts[i]).decode() for i in f.data] if f.types[-1] == GGUFValueType.STRING
                             else [v for i in f.data for v in f.parts[i].tolist()])
            else:
                meta[key] = f.parts[f.data[0]].tolist()[0]
        return meta, [(t.name, t.tensor_type.name, tuple(int(x) for x in t.shape), int(t.n_bytes)) for t in r.tensors]

    for path in (p, sd15_f16):
        mf = read_model_file(path)
        meta, tensors = reference(path)
        assert mf.metadata == meta
        assert [(t.name, t.type, t.shape, t.nbytes) for t in mf.tensors] == tensors
    assert mf.family == "sd1"
