"""The 3x3 convolution benchmark (`pysdcpp bench --layers`) and its table.

`layer_bench`: every distinct 3x3 stride-1 convolution of a family's UNet (SD1.5 by default) and the VAE at an image
size, each algorithm in one process, repetitions interleaved (A B C A B C ...) so machine drift hits all alike.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np

from ..bench_report import as_run_speedup
from ..errors import GenerationError
from ..format.families import UNET_CONFIGS, VAE_CONFIG
from ..format.unet import level_sizes, unet_blocks
from ..format.vae import vae_blocks
from ..layers import conv2d_3x3, conv_plan
from .machine import build_info, footer, machine_info, utc_now


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


def conv_shapes(size: int, family: str = "sd1") -> dict[ConvShape, list[str]]:
    """Distinct 3x3 stride-1 convs of a family's UNet and the VAE at `size` px, with the layers that have them (the
    stride-2 downsamplers keep upstream's path)."""
    latent = size // 8
    cfg = UNET_CONFIGS[family]
    shapes: dict[ConvShape, list[str]] = {}

    def add(name: str, cin: int, cout: int, hw: int) -> None:
        shapes.setdefault(ConvShape(cin, cout, hw, hw), []).append(name)

    boc = cfg["block_out_channels"]
    add("unet.conv_in.weight", cfg["in_channels"], boc[0], latent)
    for b in unet_blocks(cfg):
        hw = level_sizes(len(boc), latent, latent)[b.level][0]
        if b.kind == "resnet":
            add(f"unet.{b.diffusers}.conv1.weight", b.resnet_in, b.cout, hw)
            add(f"unet.{b.diffusers}.conv2.weight", b.cout, b.cout, hw)
        elif b.kind == "upsample":
            add(f"unet.{b.diffusers}.conv.weight", b.cin, b.cout, hw)
    add("unet.conv_out.weight", boc[0], cfg["out_channels"], latent)
    for b in vae_blocks(VAE_CONFIG):
        hw = size >> b.shift
        if b.kind == "resnet":
            add(f"vae.{b.name}.conv1.weight", b.cin, b.cout, hw)
            add(f"vae.{b.name}.conv2.weight", b.cout, b.cout, hw)
        elif b.kind == "conv" and b.kernel == 3 and b.stride == 1:
            add(f"vae.{b.name}.weight", b.cin, b.cout, hw)
    return shapes


@dataclass
class LayerResult:
    shape: ConvShape
    layers: int
    example: str
    seconds: dict[str, list[float]] = field(default_factory=dict)
    first: dict[str, list[float]] = field(default_factory=dict)
    max_error: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)   # algorithms that failed on this shape, and why

    def median(self, algo: str) -> float:
        return statistics.median(self.seconds[algo])


# The layer table's default columns: upstream's path and every variant the cost model uses for SD1.5's layers
# (layers.conv_plan; winograd_f4_ggml_gemm for the output convs' fewer than 16 channels).
LAYER_ALGORITHMS = ("im2col", "winograd_f4", "winograd_f4_fused", "winograd_f2_fused", "winograd_f4_ggml_gemm")


def layer_bench(size: int = 512, threads: int = 2, repeat: int = 3,
                algorithms: tuple[str, ...] = LAYER_ALGORITHMS, progress=None,
                only: str | None = None, family: str = "sd1") -> dict:
    shapes = conv_shapes(size, family)
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
                try:
                    y, secs = conv2d_3x3(x, w, b, algorithm=algo, threads=threads, weight_f16=True, repeat=2)
                except GenerationError as e:   # e.g. the harness's graph does not fit in memory
                    res.errors[algo] = str(e)
                    res.first[algo].append(math.nan)
                    res.seconds[algo].append(math.nan)
                    continue
                res.first[algo].append(secs[0])
                res.seconds[algo].append(secs[1])
                outputs[algo] = y
        ref = _reference_sample(x, w.astype(np.float16).astype(np.float32), b)
        for algo in res.errors:
            res.max_error[algo] = math.nan
        for algo, y in outputs.items():
            got = _sample(y)
            res.max_error[algo] = float(np.abs(got - ref).max() / np.abs(ref).max())
        results.append(res)
        if progress:
            progress(i + 1, len(shapes), res)
    return {"kind": "layers", "family": family, "size": size, "threads": threads, "repeat": repeat, "algorithms": list(algorithms),
            "date": utc_now(),
            "machine": machine_info(), "build": build_info(),
            "rows": [{"C": r.shape.C, "K": r.shape.K, "H": r.shape.H, "W": r.shape.W, "N": r.shape.N,
                      "macs": r.shape.macs, "layers": r.layers, "example": r.example,
                      "median_s": {a: r.median(a) for a in algorithms},
                      "speedup_vs_im2col": {a: r.median("im2col") / r.median(a) for a in algorithms}
                      if "im2col" in algorithms else {},
                      "gflops": {a: 2 * r.shape.macs / r.median(a) / 1e9 for a in algorithms},
                      "first_call_s": {a: statistics.median(r.first[a]) for a in algorithms},
                      "max_error": r.max_error, "seconds": r.seconds, "errors": r.errors,
                      "as_run": conv_plan(r.shape.N, r.shape.C, r.shape.H, r.shape.W, r.shape.K)}
                     for r in results]}


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


def format_layer_table(report: dict) -> str:
    algos = report["algorithms"]
    head = f"{'C->K':>11} {'HxW':>9} {'n':>3} " + " ".join(f"{a + ' ms':>14}" for a in algos) + \
        " " + " ".join(f"{'x ' + a:>14}" for a in algos if a != "im2col") + f" {'as run':>24} {'max err':>9}"
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        cells = f"{str(r['C']) + '->' + str(r['K']):>11} {str(r['H']) + 'x' + str(r['W']):>9} {r['layers']:>3} "
        cells += " ".join(f"{r['median_s'][a] * 1e3:>14.2f}" for a in algos)
        if r["speedup_vs_im2col"]:
            cells += " " + " ".join(f"{r['speedup_vs_im2col'][a]:>14.2f}" for a in algos if a != "im2col")
        sp = as_run_speedup(r)
        cells += f" {r.get('as_run', '?') + (f' {sp:.2f}' if sp is not None else ''):>24}"
        cells += f" {max(r['max_error'].values()):>9.1e}"
        lines.append(cells)
    lines.append(footer(report, f"median of {report['repeat']}"))
    lines.append("as run: the variant the cost model picks for the layer in a model (winograd_f4 or winograd_f2: "
                 "filters hoisted; _fused: transformed inside the products) and its speedup over im2col.")
    return "\n".join(lines)
