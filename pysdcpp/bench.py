"""Benchmarks: commands that print tables and write JSON (never timed assertions).

`layer_bench`: every distinct 3x3 stride-1 convolution of the SD1.5 UNet and VAE at an image size, each
algorithm in one process, repetitions interleaved (A B C A B C ...) so machine drift hits all alike.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
from dataclasses import asdict, dataclass, field

import numpy as np

from .layers import conv2d_3x3


def machine_info() -> dict:
    cpu, flags = platform.processor() or "", []
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        if m := re.search(r"^model name\s*:\s*(.+)$", text, re.M):
            cpu = m.group(1).strip()
        if m := re.search(r"^flags\s*:\s*(.+)$", text, re.M):
            wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")
            flags = [f for f in m.group(1).split() if f in wanted]
    except OSError:
        pass
    return {"cpu": cpu, "machine": platform.machine(), "logical_cores": os.cpu_count(), "simd": flags,
            "system": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


@dataclass(frozen=True)
class ConvShape:
    """A 3x3 stride-1 convolution: C -> K channels on an H x W map (padding 1), batch N."""

    C: int
    K: int
    H: int
    W: int
    N: int = 1

    @property
    def macs(self) -> int:
        return self.N * self.K * self.C * 9 * self.H * self.W


def sd15_conv_shapes(size: int) -> dict[ConvShape, list[str]]:
    """Distinct 3x3 stride-1 convs of the SD1.5 UNet and VAE at `size` px, with the layers that have them."""
    from converters.synthetic import UNET_CONFIGS, VAE_CONFIG, unet_parameters, vae_parameters

    latent = size // 8
    shapes: dict[ConvShape, list[str]] = {}

    def add(name: str, shape: tuple[int, ...], hw: int) -> None:
        if len(shape) == 4 and shape[2:] == (3, 3):
            shapes.setdefault(ConvShape(shape[1], shape[0], hw, hw), []).append(name)

    for name, shape in unet_parameters(UNET_CONFIGS["sd1"]):
        if not name.endswith(".weight") or "downsamplers" in name:
            continue  # stride-2 convs keep upstream's path
        if m := re.match(r"down_blocks\.(\d+)\.", name):
            hw = latent >> int(m[1])
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|upsamplers)", name):
            hw = latent >> (3 - int(m[1]) - (1 if m[2] == "upsamplers" else 0))
        elif name.startswith("mid_block."):
            hw = latent >> 3
        else:
            hw = latent
        add("unet." + name, shape, hw)
    for name, shape in vae_parameters(VAE_CONFIG):
        if not name.endswith(".weight") or "downsamplers" in name:
            continue
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)", name):
            hw = latent << (int(m[1]) + (1 if m[2] == "upsamplers" else 0))
        elif name.startswith("decoder.conv_out"):
            hw = size
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.", name):
            hw = size >> int(m[1])
        elif name.startswith("encoder.conv_in"):
            hw = size
        else:
            hw = latent
        add("vae." + name, shape, hw)
    return shapes


@dataclass
class LayerResult:
    shape: ConvShape
    layers: int
    example: str
    seconds: dict[str, list[float]] = field(default_factory=dict)
    first: dict[str, list[float]] = field(default_factory=dict)
    max_error: dict[str, float] = field(default_factory=dict)

    def median(self, algo: str) -> float:
        return statistics.median(self.seconds[algo])


def layer_bench(size: int = 512, threads: int = 2, repeat: int = 3,
                algorithms: tuple[str, ...] = ("im2col", "winograd_f4", "winograd_f2"), progress=None,
                only: str | None = None) -> dict:
    shapes = sd15_conv_shapes(size)
    results = []
    rng = np.random.default_rng(0)
    for i, (shape, names) in enumerate(sorted(shapes.items(), key=lambda kv: -kv[0].macs)):
        if only and not any(only in n for n in names):
            continue
        x = rng.standard_normal((shape.N, shape.C, shape.H, shape.W)).astype(np.float32)
        w = (rng.standard_normal((shape.K, shape.C, 3, 3)) / np.sqrt(9 * shape.C)).astype(np.float32)
        b = rng.standard_normal(shape.K).astype(np.float32)
        res = LayerResult(shape, len(names), names[0], {a: [] for a in algorithms}, first={a: [] for a in algorithms})
        outputs = {}
        for _ in range(repeat):
            for algo in algorithms:  # interleaved
                # Two runs per call: the first includes one-off work (Winograd's filter transform, which a
                # model does once per load), the second is the steady state every sampling step sees.
                y, secs = conv2d_3x3(x, w, b, algorithm=algo, threads=threads, weight_f16=True, repeat=2)
                res.first[algo].append(secs[0])
                res.seconds[algo].append(secs[1])
                outputs[algo] = y
        ref = _reference_sample(x, w.astype(np.float16).astype(np.float32), b)
        for algo, y in outputs.items():
            got = _sample(y)
            res.max_error[algo] = float(np.abs(got - ref).max() / np.abs(ref).max())
        results.append(res)
        if progress:
            progress(i + 1, len(shapes), res)
    return {"kind": "layers", "size": size, "threads": threads, "repeat": repeat, "algorithms": list(algorithms),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "build": _build(),
            "rows": [{"C": r.shape.C, "K": r.shape.K, "H": r.shape.H, "W": r.shape.W, "N": r.shape.N,
                      "macs": r.shape.macs, "layers": r.layers, "example": r.example,
                      "median_s": {a: r.median(a) for a in algorithms},
                      "speedup_vs_im2col": {a: r.median("im2col") / r.median(a) for a in algorithms}
                      if "im2col" in algorithms else {},
                      "gflops": {a: 2 * r.shape.macs / r.median(a) / 1e9 for a in algorithms},
                      "first_call_s": {a: statistics.median(r.first[a]) for a in algorithms},
                      "max_error": r.max_error, "seconds": r.seconds} for r in results]}


# The float64 reference over a whole 512x512 map would dominate the benchmark: check a fixed 16x16 window
# (plus its halo), which covers interior tiles and, at the corner, the padding.
_WIN = 16


def _sample(y: np.ndarray) -> np.ndarray:
    return y[:, :, :_WIN, :_WIN].astype(np.float64)


def _reference_sample(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    xs = np.pad(x[:, :, :_WIN + 1, :_WIN + 1].astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    xs = xs[:, :, :_WIN + 2, :_WIN + 2]
    win = np.lib.stride_tricks.sliding_window_view(xs, (3, 3), axis=(2, 3))
    out = np.einsum("ncyxij,kcij->nkyx", win, w.astype(np.float64)) + b[None, :, None, None]
    h, w_ = min(_WIN, x.shape[2]), min(_WIN, x.shape[3])
    return out[:, :, :h, :w_]


def _build() -> dict:
    from . import _native

    return _native.build_info()


def format_layer_table(report: dict) -> str:
    algos = report["algorithms"]
    head = f"{'C->K':>11} {'HxW':>9} {'n':>3} " + " ".join(f"{a + ' ms':>14}" for a in algos) + \
        " " + " ".join(f"{'x ' + a:>14}" for a in algos if a != "im2col") + f" {'max err':>9}"
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        cells = f"{str(r['C']) + '->' + str(r['K']):>11} {str(r['H']) + 'x' + str(r['W']):>9} {r['layers']:>3} "
        cells += " ".join(f"{r['median_s'][a] * 1e3:>14.2f}" for a in algos)
        if r["speedup_vs_im2col"]:
            cells += " " + " ".join(f"{r['speedup_vs_im2col'][a]:>14.2f}" for a in algos if a != "im2col")
        cells += f" {max(r['max_error'].values()):>9.1e}"
        lines.append(cells)
    m = report["machine"]
    lines.append(f"{m['cpu']} ({', '.join(m['simd'])}), {report['threads']} threads, {report['size']} px, "
                 f"median of {report['repeat']}, {report['date']}")
    return "\n".join(lines)


__all__ = ["layer_bench", "format_layer_table", "sd15_conv_shapes", "machine_info", "asdict"]
