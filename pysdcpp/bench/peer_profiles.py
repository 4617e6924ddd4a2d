"""Where one evaluation's time goes in each runtime of the peer benchmark (`--peers ... --profile`): ours from the
accelerated library's node profiler, OpenVINO's per-node performance counters, PyTorch's profiler; each grouped
into pysdcpp.profile.OP_CLASSES, with a table."""

from __future__ import annotations

import re
import time

from ..profile import OP_CLASSES, by_class, node_profile


def _entry(seconds: float, kinds: dict[str, float], classify) -> dict:
    """A profile: the profiled run's wall time, seconds per kind and per op class."""
    return {"seconds": seconds, "profiled_seconds": sum(kinds.values()), "kinds": kinds,
            "classes": by_class(kinds, classify)}


def _bracketed(kind: str) -> str:
    """The class a peer's kind names at its end: "Convolution brgconv_avx512_f32 [3x3 convs]"."""
    return kind[kind.rindex("[") + 1:-1]


def profile_ours(run) -> dict:
    """`run()`: one evaluation in the accelerated library (ours or upstream's path through it)."""
    from ..profile import op_class

    t0 = time.perf_counter()
    with node_profile() as p:
        run()
    return _entry(time.perf_counter() - t0, {k: v["seconds"] for k, v in p.kinds.items()}, op_class)


# OpenVINO's executed layer types (the runtime model's layerType) by class; convolutions go by their kernel size,
# MatMuls by whether one side is a constant (a layer) or not (attention), Subgraphs (fused snippets) by what they
# fused.
_OV_TYPES = (
    ("linear layers", r"^FullyConnected$"),
    ("attention", r"^(ScaledDotProductAttention|Softmax|SoftMax)$"),
    ("norms", r"^(MVN|GroupNormalization|NormalizeL2|RMS)$"),
    ("data movement", r"^(Reorder|Transpose|Reshape|Concat|Concatenation|Interpolate|Gather|Split|VariadicSplit|"
                      r"StridedSlice|ShapeOf|Broadcast|Pad|Squeeze|Unsqueeze|Tile|Input|Parameter|Output|Result|"
                      r"Const|Constant)$"),
)


def conv_class(weights_shape) -> str:
    """The class of a convolution by its weight's shape (..., kh, kw): 3x3 or 1x1 convs, else "other"."""
    k = tuple(weights_shape[-2:]) if weights_shape is not None and len(weights_shape) >= 4 else None
    return "3x3 convs" if k == (3, 3) else "1x1 convs" if k == (1, 1) else "other"


def ov_class(layer_type: str, weights_shape: list | None, const_input: bool, fused: str) -> str:
    """The OP_CLASSES entry of one node of OpenVINO's runtime model."""
    if layer_type == "Convolution":
        return conv_class(weights_shape)
    if layer_type == "MatMul":
        return "linear layers" if const_input else "attention"
    if layer_type == "Subgraph":
        return "attention" if re.search(r"ScaledDotProductAttention|Softmax|MatMul", fused) else "element-wise"
    for name, pattern in _OV_TYPES:
        if re.search(pattern, layer_type):
            return name
    return "element-wise"   # Eltwise, Add, Multiply, Swish, Gelu, PowerStatic, Math, ...


def profile_openvino(compiled, args) -> dict:
    """One inference of a model compiled with PERF_COUNT on: the nodes' real time, by the runtime model's types."""
    def text(rt, key):
        return rt[key].astype(str) if key in rt else ""

    info = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        layer = text(rt, "layerType")
        inputs = [op.input_value(i).get_node() for i in range(op.get_input_size())]
        const = any(text(n.get_rt_info(), "layerType") in ("Const", "Constant") for n in inputs[1:])
        shape = None
        if layer == "Convolution" and op.get_input_size() > 1 and op.input(1).get_partial_shape().is_static:
            shape = [d.get_length() for d in op.input(1).get_partial_shape()]
        info[op.get_friendly_name()] = ov_class(layer, shape, const, text(rt, "originalLayersNames"))
    request = compiled.create_infer_request()
    request.infer(args)   # warm
    t0 = time.perf_counter()
    request.infer(args)
    seconds = time.perf_counter() - t0
    # a kind: the layer type and its implementation, with the class of its nodes (3x3 and 1x1 convs apart)
    split: dict[str, float] = {}
    for p in request.profiling_info:
        kind = f"{p.node_type} {p.exec_type} [{info.get(p.node_name, 'other')}]"
        split[kind] = split.get(kind, 0.0) + p.real_time.total_seconds()
    return _entry(seconds, split, _bracketed)


# PyTorch's aten ops by class (self CPU time); convolutions by their weight's kernel size.
_TORCH_OPS = (
    ("linear layers", r"^aten::(addmm|mm|linear|matmul)$"),
    ("attention", r"scaled_dot_product|^aten::(bmm|baddbmm|_softmax|softmax)$|flash_attention"),
    ("norms", r"^aten::(native_group_norm|group_norm|native_layer_norm|layer_norm)$"),
    ("data movement", r"^aten::(copy_|contiguous|clone|cat|upsample_nearest2d|_unsafe_view|view|reshape|permute|"
                      r"transpose|empty|empty_like|as_strided|to|_to_copy|chunk|split|slice|select|expand)$"),
)


def torch_class(name: str, shapes: list) -> str:
    if "conv" in name:
        return conv_class(shapes[1] if len(shapes) > 1 else None)
    for cls, pattern in _TORCH_OPS:
        if re.search(pattern, name):
            return cls
    return "element-wise"


def profile_torch(run) -> dict:
    """`run()`: one evaluation under torch.profiler (self CPU time per aten op and input shapes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()   # inside: the profiler's start-up is not the run's
        run()
        seconds = time.perf_counter() - t0
    kinds: dict[str, float] = {}
    for e in prof.key_averages(group_by_input_shape=True):
        if e.self_cpu_time_total <= 0:
            continue
        kind = f"{e.key} [{torch_class(e.key, list(e.input_shapes or []))}]"
        kinds[kind] = kinds.get(kind, 0.0) + e.self_cpu_time_total * 1e-6
    return _entry(seconds, kinds, _bracketed)


def profile_rows(report: dict, task: str) -> tuple[list[str], list[tuple[str, list[tuple[float, float | None]]]]]:
    """One task's profile table, for every renderer: the runtimes profiled, and per op class (then "sum", of the
    classes) each runtime's seconds with its ratio over pysdcpp's (None for pysdcpp, or where ours is under
    0.5 ms)."""
    profiles = report.get("profile") or {}
    rts = [rt for rt in profiles if task in profiles[rt]]
    ours = profiles.get("pysdcpp", {}).get(task)

    def seconds(p, cls):
        return p["profiled_seconds"] if cls == "sum" else p["classes"][cls]

    rows = []
    for cls in (*OP_CLASSES, "sum"):
        cells = []
        for rt in rts:
            s = seconds(profiles[rt][task], cls)
            o = None if ours is None or rt == "pysdcpp" else seconds(ours, cls)
            cells.append((s, s / o if o is not None and o > 5e-4 else None))
        rows.append((cls, cells))
    return rts, rows


def format_profile_table(report: dict) -> str:
    """Per task: seconds per op class in each profiled runtime, and each runtime's time over pysdcpp's."""
    lines = []
    for task in report["tasks"]:
        rts, rows = profile_rows(report, task)
        if not rts:
            continue
        head = f"{task:<16}" + "".join(f"{rt:>16}" for rt in rts)
        lines += ["", head, "-" * len(head)]
        for cls, cells in rows:
            row = f"{cls:<16}"
            for rt, (s, ratio) in zip(rts, cells):
                cell = f"{s:.3f}s" + ("" if rt == "pysdcpp" else f" ({ratio:.2f}x)" if ratio is not None else "        ")
                row += f"{cell:>16}"
            lines.append(row)
    for rt, tasks in report.get("profile_errors", {}).items():
        lines += [f"no profile of {rt} {task}: {error}" for task, error in tasks.items()]
    if lines:
        lines.append("profiled run (one, after the timed ones): seconds per op class; (x): that runtime's over "
                     "pysdcpp's, above 1 means pysdcpp is faster; sum: of the classes (OpenVINO's counters add up "
                     "to 1.03-1.36x its wall time)")
    return "\n".join(lines)
