"""Where a computation's time goes: the accelerated library's node profiler (patch 0012) per node kind, and the
op classes every runtime's profile is grouped into."""

from __future__ import annotations

import re

from . import _native

# The classes a profile is grouped into, in table order (one definition: the peer benchmark's OpenVINO and
# PyTorch profiles use them too).
OP_CLASSES = ("3x3 convs", "1x1 convs", "linear layers", "attention", "norms", "element-wise", "data movement",
              "other")

# Our node kinds (pysdcpp_ext.h: ggml's op names, MUL_MAT with its weight type, our nodes' labels) by class; the
# first pattern that matches wins.
_OUR_KINDS = (
    ("3x3 convs", r"^winograd\.|^IM2COL 3x3$|im2col 3x3$"),
    ("1x1 convs", r"^conv1x1$|^IM2COL 1x1$|im2col 1x1$"),
    ("linear layers", r"^linear$|^MUL_MAT(_ID)? \w+ weights$"),
    ("attention", r"^attention\.|^SOFT_MAX|^FLASH_ATTN|^MUL_MAT \w+ activations$"),
    ("norms", r"^(group_norm(\.emb)?|layer_norm)$|^(GROUP_|RMS_)?NORM$"),
    ("element-wise", r"^geglu$|^(ADD|ADD1|SUB|MUL|DIV|SCALE|SQR|SQRT|EXP|LOG|SIN|COS|CLAMP|ARANGE|TIMESTEP_EMBEDDING)$|"
                     r"^(SILU|GELU|GELU_QUICK|GELU_ERF|TANH|SIGMOID|RELU|SWIGLU|GEGLU|GEGLU_ERF|GEGLU_QUICK|REGLU)$"),
    ("data movement", r"^(CPY|CONT|DUP|CONCAT|UPSCALE|PAD|GET_ROWS|TRANSPOSE|PERMUTE|VIEW|RESHAPE|REPEAT)$|"
                      r"^inherit\.|^IM2COL"),
)


def op_class(kind: str) -> str:
    """The OP_CLASSES entry of one of our node kinds."""
    for name, pattern in _OUR_KINDS:
        if re.search(pattern, kind):
            return name
    return "other"


def by_class(kinds: dict[str, float], classify=op_class) -> dict[str, float]:
    """Seconds per kind -> seconds per op class (every class present, in OP_CLASSES order)."""
    out = dict.fromkeys(OP_CLASSES, 0.0)
    for kind, seconds in kinds.items():
        out[classify(kind)] += seconds
    return out


class node_profile:
    """`with node_profile() as p:` profiles every graph the accelerated library computes in the block (any
    context, any component); afterwards p.kinds maps each node kind to {"nodes", "seconds"} (thread 0's wall
    time from a node's start to the barrier after it: the kinds add up to the graphs' compute time) and
    p.classes groups the seconds by OP_CLASSES. One profile at a time per process."""

    def __init__(self):
        self.kinds: dict[str, dict] = {}
        self.classes: dict[str, float] = {}

    def __enter__(self):
        lib = _native.load("accelerated")
        with lib.lock:
            lib.lib.pysdcpp_profile_start()
        return self

    def __exit__(self, *exc) -> None:
        lib = _native.load("accelerated")
        ffi = lib.ffi
        name, count, ns = ffi.new("char[256]"), ffi.new("int64_t*"), ffi.new("int64_t*")
        with lib.lock:
            n = lib.lib.pysdcpp_profile_stop()
            for i in range(n):
                if lib.lib.pysdcpp_profile_kind(i, name, 256, count, ns) == 0:
                    self.kinds[ffi.string(name).decode()] = {"nodes": int(count[0]), "seconds": ns[0] * 1e-9}
        self.classes = by_class({k: v["seconds"] for k, v in self.kinds.items()})

    @property
    def seconds(self) -> float:
        """The profiled graphs' compute time."""
        return sum(v["seconds"] for v in self.kinds.values())
