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

from .bench_report import as_run_speedup
from .layers import conv2d_3x3, conv_plan


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


# The layer table's default columns: upstream's path and every variant the cost model uses for SD1.5's layers
# (layers.conv_plan; winograd_f4_ggml_gemm for the output convs' fewer than 16 channels).
LAYER_ALGORITHMS = ("im2col", "winograd_f4", "winograd_f4_fused", "winograd_f2_fused", "winograd_f4_ggml_gemm")


def layer_bench(size: int = 512, threads: int = 2, repeat: int = 3,
                algorithms: tuple[str, ...] = LAYER_ALGORITHMS, progress=None,
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
                      "max_error": r.max_error, "seconds": r.seconds,
                      "as_run": conv_plan(r.shape.N, r.shape.C, r.shape.H, r.shape.W, r.shape.K)}
                     for r in results]}


@dataclass(frozen=True)
class AttentionShape:
    """One attention call: L_q queries against L_k keys, `heads` heads of size d, batch N."""

    Lq: int
    Lk: int
    heads: int
    d: int
    N: int = 1

    @property
    def flops(self) -> int:  # the two products, Q K^T and P V
        return 4 * self.N * self.heads * self.Lq * self.Lk * self.d


def sd_attention_shapes(family: str, size: int) -> dict[AttentionShape, list[str]]:
    """Distinct attention calls of a UNet (self- and cross-attention per level) and the VAE mid-block at
    `size` px, with the layers that make them. SD1.x: 8 heads of C/8; SD2.x: heads of 64 (stable-diffusion.cpp's
    reading of both configs)."""
    from converters.synthetic import UNET_CONFIGS, VAE_CONFIG

    cfg = UNET_CONFIGS[family]
    latent = size // 8
    context = 77
    shapes: dict[AttentionShape, list[str]] = {}
    for level, (channels, kind) in enumerate(zip(cfg["block_out_channels"], cfg["down_block_types"])):
        if "CrossAttn" not in kind:
            continue
        heads, d = (8, channels // 8) if family == "sd1" else (channels // 64, 64)
        tokens = (latent >> level) ** 2
        for attn, lk in (("attn1", tokens), ("attn2", context)):
            shapes.setdefault(AttentionShape(tokens, lk, heads, d), []).append(f"unet level {level} {attn}")
    tokens = latent ** 2
    vae_c = VAE_CONFIG["block_out_channels"][-1]
    shapes.setdefault(AttentionShape(tokens, tokens, 1, vae_c), []).append("vae mid_block attention")
    return shapes


def attention_bench(families: tuple[str, ...] = ("sd1", "sd2"), sizes: tuple[int, ...] = (512, 768),
                    threads: int = 2, repeat: int = 3, variants: tuple[str, ...] = ("upstream", "gemm", "fused"),
                    progress=None) -> dict:
    """Every distinct attention shape of the given families and sizes, each variant in this process, repetitions
    interleaved; time, GFLOP/s, compute buffer and error against float64 on a sample of query rows."""
    from .layers import attention

    todo: dict[AttentionShape, list[str]] = {}
    for family in families:
        for size in sizes:
            for shape, names in sd_attention_shapes(family, size).items():
                todo.setdefault(shape, []).extend(f"{family} {size}px {n}" for n in names)
    rng = np.random.default_rng(0)
    rows = []
    for i, (shape, names) in enumerate(sorted(todo.items(), key=lambda kv: -kv[0].flops)):
        c = shape.heads * shape.d
        q = (rng.standard_normal((shape.N, shape.Lq, c)) * 1.5).astype(np.float32)
        k = rng.standard_normal((shape.N, shape.Lk, c)).astype(np.float32)
        v = rng.standard_normal((shape.N, shape.Lk, c)).astype(np.float32)
        secs: dict[str, list[float]] = {a: [] for a in variants}
        first: dict[str, list[float]] = {a: [] for a in variants}
        buf: dict[str, int] = {}
        outs: dict[str, np.ndarray] = {}
        for _ in range(repeat):
            for a in variants:  # interleaved
                # Two runs per call: the first touches a freshly allocated compute buffer (page faults: 0.3 s for
                # upstream's 532 MB at 4096 tokens), the second is the steady state a model's sampling loop sees
                # (stable-diffusion.cpp keeps the UNet's compute buffer between steps).
                out, s, nbytes = attention(q, k, v, shape.heads, variant=a, threads=threads, repeat=2)
                first[a].append(s[0])
                secs[a].append(s[1])
                buf[a] = nbytes
                outs[a] = out[:, :64]
        ref = _attention_reference(q[:, :64], k, v, shape.heads)
        med = {a: statistics.median(secs[a]) for a in variants}
        rows.append({"Lq": shape.Lq, "Lk": shape.Lk, "heads": shape.heads, "d": shape.d, "N": shape.N,
                     "flops": shape.flops, "layers": names, "median_s": med, "seconds": secs,
                     "first_call_s": {a: statistics.median(first[a]) for a in variants},
                     "gflops": {a: shape.flops / med[a] / 1e9 for a in variants},
                     "speedup_vs_upstream": {a: med["upstream"] / med[a] for a in variants}
                     if "upstream" in variants else {},
                     "compute_bytes": buf,
                     "rel_error": {a: float(np.linalg.norm(outs[a] - ref) / np.linalg.norm(ref)) for a in variants}})
        if progress:
            progress(i + 1, len(todo), shape)
    return {"kind": "attention", "families": list(families), "sizes": list(sizes), "size": "/".join(map(str, sizes)),
            "threads": threads, "repeat": repeat, "variants": list(variants),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "build": _build(), "rows": rows}


def _attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int) -> np.ndarray:
    n, lq, c = q.shape
    d = c // heads

    def split(x):
        return x.astype(np.float64).reshape(n, -1, heads, d).transpose(0, 2, 1, 3)

    s = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(d)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ split(v)).transpose(0, 2, 1, 3).reshape(n, lq, c)


def format_attention_table(report: dict) -> str:
    vs = report["variants"]
    head = f"{'Lq x Lk':>12} {'heads x d':>10} " + " ".join(f"{a + ' ms':>13}" for a in vs) + " " + \
        " ".join(f"{'x ' + a:>9}" for a in vs if a != "upstream") + " " + \
        " ".join(f"{a + ' MB':>11}" for a in vs) + f" {'GFLOP/s':>8} {'rel err':>8}  layers"
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        best = min(vs, key=lambda a: r["median_s"][a])
        cells = f"{str(r['Lq']) + 'x' + str(r['Lk']):>12} {str(r['heads']) + 'x' + str(r['d']):>10} "
        cells += " ".join(f"{r['median_s'][a] * 1e3:>13.1f}" for a in vs)
        if r["speedup_vs_upstream"]:
            cells += " " + " ".join(f"{r['speedup_vs_upstream'][a]:>9.2f}" for a in vs if a != "upstream")
        cells += " " + " ".join(f"{r['compute_bytes'][a] / 2**20:>11.1f}" for a in vs)
        cells += f" {r['gflops'][best]:>8.1f} {max(r['rel_error'].values()):>8.1e}  {', '.join(r['layers'][:2])}"
        cells += f" (+{len(r['layers']) - 2})" if len(r["layers"]) > 2 else ""
        lines.append(cells)
    lines.append(_footer(report, f"median of {report['repeat']}, GFLOP/s of the fastest variant"))
    return "\n".join(lines)


def sd15_linear_shapes(size: int) -> dict[tuple[int, int, int], list[str]]:
    """Distinct linear layers (rows, K, N) of SD1.5's UNet transformer blocks at `size` px, batch 1: per latent
    level the attention projections, the feed-forward pair (GEGLU: C -> 8C, 4C -> C) and the cross-attention keys
    and values over the 77-token context, with the layers that make them."""
    side = size // 8
    levels = [(320, side * side, "down_blocks.0 / up_blocks.3"), (640, (side // 2) ** 2, "down_blocks.1 / up_blocks.2"),
              (1280, (side // 4) ** 2, "down_blocks.2 / up_blocks.1"), (1280, (side // 8) ** 2, "mid_block")]
    shapes: dict[tuple[int, int, int], list[str]] = {}
    for c, tokens, where in levels:
        for (rows, k, n), what in (((tokens, c, c), "attn q/k/v/out"), ((tokens, c, 8 * c), "ff proj (GEGLU)"),
                                   ((tokens, 4 * c, c), "ff out"), ((77, 768, c), "cross-attn k/v")):
            shapes.setdefault((rows, k, n), []).append(f"{where} {what}")
    return shapes


def linear_bench(size: int = 512, threads: int = 2, repeat: int = 5, paths: tuple[str, ...] = ("upstream", "fast"),
                 progress=None) -> dict:
    """Every distinct linear layer of SD1.5's UNet at `size` px, F16 weights, each path in this process,
    repetitions interleaved; steady-state times (second run of each call)."""
    from .layers import linear

    rng = np.random.default_rng(0)
    shapes = sd15_linear_shapes(size)
    rows_out = []
    for i, ((rows, k, n), names) in enumerate(sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2])):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        secs: dict[str, list[float]] = {p: [] for p in paths}
        outputs = {}
        for _ in range(repeat):
            for p in paths:
                y, s = linear(x, w, b, path=p, threads=threads, repeat=2)
                secs[p].append(s[1])
                outputs[p] = y
        ref = x[:64].astype(np.float64) @ w.astype(np.float16).astype(np.float64).T + b
        med = {p: statistics.median(v) for p, v in secs.items()}
        row = {"rows": rows, "K": k, "N": n, "layers": names, "median_s": med, "seconds": secs,
               "speedup_vs_upstream": {p: med["upstream"] / med[p] for p in paths} if "upstream" in paths else {},
               "gflops": {p: 2 * rows * k * n / med[p] / 1e9 for p in paths},
               "max_error": {p: float(np.abs(o[:64] - ref).max() / np.abs(ref).max()) for p, o in outputs.items()}}
        rows_out.append(row)
        if progress:
            progress(i + 1, len(shapes), row)
    return {"kind": "linear", "size": size, "threads": threads, "repeat": repeat, "paths": list(paths),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "build": _build(), "rows": rows_out}


def format_linear_table(report: dict) -> str:
    ps = report["paths"]
    head = f"{'rows x K -> N':>20} " + " ".join(f"{p + ' ms':>12}" for p in ps) + " " + \
        " ".join(f"{'x ' + p:>8}" for p in ps if p != "upstream") + " " + \
        " ".join(f"{p + ' GF/s':>11}" for p in ps) + f" {'max err':>8}  layers"
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        shape = f"{r['rows']} x {r['K']} -> {r['N']}"
        cells = f"{shape:>20} "
        cells += " ".join(f"{r['median_s'][p] * 1e3:>12.2f}" for p in ps)
        if r["speedup_vs_upstream"]:
            cells += " " + " ".join(f"{r['speedup_vs_upstream'][p]:>8.2f}" for p in ps if p != "upstream")
        cells += " " + " ".join(f"{r['gflops'][p]:>11.1f}" for p in ps)
        cells += f" {max(r['max_error'].values()):>8.1e}  {'; '.join(r['layers'])}"
        lines.append(cells)
    lines.append(_footer(report, f"median of {report['repeat']}, F16 weights"))
    return "\n".join(lines)


def expert_bench(model: str, size: int = 512, threads: int = 2, repeat: int = 3, progress=None) -> dict:
    """One UNet evaluation per ALTER expert (at a timestep it serves) against the dense model at the same
    timestep, in this process (two contexts, interleaved repetitions, a warm-up call each first)."""
    import time

    from converters.alter import unet_macs

    from . import StableDiffusion

    if size <= 0 or size % 64:
        raise ValueError(f"size must be a positive multiple of 64, got {size}")
    with StableDiffusion(model, threads=threads, alter=True) as routed, \
            StableDiffusion(model, threads=threads, alter=False) as dense:
        routing = routed.alter.routing
        family = routed.model_file.family
        macs = unet_macs(family, size // 8, size // 8)
        per_expert = macs.experts(routing)
        rng = np.random.default_rng(0)
        latent = rng.standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
        context = rng.standard_normal((1, 77, 768 if family == "sd1" else 1024)).astype(np.float32)
        rows = []
        used = sorted(set(int(e) for e in routing.table))
        for i, e in enumerate(used):
            lo, hi = routing.timestep_ranges(e)[0]
            t = float((lo + hi) // 2)
            times = {"expert": [], "dense": []}
            for sd in (routed, dense):
                sd.unet(latent, t, context)  # warm-up: one-off filter transforms, allocations
            for _ in range(repeat):
                for key, sd in (("expert", routed), ("dense", dense)):
                    t0 = time.perf_counter()
                    sd.unet(latent, t, context)
                    times[key].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"expert": e, "timestep": t, "timesteps": routing.timestep_ranges(e),
                         "skipped": [u for u, k in zip(routing.units, routing.masks[e]) if not k],
                         "macs": per_expert[e], "dense_macs": macs.dense, "median_s": med, "seconds": times,
                         "speedup_vs_dense": med["dense"] / med["expert"]})
            if progress:
                progress(i + 1, len(used), rows[-1])
    return {"kind": "experts", "model": str(model), "size": size, "threads": threads, "repeat": repeat,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "build": _build(), "rows": rows}


def format_expert_table(report: dict) -> str:
    head = f"{'expert':>6} {'timesteps':>22} {'skipped':>8} {'MACs':>7} {'expert ms':>10} {'dense ms':>10} " \
        f"{'speedup':>8}"
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        ranges = ",".join(f"{a}-{b}" for a, b in r["timesteps"])
        lines.append(f"{r['expert']:>6} {ranges[:22]:>22} {len(r['skipped']):>8} "
                     f"{100 * r['macs'] / r['dense_macs']:>6.1f}% {r['median_s']['expert'] * 1e3:>10.0f} "
                     f"{r['median_s']['dense'] * 1e3:>10.0f} {r['speedup_vs_dense']:>7.2f}x")
    lines.append(_footer(report, f"one UNet evaluation (batch 1), median of {report['repeat']}"))
    return "\n".join(lines)


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


def _footer(report: dict, what: str) -> str:
    """The line under every table: machine, threads, size, what was measured, date."""
    m = report["machine"]
    return f"{m['cpu']} ({', '.join(m['simd'])}), {report['threads']} threads, {report['size']} px, {what}, " \
        f"{report['date']}"


def _build() -> dict:
    from . import _native

    return _native.build_info()


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
    lines.append(_footer(report, f"median of {report['repeat']}"))
    lines.append("as run: the variant the cost model picks for the layer in a model (winograd_f4 or winograd_f2: "
                 "filters hoisted; _fused: transformed inside the products) and its speedup over im2col.")
    return "\n".join(lines)


__all__ = ["layer_bench", "format_layer_table", "sd15_conv_shapes", "attention_bench", "format_attention_table",
           "sd_attention_shapes", "machine_info", "asdict"]


# ---- whole generations: variants side by side, each run in its own worker process -----------------------------

# A variant is a name for StableDiffusion keyword arguments: new accelerations plug in here.
VARIANTS: dict[str, dict] = {
    "upstream": {"backend": "upstream", "conv": "im2col"},
    "accelerated": {"backend": "accelerated"},  # the accelerated library's defaults (all accelerations on)
    # all off: upstream's paths
    "im2col": {"backend": "accelerated", "conv": "im2col", "attention": "upstream", "linear": "upstream"},
    "direct": {"backend": "accelerated", "conv": "direct", "attention": "upstream", "linear": "upstream"},
    # one acceleration at a time
    "winograd": {"backend": "accelerated", "conv": "winograd", "attention": "upstream", "linear": "upstream"},
    "fast-attention": {"backend": "accelerated", "conv": "im2col", "attention": "fast", "linear": "upstream"},
    "fast-linear": {"backend": "accelerated", "conv": "im2col", "attention": "upstream", "linear": "fast"},
    "upstream-direct": {"backend": "upstream", "conv": "direct"},
    "dense": {"backend": "accelerated", "alter": False},  # an ALTER file's dense model, accelerated
}


def parse_variant(spec: str) -> tuple[str, dict, int | None]:
    """`name` or `name@STEPS` (a per-variant step count, e.g. `upstream@50` against a 20-step ALTER run):
    (label, StableDiffusion keyword arguments, steps or None)."""
    name, _, steps = spec.partition("@")
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)} (optionally name@STEPS)")
    if steps:
        if not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"variant {spec!r}: the step count after @ must be a positive integer")
        return spec, VARIANTS[name], int(steps)
    return spec, VARIANTS[name], None

# Phase durations the native library logs (INFO), identical in both libraries.
# "ggml_extend.hpp:1940 - unet compute buffer size: 559.43 MB(RAM)" (DEBUG): the graph's working memory, per runner.
_BUFFER_LOG = re.compile(r"(\S+) compute buffer size: ([0-9.]+) MB")

_PHASE_LOGS = {
    "text_encoding": re.compile(r"get_learned_condition completed, taking ([0-9.]+)s"),
    "sampling": re.compile(r"sampling completed, taking ([0-9.]+)s"),
    "vae_decode": re.compile(r"decode_first_stage completed, taking ([0-9.]+)s"),
    "generate": re.compile(r"generate_image completed in ([0-9.]+)s"),
}


def _worker(variant: dict, model: str, params: dict, threads: int, queue) -> None:
    """One model load + one generation in a fresh process; reports phases, steps, peak RSS and the image."""
    import logging
    import time

    try:
        from . import StableDiffusion

        lines: list[str] = []

        class Capture(logging.Handler):
            def emit(self, record):
                lines.append(record.getMessage())

        logger = logging.getLogger("pysdcpp.native")
        logger.setLevel(logging.DEBUG)  # the compute-buffer sizes are debug lines
        logger.addHandler(Capture())
        stamps: list[float] = []
        t0 = time.perf_counter()
        with StableDiffusion(model, threads=threads, **variant) as sd:
            load = time.perf_counter() - t0
            t1 = time.perf_counter()
            result = sd.generate_with_info(callback=lambda *a: stamps.append(time.perf_counter()), **params)
            wall = time.perf_counter() - t1
        phases = {"model_load": load, "total": load + wall}
        for name, rx in _PHASE_LOGS.items():
            found = [float(m.group(1)) for line in lines if (m := rx.search(line))]
            if found:
                phases[name] = found[-1]
        # The callback fires once before the first step (step 0), then after each step.
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        hwm = next((int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")),
                   0)
        buffers: dict[str, float] = {}
        for line in lines:
            if m := _BUFFER_LOG.search(line):
                buffers[m.group(1)] = max(buffers.get(m.group(1), 0.0), float(m.group(2)))
        alter = [s.as_dict() for s in result.alter_steps]
        queue.put({"ok": True, "phases": phases, "steps": steps, "peak_rss": hwm, "compute_buffers_mb": buffers,
                   "alter_steps": alter, "image": np.asarray(result.images[0]).copy()})
    except BaseException as e:  # reported, never raised: the other variants go on
        queue.put({"ok": False, "error": f"{type(e).__name__}: {e}"})


def run_variant(variant: dict, model: str, params: dict, threads: int, timeout: float) -> dict:
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(variant, model, params, threads, q), daemon=True)
    p.start()
    try:
        out = q.get(timeout=timeout)
    except queue_mod.Empty:
        p.kill()
        p.join()
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    p.join(timeout=30)
    if p.exitcode not in (0, None):
        out.setdefault("warning", f"worker exit code {p.exitcode}")
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def summarize(runs: dict[str, list[dict]], baseline: str = "upstream") -> dict:
    """Medians and ranges per phase, pairwise speedups against `baseline` (repetition by repetition)."""
    out = {}
    base_runs = runs.get(baseline, [])
    for name, rs in runs.items():
        ok = [r for r in rs if r.get("ok")]
        entry = {"runs": len(rs), "failed": [r["error"] for r in rs if not r.get("ok")]}
        if ok:
            phases = sorted({k for r in ok for k in r["phases"]})
            entry["phases"] = {ph: {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
                               for ph in phases if (vals := [r["phases"][ph] for r in ok if ph in r["phases"]])}
            steps = [s for r in ok for s in r["steps"]]
            if steps:
                entry["step"] = {"median": statistics.median(steps), "min": min(steps), "max": max(steps)}
            # Steps after each generation's first: the steady state, once the first step's one-off work (the
            # hoisted filter transforms, buffer allocation) is done; what one more UNet evaluation costs.
            later = [s for r in ok for s in r["steps"][1:]]
            if later:
                entry["later_step"] = {"median": statistics.median(later), "min": min(later), "max": max(later)}
            entry["peak_rss"] = max(r["peak_rss"] for r in ok)
            entry["compute_buffers_mb"] = ok[0].get("compute_buffers_mb", {})
            if ok[0].get("alter_steps"):
                st = ok[0]["alter_steps"]
                entry["alter"] = {"experts": [s["expert"] for s in st],
                                  "fraction_of_dense_macs": sum(s["macs"] for s in st) / sum(s["dense_macs"] for s in st)}
            pairs = [(b, r) for b, r in zip(base_runs, rs) if b.get("ok") and r.get("ok")]
            entry["speedup"] = {ph: statistics.median(b["phases"][ph] / r["phases"][ph] for b, r in pairs
                                                      if r["phases"].get(ph, 0) > 0 and ph in b["phases"])
                                for ph in entry["phases"]
                                if any(r["phases"].get(ph, 0) > 0 and ph in b["phases"] for b, r in pairs)}
            if base_runs and base_runs[0].get("ok"):
                ref = base_runs[0]["image"]
                img = ok[0]["image"]
                entry["psnr_vs_" + baseline] = psnr(img, ref)
                entry["max_abs_diff_vs_" + baseline] = int(np.abs(img.astype(int) - ref.astype(int)).max())
        out[name] = entry
    return out


def model_bench(model: str, variants: list[str], size: int = 256, steps: int = 4, threads: int = 2,
                repeat: int = 2, timeout: float = 1800.0, progress=None, prompt: str = "a lighthouse at dusk",
                seed: int = 42) -> dict:
    parsed = {label: (kwargs, st) for label, kwargs, st in map(parse_variant, variants)}
    if size <= 0 or size % 64:
        raise ValueError(f"size must be a positive multiple of 64, got {size}")
    if repeat < 1 or steps < 1 or threads < 1:
        raise ValueError("repeat, steps and threads must be at least 1")
    params = {"prompt": prompt, "width": size, "height": size, "num_inference_steps": steps, "seed": seed}
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(repeat):
        for v in variants:  # interleaved: A B A B ...
            kwargs, own_steps = parsed[v]
            p = dict(params, num_inference_steps=own_steps) if own_steps else params
            r = run_variant(kwargs, str(model), p, threads, timeout)
            runs[v].append(r)
            if progress:
                progress(rep, v, r)
    summary = summarize(runs, variants[0])
    return {"kind": "model", "model": str(model), "size": size, "steps": steps, "threads": threads,
            "repeat": repeat, "baseline": variants[0],
            "variants": {v: dict(parsed[v][0], **({"steps": parsed[v][1]} if parsed[v][1] else {})) for v in variants},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "build": _build(), "summary": summary,
            "runs": {v: [{k: val for k, val in r.items() if k != "image"} for r in rs] for v, rs in runs.items()}}


def format_model_table(report: dict) -> str:
    phases = ["model_load", "text_encoding", "sampling", "vae_decode", "total"]
    w = max(14, *(len(n) + 1 for n in report["summary"]))
    head = f"{'variant':<{w}}" + "".join(f"{p:>15}" for p in phases) + \
        f"{'step':>9}{'later':>9}{'peak RSS':>10}{'UNet buf':>10}{'MACs':>6}{'PSNR':>8}"
    lines = [head, "-" * len(head)]
    base = report["baseline"]
    for name, e in report["summary"].items():
        if "phases" not in e:
            lines.append(f"{name:<{w}} FAILED: {'; '.join(e['failed'])}")
            continue
        row = f"{name:<{w}}"
        for p in phases:
            ph = e["phases"].get(p)
            sp = e["speedup"].get(p)
            row += f"{ph['median']:>8.2f}s" + (f" x{sp:<4.2f}" if sp and name != base else " " * 6) if ph else " " * 15
        row += f"{e.get('step', {}).get('median', float('nan')):>8.2f}s"
        row += f"{e.get('later_step', {}).get('median', float('nan')):>8.2f}s{e['peak_rss'] / 2**20:>8.0f}MB"
        buf = e.get("compute_buffers_mb", {}).get("unet")
        row += f"{buf:>8.0f}MB" if buf else f"{'-':>10}"
        frac = e.get("alter", {}).get("fraction_of_dense_macs")
        row += f"{100 * frac:>5.0f}%" if frac is not None else f"{'-':>6}"
        p_ = e.get("psnr_vs_" + base)
        row += f"{p_:>8.1f}" if p_ is not None and p_ != float("inf") else f"{'same':>8}"
        if e["failed"]:
            row += f"  ({len(e['failed'])} failed: {e['failed'][0]})"
        lines.append(row)
    lines.append(_footer(report, f"{report['steps']} steps, median of {report['repeat']} (x: speedup vs {base}; "
                                 "UNet buf: its graph's compute buffer; MACs: ALTER's share of the dense UNet)"))
    return "\n".join(lines)


def plot_report(report: dict, path) -> None:
    """A chart a person reads at a glance: per-phase medians per variant, or per-layer speedups."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'pysdcpp[plot]'") from None
    fig, ax = plt.subplots(figsize=(10, 5.5))
    if report["kind"] == "model":
        phases = ["model_load", "text_encoding", "sampling", "vae_decode"]
        names = [n for n, e in report["summary"].items() if "phases" in e]
        left = np.zeros(len(names))
        for ph in phases:
            vals = np.array([report["summary"][n]["phases"].get(ph, {}).get("median", 0.0) for n in names])
            ax.barh(names, vals, left=left, label=ph)
            left += vals
        for i, n in enumerate(names):
            sp = report["summary"][n].get("speedup", {}).get("total")
            label = f"{left[i]:.1f} s" + (f"  ({sp:.2f}x)" if sp and n != report["baseline"] else "")
            ax.text(left[i], i, " " + label, va="center")
        ax.invert_yaxis()
        ax.set_xlim(0, float(left.max()) * 1.25 if len(names) else 1)  # room for the labels
        ax.set_xlabel("seconds (median)")
        ax.set_title(f"{report['size']} px, {report['steps']} steps, {report['threads']} threads")
        ax.legend(loc="lower right")
    else:
        rows = report["rows"]
        labels = [f"{r['C']}->{r['K']} @{r['H']}" for r in rows]
        algos = [a for a in report["algorithms"] if a != "im2col"]
        x = np.arange(len(rows))
        width = 0.8 / max(1, len(algos))
        for i, a in enumerate(algos):
            ax.bar(x + i * width, [r["speedup_vs_im2col"].get(a, 0) for r in rows], width, label=a)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(x + width * (len(algos) - 1) / 2, labels, rotation=90, fontsize=7)
        ax.set_ylabel("speedup vs im2col")
        ax.set_title(f"3x3 convs of SD1.5 at {report['size']} px, {report['threads']} threads")
        ax.legend()
    m = report["machine"]
    fig.text(0.01, 0.01, f"{m['cpu']}, {report['date'][:10]}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
